"""LCM / DDIM samplers and the LCD loss against diffusers (PyTorch) computations."""
import os

import diffusers
import diffusers.schedulers.scheduling_lcm as scheduling_lcm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import nchw_to_nhwc, perturb_, rel_err
from jaxlcd.diffusion import consistency as cm
from jaxlcd.diffusion import samplers, schedule
from jaxlcd.weights import load_component
from tiny_pipeline import TINY_UNET

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
W_DIM = 32
LATENT_TOL = 1e-4   # relative L2 on latents, jaxlcd vs diffusers
LOSS_TOL = 1e-4     # relative error of the LCD loss value (pred/target themselves at LATENT_TOL)


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """Torch + Flax copies of a tiny teacher, an LCM student (cond_proj) and a different EMA target."""
    root = tmp_path_factory.mktemp("unets")
    torch.manual_seed(0)
    teacher = perturb_(diffusers.UNet2DConditionModel(**TINY_UNET), seed=0)
    student = diffusers.UNet2DConditionModel(**TINY_UNET, time_cond_proj_dim=W_DIM)
    student.load_state_dict(teacher.state_dict(), strict=False)
    student = perturb_(student, scale=0.01, seed=1)
    target = perturb_(diffusers.UNet2DConditionModel(**TINY_UNET, time_cond_proj_dim=W_DIM), seed=2)
    target.load_state_dict({k: v + 0.01 for k, v in student.state_dict().items()})
    out = {}
    for name, model in [("teacher", teacher), ("student", student), ("target", target)]:
        model.save_pretrained(os.path.join(root, name))
        module, params = load_component(os.path.join(root, name))
        out[name] = (model.eval(), module, params)
    return out


def flax_fn(module, params, with_cond):
    if with_cond:
        return lambda z, t, c, w: module.apply({"params": params}, z, t, c, timestep_cond=w)
    return lambda z, t, c: module.apply({"params": params}, z, t, c)


def random_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 7, 32, generator=g)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_lcm_sampler_matches_lcm_scheduler(unets, monkeypatch, steps, kind):
    model, module, params = unets["student"]
    z, ctx = random_inputs()
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(z.shape, generator=g) for _ in range(steps - 1)]
    pending = list(noises)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: pending.pop(0))
    sched = diffusers.LCMScheduler(**SD_SCHEDULE, prediction_type=kind)
    sched.set_timesteps(steps)
    guidance = 8.5
    pipe_cls = diffusers.LatentConsistencyModelPipeline
    w_emb = pipe_cls.get_guidance_scale_embedding(pipe_cls, torch.full((2,), guidance - 1), embedding_dim=W_DIM)
    latents = z
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(latents, t, ctx, timestep_cond=w_emb).sample
            latents, denoised = sched.step(out, t, latents, return_dict=False)
    assert not pending  # every injected noise was used
    abar = jnp.asarray(schedule.alphas_cumprod(SD_SCHEDULE), jnp.float32)
    noise_arr = jnp.stack([nchw_to_nhwc(n) for n in noises]) if noises else None
    run = jax.jit(lambda p, z, c, n: samplers.lcm_sample(flax_fn(module, p, True), z, c, schedule.lcm_timesteps(steps),
                                                          abar, kind, guidance, W_DIM, noises=n))
    ours = run(params, nchw_to_nhwc(z), ctx.numpy(), noise_arr)
    assert rel_err(ours, nchw_to_nhwc(denoised)) <= LATENT_TOL


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_lcd_loss_matches_pytorch_computation(unets, kind):
    (teacher, t_mod, t_par), (student, s_mod, s_par), (target, g_mod, g_par) = (
        unets["teacher"], unets["student"], unets["target"])
    g = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    ctx, uncond = torch.randn(4, 7, 32, generator=g), torch.randn(4, 7, 32, generator=g)
    t_start, w = torch.tensor([19, 259, 619, 999]), torch.tensor([5.0, 7.5, 11.0, 15.0])
    t_end = torch.clamp(t_start - 20, min=0)

    # --- independent PyTorch computation (diffusers UNets + the formulas of docs/algorithm.md) ---
    abar = diffusers.DDIMScheduler(**SD_SCHEDULE).alphas_cumprod.double()
    col = lambda v: v.double().view(-1, 1, 1, 1)
    a_s, a_e = col(abar[t_start]), col(abar[t_end])

    def convert(out, z, a):
        out, z = out.double(), z.double()
        if kind == "epsilon":
            return (z - (1 - a).sqrt() * out) / a.sqrt(), out
        return a.sqrt() * z - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * z

    def scalings(t):
        s = col(t) * 10.0
        return 0.25 / (s ** 2 + 0.25), s / (s ** 2 + 0.25).sqrt()

    pipe_cls = diffusers.LatentConsistencyModelPipeline
    w_emb = pipe_cls.get_guidance_scale_embedding(pipe_cls, w, embedding_dim=W_DIM)
    with torch.no_grad():
        z = (a_s.sqrt() * z0 + (1 - a_s).sqrt() * noise).float()
        x0_c, eps_c = convert(teacher(z, t_start, ctx).sample, z, a_s)
        x0_u, eps_u = convert(teacher(z, t_start, uncond).sample, z, a_s)
        x0, eps = x0_c + col(w) * (x0_c - x0_u), eps_c + col(w) * (eps_c - eps_u)
        x_prev = (a_e.sqrt() * x0 + (1 - a_e).sqrt() * eps).float()
        c_skip, c_out = scalings(t_start)
        pred = c_skip * z.double() + c_out * convert(student(z, t_start, ctx, timestep_cond=w_emb).sample, z, a_s)[0]
        c_skip, c_out = scalings(t_end)
        tgt = c_skip * x_prev.double() + c_out * convert(target(x_prev, t_end, ctx, timestep_cond=w_emb).sample, x_prev, a_e)[0]
        loss = torch.mean(torch.sqrt((pred - tgt) ** 2 + 1e-6) - 1e-3)

    abar_j = jnp.asarray(schedule.alphas_cumprod(SD_SCHEDULE), jnp.float32)
    fn = jax.jit(lambda sp, gp, tp, *a: cm.lcd_loss(flax_fn(s_mod, sp, True), flax_fn(g_mod, gp, True),
                                                    flax_fn(t_mod, tp, False), *a, abar_j, kind, W_DIM))
    out = fn(s_par, g_par, t_par, nchw_to_nhwc(z0), nchw_to_nhwc(noise), t_start.numpy(), t_end.numpy(),
             w.numpy(), ctx.numpy(), uncond.numpy())
    assert rel_err(out.x_prev, nchw_to_nhwc(x_prev)) <= LATENT_TOL
    assert rel_err(out.pred, nchw_to_nhwc(pred)) <= LATENT_TOL
    assert rel_err(out.target, nchw_to_nhwc(tgt)) <= LATENT_TOL
    assert float(out.loss) == pytest.approx(float(loss), rel=LOSS_TOL)


