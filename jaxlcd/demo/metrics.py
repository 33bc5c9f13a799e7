"""Evaluation metrics of the demo world (pure numpy / scipy): prompt accuracy of judged scenes and the Frechet
distance between feature sets (FID with the judge as the feature network). The spectral measure it also reports is
the product's (`jaxlcd.metrics.spectral`)."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.linalg

from jaxlcd.demo.shapes import Scene, parse_caption
from jaxlcd.errors import InputError

log = logging.getLogger(__name__)


def _pairs(predicted: list[Scene], prompts: list[str]) -> list[tuple[Scene, Scene]]:
    if len(predicted) != len(prompts):
        raise InputError(f"{len(predicted)} predicted scenes for {len(prompts)} prompts; they must match.")
    return [(parse_caption(p).normalized(), s.normalized()) for s, p in zip(predicted, prompts)]


def scene_accuracy(predicted: list[Scene], prompts: list[str]) -> float:
    """Share (float in [0,1]) of the N ``prompts`` (captions) whose parsed, normalized scene equals the
    normalized ``predicted[i]`` (N `Scene`): every stated attribute right. NaN for N = 0."""
    pairs = _pairs(predicted, prompts)
    return float(np.mean([want == got for want, got in pairs])) if pairs else float("nan")


def attribute_accuracy(predicted: list[Scene], prompts: list[str]) -> dict[str, float]:
    """Per-attribute accuracy of N predicted `Scene` against N prompts, on normalized scenes:

    ``count`` and ``background`` per prompt; ``shape`` / ``colour`` / ``size`` per prompt object, compared
    with the predicted object in the same slot (wrong when that slot is missing); ``position`` over
    one-object prompts and ``relation`` over two-object prompts (wrong when the object count is wrong).
    Each value is a float in [0,1], NaN when no prompt has that attribute.
    """
    hits: dict[str, list[bool]] = {k: [] for k in ("count", "background", "shape", "colour", "size",
                                                   "position", "relation")}
    for want, got in _pairs(predicted, prompts):
        same_count = len(want.objects) == len(got.objects)
        hits["count"].append(same_count)
        hits["background"].append(want.background == got.background)
        for i, obj in enumerate(want.objects):
            other = got.objects[i] if i < len(got.objects) else None
            for attr in ("shape", "colour", "size"):
                hits[attr].append(other is not None and getattr(obj, attr) == getattr(other, attr))
        if want.relation is None:
            hits["position"].append(same_count and want.objects[0].position == got.objects[0].position)
        else:
            hits["relation"].append(same_count and want.relation == got.relation)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to feats_a [N,D] and feats_b [M,D] (float; N, M >= 2):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), computed in float64. When the product's square
    root is singular / non-finite, ``eps`` * I is added to both covariances (the usual FID fallback);
    the real part of sqrtm is taken. Returns a float >= ~0."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise InputError(f"feature sets must be [N,D] and [M,D] with N, M >= 2; got {a.shape} and {b.shape}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # rank-deficient covariances (N < D) are expected; the result is checked below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        log.warning("frechet_distance: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(len(cov_a)) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
