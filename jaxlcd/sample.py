"""Sample images from a diffusers pipeline folder: LCM (student) or DDIM with CFG (teacher).

    python -m jaxlcd.sample --model out/lcm --prompt "a red fox" --sampler lcm --steps 4 --out samples/
    python -m jaxlcd.sample --model sd21base --prompts-file prompts.txt --sampler ddim --out samples/
    python -m jaxlcd.sample --model sd15 --lora runs/x/export/lora --sampler lcm --steps 4 --guidance 1 --out s/

Writes 000000.png, 000001.png, ... (one per prompt), grid.png, and with --save-array images.npy
(float32 [N,H,W,3] in [0,1]). A bad input exits with one error line and status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

from jaxlcd.errors import InputError, JaxlcdError
from jaxlcd.paths import resolve_model_path

DEFAULTS = {"lcm": (4, 8.5), "ddim": (50, 7.5)}  # (steps, guidance) as diffusers' pipelines
LORA_LCM_GUIDANCE = 1.0   # an LCM-LoRA (no guidance embedding): diffusers' LCM-LoRA docs use g in [1, 2]


class UsageError(InputError):
    """A command-line input the sampler cannot use."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxlcd.sample", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers pipeline folder (model_index.json, unet/, vae/, ...), "
                                                  "hub id org/name[@revision], or gs://bucket/folder")
    p.add_argument("--variant", default="", help="weights variant, e.g. fp16: *.fp16.safetensors where present")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompts-file", help="text file with one prompt per non-empty line (added after --prompt)")
    p.add_argument("--lora", help="UNet LoRA file or folder (pytorch_lora_weights.safetensors, e.g. an LCM-LoRA or "
                   "a jaxlcd LoRA export) applied to --model's UNet, as diffusers' load_lora_weights")
    p.add_argument("--sampler", choices=("lcm", "ddim"), default="lcm",
                   help="lcm: multistep LCM (an LCM student, a UNet with --lora, or a folder with an LCMScheduler); "
                        "ddim: DDIM with CFG")
    p.add_argument("--steps", type=int, help="sampling steps (default: lcm 4, ddim 50)")
    p.add_argument("--guidance", type=float,
                   help="guidance scale g (diffusers convention). An LCM student embeds w = g - 1; a UNet without the "
                        "embedding (LCM-LoRA) uses CFG when g > 1, one UNet pass per step when g <= 1 "
                        "(default: lcm 8.5, LCM-LoRA 1.0, ddim 7.5)")
    p.add_argument("--negative-prompt", default="", help="unconditional prompt of CFG (DDIM, LCM-LoRA with g > 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for initial latents and LCM step noise")
    p.add_argument("--latents", help="initial latents .npy, [N,h,w,C] (NHWC) or [N,C,h,w] (NCHW), C = the UNet's "
                   "in_channels; the layout is decided by which axis equals C, and when both axis 1 and axis 3 do, "
                   "NCHW (the diffusers layout) is assumed. N must equal the number of prompts (a single prompt "
                   "is repeated N times)")
    p.add_argument("--batch-size", type=int, default=4, help="images per compiled call (default 4)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--save-array", action="store_true", help="also write images.npy (float32 [N,H,W,3] in [0,1])")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    return p


def read_prompts(args) -> list:
    """--prompt values then --prompts-file lines (stripped, empty lines skipped)."""
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise UsageError(f"prompts file {args.prompts_file!r} does not exist")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT or a --prompts-file with at least one non-empty line")
    return prompts


