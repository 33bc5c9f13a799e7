"""The one training loop of every jaxlcd job (distillation, LRM pretraining, the demo world's trainers).

A job hands the loop a `Job` (its state, compiled-step function, data and evaluators); the loop owns the order:
restore the newest checkpoint -> compile the step -> steps with metrics, checkpoints and evaluators -> last
checkpoint. Rerunning in the same workdir resumes, data-iterator position included. A non-finite loss stops the run
with `TrainingError` before anything is saved, so the last good checkpoint stays; SIGTERM saves and returns.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxlcd import parallel
from jaxlcd.errors import TrainingError
from jaxlcd.training import checkpoint, flops
from jaxlcd.training.evaluators import Evaluator, StopRun
from jaxlcd.training.metrics import MetricWriter, StopFlag
from jaxlcd.training.optimizer import refresh_hyperparams

log = logging.getLogger("jaxlcd")


@dataclasses.dataclass
class Job:
    """What a training job gives the loop.

    step_fn(state, frozen, batch) -> (state, metrics: dict of scalars with "loss", optionally "finite");
    state / frozen: pytrees placed on ``state_shardings`` / ``frozen_shardings`` (``frozen``: params that do not
    train, passed as arguments rather than baked into the executable); batches: host batches, checkpointable
    (``get_state() -> JSON str`` / ``set_state``); make_batch(host batch) -> global device batch on ``mesh``;
    examples_per_step: the global batch (for images/s); data_stats() -> dict of counters logged as data_skipped.
    """
    name: str
    mesh: Any
    state: Any
    state_shardings: Any
    step_fn: Callable
    frozen: Any
    frozen_shardings: Any
    batches: Any
    make_batch: Callable
    examples_per_step: int
    evaluators: Sequence[Evaluator] = ()
    data_stats: Callable[[], dict] | None = None


@dataclasses.dataclass
class Result:
    state: Any
    step: int          # the last step trained (== cfg.total_steps unless stopped by SIGTERM or an evaluator)
    metrics: dict      # the last logged metrics (evaluator results included)


def _check_finite(pending: list, first_step: int) -> None:
    """Raise TrainingError at the first step whose loss (or gradient norm) was NaN/Inf."""
    for i, m in enumerate(jax.device_get(pending)):
        finite = bool(m["finite"]) if "finite" in m else bool(np.isfinite(m["loss"]))
        if not finite:
            extra = f", grad_norm={float(m['grad_norm'])}" if "grad_norm" in m else ""
            raise TrainingError(
                f"the loss or gradient became NaN/Inf at step {first_step + i} (loss={float(m['loss'])}{extra}); "
                "stopping without saving, so the last good checkpoint is untouched. Lower the learning rate (or use "
                "compute_dtype=float32) and resume.")


def _mfu_flops(job: Job, cfg, state, batch) -> float:
    """The step's model FLOPs / (devices x one device's peak FLOP/s), so MFU = this x steps/s; 0 when the peak is
    unknown (neither ``cfg.peak_tflops`` nor the device table: e.g. CPUs)."""
    peak = float(cfg.get("peak_tflops", 0.0) or 0.0) * 1e12 or flops.peak_flops(jax.devices()[0].device_kind)
    if not peak:
        return 0.0
    try:
        count = flops.model_flops(lambda: job.step_fn, state, job.frozen, batch)
    except Exception as e:  # noqa: BLE001 - the count is a report; training goes on without it
        log.warning("could not count the step's model FLOPs (%s: %s); MFU is not logged", type(e).__name__, e)
        return 0.0
    log.info("model FLOPs per step: %.4g TFLOP; MFU against %.4g TFLOP/s per device x %d devices",
             count / 1e12, peak / 1e12, jax.device_count())
    return count / (peak * jax.device_count())


def _data_states(batches) -> dict:
    """Every host's data-iterator state for the checkpoint (a collective on multi-process runs)."""
    return {"hosts": [json.loads(s) for s in parallel.all_processes_strings(batches.get_state())]}


