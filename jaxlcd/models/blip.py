"""Flax linen port of ImageReward (THUDM, ``image-reward`` 1.5): BLIP ViT + BERT with cross-attention + MLP.

raw = mlp(text_encoder(input_ids, attention_mask, cross-attending to visual_encoder(pixels))[:, 0]);
the reward is ``(raw - REWARD_MEAN) / REWARD_STD`` (`reward_from_raw`). Module names mirror the
PyTorch attributes, so params map 1:1 onto the ImageReward state-dict keys through
`jaxlcd.weights.tables` (``blip.visual_encoder.blocks.3.attn.qkv.weight`` <->
``blip/visual_encoder/blocks_3/attn/qkv/kernel``). Images are NHWC. LayerNorms, the attention
softmax and the MLP head run in float32 whatever the compute dtype.

Like the package's ``score()``/``score_gard()`` and its training code, position 0 of the text holds
the tokenizer's ``[CLS]``; BLIP's ``[ENC]`` token is *not* substituted (``use_enc_token`` opts in).

A model folder (`load_imagereward` / `save_imagereward`) holds ``model.safetensors`` (the ImageReward
state-dict keys; the unused ``blip.vision_proj``/``blip.text_proj`` and ``position_ids`` are ignored),
``med_config.json`` (BLIP's BERT config), optionally ``config.json`` (the ViT; default ViT-L/16 at
224 px) and optionally ``vocab.txt`` (default: the bert-base-uncased vocabulary shipped in
``jaxlcd/assets``). Typical use::

    module, params, tok = load_imagereward("ImageReward")      # ImageReward.pt converted to safetensors
    ids, mask = tokenize_imagereward(tok, prompts)              # [B, 35] int32 each
    raw = score(module, params, normalize_pixels(images01), ids, mask)   # images [B,224,224,3] in [0,1]
    reward = reward_from_raw(raw)
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlcd.models.config import ConfigError, ModelConfig, require
from jaxlcd.models.attention import attention
from jaxlcd.models.layers import activation, conv, layer_norm, maybe_remat
from jaxlcd.weights import io, tables
from jaxlcd.weights.tables import WeightsError
from jaxlcd.errors import InputError, MissingFileError

Dtype = Any
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)    # CLIP normalisation used by ImageReward's preprocess
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_MEAN = 0.16717362830052426                   # ImageReward.mean / .std
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35                                     # tokenizer max_length in ImageReward.score()
MLP_DIMS = (1024, 128, 64, 16, 1)                   # head widths; Dropouts sit at Sequential indices 1, 3, 5
_MLP_INDICES = (0, 2, 4, 6, 7)
VOCAB_ASSET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "bert_base_uncased_vocab.txt.gz")
_IGNORED_SUFFIXES = ("embeddings.position_ids",)
_IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")   # BLIP_Pretrain heads that score() never uses
_MASK_VALUE = -10000.0                              # med.py's additive mask for padded tokens


def _positive_int(cfg, keys, what):
    for key in keys:
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{what}: {key}={v!r} must be a positive int")


def _positive_float(cfg, keys, what):
    for key in keys:
        v = getattr(cfg, key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ConfigError(f"{what}: {key}={v!r} must be a positive number")


@dataclasses.dataclass(frozen=True)
class BLIPVisionConfig(ModelConfig):
    """BLIP's timm-style ViT (defaults: ``create_vit('large', 224)``, i.e. ViT-L/16)."""
    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    def validate(self, d: dict) -> None:
        what = "ImageReward vision config"
        _positive_int(self, ("image_size", "patch_size", "width", "depth", "heads"), what)
        _positive_float(self, ("mlp_ratio", "eps"), what)
        if self.image_size % self.patch_size:
            raise ConfigError(f"{what}: image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"{what}: width={self.width} is not divisible by heads={self.heads}")


@dataclasses.dataclass(frozen=True)
class MedConfig(ModelConfig):
    """The ``med_config.json`` keys BLIP's BertModel uses (defaults: ImageReward's file, BERT base)."""
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    encoder_width: int = 1024
    add_cross_attention: bool = True
    position_embedding_type: str = "absolute"
    pad_token_id: int = 0

    def validate(self, d: dict) -> None:
        what = "ImageReward med_config"
        require(d, "hidden_act", ("gelu", "gelu_new", "relu"), default="gelu", what=what)
        require(d, "add_cross_attention", (True,), default=True, what=what)
        require(d, "position_embedding_type", ("absolute",), default="absolute", what=what)
        _positive_int(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                             "intermediate_size", "max_position_embeddings", "encoder_width"), what)
        _positive_float(self, ("layer_norm_eps",), what)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{what}: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
    """Vision + text configs. The text ``encoder_width`` always equals the ViT width (as BLIP sets it)."""
    vision: BLIPVisionConfig = BLIPVisionConfig()
    text: MedConfig = MedConfig()

    @classmethod
    def from_dict(cls, d: dict) -> "ImageRewardConfig":
        """``{"vision": config.json dict, "text": med_config.json dict}``; ConfigError names a bad key."""
        vision = BLIPVisionConfig.from_dict(d.get("vision") or {})
        # BLIP_Pretrain overrides med_config's encoder_width (768 in ImageReward's file) with the ViT width.
        text = MedConfig.from_dict(d.get("text") or {}, encoder_width=vision.width)
        return cls(vision, text)


