"""A full pipeline folder written by diffusers.StableDiffusionPipeline.save_pretrained loads component by component."""
import os

import diffusers
import numpy as np
import pytest
import torch

from conftest import rel_err
from jaxlcd.models.clip_text import CLIPTextModel
from jaxlcd.models.unet import UNet2DConditionModel
from jaxlcd.models.vae import AutoencoderKL
from jaxlcd.tokenizer import load_tokenizer, tokenize
from jaxlcd.weights import WeightsError, load_component
from tiny_pipeline import make_pipeline_dir


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return make_pipeline_dir(str(tmp_path_factory.mktemp("pipe") / "sd"))


def test_pipeline_folder_loads_component_by_component(pipe_dir):
    kinds = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    for sub, cls in kinds.items():
        module, params = load_component(os.path.join(pipe_dir, sub))
        assert isinstance(module, cls)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in __import__("jax").tree_util.tree_leaves(params))
    tok = load_tokenizer(os.path.join(pipe_dir, "tokenizer"))
    ids = tokenize(tok, ["a red circle", ""])
    assert ids.shape == (2, 77) and ids.dtype == np.int32


def test_pipeline_text_embedding_matches_diffusers(pipe_dir):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(["a blue square on the left"], "cpu", 1, False)
    te, params = load_component(os.path.join(pipe_dir, "text_encoder"))
    ids = tokenize(load_tokenizer(os.path.join(pipe_dir, "tokenizer")), ["a blue square on the left"])
    assert rel_err(te.apply({"params": params}, ids), ref.numpy()) <= 1e-5


def test_pipeline_root_is_not_a_component(pipe_dir):
    with pytest.raises(WeightsError, match="config.json"):
        load_component(pipe_dir)
