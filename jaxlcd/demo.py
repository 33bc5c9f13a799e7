"""The demo world's shipped models (``jaxlcd/assets/demo``), all trained by jaxlcd on the shapes dataset:

teacher  diffusers StableDiffusionPipeline folder (configs/demo_teacher.py; VAE from configs/demo_vae.py,
         text encoder = the text tower of ``clip``)
clip     transformers CLIPModel folder: the training reward model and the LRM's expert (configs/demo_clip.py)
scorer   a second CLIPModel (configs/demo_clip.py:scorer): the held-out reward of the evaluation
judge    attribute classifier (configs/demo_judge.py): judge accuracy and demo-FID features
lrm      latent proxy reward model pretrained on the teacher VAE's latents (configs/lrm_pretrain.py:demo)
"""
from __future__ import annotations

import filecmp
import os
import shutil

# JAXLCD_DEMO_DIR points the demo variants and jaxlcd.eval at another set of demo models (e.g. freshly retrained).
DEMO_DIR = os.environ.get("JAXLCD_DEMO_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
MODELS = ("teacher", "clip", "scorer", "judge", "lrm")


def demo_path(name: str) -> str:
    """The folder of shipped demo model ``name`` (one of MODELS); ValueError if unknown or missing."""
    if name not in MODELS:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join(MODELS)}")
    path = os.path.join(DEMO_DIR, name)
    if not os.path.isdir(path):
        raise ValueError(f"the demo model {name!r} is missing from {DEMO_DIR}; reinstall jaxlcd or retrain it "
                         f"with its config (see README, 'The demo world')")
    return path


BASELINES = {"lcd": dict(reward_name="", lrm=False), "lrm": dict(reward_name="clipscore", lrm=True)}


def baseline_config(cfg, name: str):
    """``cfg`` turned into baseline ``name`` of BASELINES (same data, steps and seed; no further baselines/eval)."""
    if name not in BASELINES:
        raise ValueError(f"unknown demo baseline {name!r}; known: {', '.join(BASELINES)}")
    sub = cfg.copy_and_resolve_references()
    with sub.unlocked():
        sub.reward.name, sub.reward.path = BASELINES[name]["reward_name"], ""
        sub.lrm.enabled, sub.lrm.path = BASELINES[name]["lrm"], ""
        sub.demo.baselines, sub.demo.eval_prompts = (), 0
    return sub


def _share_data(cfg, workdir: str, sub_dir: str) -> None:
    """Prepare the shapes dataset once in ``workdir/data`` and link ``sub_dir/data`` to it (a baseline run trains
    on the same scenes; generating them again would cost ~15 s of the demo's budget)."""
    from jaxlcd.train import setup

    if cfg.data_dir not in ("", setup.SHAPES_DATA) or os.path.exists(os.path.join(sub_dir, "data")):
        return
    setup.prepare_data(setup.SHAPES_DATA, os.path.join(workdir, "data"), cfg.resolution, cfg.shapes_examples)
    os.makedirs(sub_dir, exist_ok=True)
    os.symlink(os.path.abspath(os.path.join(workdir, "data")), os.path.join(sub_dir, "data"))


def run_demo(cfg, workdir: str) -> list[dict]:
    """Train ``cfg.demo.baselines`` (in ``workdir/baselines/NAME``), then ``cfg`` itself in ``workdir``, then evaluate
    on ``cfg.demo.eval_prompts`` held-out prompts (`jaxlcd.eval`); every part resumes when rerun. Returns the rows."""
    from jaxlcd import eval as eval_lib
    from jaxlcd.train import loop

    for name in cfg.demo.baselines:
        sub_dir = os.path.join(workdir, "baselines", name)
        print(f"demo: training the {name} baseline in {sub_dir}")
        _share_data(cfg, workdir, sub_dir)
        loop.train(baseline_config(cfg, name), sub_dir)
    loop.train(cfg, workdir)
    if not cfg.demo.eval_prompts:
        return []
    print(f"demo: evaluating on {cfg.demo.eval_prompts} held-out prompts")
    results = eval_lib.evaluate(workdir, cfg.demo.eval_prompts)
    print(eval_lib.format_table(results))
    print(f"demo: results and grids in {os.path.join(workdir, 'eval')}")
    return results


def ship_model(src: str, name: str, dest_root: str = DEMO_DIR) -> str:
    """Copy model folder ``src`` to ``dest_root/name`` (replacing it) with every float32 safetensors tensor stored
    as float16 (the demo models are small and fp16 is enough); other files are copied as they are."""
    from safetensors.numpy import load_file, save_file

    if name not in MODELS:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join(MODELS)}")
    dest = os.path.join(dest_root, name)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    for root, _, files in os.walk(dest):
        for f in files:
            if f.endswith(".safetensors"):
                path = os.path.join(root, f)
                tensors = load_file(path)
                save_file({k: v.astype("float16") if v.dtype == "float32" else v for k, v in tensors.items()}, path,
                          metadata={"format": "pt"})
    return dest


SHARED_TOKENIZER_FILES = ("vocab.json", "merges.txt")  # the CLIP BPE files, 1.5 MB, identical in every demo model


def link_shared_tokenizer_files(dest_root: str = DEMO_DIR) -> list[str]:
    """Replace each copy of SHARED_TOKENIZER_FILES under ``dest_root`` that is byte-identical to ``clip``'s with a
    relative symlink to it (the package stores them once). Returns the linked paths."""
    linked, clip_dir = [], os.path.abspath(os.path.join(dest_root, "clip"))
    for root, _, files in os.walk(dest_root):
        if os.path.abspath(root) == clip_dir:
            continue
        for name in SHARED_TOKENIZER_FILES:
            path, source = os.path.join(root, name), os.path.join(clip_dir, name)
            if (name in files and not os.path.islink(path) and os.path.isfile(source)
                    and filecmp.cmp(path, source, shallow=False)):
                os.remove(path)
                os.symlink(os.path.relpath(source, root), path)
                linked.append(path)
    return linked
