"""Flax port of diffusers ``UNet2DConditionModel`` for the SD 1.x / 2.x family (and LCM students).

Module names mirror diffusers so `jaxlcd.weights.tables` maps every parameter by rule. Quirk kept
from diffusers: for these models ``attention_head_dim`` holds the number of heads per block.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax.numpy as jnp
import flax.linen as nn

from jaxlcd.models import layers, lora
from jaxlcd.models.attention import attention
from jaxlcd.models.config import ConfigError, ModelConfig, per_block, require
from jaxlcd.weights.spec import ComponentSpec
from jaxlcd.errors import InputError

Dtype = Any
IntOrTuple = Union[int, tuple]

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """The UNet2DConditionModel config keys the port reads (names as in config.json)."""
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: Optional[int] = None
    time_cond_proj_dim: Optional[int] = None
    addition_embed_type: Optional[str] = None          # None | "text_time" (SD-XL: pooled text + micro-conditioning)
    addition_time_embed_dim: Optional[int] = None      # text_time: sinusoidal width of each time id
    projection_class_embeddings_input_dim: Optional[int] = None   # text_time: text_embeds width + ids x that width
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: Optional[int] = None

    def validate(self, d: dict) -> None:
        what = "UNet config.json"
        for i, name in enumerate(self.down_block_types):
            if name not in DOWN_BLOCKS:
                raise ConfigError(f"{what}: down_block_types[{i}]={name!r} is not supported; supported: {list(DOWN_BLOCKS)}")
        for i, name in enumerate(self.up_block_types):
            if name not in UP_BLOCKS:
                raise ConfigError(f"{what}: up_block_types[{i}]={name!r} is not supported; supported: {list(UP_BLOCKS)}")
        if len(self.up_block_types) != len(self.down_block_types) or len(self.block_out_channels) != len(self.down_block_types):
            raise ConfigError(f"{what}: down_block_types, up_block_types and block_out_channels must have equal length")
        require(d, "mid_block_type", ["UNetMidBlock2DCrossAttn", None], "UNetMidBlock2DCrossAttn", what)
        require(d, "addition_embed_type", [None, "text_time"], None, what)
        if self.addition_embed_type == "text_time" and not (self.addition_time_embed_dim and
                                                            self.projection_class_embeddings_input_dim):
            raise ConfigError(f"{what}: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim")
        for key, default in [("class_embed_type", None), ("encoder_hid_dim_type", None),
                             ("time_embedding_act_fn", None), ("timestep_post_act", None),
                             ("cross_attention_norm", None), ("dual_cross_attention", False),
                             ("only_cross_attention", False), ("resnet_skip_time_act", False)]:
            require(d, key, [default], default, what)
        require(d, "time_embedding_type", ["positional"], "positional", what)
        require(d, "resnet_time_scale_shift", ["default"], "default", what)
        require(d, "attention_type", ["default"], "default", what)
        require(d, "resnet_out_scale_factor", [1.0], 1.0, what)
        require(d, "mid_block_scale_factor", [1.0], 1.0, what)
        require(d, "downsample_padding", [1], 1, what)
        n = len(self.down_block_types)
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim"):
            per_block(getattr(self, key), n, key)
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, key) % 2 != 1:
                raise ConfigError(f"{what}: {key} must be odd, got {getattr(self, key)}")

    def heads(self) -> tuple:
        """Heads per down block (diffusers: num_attention_heads or attention_head_dim)."""
        return per_block(self.num_attention_heads or self.attention_head_dim, len(self.down_block_types), "heads")


class Attention(nn.Module):
    """diffusers Attention (self or cross): to_q/to_k/to_v (bias optional), to_out.0 with bias.

    x [B,T,C], context [B,S,Dc] or None -> [B,T,C].
    """
    heads: int
    bias: bool = False
    upcast: bool = False    # diffusers' upcast_attention: every `attention` path already computes it this way
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        ctx = x if context is None else context
        q = lora.Dense(dim, use_bias=self.bias, name="to_q", **kw)(x)
        k = lora.Dense(dim, use_bias=self.bias, name="to_k", **kw)(ctx)
        v = lora.Dense(dim, use_bias=self.bias, name="to_v", **kw)(ctx)
        out = attention(q, k, v, heads=self.heads, impl=self.attention_impl)
        return lora.Dense(dim, name="to_out_0", **kw)(out)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm with residual."""
    heads: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, upcast=self.upcast, attention_impl=self.attention_impl, **kw)
        x = x + Attention(name="attn1", **attn)(layers.layer_norm(1e-5, "norm1", **kw)(x))
        x = x + Attention(name="attn2", **attn)(layers.layer_norm(1e-5, "norm2", **kw)(x), context)
        h = layers.layer_norm(1e-5, "norm3", **kw)(x)
        dim = x.shape[-1]
        h, gate = jnp.split(lora.Dense(dim * 4 * 2, name="ff.net_0.proj", **kw)(h), 2, axis=-1)  # GEGLU
        h = h * nn.gelu(gate, approximate=False)
        return x + lora.Dense(dim, name="ff.net_2", **kw)(h)


