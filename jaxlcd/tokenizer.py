"""The CLIP tokenizer: load a local ``tokenizer/`` folder, tokenize prompts, or build one offline.

Stable Diffusion pipelines ship a transformers ``CLIPTokenizer`` folder (``vocab.json`` +
``merges.txt``). SD 1.x pads with ``<|endoftext|>`` (id 49407), SD 2.x with ``!`` (id 0). No model
hub is needed: `build_clip_tokenizer_files` writes the same 49,408-token files from the BPE
vocabulary shipped inside the ``open-clip-torch`` package (the real OpenAI CLIP vocabulary).

Note: transformers' CLIPTokenizer normalises text with NFC + whitespace collapse + lowercase,
while open_clip's SimpleTokenizer also runs ``ftfy.fix_text`` and HTML-unescapes. Ids therefore
agree except for prompts that ftfy/HTML unescaping would change (curly quotes, ``&amp;``, mojibake).
With ``pad_token="!"`` (SD 2.x) transformers also treats every ``!`` in a prompt as the pad token
(id 0) instead of BPE-merging it as open_clip does (diffusers issue #4153); this module keeps that
behaviour because it is what diffusers' SD 2.x pipelines feed their text encoder.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Sequence

import numpy as np
from jaxlcd.errors import InputError, MissingFileError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2  # as in open_clip's / OpenAI's SimpleTokenizer
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _tokenizer_dir(path: str) -> str:
    """``path`` itself, or ``path/tokenizer`` when given a pipeline folder."""
    if not os.path.isdir(path):
        raise MissingFileError(f"tokenizer directory {path!r} does not exist")
    has = lambda p, *names: all(os.path.isfile(os.path.join(p, n)) for n in names)
    if not has(path, "vocab.json") and not has(path, "tokenizer.json") and os.path.isdir(os.path.join(path, "tokenizer")):
        path = os.path.join(path, "tokenizer")
    if not (has(path, "vocab.json", "merges.txt") or has(path, "tokenizer.json")):
        raise MissingFileError(
            f"{path!r} is not a CLIP tokenizer folder: it needs vocab.json + merges.txt or tokenizer.json. Use "
            "the pipeline's tokenizer/ folder, or write one with jaxlcd.tokenizer.build_clip_tokenizer_files(out_dir)")
    return path


def load_tokenizer(path: str):
    """A transformers ``CLIPTokenizer`` from a local folder (vocab.json + merges.txt, or tokenizer.json
    as transformers 5 saves it).

    ``path`` may also be a diffusers pipeline folder with a ``tokenizer/`` subfolder. Never
    contacts a model hub.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_tokenizer_dir(path), local_files_only=True)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = 77) -> np.ndarray:
    """prompts (B strings) -> token ids [B, max_length] int32.

    ``<|startoftext|> ... <|endoftext|>``, truncated to max_length (the last kept id is EOS) and
    padded to max_length with the tokenizer's pad token, as diffusers' pipelines do.
    """
    if isinstance(prompts, str):
        raise TypeError("tokenize expects a list of prompts, not a single string")
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")
    return np.asarray(enc["input_ids"], dtype=np.int32)


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode character map (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe_path() -> str:
    """Path of the CLIP BPE vocabulary ``bpe_simple_vocab_16e6.txt.gz`` shipped in ``jaxlcd/assets``.

    It is the file open-clip-torch ships (OpenAI CLIP's vocabulary, MIT licence); a test checks the ids
    against open_clip's own tokenizer.
    """
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", _BPE_FILE)


def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id, ordered merges) exactly as open_clip's SimpleTokenizer builds them."""
    with gzip.open(bpe_path or clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise InputError(f"{bpe_path} does not hold {_NUM_MERGES} BPE merges; is it a CLIP BPE file?")
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges


def build_clip_tokenizer_files(out_dir: str, pad_token: str = EOS_TOKEN, max_length: int = 77) -> str:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) into ``out_dir`` from open-clip-torch's BPE file; returns ``out_dir``.

    pad_token: ``"<|endoftext|>"`` (SD 1.x, default) or ``"!"`` (SD 2.x; id 0, like open_clip's
    zero padding); any token of the vocabulary is accepted.
    """
    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise InputError(f"pad_token {pad_token!r} is not in the CLIP vocabulary; use {EOS_TOKEN!r} or '!'")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=max_length, do_lower_case=True,
                  add_prefix_space=False, errors="replace", clean_up_tokenization_spaces=True)
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
    return out_dir
