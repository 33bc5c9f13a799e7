"""Flax linen port of transformers' ``CLIPModel`` (ViT image tower, text tower, projections, logit
scale), loadable from a transformers folder (`jaxlcd.weights.load_component`) or an open_clip one
(`load_open_clip`).

Params are named like the transformers state dict (``vision_model.encoder.layers.0.self_attn.q_proj``,
``visual_projection``, ``logit_scale``...), so `jaxlcd.weights.tables` maps them automatically. The
text tower is `jaxlcd.models.clip_text`'s; the vision tower uses its encoder layers without the causal
mask. Pixels are NHWC and already normalised; ``num_channels`` may differ from 3 (a ViT over latents).
LayerNorms, the attention softmax and the final cosine logits run in float32.

open_clip checkpoints are converted to transformers keys on load (fused ``in_proj`` split into q/k/v,
``proj`` matrices transposed); open_clip pools text at ``argmax(ids)`` (``text_pool``). Options the
port does not implement (attentional pooler, ``final_ln_after_pool``, layer scale...) raise ConfigError.

Typical use::

    module, params = jaxlcd.weights.load_component("clip-vit-b32")          # or load_open_clip(dir)
    img = module.apply({"params": params}, pixels, method=module.get_image_features)  # [B, P]
    out = module.apply({"params": params}, pixels, ids)   # CLIPOutput: out.logits_per_image [B, T]...
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Optional

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlcd.models.clip_text import SUPPORTED_ACTS, CLIPEncoder, CLIPTextConfig, CLIPTextTransformer, pooled_output
from jaxlcd.models.config import ConfigError, ModelConfig, require
from jaxlcd.weights import io, tables
from jaxlcd.weights.spec import ComponentSpec, param_shapes
from jaxlcd.weights.tables import WeightsError
from jaxlcd.errors import InputError

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ModelConfig):
    """The transformers ``CLIPVisionConfig`` keys the port uses (defaults = transformers defaults)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512            # unused here (CLIPConfig.projection_dim is); kept for round trips
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.setdefault("model_type", "clip_vision_model")
        return d

    def validate(self, d: dict) -> None:
        require({"hidden_act": self.hidden_act}, "hidden_act", SUPPORTED_ACTS, what="CLIP vision_config")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_channels", "image_size", "patch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"CLIP vision_config: {key}={getattr(self, key)!r} must be a positive int")
        if self.hidden_size % self.num_attention_heads or self.patch_size > self.image_size:
            raise ConfigError(f"CLIP vision_config: hidden_size={self.hidden_size} must be divisible by num_attention_"
                              f"heads={self.num_attention_heads} and patch_size={self.patch_size} <= image_size")


