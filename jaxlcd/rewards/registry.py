"""The reward-model registry: ``load_reward("hpsv2.1+0.1*imagereward", paths)`` -> `RewardModel`.

| name         | model folder (``path``)                                         | score                          |
|--------------|-----------------------------------------------------------------|--------------------------------|
| hpsv2.1      | open_clip folder (HPSv2.1 = OpenCLIP ViT-H/14 fine-tuned)        | cosine(image, text)            |
| pickscore    | transformers CLIPModel folder (+ tokenizer files)               | cosine(image, text)            |
| clipscore    | either CLIP format                                              | cosine(image, text)            |
| imagereward  | ImageReward folder (model.safetensors + med_config.json)        | min((raw - mean) / std, 2)     |
| aesthetic    | a CLIP folder + ``aesthetic_head.safetensors`` (weight [1,D], bias [1]) | linear head on L2-normalised image features |

Every model scores decoded images in [0, 1] after `preprocess.reward_pixels` (shorter side -> 224 bicubic,
centre crop, CLIP normalisation). ``antialias=False`` reproduces the reference's non-antialiased resize.
Cosine rewards are unscaled (the HPSv2 benchmark reports 100 x cosine; PickScore's card x logit_scale).
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Union

import jax.numpy as jnp
import numpy as np

from jaxlcd.rewards.base import RewardModel, weighted_sum
from jaxlcd.rewards.preprocess import reward_pixels
from jaxlcd.errors import InputError

_TERM = re.compile(r"\s*(?:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*\*\s*)?([a-z0-9_.]+)\s*")
IMAGEREWARD_CAP = 2.0


class RewardError(InputError):
    """An unknown reward name, a malformed reward expression, or a missing model path."""


def _clip_model(path: str, dtype, allow_pickle: bool, attention: str = "auto"):
    """(module, params, tokenizer, text context length) from a transformers or open_clip CLIP folder."""
    from jaxlcd.models import clip
    from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer
    from jaxlcd.loaders import load_component

    if not os.path.isdir(path):
        raise RewardError(f"CLIP reward model folder {path!r} does not exist")
    if os.path.isfile(os.path.join(path, "open_clip_config.json")):
        module, params = clip.load_open_clip(path, dtype=dtype, allow_pickle=allow_pickle)
    else:
        module, params = load_component(path, dtype=dtype, allow_pickle=allow_pickle)
        if not isinstance(module, clip.CLIPModel):
            raise RewardError(f"{path!r} holds a {type(module).__name__}, not a CLIPModel")
    has_tok = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json"))
    # open_clip's tokenizer = the CLIP BPE. Padding with EOS rather than SD2's "!" keeps a "!" in a prompt its own
    # id (transformers maps every "!" to the pad id otherwise); pooled features never see the padding.
    tok_dir = path if has_tok else build_clip_tokenizer_files(
        os.path.join(os.path.expanduser("~/.cache/jaxlcd"), "clip_tokenizer"))
    return (module.clone(attention_impl=attention), params, load_tokenizer(tok_dir),
            module.config.text_config.max_position_embeddings)


def _clip_cosine(name: str, path: str, dtype, antialias: bool, allow_pickle: bool, attention: str = "auto"
                 ) -> RewardModel:
    from jaxlcd.tokenizer import tokenize

    module, params, tok, length = _clip_model(path, dtype, allow_pickle, attention)
    return clip_cosine_reward(name, module, params, lambda prompts: {"input_ids": tokenize(tok, prompts, length)},
                              antialias)


def clip_cosine_reward(name: str, module, params, tokenize, antialias: bool = True) -> RewardModel:
    """cosine(image, text) of a `jaxlcd.models.clip.CLIPModel` as a RewardModel (params may be abstract)."""
    size = module.config.vision_config.image_size

    def encode_text(p, tokens):
        t = module.apply({"params": p}, tokens["input_ids"], method=module.get_text_features).astype(jnp.float32)
        return t / jnp.linalg.norm(t, axis=-1, keepdims=True)

    def score_images(p, images, text):
        f = module.apply({"params": p}, reward_pixels(images, size, antialias),
                         method=module.get_image_features).astype(jnp.float32)
        return jnp.sum(f / jnp.linalg.norm(f, axis=-1, keepdims=True) * text, axis=-1)

    scale = params["logit_scale"]
    scale = float(np.exp(np.asarray(scale, np.float64))) if isinstance(scale, (np.ndarray, jnp.ndarray)) else 100.0
    return RewardModel(name, params, tokenize, encode_text, score_images, scale, size)


def _aesthetic(name: str, path: str, dtype, antialias: bool, allow_pickle: bool, attention: str = "auto"
               ) -> RewardModel:
    from jaxlcd.weights.io import read_tensor_file

    module, params, _, _ = _clip_model(path, dtype, allow_pickle, attention)
    head_file = os.path.join(path, "aesthetic_head.safetensors")
    if not os.path.isfile(head_file):
        raise RewardError(f"{path!r} has no aesthetic_head.safetensors (the LAION linear head: weight [1, D], "
                          "bias [1]); convert the .pth with `python -m jaxlcd.rewards.convert --allow-pickle`")
    head = read_tensor_file(head_file)
    size = module.config.vision_config.image_size
    params = {"clip": params, "head": {k: jnp.asarray(head[k], jnp.float32) for k in ("weight", "bias")}}

    def score_images(p, images, text):
        f = module.apply({"params": p["clip"]}, reward_pixels(images, size, antialias),
                         method=module.get_image_features).astype(jnp.float32)
        f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
        return (f @ p["head"]["weight"].T + p["head"]["bias"])[:, 0]

    return RewardModel(name, params, lambda prompts: {}, lambda p, tokens: (), score_images, image_size=size)


def imagereward_model(name: str, path: str, dtype, antialias: bool, allow_pickle: bool,
                      attention: str = "auto", cap: float | None = IMAGEREWARD_CAP) -> RewardModel:
    """ImageReward's normalised reward ``(raw - mean) / std``, capped at ``cap`` for training (None: uncapped, as
    ImageReward's own ``score`` and the evaluation report it)."""
    from jaxlcd.models import blip

    module, params, tok = blip.load_imagereward(path, dtype=dtype, allow_pickle=allow_pickle, attention_impl=attention)
    size = module.config.vision.image_size

    def tokenize(prompts):
        ids, mask = blip.tokenize_imagereward(tok, prompts)
        return {"input_ids": ids, "attention_mask": mask}

    def score_images(p, images, tokens):
        pixels = reward_pixels(images, size, antialias)
        raw = blip.score(module, p, pixels, tokens["input_ids"], tokens["attention_mask"])
        reward = blip.reward_from_raw(raw)
        return reward if cap is None else jnp.minimum(reward, cap)

    return RewardModel(name, params, tokenize, lambda p, tokens: tokens, score_images, image_size=size)


