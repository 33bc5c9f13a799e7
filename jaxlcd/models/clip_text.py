"""Flax linen port of transformers' ``CLIPTextModel`` (the SD 1.x/2.x text encoder).

Module names mirror the PyTorch state-dict keys under a ``text_model`` root
(``text_model.encoder.layers.3.self_attn.q_proj.weight`` <-> params
``text_model/encoder/layers_3/self_attn/q_proj/kernel``), so `jaxlcd.weights.tables` maps them
automatically. Pre-LN transformer, causal self-attention, LayerNorms in float32.

File keys: transformers 5.x writes them without the ``text_model.`` prefix and without the
``embeddings.position_ids`` buffer; transformers 4.x wrote ``text_model.*`` and older files also
carry ``position_ids``. `canonical_key` accepts both forms and drops the buffer; saving writes the
unprefixed 5.x form (transformers 5 reads both). ``CLIPTextModelWithProjection`` (SD-XL's
``text_encoder_2``: the same transformer plus ``text_projection`` of the EOS-pooled state) keeps the ``text_model.``
prefix in its files, as transformers writes it.

Typical use::

    module, params = jaxlcd.weights.load_component("sd15/text_encoder", dtype=jnp.bfloat16)
    ids = jaxlcd.tokenizer.tokenize(tok, prompts)                      # [B, 77] int32
    last, penult = module.apply({"params": params}, ids, output_penultimate=True)
    # SD 1.x/2.x condition on ``last``. For "clip skip" apply the final norm to ``penult`` yourself:
    # module.apply({"params": params}, penult, method=module.final_norm)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxlcd.models.config import ConfigError, ModelConfig, require
from jaxlcd.models.attention import attention
from jaxlcd.models.layers import activation, layer_norm, maybe_remat
from jaxlcd.weights.spec import ComponentSpec
from jaxlcd.errors import InputError

Dtype = Any
SUPPORTED_ACTS = ("quick_gelu", "gelu", "gelu_new")
_PREFIX = "text_model."


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """The transformers ``CLIPTextConfig`` keys the port uses (defaults = transformers defaults)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512            # unused by CLIPTextModel; kept so config.json round-trips
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def to_dict(self) -> dict:
        """The config.json dict; names the class so transformers and `load_component` recognise it."""
        d = super().to_dict()
        d.setdefault("architectures", ["CLIPTextModel"])
        d.setdefault("model_type", "clip_text_model")
        return d

    def validate(self, d: dict) -> None:
        require({"hidden_act": self.hidden_act}, "hidden_act", SUPPORTED_ACTS, what="CLIPTextModel config")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIPTextModel config: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"CLIPTextModel config: {key}={getattr(self, key)!r} must be a positive int")


class CLIPAttention(nn.Module):
    """Multi-head self-attention (q/k/v/out_proj), causal unless ``causal=False`` (the vision tower).

    x [B,L,D] -> [B,L,D] in ``dtype``. ``config`` may be any config with the CLIPTextConfig layer
    fields (hidden_size, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps).
    """
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.config.hidden_size
        q, k, v = (nn.Dense(d, name=n, **kw)(x) for n in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, heads=self.config.num_attention_heads, is_causal=self.causal,
                        impl=self.attention_impl)
        return nn.Dense(d, name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    """fc1 -> hidden_act -> fc2. x [B,L,D] -> [B,L,D]."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.config.intermediate_size, name="fc1", **kw)(x)
        h = activation(self.config.hidden_act)(h)
        return nn.Dense(self.config.hidden_size, name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(.)). x [B,L,D] -> [B,L,D] in ``dtype``."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.config.layer_norm_eps
        attn = CLIPAttention(self.config, causal=self.causal, attention_impl=self.attention_impl, name="self_attn",
                             **kw)
        x = x + attn(layer_norm(eps, "layer_norm1", **kw)(x))
        return x + CLIPMLP(self.config, name="mlp", **kw)(layer_norm(eps, "layer_norm2", **kw)(x))


class CLIPTextEmbeddings(nn.Module):
    """Token + learned absolute position embeddings. ids [B,L] int (L <= max_positions) -> [B,L,D]."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding", **kw)(
            jnp.arange(input_ids.shape[-1]))
        return tok + pos[None]


class CLIPEncoder(nn.Module):
    """The stack of ``layers_N``; returns [input, after layer 0, ..., after layer N-1] (each [B,L,D])."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    causal: bool = True
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        layer_cls = maybe_remat(CLIPEncoderLayer, self.remat)
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = layer_cls(self.config, dtype=self.dtype, param_dtype=self.param_dtype, causal=self.causal,
                          attention_impl=self.attention_impl, name=f"layers_{i}")(x)
            states.append(x)
        return states


class CLIPTextTransformer(nn.Module):
    """embeddings -> encoder -> final_layer_norm (the transformers ``text_model`` submodule)."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPTextEmbeddings(self.config, **kw)
        self.encoder = CLIPEncoder(self.config, remat=self.remat, attention_impl=self.attention_impl, **kw)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=jnp.float32,
                                             param_dtype=self.param_dtype)

    def final_norm(self, h):
        """final_layer_norm in float32, cast to ``dtype``: [..., D] -> [..., D]."""
        return self.final_layer_norm(h.astype(jnp.float32)).astype(self.dtype)

    def __call__(self, input_ids):
        states = self.encoder(self.embeddings(input_ids))
        return self.final_norm(states[-1]), states


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel`` (params under ``text_model``).

    ``dtype`` is the compute dtype (LayerNorms and the attention softmax run in float32);
    ``param_dtype`` the dtype of freshly initialised params; ``remat`` rematerialises each encoder
    layer in the backward pass (param names unchanged; a policy name: `layers.remat_policy`);
    ``attention_impl``: `jaxlcd.models.attention`.
    """
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                              remat=self.remat, attention_impl=self.attention_impl)

    def __call__(self, input_ids, output_penultimate: bool = False):
        """input_ids [B, L] int (L <= max_position_embeddings) -> last_hidden_state [B, L, D] in ``dtype``.

        With ``output_penultimate=True`` returns ``(last_hidden_state, penultimate)``: penultimate is
        transformers' ``hidden_states[-2]`` (``output_hidden_states=True``), i.e. the input of the last
        encoder layer *without* the final LayerNorm. Clip-skip users apply `final_norm` themselves.
        """
        _check_ids(input_ids, self.config)
        last, states = self.text_model(input_ids)
        return (last, states[-2]) if output_penultimate else last

    def final_norm(self, hidden):
        """The model's final_layer_norm: hidden [..., D] -> [..., D] in ``dtype`` (for clip skip)."""
        return self.text_model.final_norm(hidden)


