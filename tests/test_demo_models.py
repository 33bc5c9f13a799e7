"""The demo world's model trainers (issue 7) on tiny configs: they run, resume, and write folders diffusers loads."""
import json

import diffusers
import numpy as np
import pytest
import torch

from conftest import load_config
from jaxlcd.data import shapes
from jaxlcd.train.vae_train import train_vae


@pytest.mark.slow  # ~90 s: two compiles of the VAE step
def test_vae_trainer_writes_a_diffusers_vae_with_unit_variance_latents(tmp_path):
    cfg = load_config("tiny", "demo_vae.py")
    cfg.total_steps, cfg.log_every, cfg.checkpoint_every = 2, 1, 1
    train_vae(cfg, str(tmp_path))
    cfg.total_steps = 3
    last = train_vae(cfg, str(tmp_path))   # resumes at step 2
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert np.isfinite(last["loss"]) and last["mse"] > 0 and last["kl"] >= 0

    vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    assert vae.config.scaling_factor == last["scaling_factor"]
    images = np.stack([shapes.render(shapes.sample_scene(1, i), resolution=32) for i in range(16)])
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    assert 0.5 < float(z.std()) < 2.0   # scaled latents have about unit variance on unseen scenes
