"""Step time of LCD vs LCD + direct reward model vs LCD + latent proxy RM (with its online update), same run.

    PYTHONPATH=. python benchmarks/reward_step.py [--configs tiny mid] [--steps 5]

tiny: `jaxlcd.tiny` teacher (64 px, batch 2), tiny random CLIP reward (`tiny.TINY_CLIP`, 32 px input) and a
tiny latent_vit LRM. mid: benchmarks/train_step.py's mid teacher (74 M-param UNet, SD VAE, 256 px, batch 2), a
ViT-B/16-shaped CLIP reward with 4 layers per tower at 224 px, and a latent_vit LRM (width 256, 4 layers, patch 4
on 32 x 32 latents) with the same text tower shape. float32 compute, one device. Each row compiles its own step
(`make_train_step` as the trainer builds it); medians of ``--steps`` timed steps after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np

from common import gflops, machine, peak_rss_gib, print_table
from train_step import PROMPT, get_config, mid_teacher, tiny_teacher

MID_CLIP = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "max_position_embeddings": 77, "eos_token_id": 49407},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 4, "num_attention_heads": 12,
                      "image_size": 224, "patch_size": 16}}


def mid_lrm(latent: int) -> dict:
    return {"architectures": ["LatentRewardModel"], "arch": "latent_vit", "projection_dim": 512,
            "text_config": dict(MID_CLIP["text_config"], hidden_act="gelu"),
            "vision_config": {"num_channels": 4, "image_size": latent, "patch_size": 4, "hidden_size": 256,
                              "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
                              "hidden_act": "gelu"}}


def time_step(cfg, teacher: str, steps: int) -> dict:
    from jaxlcd import parallel
    from jaxlcd.pipeline import load_tokenizer, tokenize
    from jaxlcd.distill import job as loop, setup
    from jaxlcd.distill.step import make_train_step

    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    run = setup.build_run(cfg, teacher, mesh)
    b, px = cfg.per_device_batch, cfg.resolution
    ids = np.asarray(tokenize(load_tokenizer(os.path.join(teacher, "tokenizer")), [PROMPT] * b), np.int32)
    host = {"pixels": np.random.default_rng(0).uniform(-1, 1, (b, px, px, 3)).astype(np.float32),
            "input_ids": ids, "caption": np.array([PROMPT] * b, dtype=object)}
    batch = jax.device_put(loop.device_batch(host, run.models))
    fn = jax.jit(make_train_step(run.models, cfg.lcd, run.tx, run.abar, cfg.reward, cfg.lrm), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(run.state, run.frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    state = run.state
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, run.frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    assert bool(metrics["finite"]), metrics
    return {"compile s": compile_s, "step s": statistics.median(times[1:]), "XLA GFLOP/step": gflops(compiled)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from jaxlcd.models import clip, lrm
    from jaxlcd import tiny

    print(f"machine: {machine()}\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            if name == "tiny":
                cfg0, teacher = tiny_teacher(tmp)
                reward = tiny.write_reward_folder(os.path.join(tmp, "tiny_reward"))
                lrm_dir = tiny.write_lrm_folder(os.path.join(tmp, "tiny_lrm"), cfg0.resolution // 8)
            else:
                cfg0, teacher = mid_teacher(tmp)
                reward = tiny.write_random_component(os.path.join(tmp, "mid_reward"), clip, MID_CLIP)
                lrm_dir = tiny.write_random_component(os.path.join(tmp, "mid_lrm"), lrm, mid_lrm(cfg0.resolution // 8),
                                                     tokenizer_dir="tokenizer")
            base = None
            for guidance in ("", "rm", "lrm"):
                cfg = get_config(f"tiny,{guidance}" if guidance else "tiny") if name == "tiny" else \
                    get_config(f"sd15,{'clipscore' if guidance == 'rm' else guidance}" if guidance else "sd15")
                if name == "mid":
                    cfg.resolution, cfg.per_device_batch, cfg.compute_dtype = 256, 2, "float32"
                cfg.teacher, cfg.reward.path, cfg.lrm.path = teacher, reward, lrm_dir
                print(f"[{name} {guidance or 'lcd'}] compiling ...", flush=True)
                r = time_step(cfg, teacher, args.steps)
                base = base or r["step s"]
                rows.append({"config": name, "step": {"": "LCD", "rm": "LCD + direct RM",
                                                      "lrm": "LCD + LRM (+ online update)"}[guidance],
                             "batch": cfg.per_device_batch, "px": cfg.resolution, **r, "x LCD": r["step s"] / base})
                print(f"[{name} {guidance or 'lcd'}] {r}", flush=True)
    print()
    print_table(rows, ["config", "step", "batch", "px", "compile s", "step s", "x LCD", "XLA GFLOP/step"])
    print(f"\npeak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
