"""Train the demo world's attribute judge (`jaxlcd.demo.judge`) on scenes rendered on the fly.

The judge must also read held-out (shape, colour) pairs, so its scenes come from its own stream
(`judge_scene`) that draws uniformly over all 48 pairs, not from the generator's training stream. Mild
augmentation (Gaussian blur with sigma ~ U(0, max_blur) px, pixel noise with std ~ U(0, max_noise)) lets
it read blurry generated images. Loss = softmax cross-entropy summed over the heads (labels -1 ignored),
AdamW with warmup + cosine. Writes ``<workdir>/judge`` and logs scene accuracy on rendered held-out
(`eval_scenes`) and training-stream (`sample_scene`) scenes.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.ndimage

from jaxlcd import parallel
from jaxlcd.demo import shapes
from jaxlcd.demo.metrics import scene_accuracy
from jaxlcd.demo import judge as judge_lib
from jaxlcd.training import loop as loop_lib
from jaxlcd.training.optimizer import make_optimizer
from jaxlcd.training.state import TrainState

log = logging.getLogger("jaxlcd")

ALL_PAIRS = tuple((s, c) for s in shapes.SHAPES for c in shapes.COLOURS)


def judge_scene(seed: int, index: int) -> shapes.Scene:
    """Scene ``index`` of the judge's stream for ``seed``: like `shapes.sample_scene` but over all 48 pairs
    (held-out ones included) and from a different random stream."""
    return shapes._draw_scene(np.random.default_rng([seed, index, 3]), ALL_PAIRS, ALL_PAIRS, False)


def render_batch(scenes, resolution: int) -> np.ndarray:
    """uint8 [B,resolution,resolution,3] renders of ``scenes`` (with their layout jitter)."""
    return np.stack([shapes.render(s, resolution) for s in scenes])


class JudgeScenes:
    """Endless batches {"pixels": float32 [B,S,S,3] in [0,1] (augmented, see `augment`), "labels": {head:
    int32 [B]}} of `judge_scene`; checkpointable: the state is the next scene index, and each batch is a
    function of (seed, its first index)."""

    def __init__(self, seed: int, batch_size: int, resolution: int, max_blur: float = 0.0, max_noise: float = 0.0):
        self.seed, self.batch_size, self.resolution, self.next_index = seed, batch_size, resolution, 0
        self.max_blur, self.max_noise = max_blur, max_noise

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first = self.next_index
        scenes = [judge_scene(self.seed, i) for i in range(first, first + self.batch_size)]
        self.next_index += self.batch_size
        pixels = augment(render_batch(scenes, self.resolution), np.random.default_rng([self.seed, first, 4]),
                         self.max_blur, self.max_noise)
        return {"pixels": pixels, "labels": judge_lib.batch_labels(scenes)}

    def get_state(self) -> bytes:
        return json.dumps({"next_index": self.next_index}).encode("utf-8")

    def set_state(self, state: bytes | str | dict) -> None:
        self.next_index = int((json.loads(state) if isinstance(state, (bytes, str)) else state)["next_index"])


def augment(pixels: np.ndarray, rng: np.random.Generator, max_blur: float, max_noise: float) -> np.ndarray:
    """uint8 [B,S,S,3] -> float32 [B,S,S,3] in [0,1]: each image blurred with a Gaussian of sigma ~ U(0,
    max_blur) px (edges extended), then N(0, std ~ U(0, max_noise)) pixel noise added and clipped."""
    x = pixels.astype(np.float32) / 255.0
    sigmas = rng.uniform(0.0, max_blur, len(x))
    x = np.stack([scipy.ndimage.gaussian_filter(im, (s, s, 0), mode="nearest", truncate=3.0) if s > 0.05 else im
                  for im, s in zip(x, sigmas)])  # sigma <= 0.05 px changes nothing at 8-bit precision
    std = rng.uniform(0.0, max_noise, (len(x), 1, 1, 1)).astype(np.float32)
    return np.clip(x + std * rng.standard_normal(x.shape, dtype=np.float32), 0.0, 1.0)


def judge_loss(module, params, images, labels):
    """images float32 [B,S,S,3], labels {head: int32 [B], -1 ignored} -> (loss, {"scene_acc"}) scalars:
    the sum over heads of the mean cross-entropy over that head's labelled examples."""
    logits, _ = module.apply({"params": params}, images)
    loss, all_right = 0.0, jnp.ones(images.shape[0], bool)
    for name, lg in logits.items():
        y = labels[name]
        valid = y >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(lg.astype(jnp.float32), jnp.maximum(y, 0))
        loss = loss + jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)
        all_right &= (jnp.argmax(lg, -1) == y) | ~valid
    return loss, {"scene_acc": all_right.mean()}


def make_judge_step(module, tx):
    """``step(state: TrainState, frozen (unused), batch {"pixels","labels"}) -> (state,
    metrics {"loss","scene_acc","grad_norm"})``."""

    def step(state, frozen, batch):
        (loss, parts), grads = jax.value_and_grad(
            lambda p: judge_loss(module, p, batch["pixels"], batch["labels"]), has_aux=True)(state.params)
        return state.apply_gradients(tx, grads), {"loss": loss, **parts, "grad_norm": optax.global_norm(grads)}

    return step


def evaluate(module, params, scenes, resolution: int) -> float:
    """Scene accuracy of the judge on renders of ``scenes`` against their canonical captions."""
    predicted, _ = judge_lib.predict(module, params, render_batch(scenes, resolution))
    return scene_accuracy(predicted, [shapes.caption(s, template=0) for s in scenes])


def train_judge(cfg, workdir: str) -> dict:
    """Train (or resume) the judge; writes ``<workdir>/judge``. Returns the last metrics plus
    ``heldout_acc`` / ``train_stream_acc`` (scene accuracy on cfg.eval_count rendered scenes each)."""
    os.makedirs(workdir, exist_ok=True)
    module = judge_lib.Judge(judge_lib.JudgeConfig(cfg.resolution, tuple(cfg.channels), cfg.feature_dim))
    params = judge_lib.init_params(module, cfg.seed)
    tx = make_optimizer(cfg.optim, cfg.total_steps)
    it = JudgeScenes(cfg.seed, cfg.per_device_batch * jax.device_count(), cfg.resolution, cfg.max_blur,
                     cfg.max_noise)
    job = loop_lib.single_model_job("judge", cfg, TrainState.create(params, tx, cfg.seed),
                                    make_judge_step(module, tx), it, parallel.global_batch)
    result = loop_lib.train(job, cfg, workdir)
    last, params = result.metrics, parallel.to_host(result.state.params)
    out = os.path.join(workdir, "judge")
    if jax.process_index() != 0:   # one process writes and scores the judge
        return last
    judge_lib.save_judge(module, params, out)
    module, params = judge_lib.load_judge(out)  # evaluate what was shipped (fp16-rounded weights)
    n = cfg.eval_count
    accs = {"heldout_acc": evaluate(module, params, shapes.eval_scenes(n, seed=123), cfg.resolution),
            "train_stream_acc": evaluate(module, params, [shapes.sample_scene(cfg.stream_seed, i) for i in range(n)],
                                         cfg.resolution)}
    with open(os.path.join(workdir, "judge_eval.json"), "w", encoding="utf-8") as f:
        json.dump(accs, f, indent=2)
    log.info("saved the judge to %s; scene accuracy on %d rendered held-out scenes %.4f, on %d training-stream "
             "scenes %.4f", out, n, accs["heldout_acc"], n, accs["train_stream_acc"])
    return dict(last, **accs)
