"""The folder dataset builder (tfds array_record) and the grain training pipeline, on tiny generated folders."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from jaxlcd.data import make_train_iterator, prepare_folder_dataset, read_prepare_stats
from tiny_images import write_tiny_folder
from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer, tokenize

N, RES, B = 12, 32, 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_clip_tokenizer_files(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tiny_folder(str(root / "src"), n=N, resolution=RES, seed=0, include_bad=True)
    stats = prepare_folder_dataset(str(root / "src"), str(root / "out"))
    return str(root / "out"), stats


def _iter(data_dir, tokenizer, **kw):
    args = dict(tokenizer=tokenizer, resolution=RES, batch_size_per_host=B, seed=0, shard_index=0, shard_count=1)
    return make_train_iterator(data_dir, **{**args, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a["pixels"], b["pixels"])
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        assert list(a["caption"]) == list(b["caption"])


def test_prepare_sidecar_counts_bad_data(tmp_path, caplog):
    src = str(tmp_path / "src")
    write_tiny_folder(src, n=6, resolution=RES, include_bad=True)
    os.remove(os.path.join(src, "img_0005.txt"))  # an image without caption
    with caplog.at_level(logging.WARNING):
        stats = prepare_folder_dataset(src, str(tmp_path / "out"))
    assert stats["count"] == 5
    assert stats["skipped"] == {"corrupt_image": 1, "unreadable_image": 0, "missing_caption": 1,
                                "empty_caption": 1, "missing_image": 0, "bad_jsonl_line": 0}
    assert "skipped 1 corrupt_image, 1 missing_caption, 1 empty_caption" in caplog.text
    assert read_prepare_stats(str(tmp_path / "out")) == stats
    # A second call reuses the prepared dataset.
    assert prepare_folder_dataset(src, str(tmp_path / "out")) == stats


def test_prepare_jsonl_counts_bad_data(tmp_path, tokenizer):
    src = str(tmp_path / "src")
    good = write_tiny_folder(src, n=5, resolution=RES, include_bad=True, caption_format="jsonl")
    assert not any(name.endswith(".txt") for name in os.listdir(src))
    with open(os.path.join(src, "captions.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"file": "gone.png", "caption": "a ghost"}) + "\n{not json\n")
    stats = prepare_folder_dataset(src, str(tmp_path / "out"))
    assert stats["count"] == 5
    assert {k: v for k, v in stats["skipped"].items() if v} == {
        "corrupt_image": 1, "empty_caption": 1, "missing_image": 1, "bad_jsonl_line": 1}
    it = _iter(str(tmp_path / "out"), tokenizer, batch_size_per_host=5, num_epochs=1)
    assert sorted(next(it)["caption"]) == sorted(c for _, c in good)


def test_jpeg_webp_rgba_and_grayscale_images(tmp_path, tokenizer):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 60), (255, 0, 0)).save(src / "red.JPG", quality=95)
    Image.new("RGB", (50, 40), (0, 0, 255)).save(src / "sub" / "blue.webp", lossless=True)
    Image.new("RGBA", (32, 32), (0, 255, 0, 0)).save(src / "clear.png")  # transparent: composited on white
    Image.new("L", (64, 32), 0).save(src / "black.png")
    for name, caption in [("red", "red"), ("sub/blue", "blue"), ("clear", "white"), ("black", "black")]:
        (src / f"{name}.txt").write_text(caption)
    assert prepare_folder_dataset(str(src), str(tmp_path / "out"))["count"] == 4
    batch = next(_iter(str(tmp_path / "out"), tokenizer, num_epochs=1))
    colours = {"red": (1, -1, -1), "blue": (-1, -1, 1), "white": (1, 1, 1), "black": (-1, -1, -1)}
    for pixels, caption in zip(batch["pixels"], batch["caption"]):
        np.testing.assert_allclose(pixels.mean((0, 1)), colours[caption], atol=0.02)


def test_no_usable_pair_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_folder_dataset(str(tmp_path / "missing"), str(tmp_path / "out"))
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(ValueError, match=r"no usable image-caption pair .*no images found"):
        prepare_folder_dataset(str(src), str(tmp_path / "out"))
    write_tiny_folder(str(src), n=0, include_bad=True)
    with pytest.raises(ValueError, match=r"no usable image-caption pair .*1 corrupt_image, 1 empty_caption"):
        prepare_folder_dataset(str(src), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no prepared dataset"):
        _iter(str(tmp_path / "out"), tokenizer=None)


def test_batches_shapes_values_and_tokens(prepared, tokenizer):
    data_dir, stats = prepared
    assert stats["count"] == N
    it = _iter(data_dir, tokenizer, random_crop=True, random_flip=True)
    for batch in _take(it, 4):  # crosses an epoch boundary (12 records, 3 batches per epoch)
        assert batch["pixels"].shape == (B, RES, RES, 3) and batch["pixels"].dtype == np.float32
        assert batch["input_ids"].shape == (B, 77) and batch["input_ids"].dtype == np.int32
        assert batch["caption"].shape == (B,) and batch["caption"].dtype == object
        assert -1.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0
        assert batch["pixels"].std() > 0.1
        np.testing.assert_array_equal(batch["input_ids"], tokenize(tokenizer, list(batch["caption"])))
    assert it.stats.as_dict() == {"examples": 4 * B}


def test_two_hosts_get_disjoint_examples(prepared, tokenizer):
    data_dir, _ = prepared
    seen = []
    for host in range(2):
        it = _iter(data_dir, tokenizer, shard_index=host, shard_count=2, num_epochs=1, batch_size_per_host=2)
        seen.append({b["pixels"][i].tobytes() for b in it for i in range(2)})
    assert len(seen[0]) == len(seen[1]) == N // 2
    assert not seen[0] & seen[1]


def test_state_restore_is_exact(prepared, tokenizer):
    data_dir, _ = prepared
    kw = dict(random_crop=True, random_flip=True, seed=3)
    it = _iter(data_dir, tokenizer, **kw)
    _take(it, 3)
    state = it.get_state()
    assert isinstance(state, bytes) and json.loads(state)["stats"] == {"examples": 3 * B}
    expected = _take(it, 2)
    restored = _iter(data_dir, tokenizer, **kw)
    restored.set_state(state)
    _assert_same(_take(restored, 2), expected)
    assert restored.stats.as_dict() == it.stats.as_dict()


def test_deterministic_given_seed(prepared, tokenizer):
    data_dir, _ = prepared
    kw = dict(random_crop=True, random_flip=True)
    _assert_same(_take(_iter(data_dir, tokenizer, seed=5, **kw), 3), _take(_iter(data_dir, tokenizer, seed=5, **kw), 3))
    a, b = next(_iter(data_dir, tokenizer, seed=5, **kw)), next(_iter(data_dir, tokenizer, seed=6, **kw))
    assert not np.array_equal(a["pixels"], b["pixels"])


def test_corrupt_record_at_read_time_is_skipped_and_counted(tmp_path, tokenizer, caplog):
    src = str(tmp_path / "src")
    write_tiny_folder(src, n=4, resolution=RES, include_bad=True)
    stats = prepare_folder_dataset(src, str(tmp_path / "out"), verify_images=False)
    assert stats["count"] == 5 and stats["skipped"]["corrupt_image"] == 0
    it = _iter(str(tmp_path / "out"), tokenizer, batch_size_per_host=2, num_epochs=1)
    with caplog.at_level(logging.WARNING):
        batches = list(it)
    assert len(batches) == 2
    assert it.stats.as_dict() == {"corrupt_image": 1, "examples": 4}
    assert "bad_corrupt.png" in caplog.text and "corrupt_image" in caplog.text
