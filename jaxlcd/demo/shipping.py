"""Shipping the demo models: float16 copies in ``jaxlcd/assets/demo`` with shared tokenizer files linked."""
from __future__ import annotations

import filecmp
import os
import shutil

from jaxlcd.demo import DEMO_DIR, MODELS
from jaxlcd.errors import InputError


def ship_model(src: str, name: str, dest_root: str = DEMO_DIR) -> str:
    """Copy model folder ``src`` to ``dest_root/name`` (replacing it) with every float32 safetensors tensor stored
    as float16 (the demo models are small and fp16 is enough); other files are copied as they are."""
    from safetensors.numpy import load_file, save_file

    if name not in MODELS:
        raise InputError(f"unknown demo model {name!r}; known: {', '.join(MODELS)}")
    dest = os.path.join(dest_root, name)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    for root, _, files in os.walk(dest):
        for f in files:
            if f.endswith(".safetensors"):
                path = os.path.join(root, f)
                tensors = load_file(path)
                save_file({k: v.astype("float16") if v.dtype == "float32" else v for k, v in tensors.items()}, path,
                          metadata={"format": "pt"})
    return dest


SHARED_TOKENIZER_FILES = ("vocab.json", "merges.txt")  # the CLIP BPE files, 1.5 MB, identical in every demo model


def link_shared_tokenizer_files(dest_root: str = DEMO_DIR) -> list[str]:
    """Replace each copy of SHARED_TOKENIZER_FILES under ``dest_root`` that is byte-identical to ``clip``'s with a
    relative symlink to it (the package stores them once). Returns the linked paths."""
    linked, clip_dir = [], os.path.abspath(os.path.join(dest_root, "clip"))
    for root, _, files in os.walk(dest_root):
        if os.path.abspath(root) == clip_dir:
            continue
        for name in SHARED_TOKENIZER_FILES:
            path, source = os.path.join(root, name), os.path.join(clip_dir, name)
            if (name in files and not os.path.islink(path) and os.path.isfile(source)
                    and filecmp.cmp(path, source, shallow=False)):
                os.remove(path)
                os.symlink(os.path.relpath(source, root), path)
                linked.append(path)
    return linked
