"""The shipped demo models (jaxlcd/assets/demo): size budget, shared tokenizer files, the teacher in diffusers."""
import os

import diffusers
import numpy as np
import torch

from conftest import rel_err
from jaxlcd import demo
from jaxlcd.demo import shipping
from jaxlcd.demo import shapes
from jaxlcd.pipeline import load_pipeline, sample_ddim

ASSETS = demo.DEMO_DIR


def _stored_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(root) for f in files
               if not os.path.islink(os.path.join(r, f)))


def test_shipped_models_fit_the_size_budget_and_store_the_tokenizer_once():
    assert _stored_bytes(ASSETS) <= 41 * 2**20  # all together at most ~40 MB
    for name in demo.MODELS:
        for root, _, files in os.walk(demo.demo_path(name)):
            for f in set(files) & set(shipping.SHARED_TOKENIZER_FILES):
                path = os.path.join(root, f)
                assert os.path.isfile(path), f"{path} is a dangling link"
                assert os.path.islink(path) == (name != "clip"), path


def test_link_shared_tokenizer_files(tmp_path):
    for sub, text in (("clip", "same"), ("teacher/tokenizer", "same"), ("scorer", "different")):
        os.makedirs(tmp_path / sub)
        (tmp_path / sub / "vocab.json").write_text(text)
    linked = shipping.link_shared_tokenizer_files(str(tmp_path))
    assert linked == [str(tmp_path / "teacher" / "tokenizer" / "vocab.json")]
    assert os.readlink(linked[0]) == os.path.join("..", "..", "clip", "vocab.json")
    assert (tmp_path / "teacher" / "tokenizer" / "vocab.json").read_text() == "same"
    assert not os.path.islink(tmp_path / "scorer" / "vocab.json")
    assert shipping.link_shared_tokenizer_files(str(tmp_path)) == []  # idempotent


def test_shipped_teacher_samples_in_diffusers_like_jaxlcd():
    """diffusers' StableDiffusionPipeline loads the shipped folder on CPU; its DDIM samples (2 steps, CFG 3) match
    jaxlcd's from the same initial latents (fp16 weights, fp32 compute)."""
    path = demo.demo_path("teacher")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, torch_dtype=torch.float32)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    prompts = shapes.eval_prompts(2)
    z = np.random.default_rng(0).standard_normal((2, 8, 8, 4), np.float32)
    with torch.no_grad():
        ref = pipe(prompts, height=64, width=64, num_inference_steps=2, guidance_scale=3.0, output_type="np",
                   latents=torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).images
    _, ours = sample_ddim(load_pipeline(path), prompts, 2, 3.0, latents=z)
    assert ref.shape == (2, 64, 64, 3) and np.isfinite(ref).all()
    assert rel_err(np.asarray(ours), ref) <= 5e-5  # measured 1.8e-5 (fp32 through the VAE decoder)
