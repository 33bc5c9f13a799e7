"""The tiny training run shared by test_train.py and test_train_sharded.py: its inputs, config and CLI line."""
import json
import os
import sys

from conftest import REPO, load_config
from jaxlcd import tiny

CONFIG = os.path.join(REPO, "configs", "rglcd.py")
STEPS = 4


def make_inputs(root) -> tuple[str, str]:
    """A tiny random teacher folder and a tiny image-caption folder under ``root``: (teacher, data_dir)."""
    teacher = tiny.write_teacher_folder(str(root / "teacher"))
    tiny.write_image_folder(str(root / "data"), n=24, resolution=64, seed=0)
    return teacher, str(root / "data")


def tiny_config(inputs, **overrides):
    """configs/rglcd.py:tiny on ``inputs``, STEPS steps, checkpoints every 2; ``overrides`` by dotted key."""
    cfg = load_config("tiny")
    cfg.teacher, cfg.data_dir = inputs
    cfg.total_steps, cfg.checkpoint_every, cfg.log_every, cfg.per_device_batch = STEPS, 2, 1, 1
    cfg.evals.grids.steps = (1,)  # the grids' other step counts only cost compile time here
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def cli(inputs, workdir, *extra):
    """The same run as `tiny_config` as a `python -m jaxlcd.main` command line."""
    return [sys.executable, "-m", "jaxlcd.main", f"--config={CONFIG}:tiny", f"--workdir={workdir}",
            f"--config.teacher={inputs[0]}", f"--config.data_dir={inputs[1]}", f"--config.total_steps={STEPS}",
            "--config.checkpoint_every=2", "--config.log_every=1", "--config.per_device_batch=1",
            "--config.evals.grids.steps=(1,)", *extra]


def losses(workdir):
    """step -> loss, the last record of each step winning (a resumed run re-logs the replayed steps)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}