@dataclasses.dataclass(frozen=True)
class CLIPTextWithProjectionConfig(CLIPTextConfig):
    """``CLIPTextModelWithProjection``'s config: CLIPTextConfig, with ``projection_dim`` used."""

    def to_dict(self) -> dict:
        d = dict(super().to_dict())
        if d.get("architectures") == ["CLIPTextModel"]:
            d["architectures"] = ["CLIPTextModelWithProjection"]
        return d


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers ``CLIPTextModelWithProjection`` (SD-XL's ``text_encoder_2``): `CLIPTextModel` plus
    ``text_projection`` (Linear hidden -> projection_dim, no bias) of the EOS-pooled last hidden state."""
    config: CLIPTextWithProjectionConfig

    def setup(self):
        super().setup()
        self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                        param_dtype=self.param_dtype)

    def __call__(self, input_ids, output_penultimate: bool = False):
        """input_ids [B, L] int -> (last_hidden_state [B, L, D], text_embeds [B, P]) in ``dtype``; with
        ``output_penultimate=True`` also transformers' ``hidden_states[-2]`` [B, L, D] (what SD-XL conditions on)."""
        _check_ids(input_ids, self.config)
        last, states = self.text_model(input_ids)
        embeds = self.text_projection(pooled_output(last, input_ids, self.config.eos_token_id))
        return (last, embeds, states[-2]) if output_penultimate else (last, embeds)


def _check_ids(input_ids, config) -> None:
    if input_ids.ndim != 2:
        raise InputError(f"CLIP text encoder: input_ids must be [batch, length], got shape {input_ids.shape}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise InputError(f"CLIP text encoder: sequence length {input_ids.shape[1]} exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}")


def pooled_output(hidden, input_ids, eos_token_id: int):
    """transformers' EOS pooling: hidden [B, L, D], input_ids [B, L] int -> [B, D].

    With the legacy ``eos_token_id == 2`` the position is ``argmax(input_ids)`` (the EOS id is the
    largest in CLIP's vocabulary); otherwise it is the first position equal to ``eos_token_id``
    (position 0 if the sequence has none, as in transformers).
    """
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    if eos_token_id == 2:
        idx = jnp.argmax(ids, axis=-1)
    else:
        idx = jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)
    return hidden[jnp.arange(hidden.shape[0]), idx]


def canonical_key(key: str) -> Optional[str]:
    """File key -> table key: adds the ``text_model.`` prefix when absent; drops ``position_ids``."""
    if key.endswith("embeddings.position_ids"):
        return None
    return key if key.startswith(_PREFIX) else _PREFIX + key


def file_key(key: str) -> str:
    """Table key -> the key transformers 5.x ``save_pretrained`` writes (no ``text_model.`` prefix)."""
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def build(config: dict, dtype=jnp.float32, **kw) -> CLIPTextModel:
    """A `CLIPTextModel` from a config.json dict; ``kw``: param_dtype, remat, attention_impl."""
    return CLIPTextModel(CLIPTextConfig.from_dict(config), dtype=dtype, **kw)


def dummy_inputs(module: CLIPTextModel) -> tuple:
    """A [1, 1] int32 id batch (param shapes do not depend on the length)."""
    return (jnp.zeros((1, 1), jnp.int32),)


SPEC = ComponentSpec(class_names=("CLIPTextModel",), weights_stem="model", build=build,
                     dummy_inputs=dummy_inputs, canonical_key=canonical_key, file_key=file_key)


def build_with_projection(config: dict, dtype=jnp.float32, **kw) -> CLIPTextModelWithProjection:
    """A `CLIPTextModelWithProjection` from a config.json dict; ``kw``: param_dtype, remat, attention_impl."""
    return CLIPTextModelWithProjection(CLIPTextWithProjectionConfig.from_dict(config), dtype=dtype, **kw)


def _projection_canonical_key(key: str) -> Optional[str]:
    """File key -> table key of CLIPTextModelWithProjection (its files keep the ``text_model.`` prefix)."""
    return key if key.startswith("text_projection.") else canonical_key(key)


SPEC_WITH_PROJECTION = ComponentSpec(class_names=("CLIPTextModelWithProjection",), weights_stem="model",
                                     build=build_with_projection, dummy_inputs=dummy_inputs,
                                     canonical_key=_projection_canonical_key)