def train(job: Job, cfg, workdir: str) -> Result:
    """Run (or resume) ``job`` for ``cfg.total_steps`` steps in ``workdir``, with ``cfg.log_every``,
    ``cfg.checkpoint_every`` and ``cfg.keep_checkpoints``."""
    ckpt = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints)
    start, state = ckpt.latest_step() or 0, job.state
    if start:
        state, data_state = ckpt.restore(start, checkpoint.abstract_like(state, job.state_shardings))
        job.batches.set_state(checkpoint.this_host_data_state(data_state))
        log.info("resumed from the checkpoint at step %d", start)
        if cfg.get("optim") is not None and hasattr(state, "opt_state"):
            opt_state, changed = refresh_hyperparams(state.opt_state, cfg.optim)
            state = state.replace(opt_state=opt_state)
            for name, (old, new) in changed.items():
                log.warning("resuming with optim.%s=%g (the checkpoint was trained with %g)", name, new, old)
    step_fn = jax.jit(job.step_fn, in_shardings=(job.state_shardings, job.frozen_shardings,
                                                 parallel.batch_sharding(job.mesh)),
                      out_shardings=(job.state_shardings, parallel.replicated(job.mesh)), donate_argnums=0)
    writer, stopper, lead = MetricWriter(workdir), StopFlag(), jax.process_index() == 0
    pending, last, t_window, step, stop = [], {}, time.perf_counter(), start, None
    flop_share = None   # model FLOPs per step / (devices x peak FLOP/s): MFU = flop_share x steps/s
    bar = tqdm(total=cfg.total_steps, initial=start, desc=job.name, unit="step", dynamic_ncols=True, disable=not lead)
    try:
        while step < cfg.total_steps and not parallel.any_process(stopper.stop):  # all stop at the same step
            batch = job.make_batch(next(job.batches))
            if flop_share is None:
                flop_share = _mfu_flops(job, cfg, state, batch)
                t_window = time.perf_counter()
            with jax.set_mesh(job.mesh):   # kernels that run per device (Pallas attention) see the mesh
                state, metrics = step_fn(state, job.frozen, batch)
            pending.append(metrics)
            step += 1
            bar.update(1)
            final = step == cfg.total_steps
            at_log, at_ckpt = step % cfg.log_every == 0 or final, step % cfg.checkpoint_every == 0 or final
            if at_log or at_ckpt:
                _check_finite(pending, step - len(pending) + 1)
                elapsed, n = time.perf_counter() - t_window, len(pending)
                last = {k: float(v) for k, v in jax.device_get(pending[-1]).items() if k != "finite"}
                last.update(steps_per_s=n / elapsed, images_per_s=n * job.examples_per_step / elapsed)
                if flop_share:
                    last["mfu"] = flop_share * n / elapsed
                if job.data_stats is not None:
                    last["data_skipped"] = sum(v for k, v in job.data_stats().items() if k != "examples")
                writer.write(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4g}", img_s=f"{last['images_per_s']:.3g}")
                pending, t_window = [], time.perf_counter()
            if at_ckpt:
                ckpt.save(step, state, _data_states(job.batches))
            scores, stop = {}, None
            for evaluator in job.evaluators:
                if evaluator.due(step, final):
                    try:
                        scores.update(evaluator.run(state, step, final))
                    except StopRun as e:   # the other evaluators still run at this step
                        scores.update(e.metrics)
                        stop = e
            if scores:
                writer.write(step, scores)
                last.update(scores)
                bar.write(f"{job.name} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
                t_window = time.perf_counter()   # evaluation time is not training time
            if stop is not None:
                if not at_ckpt:
                    ckpt.save(step, state, _data_states(job.batches))
                log.warning("%s", stop)
                break
        if step < cfg.total_steps and stop is None:   # SIGTERM on some process
            _check_finite(pending, step - len(pending) + 1)
            ckpt.save(step, state, _data_states(job.batches))
            log.warning("SIGTERM: saved the checkpoint at step %d and stopped; rerun the same command to resume", step)
    finally:
        bar.close()
        ckpt.close()
        writer.close()
        stopper.restore()
    return Result(state, step, last)


def single_model_job(name: str, cfg, state, step_fn: Callable, batches, make_batch: Callable, frozen=None,
                     evaluators: Sequence[Evaluator] = ()) -> Job:
    """A `Job` for the small trainers (LRM pretraining, the demo models): the mesh from ``cfg.mesh``, the state
    placed by the fsdp rules (replicated when ``mesh.fsdp`` is 1), frozen params replicated;
    ``make_batch(host batch, mesh)`` -> global batch."""
    mesh = parallel.make_mesh(dict(cfg.mesh))
    log.info("mesh: %s", parallel.describe(mesh))
    state, state_shardings = parallel.place(state, mesh)
    frozen, frozen_shardings = parallel.place(frozen, mesh, parallel.REPLICATE_RULES) if frozen is not None \
        else (None, None)
    return Job(name, mesh, state, state_shardings, step_fn, frozen, frozen_shardings, batches,
               lambda host: make_batch(host, mesh), cfg.per_device_batch * jax.device_count(), evaluators)