class Transformer2D(nn.Module):
    """diffusers Transformer2DModel (continuous input): GroupNorm, proj_in, blocks, proj_out, residual.

    x [B,H,W,C], context [B,S,Dc] -> [B,H,W,C].
    """
    heads: int
    num_layers: int = 1
    groups: int = 32
    linear_projection: bool = False
    upcast: bool = False
    remat: Any = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = layers.group_norm(self.groups, 1e-6, "norm", **kw)(x)
        if self.linear_projection:
            y = lora.Dense(c, name="proj_in", **kw)(y.reshape(b, h * w, c))
        else:
            y = layers.conv(c, 1, "proj_in", **kw)(y).reshape(b, h * w, c)
        block_cls = layers.maybe_remat(BasicTransformerBlock, self.remat)
        for i in range(self.num_layers):
            y = block_cls(self.heads, self.upcast, name=f"transformer_blocks_{i}", attention_impl=self.attention_impl,
                          **kw)(y, context)
        if self.linear_projection:
            y = lora.Dense(c, name="proj_out", **kw)(y).reshape(b, h, w, c)
        else:
            y = layers.conv(c, 1, "proj_out", **kw)(y.reshape(b, h, w, c))
        return x + y


class UNet2DConditionModel(nn.Module):
    """x [B,H,W,Cin], timesteps [B] (or scalar) int/float, context [B,L,D], timestep_cond [B,Dw] or None
    -> [B,H,W,Cout] in ``dtype``. H and W must be multiples of 2**(number of down blocks - 1).

    ``remat``: per resnet and transformer block, False/True or a policy name (`layers.remat_policy`);
    ``attention_impl``: `jaxlcd.models.attention` ('auto' picks the fused kernel of the backend)."""
    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, timesteps, context, timestep_cond=None, added_cond_kwargs=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.down_block_types)
        factor = 2 ** (n - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise InputError(f"UNet input spatial size {x.shape[1:3]} must be a multiple of {factor}")
        heads, channels = cfg.heads(), cfg.block_out_channels
        n_layers = per_block(cfg.layers_per_block, n, "layers_per_block")
        n_tf = per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
        act = layers.activation(cfg.act_fn)
        resnet_cls = layers.maybe_remat(layers.ResnetBlock2D, self.remat)
        resnet = lambda ch, name: resnet_cls(ch, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn, name=name, **kw)
        transformer = lambda nh, nl, name: Transformer2D(
            nh, nl, cfg.norm_num_groups, cfg.use_linear_projection, cfg.upcast_attention, self.remat, name=name,
            attention_impl=self.attention_impl, **kw)

        # time embedding (+ LCM guidance-scale embedding through cond_proj)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
        temb = layers.timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
        temb_dim = cfg.time_embedding_dim or channels[0] * 4
        temb = TimestepEmbedding(temb_dim, cfg.act_fn, name="time_embedding", **kw)(temb, timestep_cond)
        if cfg.addition_embed_type == "text_time":   # SD-XL: + embed(concat(text_embeds, sinusoids of the time ids))
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise InputError("this UNet (addition_embed_type 'text_time', SD-XL) needs added_cond_kwargs="
                                 "{'text_embeds': [B, D], 'time_ids': [B, n]}")
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], jnp.asarray(added_cond_kwargs["time_ids"])
            ids = layers.timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                            cfg.freq_shift).reshape(text_embeds.shape[0], -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), ids], axis=-1).astype(self.dtype)
            temb = temb + TimestepEmbedding(temb_dim, cfg.act_fn, name="add_embedding", **kw)(add)

        x = x.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        h = layers.conv(channels[0], cfg.conv_in_kernel, "conv_in", **kw)(x)
        skips = [h]
        for i, block in enumerate(cfg.down_block_types):
            for j in range(n_layers[i]):
                h = resnet(channels[i], f"down_blocks_{i}.resnets_{j}")(h, temb)
                if block == "CrossAttnDownBlock2D":
                    h = transformer(heads[i], n_tf[i], f"down_blocks_{i}.attentions_{j}")(h, context)
                skips.append(h)
            if i < n - 1:
                h = layers.Downsample2D(channels[i], name=f"down_blocks_{i}.downsamplers_0", **kw)(h)
                skips.append(h)

        if cfg.mid_block_type is not None:
            h = resnet(channels[-1], "mid_block.resnets_0")(h, temb)
            h = transformer(heads[-1], n_tf[-1], "mid_block.attentions_0")(h, context)
            h = resnet(channels[-1], "mid_block.resnets_1")(h, temb)

        rev = lambda t: tuple(reversed(t))
        for i, block in enumerate(cfg.up_block_types):
            for j in range(rev(n_layers)[i] + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resnet(rev(channels)[i], f"up_blocks_{i}.resnets_{j}")(h, temb)
                if block == "CrossAttnUpBlock2D":
                    h = transformer(rev(heads)[i], rev(n_tf)[i], f"up_blocks_{i}.attentions_{j}")(h, context)
            if i < n - 1:
                h = layers.Upsample2D(rev(channels)[i], name=f"up_blocks_{i}.upsamplers_0", **kw)(h)

        h = act(layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", **kw)(h))
        return layers.conv(cfg.out_channels, cfg.conv_out_kernel, "conv_out", **kw)(h)


class TimestepEmbedding(nn.Module):
    """diffusers TimestepEmbedding: [cond_proj(w_emb) +] t_emb -> linear_1 -> act -> linear_2."""
    features: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, temb, cond=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if cond is not None:
            temb = temb + lora.Dense(temb.shape[-1], use_bias=False, name="cond_proj", **kw)(cond.astype(self.dtype))
        temb = layers.activation(self.act_fn)(lora.Dense(self.features, name="linear_1", **kw)(temb))
        return lora.Dense(self.features, name="linear_2", **kw)(temb)


def build(config: dict, dtype=jnp.float32, **kw) -> UNet2DConditionModel:
    """A UNet module from a diffusers config.json dict (raises ConfigError on unsupported values);
    ``kw``: param_dtype, remat, attention_impl."""
    return UNet2DConditionModel(UNetConfig.from_dict(config), dtype=dtype, **kw)


def dummy_inputs(module: UNet2DConditionModel):
    cfg = module.config
    s = 2 ** (len(cfg.down_block_types) - 1)
    ctx_dim = per_block(cfg.cross_attention_dim, len(cfg.down_block_types), "cross_attention_dim")[0]
    cond = jnp.zeros((1, cfg.time_cond_proj_dim)) if cfg.time_cond_proj_dim else None
    added = None
    if cfg.addition_embed_type == "text_time":   # param shapes depend only on the total width of the embedding input
        added = {"text_embeds": jnp.zeros((1, cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim)),
                 "time_ids": jnp.zeros((1, 1))}
    return (jnp.zeros((1, s, s, cfg.in_channels)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, ctx_dim)), cond, added)


SPEC = ComponentSpec(class_names=("UNet2DConditionModel",), weights_stem="diffusion_pytorch_model", build=build,
                     dummy_inputs=dummy_inputs)
