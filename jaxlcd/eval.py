"""Evaluate a finished run: teacher DDIM-50 vs the distilled students at 1, 2 and 4 steps on held-out prompts.

    python -m jaxlcd.eval --workdir DIR [--num-prompts 128] [--steps 1,2,4] [--seed 0]

Today this evaluates demo-world runs (`jaxlcd.demo.evaluate`: judge accuracy, training and held-out reward, demo FID,
high-frequency energy, images/s); the evaluation of real runs (FID, CLIPScore, HPSv2.1, ...) is not written yet.
Writes DIR/eval/results.json, results.md and grids/*.png and prints the table.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from jaxlcd.errors import InputError, JaxlcdError


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxlcd.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a finished demo-world run (config.json + export/student)")
    p.add_argument("--num-prompts", type=int, default=128, help="held-out prompts (same for every row)")
    p.add_argument("--steps", default="1,2,4", help="LCM step counts, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents and LCM noise")
    args = p.parse_args(argv)
    try:
        try:
            steps = tuple(int(s) for s in args.steps.split(","))
        except ValueError:
            raise InputError(f"--steps={args.steps!r} must be comma-separated integers, e.g. 1,2,4") from None
        if args.num_prompts < 2 or any(s < 1 for s in steps):
            raise InputError("--num-prompts must be >= 2 and every --steps value >= 1")
        from jaxlcd.demo import evaluate

        results = evaluate.evaluate(args.workdir, args.num_prompts, steps, args.seed)
    except JaxlcdError as e:
        print(f"jaxlcd.eval: error: {e}", file=sys.stderr)
        return 2
    print(evaluate.format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
