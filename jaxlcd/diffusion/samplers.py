"""Samplers: LCM multistep (student) and DDIM with classifier-free guidance (teacher).

Both are pure functions of params and arrays (jit them with the UNet/VAE modules closed over) and
match diffusers' LCMScheduler / DDIMScheduler step for step. Latents are NHWC float32.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlcd.diffusion import schedule
from jaxlcd.diffusion.consistency import consistency_fn, guidance_embedding


def lcm_sample(unet: Callable, z, ctx, timesteps: Sequence[int], abar, kind: str, guidance: float,
               w_dim: int, noises: Optional[jax.Array] = None, rng=None, uncond_ctx=None):
    """LCM multistep sampling (docs/algorithm.md section 5) as one lax.scan.

    unet(z, t [B], ctx, w_emb) -> raw output. z [B,h,w,c] initial noise; ctx [B,L,D]; timesteps: static
    descending list; abar [T] float32; guidance g: with ``w_dim`` w = g - 1 is embedded (LatentConsistencyModel-
    Pipeline: one UNet call per step); with ``uncond_ctx`` [B,L,D] classifier-free guidance u + g (c - u) on the raw
    output (StableDiffusionPipeline with an LCMScheduler, i.e. LCM-LoRA at g > 1); noises [S-1,B,h,w,c] for the
    fresh noise between steps, or drawn from ``rng``. Returns denoised latents [B,h,w,c] float32.
    """
    b = z.shape[0]
    w_emb = guidance_embedding(jnp.full((b,), guidance - 1.0, jnp.float32), w_dim) if w_dim else None
    ts = jnp.asarray(timesteps, jnp.int32)
    if noises is None:
        noises = jax.random.normal(rng, (len(timesteps) - 1,) + z.shape, jnp.float32) if len(timesteps) > 1 else None
    # The last step re-noises with abar = 1 and zero noise, i.e. returns the denoised latents exactly.
    a_next = jnp.concatenate([abar[ts[1:]], jnp.ones((1,), abar.dtype)])
    pad = jnp.zeros((1,) + z.shape, jnp.float32)
    noises = pad if noises is None else jnp.concatenate([jnp.asarray(noises, jnp.float32), pad])

    def step(z, xs):
        t, a_n, noise = xs
        tb = jnp.full((b,), t, jnp.int32)
        if uncond_ctx is None:
            out = unet(z, tb, ctx, w_emb).astype(jnp.float32)
        else:
            w2 = None if w_emb is None else jnp.concatenate([w_emb, w_emb])
            both = unet(jnp.concatenate([z, z]), jnp.concatenate([tb, tb]), jnp.concatenate([uncond_ctx, ctx]),
                        w2).astype(jnp.float32)
            out = both[:b] + guidance * (both[b:] - both[:b])
        x0, _ = schedule.to_x0_eps(out, z, jnp.sqrt(abar[t]), jnp.sqrt(1.0 - abar[t]), kind)
        return jnp.sqrt(a_n) * consistency_fn(z, x0, tb) + jnp.sqrt(1.0 - a_n) * noise, None

    z, _ = jax.lax.scan(step, z.astype(jnp.float32), (ts, a_next, noises))
    return z


def ddim_cfg_sample(unet: Callable, z, ctx, uncond_ctx, timesteps: np.ndarray, prev_abar: np.ndarray, abar,
                    kind: str, guidance: float):
    """Deterministic DDIM (eta 0) with classifier-free guidance, as diffusers' StableDiffusionPipeline.

    unet(z [2B], t [2B], ctx [2B]) -> raw output; CFG on the raw output: u + g (c - u). timesteps [S]
    and prev_abar [S] from `schedule.ddim_timesteps` / `schedule.ddim_prev_alphas`. Runs as a lax.scan.
    Returns x_0 latents [B,h,w,c] float32.
    """
    b = z.shape[0]
    both_ctx = jnp.concatenate([uncond_ctx, ctx])

    def step(z, xs):
        t, a_prev = xs
        tb = jnp.full((2 * b,), t, jnp.int32)
        out = unet(jnp.concatenate([z, z]), tb, both_ctx).astype(jnp.float32)
        out = out[:b] + guidance * (out[b:] - out[:b])
        x0, eps = schedule.to_x0_eps(out, z, jnp.sqrt(abar[t]), jnp.sqrt(1.0 - abar[t]), kind)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, None

    xs = (jnp.asarray(timesteps, jnp.int32), jnp.asarray(prev_abar, jnp.float32))
    z, _ = jax.lax.scan(step, z.astype(jnp.float32), xs)
    return z


def decode_to_images(vae_decode: Callable, z, scaling_factor: float, shift_factor: float = 0.0):
    """Scaled latents [B,h,w,c] -> images [B,H,W,3] float32 in [0, 1] (clip(D(z/sf + shift)/2 + 0.5))."""
    img = vae_decode(z / scaling_factor + shift_factor).astype(jnp.float32)
    return jnp.clip(img / 2 + 0.5, 0.0, 1.0)
