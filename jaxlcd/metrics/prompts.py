"""Prompt sets for evaluation, read from local files (nothing here downloads them).

`load_prompts(path, num=None, seed=0)` -> list of `Prompt(text, group)`; ``group`` is what results are broken down by:

| what ``path`` is                                    | prompts                                        | group      |
|-----------------------------------------------------|------------------------------------------------|------------|
| the HPDv2 benchmark folder (``anime.json``, ``concept-art.json``, ``paintings.json``, ``photo.json``: JSON lists of strings) | every prompt of each style | the style |
| PartiPrompts' ``PartiPrompts.tsv`` (columns Prompt, Category, ...) | every row                      | Category   |
| COCO's ``captions_val2014.json`` (or any COCO captions file) | one caption per image id, chosen with ``seed`` | ``coco``   |
| any other text file                                 | one prompt per non-empty line                  | ``""``     |

``num`` caps the number of prompts. COCO: ``num`` image ids sampled with ``seed`` (the usual "30k captions" protocol;
all ids when ``num`` is None). Grouped sets: the first ``ceil(num / groups)`` prompts of each group in file order, so
every style or category stays represented (then cut to ``num``). Plain files: the first ``num`` lines.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import NamedTuple, Optional

import numpy as np

from jaxlcd.errors import InputError

HPD_STYLES = ("anime", "concept-art", "paintings", "photo")


class Prompt(NamedTuple):
    text: str
    group: str = ""


def load_prompts(path: str, num: Optional[int] = None, seed: int = 0) -> list[Prompt]:
    """The prompts of ``path`` (see the module docstring), at most ``num``."""
    if num is not None and num < 1:
        raise InputError(f"the number of prompts must be >= 1, got {num}")
    if os.path.isdir(path):
        prompts = _hpd_folder(path)
    elif not os.path.isfile(path):
        raise InputError(f"prompt file {path!r} does not exist")
    elif path.endswith(".tsv"):
        prompts = _parti(path)
    elif path.endswith(".json"):
        return _coco(path, num, seed)
    else:
        prompts = _plain(path)
    if not prompts:
        raise InputError(f"{path!r} holds no prompts")
    return _cap(prompts, num)


def _cap(prompts: list[Prompt], num: Optional[int]) -> list[Prompt]:
    if num is None or num >= len(prompts):
        return prompts
    groups = list(dict.fromkeys(p.group for p in prompts))
    if len(groups) == 1:
        return prompts[:num]
    share = math.ceil(num / len(groups))
    out = [p for g in groups for p in [q for q in prompts if q.group == g][:share]]
    return out[:num]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise InputError(f"prompt file {path!r} is not UTF-8 text") from None


def _plain(path: str) -> list[Prompt]:
    return [Prompt(line.strip()) for line in _read_text(path).splitlines() if line.strip()]


def _hpd_folder(path: str) -> list[Prompt]:
    found = [s for s in HPD_STYLES if os.path.isfile(os.path.join(path, f"{s}.json"))]
    if not found:
        raise InputError(f"{path!r} is a folder but not the HPDv2 benchmark folder: it has none of "
                         f"{', '.join(s + '.json' for s in HPD_STYLES)}")
    prompts = []
    for style in found:
        file = os.path.join(path, f"{style}.json")
        try:
            items = json.loads(_read_text(file))
        except ValueError as e:
            raise InputError(f"{file} is not valid JSON ({e})") from None
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise InputError(f"{file} must be a JSON list of prompt strings, as in the HPDv2 benchmark")
        prompts += [Prompt(t.strip(), style) for t in items if t.strip()]
    return prompts


def _parti(path: str) -> list[Prompt]:
    rows = list(csv.DictReader(_read_text(path).splitlines(), delimiter="\t"))
    if not rows or "Prompt" not in rows[0]:
        raise InputError(f"{path!r} is not PartiPrompts.tsv: it needs a tab-separated header with a 'Prompt' column")
    return [Prompt(r["Prompt"].strip(), (r.get("Category") or "").strip()) for r in rows if (r["Prompt"] or "").strip()]


def _coco(path: str, num: Optional[int], seed: int) -> list[Prompt]:
    try:
        data = json.loads(_read_text(path))
        annotations = data["annotations"]
        by_image: dict[int, list[str]] = {}
        for a in annotations:
            if str(a["caption"]).strip():
                by_image.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path!r} is not a COCO captions file (a JSON object whose 'annotations' hold image_id and "
                         f"caption): {type(e).__name__} {e}") from None
    if not by_image:
        raise InputError(f"{path!r} holds no captions")
    ids = sorted(by_image)
    rng = np.random.default_rng(seed)
    if num is not None and num < len(ids):
        ids = sorted(rng.choice(ids, num, replace=False).tolist())
    return [Prompt(by_image[i][int(rng.integers(len(by_image[i])))], "coco") for i in ids]
