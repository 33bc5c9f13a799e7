"""Latent consistency distillation mathematics (docs/algorithm.md section 2), pure and jittable.

Conventions: latents NHWC float32; per-example scalars have shape [B]; ``abar`` is the float32
alphas_cumprod table [T] (see `schedule.alphas_cumprod`); guidance w in the LCM convention
(pred = cond + w (cond - uncond), i.e. diffusers' scale g = w + 1).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxlcd.diffusion.schedule import to_x0_eps

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
HUBER_C = 1e-3


def _bcast(v):
    """[B] -> [B,1,1,1] for NHWC latents."""
    return jnp.reshape(v, (-1, 1, 1, 1))


def guidance_embedding(w, dim: int = 256):
    """w [B] -> [B, dim] float32: concat(sin(1000 w f), cos(1000 w f)), f_i = exp(-i ln(1e4) / (dim/2 - 1))."""
    half = dim // 2
    # same float32 operation order as diffusers' get_guidance_scale_embedding: sin(1000 w f) for w ~ 15 is
    # sensitive to the last bit of f.
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    args = (jnp.asarray(w, jnp.float32) * 1000.0)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, 1))) if dim % 2 else emb


def boundary_scalings(t, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
    """(c_skip, c_out) for timesteps t [B]: s = scaling t, c_skip = sd^2/(s^2+sd^2), c_out = s/sqrt(s^2+sd^2)."""
    s = jnp.asarray(t, jnp.float32) * timestep_scaling
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s / jnp.sqrt(s ** 2 + sigma_data ** 2)
    return c_skip, c_out


def consistency_fn(z, x0, t):
    """f(z, t) = c_skip(t) z + c_out(t) x0. z, x0 [B,h,w,c]; t [B]."""
    c_skip, c_out = boundary_scalings(t)
    return _bcast(c_skip) * z + _bcast(c_out) * x0


def ddim_step(x0, eps, abar_prev):
    """Deterministic DDIM: sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps. abar_prev [B] (or broadcastable)."""
    abar_prev = _bcast(abar_prev) if jnp.ndim(abar_prev) == 1 else abar_prev
    return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev) * eps


def add_noise(z0, eps, t, abar):
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps. t [B] int, abar [T]."""
    a = _bcast(abar[t])
    return jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * eps


def pseudo_huber(pred, target, c: float = HUBER_C):
    """mean(sqrt((pred - target)^2 + c^2) - c) over all elements, float32."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.sqrt(d * d + c * c) - c)


def l2(pred, target):
    """mean((pred - target)^2) over all elements, float32."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(d * d)


def teacher_x_prev(teacher: Callable, z, t_start, ctx, uncond_ctx, w, abar, t_end, kind: str):
    """The teacher's CFG DDIM step from t_start to t_end (no gradient).

    teacher(z [2B,h,w,c], t [2B], ctx [2B,L,D]) -> raw output; cond and uncond run as ONE batched call.
    ctx, uncond_ctx [B,L,D]; w [B]; returns x_prev [B,h,w,c] float32.
    """
    b = z.shape[0]
    out = teacher(jnp.concatenate([z, z]), jnp.concatenate([t_start, t_start]),
                  jnp.concatenate([ctx, uncond_ctx])).astype(jnp.float32)
    a = _bcast(abar[t_start])
    x0, eps = to_x0_eps(out, jnp.concatenate([z, z]), jnp.sqrt(jnp.concatenate([a, a])),
                        jnp.sqrt(1.0 - jnp.concatenate([a, a])), kind)
    x0_c, x0_u, eps_c, eps_u = x0[:b], x0[b:], eps[:b], eps[b:]
    wb = _bcast(w)
    x0 = x0_c + wb * (x0_c - x0_u)
    eps = eps_c + wb * (eps_c - eps_u)
    return jax.lax.stop_gradient(ddim_step(x0, eps, abar[t_end]))


def student_consistency(unet: Callable, z, t, ctx, w_emb, abar, kind: str):
    """f_theta(z, t, w): unet(z, t, ctx, w_emb) -> x0 -> c_skip z + c_out x0 (float32)."""
    out = unet(z, t, ctx, w_emb).astype(jnp.float32)
    a = _bcast(abar[t])
    x0, _ = to_x0_eps(out, z, jnp.sqrt(a), jnp.sqrt(1.0 - a), kind)
    return consistency_fn(z, x0, t)


class LCDOutput(NamedTuple):
    loss: jax.Array     # scalar float32
    pred: jax.Array     # [B,h,w,c] student consistency output at t_start (the rewarded latent)
    target: jax.Array   # [B,h,w,c] EMA-target consistency output at t_end (stop-gradient)
    x_prev: jax.Array   # [B,h,w,c] teacher CFG DDIM step


class LCDTarget(NamedTuple):
    z: jax.Array        # [B,h,w,c] noisy latents at t_start (the student's input)
    w_emb: jax.Array    # [B,w_dim] guidance-scale embedding (None when w_dim is 0)
    x_prev: jax.Array   # [B,h,w,c] teacher CFG DDIM step to t_end
    target: jax.Array   # [B,h,w,c] EMA-target consistency output at t_end (stop-gradient)


def lcd_target(target_net: Callable, teacher: Callable, z0, noise, t_start, t_end, w, ctx, uncond_ctx, abar,
               kind: str, w_dim: int) -> LCDTarget:
    """Everything of the LCD objective that carries no gradient: noisy input, teacher step, EMA target.

    target_net(z, t, ctx, w_emb) and teacher(z, t, ctx) return raw UNet outputs; z0 [B,h,w,c] scaled latents;
    noise like z0; t_start/t_end [B] int; w [B]; ctx/uncond_ctx [B,L,D]; abar [T] float32.
    """
    z = add_noise(z0, noise, t_start, abar)
    w_emb = guidance_embedding(w, w_dim) if w_dim else None   # LCM-LoRA students take no embedding
    x_prev = teacher_x_prev(teacher, z, t_start, ctx, uncond_ctx, w, abar, t_end, kind)
    target = jax.lax.stop_gradient(student_consistency(target_net, x_prev, t_end, ctx, w_emb, abar, kind))
    return LCDTarget(z, w_emb, x_prev, target)


def cd_distance(pred, target, loss: str = "huber", huber_c: float = HUBER_C):
    """The consistency distance: pseudo-Huber (``loss="huber"``) or L2, scalar float32."""
    return pseudo_huber(pred, target, huber_c) if loss == "huber" else l2(pred, target)


def lcd_loss(student: Callable, target_net: Callable, teacher: Callable, z0, noise, t_start, t_end, w,
             ctx, uncond_ctx, abar, kind: str, w_dim: int, loss: str = "huber", huber_c: float = HUBER_C) -> LCDOutput:
    """The LCD objective of docs/algorithm.md section 2 for one batch (arguments as `lcd_target`; student like target_net)."""
    tgt = lcd_target(target_net, teacher, z0, noise, t_start, t_end, w, ctx, uncond_ctx, abar, kind, w_dim)
    pred = student_consistency(student, tgt.z, t_start, ctx, tgt.w_emb, abar, kind)
    return LCDOutput(cd_distance(pred, tgt.target, loss, huber_c), pred, tgt.target, tgt.x_prev)
