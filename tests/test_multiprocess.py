"""Multi-process runs on this machine, as on a pod: JAX's coordinator variables, a shared workdir, CPU devices.

2 processes x 2 devices with the student, its EMA target and the AdamW moments sharded (fsdp) across both processes:
train, checkpoint, kill -9 of both mid-run and resume (same losses), grids and exports written (the export equal to
a one-process export of the same checkpoint); SIGTERM reaching one process; kill -9 of one process.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO

LAUNCH = os.path.join(REPO, "launch", "multiprocess.sh")
FSDP_ACROSS = ["--config=configs/rglcd.py:tiny", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
               "--config.per_device_batch=1", "--config.log_every=1", "--config.evals.grids.steps=(1,)"]
RUN = ["--config.total_steps=4", "--config.checkpoint_every=2"]
UNET = os.path.join("export", "student", "unet", "diffusion_pytorch_model.safetensors")


def _env(**extra):
    # the launcher sets the device count; drop conftest's 8 simulated devices
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "DEVICES": "2", "XLA_FLAGS": "--xla_backend_optimization_level=0", "PYTHON": sys.executable,
            **extra}


def _launch(workdir, *args, **popen):
    return subprocess.Popen(["bash", LAUNCH, "2", str(workdir), *FSDP_ACROSS, *args], cwd=REPO, env=_env(),
                            **popen)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _why(out: str) -> str:
    """What a failed launch said: every line naming an error (each process's), then the end of the output."""
    errors = [line for line in out.splitlines() if "rror" in line and not line.startswith(" ")]
    return "\n".join(errors[-30:]) + "\n...\n" + out[-3000:]


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mp") / "run"
    proc = _launch(workdir, *RUN, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, _why(out)
    return workdir, out


def test_two_processes_train_checkpoint_and_export(reference):
    workdir, out = reference
    assert "| 4 x cpu (cpu) | 2 processes" in out and "mesh data=1 fsdp=4" in out
    assert sorted(_losses(workdir)) == [1, 2, 3, 4]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert os.path.isfile(workdir / "samples" / "final_lcm1.png")
    assert os.path.isfile(workdir / "export" / "target" / "model_index.json") and os.path.isfile(workdir / UNET)
    hosts = json.loads((workdir / "checkpoints" / "4" / "data" / "metadata").read_text())["hosts"]
    assert len(hosts) == 2 and hosts[0]["grain"]["next_index"] == 8   # each process's position in its own shard


def test_export_equals_a_one_process_export_of_the_same_checkpoint(reference, tmp_path):
    workdir, _ = reference
    out = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "jaxlcd.export", "--workdir", str(workdir), "--out", str(out),
                           "--step", "4"], cwd=REPO, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    multi, single = load_file(str(workdir / UNET)), load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert multi.keys() == single.keys()
    assert max(float(np.abs(multi[k] - single[k]).max()) for k in multi) <= 1e-6


def test_kill_both_processes_then_resume_reproduces_the_losses(reference, tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "crash"
    with open(tmp_path / "crash.log", "w") as log:
        launcher = _launch(workdir, *RUN, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not os.path.isdir(workdir / "checkpoints" / "2") and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        for pid in _children(launcher.pid):
            os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=60)
    assert launcher.returncode != 0, (tmp_path / "crash.log").read_text()[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    resumed = _launch(workdir, *RUN, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, _why(out)
    assert "resumed from the checkpoint at step 2" in out
    want, got = _losses(ref_dir), _losses(workdir)
    for step in (1, 2, 3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert os.path.isfile(workdir / UNET)


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    workdir = tmp_path / "preempt"
    with open(tmp_path / "term.log", "w") as log:
        launcher = _launch(workdir, "--config.total_steps=100000", "--config.checkpoint_every=100000", stdout=log,
                           stderr=subprocess.STDOUT)
        metrics = workdir / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.exists() and metrics.stat().st_size) and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        os.kill(_children(launcher.pid)[1], signal.SIGTERM)   # process 1 only
        launcher.wait(timeout=300)
    log_text = (tmp_path / "term.log").read_text()
    assert launcher.returncode == 0, _why(log_text)
    assert "SIGTERM: saved the checkpoint at step" in log_text
    saved = [int(d) for d in os.listdir(workdir / "checkpoints")]
    assert len(saved) == 1 and saved[0] >= max(_losses(workdir))


def test_kill_of_one_process_ends_the_other_within_a_minute(tmp_path):
    """Started without the launcher (which would stop the others itself): what ends the survivor is jaxlcd and
    JAX's coordination service (heartbeat timeout 10 s here, JAXLCD_HEARTBEAT_TIMEOUT_S)."""
    workdir = tmp_path / "one"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PLATFORMS="cpu",
               JAXLCD_HEARTBEAT_TIMEOUT_S="10")
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    cmd = [sys.executable, "-m", "jaxlcd.main", f"--workdir={workdir}", *FSDP_ACROSS, "--config.total_steps=100000",
           "--config.checkpoint_every=100000"]
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
            assert all(p.poll() is None for p in procs), (tmp_path / "p0.log").read_text()[-3000:]
            time.sleep(0.5)
        procs[1].kill()
        killed_at = time.time()
        rc = procs[0].wait(timeout=60)
        took = time.time() - killed_at
    finally:
        for p in procs:
            p.kill()
        for f in logs:
            f.close()
    survivor = (tmp_path / "p0.log").read_text()
    assert rc != 0 and took < 60
    assert "jaxlcd.main: error: process 0 of 2 stops" in survivor or "another task died" in survivor, survivor[-3000:]


def _run(workdir, nproc, *args):
    """Launch ``nproc`` processes x 1 device to the end; returns the combined output."""
    proc = subprocess.run(["bash", LAUNCH, str(nproc), str(workdir), *args], cwd=REPO, env=_env(DEVICES="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, _why(proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


SHORT = ["--config.per_device_batch=2", "--config.log_every=1", "--config.total_steps=2", "--config.checkpoint_every=2",
         "--config.evals.grids.steps=()"]


@pytest.mark.parametrize("variant,metric,exported", [("tiny,rm", "reward", "student"), ("tiny,lrm", "lrm_loss", "lrm")])
def test_reward_guided_variants_run_as_two_processes_with_fsdp_across(tmp_path, variant, metric, exported):
    from jaxlcd import tiny

    workdir = tmp_path / "run"
    monitor = []   # the rm variant also runs the reward-hacking monitor: its gather, sampling and agreed stop flag
    if variant == "tiny,rm":
        heldout = tiny.write_reward_folder(str(tmp_path / "heldout"), seed=9)
        monitor = [f"--config.evals.hacking.heldout=clipscore={heldout}", "--config.evals.hacking.every=1",
                   "--config.evals.hacking.num_prompts=2", "--config.evals.hacking.stop_if.patience=5"]
    out = _run(workdir, 2, f"--config=configs/rglcd.py:{variant}", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
               *SHORT, *monitor)
    assert "mesh data=1 fsdp=2" in out and "| 2 processes" in out
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    if monitor:
        evaluations = [r for r in records if "hacking.heldout" in r]
        assert [r["step"] for r in evaluations] == [1, 2] and os.path.isfile(workdir / "best" / "best.json")
        records = [r for r in records if metric in r]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r[metric]) for r in records)
    assert os.path.isfile(workdir / "export" / exported / ("config.json" if exported == "lrm" else "model_index.json"))


def test_four_processes_one_device_each_train_data_parallel(tmp_path):
    workdir = tmp_path / "dp"
    out = _run(workdir, 4, "--config=configs/rglcd.py:tiny", "--config.mesh.data=-1", "--config.mesh.fsdp=1", *SHORT)
    assert "mesh data=4 fsdp=1" in out and "| 4 x cpu (cpu) | 4 processes" in out
    assert sorted(_losses(workdir)) == [1, 2] and all(np.isfinite(v) for v in _losses(workdir).values())
    hosts = json.loads((workdir / "checkpoints" / "2" / "data" / "metadata").read_text())["hosts"]
    assert len(hosts) == 4 and all(h["grain"]["next_index"] == 4 for h in hosts)   # 2 steps x 2 examples per host
    assert os.path.isfile(workdir / UNET)


def test_lrm_pretraining_runs_as_two_processes(tmp_path):
    workdir = tmp_path / "lrm"
    out = _run(workdir, 2, "--config=configs/lrm_pretrain.py:tiny", "--config.per_device_batch=4",
               "--config.total_steps=2", "--config.checkpoint_every=2", "--config.log_every=1")
    assert "| 2 processes" in out
    assert sorted(_losses(workdir)) == [1, 2] and os.path.isfile(workdir / "lrm" / "config.json")


def test_encode_as_two_processes_splits_the_data(tmp_path):
    """`python -m jaxlcd.encode` in 2 processes (JAX's variables, as on a pod): each process encodes a disjoint half,
    together every example once, with the moments a one-process encode gives."""
    from jaxlcd import tiny
    from jaxlcd.data import encoded
    from jaxlcd.encode import encode

    teacher = tiny.write_teacher_folder(str(tmp_path / "teacher"))
    data = tmp_path / "data"
    tiny.write_image_folder(str(data), n=24, resolution=64, seed=0)
    for i in range(24):   # unique captions, to match records across encodes
        caption = data / f"img_{i:04d}.txt"
        caption.write_text(f"{caption.read_text()} #{i}")
    out = tmp_path / "encoded"
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    env = {**_env(), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port.getsockname()[1]}", "JAX_NUM_PROCESSES": "2",
           "JAX_PLATFORMS": "cpu"}
    port.close()
    args = [sys.executable, "-m", "jaxlcd.encode", "--teacher", teacher, "--data_dir", str(data), "--out", str(out),
            "--resolution", "64", "--dtype", "float32", "--batch_per_device", "4"]
    procs = [subprocess.Popen(args, cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], _why("\n".join(outs))
    meta = encoded.read_metadata(str(out))
    assert meta["count"] == 24
    per_process = []
    for proc in range(2):
        progress = json.loads((out / f"progress-{proc:05d}.json").read_text())
        part = tmp_path / f"only{proc}"
        part.mkdir()
        for name in os.listdir(out):
            if name.startswith(f"part-{proc:05d}-"):
                os.symlink(out / name, part / name)
        (part / encoded.METADATA).write_text(json.dumps(meta))
        source = encoded.EncodedSource(str(part))
        per_process.append({source[i]["caption"]: source[i]["moments"] for i in range(len(source))})
        assert progress["count"] == len(source) == 12
    assert not set(per_process[0]) & set(per_process[1])
    reference = tmp_path / "one_process"
    encode(teacher, str(data), str(reference), resolution=64, dtype="float32", batch_per_device=4)
    whole = encoded.EncodedSource(str(reference))
    together = {**per_process[0], **per_process[1]}
    assert len(whole) == 24 and set(together) == {whole[i]["caption"] for i in range(24)}
    for i in range(24):   # float32 rounding: the processes compile at another XLA optimisation level, other batches
        np.testing.assert_allclose(together[whole[i]["caption"]], whole[i]["moments"], rtol=1e-4, atol=1e-5)


def test_eval_as_two_processes_splits_generation_and_equals_one_process(tmp_path):
    """`python -m jaxlcd.eval` in 2 processes: each generates its half of the images (i % 2), process 0 scores; the
    images equal a one-process evaluation's."""
    import jax

    from jaxlcd import export
    from jaxlcd.eval import main as eval_main
    from jaxlcd.loaders import load_component
    from tiny_pipeline import make_pipeline_dir

    teacher = make_pipeline_dir(str(tmp_path / "teacher"), seed=4)
    unet, params = load_component(os.path.join(teacher, "unet"))
    student, sparams = export.add_cond_proj(unet, params, rng=jax.random.PRNGKey(2))
    lcm = export.export_student_pipeline(str(tmp_path / "lcm"), teacher, student, sparams)
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(6)))
    args = ["--model", lcm, "--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--batch-size", "2"]
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    env = {**_env(), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port.getsockname()[1]}", "JAX_NUM_PROCESSES": "2",
           "JAX_PLATFORMS": "cpu"}
    port.close()
    cmd = [sys.executable, "-m", "jaxlcd.eval", *args, "--out", str(tmp_path / "two")]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], _why("\n".join(outs))
    assert "| lcm lcm2 |" in outs[0] and "| lcm lcm2 |" not in outs[1]   # process 0 reports
    rows = json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["lcm lcm2"]
    folder = tmp_path / "two" / "images" / "lcm_lcm2"
    assert sorted(os.listdir(folder)) == [f"{i:05d}.png" for i in range(6)] + ["timing-0.json", "timing-1.json"]
    assert eval_main([*args, "--out", str(tmp_path / "one")]) == 0
    from PIL import Image
    for i in range(6):
        two = np.asarray(Image.open(folder / f"{i:05d}.png"), np.int32)
        one = np.asarray(Image.open(tmp_path / "one" / "images" / "lcm_lcm2" / f"{i:05d}.png"), np.int32)
        assert np.abs(two - one).max() <= 2, i   # float rounding of another compile may move a pixel level
