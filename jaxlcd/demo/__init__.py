"""The built-in "shapes" demo world: everything that exists only for it (dataset, judge, demo metrics and
evaluation, the demo job, the trainers of its models, shipping helpers). Product code never imports this package.

Its shipped models (``jaxlcd/assets/demo``), all trained by jaxlcd on the shapes dataset:

teacher  diffusers StableDiffusionPipeline folder (configs/demo/teacher.py; VAE from configs/demo/vae.py,
         text encoder = the text tower of ``clip``)
clip     transformers CLIPModel folder: the training reward model and the LRM's expert (configs/demo/clip.py)
scorer   a second CLIPModel (configs/demo/clip.py:scorer): the held-out reward of the evaluation
judge    attribute classifier (configs/demo/judge.py): judge accuracy and demo-FID features
lrm      latent proxy reward model pretrained on the teacher VAE's latents (configs/lrm_pretrain.py:demo)
"""
from __future__ import annotations

import os

from jaxlcd.errors import InputError

# JAXLCD_DEMO_DIR points the demo variants and jaxlcd.eval at another set of demo models (e.g. freshly retrained).
DEMO_DIR = os.environ.get("JAXLCD_DEMO_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")
MODELS = ("teacher", "clip", "scorer", "judge", "lrm")


def demo_path(name: str) -> str:
    """The folder of shipped demo model ``name`` (one of MODELS); ValueError if unknown or missing."""
    if name not in MODELS:
        raise InputError(f"unknown demo model {name!r}; known: {', '.join(MODELS)}")
    path = os.path.join(DEMO_DIR, name)
    if not os.path.isdir(path):
        raise InputError(f"the demo model {name!r} is missing from {DEMO_DIR}; reinstall jaxlcd or retrain it "
                         f"with its config (see README, 'The demo world')")
    return path
