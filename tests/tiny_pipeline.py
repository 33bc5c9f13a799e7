"""A tiny random Stable Diffusion pipeline folder written by diffusers itself (no downloads)."""
import os

import diffusers
import torch
import transformers

from conftest import perturb_
from jaxlcd.tokenizer import build_clip_tokenizer_files

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                sample_size=32)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def make_pipeline_dir(path: str, prediction_type: str = "epsilon", seed: int = 0, unet_extra=None) -> str:
    """Save a tiny random StableDiffusionPipeline (DDIM scheduler) at ``path``; returns ``path``."""
    torch.manual_seed(seed)
    unet = perturb_(diffusers.UNet2DConditionModel(**TINY_UNET, **(unet_extra or {})), seed=seed)
    vae = perturb_(diffusers.AutoencoderKL(**TINY_VAE), seed=seed + 1)
    text = perturb_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)), seed=seed + 2)
    tok_dir = build_clip_tokenizer_files(os.path.join(path + "_tok"))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type=prediction_type)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path