@dataclasses.dataclass(frozen=True)
class CLIPConfig(ModelConfig):
    """transformers ``CLIPConfig``: nested text/vision configs, ``projection_dim``, the logit-scale init.

    ``text_pool`` (jaxlcd's own key) picks the text token pooled: ``"eos"`` = transformers' rule
    (`clip_text.pooled_output` with ``text_config.eos_token_id``), ``"argmax"`` = open_clip's
    ``argmax(input_ids)``.
    """
    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    text_pool: str = "eos"

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "CLIPConfig":
        for key, sub_cls in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
            sub = d.get(key) or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"CLIP config: {key} must be a JSON object, got {type(sub).__name__}")
            overrides.setdefault(key, sub_cls.from_dict(sub))
        return super().from_dict(d, **overrides)

    def to_dict(self) -> dict:
        d = super().to_dict()
        for key in ("text_config", "vision_config"):
            sub = getattr(self, key)
            d[key] = sub.to_dict()
            if "architectures" not in json.loads(sub.source):
                d[key].pop("architectures", None)  # clip_text adds one; it belongs to the top level only
        if self.text_pool == "eos" and "text_pool" not in json.loads(self.source):
            del d["text_pool"]  # transformers' own rule: keep its config.json as it was
        d.setdefault("architectures", ["CLIPModel"])
        d.setdefault("model_type", "clip")
        return d

    def validate(self, d: dict) -> None:
        require({"text_pool": self.text_pool}, "text_pool", ("eos", "argmax"), what="CLIP config")
        if not isinstance(self.projection_dim, int) or self.projection_dim < 1:
            raise ConfigError(f"CLIP config: projection_dim={self.projection_dim!r} must be a positive int")


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token + learned positions. pixels [B,S,S,C] -> [B,N+1,D] in ``dtype``."""
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, ch = pixel_values.shape
        if (h, w, ch) != (c.image_size, c.image_size, c.num_channels):
            raise InputError(f"CLIP vision: pixel_values must be [B, {c.image_size}, {c.image_size}, "
                             f"{c.num_channels}] (NHWC), got {tuple(pixel_values.shape)}")
        p = c.patch_size
        x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    name="patch_embedding", **kw)(pixel_values.astype(self.dtype))
        x = x.reshape(b, -1, c.hidden_size)  # row-major over the grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), x], axis=1)
        pos = nn.Embed(c.num_positions, c.hidden_size, name="position_embedding", **kw)(jnp.arange(c.num_positions))
        return x + pos[None]


class CLIPVisionTransformer(nn.Module):
    """transformers ``vision_model``: embeddings -> pre_layrnorm -> non-causal encoder -> post_layernorm(CLS).

    Usable alone as a ViT (e.g. over 4-channel latents). ``__call__`` returns
    ``(last_hidden_state [B,N+1,D], pooled [B,D])`` in ``dtype``; pooled is the post-LN CLS token.
    """
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(self.config, **kw)
        self.pre_layrnorm = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=self.param_dtype)
        self.encoder = CLIPEncoder(self.config, remat=self.remat, causal=False, attention_impl=self.attention_impl,
                                   **kw)
        self.post_layernorm = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=self.param_dtype)

    def __call__(self, pixel_values):
        x = self.pre_layrnorm(self.embeddings(pixel_values).astype(jnp.float32)).astype(self.dtype)
        last = self.encoder(x)[-1]
        return last, self.post_layernorm(last[:, 0].astype(jnp.float32)).astype(self.dtype)


class CLIPModel(nn.Module):
    """transformers ``CLIPModel``. ``dtype`` is the compute dtype (LayerNorms, softmax and the cosine
    logits in float32), ``param_dtype`` that of fresh params, ``remat`` rematerialises each encoder layer.
    """
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        enc = dict(remat=self.remat, attention_impl=self.attention_impl)
        self.text_model = CLIPTextTransformer(c.text_config, **enc, **kw)
        self.vision_model = CLIPVisionTransformer(c.vision_config, **enc, **kw)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), (),
                                      self.param_dtype)

    def get_image_features(self, pixel_values):
        """pixel_values [B,H,W,C] float (NHWC, normalised, H = W = image_size) -> [B,P] in ``dtype``.

        The projected post-LN CLS token, not L2-normalised (transformers ``get_image_features``).
        """
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(self, input_ids):
        """input_ids [B,L] int (L <= max_position_embeddings) -> [B,P] in ``dtype``, not normalised.

        Pools the final-LN hidden state at the EOS token (``text_pool="eos"``, transformers' rule) or
        at ``argmax(input_ids)`` (``"argmax"``, open_clip), then applies ``text_projection``.
        """
        tc = self.config.text_config
        if input_ids.ndim != 2 or input_ids.shape[1] > tc.max_position_embeddings:
            raise InputError(f"CLIP text: input_ids must be [batch, length <= {tc.max_position_embeddings}], "
                             f"got shape {tuple(input_ids.shape)}")
        last, _ = self.text_model(input_ids)
        return self.text_projection(pool_text(last, input_ids, self.config.text_pool, tc.eos_token_id))

    def __call__(self, pixel_values, input_ids) -> "CLIPOutput":
        """pixel_values [Bi,H,W,C], input_ids [Bt,L] -> `CLIPOutput` (unused fields cost nothing under jit)."""
        img, txt = self.get_image_features(pixel_values), self.get_text_features(input_ids)
        img_n, txt_n = _l2_normalise(img), _l2_normalise(txt)
        logits = jnp.exp(self.logit_scale.astype(jnp.float32)) * img_n @ txt_n.T
        return CLIPOutput(logits_per_image=logits, image_embeds=img_n, text_embeds=txt_n,
                          image_features=img, text_features=txt)


@struct.dataclass
class CLIPOutput:
    """transformers ``CLIPOutput`` fields, plus the unnormalised features.

    logits_per_image [Bi,Bt] float32 = exp(logit_scale) * cosine (logits_per_text is its transpose);
    image_embeds [Bi,P] / text_embeds [Bt,P] float32, L2-normalised; image_features [Bi,P] /
    text_features [Bt,P] in ``dtype``, as `CLIPModel.get_image_features` / `get_text_features`.
    """
    logits_per_image: Any
    image_embeds: Any
    text_embeds: Any
    image_features: Any
    text_features: Any


def pool_text(last, input_ids, rule: str, eos_token_id: int):
    """last [B,L,D], input_ids [B,L] -> [B,D]: the token at argmax(input_ids) (``rule="argmax"``, open_clip) or
    transformers' EOS rule (`clip_text.pooled_output`)."""
    if rule == "argmax":
        return last[jnp.arange(last.shape[0]), jnp.argmax(input_ids, axis=-1)]
    return pooled_output(last, input_ids, eos_token_id)


def _l2_normalise(x):
    return x.astype(jnp.float32) / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)


