"""The demo world's attribute judge (labels, decoding, save/load, trainer, shipped weights) and the eval metrics."""
import dataclasses
import json
import os

import numpy as np
import pytest
import scipy.ndimage
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from conftest import REPO, load_config
from jaxlcd.demo import metrics as eval_metrics
from jaxlcd.demo import shapes
from jaxlcd.demo import judge as judge_lib
from jaxlcd.demo.train_judge import judge_scene, train_judge
from jaxlcd.metrics.spectral import high_frequency_energy

SHIPPED = os.path.join(REPO, "jaxlcd", "assets", "demo", "judge")
TINY = judge_lib.JudgeConfig(image_size=32, channels=(8, 16), feature_dim=16)


def _some_scenes():
    return ([shapes.sample_scene(0, i) for i in range(40)] + shapes.eval_scenes(40, seed=3)
            + [judge_scene(17, i) for i in range(40)])


def _one_hot_logits(scenes):
    labels = judge_lib.batch_labels(scenes)
    return {k: np.eye(n, dtype=np.float32)[np.maximum(labels[k], 0)] * 10 * (labels[k] >= 0)[:, None]
            for k, n in judge_lib.HEADS.items()}


def test_labels_decode_round_trip_to_the_normalized_scene():
    scenes = _some_scenes()
    assert any(s.relation in ("right of", "below") for s in scenes)
    labels = judge_lib.batch_labels(scenes)
    assert all(v.dtype == np.int32 and v.shape == (len(scenes),) for v in labels.values())
    for i, s in enumerate(scenes):
        two = len(s.objects) == 2
        assert labels["count"][i] == int(two)
        assert (labels["position"][i] == -1) == two and (labels["relation"][i] == -1) != two
        assert (labels["shape_1"][i] == -1) != two and (labels["colour_1"][i] == -1) != two
    assert judge_lib.decode_predictions(_one_hot_logits(scenes)) == [s.normalized() for s in scenes]


def test_decode_resolves_clashing_colours_by_the_best_distinct_combination():
    scene = shapes.Scene("blue", (shapes.Obj("circle", "red", "small"), shapes.Obj("star", "green", "large")),
                         "left of")
    logits = _one_hot_logits([scene])
    logits["colour_1"][0, judge_lib.COLOUR_NAMES.index("red")] = 12.0   # slot 1 "wants" slot 0's colour
    logits["colour_1"][0, judge_lib.COLOUR_NAMES.index("green")] = 11.0
    assert judge_lib.decode_predictions(logits) == [scene]
    logits["count"][0] = [10.0, 0.0]   # one object: slot-1 heads are not used
    (single,) = judge_lib.decode_predictions(logits)
    assert len(single.objects) == 1 and single.objects[0].colour == "red" and single.background == "blue"


