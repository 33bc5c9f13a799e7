"""Plain text-conditioned latent diffusion training of the demo world's teacher UNet.

The teacher is assembled as a complete diffusers StableDiffusionPipeline folder ``<workdir>/teacher``: the trained
VAE (``cfg.vae``), the text tower of the trained CLIP (``cfg.clip``) as ``text_encoder``, the CLIP tokenizer, SD's
DDIM scheduler config and the UNet trained here (epsilon or v prediction, 10 % caption dropout for classifier-free
guidance, EMA weights exported). The training images pass once through the grain pipeline and the frozen VAE
encoder; their posterior moments are cached in ``<workdir>/latents.npz`` and a fresh posterior sample is drawn
every step.

Progress check (``cfg.judge``, ``cfg.eval_prompts``, ``cfg.eval_guidance``): at every checkpoint the EMA UNet samples
``eval_prompts`` held-out prompts with DDIM-50 at each CFG scale of ``eval_guidance`` (the evaluation's teacher row)
and the demo judge scores them (logged as ``cfg<scale>_ddim_judge_*``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxlcd import parallel
from jaxlcd.demo import metrics as eval_metrics
from jaxlcd.demo import shapes
from jaxlcd.demo.shapes import make_shapes_iterator
from jaxlcd.models import clip_text, unet as unet_lib, vae as vae_lib
from jaxlcd.pipeline import load_pipeline, sample_ddim
from jaxlcd.tokenizer import build_clip_tokenizer_files, tokenize
from jaxlcd.training import evaluators, loop as loop_lib
from jaxlcd.training.batches import ArrayBatches
from jaxlcd.training.optimizer import make_optimizer
from jaxlcd.training.state import TrainState
from jaxlcd.tiny import SD_DDIM_SCHEDULER, write_pipeline_index
from jaxlcd.demo.train_vae import demo_judge_dir
from jaxlcd.loaders import load_component, save_component
from jaxlcd.errors import InputError

log = logging.getLogger("jaxlcd")


def assemble_teacher(out_dir: str, vae_dir: str, clip_dir: str, unet_config: dict, prediction_type: str,
                     seed: int = 0) -> str:
    """Write the pipeline folder: copy of ``vae_dir``, the CLIPModel's text tower as ``text_encoder``, tokenizer,
    scheduler (SD's DDIM config with ``prediction_type``), and a freshly initialised UNet of ``unet_config``."""
    for key, path in (("vae", vae_dir), ("clip", clip_dir)):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"config.{key}={path!r} is not a model folder (no config.json); train it first")
    shutil.copytree(vae_dir, os.path.join(out_dir, "vae"), dirs_exist_ok=True)
    clip_module, clip_params = load_component(clip_dir)
    text_config = dict(clip_module.config.text_config.to_dict(), architectures=["CLIPTextModel"])
    text = clip_text.build(text_config)
    save_component(text, {"text_model": clip_params["text_model"]}, os.path.join(out_dir, "text_encoder"))
    build_clip_tokenizer_files(os.path.join(out_dir, "tokenizer"))
    unet = unet_lib.build(unet_config)
    params = jax.jit(unet.init)(jax.random.PRNGKey(seed), *unet_lib.SPEC.dummy_inputs(unet))["params"]
    save_component(unet, params, os.path.join(out_dir, "unet"))
    return write_pipeline_index(out_dir, dict(SD_DDIM_SCHEDULER, prediction_type=prediction_type))


def initial_unet_params(path: str, unet) -> dict:
    """UNet params from ``path`` (a diffusers ``unet/`` folder or a pipeline folder holding one), checked to have
    the same config as ``unet`` (the UNet the teacher trains)."""
    if os.path.isfile(os.path.join(path, "unet", "config.json")):
        path = os.path.join(path, "unet")
    module, params = load_component(path)
    if module.config != unet.config:
        raise InputError(f"config.init_from={path!r} holds a UNet whose config differs from config.unet; "
                         "make config.unet match it")
    return params


