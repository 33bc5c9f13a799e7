"""load_component / save_component: model directories <-> (Flax module, params).

Each ported model declares a `ComponentSpec` (class names it answers to, how to build the module
from config.json, how to map file keys to canonical PyTorch keys). The kind of a directory is read
from config.json: ``_class_name`` (diffusers) or ``architectures`` (transformers).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlcd.weights import io, tables
from jaxlcd.weights.tables import WeightsError


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """How one model family is built from its config and named in its files."""
    class_names: tuple[str, ...]
    weights_stem: str                                 # "diffusion_pytorch_model" | "model"
    build: Callable[..., Any]                         # (config dict, dtype=..., **kw) -> nn.Module
    dummy_inputs: Callable[[Any], tuple]              # module -> small inputs for eval_shape(init)
    canonical_key: Callable[[str], Optional[str]] = lambda k: k  # file key -> table key, None to drop
    file_key: Callable[[str], str] = lambda k: k      # table key -> key written on save
    init_method: Optional[str] = None


def _specs() -> list[ComponentSpec]:
    from jaxlcd.models import clip, clip_text, lrm, unet, vae

    return [unet.SPEC, vae.SPEC, clip_text.SPEC, clip.SPEC, lrm.SPEC]


def spec_for_config(config: dict, where: str = "config.json") -> ComponentSpec:
    names = [config.get("_class_name")] + list(config.get("architectures") or [])
    for spec in _specs():
        if any(n in spec.class_names for n in names if n):
            return spec
    known = sorted(n for s in _specs() for n in s.class_names)
    found = [n for n in names if n]
    raise WeightsError(f"{where} names the model class {found[0] if found else 'nothing'!r} "
                       f"('_class_name' or 'architectures'); supported: {known}")


@functools.lru_cache(maxsize=64)
def param_shapes(module, spec: ComponentSpec):
    """The abstract param tree of ``module`` (no FLOPs, no memory). Cached: tracing a UNet's init takes ~1 s and
    modules hash by their config, so reloading a model of the same config (every evaluation row) skips it."""
    kw = {"method": getattr(module, spec.init_method)} if spec.init_method else {}
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *spec.dummy_inputs(module), **kw))
    return variables["params"]


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
