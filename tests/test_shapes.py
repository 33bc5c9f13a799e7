"""The procedural "shapes" world: determinism, captions <-> scenes, rendered colours and geometry, the
held-out split, and the tfds dataset read through the production grain pipeline."""
import dataclasses

import numpy as np
import pytest

from jaxlcd.data import make_train_iterator, version_dir
from jaxlcd.demo.shapes import (COLOURS, HELD_OUT_PAIRS, NUM_TEMPLATES, SHAPES, TRAIN_PAIRS, Obj, Scene, caption,
                                eval_prompts, eval_scenes, layout, parse_caption, prepare_shapes_dataset, render,
                                sample_scene)
from jaxlcd.tokenizer import build_clip_tokenizer_files, load_tokenizer

SCENES = [sample_scene(0, i) for i in range(200)]


def _mask(img: np.ndarray, colour: str, tol: int = 4) -> np.ndarray:
    return np.all(np.abs(img.astype(int) - COLOURS[colour]) <= tol, axis=-1)


def test_deterministic_from_seed_and_index():
    for i in (0, 7, 123):
        a, b = sample_scene(3, i), sample_scene(3, i)
        assert a == b and a.layout_seed == b.layout_seed
        np.testing.assert_array_equal(render(a), render(b))
        assert caption(a, 3, i) == caption(b, 3, i)
    assert len(set(SCENES)) > 190
    assert sample_scene(0, 5) != sample_scene(1, 5)
    renders = [render(s, 32).tobytes() for s in SCENES[:50]]
    assert len(set(renders)) == 50
    assert len({caption(s, 0, i).split()[0] for i, s in enumerate(SCENES)}) >= 4  # the template varies
    assert all(a != b for a, b in zip(SCENES, SCENES[1:]))
    assert {len(s.objects) for s in SCENES} == {1, 2}


def test_captions_round_trip_for_every_template():
    for scene in SCENES:
        texts = {caption(scene, template=t) for t in range(NUM_TEMPLATES)}
        assert len(texts) == NUM_TEMPLATES
        for text in texts:
            assert parse_caption(text) == scene, text
    assert caption(SCENES[2], template=0) == "a small white star on the right, blue background"
    assert parse_caption("On an ORANGE background: a large circle in red, above a small green square!") == Scene(
        "orange", (Obj("circle", "red", "large"), Obj("square", "green", "small")), "above")


@pytest.mark.parametrize("text", ["a small red circle on the left", "a small red circle, blue background",
                                  "a red circle on the left, blue background", "a small red circle on the left "
                                  "above a large green square, blue background", "a small red circle on the left, "
                                  "red background", "a small red circle left of a small red square, blue background"])
def test_parse_rejects_incomplete_or_invalid(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_scene_validation_and_normalized():
    with pytest.raises(ValueError, match="differ"):
        Scene("red", (Obj("circle", "red", "small", "left"),))
    with pytest.raises(ValueError, match="relation"):
        Scene("red", (Obj("circle", "blue", "small", "left"), Obj("square", "green", "large")), None)
    with pytest.raises(ValueError, match="unknown shape"):
        Scene("red", (Obj("hexagon", "blue", "small", "left"),))
    a, b = Obj("circle", "blue", "small"), Obj("square", "green", "large")
    assert Scene("red", (a, b), "right of").normalized() == Scene("red", (b, a), "left of")
    assert Scene("red", (a, b), "above").normalized() == Scene("red", (a, b), "above")


def test_rendered_colours():
    checked = 0
    for scene in SCENES:
        img = render(scene, 64)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
            np.testing.assert_allclose(corner, COLOURS[scene.background], atol=2)
        for obj, (cx, cy, _) in zip(scene.objects, layout(scene, 64)):
            if obj.size == "large":
                np.testing.assert_allclose(img[int(cy), int(cx)], COLOURS[obj.colour], atol=2)
                checked += 1
    assert checked > 100
    distinct = lambda img: len({tuple(p) for p in img.reshape(-1, 3)})
    assert distinct(render(SCENES[0], 64, supersample=1)) == 3
    assert distinct(render(SCENES[0], 64)) > 10  # anti-aliased edges blend object and background


def test_geometry_of_positions_and_relations():
    axis = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}
    for scene in SCENES:
        img, boxes = render(scene, 64), layout(scene, 64)
        for cx, cy, r in boxes:
            assert r < cx < 64 - r and r < cy < 64 - r
        masks = [_mask(img, o.colour) for o in scene.objects]
        assert all(m.sum() > 4 for m in masks)
        if scene.relation is None:
            ys, xs = np.nonzero(masks[0])
            inside = {"left": xs.max() < 32, "right": xs.min() >= 32, "top": ys.max() < 32,
                      "bottom": ys.min() >= 32, "centre": xs.min() < 32 <= xs.max() and ys.min() < 32 <= ys.max()}
            assert inside[scene.objects[0].position], scene
            continue
        dim, sign = axis[scene.relation]
        (a, b) = (np.nonzero(m.any(axis=dim))[0] for m in masks)  # occupied columns (dim 0) or rows (dim 1)
        first, second = (a, b) if sign == 1 else (b, a)
        assert first.max() < second.min(), scene
        lo, hi = ((box[dim], box[2]) for box in (boxes if sign == 1 else boxes[::-1]))
        assert lo[0] + lo[1] < hi[0] - hi[1], scene


