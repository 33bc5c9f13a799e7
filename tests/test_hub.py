"""Hub ids (``org/name[@revision]``) for teachers, reward models and ``jaxlcd.sample --model``, read from a Hugging
Face cache directory the test lays out itself (HF_HUB_OFFLINE=1: nothing is downloaded)."""
import os
import subprocess
import sys

import pytest

from conftest import load_config
from jaxlcd import paths, tiny
from jaxlcd.distill import setup
from jaxlcd.errors import InputError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding ``jaxlcd-test/tiny-teacher`` (main = COMMIT) in huggingface_hub's layout."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--jaxlcd-test--tiny-teacher"
    tiny.write_teacher_folder(str(repo / "snapshots" / COMMIT))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def _offline_env(cache):
    return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")


def test_sample_reads_a_hub_id_from_the_cache(hub_cache, tmp_path):
    for model in ("jaxlcd-test/tiny-teacher", f"jaxlcd-test/tiny-teacher@{COMMIT}"):
        out = tmp_path / model.replace("/", "_")
        proc = subprocess.run([sys.executable, "-m", "jaxlcd.sample", "--model", model, "--prompt", "a red circle",
                               "--sampler", "ddim", "--steps", "2", "--out", str(out)], cwd=tmp_path,
                              env=_offline_env(hub_cache), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (out / "grid.png").is_file()


def test_a_missing_hub_id_offline_is_one_sentence_with_the_fetch_command(hub_cache, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxlcd.sample", "--model", "jaxlcd-test/not-cached", "--prompt", "x",
                           "--out", str(tmp_path / "o")], cwd=tmp_path, env=_offline_env(hub_cache),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--model='jaxlcd-test/not-cached' is neither a local folder nor in the Hugging Face cache" in proc.stderr
    assert "HF_HUB_OFFLINE is set; fetch it once online with: huggingface-cli download jaxlcd-test/not-cached" \
        in proc.stderr


def test_training_config_hub_ids_resolve_to_the_cached_folders(hub_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = str(hub_cache / "models--jaxlcd-test--tiny-teacher" / "snapshots" / COMMIT)
    cfg = load_config("tiny,rm")
    cfg.teacher, cfg.data_dir = "jaxlcd-test/tiny-teacher", str(tmp_path)
    cfg.reward.path = f"clipscore=jaxlcd-test/tiny-teacher@{COMMIT}"
    setup.resolve_model_ids(cfg)
    assert cfg.teacher == snapshot and cfg.reward.path == f"clipscore={snapshot}"
    setup.validate_config(cfg, 8)   # the teacher is a complete pipeline folder
    local = str(tmp_path)
    assert paths.resolve_model_path(local) == local and not paths.is_hub_id(local)   # local folders win
    with pytest.raises(InputError, match="config.teacher='jaxlcd-test/nope' is neither a local folder"):
        paths.resolve_model_path("jaxlcd-test/nope", "config.teacher")
