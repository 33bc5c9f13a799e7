"""Pre-encoded training data (`python -m jaxlcd.encode`): the teacher's VAE posterior moments and text embeddings
of every image-caption pair, so training skips the VAE encoder and the text encoder.

Layout of an encoded folder: ``encoded.json`` (what wrote it, see `write_metadata`) and array_record files
``part-PPPPP-NNNNN.array_record``; one record per example: the moments bytes ([h, w, 2c], the mean and log-variance
of the latent posterior: training still samples the latent), then the text-embedding bytes ([77, D]), then the
caption as UTF-8 (kept for reward models and the LRM, which tokenise it themselves). Shapes and dtype are in
``encoded.json``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np

from jaxlcd.errors import InputError

METADATA = "encoded.json"
FORMAT = 1


def is_encoded(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, METADATA))


def read_metadata(folder: str) -> dict:
    with open(os.path.join(folder, METADATA)) as f:
        return json.load(f)


def teacher_fingerprint(teacher_dir: str) -> str:
    """sha256 over the VAE and text-encoder weight files of a pipeline folder (what the encoding depends on)."""
    h = hashlib.sha256()
    for sub in ("vae", "text_encoder"):
        for path in sorted(glob.glob(os.path.join(os.path.realpath(teacher_dir), sub, "*.safetensors"))):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def pack(moments: np.ndarray, ctx: np.ndarray, caption: str) -> bytes:
    """One record: moments bytes + ctx bytes + UTF-8 caption."""
    return moments.tobytes() + ctx.tobytes() + caption.encode("utf-8")


class EncodedSource:
    """grain random-access source over an encoded folder: element i -> {"moments" [h, w, 2c] float32,
    "ctx" [77, D] float32, "caption" str}."""

    def __init__(self, folder: str):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        meta = read_metadata(folder)
        self.dtype = np.dtype(meta["dtype"]) if meta["dtype"] != "bfloat16" else _bfloat16()
        self.moments_shape, self.ctx_shape = tuple(meta["moments_shape"]), tuple(meta["ctx_shape"])
        self.moments_bytes = int(np.prod(self.moments_shape)) * self.dtype.itemsize
        self.ctx_bytes = int(np.prod(self.ctx_shape)) * self.dtype.itemsize
        files = sorted(glob.glob(os.path.join(folder, "part-*.array_record")))
        if not files:
            raise InputError(f"{folder!r} has {METADATA} but no part-*.array_record files")
        self.source = ArrayRecordDataSource(files)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        raw = self.source[i]
        m_end, c_end = self.moments_bytes, self.moments_bytes + self.ctx_bytes
        moments = np.frombuffer(raw[:m_end], self.dtype).reshape(self.moments_shape).astype(np.float32)
        ctx = np.frombuffer(raw[m_end:c_end], self.dtype).reshape(self.ctx_shape).astype(np.float32)
        return {"moments": moments, "ctx": ctx, "caption": raw[c_end:].decode("utf-8", errors="replace")}


def _bfloat16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def check_matches(folder: str, teacher_dir: str, resolution: int) -> None:
    """One sentence when encoded data was made by another teacher (VAE/text weights) or at another resolution."""
    meta = read_metadata(folder)
    if meta.get("format") != FORMAT:
        raise InputError(f"{folder!r} was encoded in format {meta.get('format')}; this jaxlcd reads {FORMAT}: "
                         "encode it again with python -m jaxlcd.encode")
    if meta["resolution"] != resolution:
        raise InputError(f"{folder!r} was encoded at resolution {meta['resolution']}, this run trains at "
                         f"{resolution}; pass --config.resolution={meta['resolution']} or encode again")
    if meta["teacher_fingerprint"] != teacher_fingerprint(teacher_dir):
        raise InputError(f"{folder!r} was encoded with the VAE and text encoder of {meta['teacher']!r}, not those of "
                         f"this run's teacher {teacher_dir!r}; encode the data with this teacher")
