"""In-training evaluators: sample quality metrics and the reward-hacking monitor (`config.evals.NAME`).

    config.evals.quality = dict(type="lcm_metrics", every=1000, steps=(2,), prompts="prompts.txt", num_prompts=64,
                                rewards="hpsv2.1=/models/hps,clipscore=/models/clip", fid_ref="", inception="")
    config.evals.hacking = dict(type="reward_hacking", every=500, steps=2, prompts="prompts.txt", num_prompts=64,
                                heldout="imagereward=/models/imagereward", train_reward="",
                                stop_if=dict(patience=3))

Both sample the student on the first ``num_prompts`` prompts of ``prompts`` (a prompt file as `jaxlcd.eval` reads,
or a tuple of strings; empty: the grid prompts) from fixed latents, so successive evaluations differ only by the
student, and score them with `jaxlcd.metrics` (no gradients, each metric with its reference's preprocessing).

``lcm_metrics`` logs ``NAME.METRIC_lcmN`` for each metric of ``rewards`` and, with ``fid_ref`` and ``inception``,
``NAME.fid_lcmN``, plus ``NAME.hf_energy_lcmN`` (`jaxlcd.metrics.spectral`).

``reward_hacking`` logs ``NAME.train_reward`` (the run's reward model, or ``train_reward``), ``NAME.heldout`` (a
reward model the run does not optimise) and ``NAME.hf_energy``. Over-optimising a differentiable reward shows as the
first rising while the second falls and the high-frequency energy grows (the failure the LRM is meant to prevent).
With ``stop_if.patience = K > 0`` the run stops (checkpoint saved, exit status 0, a warning naming the steps) after
K evaluations in a row where the training reward rose and the held-out score fell. The student with the best held-out
score so far is exported to ``WORKDIR/best`` (a diffusers LCM pipeline, ``best.json`` names its step and
score), so stopping keeps it.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from jaxlcd import parallel, storage
from jaxlcd.distill.grids import student_samples
from jaxlcd.errors import InputError
from jaxlcd.metrics.spectral import high_frequency_energy
from jaxlcd.training.evaluators import Evaluator, StopRun

log = logging.getLogger(__name__)


def parse_metric_paths(spec) -> dict:
    """``"hpsv2.1=/a,clipscore=/b"`` (or a mapping) -> {metric: path}; empty -> {}."""
    if not spec:
        return {}
    if not isinstance(spec, str):
        return dict(spec)
    out = {}
    for item in spec.split(","):
        name, sep, path = item.strip().partition("=")
        if not sep or not name or not path:
            raise InputError(f"{spec!r}: each metric must be NAME=PATH, comma-separated (e.g. hpsv2.1=/models/hps)")
        out[name] = path
    return out


def _prompts(ecfg, context) -> list[str]:
    from jaxlcd.metrics.prompts import load_prompts

    spec, num = ecfg.get("prompts") or context["grid_prompts"], int(ecfg.get("num_prompts", 64))
    prompts = [p.text for p in load_prompts(spec, num)] if isinstance(spec, str) else list(spec)[:num]
    if len(prompts) < 2:
        raise InputError(f"an in-training evaluation needs at least 2 prompts, got {len(prompts)}")
    return prompts


def _samples(context, params, prompts, n, ecfg):
    """uint8 samples of the student ``params`` (host arrays) on process 0; None on the others."""
    if jax.process_index() != 0:
        return None
    return student_samples(context["run"], params, prompts, n, context["resolution"], float(ecfg.get("guidance", 8.5)),
                           int(ecfg.get("batch", 8)))


def make_metrics_evaluator(name: str, ecfg, context: dict):
    """``type="lcm_metrics"`` (see the module docstring); None when neither ``rewards`` nor ``fid_ref`` is set."""
    from jaxlcd.metrics import evaluate as eval_lib
    from jaxlcd.metrics import fid as fid_lib
    from jaxlcd.metrics.scores import Scorer

    rewards, fid_ref, inception = parse_metric_paths(ecfg.get("rewards")), ecfg.get("fid_ref"), ecfg.get("inception")
    if not rewards and not fid_ref:
        return None
    eval_lib.check_inputs(rewards, fid_ref or None, inception or None)
    prompts = _prompts(ecfg, context)
    scorers = {m: Scorer(m, p) for m, p in rewards.items()} if jax.process_index() == 0 else {}
    cache = os.path.join(storage.local_dir(context["workdir"]), "eval_cache")
    steps = tuple(ecfg.get("steps") or (2,))

    def run(state, step: int, final: bool) -> dict:
        out, params = {}, parallel.to_host(state.params)   # every process gathers the student; process 0 samples
        for n in steps:
            images = _samples(context, params, prompts, n, ecfg)
            if images is None:
                continue
            for metric, scorer in scorers.items():
                out[f"{name}.{metric}_lcm{n}"] = scorer.aggregate(scorer(images, prompts))
            if fid_ref:
                os.makedirs(cache, exist_ok=True)
                reference = eval_lib.reference_statistics(fid_ref, inception, images.shape[1], cache)
                out[f"{name}.fid_lcm{n}"] = fid_lib.frechet_distance(
                    fid_lib.inception_features(images, inception), reference)
            out[f"{name}.hf_energy_lcm{n}"] = high_frequency_energy(images)
        return out

    return Evaluator(name, int(ecfg.get("every", 0)), run)


def hacking_streak(history: list[tuple[float, float]]) -> int:
    """How many evaluations in a row, up to the last, the training reward rose while the held-out score fell
    (``history``: (train, heldout) per evaluation, oldest first)."""
    streak = 0
    for (t0, h0), (t1, h1) in zip(history[:-1], history[1:]):
        streak = streak + 1 if t1 > t0 and h1 < h0 else 0
    return streak


def _export_best(context, state_params, step: int, score: float) -> None:
    from jaxlcd.export import export_student_pipeline
    from jaxlcd.loaders.lora_file import save_lora

    run, final, cfg = context["run"], storage.join(context["workdir"], "best"), context["config"]
    tmp = os.path.join(storage.local_dir(context["workdir"]), f"best.tmp-{step}")
    if run.models.lora_scale is None:
        export_student_pipeline(tmp, run.teacher_dir, run.models.student, state_params)
    else:   # a LoRA student: its adapters (pytorch_lora_weights.safetensors)
        save_lora(tmp, state_params, cfg.lora.rank, cfg.lora.alpha)
    with open(os.path.join(tmp, "best.json"), "w") as f:
        json.dump({"step": step, "heldout": score}, f)
    storage.publish_dir(tmp, final, marker="best.json")


def make_hacking_monitor(name: str, ecfg, context: dict):
    """``type="reward_hacking"`` (see the module docstring); None when ``heldout`` is not set."""
    from jaxlcd.metrics.scores import Scorer

    heldout = parse_metric_paths(ecfg.get("heldout"))
    if not heldout:
        return None
    cfg = context["config"]
    train = parse_metric_paths(ecfg.get("train_reward")) or (
        {cfg.reward.name: cfg.reward.path} if cfg.reward.name and cfg.reward.path else {})
    if len(heldout) != 1 or len(train) != 1:
        raise InputError(f"config.evals.{name}: heldout and train_reward must each name one metric NAME=PATH "
                         f"(train_reward defaults to the run's single reward model; got {dict(train) or 'none'})")
    prompts, n = _prompts(ecfg, context), int(ecfg.get("steps", 2))
    patience = int((ecfg.get("stop_if") or {}).get("patience", 0))
    scorers = ({"train": Scorer(*next(iter(train.items()))), "heldout": Scorer(*next(iter(heldout.items())))}
               if jax.process_index() == 0 else {})
    history: list[tuple[float, float]] = []
    best = {"score": -np.inf}

    def run(state, step: int, final: bool) -> dict:
        params = parallel.to_host(state.params)
        out, stop, images = {}, False, _samples(context, params, prompts, n, ecfg)
        if images is not None:
            scores = {k: s.aggregate(s(images, prompts)) for k, s in scorers.items()}
            out = {f"{name}.train_reward": scores["train"], f"{name}.heldout": scores["heldout"],
                   f"{name}.hf_energy": high_frequency_energy(images)}
            history.append((scores["train"], scores["heldout"]))
            if scores["heldout"] > best["score"]:
                best.update(score=scores["heldout"], step=step)
                _export_best(context, params, step, scores["heldout"])
            stop = bool(patience) and hacking_streak(history) >= patience and not final
        if parallel.any_process(stop):
            raise StopRun(f"reward hacking: over the last {patience} evaluations up to step {step} the training "
                          f"reward rose while the held-out {next(iter(heldout))} fell; stopping (checkpoint saved). "
                          f"The best held-out student (step {best.get('step')}) is in "
                          f"{storage.join(context['workdir'], 'best')}", out)
        return out

    return Evaluator(name, int(ecfg.get("every", 0)), run)