LOADERS = {"hpsv2.1": _clip_cosine, "pickscore": _clip_cosine, "clipscore": _clip_cosine,
           "imagereward": imagereward_model, "aesthetic": _aesthetic}


def parse_reward_expression(expr: str) -> list[tuple[float, str]]:
    """``"hpsv2.1+0.1*imagereward"`` -> [(1.0, "hpsv2.1"), (0.1, "imagereward")]; names checked."""
    terms = []
    for part in expr.split("+"):
        m = _TERM.fullmatch(part)
        if not m:
            raise RewardError(f"cannot parse reward term {part!r} in {expr!r}; write e.g. 'hpsv2.1+0.1*imagereward'")
        weight, name = float(m[1]) if m[1] else 1.0, m[2]
        if name not in LOADERS:
            raise RewardError(f"unknown reward model {name!r}; known: {', '.join(sorted(LOADERS))}")
        terms.append((weight, name))
    if len({n for _, n in terms}) != len(terms):
        raise RewardError(f"reward expression {expr!r} names a model twice")
    return terms


def load_reward(expr: str, path: Union[str, Mapping[str, str]], *, dtype=jnp.float32, antialias: bool = True,
                allow_pickle: bool = False, attention: str = "auto") -> RewardModel:
    """A reward model (or a weighted sum of them) ready to score ``rm(images [B,H,W,3] in [0,1], prompts)``.

    ``path``: the model folder for a single name, or a mapping name -> folder for a sum (a string
    ``"hpsv2.1=/a,imagereward=/b"`` works too). ``dtype``: compute dtype of the towers; ``attention``: their
    attention implementation (`jaxlcd.models.attention`).
    """
    terms = parse_reward_expression(expr)
    if isinstance(path, str) and "=" in path:
        path = dict(item.split("=", 1) for item in path.split(","))
    if isinstance(path, str):
        if len(terms) > 1:
            raise RewardError(f"{expr!r} sums {len(terms)} models: pass one path per name, e.g. "
                              f"{','.join(n + '=/path' for _, n in terms)}")
        path = {terms[0][1]: path}
    missing = [n for _, n in terms if not path.get(n)]
    if missing:
        raise RewardError(f"no model path for reward {', '.join(missing)}")
    return weighted_sum([(w, LOADERS[n](n, os.path.expanduser(path[n]), dtype, antialias, allow_pickle,
                                                  attention))
                         for w, n in terms])
