"""In-memory training batches, checkpointable like `jaxlcd.data.TrainIterator`."""
from __future__ import annotations

import json

import numpy as np

from jaxlcd.errors import InputError


class ArrayBatches:
    """Endless shuffled batches of in-memory arrays (all with the same first dimension N), reshuffled every epoch
    from (seed, epoch); checkpointable like `jaxlcd.data.TrainIterator` (``get_state`` / ``set_state``)."""

    def __init__(self, arrays: dict, batch_size: int, seed: int):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.n = len(next(iter(arrays.values())))
        if self.n < batch_size:
            raise InputError(f"{self.n} examples are fewer than one batch of {batch_size}")
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
