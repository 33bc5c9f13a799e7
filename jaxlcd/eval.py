"""Evaluate few-step models (and a teacher) on a prompt set: FID, CLIPScore, HPSv2.1, PickScore, ImageReward, aesthetic.

    python -m jaxlcd.eval --model DIR_OR_HUB_ID [--model ...] --prompts FILE --steps 1,2,4 --out DIR
        [--lora LORA] [--teacher DIR --teacher-steps 50 --guidance 7.5] [--lcm-guidance 8.5] [--fid-ref DIR_OR_NPZ --inception PATH]
        [--reward NAME=PATH ...] [--num-images N] [--seed S] [--batch-size B]
    python -m jaxlcd.eval --workdir DIR [--num-prompts 128] [--steps 1,2,4]     # a demo-world run

``--model``: LCM student pipeline folders (e.g. WORKDIR/export/student), or base models with ``--lora LORA``
(an LCM-LoRA, e.g. WORKDIR/export/lora, applied to each --model). Prompt files: plain text, the HPDv2
benchmark folder, PartiPrompts.tsv, COCO captions json (`jaxlcd.metrics.prompts`). Writes OUT/results.json,
results.md, grids/side_by_side.png, plots/*.png and the images (a rerun generates only missing ones).
``--workdir`` evaluates demo-world runs with the demo's judge metrics (picked by the run's job); other runs are
refused there: evaluate their export with ``--model``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Optional, Sequence

from jaxlcd.errors import InputError, JaxlcdError

DEMO_JOB = "jaxlcd.demo.job:run"
# a run's job (config.json "job") -> the "module:function(workdir, num_prompts, steps, seed) -> table" evaluating it,
# resolved by name as jaxlcd.main resolves jobs (only the demo world has a --workdir evaluation)
WORKDIR_EVALUATIONS = {DEMO_JOB: "jaxlcd.demo.evaluate:evaluate_workdir"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxlcd.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="LCM student folder or hub id (repeatable)")
    p.add_argument("--prompts", help="prompt file or HPDv2 benchmark folder")
    p.add_argument("--out", help="output folder")
    p.add_argument("--steps", default="1,2,4", help="LCM step counts, comma-separated")
    p.add_argument("--teacher", help="teacher pipeline folder or hub id: adds a DDIM + CFG row")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="the teacher's CFG scale")
    p.add_argument("--lora", default="", help="a UNet LoRA file or folder (an LCM-LoRA) applied to every --model")
    p.add_argument("--lcm-guidance", type=float, help="the students' guidance g: an LCM student embeds w = g - 1 "
                   "(default 8.5); with --lora, CFG when g > 1 (default 1.0: one UNet pass per step)")
    p.add_argument("--fid-ref", help="FID reference: a folder of images or an .npz of mu/sigma")
    p.add_argument("--inception", help="FID Inception weights (safetensors, see jaxlcd.metrics.fid)")
    p.add_argument("--reward", action="append", default=[], metavar="NAME=PATH",
                   help="a metric and its model folder: clipscore, hpsv2.1, pickscore, imagereward, aesthetic")
    p.add_argument("--num-images", type=int, help="prompts (= images per row); default: all of the file")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents (and of the COCO caption sample)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--allow-pickle", action="store_true", help="let reward models load trusted pickle files")
    p.add_argument("--workdir", help="a demo-world run (config.json + export/student)")
    p.add_argument("--num-prompts", type=int, default=128, help="--workdir: held-out demo prompts")
    return p


def _steps(text: str) -> tuple:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise InputError(f"--steps={text!r} must be comma-separated integers, e.g. 1,2,4") from None
    if not steps or any(s < 1 for s in steps):
        raise InputError("every --steps value must be >= 1")
    return steps


def _workdir(args) -> str:
    config = os.path.join(args.workdir, "config.json")
    if not os.path.isfile(config):
        raise InputError(f"{args.workdir!r} holds no jaxlcd run (no config.json); pass the --workdir of a finished run")
    with open(config) as f:
        job = json.load(f).get("job")
    if job not in WORKDIR_EVALUATIONS:
        raise InputError(f"{args.workdir!r} is not a demo-world run (job {job!r}), and --workdir evaluates only those "
                         "with the demo's judge; evaluate its export with --model WORKDIR/export/student --prompts "
                         "FILE --out DIR")
    if args.num_prompts < 2:
        raise InputError("--num-prompts must be >= 2")
    module, _, function = WORKDIR_EVALUATIONS[job].partition(":")
    evaluate_workdir = getattr(importlib.import_module(module), function)
    return evaluate_workdir(args.workdir, args.num_prompts, _steps(args.steps), args.seed)


def _models(args) -> Optional[str]:
    from jaxlcd import parallel
    from jaxlcd.metrics import evaluate, generate, prompts, report

    if not args.model and not args.teacher:
        raise InputError("nothing to evaluate: pass --model (an LCM student folder) and/or --teacher")
    if not args.prompts or not args.out:
        raise InputError("--prompts and --out are required with --model/--teacher")
    rewards = {}
    for item in args.reward:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise InputError(f"--reward {item!r} must be NAME=PATH, e.g. hpsv2.1=/models/hpsv2.1")
        rewards[name] = path
    parallel.maybe_initialize_distributed()
    if args.lora and not args.model:
        raise InputError("--lora is applied to the --model folders: pass the base model with --model")
    lcm_guidance = args.lcm_guidance if args.lcm_guidance is not None else (1.0 if args.lora else 8.5)
    rows = generate.make_rows(args.model, _steps(args.steps), lcm_guidance, args.teacher, args.teacher_steps,
                              args.guidance, args.lora)
    prompt_list = prompts.load_prompts(args.prompts, args.num_images, args.seed)
    results = evaluate.evaluate(rows, prompt_list, args.out, seed=args.seed, batch_size=args.batch_size,
                                rewards=rewards, fid_ref=args.fid_ref, inception=args.inception,
                                allow_pickle=args.allow_pickle)
    return None if results is None else report.format_table(results)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jaxlcd import cli

    args = build_parser().parse_args(argv)
    cli.setup_logging()
    try:
        table = _workdir(args) if args.workdir else _models(args)
    except JaxlcdError as e:
        print(f"jaxlcd.eval: error: {e}", file=sys.stderr)
        return 2
    if table:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
