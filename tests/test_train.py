"""The tiny trainer end to end: train, checkpoint, crash + resume, SIGTERM, NaN stop, export.

The sharded step is in test_train_sharded.py."""
import json
import os
import shutil
import signal
import subprocess
import time

import diffusers
import ml_collections
import numpy as np
import pytest
import torch

from conftest import REPO, load_config
from jaxlcd import tiny
from jaxlcd.distill import job as loop, setup
from jaxlcd.export import main as export_main
from jaxlcd.errors import InputError, TrainingError
from jaxlcd.training import checkpoint
from tiny_run import STEPS, cli, losses, make_inputs, tiny_config


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train(tiny_config(inputs, peak_tflops=1.0), workdir)   # a CPU has no peak in the table: give one
    return workdir


def test_tiny_run_trains_checkpoints_and_exports(trained):
    record = losses(trained)
    assert sorted(record) == list(range(1, STEPS + 1)) and all(np.isfinite(v) for v in record.values())
    with open(os.path.join(trained, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "mfu" in r]
    # MFU = model FLOPs per step / (devices x 1 TFLOP/s) x steps/s: the same FLOPs at every logged step
    share = [r["mfu"] / r["steps_per_s"] for r in rows]
    assert len(rows) == STEPS and 0 < min(share) and max(share) - min(share) <= 1e-9 * max(share)
    assert checkpoint.Checkpointer(trained).latest_step() == STEPS
    assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["2", "4"]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(trained, "tensorboard")))
    assert "final_lcm1.png" in os.listdir(os.path.join(trained, "samples"))
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(os.path.join(trained, "export", "student"),
                                                                    safety_checker=None)
    assert pipe.unet.config.time_cond_proj_dim == 256
    with torch.no_grad():
        image = pipe("a red circle", num_inference_steps=1, guidance_scale=8.5, height=64, width=64,
                     output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.all(np.isfinite(image))


def test_export_cli_exports_an_older_checkpoint(trained, tmp_path):
    out = str(tmp_path / "export2")
    assert export_main(["--workdir", trained, "--out", out, "--step", "2", "--which", "target"]) == 0
    assert diffusers.UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).config.time_cond_proj_dim == 256


