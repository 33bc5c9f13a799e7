"""Turn a trusted pickle reward checkpoint into the safetensors folder `load_reward` reads.

    python -m jaxlcd.rewards.convert --allow-pickle HPS_v2.1_compressed.pt out/hpsv2.1 --kind open_clip:ViT-H-14
    python -m jaxlcd.rewards.convert --allow-pickle ImageReward.pt out/imagereward --kind imagereward \\
        --med-config med_config.json
    python -m jaxlcd.rewards.convert --allow-pickle sa_0_4_vit_l_14_linear.pth out/clip-l --kind aesthetic_head
    python -m jaxlcd.rewards.convert --allow-pickle pt_inception-2015-12-05-6726825d.pth out/fid_inception.safetensors \
        --kind fid_inception     # FID Inception (pytorch-fid's or torch-fidelity's file) for jaxlcd.metrics.fid

Pickle files can run arbitrary code when loaded: nothing is read without ``--allow-pickle`` (and torch's
``weights_only`` loader is used even then). The output holds only tensors (safetensors) and JSON configs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from safetensors.numpy import save_file

from jaxlcd.weights.io import read_tensor_file
from jaxlcd.errors import InputError, JaxlcdError

# open_clip model configs (open_clip/model_configs/*.json) of the reward models' towers
OPEN_CLIP_CONFIGS = {
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-L-14": {"embed_dim": 768,
                 "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
}
KINDS = tuple(f"open_clip:{k}" for k in OPEN_CLIP_CONFIGS) + ("imagereward", "aesthetic_head", "fid_inception", "raw")
FID_INCEPTION_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight")


def convert(src: str, out_dir: str, kind: str, med_config: str = "", allow_pickle: bool = False) -> str:
    """Write ``out_dir`` for ``kind`` from the checkpoint ``src``; returns the main file written. For
    ``fid_inception``, ``out_dir`` may name the ``.safetensors`` file itself."""
    if kind not in KINDS:
        raise InputError(f"unknown --kind {kind!r}; use one of {', '.join(KINDS)}")
    tensors = read_tensor_file(src, allow_pickle=allow_pickle)
    tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}  # DDP saves
    if kind == "fid_inception":
        missing = [k for k in FID_INCEPTION_KEYS if k not in tensors]
        if missing:
            raise InputError(f"{src} is not the FID Inception state dict (no {missing[0]!r})")
        out = out_dir if out_dir.endswith(".safetensors") else os.path.join(out_dir, "fid_inception.safetensors")
        out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    if kind == "fid_inception":
        pass
    elif kind.startswith("open_clip:"):
        with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": OPEN_CLIP_CONFIGS[kind.split(":", 1)[1]], "preprocess_cfg": {}}, f, indent=2)
        out = os.path.join(out_dir, "open_clip_model.safetensors")
    elif kind == "imagereward":
        if not os.path.isfile(med_config):
            raise InputError("--kind imagereward needs --med-config (the med_config.json shipped with ImageReward)")
        shutil.copy(med_config, os.path.join(out_dir, "med_config.json"))
        out = os.path.join(out_dir, "model.safetensors")
    elif kind == "aesthetic_head":
        if set(tensors) != {"weight", "bias"}:
            raise InputError(f"{src}: the aesthetic head must hold exactly 'weight' and 'bias', found {sorted(tensors)}")
        out = os.path.join(out_dir, "aesthetic_head.safetensors")
    else:
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + ".safetensors")
    save_file({k: v.copy() for k, v in tensors.items()}, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="the checkpoint (.pt/.pth/.bin pickle, or .safetensors)")
    p.add_argument("out_dir")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--med-config", default="", help="ImageReward's med_config.json (--kind imagereward)")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickle checkpoint (only if you trust it)")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.out_dir, args.kind, args.med_config, args.allow_pickle)
    except JaxlcdError as e:
        print(f"jaxlcd.rewards.convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
