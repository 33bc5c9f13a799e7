"""Hub ids (``org/name[@revision]``) for teachers, reward models and ``jaxlcd.sample --model``, read from a Hugging
Face cache directory the test lays out itself (HF_HUB_OFFLINE=1: nothing is downloaded)."""
import os
import subprocess
import sys

import numpy as np
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


@pytest.fixture(scope="module")
def fp16_hub_cache(tmp_path_factory):
    """A hub cache whose ``jaxlcd-test/tiny-fp16`` has fp16 variant weights only in unet/ and vae/ (float16 tensors);
    the text encoder keeps its plain float32 weights, as in repositories that lack some variants."""
    from safetensors.numpy import load_file, save_file

    cache = tmp_path_factory.mktemp("hub16")
    repo = cache / "models--jaxlcd-test--tiny-fp16"
    snap = repo / "snapshots" / COMMIT
    tiny.write_teacher_folder(str(snap))
    for sub in ("unet", "vae"):
        plain = snap / sub / "diffusion_pytorch_model.safetensors"
        save_file({k: v.astype("float16") for k, v in load_file(str(plain)).items()},
                  str(snap / sub / "diffusion_pytorch_model.fp16.safetensors"), metadata={"format": "pt"})
        plain.unlink()   # as if fetched with the variant's patterns: only the fp16 file is cached
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, snap


def test_a_variant_selects_the_fp16_weights_of_a_cached_hub_id(fp16_hub_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.numpy import load_file

    from jaxlcd.pipeline import load_pipeline

    cache, snap = fp16_hub_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("JAXLCD_CACHE", str(tmp_path / "jaxlcd_cache"))
    view = paths.resolve_model_path("jaxlcd-test/tiny-fp16", "config.teacher", "fp16")
    assert os.path.isfile(os.path.join(view, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(view, "text_encoder", "model.safetensors"))   # no variant: the plain file
    pipe = load_pipeline(view)
    fp16 = load_file(str(snap / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    assert fp16["conv_in.bias"].dtype.name == "float16"
    np.testing.assert_array_equal(np.asarray(pipe.unet_params["conv_in"]["bias"]),
                                  fp16["conv_in.bias"].astype(np.float32))
    assert paths.resolve_model_path("jaxlcd-test/tiny-fp16", "config.teacher") == str(snap)   # no variant: as is


def test_sample_cli_takes_a_variant(fp16_hub_cache, tmp_path):
    cache, _ = fp16_hub_cache
    proc = subprocess.run([sys.executable, "-m", "jaxlcd.sample", "--model", "jaxlcd-test/tiny-fp16", "--variant",
                           "fp16", "--prompt", "a red circle", "--sampler", "ddim", "--steps", "2", "--out",
                           str(tmp_path / "o")], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(_offline_env(cache), JAXLCD_CACHE=str(tmp_path / "jc")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o" / "grid.png").is_file()
