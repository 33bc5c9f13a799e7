"""The ``tiny`` variants' inputs: random tiny Stable-Diffusion-shaped model folders and a generated image-caption
folder, written with jaxlcd's own code (no PyTorch, no downloads).

``configs/rglcd.py:tiny`` and ``configs/lrm_pretrain.py:tiny`` build these in the workdir so the whole job runs
anywhere in seconds; diffusers/transformers load the folders (tests check it), so the same code paths as a real
teacher are exercised. Product code uses this module only for those variants.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from PIL import Image, ImageDraw

from jaxlcd.models import clip, clip_text, lrm, unet, vae
from jaxlcd.tokenizer import build_clip_tokenizer_files
from jaxlcd.loaders import save_component

DIFFUSERS_VERSION = "0.42.1"
TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": 8,
    "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 16}
TINY_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
    "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 16,
    "sample_size": 64, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215}
TINY_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 32,
    "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 49407}
SD_DDIM_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": 1000,
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_teacher_folder(out_dir: str, seed: int = 0, unet_config: dict = TINY_UNET, vae_config: dict = TINY_VAE,
                         text_config: dict = TINY_TEXT, scheduler_config: dict = SD_DDIM_SCHEDULER) -> str:
    """Write a random-weight StableDiffusionPipeline folder (unet, vae, text_encoder, tokenizer, scheduler)."""
    rng = jax.random.PRNGKey(seed)
    for i, (name, family, cfg) in enumerate([("unet", unet, unet_config), ("vae", vae, vae_config),
                                             ("text_encoder", clip_text, text_config)]):
        module = family.build(cfg)
        params = jax.jit(module.init)(jax.random.fold_in(rng, i), *family.SPEC.dummy_inputs(module))["params"]
        save_component(module, params, os.path.join(out_dir, name))
    build_clip_tokenizer_files(os.path.join(out_dir, "tokenizer"))
    return write_pipeline_index(out_dir, scheduler_config)


def write_pipeline_index(out_dir: str, scheduler_config: dict = SD_DDIM_SCHEDULER) -> str:
    """Write a StableDiffusionPipeline folder's scheduler config and model_index.json (the model subfolders
    unet, vae, text_encoder and tokenizer are the caller's)."""
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), scheduler_config)
    _write_json(os.path.join(out_dir, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_config["_class_name"]], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False})
    return out_dir


TINY_CLIP = {  # a tiny transformers CLIPModel: the tiny variant's reward model (and LRM expert)
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16, "logit_scale_init_value": 2.6592,
    "text_config": {k: v for k, v in TINY_TEXT.items() if k not in ("architectures", "model_type")},
    "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_act": "quick_gelu"}}


def tiny_lrm_config(latent_size: int) -> dict:
    """A tiny latent_vit LRM over [latent_size, latent_size, 4] latents (patch 2) with a tiny text tower."""
    return {"architectures": ["LatentRewardModel"], "arch": "latent_vit", "projection_dim": 16,
            "text_config": dict(TINY_CLIP["text_config"], hidden_act="gelu"),
            "vision_config": {"num_channels": 4, "image_size": latent_size, "patch_size": 2, "hidden_size": 32,
                              "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "hidden_act": "gelu"}}


def write_random_component(out_dir: str, family, config: dict, seed: int = 0, tokenizer_dir: str = "") -> str:
    """A random-init model folder of ``family`` (a jaxlcd.models module with build/SPEC) + CLIP tokenizer files
    in ``out_dir/tokenizer_dir``."""
    module = family.build(config)
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), *family.SPEC.dummy_inputs(module))["params"]
    save_component(module, params, out_dir)
    build_clip_tokenizer_files(os.path.join(out_dir, tokenizer_dir))
    return out_dir


def write_reward_folder(out_dir: str, seed: int = 0) -> str:
    """A random tiny CLIPModel folder (+ tokenizer files) usable as ``load_reward("clipscore", out_dir)``."""
    return write_random_component(out_dir, clip, TINY_CLIP, seed)


def write_lrm_folder(out_dir: str, latent_size: int, seed: int = 0) -> str:
    """A random tiny LRM folder usable as ``load_lrm(out_dir)``."""
    return write_random_component(out_dir, lrm, tiny_lrm_config(latent_size), seed, "tokenizer")


# --- the tiny image-caption folder ---
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 210, 30),
           "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")




def draw_image(rng: np.random.Generator, resolution: int) -> tuple[Image.Image, str]:
    """A random plain-background image (about ``resolution`` px, RGB, not square) with one coloured shape, and its
    caption."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    # Slightly non-square sizes so that resize-shorter-side + crop is exercised.
    w = resolution + int(rng.integers(0, resolution // 2 + 1))
    h = resolution + int(rng.integers(0, resolution // 4 + 1))
    img = Image.new("RGB", (w, h), COLOURS[names[bg]])
    size = int(rng.integers(resolution // 4, resolution // 2 + 1))
    cx = w // 2 + int(rng.integers(-resolution // 8, resolution // 8 + 1))
    cy = h // 2 + int(rng.integers(-resolution // 8, resolution // 8 + 1))
    box = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)
    draw, colour = ImageDraw.Draw(img), COLOURS[names[fg]]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=colour)
    article = "an" if names[fg][0] in "aeiou" else "a"
    return img, f"{article} {names[fg]} {shape} on a {names[bg]} background"


def write_image_folder(out_dir: str, n: int = 32, resolution: int = 64, seed: int = 0) -> list[tuple[str, str]]:
    """Write ``n`` PNG images (`draw_image`) with sidecar ``.txt`` captions into ``out_dir``, deterministic from
    ``seed``. Returns the (file name, caption) pairs in file-name order."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        img, caption = draw_image(rng, resolution)
        name = f"img_{i:04d}.png"
        img.save(os.path.join(out_dir, name))
        with open(os.path.join(out_dir, f"img_{i:04d}.txt"), "w", encoding="utf-8") as f:
            f.write(caption)
        pairs.append((name, caption))
    return pairs
