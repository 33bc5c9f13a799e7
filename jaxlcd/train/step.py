"""THE compiled training step: latent consistency distillation (rglcd.md section 2).

One pure function of (state, frozen params, batch) -> (state, metrics). The reward term and the LRM
update (section 3, 4) slot in where marked. Jit it with the state donated (see `train.loop`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxlcd.diffusion import consistency as cm
from jaxlcd.diffusion import schedule
from jaxlcd.models import vae as vae_lib
from jaxlcd.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepModels:
    """The Flax modules the step closes over (hashable; params travel separately)."""
    student: Any        # UNet2DConditionModel with time_cond_proj_dim (compute dtype)
    teacher: Any        # UNet2DConditionModel (compute dtype)
    vae: Any            # AutoencoderKL
    text: Any           # CLIPTextModel
    prediction_type: str


def step_keys(rng, step):
    """Per-step keys folded from (base key, step): reproducible for a fixed seed, whatever the restarts."""
    return jax.random.split(jax.random.fold_in(rng, step), 4)


def make_train_step(models: StepModels, lcd, tx: optax.GradientTransformation, abar) -> Callable:
    """Build ``train_step(state, frozen, batch) -> (state, metrics)``.

    frozen: {"teacher", "vae", "text": params (compute dtype), "uncond_ctx": [1,77,D] embedding of ""}.
    batch: {"pixels" [B,H,W,3] in [-1,1] | "moments" [B,h,w,2c]} and {"input_ids" [B,77] int32 | "ctx" [B,77,D]}.
    lcd: the config's ``lcd`` section; abar: alphas_cumprod [T] float32.
    """
    m = models
    num_train = abar.shape[0]

    def unet_fn(module, params):
        return lambda z, t, c, *w: module.apply({"params": params}, z.astype(module.dtype), t,
                                                c.astype(module.dtype), *w)

    def train_step(state: TrainState, frozen: dict, batch: dict):
        k_latent, k_t, k_noise, k_w = step_keys(state.rng, state.step)

        # ---- inputs: latents z0 (VAE posterior sample * scaling factor) and text embeddings ----
        if "moments" in batch:
            moments = batch["moments"]
        else:
            moments = m.vae.apply({"params": frozen["vae"]}, batch["pixels"], method=m.vae.encode)
        z0 = vae_lib.scale_latents(vae_lib.latent_dist_sample(moments, k_latent), m.vae.config)
        if "ctx" in batch:
            ctx = batch["ctx"]
        else:
            ctx = m.text.apply({"params": frozen["text"]}, batch["input_ids"])
        ctx = jax.lax.stop_gradient(ctx.astype(jnp.float32))
        b = z0.shape[0]
        uncond = jnp.broadcast_to(frozen["uncond_ctx"].astype(jnp.float32), (b,) + ctx.shape[1:])

        # ---- noise, skip-step timesteps and guidance scale per example ----
        t_start, t_end = schedule.sample_lcd_timesteps(k_t, b, num_train, lcd.num_ddim_timesteps)
        noise = jax.random.normal(k_noise, z0.shape, jnp.float32)
        w = jax.random.uniform(k_w, (b,), jnp.float32, lcd.w_min, lcd.w_max)

        # ---- consistency loss (+ reward term: issue 6) and its gradient ----
        def loss_fn(params):
            out = cm.lcd_loss(unet_fn(m.student, params), unet_fn(m.student, state.target_params),
                              unet_fn(m.teacher, frozen["teacher"]), z0, noise, t_start, t_end, w, ctx, uncond,
                              abar, m.prediction_type, lcd.w_embedding_dim, lcd.loss, lcd.huber_c)
            return out.loss, out

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)

        # ---- optimiser (clip + AdamW) and EMA target ----
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        mu = lcd.ema_decay
        target = jax.tree_util.tree_map(lambda t, p: mu * t + (1.0 - mu) * p, state.target_params, params)

        metrics = {"loss": loss, "lr": opt_state[1].hyperparams["learning_rate"], "loss_cd": loss, "grad_norm": grad_norm, "w_mean": jnp.mean(w),
                   "t_start_mean": jnp.mean(t_start.astype(jnp.float32)),
                   "pred_target_mse": jnp.mean((out.pred - out.target) ** 2),
                   # the update too: a finite loss can still step the params to Inf
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))}
        new_state = state.replace(step=state.step + 1, params=params, target_params=target, opt_state=opt_state)
        return new_state, metrics

    return train_step
