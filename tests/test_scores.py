"""Evaluation scores (jaxlcd.metrics.scores) against the reference scorers on tiny random models: CLIPScore against
torchmetrics' CLIPScore, PickScore against its model card's code with transformers' CLIPProcessor, ImageReward
(uncapped) against the reference model on torchvision-on-PIL preprocessing, and the crop conventions."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import fidelity_ref
from jaxlcd.errors import InputError
from jaxlcd.metrics.scores import Scorer, resize_crop
import test_rewards
from conftest import perturb_

hf_clip, imagereward_folder = test_rewards.hf_clip, test_rewards.imagereward_folder   # their tiny models
PROMPTS = ["a red circle on a blue background", "A photo of an astronaut riding a horse!", "a cat", "x"]
IMAGES = np.random.default_rng(0).integers(0, 256, (4, 45, 72, 3), dtype=np.uint8)   # 32x51 after resizing: margin 19


@pytest.fixture(scope="module")
def clip_with_processor(hf_clip):
    model, folder = hf_clip
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder))
    processor.image_processor.save_pretrained(folder)
    return model, folder, processor


def test_resize_crop_equals_transformers_clip_image_processor(clip_with_processor):
    _, _, processor = clip_with_processor
    theirs = processor.image_processor([Image.fromarray(im) for im in IMAGES], return_tensors="np",
                                       do_normalize=False)["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.stack([resize_crop(im, 32, "transformers") for im in IMAGES])
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # the torchvision convention rounds the odd margin the other way: a one-pixel shift
    assert not np.allclose(np.stack([resize_crop(im, 32, "torchvision") for im in IMAGES]), theirs)


def test_clipscore_equals_torchmetrics(clip_with_processor):
    fidelity_ref.install()   # torchmetrics imports torch_fidelity when installed
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, folder, processor = clip_with_processor

    class Features(torch.nn.Module):   # transformers 5 returns output objects where torchmetrics expects tensors
        def __init__(self):
            super().__init__()
            self.clip, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return _tensor(self.clip.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return _tensor(self.clip.get_text_features(*args, **kwargs))

    metric = CLIPScore(model_name_or_path=lambda: (Features(), processor))   # hub ids or a callable
    metric.update(torch.from_numpy(IMAGES).permute(0, 3, 1, 2), PROMPTS)
    scorer = Scorer("clipscore", folder, batch_size=3)    # a partial last batch too
    per_image = scorer(IMAGES, PROMPTS)
    assert scorer.aggregate(per_image) == pytest.approx(float(metric.compute()), rel=1e-5, abs=1e-4)
    assert scorer.aggregate(-np.abs(per_image) - 1) == 0.0      # torchmetrics clamps the mean at 0


def _tensor(out):
    return getattr(out, "pooler_output", out)


def test_pickscore_equals_its_model_card(clip_with_processor):
    model, folder, processor = clip_with_processor
    with torch.no_grad():   # PickScore's card: logit_scale.exp() * normalised text @ image embeddings
        image_embs = model.get_image_features(**processor(images=[Image.fromarray(i) for i in IMAGES],
                                                          return_tensors="pt"))
        text_embs = model.get_text_features(**processor(text=PROMPTS, padding=True, truncation=True, max_length=77,
                                                        return_tensors="pt"))
        image_embs, text_embs = [getattr(t, "pooler_output", t) for t in (image_embs, text_embs)]
        image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * (text_embs * image_embs).sum(-1)).numpy()
    np.testing.assert_allclose(Scorer("pickscore", folder)(IMAGES, PROMPTS), expected, rtol=1e-5, atol=1e-4)


def _torchvision_on_pil(image, size):
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize on a PIL image, written out
    (torchvision itself is not installable next to the CPU torch here): PIL resize, round((h - size) / 2) offsets."""
    img = Image.fromarray(image)
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    return ((x - mean) / std).permute(2, 0, 1)


def test_imagereward_uncapped_equals_the_reference(imagereward_folder):
    from jaxlcd.models import blip

    model, folder = imagereward_folder
    ids, mask = blip.tokenize_imagereward(blip.imagereward_tokenizer(), PROMPTS)
    pixels = torch.stack([_torchvision_on_pil(im, 32) for im in IMAGES])
    with torch.no_grad():
        expected = model.score_gard(torch.tensor(ids).long(), torch.tensor(mask).long(), pixels)[:, 0].numpy()
    ours = Scorer("imagereward", folder)(IMAGES, PROMPTS)
    assert (expected > 2.0).any()                        # the training cap is not applied here
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_hpsv2_benchmark_protocol_equals_open_clip(tmp_path):
    """HPSv2's evaluation: preprocess_val (torchvision on PIL), encode_image/encode_text normalised, 100 x the
    diagonal of image_features @ text_features.T."""
    import json

    from open_clip_ref import open_clip
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    model_cfg = dict(embed_dim=16, vision_cfg=dict(layers=2, width=32, patch_size=8, image_size=32, head_width=8),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2))
    model = perturb_(open_clip.CLIP(**model_cfg), seed=3).eval()
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([_torchvision_on_pil(im, 32) for im in IMAGES]),
                                            normalize=True)
        text_features = model.encode_text(open_clip.tokenizer.SimpleTokenizer()(PROMPTS, context_length=77),
                                          normalize=True)
        expected = 100 * torch.diagonal(image_features @ text_features.T).numpy()
    np.testing.assert_allclose(Scorer("hpsv2.1", str(tmp_path))(IMAGES, PROMPTS), expected, rtol=1e-5, atol=1e-4)


def test_bad_metric_and_inputs_are_one_sentence(clip_with_processor):
    _, folder, _ = clip_with_processor
    with pytest.raises(InputError, match="unknown metric 'fidd'"):
        Scorer("fidd", folder)
    with pytest.raises(InputError, match="wants uint8 images"):
        Scorer("clipscore", folder)(IMAGES.astype(np.float32), PROMPTS)