def _key_bias(key_mask):
    """med.py's additive -10000 logits bias on keys where key_mask [B, Tk] is 0 -> [B, 1, 1, Tk] float32."""
    return ((1.0 - key_mask.astype(jnp.float32)) * _MASK_VALUE)[:, None, None, :]


class ViTBlock(nn.Module):
    """Pre-LN block: x + attn.proj(mha(attn.qkv(norm1 x))), then + mlp(norm2 .). x [B,N,W] -> [B,N,W]."""
    config: BLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(c.eps, "norm1", **kw)(x)
        q, k, v = jnp.split(nn.Dense(3 * c.width, name="attn.qkv", **kw)(h), 3, axis=-1)
        x = x + nn.Dense(c.width, name="attn.proj", **kw)(
            attention(q, k, v, heads=c.heads, impl=self.attention_impl))
        h = nn.Dense(int(c.width * c.mlp_ratio), name="mlp.fc1", **kw)(layer_norm(c.eps, "norm2", **kw)(x))
        return x + nn.Dense(c.width, name="mlp.fc2", **kw)(activation("gelu")(h))


class VisionTransformer(nn.Module):
    """BLIP ``VisionTransformer``: pixels [B,S,S,3] (S = image_size) -> [B, 1+(S/patch)^2, width] after ``norm``."""
    config: BLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, pixels):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixels.ndim != 4 or pixels.shape[1:] != (c.image_size, c.image_size, 3):
            raise InputError(f"ImageReward: pixels must be [batch, {c.image_size}, {c.image_size}, 3] (NHWC), "
                             f"got shape {pixels.shape}")
        x = conv(c.width, c.patch_size, "patch_embed.proj", stride=c.patch_size, padding="VALID", **kw)(
            pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, c.width)  # row-major patches, as timm's flatten(2).transpose(1, 2)
        init = nn.initializers.normal(0.02)
        cls = self.param("cls_token", init, (1, 1, c.width), self.param_dtype)
        pos = self.param("pos_embed", init, (1, x.shape[1] + 1, c.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.width)).astype(self.dtype), x], axis=1)
        x = x + pos.astype(self.dtype)
        block = maybe_remat(ViTBlock, self.remat)
        for i in range(c.depth):
            x = block(c, name=f"blocks_{i}", attention_impl=self.attention_impl, **kw)(x)
        return layer_norm(c.eps, "norm", **kw)(x)


class BertAttention(nn.Module):
    """med.py BertAttention: ``self`` (query/key/value) then ``output`` (dense, post-LN residual).

    h [B,L,H], kv [B,S,Hkv], key_mask [B,S] or None -> [B,L,H].
    """
    config: MedConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, h, kv, key_mask):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = c.hidden_size
        q, k, v = (nn.Dense(d, name=f"self.{n}", **kw)(a) for n, a in (("query", h), ("key", kv), ("value", kv)))
        # cross-attention to the image (key_mask None): encoder_attention_mask is all ones
        bias = None if key_mask is None else _key_bias(key_mask)
        ctx = attention(q, k, v, heads=c.num_attention_heads, bias=bias, impl=self.attention_impl)
        out = nn.Dense(d, name="output.dense", **kw)(ctx)
        return layer_norm(c.layer_norm_eps, "output.LayerNorm", **kw)(out + h)


class BertLayer(nn.Module):
    """attention (masked self) -> crossattention (to image_embeds) -> intermediate/output. [B,L,H] -> [B,L,H]."""
    config: MedConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, attention_mask, image_embeds):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertAttention(c, name="attention", attention_impl=self.attention_impl, **kw)(x, x, attention_mask)
        x = BertAttention(c, name="crossattention", attention_impl=self.attention_impl, **kw)(x, image_embeds, None)
        h = activation(c.hidden_act)(nn.Dense(c.intermediate_size, name="intermediate.dense", **kw)(x))
        h = nn.Dense(c.hidden_size, name="output.dense", **kw)(h)
        return layer_norm(c.layer_norm_eps, "output.LayerNorm", **kw)(h + x)


