"""Speed and FLOPs of the compiled LCD training step, against the same step in eager PyTorch (same run).

    PYTHONPATH=. python benchmarks/train_step.py [--configs tiny mid] [--steps-tiny 10] [--steps-mid 3]
                                                 [--torch-threads N] [--remat full dots] [--attention auto]
                                                 [--modes full lora]

Configs:
  tiny  the tiny random teacher of `jaxlcd.tiny` (configs/rglcd.py:tiny), 64 px, batch 2;
  mid   a pipeline folder with a quarter-width SD UNet (benchmarks/ports.py MID_UNET, 74 M params), the SD VAE
        and a 4-layer CLIP-L-width text encoder (benchmarks/sampling.py make_pipeline), 256 px, batch 2.

jax: `jaxlcd.distill.setup.build_run` on a single-device mesh, compute dtype float32, `make_train_step` jitted
with the state donated; each step encodes random pixels with the VAE and fixed token ids with the text encoder.
PyTorch: the same work in eager mode with diffusers / transformers models loaded from the same folder: VAE encode
+ posterior sample, CLIP text encode, batched cond+uncond teacher UNet (2B), student UNet (teacher weights +
`time_embedding.cond_proj`), EMA-target UNet on x_prev at t_end, pseudo-Huber loss, backward,
clip_grad_norm_(1.0), AdamW, EMA update. jax and torch steps are timed alternately (one of each per round), so a
varying background load hits both alike; medians.

FLOPs: model FLOPs of the jax step (`jaxlcd.training.flops.model_flops`: matmuls and convolutions of the traced
step, 2 per multiply-add, no remat recompute, attention as its matmuls whatever kernel runs it), XLA's
`cost_analysis()["flops"]` of the compiled step (includes recompute; leaves out custom calls such as fused attention
and, on GPU, cuDNN convolutions), `torch.utils.flop_counter.FlopCounterMode` on one PyTorch step (forward + backward,
includes the gradient-checkpointing recompute when --remat is on) and an estimate built from per-model forward
counts: 3 x student fwd (fwd + bwd) + teacher fwd at 2B + target fwd + VAE encode + text encode.
MFU = model FLOPs / step time / the device's dense bf16 peak (`jaxlcd.training.flops.PEAK_FLOPS`); the same model
FLOPs for both frameworks, since they do the same work.
Prints markdown tables (copied into BENCHMARKS.md).

On a machine where other processes hold cores, eager PyTorch with one OpenMP thread per core stalls at its
parallel-region barriers; `taskset -c 0 ... --torch-threads 1` pins both sides to one core for a fair ratio.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import gflops, machine, peak_rss_gib, print_table
from jaxlcd.models.layers import remat_policy
from jaxlcd.training import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of an astronaut riding a horse"


def get_config(variant: str):
    spec = importlib.util.spec_from_file_location("rglcd_config", os.path.join(ROOT, "configs", "rglcd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


# ------------------------------------------------------------------------------------------- teachers
def tiny_teacher(tmp: str, suffix: str = ""):
    from jaxlcd import tiny

    cfg = get_config("tiny" + suffix)
    path = os.path.join(tmp, "tiny_teacher")
    return cfg, path if os.path.isdir(path) else tiny.write_teacher_folder(path, seed=cfg.seed)


def mid_teacher(tmp: str, suffix: str = ""):
    """benchmarks/sampling.py's mid pipeline, with a teacher UNet (no time_cond_proj_dim) in place of its student."""
    import diffusers

    from ports import MID_UNET
    from sampling import make_pipeline

    path = os.path.join(tmp, "mid_teacher")
    if not os.path.isdir(path):
        make_pipeline(path)
        torch.manual_seed(0)
        diffusers.UNet2DConditionModel(**MID_UNET).save_pretrained(os.path.join(path, "unet"))
    cfg = get_config("sd15" + suffix)
    cfg.resolution, cfg.per_device_batch, cfg.compute_dtype = 256, 2, "float32"
    return cfg, path


