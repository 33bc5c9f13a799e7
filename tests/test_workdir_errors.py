"""OS errors on the workdir, each one sentence (exit 2) with the last good checkpoint intact: a write past the file
size limit while checkpointing (what a full disk does to orbax), a full disk under metrics.jsonl (/dev/full), an
unwritable workdir, and a workdir path through a regular file. After each, rerunning resumes."""
import os
import shutil
import subprocess

import pytest

from conftest import REPO
from tiny_run import cli, losses, make_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def _run(args):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)


def _one_sentence(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def _with_file_size_limit_1mb(args):
    # SIGXFSZ ignored: a write past the limit fails with EFBIG instead of killing the process
    return ["bash", "-c", "trap '' XFSZ; ulimit -f 1024; exec \"$@\"", "limit", *args]


def test_failed_checkpoint_write_and_full_disk_are_one_sentence_and_the_run_resumes(inputs, tmp_path):
    workdir = tmp_path / "run"
    first = _run(cli(inputs, workdir, "--config.total_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]

    # the checkpoint at step 4 cannot be written (its data files are larger than 1 MB)
    failed = _run(_with_file_size_limit_1mb(cli(inputs, workdir)))
    line = _one_sentence(failed)
    assert line.startswith("jaxlcd.main: error: saving the checkpoint at step 4") and "File too large" in line
    assert "the last complete checkpoint (2) is intact" in line
    assert len(failed.stderr.splitlines()) < 40, failed.stderr[-3000:]   # not orbax's thousands of lines

    # a full disk under metrics.jsonl
    kept = workdir / "metrics.kept"
    shutil.move(workdir / "metrics.jsonl", kept)
    os.symlink("/dev/full", workdir / "metrics.jsonl")
    line = _one_sentence(_run(cli(inputs, workdir)))
    assert "No space left on device" in line and "rerun the same command to resume" in line

    os.remove(workdir / "metrics.jsonl")
    shutil.move(kept, workdir / "metrics.jsonl")
    resumed = _run(cli(inputs, workdir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint at step 2" in resumed.stderr
    assert "resuming with optim" not in resumed.stderr   # nothing changed, nothing reported as changed
    assert sorted(losses(workdir)) == [1, 2, 3, 4] and sorted(os.listdir(workdir / "checkpoints"))[-1] == "4"


@pytest.mark.parametrize("where,reason", [("unwritable", "use a workdir you can write to"),
                                          ("through_a_file", "a part of the path is a file")])
def test_a_workdir_that_cannot_be_created_is_one_sentence(inputs, tmp_path, where, reason):
    if where == "unwritable":
        workdir = "/sys/jaxlcd-test/run"   # sysfs refuses new folders, to root too
    else:
        (tmp_path / "a_file").write_text("not a folder")
        workdir = str(tmp_path / "a_file" / "run")
    line = _one_sentence(_run(cli(inputs, workdir)))
    assert line.startswith("jaxlcd.main: error: cannot read or write") and reason in line
