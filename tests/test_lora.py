"""LCM-LoRA: adapter layers and LoRA files against PEFT/diffusers, the LoRA distillation run, its export and sampling."""
import json
import os

import diffusers
import diffusers.schedulers.scheduling_lcm as scheduling_lcm
import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file, save_file

from conftest import load_config, nchw_to_nhwc, nhwc_to_nchw, perturb_, rel_err
from jaxlcd import parallel, pipeline, sample
from jaxlcd.distill import job, setup
from jaxlcd.errors import InputError
from jaxlcd.export import main as export_main
from jaxlcd.loaders.lora_file import load_lora, save_lora
from jaxlcd.models import lora
from jaxlcd.training import checkpoint
from jaxlcd.weights import WeightsError, load_component
from tiny_pipeline import TINY_UNET
from tiny_run import make_inputs, tiny_config

UNET_TOL = 1e-5      # relative L2, UNet outputs (float32)
IMAGE_TOL = 2e-3     # mean absolute difference of [0, 1] images, jaxlcd vs diffusers
RANK, ALPHA = 4, 8.0


# ------------------------------------------------------------------ layers and files on a tiny diffusers UNet
@pytest.fixture(scope="module")
def peft_unet(tmp_path_factory):
    """A tiny diffusers UNet with PEFT adapters (diffusers' LCM-LoRA targets, random B) saved by diffusers'
    ``save_lora_weights``, its base as a jaxlcd module, and fixed inputs."""
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**TINY_UNET))
    unet.save_pretrained(root / "base")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lora.DIFFUSERS_TARGETS))
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    diffusers.StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(unet),
                                                        unet_lora_adapter_metadata=config.to_dict())
    module, params = load_component(str(root / "base"))
    inputs = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g))
    return {"root": root, "unet": unet.eval(), "module": module, "params": params, "inputs": inputs}


def _ours(peft_unet, variables):
    z, t, ctx = peft_unet["inputs"]
    return peft_unet["module"].apply(variables, nchw_to_nhwc(z), t.numpy(), ctx.numpy())


def _theirs(unet, inputs):
    with torch.no_grad():
        return nchw_to_nhwc(unet(*inputs).sample)


def _fresh_diffusers_unet(peft_unet, lora_path):
    """The base UNet with ``lora_path`` loaded the way StableDiffusionPipeline.load_lora_weights does."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(peft_unet["root"] / "base")
    state, alphas, meta = diffusers.StableDiffusionPipeline.lora_state_dict(str(lora_path), return_lora_metadata=True)
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=meta)
    return unet.eval()


def test_a_diffusers_lora_file_loads_with_the_same_outputs(peft_unet):
    adapters = load_lora(str(peft_unet["root"] / "lora"), peft_unet["params"])
    peft_layers = {k.split(".lora_")[0] for k in get_peft_model_state_dict(peft_unet["unet"])}
    assert len(traverse_util.flatten_dict(adapters)) == 2 * len(peft_layers)   # every adapted layer, a and b
    ours, ref = _ours(peft_unet, lora.variables(peft_unet["params"], adapters)), _theirs(peft_unet["unet"],
                                                                                          peft_unet["inputs"])
    assert rel_err(ours, ref) <= UNET_TOL
    assert rel_err(_ours(peft_unet, {"params": peft_unet["params"]}), ref) > 0.1   # the adapters matter here


@pytest.mark.parametrize("form", ["kohya", "diffusers_old"])
def test_other_key_forms_load_as_diffusers_converts_them(peft_unet, tmp_path, form):
    """The hub's LCM-LoRA files use kohya keys (lora_unet_..., lora_down/lora_up, alpha), older diffusers files
    unet.<module>.lora.down/lora.up: renamed from the PEFT file, diffusers' own conversion is the reference."""
    peft = load_file(str(peft_unet["root"] / "lora" / "pytorch_lora_weights.safetensors"))
    renamed = {}
    for key, value in peft.items():
        name, part = key[len("unet."):].split(".lora_")
        down = part.startswith("A")
        if form == "kohya":
            flat = "lora_unet_" + name.replace(".", "_")
            renamed[f"{flat}.{'lora_down' if down else 'lora_up'}.weight"] = value
            renamed[f"{flat}.alpha"] = np.asarray(ALPHA / 2, np.float32)   # another scale than the PEFT file's
        else:
            renamed[f"unet.{name}.lora.{'down' if down else 'up'}.weight"] = value
    path = tmp_path / f"{form}.safetensors"
    save_file(renamed, str(path))
    ref = _theirs(_fresh_diffusers_unet(peft_unet, path), peft_unet["inputs"])
    ours = _ours(peft_unet, lora.variables(peft_unet["params"], load_lora(str(path), peft_unet["params"])))
    assert rel_err(ours, ref) <= UNET_TOL