def canonical_key(key: str) -> Optional[str]:
    """transformers file key -> table key (CLIPModel keys are always prefixed); drops 4.x ``position_ids`` buffers."""
    return None if key.endswith("embeddings.position_ids") else key


def build(config: dict, dtype=jnp.float32, **kw) -> CLIPModel:
    """A `CLIPModel` from a transformers CLIPConfig dict; ``kw``: param_dtype, remat, attention_impl."""
    return CLIPModel(CLIPConfig.from_dict(config), dtype=dtype, **kw)


def dummy_inputs(module: CLIPModel) -> tuple:
    """One zero image [1,S,S,C] float32 and a [1,1] int32 id batch (for eval_shape(init))."""
    v = module.config.vision_config
    return jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32), jnp.zeros((1, 1), jnp.int32)


SPEC = ComponentSpec(class_names=("CLIPModel",), weights_stem="model", build=build,
                     dummy_inputs=dummy_inputs, canonical_key=canonical_key)

# ---------------------------------------------------------------------------------------------- open_clip

_OC_NAMES = {  # open_clip key -> transformers key (same layout)
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
    **{f"{a}.{leaf}": f"{b}.{leaf}" for leaf in ("weight", "bias") for a, b in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"))},
}
_OC_PROJ = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}  # x @ proj
_OC_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OC_RESBLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)")
_HF_LAYER = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OC_DROP = ("input_resolution", "context_length", "vocab_size")  # non-tensor extras of OpenAI JIT checkpoints

# open_clip options that change the computation: key -> the values the port implements.
_OC_TOP_OK = {"init_logit_bias": (None,), "multimodal_cfg": (None,)}
_OC_COMMON_OK = {"ls_init_value": (None,), "act_kwargs": (None, {}), "norm_kwargs": (None, {}), "qk_norm": (False,),
                 "block_type": (None, "default"), "scaled_cosine_attn": (False,), "scale_heads": (False,),
                 "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,),
                 "final_ln_after_pool": (False,)}
_OC_VISION_OK = {**_OC_COMMON_OK, "attentional_pool": (False,), "no_ln_pre": (False,), "pool_type": ("tok",),
                 "pos_embed_type": ("learnable",), "timm_model_name": (None,)}
_OC_TEXT_OK = {**_OC_COMMON_OK, "embed_cls": (False,), "no_causal_mask": (False,), "pool_type": ("argmax",),
               "proj_bias": (False,), "proj_type": ("linear",), "hf_model_name": (None,)}
# Keys with no effect on inference here (training-only, tokenizer, or only read by a refused option).
_OC_TOP_FREE = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype", "init_logit_scale",
                "nonscalar_logit_scale", "output_dict", "custom_text"}
