"""Parity of the Flax CLIPTextModel with transformers on tiny random models, and weights I/O.

Tolerances are relative L2 errors ||ours - ref|| / ||ref|| against transformers in float32.
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
from transformers import CLIPTextConfig as HFConfig
from transformers import CLIPTextModel as HFModel
from transformers import CLIPTextModelWithProjection

from jaxlcd.models import clip_text
from jaxlcd.models.config import ConfigError
from jaxlcd.weights import WeightsError, load_component, save_component, tables

FP32_RTOL = 1e-5   # float32 compute vs transformers float32
BF16_RTOL = 2e-2   # bfloat16 compute (fp32 params, fp32 norms/softmax) vs transformers float32; measured ~7.5e-3
VOCAB, BOS, EOS = 1000, 998, 999


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _make_hf(directory, hidden_act="quick_gelu", layers=2, eos_token_id=EOS, seed=0, cls=HFModel):
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=layers,
                   num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
                   bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=1, projection_dim=16)
    model = cls(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm params so the norms are really tested
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return model


def _ids(seed=0, batch=3, length=77):
    """SD-1.x-style ids: BOS, random tokens, EOS, EOS padding (EOS at different positions)."""
    rng = np.random.RandomState(seed)
    ids = np.full((batch, length), EOS, np.int32)
    for b, n in enumerate(rng.randint(1, length - 1, batch)):
        ids[b, 0] = BOS
        ids[b, 1:n] = rng.randint(3, 900, n - 1)
    return ids


def _apply(module, params, ids, **kw):
    """module.apply under jit (much faster than op-by-op dispatch on CPU)."""
    return jax.jit(lambda p, i: module.apply({"params": p}, i, **kw))(params, jnp.asarray(ids))


def _hf_out(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_quick_gelu")
    return d, _make_hf(d)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_new"])
def test_fp32_parity_last_penultimate_pooled(tmp_path, act):
    hf = _make_hf(tmp_path, hidden_act=act, seed=1)
    module, params = load_component(str(tmp_path))
    ids = _ids(seed=2)
    last, pen = _apply(module, params, ids, output_penultimate=True)
    ref = _hf_out(hf, ids)
    assert last.shape == (3, 77, 32) and last.dtype == jnp.float32
    assert _rel(last, ref.last_hidden_state) <= FP32_RTOL
    assert _rel(pen, ref.hidden_states[-2]) <= FP32_RTOL
    pooled = clip_text.pooled_output(last, ids, module.config.eos_token_id)
    assert _rel(pooled, ref.pooler_output) <= FP32_RTOL
    # clip skip: final_norm(penultimate) is what users condition on
    skip = _apply(module, params, pen, method=module.final_norm)
    with torch.no_grad():
        ref_skip = hf.final_layer_norm(ref.hidden_states[-2])
    assert _rel(skip, ref_skip) <= FP32_RTOL


def test_legacy_eos_token_id_2_pools_at_argmax(tmp_path):
    hf = _make_hf(tmp_path, eos_token_id=2)
    module, params = load_component(str(tmp_path))
    ids = _ids(seed=3)
    ids[ids == EOS] = 0
    ids[np.arange(3), [5, 30, 76]] = EOS  # the largest id marks the EOS position
    last = _apply(module, params, ids)
    ref = _hf_out(hf, ids)
    pooled = clip_text.pooled_output(last, ids, 2)
    assert _rel(pooled, ref.pooler_output) <= FP32_RTOL
    np.testing.assert_array_equal(pooled, np.asarray(last)[np.arange(3), [5, 30, 76]])


def test_bf16_compute_parity(hf_dir):
    d, hf = hf_dir
    module, params = load_component(str(d), dtype=jnp.bfloat16)
    ids = _ids(seed=4)
    last, pen = _apply(module, params, ids, output_penultimate=True)
    assert last.dtype == jnp.bfloat16 and params["text_model"]["final_layer_norm"]["scale"].dtype == jnp.float32
    ref = _hf_out(hf, ids)
    assert _rel(last, ref.last_hidden_state) <= BF16_RTOL
    assert _rel(pen, ref.hidden_states[-2]) <= BF16_RTOL


def test_remat_grads_match_transformers(hf_dir):
    """Gradients through the rematerialised model equal torch autograd's (names via the table)."""
    d, hf = hf_dir
    module, params = load_component(str(d), remat=True)
    ids = _ids(seed=5, length=8)
    w = np.random.RandomState(0).randn(3, 8, 32).astype(np.float32)
    loss = lambda p: jnp.sum(module.apply({"params": p}, jnp.asarray(ids)) * w)
    grads = jax.jit(jax.grad(loss))(params)
    hf.zero_grad()
    (hf(torch.tensor(ids, dtype=torch.long)).last_hidden_state * torch.tensor(w)).sum().backward()
    table = tables.build_table(params)
    ours = {clip_text.file_key(k): v for k, v in tables.flax_to_pt(grads, table).items()}
    ref = {k: p.grad.numpy() for k, p in hf.named_parameters()}
    assert set(ours) == set(ref)
    for k in ref:
        if k.endswith("k_proj.bias"):  # softmax ignores it: the true gradient is 0 (float noise here)
            assert np.abs(ours[k]).max() < 1e-5 and np.abs(ref[k]).max() < 1e-5, k
        elif k != "embeddings.token_embedding.weight":  # sparse rows; checked below
            assert _rel(ours[k], ref[k]) <= 1e-4, k
    rows = np.unique(ids)
    assert _rel(ours["embeddings.token_embedding.weight"][rows], ref["embeddings.token_embedding.weight"][rows]) <= 1e-4


