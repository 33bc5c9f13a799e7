"""The latent proxy reward model in training: its score, its online preference loss and its optimizer.

docs/algorithm.md section 4: the student maximises cosine_LRM(pred / sf, c); every step the LRM is fitted to the
expert RM's preferences over [pred, target, real latent] with
    loss = mean_b sum_{(i,j) in (0,1),(0,2),(1,2)} KL(softmax([E_i, E_j]) || softmax([L_i, L_j]))
(E: expert logits = cosine * the expert's exp(logit_scale); L: the LRM's logits), AdamW, no clipping.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxlcd.models.lrm import LatentRewardModel
from jaxlcd.models.modified_resnet import BN_STATS
from jaxlcd.errors import InputError

PAIRS = ((0, 1), (0, 2), (1, 2))


@dataclasses.dataclass(frozen=True, eq=False)
class LatentReward:
    """An LRM bound to its tokenizer; params travel separately (they train)."""
    module: LatentRewardModel
    params: Any
    tokenizer: Any

    def tokenize(self, prompts: Sequence[str]) -> dict:
        """prompts -> {"input_ids": [B, 77] int32} (CLIP BPE)."""
        from jaxlcd.tokenizer import tokenize

        return {"input_ids": tokenize(self.tokenizer, list(prompts),
                                      self.module.config.text_config.max_position_embeddings)}

    def text_features(self, params, tokens):
        """-> normalised text embeddings [B,P] float32."""
        return self.module.apply({"params": params}, tokens["input_ids"], method=LatentRewardModel.encode_text)

    def cosine(self, params, latents, text):
        """Unscaled latents [B,h,w,C], text [B,P] -> cosine [B] float32."""
        img = self.module.apply({"params": params}, latents, method=LatentRewardModel.encode_latents)
        return jnp.sum(img * text, axis=-1)

    def logits(self, params, latents, text):
        """cosine * exp(logit_scale): [B] float32."""
        return self.cosine(params, latents, text) * self.module.apply({"params": params},
                                                                      method=LatentRewardModel.scale)


def pairwise_preference_loss(expert_logits, lrm_logits):
    """expert_logits, lrm_logits [3, B] (rows: pred, target, real) -> (loss scalar, agreement accuracy scalar).

    loss: batch mean of the summed pairwise KL(softmax(expert pair) || softmax(LRM pair));
    accuracy: the share of (pair, example) where the LRM orders the pair as the expert does.
    """
    e, l_ = expert_logits.astype(jnp.float32), lrm_logits.astype(jnp.float32)
    total, agree = 0.0, 0.0
    for i, j in PAIRS:
        log_p = jax.nn.log_softmax(jnp.stack([e[i], e[j]]), axis=0)
        log_q = jax.nn.log_softmax(jnp.stack([l_[i], l_[j]]), axis=0)
        total = total + jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=0)
        agree = agree + jnp.mean(((e[i] - e[j]) > 0) == ((l_[i] - l_[j]) > 0))
    return jnp.mean(total), agree / len(PAIRS)


def trainable_mask(params, freeze: Sequence[str] = ()) -> Any:
    """Pytree of bools: False for BatchNorm running statistics and for every leaf whose '/'-joined path
    matches one of the ``freeze`` regular expressions at its start (e.g. ``"text_model"``,
    ``"vision_model/encoder/layers_[0-5]/"``)."""
    patterns = [re.compile(p) for p in freeze]
    flat = traverse_util.flatten_dict(params)
    mask = {k: not (k[-1] in BN_STATS or any(p.match("/".join(k)) for p in patterns)) for k in flat}
    return traverse_util.unflatten_dict(mask)


def make_lrm_optimizer(params, learning_rate: float, weight_decay: float = 0.0,
                       freeze: Sequence[str] = ()) -> optax.GradientTransformation:
    """AdamW (`jaxlcd.training.optimizer`, constant rate, no clipping) on the trainable leaves; frozen leaves
    (`trainable_mask`) get a zero update, so they stay bit-identical."""
    from jaxlcd.training.optimizer import make_optimizer

    mask = trainable_mask(params, freeze)
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "frozen", mask)
    adamw = make_optimizer({"learning_rate": learning_rate, "weight_decay": weight_decay}, total_steps=1,
                           hyperparams_in_state=False)
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def load_lrm(path: str, *, dtype=jnp.float32, allow_pickle: bool = False, attention: str = "auto") -> LatentReward:
    """An LRM folder (config.json ``LatentRewardModel`` + model.safetensors; CLIP tokenizer files optional);
    ``attention``: its attention implementation (`jaxlcd.models.attention`)."""
    from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer
    from jaxlcd.loaders import load_component

    module, params = load_component(path, dtype=dtype, allow_pickle=allow_pickle)
    if not isinstance(module, LatentRewardModel):
        raise InputError(f"{path!r} holds a {type(module).__name__}, not a LatentRewardModel")
    tok_dir = os.path.join(path, "tokenizer")
    if not os.path.isdir(tok_dir):
        tok_dir = build_clip_tokenizer_files(os.path.join(os.path.expanduser("~/.cache/jaxlcd"), "lrm_tokenizer"))
    return LatentReward(module.clone(attention_impl=attention), params, load_tokenizer(tok_dir))