def sd21base_teacher(tmp: str, batch: int, suffix: str = ""):
    """A full-size SD 2.1-base pipeline folder with random weights (fp32 safetensors, ~5 GB; written once)."""
    import diffusers
    import transformers

    from aot_tpu import SD21_BASE_UNET, SD2_TEXT, SD_SCHEDULER, SD_VAE
    from jaxlcd.tokenizer import build_clip_tokenizer_files

    path = os.path.join(tmp, "sd21base")
    cfg = get_config("sd21base" + suffix)
    cfg.resolution, cfg.per_device_batch, cfg.compute_dtype = 512, batch, "bfloat16"
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return cfg, path
    torch.manual_seed(0)
    cfg_of = lambda d: {k: v for k, v in d.items() if not k.startswith("_") and k != "architectures"}
    diffusers.UNet2DConditionModel(**cfg_of(SD21_BASE_UNET)).save_pretrained(os.path.join(path, "unet"))
    diffusers.AutoencoderKL(**cfg_of(SD_VAE)).save_pretrained(os.path.join(path, "vae"))
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg_of(SD2_TEXT))).save_pretrained(
        os.path.join(path, "text_encoder"))
    build_clip_tokenizer_files(os.path.join(path, "tokenizer"), pad_token="!")
    diffusers.DDIMScheduler(**SD_SCHEDULER).save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        import json
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}, f)
    return cfg, path


# ------------------------------------------------------------------------------------------- jax side
class JaxStep:
    def __init__(self, cfg, teacher_dir: str, pixels: np.ndarray, ids: np.ndarray, batch: dict | None = None):
        """``batch`` (e.g. pre-encoded {"moments", "ctx"}) replaces {"pixels", "input_ids"} when given."""
        from jaxlcd import parallel
        from jaxlcd.distill.setup import build_run
        from jaxlcd.distill.step import make_train_step

        mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        run = build_run(cfg, teacher_dir, mesh)
        self.run = run
        self.frozen = run.frozen
        self.batch = {k: jnp.asarray(v) for k, v in (batch or {"pixels": pixels, "input_ids": ids}).items()}
        step = make_train_step(run.models, cfg.lcd, run.tx, run.abar)
        fn = jax.jit(step, donate_argnums=0)
        t0 = time.perf_counter()
        self.compiled = fn.lower(run.state, self.frozen, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.gflop = gflops(self.compiled)
        self.model_gflop = flops.model_flops(lambda: step, run.state, self.frozen, self.batch) / 1e9
        self.state = run.state
        self.n_student = sum(x.size for x in jax.tree_util.tree_leaves(run.state.params))

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.frozen, self.batch)
        jax.block_until_ready(metrics)
        dt = time.perf_counter() - t0
        assert bool(metrics["finite"]), metrics
        return dt


