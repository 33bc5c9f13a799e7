"""Pre-encode training data with a teacher's VAE encoder and text encoder (`jaxlcd.data.encoded`).

    python -m jaxlcd.encode --teacher DIR_OR_HUB_ID --data_dir SRC --out DST [--resolution 512] [--dtype bfloat16]
    python -m jaxlcd.main --config=configs/rglcd.py:sd21base --workdir=runs/x --config.teacher=... --config.data_dir=DST

SRC: an image-caption folder or webdataset shards (as ``--config.data_dir``). Centre crops at ``--resolution``, no
flips (what training without random_crop/random_flip sees). Every local device encodes a slice of each batch; in a
multi-process launch each process encodes its own part of the data. A rerun continues after the last finished
file. Training on DST feeds the moments (still sampled per step) and embeddings to the step instead of pixels and
token ids; a DST made by another teacher or at another resolution is refused at start-up.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from jaxlcd.errors import InputError, JaxlcdError

log = logging.getLogger("jaxlcd")
RECORDS_PER_FILE = 4096


def _encoder(pipe, dtype):
    """jit(pixels [B,R,R,3], input_ids [B,77]) -> (moments [B,h,w,2c], ctx [B,77,D]) in ``dtype``, the batch split
    over this process's devices."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    split = NamedSharding(mesh, P("data"))

    def encode(vae_params, text_params, pixels, input_ids):
        moments = pipe.vae.apply({"params": vae_params}, pixels, method=pipe.vae.encode)
        ctx = pipe.text_encoder.apply({"params": text_params}, input_ids)
        return moments.astype(dtype), ctx.astype(dtype)

    return jax.jit(encode, in_shardings=(None, None, split, split), out_shardings=(split, split)), mesh.size


def encode(teacher: str, data_dir: str, out: str, resolution: int = 512, dtype: str = "bfloat16",
           batch_per_device: int = 8, records_per_file: int = RECORDS_PER_FILE) -> dict:
    """Encode ``data_dir`` into ``out`` (see the module docstring); returns the metadata written to encoded.json."""
    import jax
    import jax.numpy as jnp
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    from jaxlcd import data as data_lib, parallel, paths, storage
    from jaxlcd.data import encoded
    from jaxlcd.distill.setup import prepare_data
    from jaxlcd.pipeline import load_pipeline

    if dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"--dtype {dtype!r} is unknown; use float32, bfloat16 or float16")
    parallel.maybe_initialize_distributed()
    teacher_dir = paths.resolve_model_path(teacher, "--teacher")
    pipe = load_pipeline(teacher_dir)
    os.makedirs(out, exist_ok=True)
    prepared = parallel.process_zero_first(prepare_data, storage.absolute(data_dir), os.path.join(out, "source"),
                                           name="encode-data")
    fn, n_dev = _encoder(pipe, jnp.dtype(dtype))
    batch = batch_per_device * n_dev
    it = data_lib.make_train_iterator(prepared, tokenizer=pipe.tokenizer, resolution=resolution,
                                      batch_size_per_host=batch, seed=0, num_epochs=1, drop_remainder=False)
    proc = jax.process_index()
    progress_path = os.path.join(out, f"progress-{proc:05d}.json")
    progress = json.load(open(progress_path)) if os.path.isfile(progress_path) else {"files": 0, "count": 0}
    if progress.get("iterator"):
        it.set_state(progress["iterator"])
    shapes, t0 = None, time.perf_counter()
    bar = tqdm(desc=f"encode (process {proc})", unit="img", initial=progress["count"], dynamic_ncols=True)
    pending: list[bytes] = []

    def flush():
        path = os.path.join(out, f"part-{proc:05d}-{progress['files']:05d}.array_record")
        writer = ArrayRecordWriter(path, "group_size:1")
        for record in pending:
            writer.write(record)
        writer.close()
        progress.update(files=progress["files"] + 1, count=progress["count"] + len(pending),
                        iterator=it.get_state().decode("utf-8"))
        storage.write_text(progress_path, json.dumps(progress))   # the file above is finished before it is counted
        pending.clear()

    while not progress.get("finished"):
        host = next(it, None)
        if host is None:
            break
        n = len(host["caption"])
        pad = (-n) % n_dev   # the last, smaller batch: padded to split over the devices, the padding dropped
        pixels = np.concatenate([host["pixels"], np.zeros((pad,) + host["pixels"].shape[1:], np.float32)])
        ids = np.concatenate([host["input_ids"], np.zeros((pad, host["input_ids"].shape[1]), np.int32)])
        moments, ctx = (np.asarray(x)[:n] for x in fn(pipe.vae_params, pipe.text_params, pixels, ids))
        shapes = {"moments_shape": list(moments.shape[1:]), "ctx_shape": list(ctx.shape[1:])}
        pending += [encoded.pack(moments[i], ctx[i], str(host["caption"][i])) for i in range(n)]
        bar.update(n)
        bar.set_postfix(img_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.3g}")
        if len(pending) >= records_per_file:
            flush()
    if pending:
        flush()
    bar.close()
    progress.update(finished=True, shapes=shapes or progress.get("shapes"))
    storage.write_text(progress_path, json.dumps(progress))
    counts = [json.loads(s) for s in parallel.all_processes_strings(json.dumps(progress))]
    meta = {"format": encoded.FORMAT, "teacher": teacher, "teacher_fingerprint": encoded.teacher_fingerprint(teacher_dir),
            "resolution": resolution, "dtype": dtype, "count": sum(c["count"] for c in counts),
            **(progress["shapes"] or {})}
    if proc == 0:
        storage.write_text(os.path.join(out, encoded.METADATA), json.dumps(meta, indent=2))
        log.info("encoded %d examples into %s", meta["count"], out)
    return meta


def main(argv=None) -> int:
    from jaxlcd import cli

    ap = argparse.ArgumentParser(prog="python -m jaxlcd.encode", description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="diffusers pipeline folder or hub id org/name[@revision]")
    ap.add_argument("--data_dir", required=True, help="image-caption folder or webdataset shards")
    ap.add_argument("--out", required=True, help="output folder (local)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", help="stored dtype: bfloat16 (default), float16 or float32")
    ap.add_argument("--batch_per_device", type=int, default=8)
    args = ap.parse_args(argv)
    cli.setup_logging()
    try:
        encode(args.teacher, args.data_dir, args.out, args.resolution, args.dtype, args.batch_per_device)
    except JaxlcdError as e:
        print(f"jaxlcd.encode: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
