"""The grain training pipeline over a prepared folder dataset (see `jaxlcd.data.folder`).

Per host: array_record source -> even split into ``shard_count`` disjoint shards -> global shuffle
(reseeded every epoch) -> repeat -> [threads or worker processes] decode (PIL, EXIF orientation, alpha
on white) + resize shorter side (bicubic, antialiased) + centre/random crop + optional flip + scale to
[-1, 1] + tokenise -> [main process] drop and count records that failed -> batch (drop remainder).

Every random choice is a function of (seed, shard, element index), so the stream is deterministic
for a seed and `TrainIterator.get_state` / `set_state` resume exactly at the next batch.
"""
from __future__ import annotations

import io
import json
import logging
import threading
from collections import Counter

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from jaxlcd.data import encoded, shards
from jaxlcd.data.folder import version_dir
from jaxlcd.tokenizer import tokenize
from jaxlcd.errors import InputError

log = logging.getLogger(__name__)

_SKIP = "_skip"  # key of the sentinel element a failed record turns into
_LOG_FIRST = 10  # skips logged one by one; after that every 100th


class DataStats:
    """Thread-safe counts of records skipped at read time, by reason (``"corrupt_image"``,
    ``"empty_caption"``), plus ``"examples"`` (records that reached a batch, remainder dropped included)."""

    def __init__(self, counts: dict | None = None):
        self._lock = threading.Lock()
        self.counts: Counter = Counter(counts or {})

    def keep(self, element: dict) -> bool:
        """grain filter: False (and count + log) for a skip sentinel, True otherwise."""
        reason = element.get(_SKIP)
        with self._lock:
            if reason is None:
                self.counts["examples"] += 1
                return True
            self.counts[reason] += 1
            n = sum(v for k, v in self.counts.items() if k != "examples")
        if n <= _LOG_FIRST or n % 100 == 0:
            log.warning("data: skipped record %r (%s): %s; %d skipped so far %s", element.get("file"), reason,
                        element.get("error", ""), n, self.as_dict())
        return False

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: int(v) for k, v in sorted(self.counts.items())}

    def __getstate__(self):  # picklable (the lock is not)
        return {"counts": self.as_dict()}

    def __setstate__(self, state):
        self.__init__(state["counts"])


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _resize_crop(img: Image.Image, resolution: int, rng: np.random.Generator | None, flip: bool) -> np.ndarray:
    """PIL image -> [R, R, 3] uint8: shorter side to R (bicubic), crop (random when rng), maybe flip."""
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)  # PIL filters antialias
    if rng is None:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left = int(rng.integers(0, size[0] - resolution + 1))
        top = int(rng.integers(0, size[1] - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


class _Decode:
    """grain random_map: record -> {"pixels", "input_ids", "caption"} or a skip sentinel."""

    def __init__(self, tokenizer, resolution: int, random_crop: bool, random_flip: bool, min_size: int = 0):
        self.tokenizer, self.resolution, self.min_size = tokenizer, resolution, min_size
        self.random_crop, self.random_flip = random_crop, random_flip

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        file = _text(record.get("file", b""))
        caption = _text(record.get("caption", b"")).strip()
        if not caption:
            return {_SKIP: "empty_caption", "file": file}
        try:
            with Image.open(io.BytesIO(record["image"])) as img:
                if min(img.size) < self.min_size:
                    return {_SKIP: "too_small", "file": file, "error": f"{img.size[0]}x{img.size[1]}"}
                img.draft(None, (self.resolution, self.resolution))  # JPEG: decode at a reduced scale
                rgb = _to_rgb(img)
            flip = self.random_flip and bool(rng.random() < 0.5)
            pixels = _resize_crop(rgb, self.resolution, rng if self.random_crop else None, flip)
        except Exception as e:  # any PIL failure on a bad record: skip it, never crash the run
            return {_SKIP: "corrupt_image", "file": file, "error": f"{type(e).__name__}: {e}"}
        return {"pixels": pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
                "input_ids": tokenize(self.tokenizer, [caption])[0], "caption": caption}


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _collate(elements) -> dict:
    """Stack a batch: every array key, plus "caption" as an object array of str."""
    out = {k: np.stack([e[k] for e in elements]) for k in elements[0] if k != "caption"}
    if "input_ids" in out:
        out["input_ids"] = out["input_ids"].astype(np.int32)
    out["caption"] = np.array([e["caption"] for e in elements], dtype=object)
    return out


class TrainIterator:
    """Iterator of host-local batches (see `make_train_iterator`) with checkpointable state.

    ``get_state()`` -> bytes (UTF-8 JSON: grain's iterator state + the skip counts); ``set_state(bytes)``
    continues exactly after the batch at which the state was taken. This is the interface of
    ``grain.checkpoint.CheckpointSave/CheckpointRestore`` (orbax), which write it per process as JSON.
    """

    def __init__(self, dataset: grain.IterDataset, stats: DataStats, num_examples: int):
        self._iter = iter(dataset)
        self.stats = stats
        self.num_examples = num_examples  # records in this host's shard (one epoch)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iter)

    def get_state(self) -> bytes:
        return json.dumps({"grain": self._iter.get_state(), "stats": self.stats.as_dict()}).encode("utf-8")

    def set_state(self, state: bytes | str | dict) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        self._iter.set_state(state["grain"])
        with self.stats._lock:
            self.stats.counts = Counter(state.get("stats", {}))

    def close(self) -> None:
        """Stops worker processes / threads (call before exit when ``worker_count > 0``)."""
        if hasattr(self._iter, "close"):
            self._iter.close()

    def start_prefetch(self) -> None:
        """Called by grain's orbax CheckpointHandler after restore; starts worker prefetch early."""
        if hasattr(self._iter, "start_prefetch"):
            self._iter.start_prefetch()


def make_train_iterator(data_dir: str, *, tokenizer, resolution: int, batch_size_per_host: int, seed: int,
                        random_crop: bool = False, random_flip: bool = False, shard_index: int | None = None,
                        shard_count: int | None = None, num_epochs: int | None = None, worker_count: int = 0,
                        num_threads: int = 8, prefetch_buffer_size: int = 64, min_size: int = 0,
                        drop_remainder: bool = True) -> TrainIterator:
    """Host-local training batches from a dataset prepared by `prepare_folder_dataset`, from webdataset shards
    indexed by `jaxlcd.data.shards.index_shards` (``data_dir``: the index folder), or from data pre-encoded by
    `jaxlcd.encode` (batches of ``"moments"`` [B, h, w, 2c] and ``"ctx"`` [B, 77, D] float32 + ``"caption"``).

    Yields dicts: ``"pixels"`` [B, R, R, 3] float32 in [-1, 1] (NHWC, R = ``resolution``),
    ``"input_ids"`` [B, 77] int32 (``jaxlcd.tokenizer.tokenize`` of the caption), ``"caption"`` [B]
    object array of str; B = ``batch_size_per_host`` (the last partial batch is dropped).

    shard_index / shard_count default to ``jax.process_index()`` / ``jax.process_count()``: each host
    reads a disjoint, equal-sized slice (the last ``len % shard_count`` records are left out; with
    ``drop_remainder=False`` they are read too, and the last batch may be smaller).
    num_epochs None repeats forever (use that on multi-host runs: with a finite number of epochs,
    records skipped at read time could give hosts different numbers of batches).
    worker_count > 0 decodes in that many processes (grain mp_prefetch); otherwise ``num_threads``
    threads of this process read ahead up to ``prefetch_buffer_size`` records.
    Records that fail to decode, have an empty caption or an image side under ``min_size`` are skipped and counted
    in ``.stats``.
    """
    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise InputError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
    if resolution <= 0 or batch_size_per_host <= 0:
        raise InputError(f"resolution ({resolution}) and batch_size_per_host ({batch_size_per_host}) must be > 0")
    if encoded.is_encoded(data_dir):
        source = encoded.EncodedSource(data_dir)
    elif shards.is_shard_index(data_dir):
        source = shards.ShardSource(data_dir)
    else:
        source = tfds.builder_from_directory(version_dir(data_dir)).as_data_source(
            "train", decoders={"image": tfds.decode.SkipDecoding()})
    per_shard = len(source) // shard_count
    if per_shard < batch_size_per_host and drop_remainder:
        raise InputError(f"{data_dir!r} has {len(source)} records, {per_shard} per host for {shard_count} hosts: "
                         f"fewer than one batch of {batch_size_per_host}; lower the batch size or add images")
    ds = grain.MapDataset.source(source)
    ds = (ds[: per_shard * shard_count] if drop_remainder else ds)[shard_index::shard_count]
    ds = ds.shuffle(seed=seed % 2**32).repeat(num_epochs)
    crop_seed = (seed * 1_000_003 + shard_index) % 2**32  # per-host crops/flips
    if not encoded.is_encoded(data_dir):
        ds = ds.random_map(_Decode(tokenizer, resolution, random_crop, random_flip, min_size), seed=crop_seed)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    if worker_count > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app.run use defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    stats = DataStats()
    it_ds = it_ds.filter(stats.keep).batch(batch_size_per_host, drop_remainder=drop_remainder, batch_fn=_collate)
    return TrainIterator(it_ds, stats, per_shard)
