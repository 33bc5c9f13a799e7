"""Image-text metrics for evaluation: the reward models of `jaxlcd.rewards`, without gradients, each with the
reference scorer's preprocessing and scale.

| metric      | per image                          | reported                 | preprocessing (host, PIL bicubic)      |
|-------------|------------------------------------|--------------------------|----------------------------------------|
| clipscore   | 100 * cosine                       | max(mean, 0) (torchmetrics ``CLIPScore``) | transformers ``CLIPProcessor`` |
| hpsv2.1     | 100 * cosine                       | mean (HPSv2 benchmark, per style and overall) | open_clip ``preprocess_val``  |
| pickscore   | logit_scale * cosine (~100 x)      | mean (PickScore's card)  | transformers ``CLIPProcessor``         |
| imagereward | (raw - mean) / std, not capped     | mean (``ImageReward.score``) | ImageReward's torchvision transform |
| aesthetic   | the LAION linear head              | mean                     | OpenAI CLIP's torchvision transform     |

Preprocessing resizes the shorter side to the model's size with PIL bicubic (what both torchvision on PIL images and
transformers' slow image processor call), longer side ``int(size * long / short)``, then crops the centre: offsets
``round((h - size) / 2)`` for the torchvision scorers, ``(h - size) // 2`` for the transformers ones (they differ by
one pixel when the margin is odd). The model then sees exactly that crop (jaxlcd's in-graph resize of a
``size``-square image is the identity).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from jaxlcd.errors import InputError

# metric (a `jaxlcd.rewards` name) -> its reference's centre-crop convention
METRICS = {"clipscore": "transformers", "hpsv2.1": "torchvision", "pickscore": "transformers",
           "imagereward": "torchvision", "aesthetic": "torchvision"}


def resize_crop(image: np.ndarray, size: int, convention: str) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1]: PIL bicubic shorter side to ``size``, centre crop."""
    img = Image.fromarray(image)
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    if convention == "torchvision":
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    else:
        top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(img, np.float32)[top:top + size, left:left + size] / np.float32(255.0)


class Scorer:
    """``Scorer(metric, path)(images uint8 [N, H, W, 3], prompts [N]) -> float64 [N]`` per-image scores, and
    ``.aggregate(scores) -> float`` as the reference reports them (see the module docstring)."""

    def __init__(self, metric: str, path: str, batch_size: int = 16, allow_pickle: bool = False):
        import jax

        from jaxlcd.rewards import load_reward
        from jaxlcd.rewards.registry import imagereward_model

        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)} (or fid)")
        self.metric, self.batch_size, self.convention = metric, batch_size, METRICS[metric]
        if metric == "imagereward":
            import jax.numpy as jnp
            self.model = imagereward_model(metric, path, jnp.float32, True, allow_pickle, cap=None)
        else:
            self.model = load_reward(metric, path, allow_pickle=allow_pickle)
        scale = {"clipscore": 100.0, "hpsv2.1": 100.0, "pickscore": self.model.logit_scale}.get(metric, 1.0)
        self._score = jax.jit(lambda p, x, t: self.model.score(p, x, t) * scale)

    def __call__(self, images, prompts) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(prompts):
            raise InputError(f"{self.metric}: wants uint8 images [N, H, W, 3] and N prompts, got "
                             f"{images.dtype} {images.shape} and {len(prompts)} prompts")
        size, out = self.model.image_size, []
        for start in range(0, len(images), self.batch_size):
            chunk = [resize_crop(im, size, self.convention) for im in images[start:start + self.batch_size]]
            texts = list(prompts[start:start + self.batch_size])
            n = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - n)    # one compiled shape; the padding is dropped
            texts += [texts[-1]] * (self.batch_size - n)
            scores = self._score(self.model.params, np.stack(chunk), self.model.tokenize(texts))
            out.append(np.asarray(scores, np.float64)[:n])
        return np.concatenate(out) if out else np.zeros((0,))

    def aggregate(self, scores) -> float:
        mean = float(np.mean(scores))
        return max(mean, 0.0) if self.metric == "clipscore" else mean
