"""Evaluate models on a prompt set: generate every row (`jaxlcd.metrics.generate`), score it with the chosen metrics
(`jaxlcd.metrics.scores`, `jaxlcd.metrics.fid`), write results and pictures (`jaxlcd.metrics.report`).

FID reference (``fid_ref``): a ``.npz`` of ``mu``/``sigma`` (pytorch-fid / clean-fid layout, any resolution they were
made at), or a folder of images. A folder's images are resized (shorter side, PIL bicubic) and centre-cropped to the
generated images' size before the Inception network, as the COCO-30k protocols of GigaGAN and DMD2 do; their
statistics are cached in ``OUT/fid_ref-<name>-<size>px-<n>.npz`` (delete it when the folder changes).
"""
from __future__ import annotations

import glob
import os
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from jaxlcd.errors import InputError
from jaxlcd.metrics import fid as fid_lib
from jaxlcd.metrics.generate import Row, generate_row, load_images, row_speed
from jaxlcd.metrics.prompts import Prompt

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_inputs(rewards: Mapping[str, str], fid_ref: Optional[str], inception: Optional[str]) -> None:
    """One sentence for what cannot be evaluated, before any image is generated."""
    from jaxlcd.metrics.scores import METRICS

    for name, path in rewards.items():
        if name not in METRICS:
            raise InputError(f"unknown metric {name!r} in --reward; use one of {', '.join(METRICS)}")
        if not os.path.exists(path):
            raise InputError(f"--reward {name}={path}: {path!r} does not exist")
    if fid_ref is not None:
        if not inception or not os.path.isfile(inception):
            raise InputError(f"--fid-ref needs --inception, the FID Inception weights as safetensors "
                             f"({inception!r} is not a file); convert pt_inception-2015-12-05-6726825d.pth with "
                             "python -m jaxlcd.rewards.convert --allow-pickle --kind fid_inception")
        if not os.path.exists(fid_ref):
            raise InputError(f"--fid-ref {fid_ref!r} does not exist (a folder of images or an .npz of mu/sigma)")


def reference_statistics(fid_ref: str, inception: str, size: int, out_dir: str) -> tuple:
    """(mu, sigma) of the FID reference: from the .npz, or computed once from a folder of images at ``size`` px."""
    if os.path.isfile(fid_ref):
        return fid_lib.load_statistics(fid_ref)
    files = sorted(f for f in glob.glob(os.path.join(fid_ref, "**", "*"), recursive=True)
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if len(files) < 2:
        raise InputError(f"--fid-ref folder {fid_ref!r} holds {len(files)} images; FID needs at least 2")
    cache = os.path.join(out_dir, f"fid_ref-{os.path.basename(os.path.normpath(fid_ref))}-{size}px-{len(files)}.npz")
    if os.path.isfile(cache):
        return fid_lib.load_statistics(cache)
    from jaxlcd.metrics.scores import resize_crop

    feats = []
    for start in range(0, len(files), 256):
        chunk = []
        for f in files[start:start + 256]:
            try:
                with Image.open(f) as img:
                    chunk.append(np.round(resize_crop(np.asarray(img.convert("RGB")), size, "torchvision") * 255))
            except OSError as e:
                raise InputError(f"--fid-ref image {f} cannot be read ({e})") from None
        feats.append(fid_lib.inception_features(np.stack(chunk).astype(np.uint8), inception))
    stats = fid_lib.statistics(np.concatenate(feats))
    fid_lib.save_statistics(cache, *stats)
    return stats


def _group_means(values: np.ndarray, groups: Sequence[str], aggregate) -> dict:
    """{group: aggregate(scores of its prompts)} when there are several groups (HPSv2 styles, Parti categories)."""
    names = list(dict.fromkeys(groups))
    if len(names) < 2:
        return {}
    return {g: aggregate([v for v, h in zip(values, groups) if h == g]) for g in names}


def evaluate(rows: Sequence[Row], prompts: Sequence[Prompt], out_dir: str, *, seed: int = 0, batch_size: int = 8,
             rewards: Optional[Mapping[str, str]] = None, fid_ref: Optional[str] = None,
             inception: Optional[str] = None, allow_pickle: bool = False, chunk: int = 512) -> Optional[dict]:
    """Generate, score and report every row; returns the results (None on processes other than 0). Scoring reads
    each row's images ``chunk`` at a time (a COCO-30k row at 512 px would be 24 GB at once)."""
    import jax

    from jaxlcd import parallel, paths
    from jaxlcd.metrics import report
    from jaxlcd.metrics.scores import Scorer
    from jaxlcd.pipeline import load_pipeline

    rewards = dict(rewards or {})
    check_inputs(rewards, fid_ref, inception)
    os.makedirs(out_dir, exist_ok=True)
    texts, pipe, loaded = [p.text for p in prompts], None, None
    for row in rows:
        if loaded != (row.path, row.lora):   # a model's step counts share one loaded pipeline
            key = "--teacher" if row.sampler == "ddim" else "--model"
            pipe = load_pipeline(paths.resolve_model_path(row.path, key),
                                 lora=paths.resolve_model_path(row.lora, "--lora") if row.lora else None)
            loaded = (row.path, row.lora)
        generate_row(pipe, row, texts, out_dir, seed, batch_size, jax.process_index(), jax.process_count())
    del pipe
    parallel.barrier("eval-generated")
    if jax.process_index() != 0:
        return None
    groups = [p.group for p in prompts]
    scorers = {name: Scorer(name, path, allow_pickle=allow_pickle) for name, path in rewards.items()}
    results = {"prompts": len(prompts), "seed": seed, "groups": list(dict.fromkeys(groups)), "rows": []}
    grid_images, reference, fid_batch = {}, None, min(50, len(prompts), chunk)   # one compiled shape for every row
    for row in rows:
        scores, features = {name: [] for name in scorers}, []
        grid_images[row.name] = load_images(out_dir, row, len(prompts), 0, report.GRID_COLUMNS)
        for start in range(0, len(prompts), chunk):
            images = load_images(out_dir, row, len(prompts), start, start + chunk)
            for name, scorer in scorers.items():
                scores[name].append(scorer(images, texts[start:start + chunk]))
            if fid_ref is not None:
                features.append(fid_lib.inception_features(images, inception, batch_size=fid_batch))
        entry = {"name": row.name, "model": row.model, "path": row.path, "lora": row.lora, "sampler": row.sampler,
                 "steps": row.steps,
                 "guidance": row.guidance, "images_per_s": row_speed(out_dir, row), "metrics": {}, "by_group": {}}
        for name, scorer in scorers.items():
            values = np.concatenate(scores[name])
            entry["metrics"][name] = scorer.aggregate(values)
            by_group = _group_means(values, groups, scorer.aggregate)
            if by_group:
                entry["by_group"][name] = by_group
        if fid_ref is not None:
            if reference is None:
                reference = reference_statistics(fid_ref, inception, grid_images[row.name].shape[1], out_dir)
            entry["metrics"]["fid"] = fid_lib.frechet_distance(np.concatenate(features), reference)
        results["rows"].append(entry)
    report.write(results, grid_images, rows, prompts, out_dir)
    return results
