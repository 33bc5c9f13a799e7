"""Per-image sampling latency: jaxlcd (jit) vs diffusers (PyTorch eager), same CPU, same run.

    python benchmarks/sampling.py [--batch 1] [--repeats 3]

A mid-size random pipeline (quarter-width SD UNet with time_cond_proj_dim, the SD VAE at 256 px,
a 4-layer CLIP-L-width text encoder) is written by diffusers and loaded by `jaxlcd.pipeline`.
Latency covers text encoding, the UNet steps and VAE decode; jax compile time is reported apart.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np
import torch

from common import machine, median_seconds, print_table
from ports import MID_UNET, SD_VAE


def make_pipeline(path: str) -> str:
    import diffusers
    import transformers

    from jaxlcd.tokenizer import build_clip_tokenizer_files

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**MID_UNET, time_cond_proj_dim=256)
    vae = diffusers.AutoencoderKL(**SD_VAE)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    tok = transformers.CLIPTokenizer.from_pretrained(build_clip_tokenizer_files(path + "_tok"))
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                    help="torch intra-op threads (use 1 with `taskset -c 0` when other work shares the machine)")
    args = ap.parse_args()
    import diffusers

    from jaxlcd import pipeline as jp

    torch.set_num_threads(args.torch_threads)
    print(f"machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_pipeline(os.path.join(tmp, "pipe"))
        pipe = jp.load_pipeline(path)
        lcm = diffusers.LatentConsistencyModelPipeline.from_pretrained(path, safety_checker=None)
        lcm.scheduler = diffusers.LCMScheduler.from_config(lcm.scheduler.config)
        sd = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        for p in (lcm, sd):
            p.set_progress_bar_config(disable=True)
        prompts = ["a red circle above a blue square"] * args.batch
        latents = np.random.default_rng(0).standard_normal((args.batch, 32, 32, 4)).astype(np.float32)
        torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
        rng = jax.random.PRNGKey(0)
        cases = [(f"LCM {n} step{'s' if n > 1 else ''}",
                  lambda n=n: jp.sample_lcm(pipe, prompts, num_steps=n, guidance=8.5, latents=latents, rng=rng),
                  lambda n=n: lcm(prompts, num_inference_steps=n, guidance_scale=8.5, latents=torch_latents,
                                  output_type="np")) for n in (1, 2, 4)]
        cases.append(("DDIM 50 + CFG 7.5",
                      lambda: jp.sample_ddim(pipe, prompts, num_steps=50, guidance=7.5, latents=latents),
                      lambda: sd(prompts, num_inference_steps=50, guidance_scale=7.5, latents=torch_latents,
                                 output_type="np")))
        rows = []
        for name, jax_run, torch_run in cases:
            block = lambda: jax.block_until_ready(jax_run())
            t0 = time.perf_counter()
            block()  # first call compiles
            first = time.perf_counter() - t0
            jax_s = median_seconds(block, args.repeats, warmup=0)
            with torch.no_grad():
                torch_s = median_seconds(torch_run, args.repeats)
            rows.append({"sampler": name, "jaxlcd s/img": jax_s / args.batch, "diffusers s/img": torch_s / args.batch,
                         "diffusers/jaxlcd": torch_s / jax_s, "jax compile s (first call - run)": first - jax_s})
        print_table(rows, ["sampler", "jaxlcd s/img", "diffusers s/img", "diffusers/jaxlcd",
                           "jax compile s (first call - run)"])


if __name__ == "__main__":
    main()
