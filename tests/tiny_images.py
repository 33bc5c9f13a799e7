"""Image-caption folders for the data tests: `jaxlcd.tiny`'s images plus, on request, a corrupt image and an empty
caption, and the captions.jsonl layout. Deterministic from the seed."""
from __future__ import annotations

import json
import os

import numpy as np

from jaxlcd.tiny import draw_image as _draw


def write_tiny_folder(out_dir: str, n: int = 32, resolution: int = 64, seed: int = 0, *,
                      include_bad: bool = False, caption_format: str = "txt") -> list[tuple[str, str]]:
    """Write ``n`` PNG images (about ``resolution`` px, RGB) with captions into ``out_dir``.

    caption_format: ``"txt"`` (sidecar ``img_0000.txt`` files) or ``"jsonl"`` (one ``captions.jsonl``).
    include_bad: also write ``bad_corrupt.png`` (a truncated PNG, with a valid caption) and
    ``bad_empty.png`` (a valid image whose caption is whitespace only); these are extra to the ``n``.
    Returns the ``n`` good (file name, caption) pairs, in file-name order.
    """
    if caption_format not in ("txt", "jsonl"):
        raise ValueError(f"caption_format must be 'txt' or 'jsonl', not {caption_format!r}")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, good = [], []
    for i in range(n):
        img, caption = _draw(rng, resolution)
        name = f"img_{i:04d}.png"
        img.save(os.path.join(out_dir, name))
        entries.append((name, caption))
        good.append((name, caption))
    if include_bad:
        img, caption = _draw(rng, resolution)
        path = os.path.join(out_dir, "bad_corrupt.png")
        img.save(path)
        with open(path, "r+b") as f:  # keep the PNG signature + header, cut the pixel data short
            f.truncate(60)
        entries.append(("bad_corrupt.png", caption))
        img, _ = _draw(rng, resolution)
        img.save(os.path.join(out_dir, "bad_empty.png"))
        entries.append(("bad_empty.png", "   \n"))
    if caption_format == "jsonl":
        with open(os.path.join(out_dir, "captions.jsonl"), "w", encoding="utf-8") as f:
            for name, caption in entries:
                f.write(json.dumps({"file": name, "caption": caption}) + "\n")
    else:
        for name, caption in entries:
            with open(os.path.join(out_dir, os.path.splitext(name)[0] + ".txt"), "w", encoding="utf-8") as f:
                f.write(caption)
    return good
