"""Reading and writing model directories: config.json + safetensors (single, sharded, variants).

Pickle checkpoints (.bin/.pt/.pth/.ckpt) execute code when loaded, so they are refused unless the
caller passes ``allow_pickle=True``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxlcd.weights.tables import WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_config(directory: str) -> dict:
    """The parsed ``config.json`` of a model directory; one clear error if missing or malformed."""
    if not os.path.isdir(directory):
        raise WeightsError(f"model directory {directory!r} does not exist")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise WeightsError(f"{directory!r} has no config.json; expected a diffusers/transformers model "
                           "folder (config.json + *.safetensors)")
    return read_json_object(path)


def read_json_object(path: str) -> dict:
    """A JSON file holding one object; WeightsError if it is not valid JSON or not an object."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path} must hold a JSON object")
    return cfg


def _weight_files(directory: str, stem: str, variant: Optional[str]) -> list[str]:
    """The safetensors files holding the weights, for a single file or a sharded index."""
    names = []
    if variant:
        names += [f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"]
    names += [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".json"):
            return [path]
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{path} is not a valid safetensors index ({e!r})") from None
        files = [os.path.join(directory, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise WeightsError(f"shard {f!r} named in {name} is missing")
        return files
    return []


def _pickle_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(PICKLE_SUFFIXES))


def read_tensors(directory: str, stem: str, variant: Optional[str] = None,
                 allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a model directory as numpy arrays (their stored dtype), by file key.

    Accepts ``{stem}.safetensors``, sharded ``{stem}.safetensors.index.json``, and the ``variant``
    (e.g. fp16) forms; any ``*.safetensors`` file is used if those names are absent.
    """
    files = _weight_files(directory, stem, variant)
    if not files:
        files = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
    if files:
        tensors = {}
        for f in files:
            try:
                tensors.update(load_file(f))
            except Exception as e:  # safetensors raises several types for corrupt headers
                raise WeightsError(f"cannot read {f}: {e}") from None
        return tensors
    pickles = _pickle_files(directory)
    if not pickles:
        raise WeightsError(f"{directory!r} holds no weights: expected {stem}.safetensors")
    if not allow_pickle:
        raise WeightsError(_pickle_refusal(pickles[0]))
    tensors = {}
    for f in pickles:
        tensors.update(_read_pickle(f))
    return tensors


def _pickle_refusal(path: str) -> str:
    return (f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to safetensors, or pass allow_pickle=True if you trust it")


def _read_pickle(path: str) -> dict[str, np.ndarray]:
    import torch  # only needed for trusted pickle files

    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}


def read_tensor_file(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """One weights file (``.safetensors``, or a pickle only with ``allow_pickle``) as numpy arrays by key."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    if path.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise WeightsError(_pickle_refusal(path))
        return _read_pickle(path)
    if not path.endswith(".safetensors"):
        raise WeightsError(f"{path!r}: expected a .safetensors file (or a trusted {'/'.join(PICKLE_SUFFIXES)} pickle)")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"cannot read {path}: {e}") from None


def write_component_dir(directory: str, config: dict, tensors: dict[str, np.ndarray], stem: str) -> None:
    """Write ``config.json`` and ``{stem}.safetensors`` (PyTorch metadata) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, f"{stem}.safetensors"), metadata={"format": "pt"})
