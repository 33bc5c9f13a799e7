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


class _ScriptedScorer:
    """The real Scorer, except for the paths "train" and "heldout": scores that rise for the first and fall for the
    second, by one per evaluation (real tiny models do not reliably reward-hack)."""
    real, calls = None, {}

    def __init__(self, metric, path, **kwargs):
        self.path = path
        self.scorer = None if path in ("train", "heldout") else _ScriptedScorer.real(metric, path, **kwargs)

    def __call__(self, images, prompts):
        if self.scorer is not None:
            return self.scorer(images, prompts)
        n = _ScriptedScorer.calls[self.path] = _ScriptedScorer.calls.get(self.path, 0) + 1
        return np.full(len(prompts), float(n) if self.path == "train" else -float(n))

    def aggregate(self, scores):
        return self.scorer.aggregate(scores) if self.scorer is not None else float(np.mean(scores))


def test_sample_metrics_and_the_hacking_monitor_during_training(inputs, tmp_path, monkeypatch, caplog):
    """One tiny run with both evaluators every step: the quality metrics at each evaluation; the monitor stops the
    run at the second rising-train / falling-held-out pair (step 3) with a checkpoint there, no final export, and
    the best held-out student (step 1) exported."""
    from jaxlcd.metrics import scores

    clip = tiny.write_reward_folder(str(tmp_path / "clip"), seed=5)
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    save_file(test_fid._random_state_dict(), str(tmp_path / "inception_in.safetensors"))
    assert convert_main(["--kind", "fid_inception", str(tmp_path / "inception_in.safetensors"),
                         str(tmp_path / "inception.safetensors")]) == 0
    _ScriptedScorer.real = scores.Scorer
    monkeypatch.setattr(scores, "Scorer", _ScriptedScorer)
    workdir = str(tmp_path / "run")
    cfg = tiny_config(inputs, total_steps=6, checkpoint_every=4, **{
        "evals.quality.every": 1, "evals.quality.steps": (1,), "evals.quality.num_prompts": 3,
        "evals.quality.rewards": f"clipscore={clip}", "evals.quality.fid_ref": str(ref),
        "evals.quality.inception": str(tmp_path / "inception.safetensors"),
        "evals.hacking.every": 1, "evals.hacking.num_prompts": 2, "evals.hacking.heldout": "imagereward=heldout",
        "evals.hacking.train_reward": "clipscore=train", "evals.hacking.stop_if.patience": 2})
    with caplog.at_level(logging.WARNING):
        job.train(cfg, workdir)
    records = _records(workdir)
    quality = {r["step"]: r for r in records if "quality.clipscore_lcm1" in r}
    assert sorted(quality) == [1, 2, 3]
    for r in quality.values():
        assert r["quality.clipscore_lcm1"] >= 0 and np.isfinite(r["quality.fid_lcm1"])
        assert 0 <= r["quality.hf_energy_lcm1"] <= 1
    assert quality[1]["quality.fid_lcm1"] != quality[3]["quality.fid_lcm1"]   # the student changed
    hacking = [r for r in records if "hacking.heldout" in r]
    assert [r["step"] for r in hacking] == [1, 2, 3]                  # stopped at the 2nd rising/falling pair
    assert [r["hacking.train_reward"] for r in hacking] == [1, 2, 3] and hacking[-1]["hacking.heldout"] == -3
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))    # saved at the stop, off the schedule
    assert not os.path.isdir(os.path.join(workdir, "export", "student"))   # no final export: not finished
    assert json.loads(open(os.path.join(workdir, "best", "best.json")).read()) == {"step": 1, "heldout": -1.0}
    assert os.path.isfile(os.path.join(workdir, "best", "model_index.json"))
    assert any("reward hacking" in r.message and os.path.join(workdir, "best") in r.message for r in caplog.records)
