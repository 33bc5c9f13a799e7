"""Model locations: a local folder, or a Hugging Face hub id ``org/name`` (optionally ``org/name@revision``).

A hub id is fetched once with huggingface_hub into its standard cache (``HF_HUB_CACHE``, by default
~/.cache/huggingface/hub), only the files jaxlcd reads (safetensors, json, tokenizer files); later runs, and runs
with ``HF_HUB_OFFLINE=1``, use the cached copy. Local folders always win: a path that exists is never looked up.
Cloud-storage folders (``gs://bucket/model``) are copied once to local disk (`jaxlcd.storage.local_copy`).
"""
from __future__ import annotations

import os
import re

from jaxlcd.errors import InputError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# what load_component, load_pipeline and load_reward read: configs, safetensors weights, tokenizer files
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model")


def is_hub_id(path: str) -> bool:
    """True for ``org/name[@revision]`` that is not an existing local path."""
    return bool(path) and not os.path.exists(os.path.expanduser(path)) and HUB_ID.match(path) is not None


def resolve_model_path(path: str, key: str = "path", variant: str = "") -> str:
    """A local folder for ``path``: itself (user-expanded) when it is not a hub id, else the cached snapshot of the
    hub repository (fetched first when online), or the local copy of a ``gs://`` folder. ``key`` names the setting in
    errors (e.g. "config.teacher"). With ``variant`` (e.g. "fp16") the weights ``*.fp16.safetensors`` are used where
    a folder has them (only those are fetched from the hub), through `variant_view`."""
    from jaxlcd import storage

    if storage.is_remote(path):
        folder = storage.local_copy(path, key)
    elif not is_hub_id(path):
        folder = os.path.expanduser(path) if path else path
    else:
        folder = _hub_snapshot(path, key, variant)
    return variant_view(folder, variant) if variant and folder else folder


def _variant_patterns(variant: str) -> list[str]:
    """What to fetch for ``variant``: every non-weight file plus the variant's weights (and shard indices)."""
    weights = [f"*.{variant}.safetensors", f"*.safetensors.index.{variant}.json"]
    return [p for p in MODEL_FILES if not p.endswith(".safetensors")] + weights + [f"*/{w}" for w in weights]


def _hub_snapshot(path: str, key: str, variant: str) -> str:
    """The cached snapshot folder of hub id ``path`` (fetched first when online); one sentence when unavailable."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    m = HUB_ID.match(path)
    repo, revision = m.group("repo"), m.group("revision")
    offline = bool(constants.HF_HUB_OFFLINE)
    fetch = f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision else "") + \
        " --include '*.json' '*.safetensors' '*.txt'"
    try:
        if not variant:
            return snapshot_download(repo, revision=revision, allow_patterns=list(MODEL_FILES),
                                     local_files_only=offline)
        folder = snapshot_download(repo, revision=revision, allow_patterns=_variant_patterns(variant),
                                   local_files_only=offline)
        plain = _weight_folders_without(folder, variant)
        if plain and not offline:   # folders without the variant: their plain weights, as diffusers does
            folder = snapshot_download(repo, revision=revision, local_files_only=False, allow_patterns=[
                f"{d}/*.safetensors" if d else "*.safetensors" for d in plain])
        return folder
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise InputError(f"{key}={path!r} is neither a local folder nor in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and {where}; fetch it once online with: {fetch}") from None
    except RepositoryNotFoundError:
        raise InputError(f"{key}={path!r}: no such repository on the Hugging Face hub (or it is private: log in "
                         "with `huggingface-cli login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"{key}={path!r}: fetching it from the Hugging Face hub failed ({e}); pass a local "
                         f"folder, or fetch it with: {fetch}") from None


def _weight_folders_without(folder: str, variant: str) -> list[str]:
    """Sub-folders (relative; "" for ``folder`` itself) holding a config.json but no ``*.{variant}.safetensors``."""
    out = []
    for root, _, names in os.walk(folder):
        if "config.json" in names and not any(n.endswith(f".{variant}.safetensors") for n in names):
            out.append(os.path.relpath(root, folder).replace(os.sep, "/") if root != folder else "")
    return out


def variant_view(folder: str, variant: str) -> str:
    """A folder of symbolic links to ``folder``'s files in which ``<stem>.<variant>.safetensors`` (and sharded
    ``.safetensors.index.<variant>.json``) appear under their plain names, replacing the plain weights of the same
    folder; sub-folders without the variant keep their plain weights. Built once in ``JAXLCD_CACHE/variants``."""
    import hashlib

    from jaxlcd.storage import cache_root

    real = os.path.realpath(folder)
    tag = hashlib.sha1(f"{real}:{variant}".encode()).hexdigest()[:12]
    view = os.path.join(cache_root(), "variants", f"{os.path.basename(real)}-{variant}-{tag}")
    if os.path.isdir(view):
        return view
    marker = f".{variant}."
    tmp = f"{view}.tmp-{os.getpid()}"
    for root, _, names in os.walk(real):
        rel = os.path.relpath(root, real)
        os.makedirs(os.path.join(tmp, rel), exist_ok=True)
        has_variant = any(marker in n and n.endswith((".safetensors", ".json")) for n in names)
        for name in names:
            if marker in name:
                plain = name.replace(marker, ".", 1)
            elif has_variant and f".{variant}" not in name and name.endswith((".safetensors", ".safetensors.index.json")):
                continue   # plain weights, replaced by the variant (whose shards are named "<stem>.fp16-0000N-...")
            else:
                plain = name
            os.symlink(os.path.realpath(os.path.join(root, name)), os.path.join(tmp, rel, plain))
    try:
        os.rename(tmp, view)
    except OSError:   # another process built it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return view
