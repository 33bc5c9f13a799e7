"""Contrastive pretraining of the latent proxy reward model on (latent, caption) pairs (docs/algorithm.md section 4).

Latents come from the teacher's VAE (posterior sample of each training image, unscaled, as the LRM sees them in
RG-LCD); the loss is CLIP's symmetric InfoNCE over the batch with the LRM's learned temperature (capped at 100).
Resumable (the one training loop, `jaxlcd.training.loop`: orbax checkpoints + data-iterator state); the result is an LRM folder
``<workdir>/lrm`` (config.json + model.safetensors + tokenizer) for ``--config.lrm.path``.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import optax

from jaxlcd import data as data_lib
from jaxlcd import parallel, storage
from jaxlcd.models import lrm as lrm_lib
from jaxlcd.models import vae as vae_lib
from jaxlcd.pipeline import load_pipeline
from jaxlcd.rewards.lrm import LatentReward
from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer
from jaxlcd import paths, tiny
from jaxlcd.errors import InputError
from jaxlcd.training import loop as loop_lib
from jaxlcd.training.optimizer import make_optimizer
from jaxlcd.training.state import TrainState
from jaxlcd.loaders import load_component, save_component

log = logging.getLogger("jaxlcd")
MAX_LOGIT_SCALE = 100.0


def clip_loss(img, txt, scale):
    """img, txt [B,P] L2-normalised, scale scalar -> (symmetric cross-entropy, image->text top-1 accuracy)."""
    logits = scale * img @ txt.T
    labels = jnp.arange(img.shape[0])
    ce = lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()
    return (ce(logits) + ce(logits.T)) / 2, jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def make_pretrain_step(module: lrm_lib.LatentRewardModel, vae, tx):
    """``step(state: TrainState, vae_params, batch) -> (state, metrics)``."""

    def step(state, vae_params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        moments = vae.apply({"params": vae_params}, batch["pixels"], method=vae.encode)
        latents = jax.lax.stop_gradient(vae_lib.latent_dist_sample(moments, key).astype(jnp.float32))

        def loss_fn(p):
            img, txt = module.apply({"params": p}, latents, batch["lrm_tokens"]["input_ids"])
            scale = jnp.minimum(jnp.exp(p["logit_scale"].astype(jnp.float32)), MAX_LOGIT_SCALE)
            return clip_loss(img, txt, scale)

        return contrastive_update(state, tx, loss_fn)

    return step


def contrastive_update(state: TrainState, tx, loss_fn):
    """One optimizer step of ``loss_fn(params) -> (loss, accuracy)`` (e.g. `clip_loss`) on ``state`` (params with a
    "logit_scale" leaf) -> (new state, metrics dict of scalars)."""
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(tx, grads), {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads),
                                              "logit_scale": jnp.exp(state.params["logit_scale"])}


def _initial_lrm(cfg, workdir: str, latent_size: int):
    """(module, params): from cfg.init (an LRM folder) or freshly initialised from cfg.arch at this latent size."""
    if cfg.init:
        return load_component(paths.resolve_model_path(cfg.init, "config.init"))
    if cfg.get("model"):
        config = dict(cfg.model.to_dict(), architectures=["LatentRewardModel"])
    elif cfg.arch == "tiny":
        config = tiny.tiny_lrm_config(latent_size)
    else:
        vision = dict(lrm_lib.LATENT_VIT if cfg.arch == "latent_vit" else lrm_lib.LATENT_RN50, image_size=latent_size)
        config = {"architectures": ["LatentRewardModel"], "arch": cfg.arch, "vision_config": vision}
    module = lrm_lib.build(config)
    params = jax.jit(module.init)(jax.random.PRNGKey(cfg.seed), *lrm_lib.dummy_inputs(module))["params"]
    return module, params


def _prepare_inputs(cfg, local: str) -> tuple[str, str, str]:
    """(teacher folder, prepared data folder, LRM tokenizer folder); the tiny variant's teacher and images are built
    in ``local`` once."""
    from jaxlcd.distill.setup import prepare_data

    teacher, raw = paths.resolve_model_path(cfg.teacher, "config.teacher", cfg.get("teacher_variant", "")), cfg.data_dir
    if cfg.variant == "tiny":
        if not teacher:
            teacher = os.path.join(local, "tiny_teacher")
            if not os.path.isfile(os.path.join(teacher, "model_index.json")):
                tiny.write_teacher_folder(teacher, seed=cfg.seed)
        if not raw:
            raw = os.path.join(local, "tiny_data")
            if not os.path.isdir(raw):
                tiny.write_image_folder(raw, n=32, resolution=cfg.resolution, seed=cfg.seed)
    for key, path in (("teacher", teacher), ("data_dir", raw)):
        if not path or not (storage.is_remote(path) or os.path.isdir(path)):
            raise InputError(f"config.{key}={path!r} is not a folder; pass --config.{key}=/path")
    tok_dir = build_clip_tokenizer_files(os.path.join(local, "lrm_tokenizer"))
    return teacher, prepare_data(raw, os.path.join(local, "data")), tok_dir


def pretrain(cfg, workdir: str) -> dict:
    """Run (or resume) LRM pretraining in ``workdir`` (local or gs://); returns the last logged metrics."""
    parallel.maybe_initialize_distributed()
    storage.check_bucket(workdir)
    storage.makedirs(workdir)
    local = storage.local_dir(workdir)   # the workdir, or a local folder beside a gs:// one
    teacher, prepared, tok_dir = parallel.process_zero_first(_prepare_inputs, cfg, local, name="inputs")
    pipe = load_pipeline(teacher)
    module, params = _initial_lrm(cfg, workdir, cfg.resolution // 8)
    lrm = LatentReward(module, params, load_tokenizer(tok_dir))
    tx = make_optimizer(cfg.optim, cfg.total_steps)
    global_batch = cfg.per_device_batch * jax.device_count()
    it = data_lib.make_train_iterator(prepared, tokenizer=pipe.tokenizer, resolution=cfg.resolution,
                                      batch_size_per_host=global_batch // jax.process_count(), seed=cfg.seed,
                                      random_crop=cfg.random_crop, random_flip=cfg.random_flip)
    make_batch = lambda host, mesh: parallel.global_batch(
        {"pixels": host["pixels"], "lrm_tokens": lrm.tokenize([str(c) for c in host["caption"]])}, mesh)
    job = loop_lib.single_model_job("lrm pretrain", cfg, TrainState.create(params, tx, cfg.seed),
                                    make_pretrain_step(module, pipe.vae, tx), it, make_batch, frozen=pipe.vae_params)
    result = loop_lib.train(job, cfg, workdir)
    out = storage.join(workdir, "lrm")
    params = parallel.to_host(result.state.params)   # every process takes part; process 0 writes
    if jax.process_index() == 0:
        with storage.staged_dir(out, marker="config.json") as local_out:
            save_component(module, params, local_out)
            build_clip_tokenizer_files(os.path.join(local_out, "tokenizer"))
        log.info("saved the pretrained LRM to %s (use --config.lrm.path=%s)", out, out)
    return result.metrics
