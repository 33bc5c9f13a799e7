"""Orbax checkpoints of the train state + data-iterator state, with the run config saved beside them."""
from __future__ import annotations

import contextlib
import json
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jaxlcd import storage
from jaxlcd.errors import InputError, MissingFileError, WriteError


class Checkpointer:
    """Async orbax CheckpointManager in ``<workdir>/checkpoints`` keeping the last ``keep`` steps.

    Each checkpoint holds ``state`` (the TrainState pytree, restored directly into the given shardings)
    and ``data`` (the JSON-serialisable data-iterator state). A save that fails (disk full, no permission) raises
    WriteError naming the step and the last complete checkpoint, which stays as it was.
    """

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = storage.absolute(storage.join(workdir, "checkpoints"))   # orbax reads gs:// itself
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._done = self._pending = self.manager.latest_step()   # the last complete save / the one in flight

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: Any) -> None:
        """Start saving ``state`` at ``step`` (async, after the previous save completes); the previous checkpoints
        stay until it completes."""
        self.wait()
        self._pending = step
        self._guard(lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True))

    def _guard(self, fn) -> None:
        """``fn()``; a failure of the save in flight as one WriteError sentence."""
        try:
            fn()
        except Exception as e:   # orbax/tensorstore wrap OS errors in ValueError/RuntimeError of many shapes
            raise WriteError(f"saving the checkpoint at step {self._pending} in {self.directory} failed: "
                             f"{_os_reason(e)}; the last complete checkpoint ({self._done or 'none'}) is intact. "
                             "Free space or fix permissions, then rerun the same command to resume") from None

    def restore(self, step: int, abstract_state):
        """(state placed as ``abstract_state``'s shardings, data-iterator state) of checkpoint ``step``."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete."""
        self._guard(self.manager.wait_until_finished)
        self._done = self._pending

    def close(self) -> None:
        try:
            self.wait()
        except WriteError:
            with contextlib.suppress(Exception):   # the failed save's error is the one to report
                self.manager.close()
            raise
        self.manager.close()


def _os_reason(error: BaseException) -> str:
    """The OS reason inside an orbax/tensorstore error ("No space left on device"), else its first line."""
    text = str(error)
    m = re.search(r"([^:\[]+) \[os_error_code='\d+'\]", text) or re.search(r"\[Errno \d+\] ([^:'\]]+)", text)
    return m.group(1).strip() if m else text.splitlines()[0][:300] if text else type(error).__name__


def this_host_data_state(saved) -> Any:
    """This process's data-iterator state from a checkpoint's ``data`` item: ``{"hosts": [state per process]}``, or
    (checkpoints written before per-host states) the one state itself."""
    if isinstance(saved, dict) and "hosts" in saved:
        hosts = saved["hosts"]
        if len(hosts) != jax.process_count():
            raise InputError(f"the checkpoint holds the data position of {len(hosts)} processes, this run has "
                             f"{jax.process_count()}; resume with as many processes as wrote it")
        return hosts[jax.process_index()]
    return saved


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (the restore target)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_config(workdir: str, config) -> None:
    """``<workdir>/config.json``: the run's full config (for export and for humans); process 0 writes."""
    if jax.process_index() != 0:
        return
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True))


def load_config_dict(workdir: str) -> dict:
    path = storage.join(workdir, "config.json")
    storage.check_bucket(workdir)
    if not storage.exists(path):
        raise MissingFileError(f"{workdir!r} has no config.json; is it a jaxlcd training workdir?")
    return json.loads(storage.read_text(path))
