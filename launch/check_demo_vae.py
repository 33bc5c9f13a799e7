"""Judge accuracy on a VAE's reconstructions of 256 held-out shapes scenes (the ceiling of any teacher built on it;
the VAE trainer logs the same check at every checkpoint), and how textured its latents are over flat background:

    python launch/check_demo_vae.py jaxlcd/assets/demo/teacher/vae
"""
import sys

import numpy as np

from jaxlcd.data import shapes
from jaxlcd.demo import demo_path
from jaxlcd.models import vae as vae_lib
from jaxlcd.train.vae_train import reconstruction_check
from jaxlcd.weights import load_component


def flat_background_texture(vae, params, num_scenes: int = 128) -> dict:
    """Within-image std of the scaled latents of cells whose f x f pixel patch is pure background (0 for a latent
    space that codes a flat area as a constant), next to the std of all latents."""
    scenes = [shapes.sample_scene(777, i) for i in range(num_scenes)]
    x = np.stack([shapes.render(s) for s in scenes]).astype(np.float32)
    moments = vae.apply({"params": params}, x / 127.5 - 1.0, method=vae.encode)
    z = np.asarray(vae_lib.scale_latents(vae_lib.latent_dist_mode(moments), vae.config))
    n, h, w, _ = z.shape
    f = x.shape[1] // h
    background = np.array([shapes.COLOURS[s.background] for s in scenes], np.float32)[:, None, None, :]
    flat = (np.abs(x - background).max(-1) < 1).reshape(n, h, f, w, f).all(axis=(2, 4))
    within = [z[i][flat[i]].std(0).mean() for i in range(n) if flat[i].sum() > 4]
    return {"flat_cells_per_image": float(flat.sum((1, 2)).mean()), "flat_within_image_std": float(np.mean(within)),
            "latent_std": float(z.std())}


vae, params = load_component(sys.argv[1])
print(sys.argv[1], reconstruction_check(vae, params, demo_path("judge")))
print("latents over flat background:", flat_background_texture(vae, params))
