"""Where a run's numbers go: ``metrics.jsonl`` + TensorBoard, written by process 0 only."""
from __future__ import annotations

import json
import signal

import jax

from jaxlcd import storage


class MetricWriter:
    """``<workdir>/metrics.jsonl`` (one object per write) + TensorBoard event files in ``<workdir>/tensorboard``;
    every process may call it, only process 0 writes. Cloud objects cannot be appended to: on a ``gs://`` workdir
    the whole metrics.jsonl is rewritten at each write (it is small), and the event files are written in
    `storage.local_dir` and uploaded after each write."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.path, self.remote = storage.join(workdir, "metrics.jsonl"), storage.is_remote(workdir)
            self.tb_dir = storage.join(workdir, "tensorboard")
            if self.remote:
                self.lines = storage.read_text(self.path) if storage.exists(self.path) else ""
                self.tb_local = storage.join(storage.local_dir(workdir), "tensorboard")
            else:
                self.jsonl = open(self.path, "a")
            self.tb = SummaryWriter(self.tb_local if self.remote else self.tb_dir)

    def write(self, step: int, metrics: dict) -> None:
        """Append ``{"step": step, **metrics}`` (floats) and add each value to TensorBoard."""
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if self.remote:
            self.lines += line
            storage.write_text(self.path, self.lines)
            self.tb.flush()
            storage.upload_tree(self.tb_local, self.tb_dir)
        else:
            self.jsonl.write(line)
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            if not self.remote:
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
