"""`jaxlcd.rewards.load_reward` end to end on tiny local models, against PyTorch computations of the same scores.

Each reference does what the original scorer does: torchvision-style bicubic resize of the shorter side + centre
crop (computed in float64, then float32), CLIP normalisation, the PyTorch model, cosine / head / capped reward.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.numpy import save_file

import imagereward_ref as ir_ref
from conftest import perturb_, rel_err
from jaxlcd.models import blip
from jaxlcd.rewards import RewardError, load_reward, parse_reward_expression
from jaxlcd.rewards import convert as convert_cli
from jaxlcd.tokenizer import build_clip_tokenizer_files

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)
PROMPTS = ["a red circle on a blue background", "A photo of an astronaut riding a horse!"]
SCORE_RTOL = 1e-5   # fp32 scores vs the PyTorch pipeline (measured ~1e-7)
IMAGES = np.random.default_rng(0).random((2, 48, 64, 3)).astype(np.float32)   # non-square: resize + crop
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def torch_pixels(images, size, antialias=True):
    """NHWC [0,1] (numpy or float64 torch) -> NCHW normalised float32 torch, as Resize(size, bicubic) + CenterCrop."""
    x = (images if torch.is_tensor(images) else torch.from_numpy(images).double()).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size]
    return ((x - MEAN) / STD).float()


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip"))
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    model = perturb_(transformers.CLIPModel(cfg), seed=2)
    model.save_pretrained(d)
    build_clip_tokenizer_files(d)
    return model, d


def torch_cosine(model, folder, images, antialias=True):
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch_pixels(images, 32, antialias))
        txt = model.get_text_features(input_ids=ids)
    img, txt = [getattr(t, "pooler_output", t) for t in (img, txt)]
    return F.cosine_similarity(img, txt).numpy()


@pytest.mark.parametrize("antialias", [True, False])
def test_clipscore_and_pickscore_match_transformers(hf_clip, antialias):
    model, folder = hf_clip
    ref = torch_cosine(model, folder, IMAGES, antialias)
    for name in ("clipscore", "pickscore"):
        rm = load_reward(name, folder, antialias=antialias)
        assert rel_err(rm(IMAGES, PROMPTS), ref) <= SCORE_RTOL
    assert rm.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)


def test_reward_gradient_matches_torch_autograd(hf_clip):
    model, folder = hf_clip
    rm = load_reward("clipscore", folder)
    g = jax.grad(lambda im: jnp.sum(rm(im, PROMPTS)))(jnp.asarray(IMAGES))
    x = torch.from_numpy(IMAGES).double().requires_grad_(True)
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    ids = tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    img, txt = model.get_image_features(pixel_values=torch_pixels(x, 32)), model.get_text_features(input_ids=ids)
    img, txt = [getattr(t, "pooler_output", t) for t in (img, txt)]
    F.cosine_similarity(img, txt).sum().backward()
    assert float(jnp.abs(g).max()) > 0
    assert rel_err(g, x.grad.numpy()) <= 1e-4


def test_hpsv2_open_clip_folder_and_pickle_converter(tmp_path):
    from open_clip_ref import open_clip

    torch.manual_seed(0)
    model_cfg = dict(embed_dim=16, vision_cfg=dict(layers=2, width=32, patch_size=8, image_size=32, head_width=8),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2))
    model = perturb_(open_clip.CLIP(**model_cfg), seed=3)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    folder = tmp_path / "hps"
    folder.mkdir()
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    rm = load_reward("hpsv2.1", str(folder))
    ids = open_clip.tokenizer.SimpleTokenizer()(PROMPTS, context_length=77)
    with torch.no_grad():
        img = model.encode_image(torch_pixels(IMAGES, 32))
        txt = model.encode_text(ids)
    ref = F.cosine_similarity(img, txt).numpy()
    scores = np.asarray(rm(IMAGES, PROMPTS))
    assert rel_err(scores, ref) <= SCORE_RTOL

    # a pickle checkpoint is read only with --allow-pickle; the converted folder scores identically
    pt = tmp_path / "hps.pt"
    torch.save(model.state_dict(), pt)
    assert convert_cli.main([str(pt), str(tmp_path / "refused"), "--kind", "open_clip:ViT-H-14"]) == 2
    with pytest.raises(ValueError, match="pickle"):
        load_reward("hpsv2.1", str(_pickle_folder(tmp_path, pt, model_cfg)))
    out = tmp_path / "converted"
    assert convert_cli.main([str(pt), str(out), "--kind", "open_clip:ViT-H-14", "--allow-pickle"]) == 0
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))  # tiny, not ViT-H
    np.testing.assert_array_equal(np.asarray(load_reward("hpsv2.1", str(out))(IMAGES, PROMPTS)), scores)


def _pickle_folder(tmp_path, pt, model_cfg):
    d = tmp_path / "pickle_only"
    d.mkdir()
    os.link(pt, d / "open_clip_pytorch_model.bin")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return d


@pytest.fixture(scope="module")
def imagereward_folder(tmp_path_factory):
    vision = dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_ratio=4.0, eps=1e-6)
    med = dict(architectures=["BertModel"], model_type="bert", vocab_size=30524, hidden_size=32,
               num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
               layer_norm_eps=1e-12, hidden_act="gelu", add_cross_attention=True, encoder_width=32)
    torch.manual_seed(0)
    model = perturb_(ir_ref.ImageReward(vision, med), seed=4)
    with torch.no_grad():  # a large final bias pushes some scores over the cap
        model.mlp.layers[7].bias.fill_(2.5)
    d = str(tmp_path_factory.mktemp("imagereward"))
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, os.path.join(d, "model.safetensors"))
    json.dump(med, open(os.path.join(d, "med_config.json"), "w"))
    json.dump(vision, open(os.path.join(d, "config.json"), "w"))
    return model, d


def test_imagereward_capped_score(imagereward_folder):
    model, folder = imagereward_folder
    rm = load_reward("imagereward", folder)
    tok = blip.imagereward_tokenizer()
    ids, mask = blip.tokenize_imagereward(tok, PROMPTS)
    with torch.no_grad():
        ref = model.score_gard(torch.tensor(ids).long(), torch.tensor(mask).long(), torch_pixels(IMAGES, 32))[:, 0]
    ref = ref.numpy()
    scores = np.asarray(rm(IMAGES, PROMPTS))
    np.testing.assert_allclose(scores, np.minimum(ref, 2.0), rtol=SCORE_RTOL, atol=1e-6)
    assert (ref > 2.0).any() and (scores == 2.0).any()   # the cap was exercised


def test_aesthetic_head(hf_clip, tmp_path):
    model, folder = hf_clip
    d = tmp_path / "aesthetic"
    d.mkdir()
    for f in os.listdir(folder):
        os.link(os.path.join(folder, f), d / f)
    head = torch.nn.Linear(16, 1)
    save_file({"weight": head.weight.detach().numpy().copy(), "bias": head.bias.detach().numpy().copy()},
              str(d / "aesthetic_head.safetensors"))
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch_pixels(IMAGES, 32))
        img = getattr(img, "pooler_output", img)
        ref = head(img / img.norm(dim=-1, keepdim=True))[:, 0].numpy()
    assert rel_err(load_reward("aesthetic", str(d))(IMAGES, PROMPTS), ref) <= SCORE_RTOL


def test_weighted_sum(hf_clip, imagereward_folder):
    (_, clip_dir), (_, ir_dir) = hf_clip, imagereward_folder
    a, b = load_reward("clipscore", clip_dir)(IMAGES, PROMPTS), load_reward("imagereward", ir_dir)(IMAGES, PROMPTS)
    rm = load_reward("clipscore+0.5*imagereward", f"clipscore={clip_dir},imagereward={ir_dir}")
    np.testing.assert_allclose(rm(IMAGES, PROMPTS), a + 0.5 * b, rtol=1e-6)
    assert rm.name == "clipscore+0.5*imagereward"


def test_bad_names_and_paths(hf_clip):
    assert parse_reward_expression("hpsv2.1 + 0.1*imagereward") == [(1.0, "hpsv2.1"), (0.1, "imagereward")]
    with pytest.raises(RewardError, match="unknown reward model 'hps'; known: aesthetic, clipscore, hpsv2.1"):
        load_reward("hps", "/nowhere")
    with pytest.raises(RewardError, match="cannot parse"):
        parse_reward_expression("0.1*")
    with pytest.raises(RewardError, match="one path per name"):
        load_reward("clipscore+imagereward", hf_clip[1])
    with pytest.raises(RewardError, match="does not exist"):
        load_reward("clipscore", "/nowhere/clip")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        load_reward("clipscore", hf_clip[1])(IMAGES, PROMPTS[:1])


def test_converter_checks_head_and_imagereward_inputs(tmp_path):
    head = tmp_path / "head.pth"
    torch.save({"weight": torch.zeros(1, 16), "bias": torch.zeros(1)}, head)
    assert convert_cli.main([str(head), str(tmp_path / "a"), "--kind", "aesthetic_head", "--allow-pickle"]) == 0
    assert (tmp_path / "a" / "aesthetic_head.safetensors").is_file()
    torch.save({"linear.weight": torch.zeros(1, 16)}, head)
    with pytest.raises(ValueError, match="exactly 'weight' and 'bias'"):
        convert_cli.convert(str(head), str(tmp_path / "b"), "aesthetic_head", allow_pickle=True)
    with pytest.raises(ValueError, match="needs --med-config"):
        convert_cli.convert(str(head), str(tmp_path / "c"), "imagereward", allow_pickle=True)


def test_every_reward_kind_passes_a_gradient_to_the_images(hf_clip, imagereward_folder, tmp_path):
    # the step differentiates each reward w.r.t. the decoded images; the capped ImageReward rows give zero
    model, folder = hf_clip
    d = tmp_path / "aesthetic"
    d.mkdir()
    for f in os.listdir(folder):
        os.link(os.path.join(folder, f), d / f)
    save_file({"weight": np.ones((1, 16), np.float32), "bias": np.zeros(1, np.float32)},
              str(d / "aesthetic_head.safetensors"))
    rms = {"aesthetic": load_reward("aesthetic", str(d)),
           "imagereward": load_reward("imagereward", imagereward_folder[1]),
           "pickscore+0.1*imagereward": load_reward("pickscore+0.1*imagereward",
                                                    {"pickscore": folder, "imagereward": imagereward_folder[1]})}
    for name, rm in rms.items():
        scores = np.asarray(rm(IMAGES, PROMPTS))
        g = np.asarray(jax.grad(lambda im: jnp.sum(rm(im, PROMPTS)))(jnp.asarray(IMAGES)))
        assert np.isfinite(g).all(), name
        live = scores < 2.0 if name == "imagereward" else np.ones(len(PROMPTS), bool)
        assert all(np.abs(g[i]).max() > 0 for i in np.flatnonzero(live)), name
        assert all(np.abs(g[i]).max() == 0 for i in np.flatnonzero(~live)), name