def test_save_load_round_trip_and_clear_errors(tmp_path):
    module = judge_lib.Judge(TINY)
    params = judge_lib.init_params(module, seed=1)
    judge_lib.save_judge(module, params, str(tmp_path / "f32"), dtype=np.float32)
    loaded, back = judge_lib.load_judge(str(tmp_path / "f32"))
    assert loaded.config == TINY
    flat, flat_back = (flatten_dict(p) for p in (params, back))
    assert set(flat) == set(flat_back) and all(np.array_equal(flat[k], flat_back[k]) for k in flat)
    judge_lib.save_judge(module, params, str(tmp_path / "f16"))
    config = json.load(open(tmp_path / "f16" / "config.json"))
    assert config["model_type"] == "jaxlcd_judge" and config["channels"] == [8, 16]
    tensors = load_file(str(tmp_path / "f16" / "model.safetensors"))
    assert all(v.dtype == np.float16 for v in tensors.values()) and "head_count.kernel" in tensors

    with pytest.raises(ValueError, match="does not exist"):
        judge_lib.load_judge(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        judge_lib.load_judge(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid judge config"):
        judge_lib.load_judge(str(bad))
    (bad / "config.json").write_text(json.dumps(dict(config, model_type="clip")))
    with pytest.raises(ValueError, match="not a valid judge config"):
        judge_lib.load_judge(str(bad))
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no model.safetensors"):
        judge_lib.load_judge(str(bad))
    save_file({k: v for k, v in tensors.items() if k != "head_count.bias"}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['head_count.bias'\]"):
        judge_lib.load_judge(str(bad))
    save_file(dict(tensors, **{"feature.bias": np.zeros(3, np.float16)}), str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"wrong shapes \['feature.bias'\]"):
        judge_lib.load_judge(str(bad))


def test_predict_batches_uint8_and_float_images():
    module = judge_lib.Judge(TINY)
    params = judge_lib.init_params(module)
    images = np.stack([shapes.render(s, 32) for s in _some_scenes()[:6]])
    scenes, feats = judge_lib.predict(module, params, images, batch_size=4)
    assert len(scenes) == 6 and all(isinstance(s, shapes.Scene) for s in scenes)
    assert feats.shape == (6, 16) and feats.dtype == np.float32
    scenes_f, feats_f = judge_lib.predict(module, params, images.astype(np.float32) / 255.0)
    assert scenes_f == scenes and np.allclose(feats_f, feats, atol=1e-5)


# ------------------------------------------------------------------------------------------- metrics
def test_scene_and_attribute_accuracy_compare_normalized_scenes():
    scenes = shapes.eval_scenes(8, seed=5)
    prompts = [shapes.caption(s, 0, i) for i, s in enumerate(scenes)]   # assorted templates
    predicted = [s.normalized() for s in scenes]
    assert eval_metrics.scene_accuracy(predicted, prompts) == 1.0
    assert all(v == 1.0 for v in eval_metrics.attribute_accuracy(predicted, prompts).values()
               if not np.isnan(v))
    i = next(k for k, s in enumerate(scenes) if len(s.objects) == 1)
    wrong_bg = next(c for c in shapes.COLOURS if c not in {scenes[i].background, scenes[i].objects[0].colour})
    predicted[i] = dataclasses.replace(predicted[i], background=wrong_bg)
    assert eval_metrics.scene_accuracy(predicted, prompts) == 7 / 8
    acc = eval_metrics.attribute_accuracy(predicted, prompts)
    assert acc["background"] == 7 / 8 and acc["shape"] == acc["colour"] == acc["count"] == 1.0


def test_frechet_distance_matches_the_1d_formula_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (500, 1)), rng.normal(-0.5, 0.7, (400, 1))
    sa, sb = a.std(ddof=1), b.std(ddof=1)
    expected = (a.mean() - b.mean()) ** 2 + sa ** 2 + sb ** 2 - 2 * sa * sb
    assert eval_metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    feats = rng.normal(size=(300, 16))
    assert abs(eval_metrics.frechet_distance(feats, feats)) < 1e-6
    assert eval_metrics.frechet_distance(feats, feats + 1.0) == pytest.approx(16.0, rel=1e-6)


def test_high_frequency_energy_separates_checkerboards_gradients_and_renders():
    i, j = np.indices((32, 32))
    checker = np.repeat(((i + j) % 2).astype(np.float32)[None, :, :, None], 3, axis=-1)
    smooth = np.repeat((0.5 + 0.5 * np.cos(2 * np.pi * j / 32)).astype(np.float32)[None, :, :, None], 3, axis=-1)
    constant = np.full((2, 32, 32, 3), 0.3, np.float32)
    assert high_frequency_energy(checker) == pytest.approx(1.0)
    assert high_frequency_energy(smooth) < 1e-6 and high_frequency_energy(constant) == 0
    rendered = np.stack([shapes.render(shapes.sample_scene(0, k)) for k in range(4)])
    blurred = scipy.ndimage.gaussian_filter(rendered.astype(np.float32) / 255, (0, 1.5, 1.5, 0))
    sharp, soft = high_frequency_energy(rendered), high_frequency_energy(blurred)
    assert 0.0 < soft < sharp < 0.5


# ------------------------------------------------------------------------------------------ training
def test_tiny_judge_trainer_writes_a_loadable_judge(tmp_path):
    cfg = load_config("tiny", "demo/judge.py")
    last = train_judge(cfg, str(tmp_path))
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
    assert np.isfinite(last["loss"]) and 0 <= last["heldout_acc"] <= 1 and 0 <= last["train_stream_acc"] <= 1
    module, params = judge_lib.load_judge(str(tmp_path / "judge"))
    assert module.config == judge_lib.JudgeConfig(32, tuple(cfg.channels), cfg.feature_dim)
    scenes, feats = judge_lib.predict(module, params, np.zeros((3, 32, 32, 3), np.uint8))
    assert len(scenes) == 3 and feats.shape == (3, cfg.feature_dim)


@pytest.mark.skipif(not os.path.isdir(SHIPPED), reason=f"no shipped judge in {SHIPPED} (train it: see "
                    "configs/demo/judge.py)")
def test_shipped_judge_reads_rendered_held_out_scenes():
    assert sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in os.listdir(SHIPPED)) < 2_000_000
    module, params = judge_lib.load_judge(SHIPPED)
    scenes = shapes.eval_scenes(256, seed=7)
    predicted, feats = judge_lib.predict(module, params, np.stack([shapes.render(s) for s in scenes]))
    prompts = [shapes.caption(s, template=0) for s in scenes]
    assert eval_metrics.scene_accuracy(predicted, prompts) >= 0.95
    assert feats.shape == (256, module.config.feature_dim) and np.isfinite(feats).all()
