"""Differentiable image preprocessing for reward models: bicubic resize, centre crop, CLIP normalisation.

Resizing is a product with two dense interpolation matrices (rows: output pixels, columns: input pixels),
built in numpy from the static shapes, so it is exact, differentiable and cheap at 512 -> 224. The matrices
reproduce PyTorch's ``F.interpolate(mode="bicubic", align_corners=False)``:

- ``antialias=True`` (the default here): PIL-style filter with a = -0.5 whose support widens by the
  downscale factor, so high frequencies are averaged away instead of aliased;
- ``antialias=False`` (what the RG-LCD reference did): cubic convolution with a = -0.75 on the 4 nearest
  input pixels. Downscaling 512 -> 224 then samples the image sparsely, which lets high-frequency
  artefacts pass unseen by the reward model (docs/algorithm.md section 3).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """[out_size, in_size] float32 matrix M with ``resized = M @ signal`` along one axis (torch-exact)."""
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    if antialias:
        support = 2.0 * scale if scale >= 1.0 else 2.0
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            w = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
            m[i, lo:hi] = w / w.sum()
    else:
        src = (np.arange(out_size) + 0.5) * scale - 0.5
        base = np.floor(src)
        t = src - base
        for k, offset in enumerate((-1, 0, 1, 2)):
            w = _cubic(t - offset, -0.75)
            idx = np.clip(base + offset, 0, in_size - 1).astype(int)
            np.add.at(m, (np.arange(out_size), idx), w)
    return m.astype(np.float32)


def resize_bicubic(images, height: int, width: int, antialias: bool = True):
    """images [B,H,W,C] float -> [B,height,width,C] float32 (differentiable; matches torch bicubic)."""
    _, h, w, _ = images.shape
    x = images.astype(jnp.float32)
    if h != height:
        x = jnp.einsum("oh,bhwc->bowc", resize_matrix(h, height, antialias), x)
    if w != width:
        x = jnp.einsum("ow,bhwc->bhoc", resize_matrix(w, width, antialias), x)
    return x


def resize_shorter_and_crop(images, size: int = 224, antialias: bool = True):
    """torchvision's Resize(size) (shorter side, bicubic) then CenterCrop(size): [B,H,W,C] -> [B,size,size,C]."""
    _, h, w, _ = images.shape
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    x = resize_bicubic(images, nh, nw, antialias)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return x[:, top:top + size, left:left + size, :]


def clip_normalize(images):
    """[B,H,W,3] in [0,1] -> (x - CLIP mean) / CLIP std, float32."""
    return (images.astype(jnp.float32) - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def reward_pixels(images, size: int = 224, antialias: bool = True):
    """Decoded images [B,H,W,3] in [0,1] -> the reward models' input [B,size,size,3], CLIP-normalised."""
    return clip_normalize(resize_shorter_and_crop(images, size, antialias))
