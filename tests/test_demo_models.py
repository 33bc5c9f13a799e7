"""The demo world's model trainers on tiny configs: they run, resume, and write folders diffusers loads."""
import json

import diffusers
import numpy as np
import pytest
import torch

from conftest import load_config
from jaxlcd.demo import shapes
from jaxlcd.demo.train_vae import train_vae


@pytest.mark.slow  # ~90 s: two compiles of the VAE step
def test_vae_trainer_writes_a_diffusers_vae_with_unit_variance_latents(tmp_path):
    cfg = load_config("tiny", "demo/vae.py")
    cfg.total_steps, cfg.log_every, cfg.checkpoint_every = 2, 1, 1
    cfg.evals.reconstruction.judge = "demo"   # the acceptance check at every checkpoint (the judge resizes the 32 px reconstructions)
    train_vae(cfg, str(tmp_path))
    cfg.total_steps = 3
    last = train_vae(cfg, str(tmp_path))   # resumes at step 2
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]
    assert [m["step"] for m in lines if "judge_acc" in m] == [1, 2, 3]
    assert np.isfinite(last["loss"]) and last["mse"] > 0 and last["kl"] >= 0
    assert all(0.0 <= last[k] <= 1.0 for k in ("judge_acc", "judge_shape", "judge_colour", "judge_acc_noisy"))
    assert last["rec_mse"] > 0

    vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    assert vae.config.scaling_factor == last["scaling_factor"]
    images = np.stack([shapes.render(shapes.sample_scene(1, i), resolution=32) for i in range(16)])
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    assert 0.5 < float(z.std()) < 2.0   # scaled latents have about unit variance on unseen scenes

    # a decoder-only second phase from the saved folder: the encoder (and the scaling factor) come back bit-identical
    cfg.init_from, cfg.train_encoder, cfg.edge_weight, cfg.total_steps = str(tmp_path / "vae"), False, 1.0, 2
    cfg.evals.reconstruction.judge = ""
    cfg.latent_noise = 0.3
    train_vae(cfg, str(tmp_path / "phase2"))
    again = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "phase2" / "vae")).eval()
    assert again.config.scaling_factor == vae.config.scaling_factor
    changed = set()
    for (name, a), b in zip(vae.state_dict().items(), again.state_dict().values()):
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(a, b), name
        elif not torch.equal(a, b):
            changed.add(name.split(".")[0])
    assert changed == {"decoder", "post_quant_conv"}


def test_vae_latent_noise():
    import jax
    from jaxlcd.models import vae as vae_lib
    from jaxlcd.demo.train_vae import vae_loss

    cfg = load_config("tiny", "demo/vae.py")
    vae = vae_lib.build(dict(cfg.vae))
    params = vae.init(jax.random.PRNGKey(0), *vae_lib.SPEC.dummy_inputs(vae))["params"]
    pixels = np.stack([shapes.render(shapes.sample_scene(0, i), resolution=32) for i in range(2)]) / 127.5 - 1.0
    loss = lambda p, noise: vae_loss(vae, p, pixels.astype(np.float32), jax.random.PRNGKey(1), 1e-5,
                                     train_encoder=False, latent_noise=noise)[0]
    assert float(loss(params, 0.0)) != float(loss(params, 1.0))
    grads = jax.grad(loss)(params, 1.0)
    assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads["encoder"]))
    assert any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads["decoder"]))
    # with the encoder trained, the encoder learns from the noisy reconstructions too
    both = lambda p: vae_loss(vae, p, pixels.astype(np.float32), jax.random.PRNGKey(1), 0.0, latent_noise=1.0)[0]
    assert any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(jax.grad(both)(params)["encoder"]))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from jaxlcd.demo.train_clip import train_clip

    workdir = tmp_path_factory.mktemp("clip")
    cfg = load_config("tiny", "demo/clip.py")
    cfg.hard_negatives = 2   # exercises the hard-negative path of the loss
    last = train_clip(cfg, str(workdir))
    assert np.isfinite(last["loss"])
    return str(workdir / "clip")


def test_clip_trainer_writes_a_transformers_clip_that_the_reward_registry_loads(tiny_clip_dir):
    import transformers

    from jaxlcd.rewards import load_reward

    model = transformers.CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(tiny_clip_dir)
    prompts = ["a small red circle on the left, blue background", "a large green star at the top, red background"]
    images = np.stack([shapes.render(shapes.sample_scene(0, i), resolution=32) for i in range(2)]) / 255.0
    ours = np.asarray(load_reward("clipscore", tiny_clip_dir)(images.astype(np.float32), prompts))
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).astype(np.float32))
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()   # images are already 32 px: no resize
    np.testing.assert_allclose(ours, cos, atol=2e-5)