# ------------------------------------------------------------------------------------------- torch side
class TorchStep:
    """The LCD step of docs/algorithm.md section 2 in eager PyTorch (float32), models read from the teacher folder."""

    def __init__(self, cfg, teacher_dir: str, pixels: np.ndarray, ids: np.ndarray, uncond_ids: np.ndarray,
                 device: str = "cpu"):
        import diffusers
        import transformers

        torch.manual_seed(cfg.seed)
        self.device = torch.device(device)
        # frozen models in the compute dtype; the student keeps float32 masters (autocast when bf16), as jax does
        self.dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32
        load = lambda cls, sub: cls.from_pretrained(os.path.join(teacher_dir, sub)).eval().requires_grad_(False).to(
            self.device, self.dtype)
        self.teacher = load(diffusers.UNet2DConditionModel, "unet")
        self.vae = load(diffusers.AutoencoderKL, "vae")
        self.text = load(transformers.CLIPTextModel, "text_encoder")
        self.lora = cfg.lora.enabled
        if self.lora:   # diffusers' LCM-LoRA scripts: PEFT adapters on the teacher (sdxl script: one UNet, adapters
            from peft import LoraConfig   # disabled for the teacher pass), float32 adapters, target = the student

            self.student = self.teacher
            self.student.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                                target_modules=list(cfg.lora.targets)))
            self.params = [p for p in self.student.parameters() if p.requires_grad]
            for p in self.params:
                p.data = p.data.float()
            self.target = self.student
        else:
            self.student = diffusers.UNet2DConditionModel.from_config(
                self.teacher.config, time_cond_proj_dim=cfg.lcd.w_embedding_dim)
            missing, unexpected = self.student.load_state_dict(self.teacher.state_dict(), strict=False)
            assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
            self.student.to(self.device, torch.float32).train()
            self.target = copy.deepcopy(self.student).eval().requires_grad_(False)
            self.params = [p for p in self.student.parameters()]
            self.target_params = [p for p in self.target.parameters()]
        if remat_policy(cfg.remat)[0]:
            self.student.enable_gradient_checkpointing()
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                     weight_decay=o.weight_decay)
        self.cfg = cfg
        sched = diffusers.DDIMScheduler.from_pretrained(teacher_dir, subfolder="scheduler")
        self.abar = sched.alphas_cumprod.float().to(self.device)
        self.kind = sched.config.prediction_type
        self.sf = self.vae.config.scaling_factor
        self.pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(self.device, self.dtype)
        self.ids = torch.from_numpy(ids.astype(np.int64)).to(self.device)
        with torch.no_grad():
            self.uncond = self.text(torch.from_numpy(uncond_ids.astype(np.int64)).to(self.device))[0]
        self.n_student = sum(p.numel() for p in self.params)
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed)

    def _x0_eps(self, out, z, a):
        if self.kind == "epsilon":
            return (z - (1 - a).sqrt() * out) / a.sqrt(), out
        if self.kind == "v_prediction":
            return a.sqrt() * z - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * z
        return out, (z - a.sqrt() * out) / (1 - a).sqrt()

    @staticmethod
    def _consistency(z, x0, t):
        s = t.float().view(-1, 1, 1, 1) * 10.0
        return 0.25 / (s ** 2 + 0.25) * z + s / (s ** 2 + 0.25).sqrt() * x0

    def _teacher(self, *args):
        """The teacher UNet's forward (a LoRA student's UNet with its adapters disabled)."""
        if not self.lora:
            return self.teacher(*args)
        self.teacher.disable_adapters()
        try:
            return self.teacher(*args)
        finally:
            self.teacher.enable_adapters()

    def step(self):
        from diffusers import LatentConsistencyModelPipeline as LCM

        lcd, g = self.cfg.lcd, self.gen
        dev, lowp = self.device, self.dtype
        with torch.no_grad():
            z0 = self.vae.encode(self.pixels).latent_dist.sample(generator=g).float() * self.sf
            ctx = self.text(self.ids)[0]
        b = z0.shape[0]
        k = 1000 // lcd.num_ddim_timesteps
        index = torch.randint(0, lcd.num_ddim_timesteps, (b,), generator=g, device=dev)
        t_start = k * (index + 1) - 1
        t_end = torch.clamp(t_start - k, min=0)
        noise = torch.randn(z0.shape, generator=g, device=dev)
        w = lcd.w_min + (lcd.w_max - lcd.w_min) * torch.rand(b, generator=g, device=dev)
        w_emb = LCM.get_guidance_scale_embedding(LCM, w.cpu(), embedding_dim=lcd.w_embedding_dim).to(dev) \
            if lcd.w_embedding_dim else None
        col = lambda v: v.view(-1, 1, 1, 1)
        a_s, a_e = col(self.abar[t_start]), col(self.abar[t_end])
        z = a_s.sqrt() * z0 + (1 - a_s).sqrt() * noise
        with torch.no_grad():
            out = self._teacher(torch.cat([z, z]).to(lowp), torch.cat([t_start, t_start]),
                                torch.cat([ctx, self.uncond.expand(b, -1, -1)])).sample.float()
            x0, eps = self._x0_eps(out, torch.cat([z, z]), torch.cat([a_s, a_s]))
            x0 = x0[:b] + col(w) * (x0[:b] - x0[b:])
            eps = eps[:b] + col(w) * (eps[:b] - eps[b:])
            x_prev = a_e.sqrt() * x0 + (1 - a_e).sqrt() * eps
            with torch.autocast(dev.type, dtype=lowp, enabled=lowp != torch.float32):
                tgt_out = self.target(x_prev, t_end, ctx, timestep_cond=w_emb).sample.float()
            target = self._consistency(x_prev, self._x0_eps(tgt_out, x_prev, a_e)[0], t_end)
        with torch.autocast(dev.type, dtype=lowp, enabled=lowp != torch.float32):
            pred_out = self.student(z, t_start, ctx, timestep_cond=w_emb).sample.float()
        pred = self._consistency(z, self._x0_eps(pred_out, z, a_s)[0], t_start)
        c = lcd.huber_c
        loss = torch.mean(torch.sqrt((pred - target) ** 2 + c * c) - c)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.opt.step()
        if not self.lora:
            with torch.no_grad():
                mu = lcd.ema_decay
                torch._foreach_mul_(self.target_params, mu)
                torch._foreach_add_(self.target_params, self.params, alpha=1.0 - mu)
        return loss

    def __call__(self) -> float:
        t0 = time.perf_counter()
        loss = self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        assert torch.isfinite(loss), loss
        return dt

    def flops(self) -> dict:
        """GFLOP (FlopCounterMode: matmul/conv/attention, 2 per multiply-add) of one step and of each model fwd."""
        def count(fn):
            with FlopCounterMode(display=False) as fc:
                fn()
            return fc.get_total_flops() / 1e9

        b, dev = self.pixels.shape[0], self.device
        h = self.pixels.shape[2] // 8
        z = torch.randn(b, self.teacher.config.in_channels, h, h, device=dev)
        t = torch.full((b,), 499, device=dev)
        w_emb = torch.randn(b, self.cfg.lcd.w_embedding_dim, device=dev) if self.cfg.lcd.w_embedding_dim else None
        with torch.no_grad(), torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            ctx = self.text(self.ids)[0]
            res = {"text": count(lambda: self.text(self.ids)),
                   "vae encode": count(lambda: self.vae.encode(self.pixels)),
                   "teacher 2B": count(lambda: self._teacher(torch.cat([z, z]).to(self.dtype), torch.cat([t, t]),
                                                             torch.cat([ctx, ctx]))),
                   "student fwd": count(lambda: self.target(z, t, ctx, timestep_cond=w_emb))}
        res["step (counted)"] = count(self.step)
        res["estimate"] = (4 * res["student fwd"] + res["teacher 2B"] + res["vae encode"] + res["text"])
        return res


