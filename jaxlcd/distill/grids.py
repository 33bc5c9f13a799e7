"""The LCM sample-grid evaluator: PNG grids of the student at each LCM step count on fixed prompts and latents."""
from __future__ import annotations

import jax
import numpy as np
from PIL import Image

from jaxlcd import parallel, storage
from jaxlcd.diffusion import schedule
from jaxlcd.pipeline import encode_prompts, lcm_generate
from jaxlcd.sample import make_grid, to_uint8
from jaxlcd.training.evaluators import Evaluator


def student_samples(run, params, prompts, n: int, resolution: int, guidance: float = 8.5, batch: int = 0) -> np.ndarray:
    """uint8 [P, R, R, 3]: ``n``-step LCM samples of the student ``params`` (host arrays) of ``run`` (a
    `jaxlcd.distill.setup.Run`) for ``prompts``, from fixed latents (PRNGKey(1234)) and noise (PRNGKey(n)); drawn
    ``batch`` prompts at a time (0: all at once; the last batch is padded), the same images either way."""
    pipe, student = run.pipe, run.models.student.clone(dtype=run.pipe.unet.dtype)
    shape = (len(prompts), resolution // 8, resolution // 8, student.config.in_channels)
    z = jax.random.normal(jax.random.PRNGKey(1234), shape)
    ts = tuple(int(t) for t in schedule.lcm_timesteps(n))
    noises = jax.random.normal(jax.random.PRNGKey(n), (n - 1,) + shape) if n > 1 else None
    batch = batch or len(prompts)
    unet_params, adapters = run.student_variables(params)
    cfg_guidance = not student.config.time_cond_proj_dim and guidance > 1   # a LoRA student: CFG as diffusers
    out = []
    for start in range(0, len(prompts), batch):
        idx = [min(i, len(prompts) - 1) for i in range(start, start + batch)]
        ctx = encode_prompts(pipe, [prompts[i] for i in idx])
        uncond = encode_prompts(pipe, [""] * len(idx)) if cfg_guidance else None
        _, images = lcm_generate(unet_params, pipe.vae_params, z[np.array(idx)], ctx, np.float32(guidance), run.abar,
                                 None if noises is None else noises[:, np.array(idx)], uncond, adapters,
                                 unet=student, vae=pipe.vae, timesteps=ts, kind=run.models.prediction_type)
        out.append(to_uint8(np.asarray(images))[:len(prompts) - start])
    return np.concatenate(out)


def sample_grids(run, prompts, steps, resolution: int, params, out_dir: str, tag: str, guidance: float = 8.5) -> None:
    """Write ``out_dir/<tag>_lcm<n>.png`` for each n of ``steps``: the student ``params`` of ``run`` (a
    `jaxlcd.distill.setup.Run`) on ``prompts``, the same initial latents and noise every time. Process 0 writes."""
    params = parallel.to_host(params)   # every process takes part; process 0 samples and writes
    if jax.process_index() != 0:
        return
    storage.makedirs(out_dir)
    for n in steps:
        images = student_samples(run, params, list(prompts), n, resolution, guidance)
        with storage.open_file(storage.join(out_dir, f"{tag}_lcm{n}.png"), "wb") as f:
            Image.fromarray(make_grid(images)).save(f, format="PNG")


def make_grid_evaluator(name: str, ecfg, context: dict):
    """``type="lcm_grids"``: keys ``every`` (steps; 0 = only at the end), ``steps`` (LCM step counts), ``prompts``,
    ``guidance`` (g; w = g - 1). Grids go to ``<workdir>/samples/step<N>_lcm<n>.png`` (``final_lcm<n>.png`` at the
    end). Context: ``run`` (`jaxlcd.distill.setup.Run`), ``workdir``, ``resolution``. None when ``steps`` is empty."""
    if not ecfg.get("steps"):
        return None
    run, out_dir = context["run"], storage.join(context["workdir"], "samples")

    def run_grids(state, step: int, final: bool) -> dict:
        sample_grids(run, ecfg["prompts"], ecfg["steps"], context["resolution"], state.params, out_dir,
                     "final" if final else f"step{step:07d}", ecfg.get("guidance", 8.5))
        return {}

    return Evaluator(name, int(ecfg.get("every", 0)), run_grids)
