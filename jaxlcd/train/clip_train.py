"""Contrastive training of a CLIP (text + vision towers) from scratch on the shapes dataset: the demo world's
reward models and, through its text tower, the teacher's text encoder.

Images go through the same differentiable preprocessing the reward path uses (`rewards.preprocess.reward_pixels`:
resize to the vision tower's size + CLIP normalisation), so the model scores exactly what it was trained on.
The loss is CLIP's symmetric InfoNCE with the learned temperature (capped at 100). Output: a transformers
``CLIPModel`` folder ``<workdir>/clip`` (config.json + model.safetensors + CLIP tokenizer files).
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from jaxlcd import parallel
from jaxlcd.data.shapes import make_shapes_iterator
from jaxlcd.models import clip as clip_lib
from jaxlcd.rewards.preprocess import reward_pixels
from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer
from jaxlcd.train.lrm_pretrain import MAX_LOGIT_SCALE, clip_loss, contrastive_optimizer, contrastive_update
from jaxlcd.train.simple_loop import run_loop
from jaxlcd.weights import save_component

log = logging.getLogger("jaxlcd")


def make_clip_step(module: clip_lib.CLIPModel, tx):
    """``step(state {"step","params","opt_state"}, frozen (unused), batch {"pixels" [B,R,R,3] in [-1,1],
    "input_ids" [B,L]}) -> (state, metrics)``."""
    size = module.config.vision_config.image_size

    def loss_fn(p, batch):
        pixels = reward_pixels((batch["pixels"] + 1.0) / 2.0, size, True)
        img = module.apply({"params": p}, pixels, method=module.get_image_features)
        txt = module.apply({"params": p}, batch["input_ids"], method=module.get_text_features)
        norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        scale = jnp.minimum(jnp.exp(p["logit_scale"]), MAX_LOGIT_SCALE)
        return clip_loss(norm(img.astype(jnp.float32)), norm(txt.astype(jnp.float32)), scale)

    def step(state, frozen, batch):
        return contrastive_update(state, tx, lambda p: loss_fn(p, batch))

    return step


def train_clip(cfg, workdir: str) -> dict:
    """Train (or resume) a CLIPModel of config ``cfg.clip`` on shapes; writes ``<workdir>/clip``. Returns the last
    logged metrics (loss, in-batch image->text accuracy)."""
    os.makedirs(workdir, exist_ok=True)
    module = clip_lib.build(cfg.clip.to_dict())
    params = jax.jit(module.init)(jax.random.PRNGKey(cfg.seed), *clip_lib.dummy_inputs(module))["params"]
    tx = contrastive_optimizer(cfg)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    tok_dir = build_clip_tokenizer_files(os.path.join(workdir, "tokenizer"))
    batch = cfg.per_device_batch * jax.device_count()
    it = make_shapes_iterator(os.path.join(workdir, "data"), num_examples=cfg.num_examples, resolution=cfg.resolution,
                              seed=cfg.data_seed, tokenizer=load_tokenizer(tok_dir),
                              batch_size_per_host=batch // jax.process_count())
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    make_batch = lambda host: parallel.global_batch({k: host[k] for k in ("pixels", "input_ids")}, mesh)
    state, last = run_loop(workdir, cfg, mesh, state, make_clip_step(module, tx), None, it, make_batch, "clip")
    out = os.path.join(workdir, "clip")
    save_component(module, jax.device_get(state["params"]), out)
    build_clip_tokenizer_files(out)
    log.info("saved the CLIP to %s (last loss %.4g, in-batch accuracy %.3f)", out, last.get("loss", float("nan")),
             last.get("accuracy", float("nan")))
    return last
