"""Speed of the Flax ports against their PyTorch originals on this machine (same run, same inputs).

    python benchmarks/ports.py            # mid-size UNet fwd / fwd+bwd, SD VAE decode, CLIP-L text
    python benchmarks/ports.py --full     # + a full SD 2.1-base-sized UNet: load, compile, run, peak memory

Random weights; every model is written by diffusers/transformers and read with `load_component`.
Prints markdown tables (copied into BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import torch

from common import compile_jax, machine, median_seconds, peak_rss_gib, print_table
from jaxlcd.weights import load_component

MID_UNET = dict(  # SD-like, a quarter of SD's width, 3 levels
    sample_size=32, block_out_channels=(128, 256, 512), layers_per_block=2, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
SD21_BASE_UNET = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def torch_compiled(model):
    """torch.compile(model) if it works here, else None."""
    try:
        return torch.compile(model)
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None


def bench_pair(name, jax_fn, jax_args, torch_fn, torch_compiled_fn=None, repeats=5):
    compiled, compile_s, gf = compile_jax(jax_fn, *jax_args)
    jax_s = median_seconds(lambda: jax.block_until_ready(compiled(*jax_args)), repeats)
    torch_s = median_seconds(torch_fn, repeats)
    row = {"work": name, "GFLOP": gf, "jax s": jax_s, "torch eager s": torch_s,
           "torch/jax": torch_s / jax_s, "jax GFLOP/s": gf / jax_s, "jax compile s": compile_s}
    if torch_compiled_fn is not None:
        try:
            row["torch.compile s"] = median_seconds(torch_compiled_fn, repeats, warmup=2)
        except Exception as e:  # noqa: BLE001
            row["torch.compile s"] = f"failed: {type(e).__name__}"
    return row


def unet_rows(tmp):
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**MID_UNET).eval()
    path = os.path.join(tmp, "unet")
    model.save_pretrained(path)
    unet, params = load_component(path)
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 77, 768)
    jx, jt, jctx = x.numpy().transpose(0, 2, 3, 1), t.numpy(), ctx.numpy()

    def fwd(p, x, t, c):
        return unet.apply({"params": p}, x, t, c)

    def fwd_bwd(p, x, t, c):
        return jax.grad(lambda p: jnp.mean(fwd(p, x, t, c) ** 2))(p)

    def torch_fwd(m):
        def run():
            with torch.no_grad():
                m(x, t, ctx)
        return run

    def torch_fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x, t, ctx).sample.pow(2).mean().backward()

    compiled_model = torch_compiled(model)
    rows = [bench_pair("UNet mid fwd (2x32x32)", fwd, (params, jx, jt, jctx), torch_fwd(model),
                       torch_fwd(compiled_model) if compiled_model is not None else None),
            bench_pair("UNet mid fwd+bwd (2x32x32)", fwd_bwd, (params, jx, jt, jctx), torch_fwd_bwd, repeats=3)]
    n_params = sum(p.numel() for p in model.parameters())
    rows[0]["work"] += f" {n_params / 1e6:.0f}M"
    return rows


def vae_rows(tmp):
    import diffusers

    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**SD_VAE).eval()
    path = os.path.join(tmp, "vae")
    model.save_pretrained(path)
    vae, params = load_component(path)
    z = torch.randn(1, 4, 32, 32)
    jz = z.numpy().transpose(0, 2, 3, 1)

    def run():
        with torch.no_grad():
            model.decode(z)
    return [bench_pair("VAE decode SD (1x32x32 -> 256px)",
                       lambda p, z: vae.apply({"params": p}, z, method=vae.decode), (params, jz), run, repeats=3)]


def clip_rows(tmp):
    import transformers

    torch.manual_seed(0)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)).eval()
    path = os.path.join(tmp, "text_encoder")
    model.save_pretrained(path)
    te, params = load_component(path)
    ids = torch.randint(0, 49407, (2, 77))

    def run():
        with torch.no_grad():
            model(ids)
    return [bench_pair("CLIP-L text (2x77)", lambda p, i: te.apply({"params": p}, i), (params, ids.numpy()), run)]


def full_unet_row(tmp):
    """Load a random SD 2.1-base UNet written by diffusers, compile and run it once (batch 1, 64x64x4)."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**SD21_BASE_UNET).eval()
    path = os.path.join(tmp, "unet_full")
    model.save_pretrained(path)
    x, t, ctx = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 1024)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(x, t, ctx)
    torch_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    del model
    t0 = time.perf_counter()
    unet, params = load_component(path)
    load_s = time.perf_counter() - t0
    args = (params, x.numpy().transpose(0, 2, 3, 1), t.numpy(), ctx.numpy())
    compiled, compile_s, gf = compile_jax(lambda p, x, t, c: unet.apply({"params": p}, x, t, c), *args)
    mem = compiled.memory_analysis()
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    run_s = time.perf_counter() - t0
    return {"work": f"SD2.1-base UNet {n_params / 1e6:.0f}M fwd (1x64x64)", "load s": load_s,
            "compile s": compile_s, "jax run s": run_s, "torch eager s": torch_s, "GFLOP": gf,
            "XLA args GiB": getattr(mem, "argument_size_in_bytes", float("nan")) / 2**30,
            "XLA temp GiB": getattr(mem, "temp_size_in_bytes", float("nan")) / 2**30,
            "peak RSS GiB": peak_rss_gib()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also load and run a full SD 2.1-base-sized UNet")
    ap.add_argument("--only-full", action="store_true", help="only the full-size UNet")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_full:
            rows = unet_rows(tmp) + vae_rows(tmp) + clip_rows(tmp)
            print_table(rows, ["work", "GFLOP", "jax s", "torch eager s", "torch.compile s", "torch/jax",
                               "jax GFLOP/s", "jax compile s"])
        if args.full or args.only_full:
            print()
            print_table([full_unet_row(tmp)], ["work", "load s", "compile s", "jax run s", "torch eager s",
                                               "GFLOP", "XLA args GiB", "XLA temp GiB", "peak RSS GiB"])


if __name__ == "__main__":
    main()
