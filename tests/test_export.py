"""A student exported with jaxlcd.export loads as a diffusers LatentConsistencyModelPipeline and samples like it."""
import glob
import json
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import nchw_to_nhwc, nhwc_to_nchw
from jaxlcd import export, pipeline, sample
from jaxlcd.weights import load_component
from tiny_pipeline import make_pipeline_dir

PROMPTS = ["a red circle", "a blue square on the left"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(teacher folder, exported fp32 LCM folder, student module, student params)."""
    root = tmp_path_factory.mktemp("export")
    teacher = make_pipeline_dir(str(root / "teacher"))
    unet, params = load_component(os.path.join(teacher, "unet"))
    student, sparams = export.add_cond_proj(unet, params, w_dim=256, rng=jax.random.PRNGKey(1))
    out = export.export_student_pipeline(str(root / "lcm"), teacher, student, sparams)
    return teacher, out, student, sparams


@pytest.fixture(scope="module")
def torch_lcm(dirs):
    return diffusers.LatentConsistencyModelPipeline.from_pretrained(dirs[1])


@pytest.fixture(scope="module")
def jax_lcm(dirs):
    return pipeline.load_pipeline(dirs[1])


def _latents(n=2, seed=3):
    return np.random.default_rng(seed).standard_normal((n, 16, 16, 4)).astype(np.float32)


def test_add_cond_proj_shapes_and_init(dirs):
    teacher = dirs[0]
    unet, params = load_component(os.path.join(teacher, "unet"))
    student, sp = export.add_cond_proj(unet, params, rng=jax.random.PRNGKey(0))
    k = np.asarray(sp["time_embedding"]["cond_proj"]["kernel"])
    assert student.config.time_cond_proj_dim == 256 and k.shape == (256, 32) and k.dtype == np.float32
    assert np.abs(k).max() <= 1 / 16 and np.abs(k).max() > 0.9 / 16 and abs(k.mean()) < 5e-3
    assert "cond_proj" not in params["time_embedding"]  # the teacher's tree is untouched
    _, zp = export.add_cond_proj(unet, params, w_dim=64, zero_init=True)
    assert np.all(np.asarray(zp["time_embedding"]["cond_proj"]["kernel"]) == 0)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        export.add_cond_proj(student, sp)


def test_export_folder_is_an_lcm_pipeline(dirs, torch_lcm):
    teacher, out = dirs[:2]
    assert isinstance(torch_lcm.scheduler, diffusers.LCMScheduler)
    assert torch_lcm.unet.config.time_cond_proj_dim == 256
    sched = torch_lcm.scheduler.config
    assert (sched.original_inference_steps, sched.timestep_scaling, sched.prediction_type) == (50, 10.0, "epsilon")
    assert (sched.set_alpha_to_one, sched.steps_offset, sched.clip_sample) == (False, 1, False)
    with open(os.path.join(out, "unet", "config.json")) as f:
        assert json.load(f)["time_cond_proj_dim"] == 256
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "LatentConsistencyModelPipeline" and index["requires_safety_checker"] is False


def test_one_step_image_matches_diffusers(dirs, torch_lcm, jax_lcm, tmp_path):
    lat = _latents()
    with torch.no_grad():
        ref = torch_lcm(PROMPTS, num_inference_steps=1, guidance_scale=8.5, latents=nhwc_to_nchw(lat),
                        output_type="np").images
    _, img = pipeline.sample_lcm(jax_lcm, PROMPTS, num_steps=1, guidance=8.5, latents=lat)
    assert img.shape == ref.shape == (2, 32, 32, 3)
    assert np.abs(np.asarray(img) - ref).max() <= 1e-4
    # the CLI on NCHW latents gives the same images
    np.save(tmp_path / "lat.npy", lat.transpose(0, 3, 1, 2))
    out = tmp_path / "cli"
    sample.main(["--model", dirs[1], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "1",
                 "--latents", str(tmp_path / "lat.npy"), "--out", str(out), "--save-array"])
    assert np.abs(np.load(out / "images.npy") - ref).max() <= 1e-4


def test_two_steps_match_diffusers_with_same_noise(torch_lcm, jax_lcm):
    """Multistep: the fresh noise between steps is drawn by diffusers from the generator; feed the same draws."""
    lat = _latents(seed=5)
    g = torch.Generator().manual_seed(11)
    noises = np.stack([nchw_to_nhwc(torch.randn((2, 4, 16, 16), generator=g)) for _ in range(1)])
    with torch.no_grad():
        ref = torch_lcm(PROMPTS, num_inference_steps=2, guidance_scale=6.0, latents=nhwc_to_nchw(lat),
                        generator=torch.Generator().manual_seed(11), output_type="np").images
    _, img = pipeline.sample_lcm(jax_lcm, PROMPTS, num_steps=2, guidance=6.0, latents=lat, noises=noises)
    assert np.abs(np.asarray(img) - ref).max() <= 1e-4


def test_fp16_export_stores_float16_and_loads(dirs, torch_lcm, tmp_path):
    teacher, _, student, sparams = dirs
    out = export.export_student_pipeline(str(tmp_path / "lcm16"), teacher, student, sparams, dtype=np.float16)
    for sub in ("unet", "vae", "text_encoder"):
        tensors = {}
        for f in glob.glob(os.path.join(out, sub, "*.safetensors")):
            tensors.update(load_file(f))
        assert tensors and all(t.dtype == np.float16 for t in tensors.values()), sub
    pipe16 = diffusers.LatentConsistencyModelPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert pipe16.unet.config.time_cond_proj_dim == 256
    lat = _latents()
    with torch.no_grad():
        ref = torch_lcm(PROMPTS, num_inference_steps=1, guidance_scale=8.5, latents=nhwc_to_nchw(lat),
                        output_type="np").images
    _, img = pipeline.sample_lcm(pipeline.load_pipeline(out), PROMPTS, num_steps=1, guidance=8.5, latents=lat)
    assert np.abs(np.asarray(img) - ref).max() <= 2e-2  # fp16-rounded weights, fp32 compute


def test_export_and_load_errors(dirs, tmp_path):
    teacher, out, student, sparams = dirs
    with pytest.raises(pipeline.PipelineError, match="model_index.json"):
        export.export_student_pipeline(str(tmp_path / "b"), os.path.join(teacher, "unet"), student, sparams)
    with pytest.raises(pipeline.PipelineError, match="not empty"):
        export.export_student_pipeline(out, teacher, student, sparams)
    with pytest.raises(pipeline.PipelineError, match="does not exist"):
        pipeline.load_pipeline(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    with pytest.raises(pipeline.PipelineError, match="unet/"):
        pipeline.load_pipeline(str(broken))
    with pytest.raises(pipeline.PipelineError, match="--sampler ddim"):
        pipeline.sample_lcm(pipeline.load_pipeline(teacher), ["x"], num_steps=1)
