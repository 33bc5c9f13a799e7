"""THE compiled training step: (reward-guided) latent consistency distillation (docs/algorithm.md sections 2-4).

One pure function of (state, frozen params, batch) -> (state, metrics). Jit it with the state donated (see
`train.loop`). The student's gradient is one pull-back through the student of the summed latent-space
gradient dL_CD/dpred - beta * dR/dpred, so both terms cost one student backward and their sizes can be logged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxlcd.diffusion import consistency as cm
from jaxlcd.diffusion import schedule
from jaxlcd.diffusion.samplers import decode_to_images
from jaxlcd.models import lora, vae as vae_lib
from jaxlcd.models.layers import in_reference_math
from jaxlcd.rewards.base import RewardModel
from jaxlcd.rewards.lrm import LatentReward, pairwise_preference_loss
from jaxlcd.distill.state import DistillState
from jaxlcd.errors import InputError


@dataclasses.dataclass(frozen=True)
class StepModels:
    """The Flax modules the step closes over (hashable; params travel separately)."""
    student: Any        # UNet2DConditionModel with time_cond_proj_dim, or the teacher's with LoRA (compute dtype)
    teacher: Any        # UNet2DConditionModel (compute dtype)
    vae: Any            # AutoencoderKL
    text: Any           # CLIPTextModel
    prediction_type: str
    reward: Optional[RewardModel] = None   # direct guidance, or the LRM's expert when ``lrm`` is set
    lrm: Optional[LatentReward] = None     # latent proxy RM guiding the student (params in the state)
    lrm_tx: Any = None                     # its optimizer (None: the LRM stays fixed)
    lora_scale: Optional[float] = None     # LoRA student: the state's params are adapters on frozen["teacher"]


def decode_images(vae, vae_params, latents, microbatch: int = 0, remat: bool = True):
    """Scaled latents [B,h,w,c] -> images [B,H,W,3] float32 in [0,1].

    ``microbatch`` > 0 decodes that many latents at a time (lax.map), bounding the decoder's activations;
    ``remat`` rematerialises the decoder in the backward (one more decoder forward, far less memory).
    """
    decode = lambda z: decode_to_images(
        lambda x: vae.apply({"params": vae_params}, x.astype(vae.dtype), method=vae.decode),
        z, vae.config.scaling_factor, vae.config.shift_factor or 0.0)
    if remat and not in_reference_math():
        decode = jax.checkpoint(decode)
    b = latents.shape[0]
    if not microbatch or microbatch >= b:
        return decode(latents)
    if b % microbatch:
        raise InputError(f"reward.decode_microbatch={microbatch} must divide the per-step batch {b}")
    images = jax.lax.map(decode, latents.reshape((b // microbatch, microbatch) + latents.shape[1:]))
    return images.reshape((b,) + images.shape[2:])


def reward_remat(reward_cfg) -> bool:
    """Whether the reward path (decoder + reward image tower) is rematerialised: ``reward.remat`` 'always',
    'never', or 'auto' = only when the decode is micro-batched (micro-batching is there to bound memory)."""
    mode = getattr(reward_cfg, "remat", "auto") if reward_cfg is not None else "auto"
    if mode not in ("auto", "always", "never"):
        raise InputError(f"reward.remat={mode!r} is unknown; use 'auto', 'always' or 'never'")
    return mode == "always" or (mode == "auto" and bool(reward_cfg.decode_microbatch))


def step_keys(rng, step):
    """Per-step keys folded from (base key, step): reproducible for a fixed seed, whatever the restarts."""
    return jax.random.split(jax.random.fold_in(rng, step), 4)


def _rows(tree, n: int, copies: int = 1):
    """The first n rows of every leaf, repeated ``copies`` times along the batch axis."""
    return jax.tree_util.tree_map(lambda x: jnp.concatenate([x[:n]] * copies), tree)


def make_train_step(models: StepModels, lcd, tx: optax.GradientTransformation, abar, reward_cfg=None,
                    lrm_cfg=None) -> Callable:
    """Build ``train_step(state, frozen, batch) -> (state, metrics)``.

    frozen: {"teacher", "vae", "text": params (compute dtype), "uncond_ctx": [1,77,D] embedding of "",
             "reward": reward-model params when ``models.reward`` is set}.
    batch: {"pixels" [B,H,W,3] in [-1,1] | "moments" [B,h,w,2c]}, {"input_ids" [B,77] int32 | "ctx" [B,77,D]},
           with a reward model {"reward_tokens": models.reward.tokenize(captions)}, with an LRM
           {"lrm_tokens": models.lrm.tokenize(captions)}.
    lcd / reward_cfg / lrm_cfg: the config's ``lcd``, ``reward`` (beta, decode_microbatch, remat) and ``lrm``
    (beta, rows) sections; abar: alphas_cumprod [T] float32.

    The step is one function on purpose (about 100 lines): it reads top-down like docs/algorithm.md sections 2-4
    (noise, teacher CFG target, consistency loss, reward or LRM term, update, EMA, online LRM update).
    """
    m = models
    num_train = abar.shape[0]
    remat_reward = m.reward is not None and reward_remat(reward_cfg)

    def unet_fn(module, variables):
        return lambda z, t, c, *w: module.apply(variables, z.astype(module.dtype), t, c.astype(module.dtype), *w)

    def train_step(state: DistillState, frozen: dict, batch: dict):
        k_latent, k_t, k_noise, k_w = step_keys(state.rng, state.step)
        if m.lora_scale is None:   # the student's own params (teacher + cond_proj)
            student = lambda p: unet_fn(m.student, {"params": p})
        else:                      # LCM-LoRA: the teacher's params, shared, plus the adapters p
            student = lambda p: unet_fn(m.student, lora.variables(frozen["teacher"], p, m.lora_scale))

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

        # ---- teacher CFG step and EMA target (no gradient) ----
        tgt = cm.lcd_target(student(state.target_params), unet_fn(m.teacher, {"params": frozen["teacher"]}),
                            z0, noise, t_start, t_end, w, ctx, uncond, abar, m.prediction_type, lcd.w_embedding_dim)

        # ---- student prediction; CD loss and reward, each differentiated w.r.t. pred ----
        pred, pull_back = jax.vjp(lambda p: cm.student_consistency(
            student(p), tgt.z, t_start, ctx, tgt.w_emb, abar, m.prediction_type), state.params)
        loss_cd, g_cd = jax.value_and_grad(lambda x: cm.cd_distance(x, tgt.target, lcd.loss, lcd.huber_c))(pred)
        metrics = {"loss_cd": loss_cd, "grad_cd_latent_norm": jnp.linalg.norm(g_cd)}
        loss, g_pred = loss_cd, g_cd
        unscale = lambda x: vae_lib.unscale_latents(x, m.vae.config)
        if m.lrm is not None:   # the LRM scores latents: no decode, no expert in the student's gradient path
            beta, lrm_text = lrm_cfg.beta, m.lrm.text_features(state.lrm_params, batch["lrm_tokens"])
            mean_reward = lambda x: jnp.mean(m.lrm.cosine(state.lrm_params, unscale(x), lrm_text))
        elif m.reward is not None:
            beta, text = reward_cfg.beta, m.reward.text_features(frozen["reward"], batch["reward_tokens"])
            score = m.reward.score_images
            if remat_reward and not in_reference_math():
                score = jax.checkpoint(score)
            mean_reward = lambda x: jnp.mean(score(frozen["reward"], decode_images(
                m.vae, frozen["vae"], x, reward_cfg.decode_microbatch, remat_reward), text))
        if m.lrm is not None or m.reward is not None:
            reward, g_r = jax.value_and_grad(mean_reward)(pred)
            loss, g_pred = loss_cd - beta * reward, g_cd - beta * g_r
            metrics.update(reward=reward, grad_reward_latent_norm=beta * jnp.linalg.norm(g_r))
        (grads,) = pull_back(g_pred)
        grad_norm = optax.global_norm(grads)

        # ---- optimiser (clip + AdamW) and EMA target ----
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        mu = lcd.ema_decay
        target = optax.incremental_update(state.target_params, params, mu)   # mu * target + (1 - mu) * params

        metrics.update(loss=loss, lr=opt_state[1].hyperparams["learning_rate"], grad_norm=grad_norm,
                       w_mean=jnp.mean(w), t_start_mean=jnp.mean(t_start.astype(jnp.float32)),
                       pred_target_mse=jnp.mean((pred - tgt.target) ** 2),
                       # the update too: a finite loss can still step the params to Inf
                       finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates)))
        new_state = state.replace(step=state.step + 1, params=params, target_params=target, opt_state=opt_state)

        # ---- online LRM update from the expert's preferences over [pred, target, real latent] ----
        if m.lrm is not None and m.lrm_tx is not None:
            n = lrm_cfg.rows or b
            zs = jax.lax.stop_gradient(jnp.concatenate([pred[:n], tgt.target[:n], z0[:n]]))   # [3n,h,w,c]
            if "pixels" in batch:   # the real image is in the batch: decode only pred and target
                real = jnp.clip(batch["pixels"][:n].astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
                images = jnp.concatenate([decode_images(m.vae, frozen["vae"], zs[:2 * n], reward_cfg.decode_microbatch,
                                                        remat=False), real])
            else:
                images = decode_images(m.vae, frozen["vae"], zs, reward_cfg.decode_microbatch, remat=False)
            expert_text = _rows(m.reward.text_features(frozen["reward"], _rows(batch["reward_tokens"], n)), n, 3)
            expert = jax.lax.stop_gradient(
                m.reward.score_images(frozen["reward"], images, expert_text) * m.reward.logit_scale).reshape(3, n)

            def lrm_loss(lp):
                text = _rows(m.lrm.text_features(lp, _rows(batch["lrm_tokens"], n)), n, 3)
                return pairwise_preference_loss(expert, m.lrm.logits(lp, unscale(zs), text).reshape(3, n))

            (l_lrm, acc), g_lrm = jax.value_and_grad(lrm_loss, has_aux=True)(state.lrm_params)
            upd, lrm_opt_state = m.lrm_tx.update(g_lrm, state.lrm_opt_state, state.lrm_params)
            new_state = new_state.replace(lrm_params=optax.apply_updates(state.lrm_params, upd),
                                          lrm_opt_state=lrm_opt_state)
            metrics.update(lrm_loss=l_lrm, lrm_accuracy=acc, expert_logit_mean=jnp.mean(expert),
                           finite=metrics["finite"] & jnp.isfinite(l_lrm))
        return new_state, metrics

    return train_step
