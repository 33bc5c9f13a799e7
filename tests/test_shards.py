"""webdataset tar shards read in place: indexing (truncated members, missing parts, json captions and LAION filters),
the grain pipeline over them (corrupt images and empty captions skipped and counted, non-square and grayscale
images), disjoint hosts, exact resume, shard patterns, and a tiny distillation run on shards."""
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest

from jaxlcd import tiny
from jaxlcd.data import make_train_iterator, shards
from jaxlcd.distill import job
from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer
from tiny_run import losses, make_inputs, tiny_config

GOOD_PER_SHARD = 12


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, seed: int = 0) -> dict:
    """Three shards: 12 good samples each (some with json captions and LAION fields, one non-square, one grayscale),
    plus in shard 0 a corrupt image, an empty caption and an image without caption; shard 2 truncated inside its
    last member. Returns what a reader should count."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for s in range(3):
        path = os.path.join(folder, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(GOOD_PER_SHARD):
                img, caption = tiny.draw_image(rng, 64)
                key = f"s{s}/{i:04d}"
                if i == 1:
                    img = img.resize((40, 56))                     # non-square and small
                if i == 2:
                    img = img.convert("L")                         # grayscale
                _add(tar, f"{key}.png", _png(img))
                if i % 3 == 0:
                    meta = {"caption": caption, "pwatermark": 0.9 if i == 3 else 0.1, "aesthetic": 6.0}
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
                else:
                    _add(tar, f"{key}.txt", caption.encode())
            if s == 0:
                _add(tar, "bad/corrupt.png", b"\x89PNG not really")
                _add(tar, "bad/corrupt.txt", b"a corrupt image")
                img, _ = tiny.draw_image(rng, 64)
                _add(tar, "bad/empty.png", _png(img))
                _add(tar, "bad/empty.txt", b"   ")
                _add(tar, "bad/nocaption.png", _png(img))
            if s == 2:
                img, _ = tiny.draw_image(rng, 64)
                _add(tar, "s2/last.png", _png(img))
                _add(tar, "s2/last.txt", b"the member after the truncated image")
        if s == 2:   # cut the file inside s2/last.png
            data = open(path, "rb").read()
            cut = data.index(b"the member after") - 1200
            open(path, "wb").write(data[:cut])
    return {"indexed": 3 * GOOD_PER_SHARD + 2, "missing_caption": 1}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_clip_tokenizer_files(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards") / "shards")
    write_shards(folder)
    return folder


@pytest.fixture(scope="module")
def index(shard_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("index"))
    return out, shards.index_shards(shard_dir, out)


def test_index_counts_samples_and_skips(index):
    _, meta = index
    assert meta["count"] == 3 * GOOD_PER_SHARD + 2          # + the corrupt image and the empty caption (read time)
    assert meta["skipped"]["missing_caption"] == 1 and meta["skipped"]["truncated_member"] == 1
    assert meta["shards"] == 3


def test_source_reads_images_and_json_captions(index):
    source = shards.ShardSource(index[0])
    records = [source[i] for i in range(len(source))]
    assert len({r["file"] for r in records}) == len(records)
    assert int(source.is_json.sum()) == 12                     # i = 0, 3, 6, 9 of each shard
    assert all(records[i]["caption"].strip() for i in np.flatnonzero(source.is_json))
    assert sum(not r["caption"].strip() for r in records) == 1   # the empty caption, skipped later


def test_pipeline_skips_and_counts_bad_records_and_reads_odd_images(index, tok):
    it = make_train_iterator(index[0], tokenizer=tok, resolution=32, batch_size_per_host=4, seed=0,
                             shard_index=0, shard_count=1, num_epochs=1)
    batches = list(it)
    assert all(b["pixels"].shape == (4, 32, 32, 3) for b in batches)
    stats = it.stats.as_dict()
    assert stats["corrupt_image"] == 1 and stats["empty_caption"] == 1 and stats["examples"] == 3 * GOOD_PER_SHARD


def test_two_hosts_see_disjoint_samples_covering_the_data(index, tok):
    seen = []
    for host in range(2):
        it = make_train_iterator(index[0], tokenizer=tok, resolution=32, batch_size_per_host=1, seed=0,
                                 shard_index=host, shard_count=2, num_epochs=1)
        seen.append([hashlib.md5(b["pixels"].tobytes()).hexdigest() for b in it])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0])) + len(set(seen[1])) == 3 * GOOD_PER_SHARD   # every good sample, once


def test_resume_continues_exactly(index, tok):
    make = lambda: make_train_iterator(index[0], tokenizer=tok, resolution=32, batch_size_per_host=3, seed=1,
                                       shard_index=0, shard_count=1)
    it = make()
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it)["caption"].tolist() for _ in range(4)]
    resumed = make()
    resumed.set_state(state)
    assert [next(resumed)["caption"].tolist() for _ in range(4)] == want


def test_shard_patterns_and_filters(shard_dir, tmp_path, tok):
    names = [os.path.join(shard_dir, f"{i:05d}.tar") for i in range(3)]
    assert shards.expand_shards(os.path.join(shard_dir, "{00000..00002}.tar")) == names
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(names) + "\n")
    assert shards.expand_shards(str(listing)) == names and shards.is_shard_spec(str(listing))
    meta = shards.index_shards(str(listing), str(tmp_path / "idx"), {"max_watermark": 0.5, "min_aesthetic": 5.0})
    assert meta["skipped"]["filtered"] == 3            # the i == 3 sample of each shard has pwatermark 0.9
    it = make_train_iterator(str(tmp_path / "idx"), tokenizer=tok, resolution=32, batch_size_per_host=1, seed=0,
                             shard_index=0, shard_count=1, num_epochs=1, min_size=48)
    assert len(list(it)) == 3 * GOOD_PER_SHARD - 3 - 3   # less the filtered and the 40x56 image of each shard
    assert it.stats.as_dict()["too_small"] == 3


def test_tiny_distillation_trains_on_shards(shard_dir, tmp_path):
    teacher, _ = make_inputs(tmp_path)
    workdir = str(tmp_path / "run")
    job.train(tiny_config((teacher, shard_dir), total_steps=2), workdir)
    assert sorted(losses(workdir)) == [1, 2]
    assert shards.read_index_meta(os.path.join(workdir, "data", "shards"))["src_dir"] == shard_dir
