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


def resolve_model_path(path: str, key: str = "path") -> str:
    """A local folder for ``path``: itself (user-expanded) when it is not a hub id, else the cached snapshot of the
    hub repository (fetched first when online), or the local copy of a ``gs://`` folder. ``key`` names the setting in
    errors (e.g. "config.teacher")."""
    from jaxlcd import storage

    if storage.is_remote(path):
        return storage.local_copy(path, key)
    if not is_hub_id(path):
        return os.path.expanduser(path) if path else path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    m = HUB_ID.match(path)
    repo, revision = m.group("repo"), m.group("revision")
    offline = bool(constants.HF_HUB_OFFLINE)
    fetch = f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision else "") + \
        " --include '*.json' '*.safetensors' '*.txt'"
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=list(MODEL_FILES), local_files_only=offline)
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