def read_latents(path: str, num_prompts: int, channels: int, factor: int) -> np.ndarray:
    """An .npy of [N,h,w,C] or [N,C,h,w] -> NHWC float32 [N,h,w,C] (NCHW when ambiguous)."""
    if not os.path.isfile(path):
        raise UsageError(f"latents file {path!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise UsageError(f"cannot read latents file {path!r} as a numeric .npy array ({e})") from None
    if arr.ndim != 4 or channels not in (arr.shape[1], arr.shape[3]) or not np.issubdtype(arr.dtype, np.floating):
        raise UsageError(f"latents in {path!r} have shape {arr.shape} ({arr.dtype}); expected a float array "
                         f"[N,{channels},h,w] (NCHW) or [N,h,w,{channels}] (NHWC)")
    if arr.shape[1] == channels:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[1] % factor or arr.shape[2] % factor:
        raise UsageError(f"latent height and width {arr.shape[1:3]} must be multiples of {factor} for this UNet")
    if num_prompts not in (1, arr.shape[0]):
        raise UsageError(f"latents in {path!r} hold {arr.shape[0]} samples but there are {num_prompts} prompts; "
                         "give one latent per prompt (or a single prompt)")
    return np.ascontiguousarray(arr, np.float32)


def save_images(images: np.ndarray, out_dir: str, start: int = 0) -> None:
    """Write images [B,H,W,3] in [0,1] as out_dir/{start:06d}.png, ..."""
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(to_uint8(img)).save(os.path.join(out_dir, f"{start + i:06d}.png"))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., 3] float in [0,1] -> uint8 (round(x * 255), as diffusers' numpy_to_pil)."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def make_grid(images: np.ndarray) -> np.ndarray:
    """[N,H,W,3] -> one [rows*H, cols*W, 3] image, cols = ceil(sqrt(N)), blank cells black."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), images.dtype)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = img
    return grid


def _setup(args):
    """Validate inputs and load the pipeline; raises ValueError subclasses with one-sentence messages."""
    import jax.numpy as jnp
    from jaxlcd import pipeline as pl

    steps, guidance = DEFAULTS[args.sampler]
    args.steps = steps if args.steps is None else args.steps
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    prompts = read_prompts(args)
    pipe = pl.load_pipeline(resolve_model_path(args.model, "--model", args.variant),
                            dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
                            lora=resolve_model_path(args.lora, "--lora") if args.lora else None)
    if args.guidance is None:
        args.guidance = LORA_LCM_GUIDANCE if args.sampler == "lcm" and not pipe.is_lcm else guidance
    if args.sampler == "lcm":
        pl.require_lcm(pipe)
        if args.steps > int(pipe.scheduler_config.get("original_inference_steps", 50)):
            raise UsageError(f"--steps {args.steps} is more than the LCM schedule's original_inference_steps "
                             f"({pipe.scheduler_config.get('original_inference_steps', 50)})")
    latents = None
    if args.latents:
        factor = 2 ** (len(pipe.unet.config.down_block_types) - 1)
        latents = read_latents(args.latents, len(prompts), pipe.unet.config.in_channels, factor)
        if len(prompts) == 1:
            prompts = prompts * latents.shape[0]
    return pipe, prompts, latents


def run(args) -> np.ndarray:
    """Sample every prompt in batches, write the outputs; returns images [N,H,W,3] float32 in [0,1]."""
    import jax
    from tqdm import tqdm
    from jaxlcd import pipeline as pl

    pipe, prompts, latents = _setup(args)
    os.makedirs(args.out, exist_ok=True)
    key = jax.random.PRNGKey(args.seed)
    n, bs = len(prompts), min(args.batch_size, len(prompts))
    outputs = []
    for b, start in enumerate(tqdm(range(0, n, bs), desc=f"{args.sampler} {args.steps} steps", unit="batch")):
        chunk = prompts[start:start + bs]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (bs - real)  # pad the last batch: one compiled shape for all batches
        rng = jax.random.fold_in(key, b)
        lat = None
        if latents is not None:
            lat = latents[start:start + bs]
            lat = np.concatenate([lat, np.repeat(lat[-1:], bs - real, axis=0)])
        if args.sampler == "lcm":
            _, images = pl.sample_lcm(pipe, chunk, num_steps=args.steps, guidance=args.guidance, latents=lat, rng=rng,
                                      negative_prompt=args.negative_prompt)
        else:
            _, images = pl.sample_ddim(pipe, chunk, num_steps=args.steps, guidance=args.guidance,
                                       negative_prompt=args.negative_prompt, latents=lat, rng=rng)
        images = np.asarray(images, np.float32)[:real]
        save_images(images, args.out, start)
        outputs.append(images)
    images = np.concatenate(outputs)
    from PIL import Image

    Image.fromarray(to_uint8(make_grid(images))).save(os.path.join(args.out, "grid.png"))
    if args.save_array:
        np.save(os.path.join(args.out, "images.npy"), images)
    return images


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; ``argv`` without the program name (default sys.argv[1:]). Returns 0 on success."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except JaxlcdError as e:
        print(f"jaxlcd.sample: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
