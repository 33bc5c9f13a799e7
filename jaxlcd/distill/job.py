"""The distillation job: (reward-guided) latent consistency distillation of a teacher pipeline into an LCM student.

    inputs (config) -> Run (models, frozen params, sharded state) -> the one training loop with the compiled
    RG-LCD step (`jaxlcd.distill.step`) -> export of the student and its EMA target as diffusers pipelines.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxlcd import data as data_lib
from jaxlcd import parallel, storage
from jaxlcd.data import encoded
from jaxlcd.distill import setup
from jaxlcd.distill.step import make_train_step
from jaxlcd.export import export_student_pipeline
from jaxlcd.training import checkpoint, evaluators
from jaxlcd.training import loop as loop_lib
from jaxlcd.loaders import save_component
from jaxlcd.loaders.lora_file import save_lora

log = logging.getLogger("jaxlcd")


def device_batch(host_batch: dict, models) -> dict:
    """The numeric part of a host batch plus the reward models' tokens of its captions."""
    out = {k: v for k, v in host_batch.items() if k != "caption"}
    captions = [str(c) for c in host_batch["caption"]]
    if models.reward is not None:
        out["reward_tokens"] = models.reward.tokenize(captions)
    if models.lrm is not None:
        out["lrm_tokens"] = models.lrm.tokenize(captions)
    return out


def exported_step(workdir: str):
    """The training step ``workdir/export`` was written from (None when there is no complete export)."""
    try:
        return int(json.loads(storage.read_text(storage.join(workdir, "export", "step.json")))["step"])
    except (OSError, ValueError, KeyError):
        return None


def export(run, state, step: int, workdir: str, cfg) -> None:
    """Write the student and its EMA target as diffusers pipelines (a LoRA student: its adapters as
    ``export/lora/pytorch_lora_weights.safetensors``, and ``export/lora_target`` with an EMA; and the online LRM) to
    ``workdir/export``, marked with ``step`` (``export/step.json``); an export of the same step is kept, an older one
    replaced. The folder is written next to it and renamed into place, so a killed export leaves the previous one (or
    none), never a partial one (on cloud storage: uploaded with step.json last). Every process gathers the (possibly
    cross-process sharded) params; process 0 writes."""
    if exported_step(workdir) == step:
        return
    params = parallel.to_host({"student": state.params, "target": state.target_params, "lrm": state.lrm_params})
    if jax.process_index() != 0:
        return
    dtype = np.float16 if cfg.export_dtype == "float16" else np.float32
    final = storage.join(workdir, "export")
    tmp = tempfile.mkdtemp(prefix=f"jaxlcd-export-{step}-") if storage.is_remote(workdir) \
        else os.path.join(workdir, f"export.tmp-{step}")   # beside the final folder: the rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    if run.models.lora_scale is None:
        for name in ("student", "target"):
            export_student_pipeline(os.path.join(tmp, name), run.teacher_dir, run.models.student, params[name], dtype)
    else:   # the adapters in diffusers' LoRA format (and their EMA, when the run keeps one)
        save_lora(os.path.join(tmp, "lora"), params["student"], cfg.lora.rank, cfg.lora.alpha, dtype)
        if cfg.lcd.ema_decay > 0:
            save_lora(os.path.join(tmp, "lora_target"), params["target"], cfg.lora.rank, cfg.lora.alpha, dtype)
    if params["lrm"] is not None:
        save_component(run.models.lrm.module, params["lrm"], os.path.join(tmp, "lrm"))
    with open(os.path.join(tmp, "step.json"), "w") as f:
        json.dump({"step": step}, f)
    storage.publish_dir(tmp, final, marker="step.json")   # a stale or partial export is replaced
    log.info("exported the student%s at step %d to %s", " (LoRA)" if run.models.lora_scale is not None else
             " and its EMA target", step, final)


def train(cfg, workdir: str) -> dict:
    """Run (or resume) distillation in ``workdir``; returns the last logged metrics."""
    parallel.maybe_initialize_distributed()
    parallel.process_zero_first(setup.resolve_model_ids, cfg, name="hub")   # hub ids -> cached folders, once
    setup.validate_config(cfg, jax.device_count())
    storage.check_bucket(workdir)
    storage.makedirs(workdir)
    # the tiny variant's models and data, and the prepared dataset, are written once, by process 0
    teacher_dir, raw_data = parallel.process_zero_first(setup.resolve_inputs, cfg, workdir, name="inputs")
    reward_path, lrm_path = parallel.process_zero_first(setup.resolve_reward_paths, cfg, workdir, name="rewards")
    with cfg.unlocked():
        cfg.teacher, cfg.data_dir, cfg.reward.path, cfg.lrm.path = teacher_dir, raw_data, reward_path, lrm_path
    setup.check_resume(cfg, workdir)
    parallel.barrier("config")   # every process has read the old config.json before process 0 replaces it
    checkpoint.save_config(workdir, cfg)
    mesh = parallel.make_mesh(dict(cfg.mesh))
    log.info("mesh: %s", parallel.describe(mesh))
    run = setup.build_run(cfg, teacher_dir, mesh)

    global_batch = cfg.per_device_batch * jax.device_count()
    filters = dict(cfg.get("data_filter") or {})
    prepared = parallel.process_zero_first(setup.prepare_data, raw_data,
                                           os.path.join(storage.local_dir(workdir), "data"), filters, name="data")
    if encoded.is_encoded(prepared):   # made by this teacher's VAE and text encoder, at this resolution?
        encoded.check_matches(prepared, teacher_dir, cfg.resolution)
    it = data_lib.make_train_iterator(
        prepared, tokenizer=run.pipe.tokenizer,
        resolution=cfg.resolution, batch_size_per_host=global_batch // jax.process_count(), seed=cfg.seed,
        random_crop=cfg.random_crop, random_flip=cfg.random_flip, min_size=int(filters.get("min_size", 0)))
    context = {"run": run, "workdir": workdir, "resolution": cfg.resolution, "config": cfg,
               "grid_prompts": tuple(cfg.evals.grids.prompts) if "grids" in cfg.get("evals", {}) else ()}
    job = loop_lib.Job(
        name="train", mesh=mesh, state=run.state, state_shardings=run.state_shardings,
        step_fn=make_train_step(run.models, cfg.lcd, run.tx, run.abar, cfg.reward, cfg.lrm),
        frozen=run.frozen, frozen_shardings=run.frozen_shardings, batches=it,
        make_batch=lambda host: parallel.global_batch(device_batch(host, run.models), mesh),
        examples_per_step=global_batch, evaluators=evaluators.from_config(cfg.get("evals"), context),
        data_stats=lambda: it.stats.as_dict())
    result = loop_lib.train(job, cfg, workdir)
    if result.step >= cfg.total_steps:
        export(run, result.state, result.step, workdir, cfg)
    return result.metrics
