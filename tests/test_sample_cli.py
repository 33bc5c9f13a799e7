"""python -m jaxlcd.sample, run in-process: outputs on an LCM student and a DDIM teacher, one-line errors."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxlcd import export, sample
from jaxlcd.weights import load_component
from tiny_pipeline import make_pipeline_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(teacher folder, exported LCM student folder)."""
    root = tmp_path_factory.mktemp("cli")
    teacher = make_pipeline_dir(str(root / "teacher"), seed=4)
    unet, params = load_component(os.path.join(teacher, "unet"))
    student, sparams = export.add_cond_proj(unet, params, rng=jax.random.PRNGKey(2))
    return teacher, export.export_student_pipeline(str(root / "lcm"), teacher, student, sparams)


def _outputs(out, n):
    names = sorted(os.listdir(out))
    assert names == [f"{i:06d}.png" for i in range(n)] + ["grid.png", "images.npy"]
    for i in range(n):
        assert Image.open(os.path.join(out, f"{i:06d}.png")).size == (32, 32)
    return np.load(os.path.join(out, "images.npy")), Image.open(os.path.join(out, "grid.png"))


def test_lcm_with_nchw_latents(dirs, tmp_path):
    lat = np.random.default_rng(0).standard_normal((3, 4, 16, 16)).astype(np.float32)  # NCHW
    np.save(tmp_path / "lat.npy", lat)
    out = tmp_path / "lcm"
    assert sample.main(["--model", dirs[1], "--prompt", "a red circle", "--latents", str(tmp_path / "lat.npy"),
                        "--steps", "2", "--batch-size", "2", "--seed", "1", "--out", str(out), "--save-array"]) == 0
    images, grid = _outputs(out, 3)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1 and np.isfinite(images).all()
    assert grid.size == (64, 64)  # 2 x 2 cells
    png = np.asarray(Image.open(out / "000002.png"))
    assert np.abs(png.astype(np.int32) - np.round(images[2] * 255)).max() <= 1
    # the same latents as NHWC give the same images (the layout is detected from the channel axis)
    np.save(tmp_path / "lat_nhwc.npy", lat.transpose(0, 2, 3, 1))
    sample.main(["--model", dirs[1], "--prompt", "a red circle", "--latents", str(tmp_path / "lat_nhwc.npy"),
                 "--steps", "2", "--batch-size", "2", "--seed", "1", "--out", str(tmp_path / "b"), "--save-array"])
    assert np.abs(np.load(tmp_path / "b" / "images.npy") - images).max() <= 1e-6


def test_ddim_on_teacher(dirs, tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square \n")
    out = tmp_path / "ddim"
    assert sample.main(["--model", dirs[0], "--prompts-file", str(tmp_path / "p.txt"), "--sampler", "ddim",
                        "--steps", "3", "--negative-prompt", "blurry", "--out", str(out), "--save-array"]) == 0
    images, grid = _outputs(out, 2)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert grid.size == (64, 32)
    assert np.abs(images[0] - images[1]).max() > 0  # different prompts and seeds give different images


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        sample.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("jaxlcd.sample: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_errors_are_one_line_with_exit_code_2(dirs, tmp_path, capsys):
    teacher, lcm = dirs
    out = str(tmp_path / "o")
    msg = _error(capsys, ["--model", str(tmp_path), "--prompt", "x", "--out", out])
    assert "model_index.json" in msg
    msg = _error(capsys, ["--model", teacher, "--prompt", "x", "--sampler", "lcm", "--out", out])
    assert "time_cond_proj_dim" in msg and "--sampler ddim" in msg
    (tmp_path / "empty.txt").write_text("\n  \n")
    msg = _error(capsys, ["--model", lcm, "--prompts-file", str(tmp_path / "empty.txt"), "--out", out])
    assert "no prompts" in msg
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 16, 16), np.float32))
    msg = _error(capsys, ["--model", lcm, "--prompt", "x", "--latents", str(tmp_path / "bad.npy"), "--out", out])
    assert "(2, 3, 16, 16)" in msg
    np.save(tmp_path / "three.npy", np.zeros((3, 4, 16, 16), np.float32))
    msg = _error(capsys, ["--model", lcm, "--prompt", "x", "--prompt", "y", "--latents", str(tmp_path / "three.npy"),
                          "--out", out])
    assert "3 samples but there are 2 prompts" in msg
    assert not os.path.exists(out)
