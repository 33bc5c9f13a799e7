"""How a model family describes itself to the weights layer: `ComponentSpec`, and its abstract param tree."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax


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


@functools.lru_cache(maxsize=64)
def param_shapes(module, spec: ComponentSpec):
    """The abstract param tree of ``module`` (no FLOPs, no memory). Cached: tracing a UNet's init takes ~1 s and
    modules hash by their config, so reloading a model of the same config (every evaluation row) skips it."""
    kw = {"method": getattr(module, spec.init_method)} if spec.init_method else {}
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *spec.dummy_inputs(module), **kw))
    return variables["params"]
