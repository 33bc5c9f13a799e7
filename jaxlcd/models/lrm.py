"""The latent proxy reward model (LRM, docs/algorithm.md section 4): a CLIP whose image tower reads SD latents.

``arch="latent_vit"``: a CLIP ViT over unscaled latents (4 channels; for 512 px images 64 x 64 latents,
patch 4 -> 256 tokens + CLS, width 512, 12 layers, 8 heads) + ``visual_projection``;
``arch="latent_rn50"``: open_clip's ModifiedResNet with 4 input channels and attention pooling (``visual``).
The text tower is a CLIP text transformer (OpenCLIP ViT-H/14's by default) + ``text_projection``; text
pooling at ``argmax(input_ids)`` as open_clip. Score = cosine(E_img(z), E_txt(c)); logits = cosine *
exp(logit_scale). Params are named like transformers/open_clip keys, so the folder (config.json with
``architectures: ["LatentRewardModel"]`` + model.safetensors) goes through `jaxlcd.weights`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxlcd.models.clip import CLIPVisionConfig, CLIPVisionTransformer, pool_text
from jaxlcd.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from jaxlcd.models.config import ConfigError, ModelConfig, require
from jaxlcd.models.modified_resnet import ModifiedResNet, ModifiedResNetConfig
from jaxlcd.weights.spec import ComponentSpec

Dtype = Any
ARCHS = ("latent_vit", "latent_rn50")

OPENCLIP_H_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
LATENT_VIT = dict(num_channels=4, image_size=64, patch_size=4, hidden_size=512, intermediate_size=2048,
                  num_hidden_layers=12, num_attention_heads=8, hidden_act="gelu")
LATENT_RN50 = dict(layers=[3, 4, 6, 3], width=64, heads=32, image_size=64, in_channels=4, output_dim=1024)


@dataclasses.dataclass(frozen=True)
class LRMConfig(ModelConfig):
    """arch, text_config (CLIPTextConfig keys), vision_config (CLIPVisionConfig or ModifiedResNetConfig keys)."""
    arch: str = "latent_vit"
    text_config: Any = None
    vision_config: Any = None
    projection_dim: int = 1024
    logit_scale_init_value: float = 2.6592   # log(1 / 0.07), as CLIP

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "LRMConfig":
        arch = d.get("arch", "latent_vit")
        require({"arch": arch}, "arch", ARCHS, what="LatentRewardModel config")
        text = d.get("text_config") or OPENCLIP_H_TEXT
        vision = d.get("vision_config") or (LATENT_VIT if arch == "latent_vit" else LATENT_RN50)
        if arch == "latent_rn50":
            vision = dict(vision, layers=tuple(vision.get("layers", (3, 4, 6, 3))))
            vis_cfg = ModifiedResNetConfig.from_dict(vision)
        else:
            vis_cfg = CLIPVisionConfig.from_dict(vision)
        overrides.setdefault("text_config", CLIPTextConfig.from_dict(text))
        overrides.setdefault("vision_config", vis_cfg)
        return super().from_dict(d, **overrides)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["text_config"], d["vision_config"] = self.text_config.to_dict(), self.vision_config.to_dict()
        d["text_config"].pop("architectures", None)
        d["architectures"] = ["LatentRewardModel"]
        return d

    def validate(self, d: dict) -> None:
        if self.arch == "latent_rn50" and self.vision_config.output_dim != self.projection_dim:
            raise ConfigError(f"LatentRewardModel config: vision_config.output_dim={self.vision_config.output_dim} "
                              f"must equal projection_dim={self.projection_dim} for latent_rn50")


def _normalise(x):
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class LatentRewardModel(nn.Module):
    """The LRM. ``dtype``: compute dtype (norms, softmax, cosines in float32); ``remat`` per block."""
    config: LRMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = False
    attention_impl: str = "auto"

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        enc = dict(remat=self.remat, attention_impl=self.attention_impl)
        self.text_model = CLIPTextTransformer(c.text_config, **enc, **kw)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)
        if c.arch == "latent_vit":
            self.vision_model = CLIPVisionTransformer(c.vision_config, **enc, **kw)
            self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)
        else:
            self.visual = ModifiedResNet(c.vision_config, **enc, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), (),
                                      self.param_dtype)

    def encode_latents(self, latents):
        """Unscaled latents [B,h,w,C] (h = w = the tower's image_size) -> L2-normalised [B,P] float32."""
        if self.config.arch == "latent_vit":
            return _normalise(self.visual_projection(self.vision_model(latents)[1]))
        return _normalise(self.visual(latents))

    def encode_text(self, input_ids):
        """input_ids [B,L] int -> L2-normalised [B,P] float32 (pooled at argmax(input_ids), as open_clip)."""
        last, _ = self.text_model(input_ids)
        return _normalise(self.text_projection(pool_text(last, input_ids, "argmax", 0)))

    def scale(self):
        """exp(logit_scale), float32 scalar."""
        return jnp.exp(self.logit_scale.astype(jnp.float32))

    def __call__(self, latents, input_ids):
        """-> (image embeds [B,P], text embeds [B,P]), both normalised float32 (their row-wise dot is the score)."""
        return self.encode_latents(latents), self.encode_text(input_ids)


def canonical_key(key: str) -> Optional[str]:
    """Drops BatchNorm ``num_batches_tracked`` and ``position_ids`` buffers."""
    return None if key.endswith(("num_batches_tracked", "position_ids")) else key


def build(config: dict, dtype=jnp.float32, **kw) -> LatentRewardModel:
    """A `LatentRewardModel` from its config.json dict; ``kw``: param_dtype, remat."""
    return LatentRewardModel(LRMConfig.from_dict(config), dtype=dtype, **kw)


def dummy_inputs(module: LatentRewardModel) -> tuple:
    """A zero latent [1,S,S,C] and a [1,1] id batch (for eval_shape(init))."""
    v = module.config.vision_config
    size = v.image_size
    ch = v.num_channels if module.config.arch == "latent_vit" else v.in_channels
    return jnp.zeros((1, size, size, ch), jnp.float32), jnp.zeros((1, 1), jnp.int32)


SPEC = ComponentSpec(class_names=("LatentRewardModel",), weights_stem="model", build=build,
                     dummy_inputs=dummy_inputs, canonical_key=canonical_key)
