"""A diffusers Stable Diffusion / LCM pipeline folder as Flax modules + params, and jitted samplers.

    pipe = load_pipeline("sd21base")                          # unet/ vae/ text_encoder/ tokenizer/ scheduler/
    ctx = encode_prompts(pipe, ["a red fox"])                 # [1, 77, D] float32
    z, img = sample_lcm(pipe, ["a red fox"], num_steps=4, guidance=8.5, rng=jax.random.PRNGKey(0))
    z, img = sample_ddim(pipe, ["a red fox"], num_steps=50, guidance=7.5, rng=jax.random.PRNGKey(0))
    pipe = load_pipeline("sd15", lora="lcm-lora-sdv1-5")      # an LCM-LoRA: sample_lcm(pipe, ..., guidance=1.0)

Samplers are compiled once per (modules, batch, latent shape, step schedule): the modules and the LCM
timesteps are static jit arguments (flax modules hash by config, so reloading the same folder reuses the
compilation), the params, latents, text embeddings and guidance scale are traced arguments.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxlcd.diffusion import samplers, schedule
from jaxlcd.loaders.lora_file import load_lora
from jaxlcd.models import lora
from jaxlcd.tokenizer import load_tokenizer, tokenize
from jaxlcd.loaders import load_component
from jaxlcd.errors import InputError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class PipelineError(InputError):
    """A path is not a usable diffusers pipeline folder, or a sampler does not fit the pipeline's UNet."""


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """Frozen modules + params of one pipeline folder (params are float32 unless loaded otherwise)."""
    path: str
    unet: Any                 # jaxlcd.models.unet.UNet2DConditionModel
    unet_params: Any
    vae: Any                  # jaxlcd.models.vae.AutoencoderKL
    vae_params: Any
    text_encoder: Any         # jaxlcd.models.clip_text.CLIPTextModel
    text_params: Any
    tokenizer: Any            # transformers CLIPTokenizer
    scheduler_config: dict
    abar: jax.Array           # alphas_cumprod [T] float32
    prediction_type: str      # "epsilon" | "v_prediction" | "sample"
    unet_lora: Any = None     # LoRA adapters on the UNet (`jaxlcd.models.lora`, scales folded in) or None

    @property
    def latent_shape(self) -> tuple:
        """Default latent (h, w, c): the UNet's sample_size (64 when unset) and in_channels."""
        s = self.unet.config.sample_size or 64
        return (s, s, self.unet.config.in_channels)

    @property
    def is_lcm(self) -> bool:
        """True when the UNet takes a guidance embedding (config time_cond_proj_dim is set)."""
        return bool(self.unet.config.time_cond_proj_dim)

    @property
    def unet_variables(self) -> dict:
        """The UNet's ``apply`` variables: its params, and its LoRA adapters when loaded."""
        return lora.variables(self.unet_params, self.unet_lora)


def check_pipeline_dir(path: str) -> None:
    """Raise PipelineError unless ``path`` holds model_index.json and the five SD component folders."""
    if not os.path.isdir(path):
        raise PipelineError(f"pipeline folder {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise PipelineError(f"{path!r} is not a diffusers pipeline folder (it has no model_index.json); "
                            "pass the folder that holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ "
                            "and scheduler/")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise PipelineError(f"pipeline folder {path!r} has no {', '.join(m + '/' for m in missing)} subfolder; "
                            f"a Stable Diffusion pipeline needs {', '.join(c + '/' for c in COMPONENTS)}")


def load_pipeline(path: str, dtype=jnp.float32, lora: Optional[str] = None) -> Pipeline:
    """Load a diffusers StableDiffusionPipeline / LatentConsistencyModelPipeline folder.

    ``dtype`` is the compute dtype of UNet, VAE and text encoder (params stay float32). ``lora``: a UNet LoRA
    file or folder (diffusers' ``pytorch_lora_weights.safetensors``, e.g. an LCM-LoRA) applied to the UNet, as
    diffusers' ``pipe.load_lora_weights(lora)``. Raises PipelineError (a ValueError) for a folder that is not a
    pipeline, WeightsError/ConfigError for a component or LoRA file that does not load.
    """
    check_pipeline_dir(path)
    unet, unet_params = load_component(os.path.join(path, "unet"), dtype=dtype)
    vae, vae_params = load_component(os.path.join(path, "vae"), dtype=dtype)
    text, text_params = load_component(os.path.join(path, "text_encoder"), dtype=dtype)
    try:
        tok = load_tokenizer(os.path.join(path, "tokenizer"))
    except FileNotFoundError as e:
        raise PipelineError(str(e)) from None
    config = schedule.read_scheduler_config(path)
    adapters = load_lora(lora, unet_params) if lora else None
    return Pipeline(path, unet, unet_params, vae, vae_params, text, text_params, tok, config,
                    jnp.asarray(schedule.alphas_cumprod(config), jnp.float32), schedule.prediction_type(config),
                    adapters)


