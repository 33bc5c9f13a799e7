"""Check values of docs/algorithm.md sections 1, 2 and 5, and agreement with diffusers' schedulers."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlcd.diffusion import consistency as cm
from jaxlcd.diffusion import schedule

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_abar_check_values():
    abar = schedule.alphas_cumprod(SD_SCHEDULE)
    for t, want in {0: 0.99915, 19: 0.982244, 259: 0.658976, 499: 0.27767, 759: 0.052213, 999: 0.00466}.items():
        assert abar[t] == pytest.approx(want, rel=2e-4), t


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_abar_matches_diffusers(beta_schedule):
    cfg = dict(SD_SCHEDULE, beta_schedule=beta_schedule)
    ref = diffusers.DDIMScheduler(**cfg).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(schedule.alphas_cumprod(cfg), ref, rtol=2e-5, atol=1e-7)


def test_unknown_schedule_and_prediction_type_are_named():
    with pytest.raises(schedule.ScheduleError, match="beta_schedule='cosine'"):
        schedule.alphas_cumprod(dict(SD_SCHEDULE, beta_schedule="cosine"))
    with pytest.raises(schedule.ScheduleError, match="prediction_type='x0'"):
        schedule.prediction_type({"prediction_type": "x0"})


def test_guidance_embedding_check_values_and_diffusers():
    emb = np.asarray(cm.guidance_embedding(jnp.array([6.5]), 256))[0]
    np.testing.assert_allclose(emb[0:4], [-0.044785, 0.762962, -0.871102, 0.994762], atol=2e-3)
    np.testing.assert_allclose(emb[128:132], [-0.998997, 0.646444, 0.491102, 0.10222], atol=2e-3)
    pipe_cls = diffusers.LatentConsistencyModelPipeline
    w = torch.tensor([3.0, 6.5, 14.0])
    ref = pipe_cls.get_guidance_scale_embedding(pipe_cls, w, embedding_dim=256).numpy()
    # float32 sin(1000 w f) with arguments up to ~1e4: a 1-ulp difference in exp(f) between XLA and torch moves
    # single entries by up to ~1e-3; the bulk agrees to 1e-6.
    ours = np.asarray(cm.guidance_embedding(w.numpy(), 256))
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    assert np.median(np.abs(ours - ref)) < 1e-6


@pytest.mark.parametrize("steps,want", [(1, [999]), (2, [999, 499]), (4, [999, 759, 499, 259]),
                                        (8, [999, 879, 759, 639, 499, 379, 259, 139])])
def test_lcm_timesteps(steps, want):
    assert schedule.lcm_timesteps(steps).tolist() == want
    sched = diffusers.LCMScheduler(**SD_SCHEDULE)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == want


def test_boundary_scalings_check_values_and_diffusers():
    c_skip, c_out = map(np.asarray, cm.boundary_scalings(jnp.array([0, 19, 999])))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    np.testing.assert_allclose(c_skip[1:], [0.25 / (190 ** 2 + 0.25), 0.25 / (9990 ** 2 + 0.25)], rtol=1e-5)
    np.testing.assert_allclose(c_out[1:], [190 / np.sqrt(190 ** 2 + 0.25), 9990 / np.sqrt(9990 ** 2 + 0.25)], rtol=1e-6)
    sched = diffusers.LCMScheduler(**SD_SCHEDULE)
    for i, t in enumerate([0, 19, 999]):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert c_skip[i] == pytest.approx(float(ref_skip), rel=1e-5, abs=1e-12)
        assert c_out[i] == pytest.approx(float(ref_out), rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("kind", schedule.PREDICTION_TYPES)
def test_prediction_conversions_are_consistent(kind):
    rng = np.random.default_rng(0)
    z, out = rng.standard_normal((2, 4, 4, 4)), rng.standard_normal((2, 4, 4, 4))
    alpha = np.sqrt(0.3)
    sigma = np.sqrt(1 - 0.3)
    x0, eps = schedule.to_x0_eps(out, z, alpha, sigma, kind)
    np.testing.assert_allclose(alpha * x0 + sigma * eps, z, atol=1e-12)  # forward process holds
    if kind == "v_prediction":
        np.testing.assert_allclose(alpha * eps - sigma * x0, out, atol=1e-12)


def test_lcd_grid_and_timestep_sampling():
    grid = schedule.lcd_grid()
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50 and np.all(np.diff(grid) == 20)
    t_start, t_end = schedule.sample_lcd_timesteps(jax.random.PRNGKey(0), 4096)
    t_start, t_end = np.asarray(t_start), np.asarray(t_end)
    assert set(t_start.tolist()) == set(grid.tolist())          # every grid point is drawn
    np.testing.assert_array_equal(t_end, np.maximum(t_start - 20, 0))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_timesteps_and_prev_alphas_match_diffusers(spacing, set_alpha_to_one):
    cfg = dict(SD_SCHEDULE, timestep_spacing=spacing, steps_offset=1, set_alpha_to_one=set_alpha_to_one)
    sched = diffusers.DDIMScheduler(**cfg)
    sched.set_timesteps(50)
    ts = schedule.ddim_timesteps(cfg, 50)
    assert ts.tolist() == sched.timesteps.tolist()
    prev = schedule.ddim_prev_alphas(cfg, ts, 50)
    ref = [float(sched.alphas_cumprod[t - 20]) if t - 20 >= 0 else float(sched.final_alpha_cumprod) for t in ts]
    np.testing.assert_allclose(prev, ref, rtol=2e-5)


def test_target_equals_x_prev_at_t_end_zero():
    rng = np.random.default_rng(1)
    z0 = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
    abar = jnp.asarray(schedule.alphas_cumprod(SD_SCHEDULE), jnp.float32)
    teacher = lambda z, t, c: 0.1 * z + c.mean() * jnp.ones_like(z)
    identity_student = lambda z, t, c, w: jnp.sin(z)  # any network: c_skip(0) = 1 makes f(x, 0) = x
    out = cm.lcd_loss(identity_student, identity_student, teacher, z0, jnp.zeros_like(z0), jnp.array([19, 19]),
                      jnp.array([0, 0]), jnp.array([5.0, 7.0]), jnp.ones((2, 3, 8)), jnp.zeros((2, 3, 8)), abar,
                      "epsilon", 16)
    np.testing.assert_array_equal(np.asarray(out.target), np.asarray(out.x_prev))


def test_pseudo_huber_and_l2():
    p, t = jnp.array([0.0, 1.0, -2.0]), jnp.zeros(3)
    want = np.mean(np.sqrt(np.array([0.0, 1.0, 4.0]) + 1e-6) - 1e-3)
    assert float(cm.pseudo_huber(p, t)) == pytest.approx(want, rel=1e-6)
    assert float(cm.l2(p, t)) == pytest.approx(5 / 3, rel=1e-6)


def test_zero_snr_rescale_is_refused():
    with pytest.raises(schedule.ScheduleError, match="rescale_betas_zero_snr"):
        schedule.alphas_cumprod(dict(SD_SCHEDULE, rescale_betas_zero_snr=True))
