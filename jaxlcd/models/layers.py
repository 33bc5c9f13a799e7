"""Building blocks shared by the Flax ports (NHWC, PyTorch-compatible numerics).

Submodule names mirror the PyTorch attribute names (``to_q``, ``conv1``, ``norm1``...); list
members are named ``<list>_<i>`` (``resnets_0``), which `jaxlcd.weights.tables` maps to the
PyTorch ``<list>.<i>``. Norms and the attention softmax run in float32 whatever the compute dtype.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jaxlcd.errors import InputError
from jaxlcd.models import lora

Dtype = Any
_REFERENCE_MATH = contextvars.ContextVar("jaxlcd_reference_math", default=False)


@contextlib.contextmanager
def reference_math():
    """Trace the models as the plain math: XLA attention and no rematerialisation, whatever their settings.

    Only for analysing a program (`jaxlcd.training.flops.model_flops` traces under it to count model FLOPs
    without recompute or opaque fused kernels); never around a training or sampling trace.
    """
    token = _REFERENCE_MATH.set(True)
    try:
        yield
    finally:
        _REFERENCE_MATH.reset(token)


def in_reference_math() -> bool:
    """True inside `reference_math`."""
    return _REFERENCE_MATH.get()


def conv(features: int, kernel: int, name: str, *, stride: int = 1, padding: Any = None,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Conv:
    """A PyTorch-style Conv2d in NHWC: symmetric padding ``kernel // 2`` unless given (LoRA-capable, `lora.Conv`)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return lora.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, param_dtype=param_dtype, name=name)


def group_norm(num_groups: int, epsilon: float, name: str, dtype: Dtype, param_dtype: Dtype):
    """nn.GroupNorm computing in float32 (its params are ``scale``/``bias``), output cast to ``dtype``."""
    gn = nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32,
                      param_dtype=param_dtype, name=name)
    return lambda x: gn(x.astype(jnp.float32)).astype(dtype)


def layer_norm(epsilon: float, name: str, dtype: Dtype, param_dtype: Dtype):
    """nn.LayerNorm computing in float32, output cast to ``dtype``."""
    ln = nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype, name=name)
    return lambda x: ln(x.astype(jnp.float32)).astype(dtype)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
    """diffusers ``get_timestep_embedding``: t [B] (int or float) -> [B, dim] float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def activation(name: str):
    """The activation named in a diffusers/transformers config."""
    acts = {"silu": nn.silu, "swish": nn.silu, "gelu": lambda x: nn.gelu(x, approximate=False),
            "gelu_new": lambda x: nn.gelu(x, approximate=True), "relu": nn.relu,
            "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}
    if name not in acts:
        raise InputError(f"unsupported activation {name!r}; known: {sorted(acts)}")
    return acts[name]


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (time_embedding_norm 'default', output_scale_factor 1).

    x [B,H,W,Cin], temb [B,T] or None -> [B,H,W,out_channels].
    """
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    act: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(self.act)
        h = act(group_norm(self.groups, self.eps, "norm1", **kw)(x))
        h = conv(self.out_channels, 3, "conv1", **kw)(h)
        if temb is not None:
            h = h + lora.Dense(self.out_channels, name="time_emb_proj", **kw)(act(temb))[:, None, None, :]
        h = act(group_norm(self.groups, self.eps, "norm2", **kw)(h))
        h = conv(self.out_channels, 3, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``pad_asym`` = the VAE encoder's (0,1,0,1) pad + VALID conv."""
    out_channels: int
    pad_asym: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        padding = ((0, 1), (0, 1)) if self.pad_asym else ((1, 1), (1, 1))
        return conv(self.out_channels, 3, "conv", stride=2, padding=padding,
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv. x [B,H,W,C] -> [B,2H,2W,out_channels]."""
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, "conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


REMAT_POLICIES = {
    "none": None,
    "full": None,                                            # save only the block's inputs; recompute the rest
    "dots": jax.checkpoint_policies.dots_saveable,           # save every matmul/conv output
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,   # ...without a batch dimension
}


def remat_policy(remat):
    """(enabled, jax checkpoint policy) of a ``remat`` setting: False/True (= 'none'/'full'), one of
    REMAT_POLICIES, or the name of a policy in ``jax.checkpoint_policies`` (e.g. 'everything_saveable')."""
    if isinstance(remat, str) and remat.lower() in ("false", "true"):   # --config.remat=true
        remat = remat.lower() == "true"
    if remat is False or remat is None or remat == "none":
        return False, None
    if remat is True or remat == "full":
        return True, None
    if isinstance(remat, str) and remat in REMAT_POLICIES:
        return True, REMAT_POLICIES[remat]
    policy = getattr(jax.checkpoint_policies, remat, None) if isinstance(remat, str) else None
    if policy is None or remat.startswith(("_", "save_", "offload_")):   # those are policy factories
        raise InputError(f"remat={remat!r} is not a remat policy; use one of {list(REMAT_POLICIES)} or a "
                         "policy name of jax.checkpoint_policies")
    return True, policy


def maybe_remat(module_cls, remat):
    """``nn.remat(module_cls, policy=...)`` for a ``remat`` setting (see `remat_policy`); param names unchanged."""
    enabled, policy = remat_policy(remat)
    return nn.remat(module_cls, policy=policy) if enabled and not in_reference_math() else module_cls