def test_clip_trainer_continues_from_a_saved_clip_folder(tmp_path, tiny_clip_dir):
    import transformers

    from jaxlcd.demo.train_clip import train_clip

    cfg = load_config("tiny", "demo/clip.py")
    cfg.init_from, cfg.total_steps, cfg.optim.learning_rate = tiny_clip_dir, 1, 0.0   # one step at lr 0: params unchanged
    cfg.clip.projection_dim = 8   # ignored: the saved folder's config wins
    train_clip(cfg, str(tmp_path))
    before = transformers.CLIPModel.from_pretrained(tiny_clip_dir).state_dict()
    after = transformers.CLIPModel.from_pretrained(str(tmp_path / "clip")).state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


@pytest.mark.slow  # ~3 min: compiles the tiny UNet training step three times
def test_teacher_trainer_writes_a_pipeline_diffusers_samples_with_the_clip_text_tower(tmp_path, tiny_clip_dir):
    from jaxlcd.demo.train_teacher import train_teacher
    from jaxlcd.demo.train_vae import train_vae

    vae_cfg = load_config("tiny", "demo/vae.py")
    vae_cfg.total_steps = 2   # warmup 1 + one decay step (optax needs decay_steps > 0)
    train_vae(vae_cfg, str(tmp_path / "vae_run"))
    cfg = load_config("tiny", "demo/teacher.py")
    cfg.vae, cfg.clip = str(tmp_path / "vae_run" / "vae"), tiny_clip_dir
    assert np.isfinite(train_teacher(cfg, str(tmp_path / "teacher_run"))["loss"])

    import transformers

    teacher = str(tmp_path / "teacher_run" / "teacher")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None)
    images = pipe("a small red circle on the left, blue background", num_inference_steps=2, height=32, width=32,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    clip = transformers.CLIPModel.from_pretrained(tiny_clip_dir).eval()
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        np.testing.assert_allclose(pipe.text_encoder(ids).last_hidden_state.numpy(),
                                   clip.text_model(ids).last_hidden_state.numpy(), atol=1e-6)

    # a second run continues from the saved UNet (two steps at lr 0: the exported EMA UNet is the same, up to the
    # rounding of decay * x + (1 - decay) * x in float32, a few ulp) ...
    cfg.init_from, cfg.total_steps, cfg.optim.learning_rate = teacher, 2, 0.0
    train_teacher(cfg, str(tmp_path / "continued"))
    again = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "continued" / "teacher" / "unet"))
    for (name, a), b in zip(pipe.unet.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    # ... and refuses a UNet of another shape
    from jaxlcd.models import unet as unet_lib
    from jaxlcd.demo.train_teacher import initial_unet_params

    with pytest.raises(ValueError, match="config.init_from"):
        initial_unet_params(teacher, unet_lib.build(dict(cfg.unet, block_out_channels=(32, 32))))

    # trained jointly, the text encoder saved with the teacher moves away from the CLIP's text tower
    cfg.init_from, cfg.total_steps, cfg.optim.learning_rate, cfg.train_text_encoder = "", 2, 1e-2, True
    train_teacher(cfg, str(tmp_path / "joint"))
    joint = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "joint" / "teacher" / "text_encoder")).eval()
    with torch.no_grad():
        moved = joint(ids).last_hidden_state - clip.text_model(ids).last_hidden_state
    assert float(moved.abs().max()) > 1e-3


def test_array_batches_resume_where_they_stopped():
    from jaxlcd.training.batches import ArrayBatches

    data = {"x": np.arange(10)}
    a = ArrayBatches(data, 4, seed=3)
    first = [next(a)["x"] for _ in range(3)]
    b = ArrayBatches(data, 4, seed=3)
    b.set_state(json.loads(ArrayBatches(data, 4, seed=3).get_state()))
    assert [next(b)["x"].tolist() for _ in range(3)] == [f.tolist() for f in first]
    c = ArrayBatches(data, 4, seed=3)
    next(c)
    state = c.get_state()
    d = ArrayBatches(data, 4, seed=3)
    d.set_state(state)
    assert next(d)["x"].tolist() == first[1].tolist() and next(d)["x"].tolist() == first[2].tolist()
    assert sorted(np.concatenate(first[:2]).tolist()) == sorted(set(np.concatenate(first[:2]).tolist()))


