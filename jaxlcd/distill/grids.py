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


def sample_grids(run, prompts, steps, resolution: int, params, out_dir: str, tag: str, guidance: float = 8.5) -> None:
    """Write ``out_dir/<tag>_lcm<n>.png`` for each n of ``steps``: the student ``params`` of ``run`` (a
    `jaxlcd.distill.setup.Run`) on ``prompts``, the same initial latents and noise every time. Process 0 writes."""
    pipe, student = run.pipe, run.models.student.clone(dtype=run.pipe.unet.dtype)
    ctx = encode_prompts(pipe, list(prompts))
    shape = (len(prompts), resolution // 8, resolution // 8, student.config.in_channels)
    z = jax.random.normal(jax.random.PRNGKey(1234), shape)
    params = parallel.to_host(params)   # every process takes part; process 0 samples and writes
    if jax.process_index() != 0:
        return
    storage.makedirs(out_dir)
    for n in steps:
        ts = tuple(int(t) for t in schedule.lcm_timesteps(n))
        noises = jax.random.normal(jax.random.PRNGKey(n), (n - 1,) + shape) if n > 1 else None
        _, images = lcm_generate(params, pipe.vae_params, z, ctx, np.float32(guidance), run.abar, noises,
                                 unet=student, vae=pipe.vae, timesteps=ts, kind=run.models.prediction_type)
        with storage.open_file(storage.join(out_dir, f"{tag}_lcm{n}.png"), "wb") as f:
            Image.fromarray(make_grid(to_uint8(np.asarray(images)))).save(f, format="PNG")


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
