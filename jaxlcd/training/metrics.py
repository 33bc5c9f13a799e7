"""Where a run's numbers go: ``metrics.jsonl`` + TensorBoard, written by process 0 only."""
from __future__ import annotations

import json
import os
import signal

import jax


class MetricWriter:
    """``<workdir>/metrics.jsonl`` (one object per write) + TensorBoard event files in ``<workdir>/tensorboard``;
    every process may call it, only process 0 writes."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        """Append ``{"step": step, **metrics}`` (floats) and add each value to TensorBoard."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class StopFlag:
    """Set by SIGTERM (e.g. a TPU preemption): the loop saves a checkpoint and exits cleanly. Restore the previous
    handler with `restore`."""

    def __init__(self):
        self.stop = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.stop = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._old)
