"""LoRA adapters on the Flax ports (LCM-LoRA): layers that add a low-rank update, and pure functions on adapter trees.

The ports build their linear and convolution layers from `Dense` / `Conv` below. Each adds ``x @ a @ b`` to its
output when the variables passed to ``apply`` hold a ``"lora"`` collection with ``{"a", "b"}`` at the layer's path,
and is a plain ``nn.Dense`` / ``nn.Conv`` otherwise (same params, same numbers). So one UNet module serves as
teacher (``{"params": base}``) and as LoRA student (``variables(base, adapters, scale)``), and the base params are
shared, never copied.

An adapter tree mirrors the param tree at the adapted layers: ``{..., "to_q": {"a": [in, r], "b": [r, out]}}``
(a conv: ``a`` [kh, kw, in, r] with the layer's stride and padding, ``b`` [r, out]), float32. The update is
``scale * b(a(x))``, ``scale = alpha / rank``, as PEFT's LoRA layers compute it (``lora_B(lora_A(x)) * scaling``).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlcd.errors import InputError
from jaxlcd.weights.tables import pt_name

COLLECTION = "lora"

# diffusers' train_lcm_distill_lora_sd_wds.py targets (PEFT target_modules: a name matches a module path equal to it
# or ending in "." + it): attention and feed-forward projections, the transformers' proj_in/proj_out, the ResNet
# convolutions and time-embedding projections, the down/up-sampler convolutions.
DIFFUSERS_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def _plus_adapter(layer: nn.Module, x, y, update):
    """``y + update(x, a, b)`` in the layer's compute dtype when the ``"lora"`` collection has this layer, else ``y``."""
    if not layer.has_variable(COLLECTION, "a"):
        return y
    dt = layer.dtype or x.dtype
    a, b = layer.get_variable(COLLECTION, "a").astype(dt), layer.get_variable(COLLECTION, "b").astype(dt)
    return y + update(x.astype(dt), a, b)


class Dense(nn.Dense):
    """``nn.Dense`` plus ``x @ a @ b`` when the ``"lora"`` collection has this layer."""

    @nn.compact
    def __call__(self, x):
        return _plus_adapter(self, x, super().__call__(x), lambda x, a, b: (x @ a) @ b)


class Conv(nn.Conv):
    """``nn.Conv`` plus ``b`` applied to ``conv_a(x)`` (``a``: the layer's kernel size, stride and padding)."""

    @nn.compact
    def __call__(self, x):
        strides = self.strides if isinstance(self.strides, (tuple, list)) else (self.strides or 1,) * 2
        conv_a = lambda x, a: jax.lax.conv_general_dilated(x, a, strides, self.padding,
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return _plus_adapter(self, x, super().__call__(x), lambda x, a, b: conv_a(x, a) @ b)


def module_name(flax_path: Sequence[str]) -> str:
    """The diffusers module name of a layer's Flax path, e.g. ("up_blocks_1.attentions_0", ..., "to_out_0") ->
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"."""
    return pt_name(tuple(flax_path) + ("bias",), 1).pt_key[:-len(".bias")]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def linear_layers(params: Mapping) -> dict:
    """{Flax layer path (tuple): kernel shape} of every linear and convolution layer of a param tree."""
    return {path[:-1]: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(dict(params)).items()
            if path[-1] == "kernel" and len(leaf.shape) in (2, 4)}


def adapted_layers(params: Mapping, targets: Sequence[str]) -> dict:
    """{Flax layer path (tuple): kernel shape} of the layers of ``params`` (a UNet param tree, arrays or shapes) whose
    diffusers module name matches one of ``targets`` (PEFT's rule). Raises InputError for a target that matches
    no linear or convolution layer."""
    kernels = linear_layers(params)
    names = {path: module_name(path) for path in kernels}
    unused = [t for t in targets if not any(_matches(n, t) for n in names.values())]
    if unused:
        raise InputError(f"lora.targets {unused} match no linear or convolution layer of the UNet; targets are module "
                         f"names as in diffusers (e.g. {', '.join(DIFFUSERS_TARGETS[:4])}), matched like PEFT's "
                         "target_modules (the full name or its ending after a '.')")
    return {path: shape for path, shape in sorted(kernels.items()) if any(_matches(names[path], t) for t in targets)}


def init_adapters(params: Mapping, targets: Sequence[str], rank: int, rng) -> dict:
    """A new adapter tree (float32) for the layers of ``params`` that ``targets`` name: ``a`` drawn like PEFT's default
    (kaiming-uniform, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in x kh x kw), ``b`` zeros, so the student starts
    equal to the base."""
    if rank < 1:
        raise InputError(f"lora.rank={rank} must be a positive integer")
    layers = adapted_layers(params, targets)
    flat = {}
    for (path, shape), key in zip(layers.items(), jax.random.split(rng, max(len(layers), 1))):
        fan_in = math.prod(shape[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        flat[path + ("a",)] = jax.random.uniform(key, shape[:-1] + (rank,), jnp.float32, -bound, bound)
        flat[path + ("b",)] = jnp.zeros((rank, shape[-1]), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def scaled(adapters: Mapping, scale: float) -> dict:
    """The adapter tree with every ``b`` multiplied by ``scale`` (what the layers add is then ``x @ a @ b``)."""
    flat = traverse_util.flatten_dict(dict(adapters))
    return traverse_util.unflatten_dict({k: v * scale if k[-1] == "b" else v for k, v in flat.items()})


def variables(params: Mapping, adapters: Mapping | None = None, scale: float = 1.0) -> dict:
    """The ``apply`` variables of a UNet with base ``params`` and (optionally) ``adapters`` at ``scale``."""
    if adapters is None:
        return {"params": params}
    return {"params": params, COLLECTION: scaled(adapters, scale)}


def merge(params: Mapping, adapters: Mapping, scale: float) -> dict:
    """``params`` with each adapted kernel replaced by kernel + scale * (a b) in float32 (a fused student: one
    plain UNet that computes what base + adapters compute). Neither input is modified."""
    flat = traverse_util.flatten_dict(dict(params))
    for path, ab in traverse_util.flatten_dict(dict(adapters), is_leaf=lambda _, v: "a" in v).items():
        kernel = flat[path + ("kernel",)]
        delta = jnp.einsum("...ir,ro->...io", jnp.asarray(ab["a"], jnp.float32), jnp.asarray(ab["b"], jnp.float32))
        flat[path + ("kernel",)] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)
