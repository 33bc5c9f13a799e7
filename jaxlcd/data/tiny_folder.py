"""A tiny generated image-caption folder (coloured shapes on plain backgrounds), for the ``tiny``
training config and the tests. Deterministic from the seed; no downloads."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 210, 30),
           "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def _draw(rng: np.random.Generator, resolution: int) -> tuple[Image.Image, str]:
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    # Slightly non-square sizes so that resize-shorter-side + crop is exercised.
    w = resolution + int(rng.integers(0, resolution // 2 + 1))
    h = resolution + int(rng.integers(0, resolution // 4 + 1))
    img = Image.new("RGB", (w, h), COLOURS[names[bg]])
    size = int(rng.integers(resolution // 4, resolution // 2 + 1))
    cx = w // 2 + int(rng.integers(-resolution // 8, resolution // 8 + 1))
    cy = h // 2 + int(rng.integers(-resolution // 8, resolution // 8 + 1))
    box = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)
    draw, colour = ImageDraw.Draw(img), COLOURS[names[fg]]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=colour)
    article = "an" if names[fg][0] in "aeiou" else "a"
    return img, f"{article} {names[fg]} {shape} on a {names[bg]} background"


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