# ------------------------------------------------------------------------------------------- driver
def with_kernels(cfg, remat, attention: str):
    """A copy of ``cfg`` with the student remat policy (None: keep the config's) and the attention implementation."""
    cfg = copy.deepcopy(cfg)
    if remat is not None:
        cfg.remat = remat
    cfg.attention = attention
    return cfg


def bench(name: str, cfg, teacher_dir: str, steps: int, device: str = "cpu", jax_only: bool = False
          ) -> tuple[dict, dict]:
    from jaxlcd.pipeline import load_tokenizer, tokenize

    b, px = cfg.per_device_batch, cfg.resolution
    tok = load_tokenizer(os.path.join(teacher_dir, "tokenizer"))
    ids = np.asarray(tokenize(tok, [PROMPT] * b), np.int32)
    uncond_ids = np.asarray(tokenize(tok, [""]), np.int32)
    pixels = np.random.default_rng(0).uniform(-1, 1, (b, px, px, 3)).astype(np.float32)

    print(f"[{name}] building + compiling the jax step ...", flush=True)
    js = JaxStep(cfg, teacher_dir, pixels, ids)
    print(f"[{name}] compiled in {js.compile_s:.1f}s, model {js.model_gflop:.1f} GFLOP/step, XLA {js.gflop:.1f}; "
          "loading torch ...", flush=True)
    mem = js.compiled.memory_analysis()
    peak = flops.peak_flops(jax.devices()[0].device_kind)
    mfu = lambda seconds: 100 * js.model_gflop * 1e9 / seconds / peak if peak else float("nan")
    base = {"config": name, "batch": b, "px": px, "remat": cfg.remat, "attention": cfg.attention,
            "jax compile s": js.compile_s, "model GFLOP/step": js.model_gflop, "XLA GFLOP/step": js.gflop,
            "jax temp GiB": mem.temp_size_in_bytes / 2**30, "jax args GiB": mem.argument_size_in_bytes / 2**30}
    if jax_only:
        js()
        jax_s = statistics.median([js() for _ in range(steps)])
        return {**base, "jax step s": jax_s, "jax img/s": b / jax_s, "jax MFU %": mfu(jax_s),
                "jax model TFLOP/s": js.model_gflop / jax_s / 1e3}, {"config": name}
    ts = TorchStep(cfg, teacher_dir, pixels, ids, uncond_ids, device)
    assert ts.n_student == js.n_student, (ts.n_student, js.n_student)
    js(), ts()  # warm-up (first run of the executable; torch allocator / oneDNN primitive caches)
    jax_t, torch_t = [], []
    for i in range(steps):  # alternate, so background load affects both sides alike
        jax_t.append(js())
        torch_t.append(ts())
        print(f"[{name}] round {i + 1}/{steps}: jax {jax_t[-1]:.3f}s torch {torch_t[-1]:.3f}s", flush=True)
    fl = ts.flops()
    jax_s, torch_s = statistics.median(jax_t), statistics.median(torch_t)
    row = {**base, "student M params": js.n_student / 1e6,
           "jax step s": jax_s, "jax steps/s": 1 / jax_s, "jax img/s": b / jax_s,
           "torch step s": torch_s, "torch img/s": b / torch_s, "torch/jax": torch_s / jax_s,
           "torch-counted GFLOP/step": fl["step (counted)"],
           "estimate GFLOP/step": fl["estimate"], "jax model GFLOP/s": js.model_gflop / jax_s,
           "jax best s": min(jax_t), "torch best s": min(torch_t), "torch/jax (best)": min(torch_t) / min(jax_t),
           "jax MFU %": mfu(jax_s), "torch MFU %": mfu(torch_s)}
    if device == "cuda":
        row["torch peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    parts = {"config": name, **{k: v for k, v in fl.items()}}
    return row, parts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid", "sd21base"])
    ap.add_argument("--batch", type=int, nargs="+", default=[8], help="sd21base: images per step (one run each)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the PyTorch step runs")
    ap.add_argument("--jax-only", action="store_true", help="time only the jax step (e.g. to find the largest batch)")
    ap.add_argument("--steps-tiny", type=int, default=10, help="timed rounds (one jax + one torch step each)")
    ap.add_argument("--steps-mid", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--remat", nargs="+", default=[], help="student remat policies, one run each (default: the "
                    "config's; sd21base: full). PyTorch uses gradient checkpointing for any policy but none")
    ap.add_argument("--attention", default="auto", help="attention implementation: auto | xla | cudnn | pallas")
    ap.add_argument("--modes", nargs="+", default=["full"], choices=["full", "lora"],
                    help="full student and/or LCM-LoRA (the config's ,lora variant; PyTorch: PEFT adapters as in "
                         "diffusers' LCM-LoRA scripts), one run each")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    print(f"machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)\n", flush=True)
    rows, parts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            suffixes = [("", ""), (" lora", ",lora")]
            suffixes = [x for x, mode in zip(suffixes, ["full", "lora"]) if mode in args.modes]
            if name == "sd21base":
                runs = [(f"sd21base b{b}{label}",) + sd21base_teacher(tmp, b, sfx) for b in args.batch
                        for label, sfx in suffixes]
            else:
                runs = [(name + label,) + (tiny_teacher if name == "tiny" else mid_teacher)(tmp, sfx)
                        for label, sfx in suffixes]
            policies = args.remat or (["full"] if name == "sd21base" else [None])
            runs = [(label, with_kernels(cfg, policy, args.attention), teacher)
                    for label, cfg, teacher in runs for policy in policies]
            for label, cfg, teacher in runs:
                row, part = bench(label, cfg, teacher, args.steps_tiny if name == "tiny" else args.steps_mid,
                                  args.device, args.jax_only)
                rows.append(row)
                parts.append(part)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
    print()
    if args.jax_only:
        print_table(rows, ["config", "batch", "px", "remat", "attention", "jax compile s", "jax step s", "jax img/s",
                           "model GFLOP/step", "XLA GFLOP/step", "jax MFU %", "jax temp GiB", "jax args GiB"])
        return
    print_table(rows, ["config", "batch", "px", "remat", "attention", "jax compile s", "jax step s", "jax img/s",
                       "torch step s", "torch img/s", "torch/jax", "model GFLOP/step", "XLA GFLOP/step",
                       "torch-counted GFLOP/step", "jax MFU %", "torch MFU %"])
    print()
    print_table(rows, ["config", "student M params", "jax steps/s", "jax model GFLOP/s", "jax best s", "torch best s",
                       "torch/jax (best)", "estimate GFLOP/step", "jax temp GiB", "jax args GiB"])
    print()
    print_table(parts, ["config", "text", "vae encode", "teacher 2B", "student fwd", "estimate", "step (counted)"])
    if args.device == "cuda":
        print()
        print_table(rows, ["config", "remat", "jax temp GiB", "jax args GiB", "torch peak GiB"])
    print(f"\npeak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
