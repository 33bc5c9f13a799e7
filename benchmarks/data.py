"""Input pipeline images/s (image folder, webdataset shards, pre-encoded) next to the training step's images/s.

    PYTHONPATH=. python benchmarks/data.py [--images 256] [--resolutions 256 512] [--workers 0 2]
                                           [--steps tiny mid] [--steps-tiny 10] [--steps-mid 2]

Pipeline: `jaxlcd.data.make_train_iterator` (what training uses) over the same N web-like JPEGs with ~15-word
captions, written three ways: an image folder with sidecar captions (prepared once into array_record by
`prepare_folder_dataset`; the preparation time is reported), 4 webdataset tar shards (indexed by `index_shards`,
read in place) and a pre-encoded folder as `python -m jaxlcd.encode` writes it (bfloat16 moments [R/8, R/8, 8] and
SD 2.1 text embeddings [77, 1024]; random values: reading cost does not depend on them). Images are 640x480,
768x512 and 1024x768 in turn, JPEG quality 90. Each row decodes, resizes (shorter side to R), random-crops, flips
and tokenises, batch 16, random order, and is timed over 2 epochs after one warm-up batch. ``--workers 0``: grain's
8 reader threads in this process; ``--workers K``: K decoding processes (grain mp_prefetch).

Step: the compiled LCD step of `benchmarks/train_step.py` (tiny at 64 px, mid at 256 px, batch 2, float32, one
device) fed pixels + token ids (VAE and text encoder inside the step) or moments + embeddings (pre-encoded).
Prints markdown tables (copied into BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
from PIL import Image

from common import machine, print_table

SIZES = ((640, 480), (768, 512), (1024, 768))
WORDS = "a photo of red blue small large dog cat house tree river city night morning painting portrait".split()


def web_images(n: int, seed: int = 0):
    """n (JPEG bytes, caption): smooth random colour fields with noise, at SIZES in turn."""
    import io

    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=90)
        yield buf.getvalue(), " ".join(rng.choice(WORDS, 15))


def write_sources(root: str, n: int, resolutions) -> dict:
    """{name: data_dir ready for make_train_iterator} plus the preparation seconds of the folder and shards."""
    from jaxlcd.data import prepare_folder_dataset, shards

    folder, shard_dir = os.path.join(root, "folder"), os.path.join(root, "shards")
    os.makedirs(folder)
    os.makedirs(shard_dir)
    tars = [tarfile.open(os.path.join(shard_dir, f"{s:05d}.tar"), "w") for s in range(4)]
    for i, (jpeg, caption) in enumerate(web_images(n)):
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(jpeg)
        with open(os.path.join(folder, f"{i:06d}.txt"), "w") as f:
            f.write(caption)
        for ext, data in (("jpg", jpeg), ("txt", caption.encode())):
            info = tarfile.TarInfo(f"{i:06d}.{ext}")
            info.size = len(data)
            tars[i % 4].addfile(info, __import__("io").BytesIO(data))
    for t in tars:
        t.close()
    out = {}
    t0 = time.perf_counter()
    prepare_folder_dataset(folder, os.path.join(root, "prepared"))
    out["folder"], out["prepare_folder_s"] = os.path.join(root, "prepared"), time.perf_counter() - t0
    t0 = time.perf_counter()
    shards.index_shards(shard_dir, os.path.join(root, "index"))
    out["shards"], out["index_shards_s"] = os.path.join(root, "index"), time.perf_counter() - t0
    for r in resolutions:
        out[f"encoded{r}"] = write_encoded(os.path.join(root, f"encoded{r}"), n, r)
    return out


def write_encoded(folder: str, n: int, resolution: int) -> str:
    """An encoded folder of n records as `jaxlcd.encode` writes it (bfloat16, SD 2.1 shapes at ``resolution``)."""
    import ml_dtypes
    from array_record.python.array_record_module import ArrayRecordWriter

    from jaxlcd.data import encoded

    os.makedirs(folder)
    rng = np.random.default_rng(0)
    m_shape, c_shape = (resolution // 8, resolution // 8, 8), (77, 1024)
    writer = ArrayRecordWriter(os.path.join(folder, "part-00000-00000.array_record"), "group_size:1")
    for _, caption in zip(range(n), (c for _, c in web_images(n))):
        m = rng.standard_normal(m_shape, np.float32).astype(ml_dtypes.bfloat16)
        c = rng.standard_normal(c_shape, np.float32).astype(ml_dtypes.bfloat16)
        writer.write(encoded.pack(m, c, caption))
    writer.close()
    with open(os.path.join(folder, encoded.METADATA), "w") as f:
        json.dump({"format": encoded.FORMAT, "teacher": "random", "teacher_fingerprint": "", "resolution": resolution,
                   "dtype": "bfloat16", "count": n, "moments_shape": list(m_shape), "ctx_shape": list(c_shape)}, f)
    return folder


def pipeline_rate(data_dir: str, resolution: int, workers: int, n: int, tokenizer, batch: int = 16) -> float:
    """images/s of make_train_iterator over 2 epochs of ``data_dir`` after one warm-up batch."""
    from jaxlcd.data import make_train_iterator

    it = make_train_iterator(data_dir, tokenizer=tokenizer, resolution=resolution, batch_size_per_host=batch, seed=0,
                             random_crop=True, random_flip=True, shard_index=0, shard_count=1, worker_count=workers)
    next(it)
    batches = 2 * n // batch
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t0)
    it.close()
    return rate


def step_rates(name: str, steps: int) -> list[dict]:
    """The compiled LCD step (train_step.py's JaxStep) on pixels + ids and on moments + ctx."""
    import jax

    from train_step import JaxStep, mid_teacher, tiny_teacher

    tmp = tempfile.mkdtemp(prefix="bench_data_step_")
    cfg, teacher = (tiny_teacher(tmp) if name == "tiny" else mid_teacher(tmp))
    b, r = 2, cfg.resolution   # batch 2, as train_step.py
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32)
    ids = np.zeros((b, 77), np.int32)
    rows = []
    step = JaxStep(cfg, teacher, pixels, ids)
    latent = step.run.models.vae.config.latent_channels
    text_dim = step.run.models.text.config.hidden_size
    batches = {"pixels + token ids": None,
               "moments + embeddings": {"moments": rng.standard_normal((b, r // 8, r // 8, 2 * latent), np.float32),
                                        "ctx": rng.standard_normal((b, 77, text_dim), np.float32)}}
    for inputs, batch in batches.items():
        if batch is not None:
            step = JaxStep(cfg, teacher, pixels, ids, batch=batch)
        times = [step() for _ in range(steps + 1)][1:]
        t = float(np.median(times))
        rows.append({"config": name, "px": r, "batch": b, "inputs": inputs, "compile s": step.compile_s,
                     "step s": t, "img/s": b / t, "XLA GFLOP/step": step.gflop})
        del step
        jax.clear_caches()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--steps", nargs="*", default=["tiny", "mid"], choices=["tiny", "mid"])
    ap.add_argument("--steps-tiny", type=int, default=10)
    ap.add_argument("--steps-mid", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    root = tempfile.mkdtemp(prefix="bench_data_")
    from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer

    tokenizer = load_tokenizer(build_clip_tokenizer_files(os.path.join(root, "tokenizer")))
    sources = write_sources(root, args.images, args.resolutions)
    print(f"prepare the folder into array_record: {sources['prepare_folder_s']:.1f} s; index the shards: "
          f"{sources['index_shards_s']:.2f} s ({args.images} images)")
    rows = []
    for r in args.resolutions:
        for workers in args.workers:
            for name in ("folder", "shards", f"encoded{r}"):
                rate = pipeline_rate(sources[name], r, workers, args.images, tokenizer)
                rows.append({"source": name.rstrip("0123456789"), "px": r, "workers": workers, "img/s": rate})
                print(rows[-1], flush=True)
    print_table(rows, ["source", "px", "workers", "img/s"])
    step_rows = []
    for name in args.steps:
        step_rows += step_rates(name, args.steps_tiny if name == "tiny" else args.steps_mid)
        print(step_rows[-1], flush=True)
    if step_rows:
        print_table(step_rows, ["config", "px", "batch", "inputs", "compile s", "step s", "img/s", "XLA GFLOP/step"])


if __name__ == "__main__":
    main()
