"""Ahead-of-time compile of the sd21base LCD train step for a TPU topology, on a machine without a TPU.

Needs libtpu (`pip install "jax[tpu]"`), best in a separate venv so the main one stays CPU-only:

    python3 -m venv .venv-tpu && . .venv-tpu/bin/activate
    pip install "jax[tpu]==0.10.2" flax==0.12.8 optax==0.2.8 numpy ml-collections safetensors
    pip install --no-deps -e .
    python benchmarks/aot_tpu.py --small                     # quarter-width models at 256 px: minutes
    nohup python benchmarks/aot_tpu.py --per-chip-batch 2 8 --out /tmp/aot_tpu.json > /tmp/aot_tpu.log 2>&1 &

What it compiles: `jaxlcd.distill.step.make_train_step` with full-size SD 2.1-base models built from their
configs (student UNet = teacher + time_cond_proj_dim 256, or with `--lora` the teacher + rank-64 LoRA adapters
(only those in the state), remat policy `--remat`, default full; teacher UNet; SD VAE
encoder; OpenCLIP-H text encoder), bfloat16 compute, float32 student/EMA/AdamW state, 512 px pixels + token ids as the
batch; attention `--attention` (auto = the Pallas splash kernel, the step being lowered under the topology's mesh).
No weights are read or created: params, state and batch are abstract `ShapeDtypeStruct`s with shardings
(`jax.eval_shape`), and `jit(...).lower(...).compile()` targets the devices of
`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4")`.
The mesh is data=1 x fsdp=8 x tensor=1; the state uses `parallel.FSDP_RULES`, frozen params fsdp or
replicated (`--frozen`), the batch is split over ("data", "fsdp").

Reports per chip: `memory_analysis()` (arguments, outputs, temporaries, aliased (donated) bytes, generated code;
total = arguments + temporaries + outputs - aliased), `cost_analysis()` FLOPs and bytes accessed, the model FLOPs
(`jaxlcd.training.flops.model_flops`; `--flops-only` counts them without compiling), and the compile time.
One full-size compile takes tens of minutes on a 2-core machine: results go to jax's persistent compilation cache
(`--cache-dir`) and `--out` (JSON, rewritten after each compile). Never part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# libtpu's compiler runs its convolution emitters on fibers; with the default stack the full-size 512 px step
# crashed the compile after ~11 min (SIGSEGV "STACK OVERFLOW" in FusedSpatialMajorConvolution::MakeConvWindows,
# libtpu 0.0.42.1): give its threads and fibers 8 MiB stacks. Set before jax/libtpu start; an explicit
# LIBTPU_INIT_ARGS is kept and extended.
_STACK_FLAGS = ("--fibers_default_thread_stack_size=8388608", "--default_thread_stack_size=8388608",
                "--xla_internal_thread_stack_size_bytes=8388608")
_init_args = os.environ.get("LIBTPU_INIT_ARGS", "")
os.environ["LIBTPU_INIT_ARGS"] = " ".join(
    [_init_args] + [f for f in _STACK_FLAGS if f.split("=")[0] not in _init_args]).strip()

import jax
import jax.numpy as jnp
import numpy as np

GiB = 2 ** 30
HBM_GIB = {"v5e": 16.0, "v5litepod": 16.0, "v4": 32.0, "v5p": 95.0, "v6e": 32.0}

# ------------------------------------------------------------------------------------------- configs
SD21_BASE_UNET = dict(
    _class_name="UNet2DConditionModel", sample_size=64, in_channels=4, out_channels=4,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(
    _class_name="AutoencoderKL", block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    in_channels=3, out_channels=3, sample_size=512, scaling_factor=0.18215, norm_num_groups=32, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD2_TEXT = dict(  # OpenCLIP ViT-H/14 text tower as transformers' CLIPTextModel (SD 2.x text_encoder)
    architectures=["CLIPTextModel"], vocab_size=49408, hidden_size=1024, intermediate_size=4096,
    num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
    projection_dim=512)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon")

# --small: the same architectures at about a quarter of the width, 256 px (checks the script in minutes)
SMALL_UNET = dict(SD21_BASE_UNET, block_out_channels=(64, 128, 256, 256), attention_head_dim=(4, 8, 16, 16),
                  cross_attention_dim=256, sample_size=32)
SMALL_VAE = dict(SD_VAE, block_out_channels=(32, 64, 128, 128), sample_size=256)
SMALL_TEXT = dict(SD2_TEXT, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-chip-batch", type=int, nargs="+", default=[2, 8], help="images per chip (one compile each)")
    p.add_argument("--frozen", nargs="+", default=["fsdp"], choices=["fsdp", "replicate"],
                   help="sharding of the frozen teacher/VAE/text params")
    p.add_argument("--inputs", nargs="+", default=["pixels"], choices=["pixels", "moments"],
                   help="pixels: [B,512,512,3] through the VAE encoder; moments: pre-encoded [B,64,64,8]")
    p.add_argument("--remat", default="full", help="student UNet remat policy: none | full | dots | dots_no_batch")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"],
                   help="attention implementation (auto = the Pallas splash kernel on TPU)")
    p.add_argument("--reward", default="none", choices=["none", "vit-h14"],
                   help="add the direct reward term with an OpenCLIP ViT-H/14-sized reward model (HPSv2.1's shape)")
    p.add_argument("--lora", action="store_true", help="the LCM-LoRA step (configs/rglcd.py:sd21base,lora: rank 64 "
                   "adapters on diffusers' targets; the teacher's params are the student's base)")
    p.add_argument("--topology", default="v5e:2x4", help="get_topology_desc topology_name, e.g. v5e:2x4, v5e:2x2")
    p.add_argument("--fsdp", type=int, default=0, help="fsdp axis size (default: all chips; data = the rest)")
    p.add_argument("--resolution", type=int, default=0, help="image size (default 512, 256 with --small)")
    p.add_argument("--small", action="store_true", help="quarter-width models at 256 px (a quick check)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/jaxlcd_xla"),
                   help="jax persistent compilation cache ('' disables)")
    p.add_argument("--out", default="", help="JSON file for the results (rewritten after each compile)")
    p.add_argument("--flops-only", action="store_true", help="count the model FLOPs of each step; no compile")
    return p.parse_args(argv)


def setup_cache(cache_dir: str) -> None:
    if not cache_dir:
        return
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# ------------------------------------------------------------------------------------------- models
def abstract_params(spec, module):
    """Abstract param tree of ``module`` (no FLOPs, no memory)."""
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *spec.dummy_inputs(module)))["params"]


def as_dtype(tree, dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)


def n_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_reward(small: bool, dtype):
    """(RewardModel over abstract params, abstract params in ``dtype``): ViT-H/14 (HPSv2.1), or 2 layers with --small."""
    from jaxlcd.models import clip
    from jaxlcd.rewards.convert import OPEN_CLIP_CONFIGS
    from jaxlcd.rewards.registry import clip_cosine_reward

    oc = OPEN_CLIP_CONFIGS["ViT-H-14"]
    if small:
        oc = dict(oc, vision_cfg=dict(oc["vision_cfg"], layers=2), text_cfg=dict(oc["text_cfg"], layers=2))
    module = clip.build(clip.hf_config_from_open_clip(oc), dtype=dtype, remat=True)
    params = as_dtype(abstract_params(clip.SPEC, module), dtype)
    return clip_cosine_reward("hpsv2.1", module, params, tokenize=None), params


def build_models(small: bool, remat, dtype=jnp.bfloat16, reward: str = "none", attention: str = "auto",
                 lora_cfg=None):
    """(StepModels, abstract student params f32, abstract frozen tree in ``dtype``, abar, sizes); with ``lora_cfg``
    (the config's ``lora`` section) the student is the teacher module + adapters, whose abstract tree is returned."""
    from jaxlcd.diffusion import schedule
    from jaxlcd.models import clip_text, lora, unet, vae
    from jaxlcd.distill.step import StepModels

    ucfg, vcfg, tcfg = (SMALL_UNET, SMALL_VAE, SMALL_TEXT) if small else (SD21_BASE_UNET, SD_VAE, SD2_TEXT)
    w_dim = 256
    kw = dict(dtype=dtype, attention_impl=attention)
    teacher = unet.build(ucfg, **kw)
    student = unet.build(dict(ucfg, time_cond_proj_dim=None if lora_cfg else w_dim), remat=remat, **kw)
    vae_m = vae.build(vcfg, **kw)
    text_m = clip_text.build(tcfg, **kw)
    teacher_params = abstract_params(unet.SPEC, teacher)
    student_params = jax.eval_shape(lambda: lora.init_adapters(teacher_params, tuple(lora_cfg.targets), lora_cfg.rank,
                                                               jax.random.PRNGKey(0))) \
        if lora_cfg else abstract_params(unet.SPEC, student)
    frozen = {"teacher": as_dtype(teacher_params, dtype),
              "vae": as_dtype(abstract_params(vae.SPEC, vae_m), dtype),
              "text": as_dtype(abstract_params(clip_text.SPEC, text_m), dtype),
              "uncond_ctx": jax.ShapeDtypeStruct((1, 77, tcfg["hidden_size"]), jnp.float32)}
    sizes = {"student_M": n_params(student_params) / 1e6, "teacher_M": n_params(frozen["teacher"]) / 1e6,
             "vae_M": n_params(frozen["vae"]) / 1e6, "text_M": n_params(frozen["text"]) / 1e6}
    abar = jnp.asarray(schedule.alphas_cumprod(SD_SCHEDULER), jnp.float32)
    rm = None
    if reward != "none":
        rm, frozen["reward"] = abstract_reward(small, dtype)
        sizes["reward_M"] = n_params(frozen["reward"]) / 1e6
    models = StepModels(student=student, teacher=teacher, vae=vae_m, text=text_m,
                        prediction_type=schedule.prediction_type(SD_SCHEDULER), reward=rm,
                        lora_scale=float(lora_cfg.alpha) / lora_cfg.rank if lora_cfg else None)
    return models, student_params, frozen, abar, sizes, tcfg["hidden_size"]


# ------------------------------------------------------------------------------------------- mesh
def topology_mesh(topology: str, fsdp: int):
    from jax.experimental import topologies
    from jax.sharding import AxisType, Mesh

    from jaxlcd import parallel

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    devices = list(topo.devices)
    fsdp = fsdp or len(devices)
    shape = {"data": len(devices) // fsdp, "fsdp": fsdp, "tensor": 1}
    try:
        mesh = parallel.make_mesh(shape, devices=devices)
    except Exception as e:  # noqa: BLE001 - fall back to a plain Mesh over the topology's devices
        print(f"parallel.make_mesh failed on the topology devices ({type(e).__name__}: {e}); using jax.sharding.Mesh",
              flush=True)
        mesh = Mesh(np.array(devices).reshape(shape["data"], fsdp, 1), parallel.AXES,
                    axis_types=(AxisType.Auto,) * 3)
    return mesh, devices


def hbm_gib(device_kind: str, topology: str) -> float:
    kind = device_kind.lower()
    if "v5 lite" in kind or "v5e" in kind:
        return 16.0
    return HBM_GIB.get(topology.split(":")[0], float("nan"))


# ------------------------------------------------------------------------------------------- compile
def config(reward: bool, lora: bool):
    """configs/rglcd.py:sd21base[,lora][,hps]."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import rglcd  # configs/rglcd.py

    return rglcd.get_config("sd21base" + (",lora" if lora else "") + (",hps" if reward else ""))


def compile_one(models, student_params, frozen, abar, ctx_dim, mesh, *, per_chip_batch: int, frozen_mode: str,
                inputs: str, resolution: int, remat: str, attention: str, flops_only: bool = False):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxlcd import parallel
    from jaxlcd.distill.state import create_state
    from jaxlcd.training.optimizer import make_optimizer
    from jaxlcd.distill.step import make_train_step
    from jaxlcd.training import flops

    cfg = config(models.reward is not None, models.lora_scale is not None)
    tx = make_optimizer(cfg.optim, cfg.total_steps)
    abstract_state = jax.eval_shape(lambda p: create_state(p, tx, cfg.seed), student_params)
    state_sh = parallel.param_shardings(abstract_state, mesh, parallel.FSDP_RULES)
    frozen_rules = parallel.FSDP_RULES if frozen_mode == "fsdp" else parallel.REPLICATE_RULES
    frozen_sh = parallel.param_shardings(frozen, mesh, frozen_rules)

    n = mesh.devices.size
    b = per_chip_batch * n
    if inputs == "pixels":
        batch = {"pixels": jax.ShapeDtypeStruct((b, resolution, resolution, 3), jnp.float32)}
    else:
        f = 8
        batch = {"moments": jax.ShapeDtypeStruct((b, resolution // f, resolution // f, 8), jnp.float32)}
    batch["input_ids"] = jax.ShapeDtypeStruct((b, 77), jnp.int32)
    if models.reward is not None:
        batch["reward_tokens"] = {"input_ids": jax.ShapeDtypeStruct((b, 77), jnp.int32)}
    batch_sh = jax.tree.map(lambda v: parallel.batch_sharding(mesh, v.ndim), batch)

    step = make_train_step(models, cfg.lcd, tx, abar, cfg.reward, cfg.lrm)
    model_tflop = flops.model_flops(lambda: step, abstract_state, frozen, batch) / n / 1e12
    print(f"  model FLOPs: {model_tflop:.2f} TFLOP per chip per step", flush=True)
    if flops_only:
        return {"per_chip_batch": per_chip_batch, "inputs": inputs, "model_tflop_per_chip": model_tflop}
    jitted = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh),
                     out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):   # attention 'auto' and the Pallas kernel's shard_map see the TPU mesh
        lowered = jitted.lower(abstract_state, frozen, batch)
    t_lower = time.perf_counter() - t0
    print(f"  lowered in {t_lower:.1f} s; compiling for {n} x {mesh.devices.flat[0].device_kind} ...", flush=True)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    get = lambda name: float(getattr(mem, name, 0) or 0) / GiB
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    row = {
        "per_chip_batch": per_chip_batch, "global_batch": b, "frozen": frozen_mode, "inputs": inputs,
        "reward": "none" if models.reward is None else "vit-h14",
        "student": "full" if models.lora_scale is None else f"lora r{cfg.lora.rank}",
        "trainable_M": n_params(student_params) / 1e6,
        "remat": remat, "attention": attention, "resolution": resolution,
        "args_gib": get("argument_size_in_bytes"), "output_gib": get("output_size_in_bytes"),
        "temp_gib": get("temp_size_in_bytes"), "alias_gib": get("alias_size_in_bytes"),
        "code_gib": get("generated_code_size_in_bytes"),
        "host_temp_gib": get("host_temp_size_in_bytes"),
        "peak_gib": get("peak_memory_in_bytes") if hasattr(mem, "peak_memory_in_bytes") else float("nan"),
        "tflop_per_chip": float(cost.get("flops", float("nan"))) / 1e12, "model_tflop_per_chip": model_tflop,
        "bytes_accessed_gib": float(cost.get("bytes accessed", float("nan"))) / GiB,
        "lower_s": t_lower, "compile_s": t_compile,
    }
    row["total_gib"] = row["args_gib"] + row["temp_gib"] + row["output_gib"] - row["alias_gib"]
    print(f"  memory_analysis: {mem}", flush=True)
    return row


COLUMNS = ["student", "per-chip batch", "inputs", "reward", "frozen", "remat", "attention", "args GiB", "temp GiB", "out GiB",
           "alias GiB", "total GiB", "fits 16 GiB", "model TFLOP/step/chip", "XLA TFLOP/step/chip",
           "GiB accessed/step/chip", "compile s"]


def table_row(r: dict, hbm: float) -> list:
    return [r.get("student", "full"), r["per_chip_batch"], r["inputs"], r.get("reward", "none"), r["frozen"], r["remat"], r["attention"],
            f"{r['args_gib']:.2f}", f"{r['temp_gib']:.2f}", f"{r['output_gib']:.2f}", f"{r['alias_gib']:.2f}",
            f"{r['total_gib']:.2f}", "yes" if r["total_gib"] <= hbm else "no", f"{r['model_tflop_per_chip']:.2f}",
            f"{r['tflop_per_chip']:.2f}",
            f"{r['bytes_accessed_gib']:.0f}", f"{r['compile_s']:.0f}"]


def print_table(rows: list[dict], hbm: float) -> None:
    cols = [c.replace("16", f"{hbm:g}") for c in COLUMNS]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(v) for v in table_row(r, hbm)) + " |")


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_cache(args.cache_dir)
    resolution = args.resolution or (256 if args.small else 512)
    try:
        import libtpu  # noqa: F401
        libtpu_version = getattr(libtpu, "__version__", "")
    except ImportError:
        libtpu_version = ""
    if not libtpu_version:
        try:
            from importlib.metadata import version

            libtpu_version = version("libtpu")
        except Exception:  # noqa: BLE001
            libtpu_version = "?"
    mesh, devices = topology_mesh(args.topology, args.fsdp)
    hbm = hbm_gib(devices[0].device_kind, args.topology)
    models, student_params, frozen, abar, sizes, ctx_dim = build_models(
        args.small, args.remat, reward=args.reward, attention=args.attention,
        lora_cfg=config(False, True).lora if args.lora else None)
    meta = {"topology": args.topology, "device_kind": devices[0].device_kind, "chips": len(devices),
            "mesh": dict(mesh.shape), "hbm_gib_per_chip": hbm, "small": args.small, "resolution": resolution,
            "jax": jax.__version__, "libtpu": libtpu_version, "host": f"{platform.machine()}, {os.cpu_count()} cores",
            "params_M": sizes, "cache_dir": args.cache_dir, "libtpu_init_args": os.environ["LIBTPU_INIT_ARGS"]}
    print(json.dumps(meta), flush=True)
    rows = []
    for inputs in args.inputs:
        for frozen_mode in args.frozen:
            for bpc in args.per_chip_batch:
                print(f"[{time.strftime('%H:%M:%S')}] per-chip batch {bpc}, inputs {inputs}, frozen {frozen_mode}, "
                      f"remat {args.remat}, attention {args.attention}", flush=True)
                try:
                    row = compile_one(models, student_params, frozen, abar, ctx_dim, mesh, per_chip_batch=bpc,
                                      frozen_mode=frozen_mode, inputs=inputs, resolution=resolution, remat=args.remat,
                                      attention=args.attention, flops_only=args.flops_only)
                except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
                    print(f"  FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                    rows.append({"per_chip_batch": bpc, "inputs": inputs, "frozen": frozen_mode,
                                 "error": f"{type(e).__name__}: {str(e)[:2000]}"})
                    continue
                rows.append(row)
                print("  " + json.dumps(row), flush=True)
                if args.flops_only:
                    continue
                print_table([row], hbm)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    ok = [r for r in rows if "error" not in r and "compile_s" in r]
    print(f"\n{args.topology} ({len(devices)} x {devices[0].device_kind}, {hbm:g} GiB HBM per chip), "
          f"mesh {dict(mesh.shape)}, {'SMALL ' if args.small else ''}{resolution} px, jax {jax.__version__}, "
          f"libtpu {libtpu_version}")
    print_table(ok, hbm)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
