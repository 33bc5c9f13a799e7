"""`python -m jaxlcd.eval` on any model: a tiny LCM student and its teacher on an HPDv2-style prompt folder, with
CLIPScore/HPSv2.1 (tiny CLIP) and FID (random Inception weights, a folder reference): results, per-style means,
grids and plots; the rows' images equal the pipeline's samplers from the documented latents; a rerun generates
nothing; what cannot be evaluated is one sentence."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import test_fid
import test_rewards
from jaxlcd import export, pipeline
from jaxlcd.eval import main as eval_main
from jaxlcd.loaders import load_component
from jaxlcd.metrics import generate
from jaxlcd.rewards.convert import main as convert_main
from tiny_pipeline import make_pipeline_dir

hf_clip = test_rewards.hf_clip
STYLES = ("anime", "photo")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hf_clip):
    root = tmp_path_factory.mktemp("eval")
    teacher = make_pipeline_dir(str(root / "teacher"), seed=4)
    unet, params = load_component(os.path.join(teacher, "unet"))
    student, sparams = export.add_cond_proj(unet, params, rng=jax.random.PRNGKey(2))
    lcm = export.export_student_pipeline(str(root / "lcm"), teacher, student, sparams)
    prompts = root / "hpd"
    prompts.mkdir()
    for style in STYLES:
        (prompts / f"{style}.json").write_text(json.dumps([f"a {style} of shape {i}" for i in range(8)]))
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    state = test_fid._random_state_dict()
    save_file(state, str(root / "inception_in.safetensors"))
    assert convert_main(["--kind", "fid_inception", str(root / "inception_in.safetensors"),
                         str(root / "inception.safetensors")]) == 0
    argv = ["--model", lcm, "--teacher", teacher, "--teacher-steps", "2", "--steps", "1,2", "--prompts", str(prompts),
            "--out", str(root / "out"), "--reward", f"clipscore={hf_clip[1]}", "--reward", f"hpsv2.1={hf_clip[1]}",
            "--fid-ref", str(ref), "--inception", str(root / "inception.safetensors"), "--batch-size", "8"]
    assert eval_main(argv) == 0
    return {"teacher": teacher, "lcm": lcm, "out": root / "out", "argv": argv, "prompts": prompts, "ref": str(ref),
            "inception": str(root / "inception.safetensors"), "clip": hf_clip[1]}


def test_results_rows_metrics_groups_and_pictures(setup):
    out = setup["out"]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["teacher ddim2", "lcm lcm1", "lcm lcm2"]
    assert results["prompts"] == 16 and results["groups"] == list(STYLES)
    for r in results["rows"]:
        assert set(r["metrics"]) == {"clipscore", "hpsv2.1", "fid"} and all(np.isfinite(list(r["metrics"].values())))
        assert set(r["by_group"]["hpsv2.1"]) == set(STYLES)
        assert np.mean(list(r["by_group"]["hpsv2.1"].values())) == pytest.approx(r["metrics"]["hpsv2.1"], rel=1e-9)
        assert r["images_per_s"] > 0          # the second batch of 8 was timed
    md = (out / "results.md").read_text()
    assert "| lcm lcm2 |" in md and "hpsv2.1 by prompt group" in md and "fid (lower better)" in md
    for name in ("grids/side_by_side.png", "plots/hpsv2_1_vs_steps.png", "plots/fid_vs_speed.png",
                 "fid_ref-ref-32px-6.npz"):
        assert (out / name).is_file(), name
    assert len(os.listdir(out / "images" / "lcm_lcm2")) == 16 + 1   # the PNGs + timing


def test_rows_are_the_samplers_from_the_documented_latents(setup):
    pipe = pipeline.load_pipeline(setup["lcm"])
    prompts = [f"a anime of shape {i}" for i in (3, 5)]
    z = generate._latents(0, [3, 5], pipe.latent_shape)
    noise = np.swapaxes(generate._latents(1, [3, 5], (1,) + pipe.latent_shape), 0, 1)
    timesteps = pipeline.schedule.lcm_timesteps(2, 50, 1000)
    _, images = pipeline.sample_lcm(pipe, prompts, guidance=8.5, latents=z, noises=noise, timesteps=timesteps)
    row = generate.Row("lcm lcm2", setup["lcm"], "lcm", 2, 8.5)
    for image, i in zip(np.asarray(images), (3, 5)):
        png = np.asarray(Image.open(generate.image_path(str(setup["out"]), row, i)))
        assert np.abs(png.astype(int) - np.round(image * 255)).max() <= 1
    teacher = pipeline.load_pipeline(setup["teacher"])
    _, images = pipeline.sample_ddim(teacher, prompts, num_steps=2, guidance=7.5, latents=z)
    row = generate.Row("teacher ddim2", setup["teacher"], "ddim", 2, 7.5)
    png = np.asarray(Image.open(generate.image_path(str(setup["out"]), row, 5)))
    assert np.abs(png.astype(int) - np.round(np.asarray(images)[1] * 255)).max() <= 1


def test_scoring_in_chunks_gives_the_same_results(setup, tmp_path):
    from jaxlcd.metrics import evaluate, prompts

    whole = json.loads((setup["out"] / "results.json").read_text())
    rows = generate.make_rows([setup["lcm"]], (1, 2), 8.5, setup["teacher"], 2, 7.5)
    out = tmp_path / "chunked"
    out.mkdir()
    os.symlink(setup["out"] / "images", out / "images")   # generated already: this call only scores
    chunked = evaluate.evaluate(rows, prompts.load_prompts(str(setup["prompts"])), str(out), batch_size=8,
                                rewards={"clipscore": setup["clip"], "hpsv2.1": setup["clip"]}, fid_ref=setup["ref"],
                                inception=setup["inception"], chunk=5)
    for a, b in zip(chunked["rows"], whole["rows"]):
        for metric in ("clipscore", "hpsv2.1", "fid"):
            assert a["metrics"][metric] == pytest.approx(b["metrics"][metric], rel=1e-5, abs=1e-4)


def test_a_rerun_generates_nothing_and_gives_the_same_results(setup, capsys):
    out = setup["out"]
    before = json.loads((out / "results.json").read_text())
    stamps = {p: os.path.getmtime(p) for p in (out / "images").rglob("*.png")}
    assert eval_main(setup["argv"]) == 0
    assert {p: os.path.getmtime(p) for p in (out / "images").rglob("*.png")} == stamps
    after = json.loads((out / "results.json").read_text())
    assert [r["metrics"] for r in after["rows"]] == [r["metrics"] for r in before["rows"]]
    assert "| teacher ddim2 |" in capsys.readouterr().out


def test_an_interrupted_evaluation_generates_only_what_is_missing(setup):
    """What a kill leaves: some images of a row missing and no results; the rerun redraws exactly those, equal to
    the first draw, and writes the same results."""
    out = setup["out"]
    before = json.loads((out / "results.json").read_text())
    row = out / "images" / "lcm_lcm1"
    kept = {p.name: os.path.getmtime(p) for p in row.glob("*.png")}
    removed = {name: np.asarray(Image.open(row / name)) for name in ("00009.png", "00014.png")}
    for name in removed:
        os.remove(row / name)
        del kept[name]
    os.remove(out / "results.json")
    assert eval_main(setup["argv"]) == 0
    assert {p.name: os.path.getmtime(p) for p in row.glob("*.png") if p.name in kept} == kept
    for name, image in removed.items():
        np.testing.assert_array_equal(np.asarray(Image.open(row / name)), image)
    after = json.loads((out / "results.json").read_text())
    assert [r["metrics"] for r in after["rows"]] == [r["metrics"] for r in before["rows"]]


def _error(capsys, argv):
    assert eval_main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_what_cannot_be_evaluated_is_one_sentence(setup, tmp_path, capsys):
    base = ["--model", setup["lcm"], "--prompts", str(setup["prompts"]), "--out", str(tmp_path / "o")]
    assert "--fid-ref needs --inception" in _error(capsys, base + ["--fid-ref", str(tmp_path)])
    assert "unknown metric 'hps'" in _error(capsys, base + ["--reward", "hps=/x"])
    (tmp_path / "bad.tsv").write_text("a\tb\n")
    assert "is not PartiPrompts.tsv" in _error(capsys, ["--model", setup["lcm"], "--prompts", str(tmp_path / "bad.tsv"),
                                                        "--out", str(tmp_path / "o")])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"job": "distill", "teacher": setup["teacher"]}))
    msg = _error(capsys, ["--workdir", str(run)])
    assert "is not a demo-world run" in msg and "--model WORKDIR/export/student" in msg
    assert "not an LCM student" in _error(capsys, ["--model", setup["teacher"], "--prompts", str(setup["prompts"]),
                                                   "--out", str(tmp_path / "o2")])
