"""The offline-built CLIP tokenizer gives open_clip's (= OpenAI CLIP's) token ids."""
import importlib.util
import json
import os

import numpy as np
import pytest
from transformers import CLIPTokenizer

from jaxlcd import tokenizer as tok

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT, on the MOON.",
    "hello, world... (test) \"quoted\" it's #tag @user 3.14 -- 100% [x]{y}",
    "café naïve Ünïcödé ß 東京タワー 😀 Ωμέγα",
    "   spaced\tout\nover lines  ",
    "",
    "a very long prompt " * 40,  # truncates: the last kept id is EOS
]


def _open_clip_tokenizer():
    """open_clip's tokenizer.py loaded standalone (importing open_clip needs torchvision)."""
    loc = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", os.path.join(loc, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    eos_dir = tok.build_clip_tokenizer_files(str(root / "sd1"))
    bang_dir = tok.build_clip_tokenizer_files(str(root / "sd2"), pad_token="!")
    return eos_dir, bang_dir, _open_clip_tokenizer()


def test_files_and_vocab_size(built):
    eos_dir, bang_dir, oc = built
    for d in (eos_dir, bang_dir):
        assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(d))
    vocab = json.load(open(os.path.join(eos_dir, "vocab.json"), encoding="utf-8"))
    assert len(vocab) == tok.VOCAB_SIZE == 49408
    assert vocab["!"] == 0 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # same token -> id table as open_clip (which names the two special tokens differently)
    ref = oc.SimpleTokenizer().encoder
    assert {k: v for k, v in vocab.items() if v < 49406} == {k: v for k, v in ref.items() if v < 49406}
    t = CLIPTokenizer.from_pretrained(eos_dir)
    assert len(t) == 49408 and t.pad_token_id == 49407 and t.bos_token_id == 49406
    assert tok.load_tokenizer(bang_dir).pad_token_id == 0


def test_ids_match_open_clip_eos_padding(built):
    eos_dir, _, oc = built
    ids = tok.tokenize(tok.load_tokenizer(eos_dir), PROMPTS)
    ref = oc.tokenize(PROMPTS, context_length=77).numpy()
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
    lengths = (ref != 0).sum(1)  # open_clip pads with 0, SD 1.x with <|endoftext|>
    assert lengths[-1] == 77 and ids[-1, -1] == 49407
    for row, n in zip(range(len(PROMPTS)), lengths):
        np.testing.assert_array_equal(ids[row, :n], ref[row, :n], err_msg=PROMPTS[row])
        assert (ids[row, n:] == 49407).all()


def test_bang_padding_is_zeros_like_open_clip(built):
    _, bang_dir, oc = built
    ids = tok.tokenize(tok.load_tokenizer(bang_dir), PROMPTS)
    np.testing.assert_array_equal(ids, oc.tokenize(PROMPTS, context_length=77).numpy())
    # Known transformers behaviour kept on purpose (diffusers issue #4153): with pad "!" a "!" in the
    # prompt becomes the pad id 0 instead of open_clip's BPE token.
    bang = tok.tokenize(tok.load_tokenizer(bang_dir), ["wow!"])
    assert bang[0, 2] == 0 and oc.tokenize(["wow!"])[0, 2] != 0


def test_pipeline_folder_and_errors(built, tmp_path):
    eos_dir, _, _ = built
    pipe = tmp_path / "pipe"
    tok.build_clip_tokenizer_files(str(pipe / "tokenizer"))
    assert tok.load_tokenizer(str(pipe)).pad_token_id == 49407
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"vocab.json \+ merges.txt or tokenizer.json"):
        tok.load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tok.load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="pad_token"):
        tok.build_clip_tokenizer_files(str(tmp_path / "bad"), pad_token="<pad>")
    with pytest.raises(TypeError):
        tok.tokenize(tok.load_tokenizer(eos_dir), "a single string")


def test_shipped_bpe_vocabulary_is_open_clips():
    loc = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    with open(os.path.join(loc, "bpe_simple_vocab_16e6.txt.gz"), "rb") as a, open(tok.clip_bpe_path(), "rb") as b:
        assert a.read() == b.read()