def test_a_written_file_loads_in_diffusers_and_merging_equals_the_adapters(peft_unet, tmp_path):
    params = peft_unet["params"]
    adapters = lora.init_adapters(params, lora.DIFFUSERS_TARGETS, RANK, jax.random.PRNGKey(0))
    assert rel_err(_ours(peft_unet, lora.variables(params, adapters, 2.0)),
                   _ours(peft_unet, {"params": params})) == 0   # b starts at zero: the student starts as the base
    noise = traverse_util.unflatten_dict({k: 0.1 * np.random.default_rng(len(k)).standard_normal(v.shape)
                                          for k, v in traverse_util.flatten_dict(adapters).items()})
    adapters = jax.tree_util.tree_map(lambda a, n: a + n.astype(np.float32), adapters, noise)
    save_lora(str(tmp_path / "ours"), adapters, RANK, ALPHA)
    ours = _ours(peft_unet, lora.variables(params, adapters, ALPHA / RANK))
    assert rel_err(ours, _theirs(_fresh_diffusers_unet(peft_unet, tmp_path / "ours"), peft_unet["inputs"])) <= UNET_TOL
    merged = lora.merge(params, adapters, ALPHA / RANK)
    assert rel_err(_ours(peft_unet, {"params": merged}), ours) <= UNET_TOL
    reloaded = load_lora(str(tmp_path / "ours"), params)   # the scale folded into b
    assert rel_err(_ours(peft_unet, lora.variables(params, reloaded)), ours) <= 1e-6


def test_bad_targets_and_lora_files_are_one_sentence(peft_unet, tmp_path):
    params = peft_unet["params"]
    with pytest.raises(InputError, match=r"lora.targets \['to_qq'\] match no linear or convolution layer"):
        lora.init_adapters(params, ("to_q", "to_qq"), RANK, jax.random.PRNGKey(0))
    good = load_file(str(peft_unet["root"] / "lora" / "pytorch_lora_weights.safetensors"))
    key_a = next(k for k in good if k.endswith("attn1.to_q.lora_A.weight"))
    cases = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": "jaxlcd loads UNet LoRAs only",
        "unet.down_blocks.7.resnets.0.conv1.lora_A.weight": "a layer this UNet does not have",
    }
    for extra_key, message in cases.items():
        save_file({**good, extra_key: good[key_a]}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(WeightsError, match=message):
            load_lora(str(tmp_path / "bad.safetensors"), params)
    save_file({k: v for k, v in good.items() if k != key_a}, str(tmp_path / "half.safetensors"))
    with pytest.raises(WeightsError, match="has only one of its two matrices"):
        load_lora(str(tmp_path / "half.safetensors"), params)
    save_file({**good, key_a: np.zeros((RANK, 3), np.float32)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(WeightsError, match="do not fit the layer's kernel"):
        load_lora(str(tmp_path / "shape.safetensors"), params)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_lora_weights.bin").write_bytes(b"not read")
    with pytest.raises(WeightsError, match="pickle checkpoint"):
        load_lora(str(tmp_path / "pickle"), params)


# ------------------------------------------------------------------ the LoRA distillation run
STEPS = 4


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """tiny,lora with the direct reward term (a tiny random CLIP) on the 8 test devices: 4 steps at a learning rate
    that moves the adapters enough to see in the images; checkpoints at 2 and 4, a 1-step grid and the LoRA export
    at 4."""
    inputs = make_inputs(tmp_path_factory.mktemp("lora_inputs"))
    cfg = load_config("tiny,lora,rm")
    base = tiny_config(inputs)
    for key in ("teacher", "data_dir", "total_steps", "checkpoint_every", "log_every", "per_device_batch"):
        cfg[key] = base[key]
    cfg.evals.grids.steps = (1,)   # the grid evaluator samples the LoRA student too
    cfg.optim.learning_rate = 1e-2
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    job.train(cfg, workdir)
    return {"inputs": inputs, "cfg": cfg, "workdir": workdir, "teacher": inputs[0],
            "lora": os.path.join(workdir, "export", "lora")}


def test_lora_run_trains_only_the_adapters(lora_run):
    cfg, workdir = lora_run["cfg"], lora_run["workdir"]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["reward"]) for r in records if "loss" in r)
    assert os.path.isfile(os.path.join(workdir, "samples", "final_lcm1.png"))
    run = setup.build_run(cfg, lora_run["teacher"], parallel.make_mesh(dict(cfg.mesh)))
    trained, _ = checkpoint.Checkpointer(workdir).restore(STEPS, checkpoint.abstract_like(run.state,
                                                                                          run.state_shardings))
    adapters = traverse_util.flatten_dict(jax.device_get(trained.params))
    assert adapters and {k[-1] for k in adapters} == {"a", "b"}   # the state holds adapters, no UNet weight
    shapes = sorted(v.shape for v in adapters.values())
    moments = sorted(x.shape for x in jax.tree_util.tree_leaves(trained.opt_state) if np.ndim(x) > 0)
    assert moments == sorted(shapes * 2)   # Adam's mu and nu for the adapters alone
    assert max(np.abs(v).max() for k, v in adapters.items() if k[-1] == "b") > 1e-3   # b moved from zero
    # the base is the teacher's, untouched: a fused export differs from it exactly by scale * (a b) on adapted layers
    fused = os.path.join(workdir, "fused")
    assert export_main(["--workdir", workdir, "--out", fused, "--fuse"]) == 0
    _, teacher_params = load_component(os.path.join(lora_run["teacher"], "unet"))
    _, fused_params = load_component(os.path.join(fused, "unet"))
    want = traverse_util.flatten_dict(lora.merge(teacher_params, jax.device_get(trained.params),
                                                 cfg.lora.alpha / cfg.lora.rank))
    got, base = traverse_util.flatten_dict(fused_params), traverse_util.flatten_dict(teacher_params)
    adapted = {k[:-1] + ("kernel",) for k in adapters}
    for key, value in got.items():
        if key in adapted:
            np.testing.assert_allclose(value, want[key], rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(value, base[key])   # bit-identical


def _diffusers_lcm(lora_run, lora_dir=None, folder=None):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder or lora_run["teacher"], safety_checker=None,
                                                             requires_safety_checker=False)
    if folder is None:
        pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    if lora_dir:
        pipe.load_lora_weights(lora_dir)
    return pipe


PROMPTS = ["a red circle on a blue background", "a green square"]


def _lcm_images(monkeypatch, pipe, steps, guidance, latents, noises):
    pending = [nhwc_to_nchw(n) for n in noises]
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: pending.pop(0))
    with torch.no_grad():
        images = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=nhwc_to_nchw(latents),
                      output_type="np").images
    assert not pending
    return images


