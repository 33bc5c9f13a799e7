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
import numpy as np
import optax

from jaxlcd import parallel
from jaxlcd.demo import shapes
from jaxlcd.demo.shapes import make_shapes_iterator
from jaxlcd.models import clip as clip_lib
from jaxlcd.rewards.preprocess import reward_pixels
from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer, tokenize
from jaxlcd.rewards.lrm_pretrain import MAX_LOGIT_SCALE, clip_loss, contrastive_update
from jaxlcd.training import loop as loop_lib
from jaxlcd.training.optimizer import make_optimizer
from jaxlcd.training.state import TrainState
from jaxlcd.loaders import load_component, save_component

log = logging.getLogger("jaxlcd")


def hard_negative_loss(img, txt, neg, scale):
    """`clip_loss` with K extra captions per image in its image->text softmax: img, txt [B,P] and neg [B,K,P]
    L2-normalised -> (symmetric cross-entropy, image->text top-1 accuracy over the B + K candidates)."""
    logits = scale * jnp.concatenate([img @ txt.T, jnp.einsum("bp,bkp->bk", img, neg)], axis=1)   # [B, B+K]
    labels = jnp.arange(img.shape[0])
    ce = lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()
    return (ce(logits) + ce(logits[:, :img.shape[0]].T)) / 2, jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def make_clip_step(module: clip_lib.CLIPModel, tx):
    """``step(state: TrainState, frozen (unused), batch {"pixels" [B,R,R,3] in [-1,1],
    "input_ids" [B,L], optional "negative_ids" [B,K,L]}) -> (state, metrics)``."""
    size = module.config.vision_config.image_size

    def loss_fn(p, batch):
        pixels = reward_pixels((batch["pixels"] + 1.0) / 2.0, size, True)
        img = module.apply({"params": p}, pixels, method=module.get_image_features)
        txt = module.apply({"params": p}, batch["input_ids"], method=module.get_text_features)
        norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        scale = jnp.minimum(jnp.exp(p["logit_scale"]), MAX_LOGIT_SCALE)
        img, txt = norm(img.astype(jnp.float32)), norm(txt.astype(jnp.float32))
        if "negative_ids" not in batch:
            return clip_loss(img, txt, scale)
        b, k, length = batch["negative_ids"].shape
        neg = module.apply({"params": p}, batch["negative_ids"].reshape(b * k, length), method=module.get_text_features)
        return hard_negative_loss(img, txt, norm(neg.astype(jnp.float32)).reshape(b, k, -1), scale)

    def step(state, frozen, batch):
        return contrastive_update(state, tx, lambda p: loss_fn(p, batch))

    return step


def hard_negative_ids(captions, k: int, tokenizer, rng: np.random.Generator,
                      kinds: tuple[str, ...] = shapes.HARD_NEGATIVE_KINDS) -> np.ndarray:
    """Token ids [B, k, 77] int32 of k `shapes.hard_negative` captions (of ``kinds``, random templates) per caption."""
    texts = []
    for c in captions:
        scene = shapes.parse_caption(str(c))
        texts += [shapes.caption(shapes.hard_negative(scene, rng, kinds),
                                 template=int(rng.integers(shapes.NUM_TEMPLATES))) for _ in range(k)]
    return np.asarray(tokenize(tokenizer, texts), np.int32).reshape(len(captions), k, -1)


def train_clip(cfg, workdir: str) -> dict:
    """Train (or resume) a CLIPModel of config ``cfg.clip`` on shapes; writes ``<workdir>/clip``. Returns the last
    logged metrics (loss, in-batch image->text accuracy)."""
    os.makedirs(workdir, exist_ok=True)
    if cfg.get("init_from"):  # a second stage (fresh optimizer and schedule) from a saved CLIPModel folder
        module, params = load_component(cfg.init_from)   # its config replaces cfg.clip
    else:
        module = clip_lib.build(cfg.clip.to_dict())
        params = jax.jit(module.init)(jax.random.PRNGKey(cfg.seed), *clip_lib.dummy_inputs(module))["params"]
    tx = make_optimizer(cfg.optim, cfg.total_steps)
    tok_dir = build_clip_tokenizer_files(os.path.join(workdir, "tokenizer"))
    batch = cfg.per_device_batch * jax.device_count()
    tokenizer = load_tokenizer(tok_dir)
    it = make_shapes_iterator(os.path.join(workdir, "data"), num_examples=cfg.num_examples, resolution=cfg.resolution,
                              seed=cfg.data_seed, tokenizer=tokenizer, batch_size_per_host=batch // jax.process_count())
    rng = np.random.default_rng(cfg.seed)   # hard negatives (a resumed run draws different ones)
    kinds = shapes.parse_hard_negative_kinds(cfg.hard_negative_kinds) if cfg.get("hard_negatives", 0) else ()

    def make_batch(host, mesh):
        arrays = {k: host[k] for k in ("pixels", "input_ids")}
        if kinds:
            arrays["negative_ids"] = hard_negative_ids(host["caption"], cfg.hard_negatives, tokenizer, rng, kinds)
        return parallel.global_batch(arrays, mesh)
    job = loop_lib.single_model_job("clip", cfg, TrainState.create(params, tx, cfg.seed), make_clip_step(module, tx),
                                    it, make_batch)
    result = loop_lib.train(job, cfg, workdir)
    last, out = result.metrics, os.path.join(workdir, "clip")
    params = parallel.to_host(result.state.params)   # every process takes part; process 0 writes
    if jax.process_index() == 0:
        save_component(module, params, out)
        build_clip_tokenizer_files(out)
    log.info("saved the CLIP to %s (last loss %.4g, in-batch accuracy %.3f)", out, last.get("loss", float("nan")),
             last.get("accuracy", float("nan")))
    return last