def test_resume_after_kill_matches_uninterrupted_run(inputs, trained, tmp_path):
    """kill -9 from outside once the step-2 checkpoint is on disk (the step-4 save waits for it to finish and then
    takes seconds, so the kill lands between them), then rerun: the run resumes at step 2 and its losses equal the
    uninterrupted run's."""
    workdir = str(tmp_path / "crash")
    with open(tmp_path / "crash.log", "w") as log:
        proc = subprocess.Popen(cli(inputs, workdir), stdout=log, stderr=subprocess.STDOUT)
        first = os.path.join(workdir, "checkpoints", "2")
        deadline = time.time() + 300
        while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "crash.log").read_text()[-2000:]
    assert checkpoint.Checkpointer(workdir).latest_step() == 2
    resumed = subprocess.run(cli(inputs, workdir), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from the checkpoint at step 2" in resumed.stderr
    want, got = losses(trained), losses(workdir)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_sigterm_saves_and_exits_cleanly(inputs, tmp_path):
    workdir = str(tmp_path / "preempt")
    proc = subprocess.Popen(cli(inputs, workdir, "--config.total_steps=100000", "--config.checkpoint_every=100000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: saved the checkpoint" in err
    saved = checkpoint.Checkpointer(workdir).latest_step()
    assert saved is not None and saved >= max(losses(workdir))


def test_nan_stops_without_saving(inputs, tmp_path):
    workdir = str(tmp_path / "nan")
    cfg = tiny_config(inputs, **{"optim.learning_rate": 1e38, "checkpoint_every": 1, "total_steps": 6})
    with pytest.raises(TrainingError, match=r"NaN/Inf at step (\d+).*last good checkpoint is untouched") as e:
        loop.train(cfg, workdir)
    bad_step = int(e.value.args[0].split("at step ")[1].split()[0])
    latest = checkpoint.Checkpointer(workdir).latest_step()
    assert latest is None or latest < bad_step


@pytest.mark.parametrize("overrides,message", [
    ({"lcd.w_min": 20.0}, "lcd.w_min=20.0 is larger than lcd.w_max=15.0"),
    ({"lcd.loss": "huberr"}, "lcd.loss='huberr' is unknown"),
    ({"mesh.data": 3, "mesh.fsdp": 1}, "not divisible by the mesh's batch axes data\\*fsdp = 3"),
    ({"teacher": "/nonexistent/sd"}, "config.teacher='/nonexistent/sd' does not exist"),
    ({"remat": "dot"}, "remat='dot' is not a remat policy; use one of \\['none', 'full', 'dots', 'dots_no_batch'\\]"),
    ({"attention": "flash"}, "attention='flash' is not an attention implementation"),
    ({"attention": "cudnn"}, "attention='cudnn' needs an NVIDIA GPU, but this run's backend is cpu"),
    ({"reward.remat": "sometimes"}, "reward.remat='sometimes' is unknown"),
])
def test_bad_config_is_one_clear_sentence(inputs, overrides, message):
    with pytest.raises(setup.ConfigValueError, match=message):
        setup.validate_config(tiny_config(inputs, **overrides), 8)


def test_cli_reports_config_errors(inputs, tmp_path):
    bad = subprocess.run(cli(inputs, str(tmp_path / "w"), "--config.lcd.w_min=20"), capture_output=True, text=True)
    assert bad.returncode == 2 and "error: lcd.w_min=20.0 is larger than lcd.w_max=15.0" in bad.stderr
    typo = subprocess.run(cli(inputs, str(tmp_path / "w"), "--config.lcd.w_mn=3"), capture_output=True, text=True)
    assert typo.returncode == 2 and len(typo.stderr.strip().splitlines()) == 1, typo.stderr
    assert "has no key 'lcd.w_mn'; did you mean 'lcd.w_min'?" in typo.stderr
    renamed = subprocess.run(cli(inputs, str(tmp_path / "w"), "--config.sample_every=5"), capture_output=True,
                             text=True)
    assert renamed.returncode == 2 and "'sample_every' was renamed to 'evals.grids.every'" in renamed.stderr


CONFIG_FILES = sorted(os.path.relpath(os.path.join(d, f), os.path.join(REPO, "configs"))
                      for d, _, files in os.walk(os.path.join(REPO, "configs")) for f in files if f.endswith(".py"))


@pytest.mark.parametrize("file", CONFIG_FILES)
def test_every_config_field_can_be_overridden_from_the_command_line(file):
    """ml_collections' flags cannot override a list (e.g. --config.unet.block_out_channels='(64,128)'): use tuples."""
    def lists(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                yield from lists(value, f"{prefix}{key}.")
            elif isinstance(value, list):
                yield prefix + key

    for variant in ("tiny", "demo"):
        assert list(lists(load_config(variant, file))) == [], variant


# ------------------------------------------------------------------------------------ reruns of a workdir
@pytest.fixture
def rerun(trained, tmp_path):
    """A copy of the finished tiny run (steps 1-4, checkpoints at 2 and 4, export at 4) to rerun."""
    workdir = str(tmp_path / "rerun")
    shutil.copytree(trained, workdir, symlinks=True)
    return workdir


def _export_step(workdir):
    with open(os.path.join(workdir, "export", "step.json")) as f:
        return json.load(f)["step"]


def test_rerun_applies_a_new_learning_rate_and_total_and_exports_again(inputs, rerun):
    assert _export_step(rerun) == STEPS
    loop.train(tiny_config(inputs, **{"total_steps": STEPS + 2, "optim.learning_rate": 5e-5}), rerun)
    records = [json.loads(line) for line in open(os.path.join(rerun, "metrics.jsonl"))]
    assert [r["lr"] for r in records if r["step"] > STEPS] == pytest.approx([5e-5, 5e-5])
    assert records[0]["lr"] == pytest.approx(1e-4)   # the first run's rate
    assert _export_step(rerun) == STEPS + 2 and not any(n.startswith("export.tmp") for n in os.listdir(rerun))


def test_a_partial_export_is_redone(inputs, rerun):
    os.remove(os.path.join(rerun, "export", "step.json"))   # as an export killed before it completed
    shutil.rmtree(os.path.join(rerun, "export", "target"))
    loop.train(tiny_config(inputs), rerun)
    assert _export_step(rerun) == STEPS and os.path.isfile(os.path.join(rerun, "export", "target", "model_index.json"))


def test_a_changed_data_dir_or_teacher_is_refused(inputs, rerun, tmp_path):
    other_data = str(tmp_path / "other_data")
    tiny.write_image_folder(other_data, n=24, seed=1)
    with pytest.raises(InputError, match=r"was prepared from .*, but config.data_dir is now .*other_data"):
        loop.train(tiny_config((inputs[0], other_data)), rerun)
    other_teacher = tiny.write_teacher_folder(str(tmp_path / "other_teacher"), seed=1)
    with pytest.raises(InputError, match="config.teacher cannot change when resuming"):
        loop.train(tiny_config((other_teacher, inputs[1])), rerun)
