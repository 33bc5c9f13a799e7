"""Frechet Inception Distance: FID Inception features in JAX, the distance, and the statistics files other tools use.

    feats = inception_features(images_uint8_nhwc, "fid_inception.safetensors")   # [N, 2048] float32
    fid = frechet_distance(feats, ref_feats)          # or frechet_distance(save_statistics(...) or (mu, sigma), ...)

Weights: the state dict of torch-fidelity's ``FeatureExtractorInceptionV3`` as safetensors (its parameter names),
converted once from the released pickle with
``python -m jaxlcd.rewards.convert --allow-pickle --kind fid_inception pt_inception-2015-12-05-6726825d.pth OUT``
(pytorch-fid's file has the same keys; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` converts the
same way).

Resize protocol (images that are not 299 px): as torch-fidelity, inside the network: TF 1.x bilinear resize to 299
without antialiasing, then ``(x - 128) / 128`` (`jaxlcd.models.inception`). The features equal torch-fidelity's to
float32 tolerance at any input size (tested at 64, 299 and 320 px on random weights). pytorch-fid resizes with
``F.interpolate(bilinear, align_corners=False)`` and scales by ``x / 127.5 - 1``, and clean-fid resizes with PIL
bicubic before the network, so their FIDs differ from torch-fidelity's (and jaxlcd's) by small amounts; that
difference is not measured here.
"""
from __future__ import annotations

import functools

import numpy as np

from jaxlcd.errors import InputError


@functools.lru_cache(maxsize=2)
def _model(weights_path: str):
    """(jitted apply, params) for a safetensors weights file; cached per path."""
    import jax
    import jax.numpy as jnp

    from jaxlcd.models.inception import FIDInceptionV3
    from jaxlcd.weights import tables
    from jaxlcd.weights.io import read_tensor_file

    module = FIDInceptionV3()
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3), jnp.uint8))["params"]
    state = {k: v for k, v in read_tensor_file(weights_path).items() if not k.endswith("num_batches_tracked")}
    params = tables.pt_to_flax(state, tables.build_table(shapes), shapes, what=f"FID Inception weights {weights_path}")
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
    return apply, jax.device_put(params)


def inception_features(images, weights_path: str, batch_size: int = 50) -> np.ndarray:
    """Pool features of the FID Inception network.

    images: uint8 [N, H, W, 3] (NHWC, RGB; any H, W; a list of such arrays of one size works too).
    Returns float32 [N, 2048]. Batches of ``batch_size`` (the last one padded, so one compiled program serves all).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"inception_features wants uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    apply, params = _model(str(weights_path))
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
        out.append(np.asarray(apply(params, chunk))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64 of features [N, D] (N >= 2), as pytorch-fid and torch-fidelity compute them."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise InputError(f"FID statistics need at least 2 feature vectors [N, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path: str, mu, sigma) -> None:
    """Write ``mu``/``sigma`` as an ``.npz`` with the keys pytorch-fid and clean-fid read (``mu``, ``sigma``)."""
    np.savez(path, mu=np.asarray(mu), sigma=np.asarray(sigma))


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid / clean-fid ``.npz`` statistics file."""
    try:
        with np.load(path) as f:
            return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path} is not an FID statistics file with 'mu' and 'sigma' arrays ({e})") from None


def frechet_distance(a, b) -> float:
    """FID between two feature sets [N, D] or two ``(mu, sigma)`` pairs (or one of each).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, the trace of the square root taken from the
    eigenvalues of ``S_a S_b`` as torch-fidelity does (robust where ``scipy.linalg.sqrtm`` of a singular product is
    not: fewer samples than dimensions)."""
    (mu1, s1), (mu2, s2) = (x if isinstance(x, tuple) else statistics(x) for x in (a, b))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise InputError(f"FID of features of different widths: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(s1.dot(s2)).astype("complex128")).real)
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
