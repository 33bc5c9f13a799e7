"""The demo world's attribute judge: a small CNN that reads a shapes picture back as a normalized `Scene`.

One linear head per attribute of the normalized scene (`Scene.normalized`: relations are only "left of" /
"above", so one picture has one description): ``count`` (1|2 objects), ``background``, per object slot
``shape_i`` / ``colour_i`` / ``size_i`` (slot 1 only for two objects), ``position`` (one object) and
``relation`` (two objects). The penultimate dense vector is the feature network of the demo FID.
Saved as ``config.json`` (``"model_type": "jaxlcd_judge"``) + ``model.safetensors`` (fp16 by default).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlcd.demo.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Obj, Scene
from jaxlcd.errors import InputError

MODEL_TYPE = "jaxlcd_judge"
IGNORE = -1  # label of a head that does not apply to a scene
COLOUR_NAMES = tuple(COLOURS)
NORMAL_RELATIONS = ("left of", "above")  # the relations of normalized scenes
HEADS = {"count": 2, "background": len(COLOUR_NAMES),
         "shape_0": len(SHAPES), "colour_0": len(COLOUR_NAMES), "size_0": len(SIZES),
         "shape_1": len(SHAPES), "colour_1": len(COLOUR_NAMES), "size_1": len(SIZES),
         "position": len(POSITIONS), "relation": len(NORMAL_RELATIONS)}


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """``image_size``: the training resolution (square); ``channels``: one stride-2 3x3 conv per entry;
    ``feature_dim``: width of the penultimate (feature) layer."""
    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 128)
    feature_dim: int = 256

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "image_size": self.image_size, "channels": list(self.channels),
                "feature_dim": self.feature_dim}

    @classmethod
    def from_dict(cls, d: dict) -> JudgeConfig:
        return cls(image_size=int(d["image_size"]), channels=tuple(int(c) for c in d["channels"]),
                   feature_dim=int(d["feature_dim"]))


def _with_foreground(images):
    """float32 [B,S,S,3] in [0,1] -> [B,S,S,7]: the image in [-1,1], its difference from the background
    colour (the median of the border pixels) and that difference's magnitude. The colour-independent
    foreground channels make shapes far quicker to learn than from raw colours alone."""
    border = jnp.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    diff = images - jnp.median(border, axis=1)[:, None, None, :]
    magnitude = jnp.sqrt(jnp.sum(diff * diff, axis=-1, keepdims=True) + 1e-6)
    return jnp.concatenate([images * 2.0 - 1.0, 2.0 * diff, 2.0 * magnitude - 1.0], axis=-1)


def _groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` that is <= min(8, channels // 4) (>= 1)."""
    return next(g for g in range(max(1, min(8, channels // 4)), 0, -1) if channels % g == 0)


class Judge(nn.Module):
    """images float32 [B,S,S,3] in [0,1] (S = config.image_size) -> (logits {head: float32 [B,classes]},
    features float32 [B,feature_dim]).

    Input plus foreground channels (`_with_foreground`), one stride-2 3x3 conv + GroupNorm + ReLU per
    ``channels`` entry, the last map flattened (where things are matters, so the parameters fit one input
    size), a dense ReLU feature layer, and one linear head per attribute on it.
    """
    config: JudgeConfig

    @nn.compact
    def __call__(self, images):
        x = _with_foreground(images.astype(jnp.float32))
        for i, c in enumerate(self.config.channels):
            x = nn.Conv(c, (3, 3), strides=(2, 2), padding="SAME", kernel_init=nn.initializers.he_normal(),
                        name=f"conv_{i}")(x)
            x = nn.relu(nn.GroupNorm(num_groups=_groups(c), name=f"norm_{i}")(x))
        features = nn.relu(nn.Dense(self.config.feature_dim, name="feature")(x.reshape(x.shape[0], -1)))
        logits = {name: nn.Dense(n, name=f"head_{name}")(features) for name, n in HEADS.items()}
        return logits, features


def init_params(module: Judge, seed: int = 0) -> dict:
    """Random float32 parameters of ``module`` for its config's image size."""
    s = module.config.image_size
    return jax.jit(module.init)(jax.random.PRNGKey(seed), jnp.zeros((1, s, s, 3), jnp.float32))["params"]


# --------------------------------------------------------------------------------------------- labels
def scene_labels(scene: Scene) -> dict[str, int]:
    """{head: class index} of ``scene.normalized()``; IGNORE (-1) for heads that do not apply (slot-1
    heads and ``relation`` for one object, ``position`` for two)."""
    scene = scene.normalized()
    labels = {name: IGNORE for name in HEADS}
    labels["count"] = len(scene.objects) - 1
    labels["background"] = COLOUR_NAMES.index(scene.background)
    for i, obj in enumerate(scene.objects):
        labels[f"shape_{i}"] = SHAPES.index(obj.shape)
        labels[f"colour_{i}"] = COLOUR_NAMES.index(obj.colour)
        labels[f"size_{i}"] = SIZES.index(obj.size)
    if scene.relation is None:
        labels["position"] = POSITIONS.index(scene.objects[0].position)
    else:
        labels["relation"] = NORMAL_RELATIONS.index(scene.relation)
    return labels


def batch_labels(scenes) -> dict[str, np.ndarray]:
    """{head: int32 [B]} of `scene_labels` over ``scenes`` (a list of B `Scene`)."""
    rows = [scene_labels(s) for s in scenes]
    return {name: np.array([r[name] for r in rows], np.int32) for name in HEADS}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _best_colours(bg: np.ndarray, c0: np.ndarray, c1: np.ndarray | None) -> tuple[int, ...]:
    """The most likely combination of distinct colours (background, slot 0[, slot 1]) from log-probs [8]."""
    n = len(bg)
    if c1 is None:
        joint = bg[:, None] + c0[None, :]
        joint[np.arange(n), np.arange(n)] = -np.inf
    else:
        joint = bg[:, None, None] + c0[None, :, None] + c1[None, None, :]
        i, j, k = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
        joint[(i == j) | (j == k) | (i == k)] = -np.inf
    return tuple(int(v) for v in np.unravel_index(np.argmax(joint), joint.shape))


def decode_predictions(logits: dict) -> list[Scene]:
    """{head: float [B,classes]} -> B normalized `Scene` (layout_seed None).

    Each head's argmax, except the colours: a scene needs the background and object colours all distinct,
    so they are decoded jointly as the most likely distinct combination (by summed log-probabilities).
    Every output is therefore a valid Scene; no fallback is needed.
    """
    lp = {k: _log_softmax(np.asarray(v, np.float64)) for k, v in logits.items()}
    top = {k: v.argmax(-1) for k, v in lp.items()}
    scenes = []
    for b in range(len(top["count"])):
        two = int(top["count"][b]) == 1
        colours = _best_colours(lp["background"][b], lp["colour_0"][b], lp["colour_1"][b] if two else None)
        objs = [Obj(SHAPES[top[f"shape_{i}"][b]], COLOUR_NAMES[colours[i + 1]], SIZES[top[f"size_{i}"][b]])
                for i in range(1 + two)]
        if two:
            scenes.append(Scene(COLOUR_NAMES[colours[0]], tuple(objs), NORMAL_RELATIONS[top["relation"][b]]))
        else:
            obj = dataclasses.replace(objs[0], position=POSITIONS[top["position"][b]])
            scenes.append(Scene(COLOUR_NAMES[colours[0]], (obj,)))
    return scenes


# ----------------------------------------------------------------------------------------- save / load
def save_judge(module: Judge, params, out_dir: str, dtype=np.float16) -> None:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` (param paths joined with ".", cast
    to ``dtype``)."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = {".".join(k): np.ascontiguousarray(np.asarray(v, dtype))
            for k, v in flatten_dict(jax.device_get(params)).items()}
    save_file(flat, os.path.join(out_dir, "model.safetensors"), metadata={"format": "np"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(module.config.to_dict(), f, indent=2)


def _read_config(out_dir: str) -> JudgeConfig:
    path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"{out_dir!r} has no config.json, so it is not a saved judge.")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("model_type") != MODEL_TYPE:
            raise InputError(f"model_type is {d.get('model_type')!r}, not {MODEL_TYPE!r}")
        return JudgeConfig.from_dict(d)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not a valid judge config ({e}).") from None


def load_judge(out_dir: str) -> tuple[Judge, dict]:
    """(Judge module, float32 params) saved by `save_judge` in ``out_dir``. Raises ValueError for a missing
    folder, a missing or malformed config.json, or a missing file / missing, unexpected or mis-shaped tensors."""
    from safetensors.numpy import load_file

    if not os.path.isdir(out_dir):
        raise InputError(f"judge folder {out_dir!r} does not exist.")
    module = Judge(_read_config(out_dir))
    path = os.path.join(out_dir, "model.safetensors")
    if not os.path.isfile(path):
        raise InputError(f"{out_dir!r} has no model.safetensors.")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise InputError(f"{path} cannot be read as safetensors ({e}).") from None
    s = module.config.image_size
    expected = {".".join(k): v for k, v in flatten_dict(jax.eval_shape(
        module.init, jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3), jnp.float32))["params"]).items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if missing or extra or wrong:
        raise InputError(f"{path} does not match its config: missing {missing}, unexpected {extra}, "
                         f"wrong shapes {wrong}.")
    params = unflatten_dict({tuple(k.split(".")): jnp.asarray(v, jnp.float32) for k, v in tensors.items()})
    return module, params


# --------------------------------------------------------------------------------------------- predict
@functools.lru_cache(maxsize=8)
def _apply(config: JudgeConfig):
    return jax.jit(lambda params, x: Judge(config).apply({"params": params}, x))


def _to_float(images: np.ndarray, size: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images must be [N,H,W,3], got shape {images.shape}.")
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else np.clip(images.astype(np.float32), 0, 1)
    if images.shape[1:3] != (size, size):
        x = np.asarray(jax.image.resize(x, (len(x), size, size, 3), "linear", antialias=True))
    return x


def predict(module: Judge, params, images, batch_size: int = 256) -> tuple[list[Scene], np.ndarray]:
    """images uint8 [N,H,W,3] or float [N,H,W,3] in [0,1] (clipped to it; resized to the judge's image_size
    if H, W differ) -> (N normalized predicted `Scene`, features float32 [N,feature_dim]); jitted, in batches of
    min(batch_size, N) (the last one zero-padded, so one compile per batch size)."""
    x = _to_float(images, module.config.image_size)
    apply, scenes, feats = _apply(module.config), [], []
    batch_size = max(1, min(batch_size, len(x)))
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], np.float32)])
        logits, f = jax.device_get(apply(params, padded))
        scenes += decode_predictions({k: v[:len(chunk)] for k, v in logits.items()})
        feats.append(np.asarray(f[:len(chunk)], np.float32))
    dim = module.config.feature_dim
    return scenes, (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32))
