"""Flax linen port of diffusers ``AutoencoderKL`` (the Stable Diffusion VAE), NHWC.

Module names mirror diffusers (``encoder.down_blocks_0.resnets_1`` <-> ``encoder.down_blocks.0.resnets.1``)
so `jaxlcd.weights.tables` maps the params both ways. Legacy mid-block attention keys
(``query/key/value/proj_attn``) are accepted on load (`canonical_key`); saving writes current names.

Typical use::

    vae, params = load_component("sd/vae")
    moments = vae.apply({"params": params}, img, method=vae.encode)        # img in [-1, 1]
    z = scale_latents(latent_dist_sample(moments, rng), vae.config)        # diffusion-space latents
    img = vae.apply({"params": params}, unscale_latents(z, vae.config), method=vae.decode)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxlcd.models.config import ConfigError, ModelConfig
from jaxlcd.models.attention import attention
from jaxlcd.models.layers import (Downsample2D, ResnetBlock2D, Upsample2D, activation, conv, group_norm,
                                  maybe_remat)
from jaxlcd.weights.spec import ComponentSpec

Dtype = Any
VAE_EPS = 1e-6  # GroupNorm epsilon used everywhere in the diffusers VAE (hard-coded there too)
LOGVAR_CLIP = (-30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamps logvar to this range


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """The ``AutoencoderKL`` config.json keys the port uses (defaults = diffusers defaults)."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def validate(self, d: dict) -> None:
        n = len(self.block_out_channels)
        for key in ("down_block_types", "up_block_types"):
            allowed = "DownEncoderBlock2D" if key == "down_block_types" else "UpDecoderBlock2D"
            for t in getattr(self, key):
                if t != allowed:
                    raise ConfigError(f"vae config: {key} contains {t!r}, which the Flax port does not "
                                      f"support; supported: ['{allowed}']")
            if len(getattr(self, key)) != n:
                raise ConfigError(f"vae config: {key} has {len(getattr(self, key))} entries but "
                                  f"block_out_channels has {n}")
        try:
            activation(self.act_fn)
        except ValueError as e:
            raise ConfigError(f"vae config: act_fn: {e}") from None
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"vae config: block_out_channels entry {c} is not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.setdefault("_class_name", "AutoencoderKL")
        return d


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------

