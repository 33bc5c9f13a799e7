"""Train an AutoencoderKL (the demo world's VAE, f = 8) from scratch on an image dataset.

Loss = mean squared reconstruction error + kl_weight * KL(posterior || N(0, I)) per latent element. After training,
``scaling_factor`` = 1 / std of the latents of a few training batches (the Stable Diffusion convention), so the
diffusion latents have unit variance. The result is a diffusers ``vae/`` folder at ``<workdir>/vae``.

Acceptance check (``cfg.judge``): the demo judge's scene accuracy on the VAE's reconstructions of held-out scenes, at
every checkpoint and at the end. It bounds what any teacher built on this VAE can score, so a VAE below
``cfg.min_judge_accuracy`` is reported as not good enough for the demo teacher.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlcd import parallel
from jaxlcd.demo import metrics as eval_metrics
from jaxlcd.demo import shapes
from jaxlcd.demo import demo_path
from jaxlcd.demo.shapes import make_shapes_iterator
from jaxlcd.models import vae as vae_lib
from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer
from jaxlcd.training import evaluators, loop as loop_lib
from jaxlcd.training.optimizer import make_optimizer
from jaxlcd.training.state import TrainState
from jaxlcd.loaders import load_component, save_component

log = logging.getLogger("jaxlcd")


def foreground_mask(pixels, threshold: float = 0.1):
    """pixels [B,H,W,3] in [-1,1] -> [B,H,W,1] float32: 1 where a pixel differs from its image's background colour
    (the median of the border pixels) by more than ``threshold`` summed over channels, else 0."""
    border = jnp.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    background = jnp.median(border, axis=1)[:, None, None, :]
    return (jnp.sum(jnp.abs(pixels - background), axis=-1, keepdims=True) > threshold).astype(jnp.float32)


def edge_error(rec, pixels):
    """Mean absolute difference of the horizontal and vertical finite differences of rec and pixels [B,H,W,C]:
    a blurred edge spreads its step over several pixels and pays for it, where the MSE barely notices."""
    dx = lambda x: x[:, :, 1:] - x[:, :, :-1]
    dy = lambda x: x[:, 1:] - x[:, :-1]
    return jnp.mean(jnp.abs(dx(rec) - dx(pixels))) + jnp.mean(jnp.abs(dy(rec) - dy(pixels)))


def vae_loss(vae, params, pixels, rng, kl_weight: float, object_weight: float = 0.0, edge_weight: float = 0.0,
             train_encoder: bool = True, latent_noise: float = 0.0):
    """pixels [B,H,W,3] in [-1,1] -> (loss, {"mse", "kl", "edge"}) float32 scalars.

    loss = mean(w * (rec - pixels)^2) + edge_weight * `edge_error` + kl_weight * KL per latent element, w = 1 +
    object_weight on foreground pixels (`foreground_mask`): small objects on flat backgrounds would otherwise be a few
    % of the error. ``train_encoder=False`` stops gradients at the posterior (the encoder and its latents stay fixed,
    so a teacher trained on them stays valid while the decoder improves). ``latent_noise`` > 0 adds Gaussian noise of
    std ~ U[0, latent_noise] x the batch std of the posterior means (per example) to the decoder's input: the decoder
    learns to render slightly-off latents, like a diffusion model's, as the clean image; with the encoder trained too,
    the encoder must also write what matters (shape) with an amplitude above that noise, where the diffusion loss sees
    it, rather than in small latent details (the noise scale follows the latents, so growing them does not help)."""
    moments = vae.apply({"params": params}, pixels, method=vae.encode)
    if not train_encoder:
        moments = jax.lax.stop_gradient(moments)
    z = vae_lib.latent_dist_sample(moments, rng)
    if latent_noise:
        k_std, k_noise = jax.random.split(jax.random.fold_in(rng, 1))
        scale = jax.lax.stop_gradient(jnp.std(vae_lib.latent_dist_mode(moments)))
        std = jax.random.uniform(k_std, (z.shape[0], 1, 1, 1), maxval=latent_noise) * scale
        z = z + std * jax.random.normal(k_noise, z.shape, z.dtype)
    rec = vae.apply({"params": params}, z, method=vae.decode)
    rec = rec.astype(jnp.float32)
    err = (rec - pixels) ** 2
    mse = jnp.mean(err)
    weighted = jnp.mean(err * (1.0 + object_weight * foreground_mask(pixels))) if object_weight else mse
    edge = edge_error(rec, pixels)
    kl = jnp.mean(vae_lib.latent_kl(moments)) / (moments.size // moments.shape[0] // 2)
    return weighted + edge_weight * edge + kl_weight * kl, {"mse": mse, "kl": kl, "edge": edge}


def make_vae_step(vae, tx, kl_weight: float, object_weight: float = 0.0, edge_weight: float = 0.0,
                  train_encoder: bool = True, latent_noise: float = 0.0):
    """``step(state: TrainState, frozen (unused), batch {"pixels"}) -> (state, metrics)``."""

    def step(state, frozen, batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, parts), grads = jax.value_and_grad(
            lambda p: vae_loss(vae, p, batch["pixels"], key, kl_weight, object_weight, edge_weight, train_encoder,
                               latent_noise),
            has_aux=True)(state.params)
        return state.apply_gradients(tx, grads), {"loss": loss, **parts, "grad_norm": optax.global_norm(grads)}

    return step


def latent_scaling_factor(vae, params, batches) -> float:
    """1 / std of the posterior means over ``batches`` of pixels [B,H,W,3] (Stable Diffusion's convention)."""
    encode = jax.jit(lambda x: vae_lib.latent_dist_mode(vae.apply({"params": params}, x, method=vae.encode)))
    z = np.concatenate([np.asarray(encode(b)).ravel() for b in batches])
    return float(1.0 / z.std())


def reconstruction_check(vae, params, judge_dir: str, num_scenes: int = 256, resolution: int = 64,
                         noise: float = 0.1) -> dict:
    """The judge (folder ``judge_dir``) on the VAE's reconstructions (posterior mode, decoded, clipped) of the first
    ``num_scenes`` held-out scenes rendered at ``resolution``: {"judge_acc" (all attributes right), "judge_shape",
    "judge_colour", "rec_mse" (on [-1, 1]), "judge_acc_noisy" (the mode plus Gaussian noise of ``noise`` x its std:
    how robust the decoder is to the errors of a diffusion model)}, floats."""
    from jaxlcd.demo import judge as judge_lib

    module, judge_params = judge_lib.load_judge(judge_dir)
    scenes = shapes.eval_scenes(num_scenes)
    prompts = [shapes.caption(s, template=0) for s in scenes]
    x = np.stack([shapes.render(s, resolution) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    encode = jax.jit(lambda p, x: vae_lib.latent_dist_mode(vae.apply({"params": p}, x, method=vae.encode)))
    decode = jax.jit(lambda p, z: jnp.clip(vae.apply({"params": p}, z, method=vae.decode), -1.0, 1.0))
    z = np.concatenate([np.asarray(encode(params, x[i:i + 64])) for i in range(0, len(x), 64)])

    def judged(latents):   # -> (reconstructions [N,R,R,3] in [-1,1], the judge's predictions)
        rec = np.concatenate([np.asarray(decode(params, latents[i:i + 64]), np.float32) for i in range(0, len(z), 64)])
        return rec, judge_lib.predict(module, judge_params, (rec + 1.0) / 2.0)[0]

    rec, predicted = judged(z)
    z_noisy = z + noise * z.std() * np.random.default_rng(0).standard_normal(z.shape).astype(np.float32)
    _, predicted_noisy = judged(z_noisy)
    per_attribute = eval_metrics.attribute_accuracy(predicted, prompts)
    return {"judge_acc": eval_metrics.scene_accuracy(predicted, prompts), "judge_shape": per_attribute["shape"],
            "judge_colour": per_attribute["colour"], "rec_mse": float(np.mean((rec - x) ** 2)),
            "judge_acc_noisy": eval_metrics.scene_accuracy(predicted_noisy, prompts)}


def demo_judge_dir(judge: str) -> str:
    """A config's ``judge`` value as a folder: "demo" is the shipped judge; "" (no check) and paths pass through."""
    return demo_path("judge") if judge == "demo" else judge


def reconstruction_evaluator(name: str, ecfg, context: dict):
    """Evaluator ``type="jaxlcd.demo.train_vae:reconstruction_evaluator"``: `reconstruction_check` with the judge
    ``ecfg.judge`` ("demo": the shipped one; "": none) every ``ecfg.every`` steps. Context: ``vae``, ``resolution``."""
    judge_dir = demo_judge_dir(ecfg.get("judge", "demo"))
    if not judge_dir:
        return None
    return evaluators.Evaluator(name, int(ecfg.get("every", 0)), lambda state, step, final: reconstruction_check(
        context["vae"], parallel.to_host(state.params), judge_dir, resolution=context["resolution"]))


def train_vae(cfg, workdir: str) -> dict:
    """Train (or resume) the VAE on the shapes dataset; writes ``<workdir>/vae``. Returns the last metrics."""
    os.makedirs(workdir, exist_ok=True)
    tok = load_tokenizer(build_clip_tokenizer_files(os.path.join(workdir, "tokenizer")))
    batch = cfg.per_device_batch * jax.device_count()
    it = make_shapes_iterator(os.path.join(workdir, "data"), num_examples=cfg.num_examples, resolution=cfg.resolution,
                              seed=cfg.seed, tokenizer=tok, batch_size_per_host=batch // jax.process_count())
    if cfg.init_from:  # a second training phase (fresh optimizer and schedule) from a saved vae/ folder
        vae, params = load_component(cfg.init_from)   # its config replaces cfg.vae
    else:
        vae = vae_lib.build(dict(cfg.vae))
        params = jax.jit(vae.init)(jax.random.PRNGKey(cfg.seed), *vae_lib.SPEC.dummy_inputs(vae))["params"]
    tx = make_optimizer(cfg.optim, cfg.total_steps)
    step_fn = make_vae_step(vae, tx, cfg.kl_weight, cfg.object_weight, cfg.edge_weight, cfg.train_encoder,
                            cfg.latent_noise)
    evals = evaluators.from_config(cfg.evals, {"vae": vae, "resolution": cfg.resolution})
    job = loop_lib.single_model_job("vae", cfg, TrainState.create(params, tx, cfg.seed + 1), step_fn, it,
                                    lambda host, mesh: parallel.global_batch({"pixels": host["pixels"]}, mesh),
                                    evaluators=evals)
    result = loop_lib.train(job, cfg, workdir)
    last, params = result.metrics, parallel.to_host(result.state.params)
    if cfg.train_encoder:
        sf = latent_scaling_factor(vae, params, [next(it)["pixels"] for _ in range(4)])
    else:  # same encoder, same latents: keep the factor a teacher trained on them was built with
        sf = vae.config.scaling_factor
    vae = vae.clone(config=dataclasses.replace(vae.config, scaling_factor=sf))
    if jax.process_index() == 0:
        save_component(vae, params, os.path.join(workdir, "vae"))
    log.info("saved the VAE to %s (scaling_factor %.4f, last mse %.4g)", os.path.join(workdir, "vae"), sf,
             last.get("mse", float("nan")))
    if "judge_acc" in last:
        verdict = "passes" if last["judge_acc"] >= cfg.min_judge_accuracy else "FAILS"
        log.info("acceptance: judge accuracy on reconstructions of held-out scenes %.3f (shape %.3f) %s the bar "
                 "%.2f", last["judge_acc"], last["judge_shape"], verdict, cfg.min_judge_accuracy)
    return dict(last, scaling_factor=sf)
