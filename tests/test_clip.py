"""Parity of the Flax CLIPModel with transformers ``CLIPModel`` and open_clip ``CLIP`` on tiny random
models, and its weights I/O (transformers folders, open_clip folders and bare files).

Tolerances are relative L2 errors ||ours - ref|| / ||ref|| against the PyTorch model in float32.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch
from transformers import CLIPConfig as HFConfig
from transformers import CLIPModel as HFModel

from open_clip_ref import open_clip  # open_clip without torchvision (see open_clip_ref)
from conftest import nchw_to_nhwc, perturb_, rel_err
from jaxlcd.models import clip
from jaxlcd.models.config import ConfigError
from jaxlcd.weights import WeightsError, load_component, save_component

FP32_RTOL = 1e-5   # float32 compute vs PyTorch float32
BF16_RTOL = 3e-2   # bfloat16 compute (fp32 params/LayerNorms/softmax/logits) vs PyTorch fp32; measured <= 1.2e-2
VOCAB, BOS, EOS, CTX = 1000, 998, 999, 16

SMALL = dict(text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
             vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8), projection_dim=16)
# Unequal tower widths, head_dim 8 vs 10, image 30 not divisible by patch 7, legacy eos_token_id 2 (argmax).
AWKWARD = dict(text=dict(hidden_size=24, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3,
                         eos_token_id=2),
               vision=dict(hidden_size=40, intermediate_size=45, num_hidden_layers=1, num_attention_heads=4,
                           image_size=30, patch_size=7), projection_dim=12)
LATENT = dict(text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4),
              vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          image_size=16, patch_size=4, num_channels=4), projection_dim=16)


def _make_hf(directory, spec=SMALL, act="quick_gelu", seed=0):
    torch.manual_seed(seed)
    text = dict(dict(vocab_size=VOCAB, max_position_embeddings=CTX, bos_token_id=BOS, eos_token_id=EOS,
                     pad_token_id=1, hidden_act=act), **spec["text"])
    cfg = HFConfig(text_config=text, vision_config=dict(hidden_act=act, **spec["vision"]),
                   projection_dim=spec["projection_dim"])
    model = perturb_(HFModel(cfg), seed=seed)
    model.save_pretrained(str(directory))
    return model


def _ids(seed=0, batch=3, pad=EOS):
    """BOS, random tokens, EOS (the largest id), then ``pad``; EOS at different positions."""
    rng = np.random.RandomState(seed)
    ids = np.full((batch, CTX), pad, np.int64)
    for b, n in enumerate([3, CTX - 1, 9][:batch]):
        ids[b, 0], ids[b, 1:n], ids[b, n] = BOS, rng.randint(3, 900, n - 1), EOS
    return ids


def _pixels(cfg, seed=0, batch=2):
    v = cfg.vision_config
    return torch.tensor(np.random.RandomState(seed).randn(batch, v.num_channels, v.image_size, v.image_size),
                        dtype=torch.float32)


def _ours(module, params, px, ids):
    """(image features, text features, logits_per_image, image embeds, text embeds) under jit."""
    out = jax.jit(lambda p, a, b: module.apply({"params": p}, a, b))(
        params, jnp.asarray(nchw_to_nhwc(px)), jnp.asarray(ids))
    return out.image_features, out.text_features, out.logits_per_image, out.image_embeds, out.text_embeds


def _hf_ref(model, px, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), pixel_values=px)
        return (model.get_image_features(pixel_values=px).pooler_output,
                model.get_text_features(input_ids=torch.tensor(ids)).pooler_output,
                out.logits_per_image, out.image_embeds, out.text_embeds)


def _errors(ours, ref):
    return [rel_err(a, b) for a, b in zip(ours, ref)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_small")
    return d, _make_hf(d)


@pytest.mark.parametrize("spec, act", [(SMALL, "quick_gelu"), (SMALL, "gelu"), (AWKWARD, "gelu")],
                         ids=["quick_gelu", "gelu", "awkward"])
def test_fp32_parity_with_transformers(tmp_path, spec, act):
    hf = _make_hf(tmp_path, spec, act, seed=1)
    module, params = load_component(str(tmp_path))
    assert isinstance(module, clip.CLIPModel)
    px, ids = _pixels(module.config, seed=2), _ids(seed=3)
    ours = _ours(module, params, px, ids)
    assert ours[0].shape == (2, spec["projection_dim"]) and ours[2].shape == (2, 3) and ours[2].dtype == jnp.float32
    errs = _errors(ours, _hf_ref(hf, px, ids))
    assert max(errs) <= FP32_RTOL, errs


def test_4_channel_vision_tower_with_remat(tmp_path):
    """A ViT over 4-channel 16x16 latents (patch 4): get_image_features alone, remat on."""
    hf = _make_hf(tmp_path, LATENT, seed=4)
    module, params = load_component(str(tmp_path), remat=True)
    px = _pixels(module.config, seed=5)
    ours = jax.jit(lambda p, a: module.apply({"params": p}, a, method=module.get_image_features))(
        params, jnp.asarray(nchw_to_nhwc(px)))
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=px).pooler_output
    assert ours.shape == (2, 16) and rel_err(ours, ref) <= FP32_RTOL, rel_err(ours, ref)


def test_bf16_compute(hf_dir):
    d, hf = hf_dir
    module, params = load_component(str(d), dtype=jnp.bfloat16)
    px, ids = _pixels(module.config, seed=4), _ids(seed=5)
    ours = _ours(module, params, px, ids)
    assert ours[0].dtype == jnp.bfloat16 and ours[2].dtype == jnp.float32
    assert params["logit_scale"].dtype == jnp.float32
    errs = _errors(ours, _hf_ref(hf, px, ids))
    assert max(errs) <= BF16_RTOL, errs


def test_save_component_round_trip_and_transformers_loads_it(hf_dir, tmp_path):
    d, hf = hf_dir
    module, params = load_component(str(d))
    save_component(module, params, str(tmp_path))
    original, written = (load_file(os.path.join(p, "model.safetensors")) for p in (d, tmp_path))
    assert set(written) == set(original)
    for k, v in original.items():
        assert written[k].dtype == v.dtype and np.array_equal(written[k], v), k
    cfg = json.load(open(os.path.join(tmp_path, "config.json")))
    assert cfg["architectures"] == ["CLIPModel"] and cfg["model_type"] == "clip"
    assert "architectures" not in cfg["text_config"] and cfg["vision_config"]["model_type"] == "clip_vision_model"
    reloaded, info = HFModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    px, ids = _pixels(module.config, seed=6), _ids(seed=7)
    for a, b in zip(_hf_ref(reloaded, px, ids), _hf_ref(hf, px, ids)):
        assert torch.equal(a, b)
    module2, params2 = load_component(str(tmp_path))
    assert module2.config == module.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_position_ids_buffers_are_dropped(hf_dir, tmp_path):
    """transformers 4.x files carry ``*.embeddings.position_ids`` buffers."""
    d, hf = hf_dir
    tensors = load_file(os.path.join(d, "model.safetensors"))
    tensors["text_model.embeddings.position_ids"] = np.arange(CTX, dtype=np.int64)[None]
    tensors["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    shutil.copy(os.path.join(d, "config.json"), os.path.join(tmp_path, "config.json"))
    module, params = load_component(str(tmp_path))
    ref = load_component(str(d))[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)


# ---------------------------------------------------------------------------------------------- open_clip

OC_CFG = dict(embed_dim=16,
              vision_cfg=dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32, mlp_ratio=1.5),
              text_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=32, heads=4, layers=2))


def _make_open_clip(directory, quick_gelu, seed=0):
    """A perturbed open_clip CLIP written as open_clip saves it for the hub; returns (model, model_cfg)."""
    torch.manual_seed(seed)
    model = perturb_(open_clip.CLIP(OC_CFG["embed_dim"], OC_CFG["vision_cfg"], OC_CFG["text_cfg"],
                                    quick_gelu=quick_gelu), seed=seed)
    model_cfg = dict(OC_CFG, quick_gelu=quick_gelu)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}, f)
    save_torch({k: v.contiguous() for k, v in model.state_dict().items()},
               os.path.join(directory, "open_clip_model.safetensors"))
    return model, model_cfg


def _oc_ref(model, px, ids):
    ids = torch.tensor(ids)
    with torch.no_grad():
        return (model.encode_image(px), model.encode_text(ids), model.get_logits(px, ids)[0],
                model.encode_image(px, normalize=True), model.encode_text(ids, normalize=True))


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_open_clip_parity(tmp_path, quick_gelu):
    model, model_cfg = _make_open_clip(tmp_path, quick_gelu, seed=10)
    module, params = clip.load_open_clip(str(tmp_path))
    assert module.config.text_pool == "argmax"
    px, ids = _pixels(module.config, seed=11), _ids(seed=12, pad=0)
    errs = _errors(_ours(module, params, px, ids), _oc_ref(model, px, ids))
    assert max(errs) <= FP32_RTOL, errs
    assert params["logit_scale"].shape == () and float(params["logit_scale"]) == model.logit_scale.item()
    # params -> open_clip keys: exactly the original state dict
    sd, ref = clip.open_clip_state_dict(params), model.state_dict()
    assert set(sd) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


def test_open_clip_bare_files_and_custom_text(tmp_path):
    """A bare state-dict file plus its model_cfg; CustomTextCLIP's ``text.``-prefixed keys give the same params."""
    model, model_cfg = _make_open_clip(tmp_path, quick_gelu=True)
    _, params = clip.load_open_clip(str(tmp_path))
    _, bare = clip.load_open_clip(str(tmp_path / "open_clip_model.safetensors"), {"model_cfg": model_cfg})
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, bare)
    sd = {k if k.startswith(("visual.", "logit_scale")) else "text." + k: v.numpy()
          for k, v in model.state_dict().items()}
    custom = open_clip.CustomTextCLIP(OC_CFG["embed_dim"], OC_CFG["vision_cfg"], OC_CFG["text_cfg"], quick_gelu=True)
    assert set(sd) == set(custom.state_dict())
    save_file(sd, str(tmp_path / "custom.safetensors"))
    _, custom_params = clip.load_open_clip(str(tmp_path / "custom.safetensors"), dict(model_cfg, custom_text=True))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, custom_params)


