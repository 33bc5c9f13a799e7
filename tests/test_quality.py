"""In-training evaluation (jaxlcd.distill.quality): sample metrics logged during a tiny run, and the reward-hacking
monitor's stop rule, best-student export and orderly stop."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import test_fid
from jaxlcd import tiny
from jaxlcd.distill import job
from jaxlcd.distill.quality import hacking_streak, parse_metric_paths
from jaxlcd.errors import InputError
from jaxlcd.rewards.convert import main as convert_main
from tiny_run import make_inputs, tiny_config


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_hacking_streak_counts_rising_train_with_falling_heldout():
    assert hacking_streak([]) == hacking_streak([(1, 1)]) == 0
    assert hacking_streak([(1, 5), (2, 4), (3, 3)]) == 2
    assert hacking_streak([(1, 5), (2, 4), (3, 4.5), (4, 4)]) == 1    # the held-out score rose once: reset
    assert hacking_streak([(1, 5), (0.5, 4)]) == 0                     # both fell: not hacking


def test_metric_paths_parse_or_refuse():
    assert parse_metric_paths("hpsv2.1=/a, clipscore=/b") == {"hpsv2.1": "/a", "clipscore": "/b"}
    assert parse_metric_paths("") == {}
    with pytest.raises(InputError, match="NAME=PATH"):
        parse_metric_paths("hpsv2.1")


def test_sample_metrics_are_logged_during_training(inputs, tmp_path):
    clip = tiny.write_reward_folder(str(tmp_path / "clip"), seed=5)
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    save_file(test_fid._random_state_dict(), str(tmp_path / "inception_in.safetensors"))
    assert convert_main(["--kind", "fid_inception", str(tmp_path / "inception_in.safetensors"),
                         str(tmp_path / "inception.safetensors")]) == 0
    workdir = str(tmp_path / "run")
    job.train(tiny_config(inputs, **{"evals.quality.every": 2, "evals.quality.steps": (1,),
                                     "evals.quality.num_prompts": 3, "evals.quality.rewards": f"clipscore={clip}",
                                     "evals.quality.fid_ref": str(ref),
                                     "evals.quality.inception": str(tmp_path / "inception.safetensors")}), workdir)
    logged = {r["step"]: r for r in _records(workdir) if "quality.clipscore_lcm1" in r}
    assert sorted(logged) == [2, 4]
    for r in logged.values():
        assert r["quality.clipscore_lcm1"] >= 0 and np.isfinite(r["quality.fid_lcm1"])
        assert 0 <= r["quality.hf_energy_lcm1"] <= 1
    assert logged[2]["quality.clipscore_lcm1"] != logged[4]["quality.clipscore_lcm1"]   # the student changed


class _FakeScorer:
    """Scores that rise for the 'train' model and fall for the 'heldout' one, one step per evaluation."""
    calls = {}

    def __init__(self, metric, path, **kwargs):
        self.path = path

    def __call__(self, images, prompts):
        n = _FakeScorer.calls[self.path] = _FakeScorer.calls.get(self.path, 0) + 1
        return np.full(len(prompts), float(n) if self.path == "train" else -float(n))

    def aggregate(self, scores):
        return float(np.mean(scores))


def test_the_hacking_monitor_stops_the_run_and_keeps_the_best_student(inputs, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("jaxlcd.metrics.scores.Scorer", _FakeScorer)
    workdir = str(tmp_path / "run")
    cfg = tiny_config(inputs, total_steps=6, checkpoint_every=4, **{
        "evals.hacking.every": 1, "evals.hacking.num_prompts": 2, "evals.hacking.heldout": "imagereward=heldout",
        "evals.hacking.train_reward": "clipscore=train", "evals.hacking.stop_if.patience": 2})
    with caplog.at_level(logging.WARNING):
        job.train(cfg, workdir)
    records = [r for r in _records(workdir) if "hacking.heldout" in r]
    assert [r["step"] for r in records] == [1, 2, 3]                  # stopped at the 2nd rising/falling pair
    assert [r["hacking.train_reward"] for r in records] == [1, 2, 3] and records[-1]["hacking.heldout"] == -3
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))    # saved at the stop, off the schedule
    assert not os.path.isdir(os.path.join(workdir, "export", "student"))   # no final export: not finished
    best = json.loads(open(os.path.join(workdir, "best", "best.json")).read())
    assert best == {"step": 1, "heldout": -1.0}
    assert os.path.isfile(os.path.join(workdir, "best", "model_index.json"))
    assert any("reward hacking" in r.message and os.path.join(workdir, "best") in r.message for r in caplog.records)