def _as_list(prompts) -> list:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise PipelineError("the prompt list is empty; give at least one prompt")
    return prompts


def encode_prompts(pipe: Pipeline, prompts: Sequence[str]) -> jax.Array:
    """prompts (B strings) -> CLIP last_hidden_state [B, 77, D] float32 (jitted text encoder)."""
    ids = jnp.asarray(tokenize(pipe.tokenizer, _as_list(prompts)))
    return _encode(pipe.text_params, ids, te=pipe.text_encoder)


@functools.partial(jax.jit, static_argnames=("te",))
def _encode(text_params, ids, *, te):
    return te.apply({"params": text_params}, ids).astype(jnp.float32)


def _decode(vae, vae_params, z):
    dec = lambda x: vae.apply({"params": vae_params}, x, method=vae.decode)
    return samplers.decode_to_images(dec, z, vae.config.scaling_factor, vae.config.shift_factor or 0.0)


def _init_latents(pipe: Pipeline, batch: int, latents, rng):
    """NHWC float32 initial latents [B,h,w,c]: the given ones (checked) or N(0, I) from ``rng``."""
    if latents is None:
        return jax.random.normal(rng, (batch,) + pipe.latent_shape, jnp.float32)
    latents = jnp.asarray(latents, jnp.float32)
    c = pipe.unet.config.in_channels
    if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[-1] != c:
        raise PipelineError(f"latents must have shape [{batch}, h, w, {c}] (NHWC, one per prompt), "
                            f"got {tuple(latents.shape)}")
    return latents


def require_lcm(pipe: Pipeline) -> None:
    """Raise PipelineError unless the pipeline samples in few steps: an LCM student (time_cond_proj_dim), a UNet
    with LoRA adapters loaded, or a folder whose scheduler is an LCMScheduler (e.g. a fused LCM-LoRA export)."""
    if not (pipe.is_lcm or pipe.unet_lora is not None or pipe.scheduler_config.get("_class_name") == "LCMScheduler"):
        raise PipelineError(
            f"the UNet in {pipe.path!r} has no time_cond_proj_dim and the folder has no LCMScheduler, so it is not an "
            "LCM student; use the DDIM sampler (--sampler ddim) for a teacher model, or load an LCM-LoRA (--lora)")


def sample_lcm(pipe: Pipeline, prompts: Sequence[str], num_steps: int = 4, guidance: float = 8.5, latents=None,
               rng=None, noises=None, timesteps: Optional[Sequence[int]] = None, negative_prompt: str = ""):
    """Multistep LCM sampling (docs/algorithm.md section 5), matching diffusers' LatentConsistencyModelPipeline for
    an LCM student, and StableDiffusionPipeline with an LCMScheduler for a plain UNet (an LCM-LoRA).

    prompts: B strings; latents: initial noise [B,h,w,c] NHWC float32 (drawn from ``rng`` when None);
    timesteps: explicit descending list (else `schedule.lcm_timesteps(num_steps)`); guidance g: an LCM student
    embeds w = g - 1 (one UNet pass per step); a UNet without the embedding uses classifier-free guidance with
    ``negative_prompt`` when g > 1 and one conditional pass when g <= 1. noises [S-1,B,h,w,c] for the fresh noise
    between steps (drawn from ``rng`` when None). rng: a jax PRNGKey (default PRNGKey(0)).
    Returns (latents [B,h,w,c] float32, images [B,H,W,3] float32 in [0,1]).
    """
    require_lcm(pipe)
    if pipe.scheduler_config.get("clip_sample") or pipe.scheduler_config.get("thresholding"):
        raise PipelineError(f"the scheduler config of {pipe.path!r} asks for clip_sample/thresholding, which jaxlcd's "
                            "LCM sampler does not do (an LCMScheduler built from it would); set them to false")
    prompts = _as_list(prompts)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    k_lat, k_noise = jax.random.split(rng)
    z = _init_latents(pipe, len(prompts), latents, k_lat)
    if timesteps is None:
        cfg = pipe.scheduler_config
        timesteps = schedule.lcm_timesteps(num_steps, int(cfg.get("original_inference_steps", 50)),
                                           int(cfg.get("num_train_timesteps", 1000)))
    timesteps = tuple(int(t) for t in timesteps)
    if noises is None and len(timesteps) > 1:
        noises = jax.random.normal(k_noise, (len(timesteps) - 1,) + z.shape, jnp.float32)
    uncond = None if pipe.is_lcm or guidance <= 1 else encode_prompts(pipe, [negative_prompt] * len(prompts))
    return lcm_generate(pipe.unet_params, pipe.vae_params, z, encode_prompts(pipe, prompts), jnp.float32(guidance),
                        pipe.abar, noises, uncond, pipe.unet_lora, unet=pipe.unet, vae=pipe.vae, timesteps=timesteps,
                        kind=pipe.prediction_type)