def cache_moments(pipe, iterator, num_batches: int, path: str) -> dict:
    """Encode ``num_batches`` pipeline batches with the frozen VAE: {"moments" [N,h,w,2c] float32, "input_ids"
    [N,77] int32}, saved to / reused from ``path`` (npz)."""
    if os.path.isfile(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    encode = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method=pipe.vae.encode))
    moments, ids = [], []
    for _ in tqdm(range(num_batches), desc="encode latents", unit="batch", dynamic_ncols=True):
        batch = next(iterator)
        moments.append(np.asarray(encode(pipe.vae_params, batch["pixels"]), np.float32))
        ids.append(batch["input_ids"])
    arrays = {"moments": np.concatenate(moments), "input_ids": np.concatenate(ids).astype(np.int32)}
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)
    return arrays


def min_snr_weight(abar_t, gamma: float, prediction_type: str):
    """Min-SNR-gamma loss weight (Hang et al. 2023) for abar_t [B] float32 -> [B]: min(SNR, gamma) / SNR for epsilon
    targets, / (SNR + 1) for v targets, so the weighted loss is an x0 loss capped at gamma; gamma = 0 gives ones."""
    if not gamma:
        return jnp.ones_like(abar_t)
    snr = abar_t / (1.0 - abar_t)
    return jnp.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1.0)


