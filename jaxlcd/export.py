"""Student UNet setup and export as a diffusers ``LatentConsistencyModelPipeline`` folder.

    student, params = add_cond_proj(teacher_unet, teacher_params, w_dim=256, rng=jax.random.PRNGKey(0))
    ...train...
    export_student_pipeline("out/lcm", "sd21base", student, params)    # diffusers loads out/lcm
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxlcd import storage
from jaxlcd.pipeline import PipelineError, check_pipeline_dir, read_model_index
from jaxlcd.diffusion.schedule import read_scheduler_config
from jaxlcd.loaders import load_component, save_component
from jaxlcd.errors import InputError, JaxlcdError

# Keys copied from the teacher's scheduler config into the LCMScheduler config (when present).
_TEACHER_SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                           "prediction_type", "set_alpha_to_one", "steps_offset", "rescale_betas_zero_snr")


def add_cond_proj(unet_module, params, w_dim: int = 256, rng=None, zero_init: bool = False):
    """Turn a teacher UNet into an LCM student: add ``time_embedding.cond_proj`` (Linear w_dim -> C0, no bias).

    unet_module: a UNet2DConditionModel without time_cond_proj_dim; params: its param tree (not modified).
    The new kernel [w_dim, block_out_channels[0]] (params' dtype) is drawn like torch nn.Linear's default
    (kaiming-uniform, U(-1/sqrt(w_dim), 1/sqrt(w_dim))) from ``rng`` (default PRNGKey(0)), or zeros with
    ``zero_init``. Returns (student module with config.time_cond_proj_dim = w_dim, student params).
    """
    cfg = unet_module.config
    if cfg.time_cond_proj_dim:
        raise InputError(f"the UNet already has time_cond_proj_dim={cfg.time_cond_proj_dim}; it is a student already")
    if w_dim < 1:
        raise InputError(f"w_dim must be positive, got {w_dim}")
    student = unet_module.clone(config=dataclasses.replace(cfg, time_cond_proj_dim=int(w_dim)))
    ref = params["time_embedding"]["linear_1"]["kernel"]
    shape = (int(w_dim), int(ref.shape[0]))
    if zero_init:
        kernel = jnp.zeros(shape, ref.dtype)
    else:
        bound = 1.0 / math.sqrt(w_dim)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        kernel = jax.random.uniform(rng, shape, jnp.float32, -bound, bound).astype(ref.dtype)
    new = dict(params)
    new["time_embedding"] = dict(params["time_embedding"], cond_proj={"kernel": kernel})
    return student, new


def lcm_scheduler_config(teacher_config: dict, diffusers_version: str = "0.42.1") -> dict:
    """The LCMScheduler scheduler_config.json dict for a teacher's scheduler config dict."""
    cfg = {"_class_name": "LCMScheduler", "_diffusers_version": diffusers_version}
    cfg.update({k: teacher_config[k] for k in _TEACHER_SCHEDULER_KEYS if k in teacher_config})
    cfg.update(original_inference_steps=50, timestep_scaling=10.0, clip_sample=False, timestep_spacing="leading",
               prediction_type=teacher_config.get("prediction_type", "epsilon"))
    return cfg


def _copy_or_resave(src: str, dst: str, dtype) -> None:
    if np.dtype(dtype) == np.float32:
        shutil.copytree(src, dst)
    else:
        module, params = load_component(src)
        save_component(module, params, dst, dtype=dtype)


def export_student_pipeline(out_dir: str, teacher_dir: str, unet_module, student_params, dtype=np.float32) -> str:
    """Write a complete diffusers pipeline folder with an LCMScheduler at ``out_dir``; returns ``out_dir``.

    unet/ holds the student: with config.time_cond_proj_dim (`add_cond_proj`) the folder is a
    LatentConsistencyModelPipeline; without (a fused LCM-LoRA, `jaxlcd.models.lora.merge`) a StableDiffusionPipeline
    whose scheduler is the LCMScheduler (guidance g > 1 is then classifier-free guidance). vae/ and text_encoder/
    are the teacher's (copied for float32, re-saved in ``dtype`` otherwise); tokenizer/ is copied; scheduler/ is an
    LCMScheduler built from the teacher's scheduler config. dtype: np.float32 or np.float16 stored tensors.
    ``out_dir`` must not exist or be empty.
    """
    if np.dtype(dtype) not in (np.float32, np.float16):
        raise InputError(f"export dtype must be float32 or float16, got {np.dtype(dtype).name}")
    index = read_model_index(teacher_dir)
    teacher_sched = read_scheduler_config(teacher_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise PipelineError(f"export folder {out_dir!r} exists and is not empty; choose a new folder")
    os.makedirs(out_dir, exist_ok=True)
    save_component(unet_module, student_params, os.path.join(out_dir, "unet"), dtype=dtype)
    for sub in ("vae", "text_encoder"):
        _copy_or_resave(os.path.join(teacher_dir, sub), os.path.join(out_dir, sub), dtype)
    shutil.copytree(os.path.join(teacher_dir, "tokenizer"), os.path.join(out_dir, "tokenizer"))
    version = index.get("_diffusers_version", "0.42.1")
    os.makedirs(os.path.join(out_dir, "scheduler"))
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(lcm_scheduler_config(teacher_sched, version), f, indent=2, sort_keys=True)
    lcm = bool(unet_module.config.time_cond_proj_dim)
    model_index = {
        "_class_name": "LatentConsistencyModelPipeline" if lcm else "StableDiffusionPipeline",
        "_diffusers_version": version,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
        "scheduler": ["diffusers", "LCMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    if not lcm:
        model_index.pop("image_encoder")
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=2, sort_keys=True)
    check_pipeline_dir(out_dir)
    return out_dir


def export_checkpoint(workdir: str, out_dir: str, step=None, which: str = "student", dtype=np.float32,
                      fuse: bool = False) -> str:
    """Export checkpoint ``step`` (default: the newest) of a training workdir as a diffusers LCM folder; a LoRA run
    as ``out_dir/pytorch_lora_weights.safetensors`` (diffusers' ``load_lora_weights(out_dir)``), or with ``fuse`` as
    a pipeline folder whose UNet has the adapters merged.

    which: "student" (the trained params) or "target" (their EMA).
    """
    import ml_collections

    from jaxlcd.distill.state import create_state
    from jaxlcd.loaders.lora_file import save_lora
    from jaxlcd.models import lora
    from jaxlcd.training import checkpoint
    from jaxlcd.training.optimizer import make_optimizer

    if which not in ("student", "target"):
        raise InputError(f"which must be 'student' or 'target', got {which!r}")
    cfg = ml_collections.ConfigDict(checkpoint.load_config_dict(workdir))
    lora_cfg = cfg.get("lora") if cfg.get("lora") is not None and cfg.lora.enabled else None
    if fuse and lora_cfg is None:
        raise InputError(f"--fuse merges LoRA adapters, but {workdir!r} trained the full student; export without it")
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.keep_checkpoints, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise PipelineError(f"{workdir!r} holds no checkpoint yet")
    teacher, teacher_params = load_component(os.path.join(cfg.teacher, "unet"))
    if lora_cfg is not None:   # only the adapters' shapes are needed: traced, never computed
        student = teacher
        init_params = lambda: lora.init_adapters(teacher_params, tuple(lora_cfg.targets), lora_cfg.rank,
                                                 jax.random.PRNGKey(0))
    else:
        student, student_params = add_cond_proj(teacher, teacher_params, cfg.lcd.w_embedding_dim)
        init_params = lambda: student_params
    abstract = jax.eval_shape(lambda: create_state(init_params(), make_optimizer(cfg.optim, cfg.total_steps), cfg.seed))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, _ = ckpt.restore(step, jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract))
    ckpt.close()
    params = jax.device_get(state.params if which == "student" else state.target_params)
    marker = "pytorch_lora_weights.safetensors" if lora_cfg is not None and not fuse else "model_index.json"
    if storage.exists(storage.join(out_dir, marker)):
        raise PipelineError(f"export folder {out_dir!r} exists; choose a new folder")
    with storage.staged_dir(out_dir, marker=marker) as local_out:
        if lora_cfg is not None and not fuse:
            save_lora(local_out, params, lora_cfg.rank, lora_cfg.alpha, dtype)
        else:
            if lora_cfg is not None:
                params = lora.merge(teacher_params, params, float(lora_cfg.alpha) / lora_cfg.rank)
            export_student_pipeline(local_out, cfg.teacher, student, params, dtype)
    return out_dir


def main(argv=None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m jaxlcd.export",
                                 description="Export a jaxlcd training checkpoint as a diffusers LCM pipeline folder.")
    ap.add_argument("--workdir", required=True, help="the training workdir (holds config.json and checkpoints/); "
                                                     "a local path or gs://bucket/path")
    ap.add_argument("--out", required=True, help="new output folder (local or gs://)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--which", choices=("student", "target"), default="student",
                    help="the trained student or its EMA target")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--fuse", action="store_true", help="LoRA runs: write a pipeline folder whose UNet has the "
                    "adapters merged (default: the LoRA file pytorch_lora_weights.safetensors)")
    args = ap.parse_args(argv)
    try:
        out = export_checkpoint(args.workdir, args.out, args.step, args.which, np.dtype(args.dtype), args.fuse)
    except JaxlcdError as e:
        print(f"jaxlcd.export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
