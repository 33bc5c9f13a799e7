"""The reward-model interface shared by the registry, the train step and the evaluation."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jaxlcd.errors import InputError


@dataclasses.dataclass(frozen=True, eq=False)
class RewardModel:
    """A differentiable reward R(images, prompts) -> [B] split into pure functions of its params.

    tokenize(prompts) -> dict of int32 arrays [B, L] (host side, numpy);
    encode_text(params, tokens) -> text features (no gradient is taken through them);
    score_images(params, images [B,H,W,3] float in [0,1], text) -> [B] float32 (differentiable in images);
    logit_scale: the model's contrastive temperature exp(logit_scale); expert logits for the LRM are
    ``cosine * logit_scale`` (docs/algorithm.md section 4), NaN for rewards that are not a CLIP cosine;
    image_size: the square side the model's preprocessing resizes and crops to (224 for the released models).
    The train step takes ``params`` as a frozen argument and closes over the functions.
    """
    name: str
    params: Any
    tokenize: Callable[[Sequence[str]], dict]
    encode_text: Callable[[Any, dict], Any]
    score_images: Callable[[Any, jax.Array, Any], jax.Array]
    logit_scale: float = float("nan")
    image_size: int = 224

    def text_features(self, params, tokens):
        """encode_text under stop_gradient."""
        return jax.lax.stop_gradient(self.encode_text(params, tokens))

    def score(self, params, images, tokens):
        """images [B,H,W,3] in [0,1], tokens from `tokenize` -> [B] float32."""
        return self.score_images(params, images, self.text_features(params, tokens))

    def __call__(self, images, prompts: Sequence[str]):
        """images [B,H,W,3] float in [0,1] (differentiable), prompts list[str] of length B -> scores [B]."""
        if len(prompts) != images.shape[0]:
            raise InputError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        return self.score(self.params, jnp.asarray(images), self.tokenize(list(prompts)))


def weighted_sum(terms: Sequence[tuple[float, RewardModel]]) -> RewardModel:
    """sum_i weight_i * R_i as one RewardModel (params and tokens are tuples, one entry per term)."""
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    weights = tuple(float(w) for w, _ in terms)
    models = tuple(m for _, m in terms)
    name = "+".join(m.name if w == 1.0 else f"{w:g}*{m.name}" for w, m in zip(weights, models))

    def tokenize(prompts):
        return {f"{i}/{k}": v for i, m in enumerate(models) for k, v in m.tokenize(prompts).items()}

    def split(tokens, i):
        return {k.split("/", 1)[1]: v for k, v in tokens.items() if k.startswith(f"{i}/")}

    def encode_text(params, tokens):
        return tuple(m.encode_text(p, split(tokens, i)) for i, (m, p) in enumerate(zip(models, params)))

    def score_images(params, images, text):
        return sum(w * m.score_images(p, images, t) for w, m, p, t in zip(weights, models, params, text))

    return RewardModel(name, tuple(m.params for m in models), tokenize, encode_text, score_images)
