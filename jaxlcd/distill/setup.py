"""Everything the loop needs before the first step: config checks, models, params, data, shardings."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxlcd import data as data_lib
from jaxlcd.data import encoded, shards
from jaxlcd import parallel, paths, storage, tiny
from jaxlcd.export import add_cond_proj
from jaxlcd.models import attention, layers, lora
from jaxlcd.pipeline import check_pipeline_dir, encode_prompts, load_pipeline
from jaxlcd.rewards import load_reward, parse_reward_expression
from jaxlcd.rewards.lrm import load_lrm, make_lrm_optimizer
from jaxlcd.distill.state import DistillState, create_state
from jaxlcd.distill.step import StepModels, reward_remat
from jaxlcd.training.optimizer import make_optimizer
from jaxlcd.errors import InputError

log = logging.getLogger("jaxlcd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigValueError(InputError):
    """An invalid training config value (raised at start-up, before any compile)."""


def validate_config(cfg, num_devices: int) -> None:
    """One clear sentence for each invalid value or combination."""
    lcd = cfg.lcd
    if lcd.w_min > lcd.w_max:
        raise ConfigValueError(f"lcd.w_min={lcd.w_min} is larger than lcd.w_max={lcd.w_max}")
    if lcd.loss not in ("huber", "l2"):
        raise ConfigValueError(f"lcd.loss={lcd.loss!r} is unknown; use 'huber' or 'l2'")
    if 1000 % lcd.num_ddim_timesteps:
        raise ConfigValueError(f"lcd.num_ddim_timesteps={lcd.num_ddim_timesteps} must divide 1000")
    if not 0.0 <= lcd.ema_decay < 1.0:
        raise ConfigValueError(f"lcd.ema_decay={lcd.ema_decay} must be in [0, 1)")
    _validate_lora(cfg)
    if cfg.compute_dtype not in DTYPES:
        raise ConfigValueError(f"compute_dtype={cfg.compute_dtype!r} is unknown; use one of {list(DTYPES)}")
    if cfg.export_dtype not in ("float32", "float16"):
        raise ConfigValueError(f"export_dtype={cfg.export_dtype!r} is unknown; use 'float32' or 'float16'")
    if cfg.resolution % 8:
        raise ConfigValueError(f"resolution={cfg.resolution} must be a multiple of 8 (the VAE factor)")
    if cfg.per_device_batch < 1 or cfg.total_steps < 1 or cfg.log_every < 1 or cfg.checkpoint_every < 1:
        raise ConfigValueError("per_device_batch, total_steps, log_every and checkpoint_every must be positive")
    try:
        layers.remat_policy(cfg.remat)
        attention.check_available(cfg.attention, attention.traced_platform())
        reward_remat(cfg.reward)
    except InputError as e:
        raise ConfigValueError(str(e)) from None
    if cfg.shard_frozen not in ("replicate", "fsdp"):
        raise ConfigValueError(f"shard_frozen={cfg.shard_frozen!r} is unknown; use 'replicate' or 'fsdp'")
    mesh = dict(cfg.mesh)
    batch_axes = [mesh["data"], mesh["fsdp"]]
    if -1 not in batch_axes and (cfg.per_device_batch * num_devices) % (batch_axes[0] * batch_axes[1]):
        raise ConfigValueError(f"the global batch {cfg.per_device_batch * num_devices} is not divisible by the "
                               f"mesh's batch axes data*fsdp = {batch_axes[0] * batch_axes[1]}")
    if not builds_own_inputs(cfg):
        if not cfg.teacher:
            raise ConfigValueError("config.teacher is empty: pass --config.teacher=/path/to/diffusers/pipeline")
        if not cfg.data_dir:
            raise ConfigValueError("config.data_dir is empty: pass --config.data_dir=/path/to/image_caption_folder")
    for key in ("teacher", "data_dir"):
        if cfg[key] and not storage.is_remote(cfg[key]) and "{" not in cfg[key] and not os.path.exists(cfg[key]):
            raise ConfigValueError(f"config.{key}={cfg[key]!r} does not exist")
    if cfg.teacher:
        check_pipeline_dir(cfg.teacher)
    _validate_guidance(cfg)


def _validate_lora(cfg) -> None:
    lora_cfg, w_dim = cfg.get("lora") or {}, cfg.lcd.w_embedding_dim
    if not lora_cfg.get("enabled"):
        if w_dim < 1:
            raise ConfigValueError(f"lcd.w_embedding_dim={w_dim} must be positive for a full student (0 is for LoRA)")
        return
    if w_dim:
        raise ConfigValueError(f"lcd.w_embedding_dim={w_dim}: a LoRA student takes no guidance embedding (the UNet "
                               "keeps the teacher's layout, as in LCM-LoRA); set it to 0")
    if lora_cfg.rank < 1 or lora_cfg.alpha <= 0:
        raise ConfigValueError(f"lora.rank={lora_cfg.rank} and lora.alpha={lora_cfg.alpha} must be positive")
    if not lora_cfg.targets:
        raise ConfigValueError(f"lora.targets={lora_cfg.targets!r} must be a non-empty tuple of module names, "
                               "e.g. \"('to_q','to_k','to_v','to_out.0')\"")


def _validate_guidance(cfg) -> None:
    r, lrm = cfg.reward, cfg.lrm
    if r.name:
        parse_reward_expression(r.name)  # RewardError (a ValueError) names an unknown model
    if r.beta < 0 or lrm.beta < 0:
        raise ConfigValueError(f"reward.beta={r.beta} and lrm.beta={lrm.beta} must be >= 0")
    if r.decode_microbatch < 0 or (r.decode_microbatch and cfg.per_device_batch % r.decode_microbatch):
        raise ConfigValueError(f"reward.decode_microbatch={r.decode_microbatch} must be 0 or divide "
                               f"per_device_batch={cfg.per_device_batch}")
    if lrm.enabled and lrm.update and not r.name:
        raise ConfigValueError("lrm.update=True fits the LRM to an expert reward model: set reward.name "
                               "(e.g. hpsv2.1) and reward.path, or pass --config.lrm.update=False")
    if lrm.enabled and lrm.update and "+" in r.name:
        raise ConfigValueError(f"the LRM's expert must be one CLIP-cosine model, not the sum {r.name!r}")
    if lrm.rows < 0:
        raise ConfigValueError(f"lrm.rows={lrm.rows} must be >= 0 (0 = the whole batch)")
    if not builds_own_inputs(cfg):
        if r.name and not r.path:
            raise ConfigValueError(f"reward.name={r.name!r} needs reward.path (the model folder)")
        if lrm.enabled and not lrm.path:
            raise ConfigValueError("lrm.enabled needs lrm.path (a LatentRewardModel folder, see configs/lrm_pretrain.py)")
    paths = [p.split("=", 1)[-1] for p in r.path.split(",")] if r.path else []
    for key, path in [("reward.path", p) for p in paths] + [("lrm.path", lrm.path)]:
        if path and not os.path.exists(os.path.expanduser(path)):
            raise ConfigValueError(f"config.{key}: {path!r} does not exist")


def resolve_model_ids(cfg) -> None:
    """Replace hub ids (``org/name[@revision]``, `jaxlcd.paths`) and ``gs://`` folders in ``cfg.teacher``,
    ``cfg.reward.path`` (each part of "name=path,...") and ``cfg.lrm.path`` by their cached local folders, fetching
    them first when needed."""
    def reward_part(part: str) -> str:
        name, sep, path = part.rpartition("=")
        return f"{name}{sep}{paths.resolve_model_path(path, 'config.reward.path')}"

    with cfg.unlocked():
        cfg.teacher = paths.resolve_model_path(cfg.teacher, "config.teacher", cfg.get("teacher_variant", ""))
        cfg.reward.path = ",".join(reward_part(p) for p in cfg.reward.path.split(",")) if cfg.reward.path else ""
        cfg.lrm.path = paths.resolve_model_path(cfg.lrm.path, "config.lrm.path")


# what a resumed run may not change: the model the checkpoint holds, the shape of its state, the images it sees
FIXED_ON_RESUME = ("teacher", "resolution", "lcd.w_embedding_dim", "lrm.enabled", "optim.frozen", "optim.lr_mults",
                   "lora.enabled", "lora.rank", "lora.targets")


def check_resume(cfg, workdir: str) -> None:
    """Raise InputError (naming the key) when ``workdir`` holds checkpoints trained with another value of a key in
    FIXED_ON_RESUME than ``cfg`` has. Learning rate, schedule, total steps and cadences may change (the loop applies
    them); a changed data_dir is caught by `prepare_data`."""
    ckpts, saved_path = storage.epath(storage.join(workdir, "checkpoints")), storage.join(workdir, "config.json")
    if not (ckpts.is_dir() and any(ckpts.iterdir()) and storage.exists(saved_path)):
        return
    saved = json.loads(storage.read_text(saved_path))

    def get(tree, key):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    current = json.loads(cfg.to_json_best_effort())
    for key in FIXED_ON_RESUME:
        old, new = get(saved, key), get(current, key)
        if old is not None and old != new and not (old in ([], ()) and new in ([], ())):
            raise InputError(f"config.{key} cannot change when resuming: the checkpoints in {workdir} were trained "
                             f"with {old!r}, this run has {new!r}; use a new workdir (or the old value)")


def builds_own_inputs(cfg) -> bool:
    """True for the variant that needs no user paths: tiny (random models built in the workdir)."""
    return cfg.variant == "tiny"


def resolve_inputs(cfg, workdir: str) -> tuple[str, str]:
    """(teacher folder, data folder), absolute; the tiny variant builds what is not given once, in the workdir
    (in `storage.local_dir` of a cloud workdir; `jaxlcd.tiny`)."""
    teacher, data, workdir = cfg.teacher, cfg.data_dir, storage.local_dir(workdir)
    if cfg.variant == "tiny":
        if not teacher:
            teacher = os.path.join(workdir, "tiny_teacher")
            if not os.path.isfile(os.path.join(teacher, "model_index.json")):
                tiny.write_teacher_folder(teacher, seed=cfg.seed)
        if not data:
            data = os.path.join(workdir, "tiny_data")
            if not os.path.isdir(data):
                tiny.write_image_folder(data, n=32, resolution=cfg.resolution, seed=cfg.seed)
    return storage.absolute(teacher), storage.absolute(data)


def prepare_data(data_dir: str, out_dir: str, filters: dict | None = None) -> str:
    """The training data for ``data_dir``, for `jaxlcd.data.make_train_iterator`: ``data_dir`` itself when it holds
    data pre-encoded by `jaxlcd.encode` or a prepared dataset (a tfds folder with dataset_info.json, from
    `jaxlcd.data.prepare_folder_dataset`); for
    webdataset shards (`jaxlcd.data.shards`, read in place, never copied) their index, built once in
    ``out_dir/shards``; else the image-caption folder prepared once into ``out_dir`` (a ``gs://`` folder is copied to
    local disk first). ``filters``: ``max_watermark`` / ``min_aesthetic`` for shards with LAION json metadata.
    A ``data_dir`` other than the one ``out_dir`` was prepared from is refused."""
    if encoded.is_encoded(data_dir):
        return data_dir
    if shards.is_shard_spec(data_dir):
        src, out = data_dir, os.path.join(out_dir, "shards")
        previous = shards.read_index_meta(out)
    else:
        data_dir = storage.local_copy(data_dir, "config.data_dir")
        if os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
            return data_dir
        src, out = os.path.abspath(data_dir), out_dir
        try:
            previous = data_lib.read_prepare_stats(out_dir)
        except (InputError, OSError, KeyError):
            previous = None   # nothing prepared yet
    if previous is not None and previous["src_dir"] != src:
        raise InputError(f"{out} was prepared from {previous['src_dir']}, but config.data_dir is now {src}; train on "
                         f"new data in a new workdir (or delete {out} to prepare it again, which restarts the data "
                         "order)")
    if out != out_dir:
        shards.index_shards(src, out, filters)
        return out
    stats = data_lib.prepare_folder_dataset(data_dir, out_dir)
    log.info("dataset: %d usable image-caption pairs; skipped while preparing: %s", stats["count"],
             {k: v for k, v in stats["skipped"].items() if v} or "none")
    return out_dir


def resolve_reward_paths(cfg, workdir: str) -> tuple[str, str]:
    """(reward path, LRM path); the tiny variant builds a tiny random CLIP / LRM in the workdir once."""
    reward, lrm, workdir = cfg.reward.path, cfg.lrm.path, storage.local_dir(workdir)
    if cfg.variant == "tiny":
        if cfg.reward.name and not reward:
            reward = os.path.join(workdir, "tiny_reward")
            if not os.path.isfile(os.path.join(reward, "config.json")):
                tiny.write_reward_folder(reward, seed=cfg.seed + 2)
        if cfg.lrm.enabled and not lrm:
            lrm = os.path.join(workdir, "tiny_lrm")
            if not os.path.isfile(os.path.join(lrm, "config.json")):
                tiny.write_lrm_folder(lrm, cfg.resolution // 8, seed=cfg.seed + 3)
    return reward, lrm


def make_student(cfg, pipe):
    """(student module, its initial trainable params, LoRA scale or None): the teacher UNet + ``cond_proj``
    (full distillation), or with ``lora.enabled`` the teacher module itself and new adapters (`jaxlcd.models.lora`)
    at scale alpha / rank."""
    if cfg.get("lora") is not None and cfg.lora.enabled:
        adapters = lora.init_adapters(pipe.unet_params, tuple(cfg.lora.targets), cfg.lora.rank,
                                      jax.random.PRNGKey(cfg.seed + 1))
        return pipe.unet, adapters, float(cfg.lora.alpha) / cfg.lora.rank
    student, params = add_cond_proj(pipe.unet, pipe.unet_params, cfg.lcd.w_embedding_dim,
                                    jax.random.PRNGKey(cfg.seed + 1), cfg.lcd.zero_init_cond_proj)
    return student, params, None


@dataclasses.dataclass
class Run:
    """The models, frozen params, initial state and shardings of one training run."""
    models: StepModels
    teacher_dir: str
    pipe: Any                  # jaxlcd.pipeline.Pipeline of the teacher (float32 params, for sampling/export)
    frozen: dict               # teacher/vae/text params in the compute dtype + uncond_ctx
    state: DistillState
    state_shardings: Any
    frozen_shardings: Any
    mesh: Any
    tx: Any
    abar: jax.Array

    def student_variables(self, params) -> tuple:
        """(UNet params, scaled adapters or None) of the student ``params`` for the samplers
        (`jaxlcd.pipeline.lcm_generate`): a LoRA student is the float32 teacher with its adapters."""
        scale = self.models.lora_scale
        return (params, None) if scale is None else (self.pipe.unet_params, lora.scaled(params, scale))


def build_run(cfg, teacher_dir: str, mesh) -> Run:
    """Load the teacher, make the student (teacher + cond_proj, or LoRA adapters on the teacher) and the sharded
    initial state."""
    dtype = DTYPES[cfg.compute_dtype]
    pipe = load_pipeline(teacher_dir)
    kind = pipe.prediction_type
    student, student_params, lora_scale = make_student(cfg, pipe)
    as_dtype = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)
    r = cfg.reward
    reward = load_reward(r.name, r.path, dtype=dtype, antialias=r.antialias, allow_pickle=r.allow_pickle,
                         attention=cfg.attention) \
        if r.name else None
    lrm = load_lrm(cfg.lrm.path, dtype=dtype, allow_pickle=r.allow_pickle, attention=cfg.attention) \
        if cfg.lrm.enabled else None
    lrm_tx = make_lrm_optimizer(lrm.params, cfg.lrm.learning_rate, cfg.lrm.weight_decay, tuple(cfg.lrm.freeze)) \
        if lrm is not None and cfg.lrm.update else None
    if lrm_tx is not None and not reward.logit_scale > 0:
        raise ConfigValueError(f"the LRM's expert {r.name!r} has no CLIP logit scale; use hpsv2.1, pickscore "
                               "or clipscore")
    kernels = dict(dtype=dtype, attention_impl=cfg.attention)
    models = StepModels(student=student.clone(remat=cfg.remat, **kernels),
                        teacher=pipe.unet.clone(**kernels), vae=pipe.vae.clone(**kernels),
                        text=pipe.text_encoder.clone(**kernels), prediction_type=kind,
                        # params travel as frozen / state arguments; the models keep only their functions
                        reward=dataclasses.replace(reward, params=None) if reward is not None else None,
                        lrm=dataclasses.replace(lrm, params=None) if lrm is not None else None, lrm_tx=lrm_tx,
                        lora_scale=lora_scale)
    frozen = {"teacher": as_dtype(pipe.unet_params), "vae": as_dtype(pipe.vae_params),
              "text": as_dtype(pipe.text_params), "uncond_ctx": encode_prompts(pipe, [""])}
    if reward is not None:
        frozen["reward"] = as_dtype(reward.params)
    tx = make_optimizer(cfg.optim, cfg.total_steps)
    init = lambda p, lp: create_state(p, tx, cfg.seed, lp, lrm_tx)
    state, state_shardings = parallel.init_sharded(init, mesh, parallel.FSDP_RULES, student_params,
                                                   lrm.params if lrm is not None else None)
    frozen_rules = parallel.FSDP_RULES if cfg.shard_frozen == "fsdp" else parallel.REPLICATE_RULES
    frozen_shardings = parallel.param_shardings(jax.eval_shape(lambda: frozen), mesh, frozen_rules)
    frozen = jax.device_put(frozen, frozen_shardings)
    return Run(models, teacher_dir, pipe, frozen, state, state_shardings, frozen_shardings, mesh, tx, pipe.abar)