class BertModel(nn.Module):
    """med.py BertModel (no pooler, mode 'multimodal'): word + position embeddings (no token types) -> layers.

    input_ids [B,L] int, attention_mask [B,L] (1 = token, 0 = padding), image_embeds [B,S,encoder_width]
    -> last_hidden_state [B,L,hidden_size] in ``dtype``.
    """
    config: MedConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, input_ids, attention_mask, image_embeds):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
            raise InputError(f"ImageReward: input_ids must be [batch, length <= {c.max_position_embeddings}], "
                             f"got shape {input_ids.shape}")
        f32 = dict(dtype=jnp.float32, param_dtype=self.param_dtype)  # embeddings summed and normed in fp32
        x = nn.Embed(c.vocab_size, c.hidden_size, name="embeddings.word_embeddings", **f32)(input_ids)
        x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, name="embeddings.position_embeddings",
                         **f32)(jnp.arange(input_ids.shape[1]))[None]
        x = layer_norm(c.layer_norm_eps, "embeddings.LayerNorm", **kw)(x)
        layer = maybe_remat(BertLayer, self.remat)
        for i in range(c.num_hidden_layers):
            x = layer(c, name=f"encoder.layer_{i}", attention_impl=self.attention_impl, **kw)(x, attention_mask, image_embeds.astype(self.dtype))
        return x


class BLIP(nn.Module):
    """The ``blip`` submodule: ``visual_encoder`` and ``text_encoder`` (see `ImageReward` for dtypes)."""
    config: ImageRewardConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, attention_impl=self.attention_impl)
        self.visual_encoder = VisionTransformer(self.config.vision, **kw)
        self.text_encoder = BertModel(self.config.text, **kw)


class RewardMLP(nn.Module):
    """ImageReward's head: five Linears, no activations (dropout off), in float32. [B,H] -> [B,1]."""
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        for i, features in zip(_MLP_INDICES, MLP_DIMS):
            x = nn.Dense(features, dtype=jnp.float32, param_dtype=self.param_dtype, name=f"layers_{i}")(x)
        return x


class ImageReward(nn.Module):
    """ImageReward (params ``blip/...`` and ``mlp/...``).

    ``dtype`` is the compute dtype of the ViT and BERT (LayerNorms, softmax and head in float32);
    ``param_dtype`` that of freshly initialised params; ``remat`` rematerialises each ViT block and
    BERT layer in the backward pass (param names unchanged); ``attention_impl``: `jaxlcd.models.attention`.
    """
    config: ImageRewardConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    def setup(self):
        self.blip = BLIP(self.config, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                         attention_impl=self.attention_impl)
        self.mlp = RewardMLP(param_dtype=self.param_dtype)

    def image_embeds(self, pixels):
        """pixels [B,S,S,3] normalised with IMAGE_MEAN/IMAGE_STD -> [B, 1+N, vision width] in ``dtype``."""
        return self.blip.visual_encoder(pixels)

    def text_hidden(self, input_ids, attention_mask, image_embeds):
        """input_ids/attention_mask [B,L] int, image_embeds [B,1+N,W] -> last_hidden_state [B,L,H] in ``dtype``."""
        return self.blip.text_encoder(input_ids, attention_mask, image_embeds)

    def __call__(self, pixels, input_ids, attention_mask):
        """pixels [B,S,S,3] (normalised), input_ids/attention_mask [B,L] int -> raw score [B] float32."""
        hidden = self.text_hidden(input_ids, attention_mask, self.image_embeds(pixels))
        return self.mlp(hidden[:, 0])[:, 0]


def normalize_pixels(images):
    """NHWC RGB images in [0, 1] (already resized/cropped to image_size) -> ImageReward's normalised input."""
    return (images - jnp.asarray(IMAGE_MEAN, images.dtype)) / jnp.asarray(IMAGE_STD, images.dtype)


def reward_from_raw(raw):
    """The package's reward ``(raw - REWARD_MEAN) / REWARD_STD`` (same shape and dtype)."""
    return (raw - REWARD_MEAN) / REWARD_STD


def image_embeds(module: ImageReward, params, pixels):
    """pixels [B,S,S,3] float (normalised, NHWC) -> image embeddings [B, 1+N, width] in ``module.dtype``."""
    return module.apply({"params": params}, pixels, method=ImageReward.image_embeds)


def score(module: ImageReward, params, pixels, input_ids, attention_mask):
    """pixels [B,S,S,3] float (normalised), input_ids [B,35] int32, attention_mask [B,35] int32 -> raw [B] float32.

    Apply `reward_from_raw` for the package's normalised reward.
    """
    return module.apply({"params": params}, pixels, input_ids, attention_mask)


def param_shapes(module: ImageReward):
    """The abstract param tree of ``module`` (no FLOPs, no memory)."""
    s = module.config.vision.image_size
    dummy = (jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *dummy))["params"]