_OC_VISION_FREE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
                   "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
                   "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_OC_TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "output_tokens",
                 "pad_id", "eos_id", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs",
                 "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}


def _check_open_clip(cfg: dict, ok: dict, free: set, where: str) -> None:
    for key, value in cfg.items():
        if key in ok and value not in ok[key]:
            raise ConfigError(f"open_clip model_cfg: {where}{key}={value!r} is not supported by the Flax CLIP "
                              f"port; supported: {list(ok[key])}")
        if key not in ok and key not in free:
            raise ConfigError(f"open_clip model_cfg: unknown key {where + key!r}; the Flax CLIP port does not "
                              "know its effect")


def _square(value, key: str) -> int:
    if isinstance(value, (list, tuple)) and len(set(value)) != 1:
        raise ConfigError(f"open_clip model_cfg: vision_cfg.{key}={list(value)!r}: only square sizes are supported")
    return value[0] if isinstance(value, (list, tuple)) else value


def hf_config_from_open_clip(model_cfg: dict) -> dict:
    """An open_clip ``model_cfg`` dict -> the transformers CLIPConfig dict of the same model (plus
    ``text_pool: "argmax"``; ``text_config.eos_token_id = 2`` makes transformers pool the same way).

    Raises ConfigError naming the first option the port does not implement.
    """
    model_cfg = model_cfg.get("model_cfg", model_cfg)
    vis, txt = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    _check_open_clip(model_cfg, _OC_TOP_OK, _OC_TOP_FREE, "")
    _check_open_clip(vis, _OC_VISION_OK, _OC_VISION_FREE, "vision_cfg.")
    _check_open_clip(txt, _OC_TEXT_OK, _OC_TEXT_FREE, "text_cfg.")
    if isinstance(vis.get("layers"), (list, tuple)):
        raise ConfigError(f"open_clip model_cfg: vision_cfg.layers={list(vis['layers'])!r} (a ModifiedResNet "
                          "tower) is not supported by the Flax CLIP port; supported: an int (ViT)")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    v_width, t_width = vis.get("width", 768), txt.get("width", 512)
    if v_width % vis.get("head_width", 64):
        raise ConfigError(f"open_clip model_cfg: vision_cfg.width={v_width} is not a multiple of head_width")
    text = dict(vocab_size=txt.get("vocab_size", 49408), hidden_size=t_width,
                intermediate_size=int(t_width * txt.get("mlp_ratio", 4.0)), num_hidden_layers=txt.get("layers", 12),
                num_attention_heads=txt.get("heads", 8), max_position_embeddings=txt.get("context_length", 77),
                hidden_act=act, layer_norm_eps=1e-5, eos_token_id=2, bos_token_id=49406, pad_token_id=0)
    vision = dict(hidden_size=v_width, intermediate_size=int(v_width * vis.get("mlp_ratio", 4.0)),
                  num_hidden_layers=vis.get("layers", 12), num_attention_heads=v_width // vis.get("head_width", 64),
                  num_channels=3, image_size=_square(vis.get("image_size", 224), "image_size"),
                  patch_size=_square(vis.get("patch_size", 16), "patch_size"), hidden_act=act, layer_norm_eps=1e-5)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": model_cfg.get("embed_dim", 512),
            "logit_scale_init_value": model_cfg.get("init_logit_scale", math.log(1 / 0.07)),
            "text_pool": "argmax", "text_config": text, "vision_config": vision}


