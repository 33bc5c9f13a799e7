"""The demo job (``configs/rglcd.py:demo``, ``demo_lcd``, ``demo_lrm``): distil the shipped shapes-world teacher,
after the baselines the table compares against, then evaluate every run on held-out prompts.

It hands the product's distillation trainer (`jaxlcd.distill.job.train`) concrete inputs: the shipped teacher, the
shapes dataset prepared once in ``WORKDIR/data``, and the shipped CLIP / LRM as reward models.
"""
from __future__ import annotations

import os

from jaxlcd import parallel, storage
from jaxlcd.demo import demo_path, shapes
from jaxlcd.errors import InputError

BASELINES = {"lcd": dict(reward_name="", lrm=False), "lrm": dict(reward_name="clipscore", lrm=True)}
SHAPES_DATA = "shapes"   # data_dir value (or ""): the built-in shapes dataset


def baseline_config(cfg, name: str):
    """``cfg`` turned into baseline ``name`` of BASELINES (same data, steps and seed; no further baselines/eval)."""
    if name not in BASELINES:
        raise InputError(f"unknown demo baseline {name!r}; known: {', '.join(BASELINES)}")
    sub = cfg.copy_and_resolve_references()
    with sub.unlocked():
        sub.reward.name, sub.reward.path = BASELINES[name]["reward_name"], ""
        sub.lrm.enabled, sub.lrm.path = BASELINES[name]["lrm"], ""
        sub.demo.baselines, sub.demo.eval_prompts = (), 0
    return sub


def prepare_shapes(cfg, workdir: str) -> str:
    """The shapes dataset (the first ``cfg.shapes_examples`` scenes of seed 0 at ``cfg.resolution``) prepared once
    in ``workdir/data`` (local beside a gs:// workdir); returns its folder."""
    data_root = os.path.join(storage.local_dir(workdir), "data")
    parallel.process_zero_first(lambda: shapes.prepare_shapes_dataset(
        data_root, num_examples=cfg.shapes_examples, resolution=cfg.resolution, seed=0), name="shapes")
    return shapes.version_dir(data_root, shapes.BUILDER_NAME)


def with_demo_inputs(cfg, data_dir: str):
    """A copy of ``cfg`` whose empty inputs are the demo world's: the shipped teacher, ``data_dir`` (when data_dir
    is "" or "shapes"), the shipped CLIP as reward model and the shipped LRM."""
    out = cfg.copy_and_resolve_references()
    with out.unlocked():
        out.teacher = cfg.teacher or demo_path("teacher")
        out.data_dir = data_dir if cfg.data_dir in ("", SHAPES_DATA) else os.path.abspath(cfg.data_dir)
        out.reward.path = cfg.reward.path or (demo_path("clip") if cfg.reward.name else "")
        out.lrm.path = cfg.lrm.path or (demo_path("lrm") if cfg.lrm.enabled else "")
    return out


def run(cfg, workdir: str) -> list[dict]:
    """Train ``cfg.demo.baselines`` (in ``workdir/baselines/NAME``), then ``cfg`` itself in ``workdir``, then evaluate
    on ``cfg.demo.eval_prompts`` held-out prompts (`jaxlcd.demo.evaluate`); every part resumes when rerun. Returns
    the table's rows."""
    from jaxlcd.demo import evaluate
    from jaxlcd.distill.job import train

    if storage.is_remote(workdir):
        raise InputError(f"the demo world's job runs in a local workdir, not {workdir!r}; cloud-storage workdirs are "
                         "for the distill and lrm_pretrain jobs (e.g. --config=configs/rglcd.py:tiny)")
    parallel.maybe_initialize_distributed()
    data_dir = prepare_shapes(cfg, workdir) if cfg.data_dir in ("", SHAPES_DATA) else ""
    for name in cfg.demo.baselines:
        sub_dir = os.path.join(workdir, "baselines", name)
        print(f"demo: training the {name} baseline in {sub_dir}")
        train(with_demo_inputs(baseline_config(cfg, name), data_dir), sub_dir)
    train(with_demo_inputs(cfg, data_dir), workdir)
    if not cfg.demo.eval_prompts:
        return []
    print(f"demo: evaluating on {cfg.demo.eval_prompts} held-out prompts")
    results = evaluate.evaluate(workdir, cfg.demo.eval_prompts)
    print(evaluate.format_table(results))
    print(f"demo: results and grids in {os.path.join(workdir, 'eval')}")
    return results


def pretrain_lrm(cfg, workdir: str) -> dict:
    """``configs/lrm_pretrain.py:demo``: LRM pretraining (`jaxlcd.rewards.lrm_pretrain.pretrain`) on the shapes
    dataset with the shipped teacher's VAE (``cfg.teacher`` when given)."""
    from jaxlcd.rewards.lrm_pretrain import pretrain

    data_dir = prepare_shapes(cfg, workdir) if cfg.data_dir in ("", SHAPES_DATA) else cfg.data_dir
    with cfg.unlocked():
        cfg.teacher, cfg.data_dir = os.path.abspath(cfg.teacher or demo_path("teacher")), data_dir
    return pretrain(cfg, workdir)
