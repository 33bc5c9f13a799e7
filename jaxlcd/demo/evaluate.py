"""Evaluate a demo-world run: teacher DDIM-50 vs the distilled students at 1, 2 and 4 steps, on held-out prompts
(the CLI is ``python -m jaxlcd.eval --workdir DIR [--num-prompts 128] [--steps 1,2,4]``).

Rows: rendered ground truth ("real"), the teacher (DDIM, CFG) and every student exported under DIR (the run itself
and ``DIR/baselines/*``) at each LCM step count. Columns: judge accuracy (every attribute of the prompt right),
training-RM and held-out-RM scores (cosine), demo FID (judge features, Frechet distance to renders of the same held-out
scenes), high-frequency energy (share of spectral power above 0.25 cycles/pixel; rises when a student hacks the
reward with texture) and images/s (after compilation, at batch 64, or all prompts when their number is not a
multiple of 64). Every row uses the same prompts, the same initial latents and the same LCM noise. Writes
DIR/eval/results.json, results.md and grids/*.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from jaxlcd import demo
from jaxlcd.demo import metrics as eval_metrics
from jaxlcd.demo import shapes
from jaxlcd.demo import judge as judge_lib
from jaxlcd.metrics.spectral import high_frequency_energy
from jaxlcd.pipeline import load_pipeline, sample_ddim, sample_lcm
from jaxlcd.rewards import load_reward
from jaxlcd.sample import make_grid, to_uint8
from jaxlcd.errors import InputError

GRID_PROMPTS = 8  # prompts shown per row of the side-by-side grid
EVAL_CHUNK = 64  # prompts per sampler call (images/s is measured at this batch size)
COLUMNS = (("judge_accuracy", "judge acc", "{:.3f}"), ("train_rm", "train RM", "{:.4f}"),
           ("heldout_rm", "held-out RM", "{:.4f}"), ("fid", "demo FID", "{:.2f}"),
           ("hf_energy", "HF energy", "{:.4f}"), ("images_per_s", "images/s", "{:.1f}"))


@dataclasses.dataclass(frozen=True)
class Row:
    """One evaluated sampler: ``name`` (table label), ``pipeline`` folder (None = rendered ground truth),
    ``sampler`` "ddim" | "lcm" | "real", ``steps``."""
    name: str
    pipeline: Optional[str]
    sampler: str
    steps: int


def _run_label(run_dir: str) -> str:
    """"LCM", "RG-LCM (direct: <reward>)" or "RG-LCM (LRM)" from a run's config.json."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("lrm", {}).get("enabled"):
        return "RG-LCM (LRM)"
    return f"RG-LCM (direct: {cfg['reward']['name']})" if cfg.get("reward", {}).get("name") else "LCM"


def find_rows(workdir: str, steps: Sequence[int], teacher_steps: int = 50) -> list[Row]:
    """The rows for ``workdir``: real, teacher DDIM, then each exported student (workdir, workdir/baselines/*)."""
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise InputError(f"{workdir!r} holds no jaxlcd run (no config.json); pass the --workdir of a finished run")
    with open(os.path.join(workdir, "config.json")) as f:
        teacher = json.load(f)["teacher"]
    rows = [Row("real (rendered)", None, "real", 0), Row(f"teacher DDIM-{teacher_steps}", teacher, "ddim", teacher_steps)]
    base = os.path.join(workdir, "baselines")
    runs = [os.path.join(base, d) for d in sorted(os.listdir(base))] if os.path.isdir(base) else []
    for run in runs + [workdir]:
        student = os.path.join(run, "export", "student")
        if os.path.isfile(os.path.join(student, "model_index.json")):
            rows += [Row(f"{_run_label(run)} {n}-step", student, "lcm", n) for n in steps]
    if len(rows) == 2:
        raise InputError(f"no exported student in {workdir!r} (export/student); train it first")
    return rows


def generate(row: Row, prompts: list[str], scenes, seed: int, guidance: dict) -> tuple[np.ndarray, float]:
    """Images [N,64,64,3] float32 in [0,1] for ``row`` and its images/s. The prompts go through in chunks of
    EVAL_CHUNK (all at once when N is not a multiple of it): the first chunk compiles and is not timed, the others
    are (a single chunk runs twice). The latents and LCM noise are drawn for all N first, so chunking changes nothing."""
    if row.sampler == "real":
        rng = np.random.default_rng(seed + 1)
        fresh = [dataclasses.replace(s, layout_seed=int(rng.integers(2**31))) for s in scenes]
        return np.stack([shapes.render(s) for s in fresh]).astype(np.float32) / 255.0, float("nan")
    pipe = load_pipeline(row.pipeline)
    n = len(prompts)
    # numpy draws: every jax.random shape is a new XLA:CPU compile of threefry (~4 s each)
    z = np.random.default_rng(seed).standard_normal((n,) + pipe.latent_shape, np.float32)
    noises = (np.random.default_rng(seed + 1).standard_normal((row.steps - 1,) + z.shape, np.float32)
              if row.sampler == "lcm" and row.steps > 1 else None)

    def run(sl: slice) -> np.ndarray:
        if row.sampler == "ddim":
            out = sample_ddim(pipe, prompts[sl], row.steps, guidance["ddim"], latents=z[sl])
        else:
            out = sample_lcm(pipe, prompts[sl], row.steps, guidance["lcm"], latents=z[sl],
                             noises=None if noises is None else noises[:, sl])
        return np.asarray(jax.block_until_ready(out)[1], np.float32)

    chunk = EVAL_CHUNK if n % EVAL_CHUNK == 0 else n
    slices = [slice(i, i + chunk) for i in range(0, n, chunk)]
    images = [run(slices[0])]
    t0 = time.perf_counter()
    timed = [run(sl) for sl in slices[1:] or slices[:1]]
    rate = chunk * len(timed) / (time.perf_counter() - t0)
    return np.concatenate(images + timed[:len(slices) - 1]), rate


