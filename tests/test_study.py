"""Experiments over seeds and training-set sizes on a tiny world: outputs, resuming, the statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sonicrec import study
from sonicrec.baselines import BagOfWordsConfig
from sonicrec.cf import factorize_run
from sonicrec.errors import ConfigError
from sonicrec.factors import Factors

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL_BAGS = BagOfWordsConfig(n_words=16, mlp_hidden=8, mlp_max_iter=50)


def test_seeds_study_summarises_and_resumes(tmp_path, tiny_world, monkeypatch):
    out = tmp_path / "study"
    result = study.run_seeds(tiny_world, out, [0, 1], losses=("mse",), n_resamples=100, baselines=SMALL_BAGS)
    per_seed = [json.loads((out / f"seed-{s}" / "evaluation" / "results.json").read_text()) for s in (0, 1)]
    splits = [Factors.load(out / f"seed-{s}" / "cf" / "factors.npz").songs("test") for s in (0, 1)]
    assert set(splits[0]) != set(splits[1])  # each seed draws its own split
    assert not (tiny_world.root / "cf").exists()  # the base run is left as it was
    cnn = next(r for r in result["models"] if r["model"] == "cnn-mse")
    values = [next(r for r in p["models"] if r["model"] == "cnn-mse")["map@500"] for p in per_seed]
    assert cnn["map@500"]["values"] == values
    assert cnn["map@500"]["mean"] == pytest.approx(np.mean(values))
    assert cnn["map@500"]["sd"] == pytest.approx(np.std(values, ddof=1))
    pairs = {(p["model"], p["baseline"]) for p in result["paired"]}
    assert ("cnn-mse", "mfcc-linear") in pairs and ("cnn-mse", "random") in pairs
    md = (out / "study.md").read_text()
    assert "over 2 seeds" in md and "| cnn-mse - mfcc-linear |" in md and "±" in md

    # Resuming: finished seeds are read back, not trained again; a new seed is added.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr("sonicrec.train.train_run", no_training)
    assert study.run_seeds(tiny_world, out, [0, 1], losses=("mse",), n_resamples=100) == json.loads(
        (out / "study.json").read_text()
    )
    with pytest.raises(ConfigError, match="distinct"):
        study.run_seeds(tiny_world, out, [1, 1])


def test_pooled_differences_find_a_consistent_gain_and_not_noise() -> None:
    def seed_results(diff: float) -> dict:
        models = [{"model": "a", "map@500": 0.2 + diff, "auc": 0.6, "ndcg@50": 0.3, "recall@50": 0.5},
                  {"model": "b", "map@500": 0.2, "auc": 0.6, "ndcg@50": 0.3, "recall@50": 0.5}]
        same = {"diff": 0.0, "interval": [-0.01, 0.01], "p": 1.0}
        gain = {"diff": diff, "interval": [diff - 0.001, diff + 0.001], "p": 0.001}
        pair = {"model": "a", "baseline": "b", "map@500": gain, "auc": same, "ndcg@50": same}
        return {"ap_cutoff": 500, "k": 50, "data": {}, "models": models, "paired": [pair]}

    gain = study.summarise_seeds({s: seed_results(d) for s, d in enumerate([0.010, 0.012, 0.011])})
    cell = gain["paired"][0]["map@500"]
    assert cell["p"] < 0.01 and cell["interval"][0] > 0
    assert (cell["seeds_above"], cell["seeds_below"]) == (3, 0)
    assert cell["mean"] == pytest.approx(0.011) and cell["sd"] == pytest.approx(0.001)
    noise = study.summarise_seeds({s: seed_results(d) for s, d in enumerate([0.010, -0.012, 0.001])})
    cell = noise["paired"][0]["map@500"]
    assert cell["p"] > 0.5 and cell["interval"][0] < 0 < cell["interval"][1]


def test_train_subsets_are_nested_and_keep_the_rest(tiny_world) -> None:
    factors = factorize_run(tiny_world, tiny_world.read_config().cf, show_progress=False)
    n_train = (factors.split == "train").sum()
    small, large = (study.train_subset(factors, n, seed=0) for n in (3, 6))
    assert (small.split == "train").sum() == 3 and (large.split == "train").sum() == 6
    assert set(small.songs("train")) < set(large.songs("train"))
    for split in ("valid", "test"):
        assert list(small.songs(split)) == list(factors.songs(split))
    np.testing.assert_array_equal(small.user_factors, factors.user_factors)
    assert len(study.train_subset(factors, n_train, seed=0).song_ids) == len(factors.song_ids)
    with pytest.raises(ConfigError, match="training songs"):
        study.train_subset(factors, n_train + 1, seed=0)


def test_learning_curve_evaluates_every_size_on_the_same_songs(tmp_path, tiny_world) -> None:
    factorize_run(tiny_world, tiny_world.read_config().cf, show_progress=False)
    out = tmp_path / "curve"
    curve = study.run_learning_curve(tiny_world, out, [16, 10], n_resamples=50, baselines=SMALL_BAGS)
    assert curve["sizes"] == [10, 16]
    runs = [json.loads((out / f"train-{n}" / "evaluation" / "results.json").read_text()) for n in (10, 16)]
    assert runs[0]["data"] == runs[1]["data"]  # the same users, songs and plays
    upper = [next(r for r in run["models"] if r["model"] == "upper-bound")["map@500"] for run in runs]
    assert upper[0] == upper[1]
    assert {(r["n_train"], r["model"]) for r in curve["rows"]} >= {(10, "cnn-mse"), (16, "mfcc-linear")}
    assert [p["n_train"] for p in curve["paired"]] == [10, 16]
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 16 | cnn-mse |" in (out / "learning_curve.md").read_text()