def test_held_out_split():
    assert len(HELD_OUT_PAIRS) == 8 and len(TRAIN_PAIRS) == len(SHAPES) * len(COLOURS) - 8
    assert {s for s, _ in HELD_OUT_PAIRS} == set(SHAPES) and {c for _, c in HELD_OUT_PAIRS} == set(COLOURS)
    for i in range(3000):
        assert not sample_scene(1, i).held_out_pairs()
    scenes = eval_scenes(300)
    assert all(s.held_out_pairs() for s in scenes) and len(set(scenes)) == 300
    assert eval_scenes(50) == scenes[:50] and eval_scenes(20, seed=1) != scenes[:20]
    assert [s.layout_seed for s in eval_scenes(50)] == [s.layout_seed for s in scenes[:50]]
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {p for s in scenes for p in s.held_out_pairs()} == HELD_OUT_PAIRS
    prompts = eval_prompts(300)
    assert [parse_caption(p) for p in prompts] == scenes
    assert prompts[0] == caption(scenes[0], template=0)


def test_tfds_dataset_through_the_training_pipeline(tmp_path):
    n, res = 24, 32
    stats = prepare_shapes_dataset(str(tmp_path / "out"), num_examples=n, resolution=res, seed=2)
    assert stats == {"count": n, "resolution": res, "seed": 2, "builder": "shapes"}
    assert prepare_shapes_dataset(str(tmp_path / "out"), num_examples=n, resolution=res, seed=2) == stats
    with pytest.raises(ValueError, match="overwrite"):
        prepare_shapes_dataset(str(tmp_path / "out"), num_examples=n + 1, resolution=res, seed=2)
    tokenizer = load_tokenizer(build_clip_tokenizer_files(str(tmp_path / "tok")))
    it = make_train_iterator(version_dir(str(tmp_path / "out"), "shapes"), tokenizer=tokenizer, resolution=res,
                             batch_size_per_host=8, seed=0, shard_index=0, shard_count=1, num_epochs=1)
    expected = {}
    for i in range(n):
        scene = sample_scene(2, i)
        expected.setdefault(caption(scene, 2, i), []).append(render(scene, res).astype(np.float32) / 127.5 - 1)
    batches = list(it)
    assert len(batches) == n // 8
    for batch in batches:
        assert batch["pixels"].shape == (8, res, res, 3)
        assert -1.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0
        for pixels, text in zip(batch["pixels"], batch["caption"]):
            parse_caption(text)
            assert any(np.allclose(pixels, e, atol=1e-6) for e in expected[text])
    assert sorted(c for b in batches for c in b["caption"]) == sorted(c for c, v in expected.items() for _ in v)


def test_scene_equality_ignores_layout_seed():
    scene = SCENES[0]
    other = dataclasses.replace(scene, layout_seed=None)
    assert other == scene and hash(other) == hash(scene)
    assert not np.array_equal(render(other), render(scene))


def test_hard_negative_changes_one_word_attribute_and_keeps_held_out_pairs_out():
    from jaxlcd.demo.shapes import hard_negative

    rng = np.random.default_rng(0)
    for i in range(300):
        scene = sample_scene(0, i)
        neg = hard_negative(scene, rng)
        assert neg != scene and not neg.held_out_pairs()
        assert neg.background == scene.background and [o.colour for o in neg.objects] == [o.colour for o in scene.objects]
        changed = [k for a, b in zip(scene.objects, neg.objects) for k in ("shape", "size", "position")
                   if getattr(a, k) != getattr(b, k)] + (["relation"] if neg.relation != scene.relation else [])
        assert len(changed) == 1, (scene, neg)
        assert parse_caption(caption(neg, template=i % NUM_TEMPLATES)) == neg


def test_hard_negative_kinds_restrict_what_changes():
    from jaxlcd.demo.shapes import hard_negative

    rng = np.random.default_rng(1)
    for i in range(100):
        scene = sample_scene(0, i)
        neg = hard_negative(scene, rng, ("place",))
        assert [(o.shape, o.size) for o in neg.objects] == [(o.shape, o.size) for o in scene.objects]
        assert (neg.relation, neg.objects[0].position) != (scene.relation, scene.objects[0].position)
    with pytest.raises(ValueError, match="hard negative kinds"):
        hard_negative(sample_scene(0, 0), rng, ("colour",))
