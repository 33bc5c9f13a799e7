"""load_component / save_component: model directories <-> (Flax module, params).

The component registry: each ported model (`jaxlcd.models`) declares a `jaxlcd.weights.spec.ComponentSpec`
(class names it answers to, how to build the module from config.json, how to map file keys to canonical PyTorch
keys). The kind of a directory is read from config.json: ``_class_name`` (diffusers) or ``architectures``
(transformers). This module sits above both `jaxlcd.models` and `jaxlcd.weights`, so neither imports the other's
registry.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlcd.models import clip, clip_text, lrm, unet, vae
from jaxlcd.weights import io, tables
from jaxlcd.weights.spec import ComponentSpec, param_shapes
from jaxlcd.weights.tables import WeightsError

SPECS: tuple[ComponentSpec, ...] = (unet.SPEC, vae.SPEC, clip_text.SPEC, clip_text.SPEC_WITH_PROJECTION, clip.SPEC,
                                    lrm.SPEC)


def spec_for_config(config: dict, where: str = "config.json") -> ComponentSpec:
    """The spec whose class names include config.json's ``_class_name`` or one of its ``architectures``."""
    names = [config.get("_class_name")] + list(config.get("architectures") or [])
    for spec in SPECS:
        if any(n in spec.class_names for n in names if n):
            return spec
    known = sorted(n for s in SPECS for n in s.class_names)
    found = [n for n in names if n]
    raise WeightsError(f"{where} names the model class {found[0] if found else 'nothing'!r} "
                       f"('_class_name' or 'architectures'); supported: {known}")


def load_component(directory: str, *, dtype=jnp.float32, param_dtype=np.float32, variant: Optional[str] = None,
                   allow_pickle: bool = False, **module_kw):
    """Load a diffusers/transformers model directory as ``(flax_module, params)``.

    ``dtype`` is the module's compute dtype; params are numpy-converted to ``param_dtype`` (float32
    by default) in Flax layout. ``variant`` picks e.g. ``diffusion_pytorch_model.fp16.safetensors``.
    Extra keyword arguments (e.g. ``remat=True``) go to the module.
    """
    config = io.read_config(directory)
    spec = spec_for_config(config, f"{directory}/config.json")
    module = spec.build(config, dtype=dtype, **module_kw)
    shapes = param_shapes(module, spec)
    table = tables.build_table(shapes)
    raw = io.read_tensors(directory, spec.weights_stem, variant=variant, allow_pickle=allow_pickle)
    state = {}
    for key, value in raw.items():
        canon = spec.canonical_key(key)
        if canon is not None:
            state[canon] = value
    params = tables.pt_to_flax(state, table, shapes, dtype=param_dtype, what=directory)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def save_component(module, params, out_dir: str, dtype=np.float32) -> None:
    """Write ``module``'s config.json and its params as PyTorch-layout safetensors in ``out_dir``.

    dtype: float32 (default), float16 or bfloat16 for the stored tensors.
    """
    config = module.config.to_dict()
    spec = spec_for_config(config)
    table = tables.build_table(param_shapes(module, spec))
    tensors = tables.flax_to_pt(jax.device_get(params), table, dtype=dtype)
    io.write_component_dir(out_dir, config, {spec.file_key(k): v for k, v in tensors.items()}, spec.weights_stem)