def test_save_component_round_trip_and_transformers_loads_it(hf_dir, tmp_path):
    d, hf = hf_dir
    module, params = load_component(str(d))
    save_component(module, params, str(tmp_path))
    original = load_file(os.path.join(d, "model.safetensors"))
    written = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert set(written) == set(original)  # the keys transformers itself writes (no text_model. prefix)
    for k, v in original.items():
        assert written[k].dtype == v.dtype and np.array_equal(written[k], v), k
    cfg = json.load(open(os.path.join(tmp_path, "config.json")))
    assert cfg["architectures"] == ["CLIPTextModel"] and cfg["model_type"] == "clip_text_model"
    reloaded, info = HFModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = _ids(seed=6)
    a, b = _hf_out(reloaded, ids), _hf_out(hf, ids)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    module2, params2 = load_component(str(tmp_path))
    assert module2.config == module.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_prefixed_keys_with_position_ids_load(hf_dir, tmp_path):
    """transformers 4.x files: ``text_model.*`` keys plus the ``position_ids`` buffer."""
    d, hf = hf_dir
    tensors = {"text_model." + k: v for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    shutil.copy(os.path.join(d, "config.json"), os.path.join(tmp_path, "config.json"))
    module, params = load_component(str(tmp_path))
    ids = _ids(seed=7)
    assert _rel(_apply(module, params, ids), _hf_out(hf, ids).last_hidden_state) <= FP32_RTOL


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"), "missing tensor 'text_model.encoder.layers.1.mlp.fc2.bias'"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)), "unexpected tensor 'text_model.extra'"),
    (lambda t: t.update({"encoder.layers.0.self_attn.q_proj.weight": np.zeros((32, 31), np.float32)}),
     "'text_model.encoder.layers.0.self_attn.q_proj.weight' has shape (32, 31)"),
])
def test_bad_tensors_are_named(hf_dir, tmp_path, edit, needle):
    d, _ = hf_dir
    tensors = load_file(os.path.join(d, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    shutil.copy(os.path.join(d, "config.json"), os.path.join(tmp_path, "config.json"))
    with pytest.raises(WeightsError) as e:
        load_component(str(tmp_path))
    assert needle in str(e.value)


def test_pickle_only_directory(hf_dir, tmp_path):
    d, hf = hf_dir
    torch.save(hf.state_dict(), os.path.join(tmp_path, "pytorch_model.bin"))
    shutil.copy(os.path.join(d, "config.json"), os.path.join(tmp_path, "config.json"))
    with pytest.raises(WeightsError, match="pickle"):
        load_component(str(tmp_path))
    module, params = load_component(str(tmp_path), allow_pickle=True)
    ids = _ids(seed=8)
    assert _rel(_apply(module, params, ids), _hf_out(hf, ids).last_hidden_state) <= FP32_RTOL


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_component(str(tmp_path / "nope"))
    with pytest.raises(WeightsError, match="config.json"):
        load_component(str(tmp_path))


def test_with_projection_parity_and_round_trip(tmp_path):
    """SD-XL's text_encoder_2: last and penultimate hidden states and the projected pooled output (text_embeds) vs
    transformers; saved back, transformers loads the same model."""
    hf = _make_hf(tmp_path / "hf", layers=2, cls=CLIPTextModelWithProjection)
    with torch.no_grad():
        hf.text_projection.weight.add_(0.1 * torch.randn_like(hf.text_projection.weight))
    hf.save_pretrained(str(tmp_path / "hf"))
    module, params = load_component(str(tmp_path / "hf"))
    assert isinstance(module, clip_text.CLIPTextModelWithProjection)
    ids = _ids(seed=5)
    last, embeds, penult = module.apply({"params": params}, jnp.asarray(ids), output_penultimate=True)
    ref = _hf_out(hf, ids)
    assert _rel(last, ref.last_hidden_state) <= FP32_RTOL and _rel(penult, ref.hidden_states[-2]) <= FP32_RTOL
    assert embeds.shape == (3, 16) and _rel(embeds, ref.text_embeds) <= FP32_RTOL
    save_component(module, params, str(tmp_path / "ours"))
    again = CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "ours")).eval()
    assert _rel(_hf_out(again, ids).text_embeds, ref.text_embeds) <= 1e-7


def test_config_validation_and_round_trip():
    src = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "gelu",
           "hidden_size": 64, "num_attention_heads": 4, "torch_dtype": "float32"}
    cfg = clip_text.CLIPTextConfig.from_dict(src)
    out = cfg.to_dict()
    assert out["torch_dtype"] == "float32" and out["hidden_act"] == "gelu" and out["vocab_size"] == 49408
    fresh = clip_text.CLIPTextConfig(hidden_size=64).to_dict()
    assert fresh["architectures"] == ["CLIPTextModel"] and fresh["model_type"] == "clip_text_model"
    with pytest.raises(ConfigError, match="hidden_act"):
        clip_text.CLIPTextConfig.from_dict(dict(src, hidden_act="relu"))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        clip_text.CLIPTextConfig.from_dict(dict(src, num_attention_heads=5))


def test_too_long_input_is_refused(hf_dir):
    module, params = load_component(str(hf_dir[0]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        module.apply({"params": params}, jnp.zeros((1, 78), jnp.int32))