@functools.partial(jax.jit, static_argnames=("unet", "vae", "timesteps", "kind"))
def lcm_generate(unet_params, vae_params, z, ctx, guidance, abar, noises, uncond=None, unet_lora=None, *, unet, vae,
                 timesteps, kind):
    """Jitted LCM sampling + decode from text embeddings: z [B,h,w,c], ctx [B,L,D], noises [S-1,B,h,w,c] or None;
    uncond [B,L,D]: classifier-free guidance with scale ``guidance`` (a UNet without time_cond_proj_dim);
    unet_lora: LoRA adapters of the UNet (scales folded in) or None.

    Returns (latents [B,h,w,c] float32, images [B,H,W,3] float32 in [0,1]).
    """
    variables = lora.variables(unet_params, unet_lora)
    f = lambda x, t, c, w: unet.apply(variables, x, t, c, timestep_cond=w)
    out = samplers.lcm_sample(f, z, ctx, timesteps, abar, kind, guidance, unet.config.time_cond_proj_dim,
                              noises=noises, uncond_ctx=uncond)
    return out, _decode(vae, vae_params, out)


def sample_ddim(pipe: Pipeline, prompts: Sequence[str], num_steps: int = 50, guidance: float = 7.5,
                negative_prompt: str = "", latents=None, rng=None, start_step: int = 0):
    """Deterministic DDIM (eta 0) with classifier-free guidance, as diffusers' StableDiffusionPipeline.

    The unconditional branch encodes ``negative_prompt`` ("" by default). latents [B,h,w,c] NHWC float32
    (drawn from ``rng`` when None; rng defaults to PRNGKey(0)). ``start_step`` > 0 skips the first DDIM steps:
    ``latents`` are then noisy latents at timestep ``ddim_timesteps(...)[start_step]`` (SDEdit / img2img).
    Returns (latents [B,h,w,c] float32, images [B,H,W,3] float32 in [0,1]).
    """
    prompts = _as_list(prompts)
    if num_steps < 1:
        raise PipelineError(f"DDIM needs at least 1 step, got {num_steps}")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    z = _init_latents(pipe, len(prompts), latents, rng)
    cfg = pipe.scheduler_config
    ts = schedule.ddim_timesteps(cfg, num_steps)
    prev = schedule.ddim_prev_alphas(cfg, ts, num_steps)
    ts, prev = ts[start_step:], prev[start_step:]
    ctx = encode_prompts(pipe, prompts)
    uncond = encode_prompts(pipe, [negative_prompt] * len(prompts))
    return _ddim_run(pipe.unet_variables, pipe.vae_params, z, ctx, uncond, jnp.float32(guidance), pipe.abar,
                     jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.float32), unet=pipe.unet, vae=pipe.vae,
                     kind=pipe.prediction_type)


@functools.partial(jax.jit, static_argnames=("unet", "vae", "kind"))
def _ddim_run(unet_variables, vae_params, z, ctx, uncond, guidance, abar, ts, prev, *, unet, vae, kind):
    f = lambda x, t, c: unet.apply(unet_variables, x, t, c)
    out = samplers.ddim_cfg_sample(f, z, ctx, uncond, ts, prev, abar, kind, guidance)
    return out, _decode(vae, vae_params, out)


def read_model_index(path: str) -> dict:
    """The parsed ``model_index.json`` of a pipeline folder."""
    check_pipeline_dir(path)
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)


__all__ = ["Pipeline", "PipelineError", "check_pipeline_dir", "load_pipeline", "encode_prompts", "sample_lcm",
           "sample_ddim", "require_lcm", "read_model_index"]