def ema_decay_at(step, max_decay: float):
    """The EMA decay for update number ``step`` (int32 scalar, 0 for the first update): diffusers' ``EMAModel``
    warmup, 0 at step 0 (the EMA starts as a copy), then min(max_decay, (1 + step) / (10 + step)), so early EMA
    weights are not dominated by the random initialisation."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.where(step > 0, jnp.minimum(max_decay, (1.0 + step) / (10.0 + step)), 0.0)


def sample_timesteps(key, batch: int, num_train_timesteps: int, focus_min: int = 0, focus_fraction: float = 0.0):
    """[batch] int32 timesteps: U{0..T-1}, except a ``focus_fraction`` share of the batch (in expectation) drawn from
    U{focus_min..T-1}, to spend more of the training on the high-noise steps that decide a scene's content.
    ``focus_fraction`` 0 draws plain U{0..T-1} from ``key`` itself, keeping the random stream of plain training."""
    if not focus_fraction:
        return jax.random.randint(key, (batch,), 0, num_train_timesteps)
    k_u, k_f, k_pick = jax.random.split(key, 3)
    uniform = jax.random.randint(k_u, (batch,), 0, num_train_timesteps)
    focus = jax.random.randint(k_f, (batch,), focus_min, num_train_timesteps)
    return jnp.where(jax.random.uniform(k_pick, (batch,)) < focus_fraction, focus, uniform)


def make_teacher_step(pipe, tx, uncond_ids, p_uncond: float, ema_decay: float, snr_gamma: float = 0.0,
                      train_text_encoder: bool = False, t_focus: tuple[int, float] = (0, 0.0)):
    """``step(state: TrainState (with ema_params), text params, batch {"moments","input_ids"})``:
    MSE of the UNet's epsilon / v prediction at t ~ U{0..T-1} (weighted by `min_snr_weight`), captions replaced by
    "" with prob ``p_uncond``; the EMA follows `ema_decay_at`. ``train_text_encoder``: the state's params (and EMA)
    are {"unet", "text"} and the text encoder learns from the same loss (the frozen text params are then unused).
    ``t_focus`` (min, fraction): `sample_timesteps`' high-noise share (fraction 0: plain U{0..T-1})."""
    abar = jnp.asarray(pipe.abar, jnp.float32)

    def loss_fn(params, text_params, batch, key):
        if train_text_encoder:
            params, text_params = params["unet"], params["text"]
        k_z, k_drop, k_t, k_eps = jax.random.split(key, 4)
        z0 = vae_lib.scale_latents(vae_lib.latent_dist_sample(batch["moments"], k_z), pipe.vae.config)
        b = z0.shape[0]
        drop = jax.random.uniform(k_drop, (b, 1)) < p_uncond
        ctx = pipe.text_encoder.apply({"params": text_params}, jnp.where(drop, uncond_ids, batch["input_ids"]))
        t = sample_timesteps(k_t, b, abar.shape[0], *t_focus)
        eps = jax.random.normal(k_eps, z0.shape, jnp.float32)
        alpha, sigma = jnp.sqrt(abar[t])[:, None, None, None], jnp.sqrt(1.0 - abar[t])[:, None, None, None]
        if not train_text_encoder:
            ctx = jax.lax.stop_gradient(ctx)
        out = pipe.unet.apply({"params": params}, alpha * z0 + sigma * eps, t, ctx)
        target = eps if pipe.prediction_type == "epsilon" else alpha * eps - sigma * z0
        per_example = jnp.mean((out.astype(jnp.float32) - target) ** 2, axis=(1, 2, 3))
        return jnp.mean(min_snr_weight(abar[t], snr_gamma, pipe.prediction_type) * per_example)

    def step(state, text_params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, text_params, batch, key)
        new = state.apply_gradients(tx, grads)
        decay = ema_decay_at(state.step, ema_decay)
        ema = optax.incremental_update(state.ema_params, new.params, decay)   # decay * ema + (1 - decay) * params
        return new.replace(ema_params=ema), {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return step


def sample_check(pipe, unet_params, judge_dir: str, num_prompts: int = 64, steps: int = 50,
                 guidance: float = 7.5, seed: int = 0, text_params=None, prompt_seed: int = 0) -> dict:
    """The judge (folder ``judge_dir``) on DDIM-``steps`` samples (CFG ``guidance``, latent seed ``seed``) of
    ``pipe`` with ``unet_params``, for the first ``num_prompts`` held-out prompts of ``shapes.eval_prompts(.,
    prompt_seed)``: {"ddim_judge_acc" (all attributes right), "ddim_judge_<attribute>" for each key of
    `eval_metrics.attribute_accuracy`}, floats.
    ``text_params``: the text encoder's, instead of the pipeline's."""
    from jaxlcd.demo import judge as judge_lib

    prompts = shapes.eval_prompts(num_prompts, prompt_seed)
    pipe = dataclasses.replace(pipe, unet_params=unet_params, text_params=pipe.text_params if text_params is None
                               else text_params)
    z = jax.random.normal(jax.random.PRNGKey(seed), (num_prompts,) + pipe.latent_shape)
    _, images = sample_ddim(pipe, prompts, steps, guidance, latents=z)
    return {f"ddim_{k}": v for k, v in judge_scores(judge_lib.load_judge(judge_dir), images, prompts).items()}


def judge_scores(judge, images, prompts: list[str]) -> dict:
    """The judge ((module, params)) on images [N,H,W,3] in [0,1] of N prompts: {"judge_acc" (all attributes right),
    "judge_<attribute>" for each key of `eval_metrics.attribute_accuracy`}, floats."""
    from jaxlcd.demo import judge as judge_lib

    predicted, _ = judge_lib.predict(*judge, np.asarray(images, np.float32))
    per_attribute = eval_metrics.attribute_accuracy(predicted, prompts)
    return {"judge_acc": eval_metrics.scene_accuracy(predicted, prompts),
            **{f"judge_{k}": v for k, v in per_attribute.items()}}


def teacher_optimizer(cfg) -> optax.GradientTransformation:
    """``cfg.optim`` (`jaxlcd.training.optimizer`); with ``cfg.train_text_encoder`` the text encoder's learning rate
    is ``cfg.text_lr_scale`` x the UNet's (params {"unet", "text"})."""
    optim = cfg.optim.copy_and_resolve_references()
    if cfg.train_text_encoder and cfg.text_lr_scale != 1.0:
        with optim.unlocked():
            optim.lr_mults = (("^text/", cfg.text_lr_scale),)
    return make_optimizer(optim, cfg.total_steps)


def sample_evaluator(name: str, ecfg, context: dict):
    """Evaluator ``type="jaxlcd.demo.train_teacher:sample_evaluator"``: `sample_check` of the EMA weights on
    ``ecfg.prompts`` held-out prompts at each CFG scale of ``ecfg.guidance``, judged by ``ecfg.judge`` ("demo": the
    shipped judge; "" or 0 prompts: none). Context: ``pipe``, ``split`` (EMA params -> (unet, text or None))."""
    judge_dir = demo_judge_dir(ecfg.get("judge", "demo"))
    if not judge_dir or not ecfg.get("prompts"):
        return None

    def run(state, step, final):
        unet_ema, text_ema = context["split"](parallel.to_host(state.ema_params))
        return {f"cfg{g:g}_{k}": v for g in ecfg.guidance
                for k, v in sample_check(context["pipe"], unet_ema, judge_dir, ecfg.prompts, guidance=g,
                                         text_params=text_ema).items()}

    return evaluators.Evaluator(name, int(ecfg.get("every", 0)), run)


def train_teacher(cfg, workdir: str) -> dict:
    """Train (or resume) the teacher UNet; writes the pipeline folder ``<workdir>/teacher`` (EMA UNet weights)."""
    os.makedirs(workdir, exist_ok=True)
    teacher_dir = os.path.join(workdir, "teacher")
    if not os.path.isfile(os.path.join(teacher_dir, "model_index.json")):
        assemble_teacher(teacher_dir, cfg.vae, cfg.clip, cfg.unet.to_dict(), cfg.prediction_type, cfg.seed)
    pipe = load_pipeline(teacher_dir)
    batch = cfg.per_device_batch * jax.device_count()
    encode_batch = min(64, cfg.num_examples)
    it = make_shapes_iterator(os.path.join(workdir, "data"), num_examples=cfg.num_examples, resolution=cfg.resolution,
                              seed=cfg.data_seed, tokenizer=pipe.tokenizer, batch_size_per_host=encode_batch)
    arrays = cache_moments(pipe, it, cfg.num_examples // encode_batch, os.path.join(workdir, "latents.npz"))
    tx = teacher_optimizer(cfg)
    params = pipe.unet_params
    if cfg.get("init_from"):  # continue (fresh optimizer and schedule) from a saved unet/ or pipeline folder
        params = initial_unet_params(cfg.init_from, pipe.unet)
    if cfg.train_text_encoder:
        text_params = pipe.text_params
        if cfg.get("init_from") and os.path.isfile(os.path.join(cfg.init_from, "text_encoder", "config.json")):
            text_params = load_component(os.path.join(cfg.init_from, "text_encoder"))[1]  # a teacher's own
        params = {"unet": params, "text": text_params}
    uncond_ids = jnp.asarray(tokenize(pipe.tokenizer, [""])[0])
    step_fn = make_teacher_step(pipe, tx, uncond_ids, cfg.p_uncond, cfg.ema_decay, cfg.snr_gamma,
                                cfg.train_text_encoder, (cfg.t_focus_min, cfg.t_focus_fraction))
    split = lambda tree: (tree["unet"], tree["text"]) if cfg.train_text_encoder else (tree, None)
    evals = evaluators.from_config(cfg.evals, {"pipe": pipe, "split": split})
    job = loop_lib.single_model_job("teacher", cfg, TrainState.create(params, tx, cfg.seed + 1, ema=True), step_fn,
                                    ArrayBatches(arrays, batch, cfg.data_seed), parallel.global_batch,
                                    frozen=pipe.text_params, evaluators=evals)
    result = loop_lib.train(job, cfg, workdir)
    last = result.metrics
    unet_ema, text_ema = split(parallel.to_host(result.state.ema_params))
    if jax.process_index() == 0:
        save_component(pipe.unet, unet_ema, os.path.join(teacher_dir, "unet"))
        if text_ema is not None:
            save_component(pipe.text_encoder, text_ema, os.path.join(teacher_dir, "text_encoder"))
    log.info("saved the teacher pipeline to %s (last loss %.4g)", teacher_dir, last.get("loss", float("nan")))
    return last