def canonical_key(key: str) -> Optional[str]:
    """ImageReward state-dict key -> table key; None for tensors ImageReward's score() never uses."""
    if key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES):
        return None
    return key


# ---- tokenizer --------------------------------------------------------------------------------------------

def _read_vocab(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f.readlines()]  # as transformers' load_vocab
    return {tok: i for i, tok in enumerate(tokens)}


def imagereward_tokenizer(vocab_file: Optional[str] = None):
    """BLIP's ``init_tokenizer()``: uncased BertTokenizer + ``[DEC]`` as bos_token + ``[ENC]`` (``enc_token_id``).

    ``vocab_file``: a bert-base-uncased ``vocab.txt`` (or ``.gz``); default the shipped copy. Offline.
    """
    from transformers import BertTokenizer

    path = vocab_file or VOCAB_ASSET
    if not os.path.isfile(path):
        raise MissingFileError(f"vocabulary file {path!r} does not exist")
    tok = BertTokenizer(vocab=_read_vocab(path), do_lower_case=True, model_max_length=512)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


def tokenize_imagereward(tokenizer, prompts: Sequence[str], use_enc_token: bool = False,
                         max_length: int = MAX_LENGTH):
    """prompts (B strings) -> (input_ids [B,35] int32, attention_mask [B,35] int32).

    ``[CLS] tokens [SEP] [PAD]...``, truncated to max_length, as ImageReward.score() tokenises.
    ``use_enc_token=True`` puts ``tokenizer.enc_token_id`` at position 0 (BLIP's ITM convention; the
    ImageReward checkpoint was trained and is scored without it).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length)
    ids = np.asarray(enc["input_ids"], np.int32)
    if use_enc_token:
        ids[:, 0] = tokenizer.enc_token_id
    return ids, np.asarray(enc["attention_mask"], np.int32)


# ---- folders ----------------------------------------------------------------------------------------------

def load_imagereward(path: str, dtype=jnp.float32, param_dtype=np.float32, allow_pickle: bool = False,
                     remat=False, attention_impl: str = "auto"):
    """An ImageReward folder -> ``(module, params, tokenizer)``.

    The folder holds ``model.safetensors`` (ImageReward state-dict keys), ``med_config.json``, and
    optionally ``config.json`` (ViT; default ViT-L/16 224) and ``vocab.txt`` (default: shipped).
    A pickle checkpoint (``ImageReward.pt``) is read only with ``allow_pickle=True``. ``dtype`` is
    the compute dtype; params are converted to ``param_dtype`` (Flax layout, jax arrays).
    Raises WeightsError (missing file or tensor, extra or mis-shaped tensor) or ConfigError.
    """
    if not os.path.isdir(path):
        raise WeightsError(f"ImageReward folder {path!r} does not exist")
    med_path = os.path.join(path, "med_config.json")
    if not os.path.isfile(med_path):
        raise WeightsError(f"{path!r} has no med_config.json (BLIP's BERT config); expected an ImageReward folder "
                           "with model.safetensors + med_config.json")
    cfg_path = os.path.join(path, "config.json")
    vision = io.read_json_object(cfg_path) if os.path.isfile(cfg_path) else {}
    config = ImageRewardConfig.from_dict({"vision": vision, "text": io.read_json_object(med_path)})
    raw = io.read_tensors(path, "model", allow_pickle=allow_pickle)
    state = {canonical_key(k): v for k, v in raw.items() if canonical_key(k) is not None}
    module = ImageReward(config, dtype=dtype, remat=remat, attention_impl=attention_impl)
    shapes = param_shapes(module)
    table = tables.build_table(shapes)
    params = tables.pt_to_flax(state, table, shapes, dtype=param_dtype, what=path)
    vocab = os.path.join(path, "vocab.txt")
    tokenizer = imagereward_tokenizer(vocab if os.path.isfile(vocab) else None)
    if len(tokenizer) > config.text.vocab_size:
        raise WeightsError(f"{path}: the tokenizer has {len(tokenizer)} tokens but med_config.json has "
                           f"vocab_size={config.text.vocab_size}")
    return module, jax.tree_util.tree_map(jnp.asarray, params), tokenizer


def save_imagereward(module: ImageReward, params, out_dir: str, dtype=np.float32) -> None:
    """Write ``model.safetensors`` (ImageReward keys, PyTorch layout), ``med_config.json`` and ``config.json``.

    No vocab.txt is written: `load_imagereward` then uses the shipped bert-base-uncased vocabulary.
    """
    table = tables.build_table(param_shapes(module))
    tensors = tables.flax_to_pt(jax.device_get(params), table, dtype=dtype)
    io.write_component_dir(out_dir, module.config.vision.to_dict(), tensors, "model")
    with open(os.path.join(out_dir, "med_config.json"), "w") as f:
        json.dump(module.config.text.to_dict(), f, indent=2, sort_keys=True)