@pytest.mark.parametrize("steps,guidance", [(1, 1.0), (4, 1.0), (4, 2.0)])
def test_exported_lora_samples_like_diffusers(lora_run, monkeypatch, steps, guidance):
    """diffusers: StableDiffusionPipeline(teacher) + LCMScheduler + load_lora_weights(export/lora); g <= 1 is one UNet
    pass per step, g > 1 classifier-free guidance."""
    rng = np.random.default_rng(steps)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    noises = rng.standard_normal((steps - 1, 2, 8, 8, 4)).astype(np.float32)
    ref = _lcm_images(monkeypatch, _diffusers_lcm(lora_run, lora_run["lora"]), steps, guidance, latents, noises)
    pipe = pipeline.load_pipeline(lora_run["teacher"], lora=lora_run["lora"])
    _, ours = pipeline.sample_lcm(pipe, PROMPTS, steps, guidance, latents=latents, noises=noises if steps > 1 else None)
    assert np.abs(np.asarray(ours) - ref).mean() <= IMAGE_TOL
    without = _lcm_images(monkeypatch, _diffusers_lcm(lora_run), steps, guidance, latents, noises)
    assert np.abs(without - ref).mean() > 10 * IMAGE_TOL   # the trained adapter changes the images


def test_fused_export_and_sample_cli_equal_the_adapter(lora_run, tmp_path):
    """jaxlcd.sample --lora and the fused export (a StableDiffusionPipeline folder with an LCMScheduler, which
    diffusers loads) give the same 1-step images."""
    fused = os.path.join(lora_run["workdir"], "fused")
    if not os.path.isdir(fused):
        assert export_main(["--workdir", lora_run["workdir"], "--out", fused, "--fuse"]) == 0
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", latents)
    common = ["--sampler", "lcm", "--steps", "1", "--latents", str(tmp_path / "z.npy"), "--save-array",
              *sum((["--prompt", p] for p in PROMPTS), [])]
    assert sample.main(["--model", lora_run["teacher"], "--lora", lora_run["lora"], "--out", str(tmp_path / "a"),
                        *common]) == 0
    assert sample.main(["--model", fused, "--out", str(tmp_path / "f"), *common]) == 0
    with_adapter, with_fused = np.load(tmp_path / "a" / "images.npy"), np.load(tmp_path / "f" / "images.npy")
    assert np.abs(with_adapter - with_fused).mean() <= IMAGE_TOL
    pipe = diffusers.DiffusionPipeline.from_pretrained(fused, safety_checker=None)
    assert isinstance(pipe, diffusers.StableDiffusionPipeline) and isinstance(pipe.scheduler, diffusers.LCMScheduler)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, latents=nhwc_to_nchw(latents),
                   output_type="np").images
    assert np.abs(with_fused - ref).mean() <= IMAGE_TOL


