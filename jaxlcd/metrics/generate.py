"""Image generation for evaluation: every row (a model at a step count, or the teacher with DDIM + CFG) draws the
same prompts from the same initial latents, batched over this process's devices, resumably.

Image i of every row starts from ``normal(fold_in(PRNGKey(seed), i))`` latents (and, for multistep LCM, the fresh
noise ``normal(fold_in(PRNGKey(seed + 1), i))``), so rows differ only by model and sampler, and a rerun or another
batch size gives the same image i. Images are PNGs ``OUT/images/ROW/00000.png``; a rerun generates only the missing
ones. With several processes, process p generates the indices ``i % process_count == p``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Row:
    """One evaluated configuration: ``sampler`` "lcm" (model = an LCM student folder, or a base with ``lora``) or
    "ddim" (a teacher)."""
    name: str
    path: str
    sampler: str
    steps: int
    guidance: float
    model: str = ""   # the model's display name (rows of one model share it)
    lora: str = ""    # a UNet LoRA file or folder applied to the model (an LCM-LoRA)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)


def make_rows(models: Sequence[str], steps: Sequence[int], lcm_guidance: float, teacher: Optional[str] = None,
              teacher_steps: int = 50, guidance: float = 7.5, lora: str = "") -> list[Row]:
    """The teacher row (if any) first, then one row per model and step count (each model with ``lora`` applied,
    when given); names are unique."""
    rows = [Row(f"teacher ddim{teacher_steps}", teacher, "ddim", teacher_steps, guidance, "teacher")] if teacher else []
    names = [os.path.basename(os.path.normpath(m)) or m for m in models]
    suffix = f"+{os.path.basename(os.path.normpath(lora))}" if lora else ""
    for i, (model, name) in enumerate(zip(models, names)):
        if names.count(name) > 1:
            name = f"{name}#{i}"
        name += suffix
        rows += [Row(f"{name} lcm{s}", model, "lcm", s, lcm_guidance, name, lora) for s in steps]
    return rows


def image_path(out_dir: str, row: Row, index: int) -> str:
    return os.path.join(out_dir, "images", row.slug, f"{index:05d}.png")


def load_images(out_dir: str, row: Row, count: int, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """uint8 [n, H, W, 3]: images ``start`` to ``min(stop, count)`` of a generated row of ``count``."""
    stop = count if stop is None else min(stop, count)
    return np.stack([np.asarray(Image.open(image_path(out_dir, row, i)).convert("RGB")) for i in range(start, stop)])


def _latents(seed: int, indices, shape) -> np.ndarray:
    import jax

    key = jax.random.PRNGKey(seed)
    draw = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, np.float32))
    return np.asarray(draw(np.asarray(indices, np.uint32)))


def generate_row(pipe, row: Row, prompts: Sequence[str], out_dir: str, seed: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> dict:
    """Generate this process's missing images of ``row``; returns {"generated": n, "images_per_s": float | None}
    (images/s over the batches after the first, which includes compilation)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from tqdm import tqdm

    from jaxlcd import pipeline as pl
    from jaxlcd.diffusion import schedule

    mine = [i for i in range(len(prompts)) if i % process_count == process_index]
    todo = [i for i in mine if not os.path.isfile(image_path(out_dir, row, i))]
    os.makedirs(os.path.dirname(image_path(out_dir, row, 0)), exist_ok=True)
    devices = jax.local_devices()
    batch = -(-batch_size // len(devices)) * len(devices)
    split = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
    timesteps = None
    if row.sampler == "lcm":
        pl.require_lcm(pipe)
        cfg = pipe.scheduler_config
        timesteps = schedule.lcm_timesteps(row.steps, int(cfg.get("original_inference_steps", 50)),
                                           int(cfg.get("num_train_timesteps", 1000)))
    bar = tqdm(total=len(todo), desc=row.name, unit="img", dynamic_ncols=True)
    timed_images, timed_s = 0, 0.0
    for b, start in enumerate(range(0, len(todo), batch)):
        idx = todo[start:start + batch]
        padded = idx + [idx[-1]] * (batch - len(idx))
        texts = [prompts[i] for i in padded]
        t0 = time.perf_counter()
        z = jax.device_put(_latents(seed, padded, pipe.latent_shape), split)
        if row.sampler == "lcm":
            noises = None
            if len(timesteps) > 1:
                noise = _latents(seed + 1, padded, (len(timesteps) - 1,) + pipe.latent_shape)
                noises = jax.device_put(np.swapaxes(noise, 0, 1), NamedSharding(split.mesh, P(None, "data")))
            _, images = pl.sample_lcm(pipe, texts, guidance=row.guidance, latents=z, noises=noises,
                                      timesteps=timesteps)
        else:
            _, images = pl.sample_ddim(pipe, texts, num_steps=row.steps, guidance=row.guidance, latents=z)
        images = np.asarray(jax.device_get(images))   # sharded over this process's devices only: local on N hosts
        if b > 0:
            timed_images, timed_s = timed_images + len(padded), timed_s + time.perf_counter() - t0
        for i, image in zip(idx, images):
            Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(image_path(out_dir, row, i))
        bar.update(len(idx))
    bar.close()
    rate = timed_images / timed_s if timed_s else None
    timing = os.path.join(out_dir, "images", row.slug, f"timing-{process_index}.json")
    if rate is not None or not os.path.isfile(timing):
        with open(timing, "w") as f:
            json.dump({"images_per_s": rate, "batch": batch, "devices": len(devices)}, f)
    return {"generated": len(todo), "images_per_s": rate}


def row_speed(out_dir: str, row: Row) -> Optional[float]:
    """images/s of a row summed over the processes that timed it (None when no run timed a second batch)."""
    folder = os.path.join(out_dir, "images", row.slug)
    rates = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith("timing-"):
            with open(os.path.join(folder, name)) as f:
                rates.append(json.load(f)["images_per_s"])
    rates = [r for r in rates if r]
    return float(sum(rates)) if rates else None
