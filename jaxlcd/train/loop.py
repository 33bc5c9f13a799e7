"""The training loop: data -> compiled step -> logs, checkpoints, sample grids, export."""
from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxlcd import data as data_lib
from jaxlcd import parallel
from jaxlcd.diffusion import schedule
from jaxlcd.export import export_student_pipeline
from jaxlcd.pipeline import encode_prompts, lcm_generate
from jaxlcd.sample import make_grid, to_uint8
from jaxlcd.train import checkpoint, setup
from jaxlcd.train.step import make_train_step
from jaxlcd.weights import save_component

log = logging.getLogger("jaxlcd")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is left untouched."""


class _StopFlag:
    """Set by SIGTERM (TPU preemption): the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.stop = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.stop = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


class MetricWriter:
    """``metrics.jsonl`` (one object per logged step) + TensorBoard event files, on process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def sample_grids(run, cfg, params, out_dir: str, tag: str) -> None:
    """PNG grid per LCM step count on the validation prompts (fixed latents and noise)."""
    if not cfg.sample_lcm_steps:
        return
    pipe, student = run.pipe, run.models.student.clone(dtype=run.pipe.unet.dtype)
    ctx = encode_prompts(pipe, list(cfg.validation_prompts))
    shape = (len(cfg.validation_prompts), cfg.resolution // 8, cfg.resolution // 8, student.config.in_channels)
    z = jax.random.normal(jax.random.PRNGKey(1234), shape)
    os.makedirs(out_dir, exist_ok=True)
    for n in cfg.sample_lcm_steps:
        ts = tuple(int(t) for t in schedule.lcm_timesteps(n))
        noises = jax.random.normal(jax.random.PRNGKey(n), (n - 1,) + shape) if n > 1 else None
        _, images = lcm_generate(jax.device_get(params), pipe.vae_params, z, ctx, np.float32(8.5), run.abar, noises,
                                 unet=student, vae=pipe.vae, timesteps=ts, kind=run.models.prediction_type)
        Image.fromarray(make_grid(to_uint8(np.asarray(images)))).save(os.path.join(out_dir, f"{tag}_lcm{n}.png"))


def device_batch(host_batch: dict, models) -> dict:
    """The numeric part of a host batch plus the reward models' tokens of its captions."""
    out = {k: v for k, v in host_batch.items() if k != "caption"}
    captions = [str(c) for c in host_batch["caption"]]
    if models.reward is not None:
        out["reward_tokens"] = models.reward.tokenize(captions)
    if models.lrm is not None:
        out["lrm_tokens"] = models.lrm.tokenize(captions)
    return out


def _check_finite(pending, start_step):
    """Raise TrainingError at the first step whose loss or gradient norm was NaN/Inf."""
    for i, m in enumerate(jax.device_get(pending)):
        if not bool(m["finite"]):
            raise TrainingError(
                f"the loss or gradient became NaN/Inf at step {start_step + i + 1} (loss={float(m['loss'])}, "
                f"grad_norm={float(m['grad_norm'])}); stopping without saving, so the last good checkpoint is "
                "untouched. Lower optim.learning_rate or use compute_dtype=float32 and resume.")


