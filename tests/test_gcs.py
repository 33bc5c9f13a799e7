"""A gs:// workdir (and gs:// teacher and data) against a real GCS API running locally (gcp-storage-emulator, see
gcs_emulator.py): train, checkpoint, resume, export, the export CLI, and one sentence for a bad bucket or no
credentials. The array_record files of the prepared data stay on local disk by design (jaxlcd.storage)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import diffusers
import numpy as np
import pytest

from conftest import REPO
from jaxlcd import storage
from jaxlcd.distill import job
from jaxlcd.export import main as export_main
from tiny_run import STEPS, cli, losses, make_inputs, tiny_config

BUCKET = "jaxlcd-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator on a free port with BUCKET, and this process's environment pointed at it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), str(port), BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the GCS emulator did not start"
            time.sleep(0.2)
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "JAXLCD_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in (*env, "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
    os.environ.update(env)
    yield env
    proc.kill()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def gs_inputs(emulator, local_inputs, scratch):
    """The tiny teacher and image folder uploaded to gs://BUCKET/inputs/."""
    out = []
    for name, folder in zip(("teacher", "data"), local_inputs):
        staging = shutil.copytree(folder, str(scratch / name))
        storage.publish_dir(staging, f"gs://{BUCKET}/inputs/{name}", marker="none")
        out.append(f"gs://{BUCKET}/inputs/{name}")
    return tuple(out)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("gcs")


def _objects(prefix: str) -> set:
    def walk(p):
        for child in p.iterdir():
            yield from walk(child) if child.is_dir() else [str(child)[len(prefix) + 1:]]
    return set(walk(storage.epath(prefix)))


@pytest.fixture(scope="module")
def gs_run(gs_inputs):
    """A run in gs://BUCKET/run: 2 steps, then resumed to STEPS; (workdir, objects after the first part, log)."""
    workdir = f"gs://{BUCKET}/run"
    job.train(tiny_config(gs_inputs, total_steps=2, checkpoint_every=1), workdir)
    first = _objects(workdir)
    first_export = json.loads(storage.read_text(f"{workdir}/export/step.json"))["step"]
    job.train(tiny_config(gs_inputs), workdir)
    return workdir, first, first_export


def test_gs_workdir_trains_checkpoints_resumes_and_exports(gs_run, local_inputs, scratch):
    workdir, first, first_export = gs_run
    assert {"config.json", "metrics.jsonl", "samples/final_lcm1.png", "export/step.json",
            "export/student/model_index.json", "export/target/unet/diffusion_pytorch_model.safetensors",
            "checkpoints/1/commit_success.txt", "checkpoints/2/commit_success.txt"} <= first
    assert any(o.startswith("tensorboard/events.out.tfevents") for o in first) and first_export == 2
    after = _objects(workdir)
    assert {"checkpoints/4/commit_success.txt"} <= after
    assert json.loads(storage.read_text(f"{workdir}/export/step.json"))["step"] == STEPS   # redone after resuming
    remote = {}
    for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines():
        record = json.loads(line)
        remote[record["step"]] = record.get("loss", remote.get(record["step"]))
    assert sorted(remote) == list(range(1, STEPS + 1))
    local_dir = str(scratch / "local_run")
    job.train(tiny_config(local_inputs), local_dir)            # the same run, uninterrupted, on local disk
    np.testing.assert_allclose([remote[s] for s in sorted(remote)], [losses(local_dir)[s] for s in sorted(remote)],
                               rtol=1e-5)
    exported = storage.local_copy(f"{workdir}/export/student")
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(exported, safety_checker=None)
    assert pipe.unet.config.time_cond_proj_dim == 256


def test_export_cli_reads_and_writes_gs(gs_run):
    workdir, _, _ = gs_run
    out = f"gs://{BUCKET}/exported"
    assert export_main(["--workdir", workdir, "--out", out, "--step", "2"]) == 0
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors"} <= _objects(out)


def _cli_error(args, env) -> str:
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_a_missing_bucket_is_one_sentence(emulator, local_inputs, scratch):
    line = _cli_error(cli(local_inputs, "gs://no-such-bucket/run"), dict(os.environ))
    assert line.startswith("jaxlcd.main: error:") and "the bucket gs://no-such-bucket does not exist" in line


def test_no_credentials_is_one_sentence(local_inputs, scratch):
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(HOME=str(scratch), CLOUDSDK_CONFIG=str(scratch / "gcloud"), NO_GCE_CHECK="True")
    line = _cli_error(cli(local_inputs, f"gs://{BUCKET}/run_no_creds"), env)
    assert "no credentials were found" in line and "gcloud auth application-default login" in line


def test_webdataset_shards_on_gs_are_indexed_and_read_in_place(emulator, scratch):
    from jaxlcd.data import shards
    from test_shards import GOOD_PER_SHARD, write_shards

    local = str(scratch / "shards")
    write_shards(local)
    storage.publish_dir(shutil.copytree(local, str(scratch / "shards_up")), f"gs://{BUCKET}/shards", marker="none")
    meta = shards.index_shards(f"gs://{BUCKET}/shards/{{00000..00002}}.tar", str(scratch / "gs_index"))
    assert meta["count"] == 3 * GOOD_PER_SHARD + 2 and meta["skipped"]["truncated_member"] == 1
    source = shards.ShardSource(str(scratch / "gs_index"))
    local_meta = shards.index_shards(local, str(scratch / "local_index"))
    local_source = shards.ShardSource(str(scratch / "local_index"))
    assert meta["count"] == local_meta["count"]
    for i in (0, 5, len(source) - 1):
        assert source[i]["image"] == local_source[i]["image"] and source[i]["caption"] == local_source[i]["caption"]


def test_encode_reads_a_gs_teacher_and_gs_shards(gs_inputs, scratch):
    from jaxlcd.data import encoded
    from jaxlcd.encode import encode
    from test_shards import write_shards

    local_shards = str(scratch / "enc_shards")
    write_shards(local_shards)
    storage.publish_dir(shutil.copytree(local_shards, str(scratch / "enc_shards_up")), f"gs://{BUCKET}/enc_shards",
                        marker="none")
    remote = encode(gs_inputs[0], f"gs://{BUCKET}/enc_shards", str(scratch / "enc_gs"), resolution=64, dtype="float32",
                    batch_per_device=2)
    local = encode(storage.local_copy(gs_inputs[0]), local_shards, str(scratch / "enc_local"),
                   resolution=64, dtype="float32", batch_per_device=2)
    assert remote["count"] == local["count"] > 0 and remote["teacher"] == gs_inputs[0]
    assert remote["teacher_fingerprint"] == local["teacher_fingerprint"]
    a, b = encoded.EncodedSource(str(scratch / "enc_gs")), encoded.EncodedSource(str(scratch / "enc_local"))
    assert [a[i]["caption"] for i in range(len(a))] == [b[i]["caption"] for i in range(len(b))]
