"""The default job (the demo world) end to end, shortened: RG-LCD with the shipped models, then the evaluation table
and grids. The LCD baseline is the same loop without a reward (tests/test_train.py); here it is skipped to
keep the default suite short, and `baseline_config` is checked directly."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO


def test_shortened_demo_job_trains_and_writes_the_table(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "jaxlcd.main", f"--config={REPO}/configs/rglcd.py", f"--workdir={workdir}",
           "--config.total_steps=2", "--config.per_device_batch=1", "--config.shapes_examples=64",
           "--config.demo.eval_prompts=4", "--config.log_every=1", "--config.demo.baselines=()"]
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user runs it (compiles faster than conftest's 8)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| teacher DDIM-50 |" in proc.stdout
    results = json.loads((workdir / "eval" / "results.json").read_text())
    rows = results["rows"]
    assert results["meta"]["guidance"] == {"ddim": 3.0, "lcm": 3.0}   # the demo config's scales, not SD's
    names = [r["name"] for r in rows]
    assert names[:2] == ["real (rendered)", "teacher DDIM-50"]
    assert [n for n in names if n.startswith("RG-LCM")] == [f"RG-LCM (direct: clipscore) {k}-step" for k in (1, 2, 4)]
    for r in rows:
        assert 0.0 <= r["judge_accuracy"] <= 1.0 and np.isfinite([r["train_rm"], r["heldout_rm"], r["hf_energy"]]).all()
        assert r["sampler"] == "real" or (r["images_per_s"] > 0 and np.isfinite(r["fid"]))
    assert (workdir / "eval" / "results.md").read_text().count("\n| ") == len(rows) + 1
    assert os.path.isfile(workdir / "eval" / "grids" / "side_by_side.png")
    assert (workdir / "export" / "student" / "model_index.json").is_file() and not (workdir / "baselines").exists()


def test_eval_refuses_a_workdir_without_a_run_in_one_sentence(tmp_path, capsys):
    from jaxlcd import eval as eval_cli

    assert eval_cli.main(["--workdir", str(tmp_path)]) == 2
    assert "holds no jaxlcd run" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"teacher": "/nowhere"}))
    assert eval_cli.main(["--workdir", str(tmp_path)]) == 2
    assert "is not a demo-world run" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"teacher": "/nowhere", "job": eval_cli.DEMO_JOB}))
    assert eval_cli.main(["--workdir", str(tmp_path)]) == 2
    assert "no exported student" in capsys.readouterr().err


def test_demo_variants_refuse_a_guidance_suffix():
    import pytest

    from conftest import load_config

    with pytest.raises(ValueError, match="demo variants set their own guidance"):
        load_config("demo,hps")
    cfg = load_config("demo")
    assert cfg.reward.name == "clipscore" and cfg.demo.baselines == ("lcd",) and not cfg.lrm.enabled
    assert load_config("demo_lrm").lrm.enabled and load_config("demo_lcd").reward.name == ""
    assert (cfg.lcd.w_min, cfg.lcd.w_max) == (1.0, 3.0) and load_config("sd21base").lcd.w_max == 15.0
    from jaxlcd.demo.job import baseline_config

    lcd = baseline_config(cfg, "lcd")
    assert lcd.reward.name == "" and not lcd.lrm.enabled and lcd.demo.baselines == () and lcd.demo.eval_prompts == 0
    assert lcd.total_steps == cfg.total_steps and cfg.reward.name == "clipscore"   # cfg itself is unchanged
    lrm = baseline_config(cfg, "lrm")
    assert lrm.lrm.enabled and lrm.reward.name == "clipscore"
    with pytest.raises(ValueError, match="unknown demo baseline"):
        baseline_config(cfg, "nope")


def test_eval_generates_the_same_images_in_chunks_as_in_one_batch(tmp_path, monkeypatch):
    from jaxlcd.demo import evaluate as eval_lib
    from tiny_pipeline import make_pipeline_dir

    student = make_pipeline_dir(str(tmp_path / "lcm"), unet_extra={"time_cond_proj_dim": 32})
    prompts = ["a small red circle on the left, blue background"] * 3 + ["a large green square, white background"] * 5
    row = eval_lib.Row("LCM 3-step", student, "lcm", 3)
    guidance = {"ddim": 7.5, "lcm": 8.5}
    monkeypatch.setattr(eval_lib, "EVAL_CHUNK", 3)   # 8 is not a multiple: one batch, run twice
    whole, rate = eval_lib.generate(row, prompts, None, 0, guidance)
    monkeypatch.setattr(eval_lib, "EVAL_CHUNK", 4)   # two chunks: the first compiles, the second is timed
    chunked, chunked_rate = eval_lib.generate(row, prompts, None, 0, guidance)
    assert whole.shape == chunked.shape == (8, 32, 32, 3) and rate > 0 and chunked_rate > 0
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    assert np.abs(whole[0] - whole[3]).max() > 1e-3   # different prompts and latents give different images