def test_min_snr_weight_matches_the_diffusers_training_recipe():
    import jax.numpy as jnp
    from diffusers.training_utils import compute_snr
    from jaxlcd.demo.train_teacher import min_snr_weight

    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 100, 400, 999])
    snr = compute_snr(scheduler, t)
    abar = jnp.asarray(scheduler.alphas_cumprod[t].numpy())
    for prediction_type, denominator in (("epsilon", snr), ("v_prediction", snr + 1)):
        expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / denominator
        np.testing.assert_allclose(min_snr_weight(abar, 5.0, prediction_type), expected.numpy(), rtol=1e-5)
    assert np.all(np.asarray(min_snr_weight(abar, 0.0, "epsilon")) == 1.0)


def test_teacher_ema_follows_the_diffusers_ema_model_warmup():
    from diffusers.training_utils import EMAModel
    from jaxlcd.demo.train_teacher import ema_decay_at

    weight = torch.nn.Parameter(torch.zeros(3))
    ema_model, ema = EMAModel([weight], decay=0.999), np.full(3, 7.0)  # our EMA starts from an unrelated value
    for step in range(40):
        with torch.no_grad():
            weight.copy_(torch.randn(3))
        ema_model.step([weight])
        decay = float(ema_decay_at(step, 0.999))
        ema = decay * ema + (1.0 - decay) * weight.detach().numpy()
        np.testing.assert_allclose(ema, ema_model.shadow_params[0].numpy(), rtol=1e-5, atol=1e-6)
    assert float(ema_decay_at(100_000, 0.999)) == np.float32(0.999)


def test_sample_timesteps_puts_the_focus_share_at_high_noise():
    import jax
    from jaxlcd.demo.train_teacher import sample_timesteps

    t = np.asarray(sample_timesteps(jax.random.PRNGKey(0), 100_000, 1000, focus_min=800, focus_fraction=0.5))
    assert t.min() >= 0 and t.max() <= 999 and (t < 800).any()
    assert np.mean(t >= 800) == pytest.approx(0.5 + 0.5 * 0.2, abs=0.01)  # the focus half plus uniform's own 20 %
    t = np.asarray(sample_timesteps(jax.random.PRNGKey(1), 1000, 1000, focus_min=800, focus_fraction=1.0))
    assert t.min() >= 800


def test_teacher_optimizer_scales_the_text_encoder_learning_rate():
    import jax.numpy as jnp
    from jaxlcd.demo.train_teacher import teacher_optimizer

    cfg = load_config("tiny", "demo/teacher.py")
    cfg.train_text_encoder, cfg.text_lr_scale, cfg.optim.warmup_steps = True, 10.0, 0
    params = {"unet": {"w": jnp.ones(3)}, "text": {"w": jnp.ones(3)}}
    grads = {"unet": {"w": jnp.full(3, 1e-3)}, "text": {"w": jnp.full(3, 1e-3)}}  # below the clipping norm
    tx = teacher_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["text"]["w"], 10.0 * updates["unet"]["w"], rtol=1e-6)
    assert float(updates["unet"]["w"][0]) == pytest.approx(-cfg.optim.learning_rate, rel=1e-3)  # Adam's first step: -lr
    cfg.text_lr_scale = 1.0
    tx = teacher_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["text"]["w"], updates["unet"]["w"])


def test_edge_error_prefers_a_sharp_edge_to_a_blurred_one():
    from jaxlcd.demo.train_vae import edge_error

    step = np.zeros((1, 8, 8, 1), np.float32)
    step[:, :, 4:] = 1.0
    blurred = step.copy()
    blurred[:, :, 3], blurred[:, :, 4] = 0.25, 0.75
    assert float(edge_error(step, step)) == 0.0
    mse = lambda a: float(np.mean((a - step) ** 2))
    assert float(edge_error(blurred, step)) > 4 * mse(blurred)   # the gradient term sees the blur more than the MSE



def test_hard_negative_loss_adds_the_negatives_to_the_image_to_text_softmax_only():
    from jaxlcd.demo.train_clip import hard_negative_loss

    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    img, txt, neg = unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(3, 2, 8)))
    loss, _ = hard_negative_loss(img, txt, neg, 10.0)
    i2t = 10.0 * np.concatenate([img @ txt.T, np.einsum("bp,bkp->bk", img, neg)], 1)
    t2i = 10.0 * txt @ img.T
    ce = lambda lg: np.mean(np.log(np.exp(lg).sum(1)) - np.diag(lg))
    np.testing.assert_allclose(float(loss), (ce(i2t) + ce(t2i)) / 2, rtol=1e-5)
