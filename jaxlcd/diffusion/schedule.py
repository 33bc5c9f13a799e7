"""Noise schedules and timestep grids, read from a diffusers scheduler config (docs/algorithm.md sections 1, 2, 5).

Schedules are computed once on the host in float64 numpy; samplers index them with static or traced
timesteps after casting to float32.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jaxlcd.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


class ScheduleError(InputError):
    """A scheduler config value jaxlcd does not support."""


def read_scheduler_config(pipeline_dir: str) -> dict:
    """``<pipeline_dir>/scheduler/scheduler_config.json`` as a dict (one clear error if absent)."""
    path = os.path.join(pipeline_dir, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise ScheduleError(f"{pipeline_dir!r} has no scheduler/scheduler_config.json; is it a diffusers pipeline folder?")
    with open(path) as f:
        return json.load(f)


def betas(config: dict) -> np.ndarray:
    """Per-step betas [T] float64 for ``beta_schedule`` in BETA_SCHEDULES."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("rescale_betas_zero_snr"):
        raise ScheduleError("scheduler config: rescale_betas_zero_snr=True is not supported by jaxlcd's samplers")
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    if schedule == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if schedule == "squaredcos_cap_v2":
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], np.float64)
    raise ScheduleError(f"scheduler config: beta_schedule={schedule!r} is not supported; supported: {list(BETA_SCHEDULES)}")


def alphas_cumprod(config: dict) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), shape [T] float64."""
    return np.cumprod(1.0 - betas(config))


def prediction_type(config: dict) -> str:
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ScheduleError(f"scheduler config: prediction_type={kind!r} is not supported; supported: {list(PREDICTION_TYPES)}")
    return kind


def to_x0_eps(out, z, alpha, sigma, kind: str):
    """Model output -> (x0, eps) for ``kind`` in PREDICTION_TYPES; alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t).

    out, z: [B,h,w,c]; alpha, sigma: broadcastable (e.g. [B,1,1,1]).
    """
    if kind == "epsilon":
        return (z - sigma * out) / alpha, out
    if kind == "v_prediction":
        return alpha * z - sigma * out, alpha * out + sigma * z
    if kind == "sample":
        return out, (z - alpha * out) / sigma
    raise ScheduleError(f"prediction_type={kind!r} is not supported; supported: {list(PREDICTION_TYPES)}")


def lcd_grid(num_train: int = 1000, num_ddim: int = 50) -> np.ndarray:
    """The skip-step DDIM grid of LCD: [k-1, 2k-1, ..., T-1] with k = T // N (N entries, ascending)."""
    k = num_train // num_ddim
    return np.arange(1, num_ddim + 1) * k - 1


def sample_lcd_timesteps(rng, batch: int, num_train: int = 1000, num_ddim: int = 50):
    """Per-example (t_start, t_end) int32 [B]: index ~ U{0..N-1}, t_start = k(index+1) - 1, t_end = max(t_start - k, 0)."""
    k = num_train // num_ddim
    index = jax.random.randint(rng, (batch,), 0, num_ddim)
    t_start = k * (index + 1) - 1
    return t_start.astype(jnp.int32), jnp.maximum(t_start - k, 0).astype(jnp.int32)


def lcm_timesteps(num_steps: int, original_steps: int = 50, num_train: int = 1000) -> np.ndarray:
    """diffusers LCMScheduler.set_timesteps (strength 1): 1 -> [999], 4 -> [999, 759, 499, 259]."""
    if not 1 <= num_steps <= original_steps:
        raise ScheduleError(f"LCM steps must be in [1, {original_steps}], got {num_steps}")
    origin = lcd_grid(num_train, original_steps)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num_steps, endpoint=False)).astype(np.int64)]


def ddim_timesteps(config: dict, num_steps: int) -> np.ndarray:
    """diffusers DDIMScheduler.set_timesteps for ``timestep_spacing`` leading / trailing / linspace (descending)."""
    n = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(np.int64) + int(config.get("steps_offset", 0))
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    raise ScheduleError(f"scheduler config: timestep_spacing={spacing!r} is not supported; "
                        "supported: ['leading', 'trailing', 'linspace']")


def ddim_prev_alphas(config: dict, timesteps: np.ndarray, num_steps: int) -> np.ndarray:
    """abar at each DDIM step's previous timestep t - T/num_steps (final_alpha_cumprod when negative)."""
    abar = alphas_cumprod(config)
    final = 1.0 if config.get("set_alpha_to_one", True) else abar[0]
    prev = timesteps - int(config.get("num_train_timesteps", 1000)) // num_steps
    return np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
