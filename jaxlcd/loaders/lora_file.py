"""UNet LoRA files as diffusers reads and writes them (``pytorch_lora_weights.safetensors``).

    path = save_lora(out_dir, adapters, rank=64, alpha=64)        # pipe.load_lora_weights(out_dir) in diffusers
    adapters = load_lora(path_or_dir, unet_params)                 # scale folded in: use it with scale 1.0

Written in PEFT's key form, which `diffusers.loaders.StableDiffusionLoraLoaderMixin.load_lora_weights` loads as is:
``unet.<module>.lora_A.weight`` [r, in] (a conv: [r, in, kh, kw]) and ``unet.<module>.lora_B.weight`` [out, r]
(a conv: [out, r, 1, 1]), float32 or float16, with the LoraConfig (r, lora_alpha, target_modules) in the
safetensors metadata key ``lora_adapter_metadata`` ("unet."-prefixed JSON, as diffusers' ``save_lora_weights``
writes it). Every key is in one form: diffusers drops attention layers of files that mix forms (diffusers#11790).

Read: that form, diffusers' older ``unet.<module>.lora.down.weight`` / ``lora.up`` form, and the kohya form of
the hub's LCM-LoRA files (``lora_unet_<module with _>.lora_down.weight`` / ``lora_up`` / ``alpha``). Scales: the
metadata's lora_alpha / r (``use_rslora``: / sqrt(r); alpha_pattern / rank_pattern per module), a kohya
``alpha`` per module, else 1 (diffusers' rule for files without alphas).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Mapping

import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlcd.models.lora import linear_layers, module_name
from jaxlcd.weights.io import read_tensor_file
from jaxlcd.weights.tables import WeightsError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_PEFT = re.compile(r"(?:unet\.)?(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight")
_KOHYA = re.compile(r"lora_unet_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)")


def _layers(adapters: Mapping) -> dict:
    return traverse_util.flatten_dict(dict(adapters), is_leaf=lambda _, v: isinstance(v, Mapping) and "a" in v)


def save_lora(out_dir: str, adapters: Mapping, rank: int, alpha: float, dtype=np.float32) -> str:
    """Write ``adapters`` (a `jaxlcd.models.lora` tree, unscaled) as ``out_dir/pytorch_lora_weights.safetensors``
    with scale ``alpha / rank``; returns the file's path."""
    tensors, names = {}, []
    for path, ab in _layers(adapters).items():
        name = module_name(path)
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        if a.ndim == 4:   # conv: a [kh,kw,in,r] -> [r,in,kh,kw]; b [r,out] -> [out,r,1,1]
            a, b = a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
        else:
            a, b = a.T, b.T
        tensors[f"unet.{name}.lora_A.weight"] = np.ascontiguousarray(a, dtype)
        tensors[f"unet.{name}.lora_B.weight"] = np.ascontiguousarray(b, dtype)
        names.append(name)
    config = {"unet.r": int(rank), "unet.lora_alpha": float(alpha), "unet.target_modules": sorted(names),
              "unet.init_lora_weights": True, "unet.lora_dropout": 0.0}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, WEIGHT_NAME)
    save_file(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)})
    return path


def lora_file(path: str) -> str:
    """The weights file of a LoRA folder (``pytorch_lora_weights.safetensors`` or its only .safetensors) or ``path``
    itself when it is a file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise WeightsError(f"LoRA path {path!r} does not exist")
    if os.path.isfile(os.path.join(path, WEIGHT_NAME)):
        return os.path.join(path, WEIGHT_NAME)
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    if len(files) != 1:
        raise WeightsError(f"LoRA folder {path!r} has no {WEIGHT_NAME} and {len(files)} other weights files; pass "
                           "the file itself")
    return os.path.join(path, files[0])


def _metadata(path: str) -> dict:
    if not path.endswith(".safetensors"):
        return {}
    with safe_open(path, "np") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: the {METADATA_KEY} metadata is not valid JSON ({e})") from None
    return {k[len("unet."):]: v for k, v in meta.items() if k.startswith("unet.")}


def load_lora(path: str, unet_params: Mapping, allow_pickle: bool = False) -> dict:
    """The adapter tree (float32, each ``b`` already multiplied by its layer's scale: apply it with scale 1) of the
    LoRA file or folder ``path`` for a UNet with params ``unet_params``. One sentence (WeightsError) for a file
    with text-encoder layers, a layer the UNet does not have, a missing half or a shape that does not fit."""
    file = lora_file(path)
    tensors = read_tensor_file(file, allow_pickle)
    meta = _metadata(file)
    if meta.get("use_dora"):
        raise WeightsError(f"{file} is a DoRA adapter (use_dora), which jaxlcd does not load")
    by_name = {module_name(p): (p, shape) for p, shape in linear_layers(unet_params).items()}
    kohya = {n.replace(".", "_"): n for n in by_name}
    parts: dict = {}
    for key, value in tensors.items():
        if key.startswith(("text_encoder", "lora_te")):
            raise WeightsError(f"{file} holds text-encoder LoRA layers ({key!r}); jaxlcd loads UNet LoRAs only")
        m, k = _PEFT.fullmatch(key), _KOHYA.fullmatch(key)
        if m:
            name, part = m[1], "a" if m[2] in ("lora_A", "lora.down") else "b"
        elif k and k[1] in kohya:
            name, part = kohya[k[1]], {"lora_down.weight": "a", "lora_up.weight": "b", "alpha": "alpha"}[k[2]]
        else:
            raise WeightsError(f"{file}: {key!r} is not a UNet LoRA key this UNet has (expected "
                               "unet.<module>.lora_A.weight / lora_B.weight, or kohya lora_unet_... keys)")
        if name not in by_name:
            raise WeightsError(f"{file}: {key!r} adapts {name!r}, a layer this UNet does not have")
        parts.setdefault(name, {})[part] = np.asarray(value, np.float32)
    if not parts:
        raise WeightsError(f"{file} holds no LoRA layers")
    flat = {}
    for name, ab in sorted(parts.items()):
        if "a" not in ab or "b" not in ab:
            raise WeightsError(f"{file}: the LoRA layer {name!r} has only one of its two matrices")
        path, kernel = by_name[name]
        a, b = ab["a"], ab["b"]
        rank = a.shape[0]
        if len(kernel) == 4:   # [r,in,kh,kw] -> [kh,kw,in,r]; [out,r,1,1] -> [r,out]
            a, b = (a.transpose(2, 3, 1, 0) if a.ndim == 4 else None), b.reshape(b.shape[:2]).T
        else:
            a, b = (a.T if a.ndim == 2 else None), b.reshape(b.shape[:2]).T
        if a is None or a.shape != tuple(kernel[:-1]) + (rank,) or b.shape != (rank, kernel[-1]):
            raise WeightsError(f"{file}: the LoRA matrices of {name!r} have shapes {ab['a'].shape} and {ab['b'].shape}, "
                               f"which do not fit the layer's kernel {kernel} (PyTorch layout)")
        flat[path + ("a",)], flat[path + ("b",)] = a, b * _scale(name, rank, ab.get("alpha"), meta)
    return traverse_util.unflatten_dict(flat)


def _scale(name: str, rank: int, kohya_alpha, meta: dict) -> float:
    if kohya_alpha is not None:
        return float(kohya_alpha) / rank
    if not meta:
        return 1.0
    alpha = dict(meta.get("alpha_pattern") or {}).get(name, meta.get("lora_alpha", rank))
    r = dict(meta.get("rank_pattern") or {}).get(name, meta.get("r", rank))
    return float(alpha) / (math.sqrt(r) if meta.get("use_rslora") else r)