def train(cfg, workdir: str) -> dict:
    """Run (or resume) training in ``workdir``; returns the last logged metrics."""
    parallel.maybe_initialize_distributed()
    setup.validate_config(cfg, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    teacher_dir, raw_data = setup.resolve_inputs(cfg, workdir)
    reward_path, lrm_path = setup.resolve_reward_paths(cfg, workdir)
    with cfg.unlocked():
        cfg.teacher, cfg.data_dir, cfg.reward.path, cfg.lrm.path = teacher_dir, raw_data, reward_path, lrm_path
    checkpoint.save_config(workdir, cfg)
    mesh = parallel.make_mesh(dict(cfg.mesh))
    log.info("mesh: %s", parallel.describe(mesh))
    run = setup.build_run(cfg, teacher_dir, mesh)

    global_batch = cfg.per_device_batch * jax.device_count()
    prepared = setup.prepare_data(raw_data, os.path.join(workdir, "data"), cfg.resolution, cfg.shapes_examples)
    it = data_lib.make_train_iterator(
        prepared, tokenizer=run.pipe.tokenizer,
        resolution=cfg.resolution, batch_size_per_host=global_batch // jax.process_count(), seed=cfg.seed,
        random_crop=cfg.random_crop, random_flip=cfg.random_flip)

    ckpt = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    state = run.state
    if start:
        state, data_state = ckpt.restore(start, checkpoint.abstract_like(run.state, run.state_shardings))
        it.set_state(data_state)  # a dict (JSON)
        log.info("resumed from the checkpoint at step %d", start)

    batch_sharding = parallel.batch_sharding(mesh)
    step_fn = jax.jit(make_train_step(run.models, cfg.lcd, run.tx, run.abar, cfg.reward, cfg.lrm),
                      in_shardings=(run.state_shardings, run.frozen_shardings, batch_sharding),
                      out_shardings=(run.state_shardings, parallel.replicated(mesh)), donate_argnums=0)
    writer, stopper = MetricWriter(workdir), _StopFlag()
    pending, last, t_window = [], {}, time.perf_counter()
    bar = tqdm(total=cfg.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    step = start
    try:
        while step < cfg.total_steps and not stopper.stop:
            batch = parallel.global_batch(device_batch(next(it), run.models), mesh)
            state, metrics = step_fn(state, run.frozen, batch)
            pending.append(metrics)
            step += 1
            bar.update(1)
            at_log, at_ckpt = step % cfg.log_every == 0 or step == cfg.total_steps, step % cfg.checkpoint_every == 0
            if at_log or at_ckpt:
                _check_finite(pending, step - len(pending))
                elapsed, n = time.perf_counter() - t_window, len(pending)
                last = {k: float(v) for k, v in jax.device_get(pending[-1]).items() if k != "finite"}
                last.update(steps_per_s=n / elapsed, images_per_s=n * global_batch / elapsed,
                            data_skipped=sum(v for k, v in it.stats.as_dict().items() if k != "examples"))
                writer.write(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4g}", img_s=f"{last['images_per_s']:.3g}")
                pending, t_window = [], time.perf_counter()
            if at_ckpt or step == cfg.total_steps:
                ckpt.save(step, state, json.loads(it.get_state()))
            if cfg.sample_every and step % cfg.sample_every == 0:
                sample_grids(run, cfg, state.params, os.path.join(workdir, "samples"), f"step{step:07d}")
            if cfg.get("debug_kill_at_step") and step == cfg.debug_kill_at_step:
                ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)  # testing only: a hard crash mid-run
        if stopper.stop and step < cfg.total_steps:
            _check_finite(pending, step - len(pending))
            ckpt.save(step, state, json.loads(it.get_state()))
            log.warning("SIGTERM: saved the checkpoint at step %d and stopped; rerun the same command to resume", step)
    finally:
        bar.close()
        ckpt.close()
        writer.close()
        stopper.restore()
    if step >= cfg.total_steps and jax.process_index() == 0:
        sample_grids(run, cfg, state.params, os.path.join(workdir, "samples"), "final")
        export_dtype = np.float16 if cfg.export_dtype == "float16" else np.float32
        for name, params in (("student", state.params), ("target", state.target_params)):
            out = os.path.join(workdir, "export", name)
            if not os.path.isdir(out):
                export_student_pipeline(out, teacher_dir, run.models.student, jax.device_get(params), export_dtype)
        if state.lrm_params is not None:
            save_component(run.models.lrm.module, jax.device_get(state.lrm_params), os.path.join(workdir, "export", "lrm"))
        log.info("exported the student and its EMA target to %s", os.path.join(workdir, "export"))
    return last