def convert_open_clip_state(state: dict) -> dict:
    """open_clip state dict (numpy) -> transformers CLIPModel keys and layouts (unknown keys pass through)."""
    out = {}
    for key, v in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        key = key[len("text."):] if key.startswith("text.") else key  # CustomTextCLIP
        m = _OC_RESBLOCK.fullmatch(key)
        if key in _OC_DROP:
            continue
        if key in _OC_NAMES:
            out[_OC_NAMES[key]] = v.reshape(()) if key == "logit_scale" else v  # [1] if nonscalar_logit_scale
        elif key in _OC_PROJ:
            out[_OC_PROJ[key]] = np.ascontiguousarray(v.T)
        elif m and m[3] in _OC_BLOCK:
            out[f"{'vision' if m[1] else 'text'}_model.encoder.layers.{m[2]}.{_OC_BLOCK[m[3]]}.{m[4]}"] = v
        elif m and m[3] == "attn.in_proj":  # fused q, k, v
            prefix = f"{'vision' if m[1] else 'text'}_model.encoder.layers.{m[2]}.self_attn."
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(v, 3, axis=0)):
                out[f"{prefix}{name}.{m[4]}"] = part
        else:
            out[key] = v
    return out


def open_clip_state_dict(params) -> dict[str, np.ndarray]:
    """Flax params of an open_clip-compatible `CLIPModel` -> an open_clip ``CLIP`` state dict (float32 numpy)."""
    pt = tables.flax_to_pt(jax.device_get(params), tables.build_table(params), dtype=np.float32)
    inv, inv_block = {v: k for k, v in {**_OC_NAMES, **_OC_PROJ}.items()}, {v: k for k, v in _OC_BLOCK.items()}
    out = {}
    for key, v in pt.items():
        m = _HF_LAYER.fullmatch(key)
        block = m and f"{'visual.' if m[1] == 'vision' else ''}transformer.resblocks.{m[2]}."
        if key in inv:
            out[inv[key]] = np.ascontiguousarray(v.T) if key in _OC_PROJ.values() else v
        elif m and m[3] in inv_block:
            out[f"{block}{inv_block[m[3]]}.{m[4]}"] = v
        elif m and m[3] == "self_attn.q_proj":
            out[f"{block}attn.in_proj_{m[4]}"] = np.concatenate([pt[key.replace("q_proj", n)]
                                                                 for n in ("q_proj", "k_proj", "v_proj")])
        elif not (m and m[3] in ("self_attn.k_proj", "self_attn.v_proj")):
            raise WeightsError(f"no open_clip name for {key!r}")
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def load_open_clip(path: str, model_cfg: Optional[dict] = None, *, dtype=jnp.float32, param_dtype=np.float32,
                   allow_pickle: bool = False, **module_kw):
    """An open_clip checkpoint as ``(CLIPModel, params)`` (params float32 numpy->jax unless ``param_dtype``).

    ``path``: a folder as open_clip saves it for the hub (``open_clip_config.json`` +
    ``open_clip_model.safetensors``; ``open_clip_pytorch_model.bin`` only with ``allow_pickle``), or a
    bare state-dict file (``.safetensors``, or a trusted pickle) together with ``model_cfg`` (the
    ``model_cfg`` dict, or the whole ``open_clip_config.json`` dict). ``model_cfg`` given with a folder
    overrides its json. Extra keyword arguments (e.g. ``remat=True``) go to the module.
    """
    if not os.path.exists(path):
        raise WeightsError(f"open_clip checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        if model_cfg is None:
            cfg_path = os.path.join(path, "open_clip_config.json")
            if not os.path.isfile(cfg_path):
                raise WeightsError(f"{path!r} has no open_clip_config.json; pass model_cfg= for a bare checkpoint")
            with open(cfg_path) as f:
                model_cfg = json.load(f)
    elif model_cfg is None:
        raise WeightsError(f"{path!r} is not a folder; for a bare open_clip checkpoint pass its model_cfg dict")
    module = CLIPModel(CLIPConfig.from_dict(hf_config_from_open_clip(model_cfg)), dtype=dtype, **module_kw)
    if os.path.isdir(path):
        state = io.read_tensors(path, "open_clip_model", allow_pickle=allow_pickle)
    else:
        state = io.read_tensor_file(path, allow_pickle=allow_pickle)
    shapes = param_shapes(module, SPEC)
    params = tables.pt_to_flax(convert_open_clip_state(state), tables.build_table(shapes), shapes,
                               dtype=param_dtype, what=path)
    return module, jax.tree_util.tree_map(jnp.asarray, params)
