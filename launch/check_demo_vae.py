"""Judge accuracy on a VAE's reconstructions of 256 held-out shapes scenes (the ceiling of any teacher built on it;
the VAE trainer logs the same check at every checkpoint), how much of that survives latent noise, how textured its
latents are over flat background, and how far apart in latent space two scenes that differ in one object's shape (or
colour) are, next to the diffusion noise that has to leave that difference readable:

    python launch/check_demo_vae.py jaxlcd/assets/demo/teacher/vae [--noise 0.1,0.2,0.3]
"""
import argparse
import dataclasses

import numpy as np

from jaxlcd.demo import shapes
from jaxlcd.demo import demo_path
from jaxlcd.models import vae as vae_lib
from jaxlcd.demo.train_vae import reconstruction_check
from jaxlcd.loaders import load_component


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


def attribute_contrast(vae, params, num_scenes: int = 128) -> dict:
    """{"shape" | "colour": mean over scenes of the largest per-cell distance (L2 over channels, scaled latents)
    between a scene's latents and those of the same scene (same layout) with its first object's shape (the next in
    SHAPES) or colour (another free one) changed}. Gaussian noise of std s per channel moves a cell by ~2 s."""
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(777, i) for i in range(num_scenes)]

    def changed(scene, kind):
        first = scene.objects[0]
        if kind == "shape":
            first = dataclasses.replace(first, shape=shapes.SHAPES[(shapes.SHAPES.index(first.shape) + 1)
                                                                    % len(shapes.SHAPES)])
        else:
            free = [c for c in shapes.COLOURS if c != scene.background and all(c != o.colour for o in scene.objects)]
            first = dataclasses.replace(first, colour=free[int(rng.integers(len(free)))])
        return dataclasses.replace(scene, objects=(first,) + scene.objects[1:])

    def encode(batch):
        x = np.stack([shapes.render(s) for s in batch]).astype(np.float32) / 127.5 - 1.0
        moments = vae.apply({"params": params}, x, method=vae.encode)
        return np.asarray(vae_lib.scale_latents(vae_lib.latent_dist_mode(moments), vae.config))

    z = encode(scenes)
    return {kind: float(np.sqrt(((encode([changed(s, kind) for s in scenes]) - z) ** 2).sum(-1)).max((1, 2)).mean())
            for kind in ("shape", "colour")}


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("vae", help="a diffusers vae/ folder")
parser.add_argument("--noise", default="0.1", help="comma-separated latent noise levels (x latent std)")
args = parser.parse_args()
vae, params = load_component(args.vae)
for noise in (float(x) for x in args.noise.split(",")):
    print(f"noise {noise:g}:", reconstruction_check(vae, params, demo_path("judge"), noise=noise), flush=True)
print("latents over flat background:", flat_background_texture(vae, params))
print("largest per-cell latent distance when one object changes:", attribute_contrast(vae, params))