@pytest.fixture(scope="module")
def teacher_pipe_dir(tmp_path_factory):
    from tiny_pipeline import make_pipeline_dir

    return make_pipeline_dir(str(tmp_path_factory.mktemp("teacher") / "sd"), prediction_type="v_prediction")


def test_ddim50_cfg_matches_stable_diffusion_pipeline(teacher_pipe_dir):
    from jaxlcd import pipeline as jp

    prompts, negative = ["a red circle", "two blue squares"], "a green triangle"
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    sd = diffusers.StableDiffusionPipeline.from_pretrained(teacher_pipe_dir, safety_checker=None)
    assert isinstance(sd.scheduler, diffusers.DDIMScheduler)
    sd.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = sd(prompts, negative_prompt=[negative] * 2, num_inference_steps=50, guidance_scale=7.5,
                 latents=latents, output_type="np").images
    _, images = jp.sample_ddim(jp.load_pipeline(teacher_pipe_dir), prompts, num_steps=50, guidance=7.5,
                               negative_prompt=negative, latents=nchw_to_nhwc(latents))
    assert images.shape == ref.shape
    assert float(np.mean(np.abs(np.asarray(images) - ref))) <= 1e-3


def test_ddim_from_a_later_step_matches_the_diffusers_scheduler_loop(teacher_pipe_dir):
    """start_step (SDEdit / img2img): what diffusers' img2img pipeline runs after noising, the scheduler's
    timesteps[start_step:] with CFG, here driven by hand with the torch UNet and DDIMScheduler.step."""
    from jaxlcd import pipeline as jp

    prompts, steps, start, guidance = ["a red circle", "two blue squares"], 10, 4, 3.0
    sd = diffusers.StableDiffusionPipeline.from_pretrained(teacher_pipe_dir, safety_checker=None)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ctx, uncond = sd.encode_prompt(prompts, "cpu", 1, True, [""] * 2)
        sd.scheduler.set_timesteps(steps)
        z = latents
        for t in sd.scheduler.timesteps[start:]:
            out_c, out_u = sd.unet(torch.cat([z, z]), t, torch.cat([ctx, uncond])).sample.chunk(2)
            z = sd.scheduler.step(out_u + guidance * (out_c - out_u), t, z).prev_sample
    ours, _ = jp.sample_ddim(jp.load_pipeline(teacher_pipe_dir), prompts, num_steps=steps, guidance=guidance,
                             latents=nchw_to_nhwc(latents), start_step=start)
    assert rel_err(ours, nchw_to_nhwc(z)) <= LATENT_TOL
