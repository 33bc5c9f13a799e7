"""webdataset tar shards as a random-access source for the grain pipeline (`jaxlcd.data.pipeline`).

``data_dir`` names shards as webdataset does: a folder of ``*.tar``, one ``.tar``, a brace pattern
(``/data/cc12m/{00000..01090}.tar``), or a text file listing one shard per line; any of them may be ``gs://``.
A sample is the tar members sharing a key (the member path up to the first dot of its file name): an image
(jpg/jpeg/png/webp) and a caption (``txt``, or ``json`` with a ``caption`` or ``text`` field).

The shards are never copied. `index_shards` reads each shard's tar headers once (seeking past the data) and records
where every sample's image and caption bytes are; `ShardSource` reads those byte ranges on demand. That gives grain
random access, hence its global per-epoch shuffle, parallel decoding and exact resume (sample granularity) on shards
exactly as on the prepared folder data. (webdataset's streaming reader resumes only at shard granularity with a
shuffle buffer; its indexed reader `wids` copies remote shards to a local cache first.)

Samples without an image or caption and members cut short by a truncated shard are skipped and counted while
indexing; corrupt images and empty captions are skipped at read time by the pipeline.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxlcd import storage
from jaxlcd.errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
INDEX_FILE = "shards_index.npz"
META_FILE = "shards_index.json"
INDEX_THREADS = 16
SKIP_REASONS = ("missing_image", "missing_caption", "truncated_member", "unreadable_shard", "filtered")


def is_shard_spec(data_dir: str) -> bool:
    """True when ``data_dir`` names webdataset shards (see the module docstring) rather than an image folder."""
    if "{" in data_dir or data_dir.endswith((".tar", ".txt", ".shards")):
        return True
    path = storage.epath(data_dir)
    return path.is_dir() and any(p.name.endswith(".tar") for p in path.iterdir())


def expand_shards(data_dir: str) -> list[str]:
    """The shard paths ``data_dir`` names, in order (a folder's ``*.tar`` sorted by name)."""
    if "{" in data_dir:
        from braceexpand import braceexpand
        shards = list(braceexpand(data_dir))
    elif data_dir.endswith((".txt", ".shards")):
        lines = storage.read_text(data_dir).splitlines()
        shards = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    elif data_dir.endswith(".tar"):
        shards = [data_dir]
    else:
        shards = sorted(str(p) for p in storage.epath(data_dir).iterdir() if p.name.endswith(".tar"))
    if not shards:
        raise InputError(f"config.data_dir={data_dir!r} names no .tar shards")
    return shards


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: "dir/000123.seg.jpg" -> ("dir/000123", "seg.jpg")."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(head, stem), ext.lower()


def _json_caption(data: bytes) -> str:
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return ""
    return str(meta.get("caption") or meta.get("text") or "") if isinstance(meta, dict) else ""


def _passes(meta_bytes: bytes, filters: dict) -> bool:
    """LAION-style metadata filters: ``max_watermark`` on "pwatermark", ``min_aesthetic`` on "aesthetic"; a sample
    whose json lacks the field passes."""
    try:
        meta = json.loads(meta_bytes)
    except (ValueError, UnicodeDecodeError):
        return True
    if not isinstance(meta, dict):
        return True
    wm, aesthetic = meta.get("pwatermark"), meta.get("aesthetic")
    if wm is not None and filters.get("max_watermark", 1.0) < 1.0 and float(wm) > filters["max_watermark"]:
        return False
    if aesthetic is not None and filters.get("min_aesthetic", 0.0) > 0 and float(aesthetic) < filters["min_aesthetic"]:
        return False
    return True


def _scan_members(f, path: str, skipped: Counter) -> dict[str, dict]:
    """{sample key: {extension: (data offset, size)}} from the tar headers of open shard ``f``; a member cut short, a
    cut-off header or a damaged archive counts as "truncated_member" and ends the scan with what was read."""
    f.seek(0, os.SEEK_END)
    total = f.tell()
    f.seek(0)
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > total:
                    skipped["truncated_member"] += 1
                    continue
                key, ext = _split_name(member.name)
                samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
            end = tar.offset   # tarfile stops quietly at a cut-off header: what follows must be zeros
        f.seek(end)
        if f.read(min(total - end, 1 << 20)).strip(b"\0"):
            raise tarfile.ReadError(f"non-zero bytes after the last complete member at byte {end}")
    except (tarfile.TarError, EOFError) as e:
        log.warning("data: shard %s is cut off or damaged (%s); using its %d samples before that", path, e,
                    len(samples))
        skipped["truncated_member"] += 1
    return samples


def _index_one(shard_id: int, path: str, filters: dict, skipped: Counter) -> list[tuple]:
    """[(shard_id, image offset, image size, caption offset, caption size, caption is json)] of one shard."""
    rows = []
    try:
        with storage.open_file(path, "rb") as f:
            for parts in _scan_members(f, path, skipped).values():
                image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
                caption_ext = next((e for e in CAPTION_EXTENSIONS if e in parts), None)
                if image is None or caption_ext is None:
                    skipped["missing_image" if image is None else "missing_caption"] += 1
                    continue
                if filters and "json" in parts:
                    f.seek(parts["json"][0])
                    if not _passes(f.read(parts["json"][1]), filters):
                        skipped["filtered"] += 1
                        continue
                rows.append((shard_id, *image, *parts[caption_ext], caption_ext == "json"))
    except OSError as e:
        log.warning("data: cannot read shard %s (%s); skipped", path, e)
        skipped["unreadable_shard"] += 1
        return []
    return rows


def read_index_meta(out_dir: str) -> dict | None:
    """The stats `index_shards` wrote in ``out_dir`` (None when there is no index)."""
    try:
        with open(os.path.join(out_dir, META_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def index_shards(data_dir: str, out_dir: str, filters: dict | None = None) -> dict:
    """Index the shards of ``data_dir`` into ``out_dir`` (once; reused when it names the same shards and filters).
    Returns the stats ``{"count", "shards", "skipped": {reason: n}, "src_dir", "filters", "shard_paths"}``."""
    filters = {k: float(v) for k, v in (filters or {}).items() if k in ("max_watermark", "min_aesthetic")}
    shards = expand_shards(data_dir)
    meta = read_index_meta(out_dir)
    if meta is not None and meta["shard_paths"] == shards and meta["filters"] == filters:
        return meta
    from tqdm import tqdm

    counters = [Counter() for _ in shards]
    with ThreadPoolExecutor(INDEX_THREADS) as pool:   # reading headers is I/O: seeks, and round trips on gs://
        per_shard = pool.map(lambda i: _index_one(i, shards[i], filters, counters[i]), range(len(shards)))
        rows = [row for shard_rows in tqdm(per_shard, total=len(shards), desc="indexing shards", unit="shard")
                for row in shard_rows]
    skipped = sum(counters, Counter())
    if not rows:
        raise InputError(f"config.data_dir={data_dir!r}: its {len(shards)} shards hold no usable image-caption "
                         f"sample (skipped: {dict(skipped) or 'none'})")
    os.makedirs(out_dir, exist_ok=True)
    table = np.array([r[:5] for r in rows], np.int64)
    np.savez(os.path.join(out_dir, INDEX_FILE), table=table, is_json=np.array([r[5] for r in rows], bool))
    meta = {"count": len(rows), "shards": len(shards), "skipped": {r: skipped[r] for r in SKIP_REASONS},
            "src_dir": data_dir, "filters": filters, "shard_paths": shards}
    storage.write_text(os.path.join(out_dir, META_FILE), json.dumps(meta))
    log.info("indexed %d samples in %d shards of %s; skipped: %s", len(rows), len(shards), data_dir,
             {k: v for k, v in skipped.items() if v} or "none")
    return meta


def is_shard_index(folder: str) -> bool:
    """True when ``folder`` holds an index written by `index_shards`."""
    return os.path.isfile(os.path.join(folder, META_FILE))


class ShardSource:
    """grain random-access source over an index written by `index_shards`: element i ->
    ``{"image": bytes, "caption": str, "file": "shard#offset"}``. Thread-safe (one file handle per read)."""

    def __init__(self, index_dir: str):
        self.shards = read_index_meta(index_dir)["shard_paths"]
        data = np.load(os.path.join(index_dir, INDEX_FILE))
        self.table, self.is_json = data["table"], data["is_json"]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        shard, img_off, img_size, cap_off, cap_size = (int(v) for v in self.table[i])
        path = self.shards[shard]
        try:
            with storage.open_file(path, "rb") as f:
                f.seek(img_off)
                image = f.read(img_size)
                f.seek(cap_off)
                raw = f.read(cap_size)
        except OSError as e:   # the decode step skips it as a corrupt image
            return {"image": b"", "caption": f"unreadable shard {path}: {e}", "file": f"{path}#{img_off}"}
        caption = _json_caption(raw) if self.is_json[i] else raw.decode("utf-8", errors="replace")
        return {"image": image, "caption": caption, "file": f"{path}#{img_off}"}
