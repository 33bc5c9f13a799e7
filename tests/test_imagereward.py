"""Parity of the Flax ImageReward port (jaxlcd.models.blip) with a PyTorch reference, its tokenizer, and folder I/O.

The reference is tests/imagereward_ref.py (the image-reward package does not import under
transformers 5; see its docstring). Tiny random perturbed models; weights travel PyTorch ->
safetensors folder -> `load_imagereward`. Tolerances are relative L2 errors against PyTorch float32.
"""
import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from transformers import BertTokenizer

import imagereward_ref as ref
from conftest import nhwc_to_nchw, perturb_, rel_err
from jaxlcd.models import blip
from jaxlcd.models.config import ConfigError
from jaxlcd.weights import WeightsError, tables

FP32_RTOL = 1e-5   # float32 compute vs PyTorch float32
BF16_RTOL = 2e-2   # bfloat16 compute (fp32 params, LayerNorms, softmax, head) vs PyTorch float32; measured <= 5.6e-3
VISION = dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_ratio=4.0, eps=1e-6)
# As ImageReward's med_config.json (encoder_width 768 there too: BLIP overrides it with the ViT width).
MED = dict(architectures=["BertModel"], model_type="bert", vocab_size=30524, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=37, hidden_act="gelu", max_position_embeddings=40,
           layer_norm_eps=1e-12, encoder_width=768, add_cross_attention=True, pad_token_id=0, type_vocab_size=2,
           hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02)
PROMPTS = ["a photo of a cat", "A majestic castle on a hill at sunset, highly detailed, trending on artstation, "
           "8k, octane render, dramatic lighting, volumetric fog", ""]
CAT_IDS = [101, 1037, 6302, 1997, 1037, 4937, 102]   # bert-base-uncased: [CLS] a photo of a cat [SEP]


