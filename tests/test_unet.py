"""UNet2DConditionModel port: forward parity with diffusers, weights round trip, bad configs."""
import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from jaxlcd.models.config import ConfigError
from jaxlcd.weights import WeightsError, load_component, save_component
from conftest import nchw_to_nhwc, perturb_, rel_err

FP32_TOL = 1e-5   # relative L2 error vs diffusers in float32
BF16_TOL = 3e-2   # bf16 compute (params bf16-rounded in each matmul/conv) vs diffusers float32

SD1_LIKE = dict(  # conv proj_in/out, int head count
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
SD2_LIKE = dict(  # linear proj, per-block head list, upcast attention
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
    attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True, norm_num_groups=16,
    flip_sin_to_cos=True, freq_shift=0)
LCM_STUDENT = dict(SD1_LIKE, time_cond_proj_dim=32, transformer_layers_per_block=2)


def make_unet_dir(tmp_path, cfg, seed=0):
    torch.manual_seed(seed)
    model = perturb_(diffusers.UNet2DConditionModel(**cfg), seed=seed)
    path = os.path.join(tmp_path, "unet")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def unet_dirs(tmp_path_factory):
    """One saved random diffusers UNet per config, shared by the tests of this module."""
    return {name: make_unet_dir(tmp_path_factory.mktemp(name), cfg)
            for name, cfg in [("sd1", SD1_LIKE), ("sd2", SD2_LIKE), ("lcm", LCM_STUDENT)]}


def edited_copy(src, dst, **changes):
    """A copy of a model dir whose config.json has ``changes`` applied."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def torch_inputs(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], 16, 16, generator=g)
    t = torch.tensor([10, 900][:batch])
    ctx = torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g)
    cond = torch.randn(batch, cfg["time_cond_proj_dim"], generator=g) if cfg.get("time_cond_proj_dim") else None
    return x, t, ctx, cond


def run_both(model, path, cfg, dtype=jnp.float32, use_cond=True):
    x, t, ctx, cond = torch_inputs(cfg)
    cond = cond if use_cond else None
    with torch.no_grad():
        ref = model(x, t, ctx, timestep_cond=cond).sample
    unet, params = load_component(path, dtype=dtype)
    out = jax.jit(unet.apply)({"params": params}, nchw_to_nhwc(x), t.numpy(), ctx.numpy(),
                              timestep_cond=None if cond is None else cond.numpy())
    return np.asarray(out, np.float32), nchw_to_nhwc(ref)


@pytest.mark.parametrize("name,cfg", [("sd1", SD1_LIKE), ("sd2", SD2_LIKE), ("lcm", LCM_STUDENT)])
def test_fp32_parity(unet_dirs, name, cfg):
    out, ref = run_both(*unet_dirs[name], cfg)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= FP32_TOL


def test_bf16_parity(unet_dirs):
    out, ref = run_both(*unet_dirs["sd2"], SD2_LIKE, dtype=jnp.bfloat16)
    err = rel_err(out, ref)
    assert 1e-5 < err <= BF16_TOL  # bf16 really was used, and stays close


def test_lcm_without_cond_matches_and_cond_proj_has_no_bias(unet_dirs):
    model, path = unet_dirs["lcm"]
    with_cond, ref = run_both(model, path, LCM_STUDENT, use_cond=True)
    without, ref_without = run_both(model, path, LCM_STUDENT, use_cond=False)
    assert rel_err(without, ref_without) <= FP32_TOL
    assert rel_err(with_cond, without) > 1e-3  # the guidance embedding changes the output
    _, params = load_component(path)
    assert params["time_embedding"]["cond_proj"]["kernel"].shape == (32, 32)
    assert set(params["time_embedding"]["cond_proj"]) == {"kernel"}


def test_round_trip_bit_exact_and_diffusers_loads_export(tmp_path, unet_dirs):
    model, path = unet_dirs["sd2"]
    unet, params = load_component(path)
    out_dir = os.path.join(tmp_path, "export")
    save_component(unet, params, out_dir)
    orig = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    back = load_file(os.path.join(out_dir, "diffusion_pytorch_model.safetensors"))
    assert set(orig) == set(back)
    for k in orig:
        assert orig[k].dtype == back[k].dtype and np.array_equal(orig[k], back[k]), k
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(out_dir).eval()
    x, t, ctx, _ = torch_inputs(SD2_LIKE)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, ctx).sample, model(x, t, ctx).sample)
    with open(os.path.join(out_dir, "config.json")) as f:
        assert json.load(f)["attention_head_dim"] == [2, 4, 8]


def test_fp16_variant_and_fp16_export(tmp_path):
    model, path = make_unet_dir(tmp_path, SD1_LIKE)
    model.half().save_pretrained(path, variant="fp16")
    os.remove(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    unet, params = load_component(path, variant="fp16")
    assert params["conv_in"]["kernel"].dtype == jnp.float32
    save_component(unet, params, os.path.join(tmp_path, "half"), dtype=np.float16)
    back = load_file(os.path.join(tmp_path, "half", "diffusion_pytorch_model.safetensors"))
    orig = load_file(os.path.join(path, "diffusion_pytorch_model.fp16.safetensors"))
    assert all(np.array_equal(orig[k], back[k]) and back[k].dtype == np.float16 for k in orig)


def test_sharded_checkpoint_loads(tmp_path, unet_dirs):
    model, path = unet_dirs["sd1"]
    sharded = os.path.join(tmp_path, "sharded")
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.exists(os.path.join(sharded, "diffusion_pytorch_model.safetensors.index.json"))
    _, a = load_component(path)
    _, b = load_component(sharded)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: bool(jnp.array_equal(u, v)), a, b))


def test_unknown_block_type_names_the_key(tmp_path, unet_dirs):
    types = list(SD1_LIKE["down_block_types"])
    types[1] = "SimpleCrossAttnDownBlock2D"
    path = edited_copy(unet_dirs["sd1"][1], tmp_path / "bad", down_block_types=types)
    with pytest.raises(ConfigError, match=r"down_block_types\[1\]='SimpleCrossAttnDownBlock2D'"):
        load_component(path)


def test_unsupported_feature_names_the_key(tmp_path, unet_dirs):
    path = edited_copy(unet_dirs["sd1"][1], tmp_path / "bad", class_embed_type="timestep")
    with pytest.raises(ConfigError, match="class_embed_type='timestep'"):
        load_component(path)


def test_shape_mismatch_names_the_tensor(tmp_path, unet_dirs):
    path = edited_copy(unet_dirs["sd1"][1], tmp_path / "bad", cross_attention_dim=16)
    with pytest.raises(WeightsError, match=r"attn2\.to_k\.weight' has shape \(32, 24\), but the config implies \(32, 16\)"):
        load_component(path)


SDXL_LIKE = dict(  # SD-XL's layout: no attention in the first block, per-block transformer depth, text_time embedding
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
    use_linear_projection=True, norm_num_groups=16, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8)


@pytest.mark.parametrize("w_dim", [None, 16])
def test_sdxl_text_time_unet_matches_diffusers(tmp_path, w_dim):
    """addition_embed_type="text_time": added_cond_kwargs {"text_embeds" [B, 16], "time_ids" [B, 6]} (original size,
    crop top-left, target size), with and without the LCM guidance embedding."""
    cfg = dict(SDXL_LIKE, time_cond_proj_dim=w_dim)
    model, path = make_unet_dir(tmp_path, cfg, seed=3)
    x, t, ctx, cond = torch_inputs(cfg)
    g = torch.Generator().manual_seed(4)
    added = {"text_embeds": torch.randn(2, 16, generator=g),
             "time_ids": torch.tensor([[512.0, 512, 0, 0, 512, 512], [768, 1024, 16, 32, 512, 512]])}
    with torch.no_grad():
        ref = model(x, t, ctx, timestep_cond=cond, added_cond_kwargs=added).sample
    module, params = load_component(path)
    ours = module.apply({"params": params}, nchw_to_nhwc(x), t.numpy(), ctx.numpy(),
                        None if cond is None else cond.numpy(), {k: v.numpy() for k, v in added.items()})
    assert rel_err(ours, nchw_to_nhwc(ref)) <= FP32_TOL
    other = dict(added, time_ids=added["time_ids"] * 0.5)   # the micro-conditioning reaches the output
    moved = module.apply({"params": params}, nchw_to_nhwc(x), t.numpy(), ctx.numpy(),
                         None if cond is None else cond.numpy(), {k: v.numpy() for k, v in other.items()})
    assert rel_err(moved, ours) > 1e-3
    with pytest.raises(ValueError, match="needs added_cond_kwargs"):
        module.apply({"params": params}, nchw_to_nhwc(x), t.numpy(), ctx.numpy(), None if cond is None else
                     cond.numpy())