class VAEAttention(nn.Module):
    """diffusers ``Attention`` as built by the VAE mid block: GroupNorm -> single-head (by default)
    self-attention over the H*W positions -> to_out.0 -> + residual. x [B,H,W,C] -> [B,H,W,C]."""
    channels: int
    head_dim: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        hs = group_norm(self.groups, VAE_EPS, "group_norm", **kw)(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, name=n, **kw)(hs) for n in ("to_q", "to_k", "to_v"))
        out = attention(q, k, v, heads=c // self.head_dim, impl=self.attention_impl)
        out = nn.Dense(c, name="to_out_0", **kw)(out)
        return out.reshape(b, h, w, c) + x


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, [attention, resnet]."""
    channels: int
    groups: int
    act: str
    add_attention: bool = True
    remat: Any = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        Resnet = maybe_remat(ResnetBlock2D, self.remat)
        Attn = maybe_remat(VAEAttention, self.remat)
        rkw = dict(groups=self.groups, eps=VAE_EPS, act=self.act, **kw)
        x = Resnet(self.channels, name="resnets_0", **rkw)(x)
        if self.add_attention:  # attention_head_dim = channels in the diffusers VAE -> 1 head
            x = Attn(self.channels, self.channels, self.groups, name="attentions_0", attention_impl=self.attention_impl,
                     **kw)(x)
        return Resnet(self.channels, name="resnets_1", **rkw)(x)


class SampleBlock(nn.Module):
    """``DownEncoderBlock2D`` (``up=False``) or ``UpDecoderBlock2D`` (``up=True``): ``num_layers``
    resnets then an optional downsampler (asymmetric pad, stride 2) or 2x nearest upsampler."""
    out_channels: int
    num_layers: int
    groups: int
    act: str
    resample: bool
    up: bool
    remat: Any = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        Resnet = maybe_remat(ResnetBlock2D, self.remat)
        for i in range(self.num_layers):
            x = Resnet(self.out_channels, groups=self.groups, eps=VAE_EPS, act=self.act,
                       name=f"resnets_{i}", **kw)(x)
        if self.resample and self.up:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        elif self.resample:
            x = Downsample2D(self.out_channels, pad_asym=True, name="downsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """diffusers VAE ``Encoder`` (double_z): img [B,H,W,in] -> [B,H/f,W/f,2*latent], f = 2**(n-1)."""
    config: VAEConfig
    remat: Any = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, g = cfg.block_out_channels, cfg.norm_num_groups
        x = conv(chans[0], 3, "conv_in", **kw)(x.astype(self.dtype))
        for i, c in enumerate(chans):
            x = SampleBlock(c, cfg.layers_per_block, g, cfg.act_fn, resample=i < len(chans) - 1, up=False,
                            remat=self.remat, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(chans[-1], g, cfg.act_fn, cfg.mid_block_add_attention, self.remat, name="mid_block",
                     attention_impl=self.attention_impl, **kw)(x)
        x = nn.silu(group_norm(g, VAE_EPS, "conv_norm_out", **kw)(x))  # diffusers: always SiLU here
        return conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers VAE ``Decoder`` (norm_type 'group'): z [B,h,w,latent] -> [B,h*f,w*f,out_channels]."""
    config: VAEConfig
    remat: Any = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, z):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        x = conv(chans[0], 3, "conv_in", **kw)(z.astype(self.dtype))
        x = MidBlock(chans[0], g, cfg.act_fn, cfg.mid_block_add_attention, self.remat, name="mid_block",
                     attention_impl=self.attention_impl, **kw)(x)
        for i, c in enumerate(chans):
            x = SampleBlock(c, cfg.layers_per_block + 1, g, cfg.act_fn, resample=i < len(chans) - 1, up=True,
                            remat=self.remat, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(group_norm(g, VAE_EPS, "conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``. ``dtype`` is the compute dtype (norms and softmax stay float32);
    ``remat`` wraps every resnet/attention block in ``nn.remat`` (a policy name: `layers.remat_policy`);
    ``attention_impl``: `jaxlcd.models.attention`. ``init`` runs `__call__`, which touches every parameter."""
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, self.remat, attention_impl=self.attention_impl, **kw)
        self.decoder = Decoder(cfg, self.remat, attention_impl=self.attention_impl, **kw)
        lc = cfg.latent_channels
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * lc, (1, 1), padding="VALID", **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(lc, (1, 1), padding="VALID", **kw)

    def encode(self, img):
        """img [B,H,W,in_channels] in [-1, 1] -> moments [B,H/f,W/f,2*latent_channels] (mean, logvar
        concatenated on the last axis, after quant_conv), in the compute dtype."""
        moments = self.encoder(img)
        return self.quant_conv(moments) if self.config.use_quant_conv else moments

    def decode(self, z):
        """z [B,h,w,latent_channels] *unscaled* latents (see `unscale_latents`) -> image
        [B,h*f,w*f,out_channels] (roughly [-1, 1], not clipped), in the compute dtype."""
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, img):
        """Reconstruction through the posterior mode: img [B,H,W,C] -> [B,H,W,out_channels]."""
        return self.decode(latent_dist_mode(self.encode(img)).astype(self.dtype))


# ----------------------------------------------------------------------------------------------
# Latent distribution and scaling (pure functions)
# ----------------------------------------------------------------------------------------------

def latent_kl(moments):
    """KL(posterior || N(0, I)) per example: moments [B,...,2C] -> [B] float32 (summed over latent elements)."""
    mean, logvar = _mean_logvar(moments)
    kl = 0.5 * (mean * mean + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def _mean_logvar(moments):
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_CLIP)


def latent_dist_sample(moments, rng):
    """A sample of the diagonal Gaussian posterior: moments [...,2C] -> mean + std * eps [...,C] float32,
    with logvar clipped to [-30, 20] and std = exp(0.5 * logvar); eps ~ N(0, 1) drawn from ``rng``."""
    mean, logvar = _mean_logvar(moments)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)


def latent_dist_mode(moments):
    """The posterior mode (= mean): moments [...,2C] -> [...,C] float32."""
    return _mean_logvar(moments)[0]


def scale_latents(z, config: VAEConfig):
    """VAE latents -> diffusion latents: (z - shift_factor) * scaling_factor (shift 0 when null)."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(z, config: VAEConfig):
    """Diffusion latents -> VAE latents for `AutoencoderKL.decode`: z / scaling_factor + shift_factor."""
    return z / config.scaling_factor + (config.shift_factor or 0.0)


# ----------------------------------------------------------------------------------------------
# Weights spec
# ----------------------------------------------------------------------------------------------

_LEGACY_ATTN = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q.", "key": "to_k.", "value": "to_v.", "proj_attn": "to_out.0."}


def canonical_key(key: str) -> str:
    """File key -> table key: legacy ``attentions.N.query/key/value/proj_attn`` -> ``to_q/to_k/to_v/to_out.0``."""
    return _LEGACY_ATTN.sub(lambda m: m[1] + _LEGACY_NAMES[m[2]], key)


def build(config: dict, dtype=jnp.float32, **kw) -> AutoencoderKL:
    """An `AutoencoderKL` from a config.json dict; ``kw``: param_dtype, remat, attention_impl."""
    return AutoencoderKL(VAEConfig.from_dict(config), dtype=dtype, **kw)


def dummy_inputs(module: AutoencoderKL) -> tuple:
    """A tiny image batch [1, S, S, in_channels] with S = 2**len(blocks) (for eval_shape(init))."""
    s = 2 ** len(module.config.block_out_channels)
    return (jnp.zeros((1, s, s, module.config.in_channels), jnp.float32),)


SPEC = ComponentSpec(class_names=("AutoencoderKL",), weights_stem="diffusion_pytorch_model",
                     build=build, dummy_inputs=dummy_inputs, canonical_key=canonical_key)