def _write_folder(directory, model, vision=VISION, med=MED):
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
              os.path.join(directory, "model.safetensors"))
    json.dump(med, open(os.path.join(directory, "med_config.json"), "w"))
    json.dump(vision, open(os.path.join(directory, "config.json"), "w"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch reference, folder, module, params, tokenizer, inputs) shared by the tests."""
    torch.manual_seed(0)
    model = perturb_(ref.ImageReward(VISION, MED), scale=0.05, seed=1)
    d = str(tmp_path_factory.mktemp("imagereward"))
    _write_folder(d, model)
    module, params, tok = blip.load_imagereward(d)
    ids, mask = blip.tokenize_imagereward(tok, PROMPTS)
    pixels = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
    return model, d, module, params, tok, (pixels, ids, mask)


def _forward(module, with_grad=False):
    """jit: (image embeds, BERT last hidden state, raw scores[, d sum(raw) / d pixels])."""
    def f(p, pixels, ids, mask):
        emb = blip.image_embeds(module, p, pixels)
        hidden = module.apply({"params": p}, ids, mask, emb, method=module.text_hidden)
        if not with_grad:
            return emb, hidden, blip.score(module, p, pixels, ids, mask)
        raw, vjp = jax.vjp(lambda x: blip.score(module, p, x, ids, mask), pixels)
        return emb, hidden, raw, vjp(jnp.ones_like(raw))[0]
    return jax.jit(f)


def _ref_forward(model, pixels, ids, mask):
    """The reference's (embeds, hidden, raw, reward, d sum(reward) / d pixels in NHWC)."""
    x = nhwc_to_nchw(pixels).requires_grad_(True)
    ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    reward = model.score_gard(ids, mask, x)[:, 0]
    reward.sum().backward()
    with torch.no_grad():
        out = model.blip.visual_encoder(x), model.text_hidden(ids, mask, x), model.score_raw(ids, mask, x), reward
    return out + (x.grad.numpy().transpose(0, 2, 3, 1),)


def test_fp32_parity_embeds_hidden_scores_and_pixel_grad(tiny):
    """Forward parity, and the reward-guidance gradient d reward / d pixels through the remat'ed model."""
    model, d, _, _, _, (pixels, ids, mask) = tiny
    module, params, _ = blip.load_imagereward(d, remat=True)
    assert mask.sum(1).min() < mask.sum(1).max() < 35    # padded rows: the attention mask matters
    f = _forward(module, with_grad=True)
    emb, hidden, raw, grad = f(params, pixels, ids, mask)
    r_emb, r_hidden, r_raw, r_reward, r_grad = _ref_forward(model, pixels, ids, mask)
    assert emb.shape == (3, 17, 32) and hidden.shape == (3, 35, 32) and raw.shape == (3,) and raw.dtype == jnp.float32
    errs = rel_err(emb, r_emb), rel_err(hidden, r_hidden), rel_err(raw, r_raw)
    print("fp32 rel errors (embeds, hidden, raw):", errs)
    assert max(errs) <= FP32_RTOL, errs
    assert rel_err(blip.reward_from_raw(raw), r_reward.detach()) <= FP32_RTOL
    grad_err = rel_err(np.asarray(grad) / blip.REWARD_STD, r_grad)
    print("fp32 pixel-gradient rel error:", grad_err)
    assert grad_err <= 1e-4
    # Without the padding mask the hidden states change: the masked path is really exercised.
    _, unmasked, _, _ = f(params, pixels, ids, np.ones_like(mask))
    assert rel_err(unmasked, r_hidden) > 1e-3


def test_bf16_compute_parity(tiny):
    model, d, _, _, _, (pixels, ids, mask) = tiny
    module, params, _ = blip.load_imagereward(d, dtype=jnp.bfloat16)
    emb, hidden, raw = _forward(module)(params, pixels, ids, mask)
    assert emb.dtype == hidden.dtype == jnp.bfloat16 and raw.dtype == jnp.float32
    assert params["blip"]["visual_encoder"]["norm"]["scale"].dtype == jnp.float32
    r_emb, r_hidden, r_raw, _, _ = _ref_forward(model, pixels, ids, mask)
    errs = rel_err(emb, r_emb), rel_err(hidden, r_hidden), rel_err(raw, r_raw)
    print("bf16 rel errors (embeds, hidden, raw):", errs)
    assert max(errs) <= BF16_RTOL, errs


def _blip_init_tokenizer(vocab_file):
    """BLIP's init_tokenizer() on a local vocab file (additional_special_tokens_ids is gone in transformers 5)."""
    tok = BertTokenizer(vocab_file)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


def test_tokenizer_matches_blip_init_tokenizer(tiny, tmp_path):
    tok = tiny[4]
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(gzip.decompress(open(blip.VOCAB_ASSET, "rb").read()))
    expected = _blip_init_tokenizer(str(vocab))
    assert len(tok) == len(expected) == 30524
    assert (tok.bos_token, tok.convert_tokens_to_ids("[DEC]"), tok.enc_token_id) == ("[DEC]", 30522, 30523)
    prompts = PROMPTS + ["Café: [ENC] naïve DOG!", "word " * 60]
    ids, mask = blip.tokenize_imagereward(tok, prompts)
    ref_enc = expected(prompts, padding="max_length", truncation=True, max_length=35)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (5, 35)
    np.testing.assert_array_equal(ids, ref_enc["input_ids"])
    np.testing.assert_array_equal(mask, ref_enc["attention_mask"])
    assert list(ids[0, :7]) == CAT_IDS and not ids[0, 7:].any() and list(mask[0]) == [1] * 7 + [0] * 28
    assert list(ids[3, :8]) == [101, 7668, 1024, 30523, 15743, 3899, 999, 102]   # cafe : [ENC] naive dog !
    assert ids[4, 0] == 101 and ids[4, -1] == 102 and mask[4].all()   # truncated to 35
    assert list(ids[2, :3]) == [101, 102, 0]
    enc_ids, _ = blip.tokenize_imagereward(tok, prompts, use_enc_token=True)
    np.testing.assert_array_equal(enc_ids[:, 1:], ids[:, 1:])
    assert (enc_ids[:, 0] == 30523).all()
    # A folder's own vocab.txt is used instead of the shipped one.
    own = blip.imagereward_tokenizer(str(vocab))
    np.testing.assert_array_equal(blip.tokenize_imagereward(own, prompts)[0], ids)


def test_shipped_vocabulary():
    with gzip.open(blip.VOCAB_ASSET, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 30522
    assert (lines[0], lines[100], lines[101], lines[102], lines[103]) == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def test_save_round_trip(tiny, tmp_path):
    model, d, module, params, _, _ = tiny
    blip.save_imagereward(module, params, str(tmp_path))
    written, original = load_file(os.path.join(tmp_path, "model.safetensors")), load_file(os.path.join(d, "model.safetensors"))
    unused = {k for k in original if blip.canonical_key(k) is None}
    assert unused == {"blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight", "blip.vision_proj.bias",
                      "blip.text_proj.weight", "blip.text_proj.bias"}
    assert set(written) == set(original) - unused
    for k, v in written.items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)
    assert json.load(open(tmp_path / "med_config.json"))["encoder_width"] == 32   # the ViT width
    module2, params2, _ = blip.load_imagereward(str(tmp_path))
    assert module2.config.vision == module.config.vision
    assert module2.config.text.to_dict() == module.config.text.to_dict()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_pickle_refused_then_allowed(tiny, tmp_path):
    model, d, _, params, _, _ = tiny
    torch.save(model.state_dict(), tmp_path / "ImageReward.pt")
    json.dump(MED, open(tmp_path / "med_config.json", "w"))
    json.dump(VISION, open(tmp_path / "config.json", "w"))
    with pytest.raises(WeightsError, match=r"ImageReward\.pt is a pickle checkpoint.*allow_pickle=True"):
        blip.load_imagereward(str(tmp_path))
    _, params2, _ = blip.load_imagereward(str(tmp_path), allow_pickle=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"),
     "missing tensor 'blip.text_encoder.encoder.layer.1.crossattention.self.key.weight'"),
    (lambda t: t.update({"blip.itm_head.weight": np.zeros(3, np.float32)}), "unexpected tensor 'blip.itm_head.weight'"),
    (lambda t: t.update({"mlp.layers.7.weight": np.zeros((1, 15), np.float32)}),
     "'mlp.layers.7.weight' has shape (1, 15), but the config implies (1, 16)"),
])
def test_bad_tensors_are_named(tiny, tmp_path, edit, needle):
    d = tiny[1]
    tensors = load_file(os.path.join(d, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    for name in ("med_config.json", "config.json"):
        open(tmp_path / name, "w").write(open(os.path.join(d, name)).read())
    with pytest.raises(WeightsError) as e:
        blip.load_imagereward(str(tmp_path))
    assert needle in str(e.value)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        blip.load_imagereward(str(tmp_path / "nope"))
    with pytest.raises(WeightsError, match="no med_config.json"):
        blip.load_imagereward(str(tmp_path))
    json.dump(MED, open(tmp_path / "med_config.json", "w"))
    with pytest.raises(WeightsError, match="holds no weights"):
        blip.load_imagereward(str(tmp_path))


def test_config_defaults_validation_and_shapes():
    cfg = blip.ImageRewardConfig.from_dict({"text": {"encoder_width": 768, "vocab_size": 30524}})
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.heads, cfg.vision.patch_size) == (1024, 24, 16, 16)
    assert cfg.text.encoder_width == 1024 and cfg.text.layer_norm_eps == 1e-12
    # Full size (ViT-L/16 + BERT base), abstractly on both sides: the name table covers exactly the
    # reference's state-dict keys, with the PyTorch shapes.
    shapes = blip.param_shapes(blip.ImageReward(cfg))
    flat = traverse_util.flatten_dict(shapes)
    pt_shape = lambda s, layout: s[::-1] if layout == "linear" else (s[3], s[2], s[0], s[1]) if layout == "conv" else s
    ours = {e.pt_key: pt_shape(tuple(flat[e.flax_path].shape), e.layout) for e in tables.build_table(shapes)}
    with torch.device("meta"):
        full = ref.ImageReward(dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16),
                               dict(MED, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, max_position_embeddings=512))
    assert ours == {k: tuple(v.shape) for k, v in full.state_dict().items() if blip.canonical_key(k)}
    assert ours["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    for part, key, value in [("vision", "patch_size", 15), ("vision", "heads", 0), ("vision", "eps", -1.0),
                             ("text", "hidden_act", "tanh"), ("text", "position_embedding_type", "relative_key"),
                             ("text", "num_attention_heads", 5), ("text", "add_cross_attention", False)]:
        with pytest.raises(ConfigError, match=key):
            blip.ImageRewardConfig.from_dict({part: {key: value}})


def test_bad_input_shapes_are_refused(tiny):
    _, _, module, params, _, (pixels, ids, mask) = tiny
    with pytest.raises(ValueError, match=r"\[batch, 32, 32, 3\]"):
        jax.eval_shape(lambda: blip.image_embeds(module, params, pixels.transpose(0, 3, 1, 2)))
    with pytest.raises(ValueError, match="input_ids"):   # traced only: nothing compiles or runs
        jax.eval_shape(lambda: blip.score(module, params, pixels, np.zeros((3, 41), np.int32), np.ones((3, 41), np.int32)))