def test_resume_refuses_another_rank_and_export_refuses_fuse_of_a_full_run(lora_run, tmp_path, capsys):
    cfg = load_config("tiny,lora,rm")
    cfg.teacher, cfg.data_dir, cfg.lora.rank = lora_run["cfg"].teacher, lora_run["cfg"].data_dir, 8
    with pytest.raises(InputError, match="config.lora.rank cannot change when resuming"):
        setup.check_resume(cfg, lora_run["workdir"])
    full = tiny_config(lora_run["inputs"])
    checkpoint.save_config(str(tmp_path / "full"), full)
    assert export_main(["--workdir", str(tmp_path / "full"), "--out", str(tmp_path / "o"), "--fuse"]) == 2
    assert "--fuse merges LoRA adapters, but" in capsys.readouterr().err


@pytest.mark.parametrize("variant,lora_on,guidance", [
    ("tiny,lora", True, ""), ("sd21base,lora,hps", True, "hps"), ("sd15,hps,lora", True, "hps"), ("sd15", False, "")])
def test_lora_variants(variant, lora_on, guidance):
    cfg = load_config(variant)
    assert cfg.lora.enabled == lora_on and cfg.guidance == guidance
    if lora_on:
        assert cfg.lcd.w_embedding_dim == 0 and cfg.lcd.ema_decay == 0 and cfg.evals.grids.guidance == 1.0
    if variant.startswith("sd"):
        assert cfg.optim.learning_rate == (1e-4 if lora_on else 1e-6)
        assert (cfg.lora.rank, cfg.lora.alpha) == (64, 64.0)


@pytest.mark.parametrize("variant,message", [("demo,lora", "the demo variants distil the full student"),
                                             ("sd15,hps,pickscore", "one guidance suffix at most")])
def test_bad_lora_variants(variant, message):
    with pytest.raises(InputError, match=message):
        load_config(variant)


@pytest.mark.parametrize("overrides,message", [
    ({"lcd.w_embedding_dim": 256}, "a LoRA student takes no guidance embedding"),
    ({"lora.rank": 0}, "lora.rank=0 and lora.alpha=4.0 must be positive"),
    ({"lora.targets": ()}, "must be a non-empty tuple of module names"),
])
def test_bad_lora_config_is_one_sentence(lora_run, overrides, message):
    cfg = load_config("tiny,lora")
    cfg.teacher, cfg.data_dir = lora_run["inputs"]
    for key, value in overrides.items():
        section, leaf = key.split(".")
        cfg[section][leaf] = value
    with pytest.raises(setup.ConfigValueError, match=message):
        setup.validate_config(cfg, 1)


def test_eval_lora_rows_are_the_adapter_samples(lora_run, tmp_path):
    """jaxlcd.eval --model BASE --lora LORA: one row per step count, g = 1 by default, images equal to
    load_pipeline(BASE, lora=LORA) sampling from the documented latents (PNG rounding aside)."""
    from jaxlcd.eval import main as eval_main
    from jaxlcd.metrics import generate

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "eval"
    assert eval_main(["--model", lora_run["teacher"], "--lora", lora_run["lora"], "--steps", "1",
                      "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--batch-size", "2"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["name"], r["guidance"], r["lora"]) for r in rows] == [("teacher+lora lcm1", 1.0, lora_run["lora"])]
    pipe = pipeline.load_pipeline(lora_run["teacher"], lora=lora_run["lora"])
    latents = generate._latents(0, [0, 1], pipe.latent_shape)
    _, want = pipeline.sample_lcm(pipe, PROMPTS, 1, 1.0, latents=latents)
    row = generate.Row(rows[0]["name"], rows[0]["path"], "lcm", 1, 1.0, rows[0]["model"], rows[0]["lora"])
    got = generate.load_images(str(out), row, 2).astype(np.float32) / 255
    assert np.abs(got - np.asarray(want)).max() <= 1 / 255 + 1e-6
