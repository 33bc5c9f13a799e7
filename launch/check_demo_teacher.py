"""The demo judge on a teacher's DDIM-50 samples of held-out prompts, at several CFG scales (the teacher trainer's
progress check, for any pipeline folder):

    python launch/check_demo_teacher.py jaxlcd/assets/demo/teacher [--guidance 1,3,7.5] [--prompts 64]

Prints, per scale, scene accuracy (every attribute of the prompt right) and the accuracy of each attribute.
"""
import argparse

from jaxlcd.demo import demo_path
from jaxlcd.pipeline import load_pipeline
from jaxlcd.train.teacher_train import sample_check

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("teacher", help="a StableDiffusionPipeline folder")
parser.add_argument("--guidance", default="1,3,7.5", help="comma-separated CFG scales")
parser.add_argument("--prompts", type=int, default=64, help="held-out prompts (the first N of shapes.eval_prompts)")
args = parser.parse_args()
pipe = load_pipeline(args.teacher)
for g in (float(x) for x in args.guidance.split(",")):
    scores = sample_check(pipe, pipe.unet_params, demo_path("judge"), args.prompts, guidance=g)
    print(f"CFG {g:g}: " + ", ".join(f"{k.removeprefix('ddim_judge_')} {v:.3f}" for k, v in scores.items()), flush=True)
