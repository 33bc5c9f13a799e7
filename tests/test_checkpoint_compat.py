"""A checkpoint written by jaxlcd before the package was restructured (commit PRE_RESTRUCTURE) still resumes.

The old code itself writes it: the test takes that commit's `jaxlcd/` and `configs/` out of this clone's git history,
trains a micro teacher's tiny run for 4 steps with it (checkpoints at 2 and 4), drops the step-4 checkpoint, and
resumes with the current code, which must reproduce the old run's losses at steps 3 and 4.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

PRE_RESTRUCTURE = "6bc4c81e62a4f64d69fee95417b885232d07a2d2"
MAKE_INPUTS = """
import sys
from jaxlcd.train import tiny
from jaxlcd.data.tiny_folder import write_tiny_folder
unet = dict(tiny.TINY_UNET, block_out_channels=[8, 16], cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
vae = dict(tiny.TINY_VAE, block_out_channels=[8, 8, 8, 8], norm_num_groups=4)
text = dict(tiny.TINY_TEXT, hidden_size=8, intermediate_size=12, num_attention_heads=2, num_hidden_layers=1)
tiny.write_teacher_folder(sys.argv[1] + "/teacher", seed=0, unet_config=unet, vae_config=vae, text_config=text)
write_tiny_folder(sys.argv[1] + "/images", n=8, resolution=64, seed=0)
"""
RUN = ["--config.total_steps=4", "--config.checkpoint_every=2", "--config.log_every=1", "--config.per_device_batch=1"]


def _losses(path):
    with open(path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _old_tree(dest) -> None:
    """The package and configs as they were at PRE_RESTRUCTURE, from this clone's history."""
    git = shutil.which("git")
    if git is None or subprocess.run([git, "-C", REPO, "cat-file", "-e", PRE_RESTRUCTURE + "^{commit}"],
                                     capture_output=True).returncode != 0:
        pytest.skip(f"needs git and commit {PRE_RESTRUCTURE[:7]} in this checkout's history (a full git clone)")
    archive = subprocess.run([git, "-C", REPO, "archive", PRE_RESTRUCTURE, "jaxlcd", "configs"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def test_checkpoint_written_before_the_restructure_resumes(tmp_path):
    old, inputs, workdir = tmp_path / "old", tmp_path / "inputs", tmp_path / "run"
    old.mkdir()
    _old_tree(old)
    subprocess.run([sys.executable, "-c", MAKE_INPUTS, str(inputs)], cwd=old, check=True, capture_output=True)
    paths = [f"--config.teacher={inputs / 'teacher'}", f"--config.data_dir={inputs / 'images'}"]
    # cwd=old: `python -m jaxlcd.main` imports the old package (the current one is installed behind it on sys.path)
    wrote = subprocess.run([sys.executable, "-m", "jaxlcd.main", "--config=configs/rglcd.py:tiny",
                            f"--workdir={workdir}", *paths, *RUN, "--config.sample_lcm_steps=()"],
                           cwd=old, capture_output=True, text=True)
    assert wrote.returncode == 0, wrote.stderr[-2000:]
    assert "debug_kill_at_step" in (workdir / "config.json").read_text()   # the old code's config wrote this
    old_losses = _losses(workdir / "metrics.jsonl")
    shutil.rmtree(workdir / "checkpoints" / "4")
    shutil.rmtree(workdir / "export")
    os.rename(workdir / "metrics.jsonl", workdir / "old_metrics.jsonl")

    resumed = subprocess.run([sys.executable, "-m", "jaxlcd.main", "--config=configs/rglcd.py:tiny",
                              f"--workdir={workdir}", *paths, *RUN, "--config.evals.grids.steps=()"],
                             cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from the checkpoint at step 2" in resumed.stderr
    new_losses = _losses(workdir / "metrics.jsonl")
    assert sorted(new_losses) == [3, 4]
    for step in (3, 4):
        assert new_losses[step] == pytest.approx(old_losses[step], rel=1e-6, abs=1e-7), step
    assert os.path.isfile(workdir / "export" / "student" / "unet" / "diffusion_pytorch_model.safetensors")