def test_open_clip_pickle_is_refused(tmp_path):
    model, model_cfg = _make_open_clip(tmp_path, quick_gelu=True)
    _, ref = clip.load_open_clip(str(tmp_path))
    os.remove(tmp_path / "open_clip_model.safetensors")
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    for path, cfg in ((tmp_path, None), (tmp_path / "open_clip_pytorch_model.bin", model_cfg)):
        with pytest.raises(WeightsError, match="pickle checkpoint, which can run arbitrary code"):
            clip.load_open_clip(str(path), cfg)
        _, params = clip.load_open_clip(str(path), cfg, allow_pickle=True)
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)


@pytest.mark.parametrize("where, key, value", [
    ("vision_cfg", "final_ln_after_pool", True), ("vision_cfg", "attentional_pool", True),
    ("vision_cfg", "pool_type", "avg"), ("vision_cfg", "no_ln_pre", True), ("vision_cfg", "ls_init_value", 0.1),
    ("text_cfg", "pool_type", "eos"), ("text_cfg", "embed_cls", True), ("text_cfg", "proj_bias", True),
    ("text_cfg", "no_causal_mask", True), (None, "init_logit_bias", -10.0),
])
def test_unsupported_open_clip_option_is_refused(tmp_path, where, key, value):
    cfg = json.loads(json.dumps(OC_CFG))
    (cfg[where] if where else cfg)[key] = value
    name = f"{where}.{key}" if where else key
    with pytest.raises(ConfigError) as e:
        clip.load_open_clip(str(tmp_path), cfg)  # refused before any weights are read
    assert str(e.value).startswith(f"open_clip model_cfg: {name}={value!r} is not supported by the Flax CLIP "
                                   "port; supported: ")


def test_open_clip_refusals_of_unknown_and_resnet_configs(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'text_cfg\.rope'"):
        clip.hf_config_from_open_clip(dict(OC_CFG, text_cfg=dict(OC_CFG["text_cfg"], rope=True)))
    with pytest.raises(ConfigError, match=r"vision_cfg.layers=\[3, 4, 6, 3\] \(a ModifiedResNet"):
        clip.hf_config_from_open_clip(dict(OC_CFG, vision_cfg=dict(OC_CFG["vision_cfg"], layers=[3, 4, 6, 3])))
    with pytest.raises(WeightsError, match="open_clip_config.json"):
        clip.load_open_clip(str(tmp_path))
