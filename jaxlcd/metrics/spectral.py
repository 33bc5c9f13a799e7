"""High-frequency spectral energy of images: the reward-hacking signal (adversarial high-frequency patterns raise a
reward model's score while the image degrades; docs/algorithm.md). Used by the demo's evaluation and the training
run's reward-hacking monitor (`jaxlcd.distill.quality`)."""
from __future__ import annotations

import numpy as np

from jaxlcd.errors import InputError


def high_frequency_energy(images: np.ndarray, cutoff: float = 0.25) -> float:
    """Mean over N images of the share of spectral power above radial frequency ``cutoff`` (cycles/pixel;
    Nyquist is 0.5, so the default 0.25 is half of Nyquist).

    images: uint8 [N,H,W,3] (scaled to [0,1]) or float [N,H,W,3] in [0,1]. Per image and channel the mean
    is subtracted and the 2-D FFT power |F|^2 taken; power is summed over channels, and the share at
    sqrt(fx^2 + fy^2) > cutoff is returned (0 for a constant image). A float in [0,1]: a checkerboard
    is ~1, a smooth gradient ~0; blurry images score lower than sharp ones.
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise InputError(f"images must be [N,H,W,C], got shape {x.shape}.")
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2).sum(-1)  # [N,H,W]
    fy, fx = np.fft.fftfreq(x.shape[1]), np.fft.fftfreq(x.shape[2])
    high = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) > cutoff
    total = power.sum(axis=(1, 2))
    shares = np.where(total > 0, (power * high).sum(axis=(1, 2)) / np.maximum(total, 1e-300), 0.0)
    return float(shares.mean())
