"""Flax linen port of open_clip's ``ModifiedResNet`` (the CLIP RN50 image tower), any input channels.

Used as ``latent_rn50``, the image tower of the latent proxy reward model, which scores 4-channel SD
latents ([B, 64, 64, 4] NHWC) directly; ``in_channels=3`` gives the original CLIP RN tower.
Architecture (as open_clip): a 3-conv stem (3x3 stride 2, 3x3, 3x3, each BN + ReLU) and a 2x2 avg
pool; four stages of Bottleneck blocks (1x1, 3x3, [avg pool when strided], 1x1 x4; the shortcut is
avg pool + 1x1 conv + BN) -- "anti-aliased" strides via avg pools, never strided convs; and an
attention pool (mean token prepended, learned positional embedding, multi-head attention of the
mean token over all tokens, ``c_proj``). Total stride 32.

Module names mirror the open_clip state-dict keys (``layer2.0.downsample.1.running_var`` <-> params
``layer2_0/downsample_1/running_var``; ``attnpool.q_proj.weight`` <-> ``attnpool/q_proj/kernel``), so
`jaxlcd.weights.tables` maps them automatically. `canonical_key` drops ``num_batches_tracked``.

BatchNorm is inference-only (a fixed affine, as the reference in eval mode): its running statistics
are *params*, so that they round-trip through the weight table. They receive non-zero gradients;
an optimizer must not update them -- mask them with `batchnorm_stat_mask` (e.g.
``optax.masked(tx, jax.tree.map(lambda m: not m, batchnorm_stat_mask(params)))``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlcd.models.config import ConfigError, ModelConfig
from jaxlcd.models.attention import attention
from jaxlcd.models.layers import maybe_remat
from jaxlcd.errors import InputError

Dtype = Any
EXPANSION = 4
BN_STATS = ("running_mean", "running_var")


@dataclasses.dataclass(frozen=True)
class ModifiedResNetConfig(ModelConfig):
    """open_clip ``ModifiedResNet`` arguments (defaults = CLIP RN50) plus ``in_channels``.

    The feature width is ``width * 32``; ``heads`` must divide it. ``image_size`` is the only input
    height/width the model accepts (the positional embedding is sized for ``image_size // 32``).
    """
    layers: tuple = (3, 4, 6, 3)
    width: int = 64
    output_dim: int = 1024
    heads: int = 32
    image_size: int = 224
    in_channels: int = 3

    @property
    def embed_dim(self) -> int:
        return self.width * 32

    def validate(self, d: dict) -> None:
        if not isinstance(self.layers, tuple) or len(self.layers) != 4 or not all(
                isinstance(n, int) and n >= 1 for n in self.layers):
            raise ConfigError(f"ModifiedResNet config: layers={self.layers!r} must be 4 positive ints")
        for key in ("width", "output_dim", "heads", "image_size", "in_channels"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"ModifiedResNet config: {key}={getattr(self, key)!r} must be a positive int")
        if self.width % 2:
            raise ConfigError(f"ModifiedResNet config: width={self.width} must be even")
        if self.embed_dim % self.heads:
            raise ConfigError(f"ModifiedResNet config: heads={self.heads} does not divide width*32={self.embed_dim}")
        if self.image_size < 32:
            raise ConfigError(f"ModifiedResNet config: image_size={self.image_size} must be >= 32")


def _conv(features: int, kernel: int, name: str, stride: int = 1, **kw) -> nn.Conv:
    """A bias-free PyTorch-style Conv2d (symmetric padding ``kernel // 2``), NHWC."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   use_bias=False, name=name, **kw)


def _avg_pool(x, k: int):
    """PyTorch ``AvgPool2d(k)`` (stride k, floor): [B,H,W,C] -> [B,H//k,W//k,C], averaged in float32."""
    return nn.avg_pool(x.astype(jnp.float32), (k, k), strides=(k, k), padding="VALID").astype(x.dtype)


class BatchNorm2d(nn.Module):
    """Inference-mode ``nn.BatchNorm2d`` (eps 1e-5): [..., C] -> [..., C] in ``dtype``, computed in float32.

    Params ``weight``, ``bias``, ``running_mean``, ``running_var`` (all [C]); the last two are
    statistics that the optimizer must mask (`batchnorm_stat_mask`). ``zero_init`` starts ``weight``
    at 0 (open_clip does this for each Bottleneck's ``bn3``).
    """
    features: int
    eps: float = 1e-5
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape, pd, f32 = (self.features,), self.param_dtype, jnp.float32
        weight = self.param("weight", nn.initializers.zeros if self.zero_init else nn.initializers.ones, shape, pd)
        bias = self.param("bias", nn.initializers.zeros, shape, pd)
        mean = self.param("running_mean", nn.initializers.zeros, shape, pd)
        var = self.param("running_var", nn.initializers.ones, shape, pd)
        scale = weight.astype(f32) * jax.lax.rsqrt(var.astype(f32) + self.eps)
        return ((x.astype(f32) - mean.astype(f32)) * scale + bias.astype(f32)).astype(self.dtype)


class Bottleneck(nn.Module):
    """open_clip Bottleneck: x [B,H,W,Cin] -> [B,H/stride,W/stride,4*planes] in ``dtype``."""
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_ch = self.planes * EXPANSION
        out = nn.relu(BatchNorm2d(self.planes, name="bn1", **kw)(_conv(self.planes, 1, "conv1", **kw)(x)))
        out = nn.relu(BatchNorm2d(self.planes, name="bn2", **kw)(_conv(self.planes, 3, "conv2", **kw)(out)))
        if self.stride > 1:
            out = _avg_pool(out, self.stride)
        out = BatchNorm2d(out_ch, zero_init=True, name="bn3", **kw)(_conv(out_ch, 1, "conv3", **kw)(out))
        identity = x
        if self.stride > 1 or x.shape[-1] != out_ch:
            identity = _avg_pool(x, self.stride) if self.stride > 1 else x
            identity = _conv(out_ch, 1, "downsample_0", **kw)(identity)
            identity = BatchNorm2d(out_ch, name="downsample_1", **kw)(identity)
        return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
    """open_clip AttentionPool2d: x [B,S,S,embed_dim] (S = spacial_dim) -> [B, output_dim] in ``dtype``.

    Only the mean token's query is computed (the reference computes all queries and keeps ``x[0]``;
    each query's attention is independent, so the result is the same). Softmax in float32.
    """
    spacial_dim: int
    embed_dim: int
    heads: int
    output_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        d = self.embed_dim
        pos = self.param("positional_embedding",
                         lambda key, shape, dt: jax.random.normal(key, shape, dt) / d ** 0.5,
                         (self.spacial_dim ** 2 + 1, d), self.param_dtype)
        init = nn.initializers.normal(stddev=d ** -0.5)
        dense = lambda n, f: nn.Dense(f, name=n, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.reshape(x.shape[0], -1, x.shape[-1])                                     # [B, S*S, D]
        mean = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(x.dtype)
        x = jnp.concatenate([mean, x], axis=1) + pos[None].astype(x.dtype)            # [B, S*S+1, D]
        q = dense("q_proj", d)(x[:, :1])
        k, v = dense("k_proj", d)(x), dense("v_proj", d)(x)
        out = attention(q, k, v, heads=self.heads, impl=self.attention_impl)                           # [B, 1, D]
        return dense("c_proj", self.output_dim)(out[:, 0])


class ModifiedResNet(nn.Module):
    """open_clip ``ModifiedResNet``: images/latents [B, image_size, image_size, in_channels] (NHWC, any
    float dtype) -> attention-pool features [B, output_dim] in ``dtype``.

    ``dtype`` is the compute dtype (BatchNorm, pooling averages and the attention softmax run in
    float32); ``param_dtype`` the dtype of freshly initialised params; ``remat`` rematerialises each
    Bottleneck in the backward pass (param names unchanged). Raises ValueError for any other input
    spatial size or channel count (no positional-embedding interpolation).
    """
    config: ModifiedResNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        want = (c.image_size, c.image_size, c.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise InputError(f"ModifiedResNet: input must be [batch, {c.image_size}, {c.image_size}, "
                             f"{c.in_channels}] (NHWC; image_size={c.image_size}, in_channels={c.in_channels}), "
                             f"got shape {tuple(x.shape)}; the positional embedding is not interpolated")
        x = x.astype(self.dtype)
        half = c.width // 2
        for i, (ch, stride) in enumerate([(half, 2), (half, 1), (c.width, 1)], start=1):
            x = _conv(ch, 3, f"conv{i}", stride=stride, **kw)(x)
            x = nn.relu(BatchNorm2d(ch, name=f"bn{i}", **kw)(x))
        x = _avg_pool(x, 2)
        block = maybe_remat(Bottleneck, self.remat)
        for stage, n in enumerate(c.layers):
            for j in range(n):
                stride = 2 if stage > 0 and j == 0 else 1
                x = block(c.width * 2 ** stage, stride, name=f"layer{stage + 1}_{j}", **kw)(x)
        return AttentionPool2d(c.image_size // 32, c.embed_dim, c.heads, c.output_dim, name="attnpool",
                              attention_impl=self.attention_impl, **kw)(x)


def batchnorm_stat_mask(params):
    """Pytree of bools like ``params``: True exactly on BatchNorm ``running_mean``/``running_var`` leaves."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in BN_STATS, params)


def canonical_key(key: str) -> Optional[str]:
    """PyTorch state-dict key -> table key: None (drop) for BatchNorm ``num_batches_tracked`` buffers."""
    return None if key.endswith("num_batches_tracked") else key


def build(config: dict, dtype=jnp.float32, **kw) -> ModifiedResNet:
    """A `ModifiedResNet` from a config dict; ``kw``: param_dtype, remat."""
    return ModifiedResNet(ModifiedResNetConfig.from_dict(config), dtype=dtype, **kw)


def dummy_inputs(module: ModifiedResNet) -> tuple:
    """A zero [1, image_size, image_size, in_channels] float32 batch (the only accepted spatial size)."""
    c = module.config
    return (jnp.zeros((1, c.image_size, c.image_size, c.in_channels), jnp.float32),)