def _labelled_grid(named_images: list[tuple[str, np.ndarray]], label_width: int = 190) -> Image.Image:
    """One row per (name, images [k,H,W,3] float) with the name written on the left."""
    strips = [np.concatenate(list(to_uint8(imgs)), axis=1) for _, imgs in named_images]
    h, w = strips[0].shape[:2]
    canvas = Image.new("RGB", (label_width + w, h * len(strips)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, ((name, _), strip) in enumerate(zip(named_images, strips)):
        canvas.paste(Image.fromarray(strip), (label_width, i * h))
        draw.text((4, i * h + h // 2 - 6), name, fill="black")
    return canvas


def format_table(results: list[dict]) -> str:
    """Markdown table of the result rows."""
    head = "| sampler | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in results:
        cells = ["-" if r[k] is None or not np.isfinite(r[k]) else fmt.format(r[k]) for k, _, fmt in COLUMNS]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_guidance(workdir: str) -> dict:
    """{"ddim": teacher CFG scale, "lcm": LCM guidance scale} of the run in ``workdir``: its config's
    ``demo.ddim_guidance`` / ``demo.lcm_guidance`` when set, else SD's 7.5 and LCM's 8.5."""
    with open(os.path.join(workdir, "config.json")) as f:
        cfg_demo = json.load(f).get("demo", {})
    return {"ddim": cfg_demo.get("ddim_guidance") or 7.5, "lcm": cfg_demo.get("lcm_guidance") or 8.5}


def evaluate(workdir: str, num_prompts: int = 128, steps: Sequence[int] = (1, 2, 4), seed: int = 0,
             guidance: Optional[dict] = None, prompt_seed: int = 0) -> list[dict]:
    """Evaluate every row of `find_rows` on ``num_prompts`` held-out prompts (``guidance``: {"ddim", "lcm"} scales,
    default `run_guidance`); writes ``workdir/eval``."""
    rows = find_rows(workdir, steps)
    guidance = guidance or run_guidance(workdir)
    scenes = shapes.eval_scenes(num_prompts, prompt_seed)
    prompts = [shapes.caption(s, template=0) for s in scenes]
    judge, judge_params = judge_lib.load_judge(demo.demo_path("judge"))
    train_rm = load_reward("clipscore", demo.demo_path("clip"))
    heldout_rm = load_reward("clipscore", demo.demo_path("scorer"))
    reference = np.stack([shapes.render(s) for s in scenes]).astype(np.float32) / 255.0
    _, ref_feats = judge_lib.predict(judge, judge_params, reference)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
    results, strips = [], []
    bar = tqdm(rows, desc="eval", unit="row", dynamic_ncols=True)
    for row in bar:
        bar.set_postfix_str(row.name)
        images, rate = generate(row, prompts, scenes, seed, guidance)
        predicted, feats = judge_lib.predict(judge, judge_params, images)
        results.append({
            "name": row.name, "sampler": row.sampler, "steps": row.steps, "pipeline": row.pipeline,
            "judge_accuracy": eval_metrics.scene_accuracy(predicted, prompts),
            "attribute_accuracy": eval_metrics.attribute_accuracy(predicted, prompts),
            "train_rm": float(np.mean(np.asarray(train_rm(images, prompts)))),
            "heldout_rm": float(np.mean(np.asarray(heldout_rm(images, prompts)))),
            "fid": eval_metrics.frechet_distance(feats, ref_feats),
            "hf_energy": high_frequency_energy(images), "images_per_s": rate})
        slug = "".join(ch if ch.isalnum() else "_" for ch in row.name).strip("_").lower()
        Image.fromarray(make_grid(to_uint8(images[:64]))).save(os.path.join(out_dir, "grids", f"{slug}.png"))
        strips.append((row.name, images[:GRID_PROMPTS]))
    _labelled_grid(strips).save(os.path.join(out_dir, "grids", "side_by_side.png"))
    meta = {"num_prompts": num_prompts, "prompt_seed": prompt_seed, "latent_seed": seed, "guidance": guidance,
            "prompts": prompts[:GRID_PROMPTS], "fid_reference": "judge features of renders of the same held-out scenes",
            "hf_cutoff_cycles_per_pixel": 0.25}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=2)
    table = format_table(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"Held-out prompts: {num_prompts} (seed {prompt_seed}); latent seed {seed}; CFG {guidance['ddim']} "
                f"(DDIM), LCM guidance {guidance['lcm']}.\n\n{table}\n")
    return results


def evaluate_workdir(workdir: str, num_prompts: int, steps: Sequence[int], seed: int) -> str:
    """`evaluate` as ``python -m jaxlcd.eval --workdir`` runs it on a demo-world run: the printed table."""
    return format_table(evaluate(workdir, num_prompts, steps, seed))
