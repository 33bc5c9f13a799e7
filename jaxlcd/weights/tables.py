"""Explicit two-way PyTorch <-> Flax name and layout tables.

A table is a list of `Entry(flax_path, pt_key, layout)` built from a Flax param tree whose module
names mirror the PyTorch attribute names. The same table converts in both directions, so a
PT -> Flax -> PT round trip is bit-exact and key-complete by construction. Rules (see weights.md):

- module names may hold dots (``down_blocks_0.resnets_1``): each dotted part is one segment;
- a segment ``<list>_<i>`` where ``<list>`` is a PyTorch ModuleList name becomes ``<list>.<i>``;
- leaf ``kernel`` -> ``weight`` with layout ``conv`` (OIHW <-> HWIO) if 4-D or ``linear`` (transpose)
  if 2-D; ``scale`` and ``embedding`` -> ``weight``; ``bias`` -> ``bias``; any other leaf keeps its
  name with layout ``plain`` (raw parameters such as ``class_embedding``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np
from flax import traverse_util
from jaxlcd.errors import InputError

# PyTorch nn.ModuleList / nn.Sequential attribute names used by the ported models.
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
    "upsamplers", "to_out", "net", "layers", "resblocks",
    "blocks", "layer", "layer1", "layer2", "layer3", "layer4", "downsample",   # timm ViT, BERT, CLIP ResNet
})
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_LIST_SEGMENT = re.compile(r"(.+)_(\d+)")


class WeightsError(InputError):
    """A weights file or directory does not match what the model config implies."""


@dataclasses.dataclass(frozen=True)
class Entry:
    flax_path: tuple[str, ...]
    pt_key: str
    layout: str  # "conv" | "linear" | "plain"


def pt_name(flax_path: tuple[str, ...], ndim: int, prefix: str = "") -> Entry:
    """The table entry for one Flax leaf path with ``ndim`` dimensions."""
    segs = []
    for seg in (part for name in flax_path[:-1] for part in name.split(".")):
        m = _LIST_SEGMENT.fullmatch(seg)
        segs.extend([m[1], m[2]] if m and m[1] in LIST_NAMES else [seg])
    leaf = flax_path[-1]
    segs.append(_LEAF_NAMES.get(leaf, leaf))
    layout = "plain"
    if leaf == "kernel":
        layout = {4: "conv", 2: "linear"}.get(ndim)
        if layout is None:
            raise WeightsError(f"no layout rule for a {ndim}-D kernel at {'/'.join(flax_path)}")
    return Entry(tuple(flax_path), prefix + ".".join(segs), layout)


def build_table(param_shapes: Mapping, prefix: str = "") -> list[Entry]:
    """One entry per leaf of a (possibly abstract) Flax param tree; checks PT names are unique."""
    flat = traverse_util.flatten_dict(dict(param_shapes))
    table = [pt_name(path, len(leaf.shape), prefix) for path, leaf in sorted(flat.items())]
    seen = {}
    for e in table:
        if e.pt_key in seen:
            raise WeightsError(f"two Flax params map to {e.pt_key}: {seen[e.pt_key]} and {e.flax_path}")
        seen[e.pt_key] = e.flax_path
    return table


def to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)
    if layout == "linear":
        if array.ndim == 4 and array.shape[2:] == (1, 1):  # legacy 1x1-conv attention projections
            array = array[:, :, 0, 0]
        return array.T
    return array


def to_pt_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)
    if layout == "linear":
        return array.T
    return array


def pt_to_flax(state_dict: Mapping[str, np.ndarray], table: list[Entry], param_shapes: Mapping,
               dtype=np.float32, what: str = "checkpoint") -> dict:
    """PyTorch-named arrays -> nested Flax params, checking keys and shapes against the table.

    ``state_dict`` keys must already be canonical (see `jaxlcd.weights.io`). Raises WeightsError
    naming the first missing, unexpected or mis-shaped tensor.
    """
    expected = traverse_util.flatten_dict(dict(param_shapes))
    wanted = {e.pt_key for e in table}
    extra = sorted(set(state_dict) - wanted)
    missing = sorted(wanted - set(state_dict))
    if missing:
        raise WeightsError(f"{what} is missing tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise WeightsError(f"{what} has unexpected tensor {extra[0]!r} that the config does not use"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    flat = {}
    for e in table:
        arr = to_flax_layout(np.asarray(state_dict[e.pt_key]), e.layout)
        want = tuple(expected[e.flax_path].shape)
        if tuple(arr.shape) != want:
            got = tuple(np.asarray(state_dict[e.pt_key]).shape)
            raise WeightsError(f"{what}: tensor {e.pt_key!r} has shape {got}, but the config implies "
                               f"{tuple(to_pt_layout(np.empty(want), e.layout).shape)}")
        flat[e.flax_path] = arr.astype(dtype) if dtype is not None else arr
    return traverse_util.unflatten_dict(flat)


def flax_to_pt(params: Mapping, table: list[Entry], dtype=None) -> dict[str, np.ndarray]:
    """Nested Flax params -> PyTorch-named, PyTorch-layout contiguous numpy arrays."""
    flat = traverse_util.flatten_dict(dict(params))
    if set(flat) != {e.flax_path for e in table}:
        raise WeightsError("params do not match the module's parameter tree")
    out = {}
    for e in table:
        arr = np.asarray(flat[e.flax_path])
        if dtype is not None:
            arr = arr.astype(dtype)
        arr = to_pt_layout(arr, e.layout)
        out[e.pt_key] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # (keeps 0-d params 0-d)
    return out
