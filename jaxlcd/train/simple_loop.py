"""A resumable loop for the small trainers (LRM pretraining, the demo world's models): one jitted step per batch,
progress bar, ``metrics.jsonl``, orbax checkpoints with the data-iterator state, a NaN stop."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from jaxlcd import parallel
from jaxlcd.train import checkpoint


def run_loop(workdir: str, cfg, mesh, state: Any, step_fn: Callable, frozen: Any, iterator, make_batch: Callable,
             desc: str, evaluate: Callable | None = None) -> tuple:
    """Train ``state`` for ``cfg.total_steps`` steps; rerunning in the same workdir resumes.

    step_fn(state, frozen, batch) -> (state, metrics dict of scalars) (jitted here, state donated; ``frozen``:
    params that do not train, passed as arguments rather than baked into the executable);
    iterator: a `jaxlcd.data.TrainIterator` (host batches, checkpointable); make_batch(host batch) -> device batch.
    cfg supplies total_steps, log_every, checkpoint_every, keep_checkpoints. State and frozen params are replicated
    over ``mesh`` (these models are small; the batch is split over it). ``evaluate(state) -> dict of floats``, if
    given, runs at every checkpoint; its values join that step's metrics. Returns (state, last logged metrics).
    """
    state, frozen = jax.device_put((state, frozen), parallel.replicated(mesh))  # as the step's outputs: no recompile
    ckpt = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state, data_state = ckpt.restore(start, checkpoint.abstract_like(
            state, jax.tree_util.tree_map(lambda x: x.sharding, state)))
        iterator.set_state(data_state)
    step_fn = jax.jit(step_fn, donate_argnums=0)
    last, metrics_file = {}, open(os.path.join(workdir, "metrics.jsonl"), "a")
    bar = tqdm(total=cfg.total_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
    try:
        for step in range(start + 1, cfg.total_steps + 1):
            state, metrics = step_fn(state, frozen, make_batch(next(iterator)))
            jax.block_until_ready(metrics["loss"])  # an honest rate/ETA (async dispatch would run ahead of the device)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(last["loss"]):
                    raise ValueError(f"{desc}: the loss became {last['loss']} at step {step}; lower the learning "
                                     "rate and rerun (the last checkpoint is untouched)")
                metrics_file.write(json.dumps({"step": step, **last}) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{last['loss']:.4g}")
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                ckpt.save(step, state, json.loads(iterator.get_state()))
                if evaluate is not None:
                    scores = evaluate(state)
                    last = dict(last, **scores)
                    metrics_file.write(json.dumps({"step": step, **scores}) + "\n")
                    metrics_file.flush()
                    bar.write(f"{desc} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    finally:
        bar.close()
        ckpt.close()
        metrics_file.close()
    return state, last


class ArrayBatches:
    """Endless shuffled batches of in-memory arrays (all with the same first dimension N), reshuffled every epoch
    from (seed, epoch); checkpointable like `jaxlcd.data.TrainIterator` (``get_state`` / ``set_state``)."""

    def __init__(self, arrays: dict, batch_size: int, seed: int):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.n = len(next(iter(arrays.values())))
        if self.n < batch_size:
            raise ValueError(f"{self.n} examples are fewer than one batch of {batch_size}")
        self.epoch, self.pos = 0, 0

    def __next__(self) -> dict:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        idx = np.sort(self._order(self.epoch)[self.pos:self.pos + self.batch_size])
        self.pos += self.batch_size
        return {k: v[idx] for k, v in self.arrays.items()}

    def _order(self, epoch: int) -> np.ndarray:
        """This epoch's permutation of the N examples, drawn once per epoch from (seed, epoch)."""
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def get_state(self) -> str:
        return json.dumps({"epoch": self.epoch, "pos": self.pos})

    def set_state(self, state) -> None:
        state = json.loads(state) if isinstance(state, (str, bytes)) else state
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
