"""MFCC bag-of-words baselines on a tiny synthetic world (log-mels made here, in memory)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pytest

from sonicrec.baselines import (
    BagOfWordsConfig,
    Vocabulary,
    fit_bag_of_words_baselines,
    fit_baselines_run,
    mfcc,
)
from sonicrec.errors import DataError
from sonicrec.evaluate import evaluate_models
from sonicrec.factors import Factors
from sonicrec.interactions import PlayMatrix
from sonicrec.io import load_npz
from sonicrec.rundir import RunDir

SMALL = BagOfWordsConfig(n_words=24, vocabulary_tracks=80, frames_per_track=40, mlp_hidden=32, batch_size=16)


class MemoryStore:
    """In-memory stand-in with the FeatureStore read interface."""

    def __init__(self, features: dict[str, np.ndarray]) -> None:
        self._features = features

    @property
    def track_ids(self) -> list[str]:
        return list(self._features)

    def get(self, track_id: str) -> np.ndarray:
        return self._features[track_id]

    def get_many(self, track_ids) -> np.ndarray:
        return np.stack([self._features[t] for t in track_ids])


def tiny_world(seed: int = 0, n_songs: int = 160, n_users: int = 300, n_mels: int = 24, n_frames: int = 50):
    """Songs whose frames mix a few timbres in proportions set by their factors; plays from factors."""
    rng = np.random.default_rng(seed)
    k, n_timbres = 4, 6
    y = rng.standard_normal((n_songs, k)).astype(np.float32)
    x = rng.standard_normal((n_users, k)).astype(np.float32)
    timbres = rng.normal(0, 2, (n_timbres, n_mels))
    mixing = rng.normal(0, 1.5, (k, n_timbres))
    proportions = np.exp(y @ mixing)
    proportions /= proportions.sum(axis=1, keepdims=True)
    song_ids = np.array([f"t{i:03d}" for i in range(n_songs)])
    features = {}
    for i, song in enumerate(song_ids):
        picks = rng.choice(n_timbres, size=n_frames, p=proportions[i])
        logmel = timbres[picks].T + rng.normal(0, 0.3, (n_mels, n_frames))
        features[song] = logmel.astype(np.float16)
    split = np.where(np.arange(n_songs) < int(0.7 * n_songs), "train", "test")
    logits = x @ y.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    rows = [
        (f"u{u}", song_ids[s], 1)
        for u in range(n_users)
        for s in set(rng.choice(n_songs, size=15, p=p[u]))
    ]
    plays = pd.DataFrame(rows, columns=["user_id", "track_id", "count"])
    factors = Factors(np.array([f"u{u}" for u in range(n_users)]), song_ids, x, y, split)
    return MemoryStore(features), factors, plays


def test_mfcc_is_the_orthonormal_dct_of_the_log_mel() -> None:
    # The definition librosa.feature.mfcc(S=logmel, n_mfcc=13) uses: DCT-II, orthonormal, over mels.
    logmel = np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32)
    n = np.arange(40)
    basis = np.array([np.cos(np.pi * q * (2 * n + 1) / 80) for q in range(13)]) * np.sqrt(2 / 40)
    basis[0] /= np.sqrt(2)
    np.testing.assert_allclose(mfcc(logmel)[:13], basis @ logmel, rtol=1e-4, atol=1e-4)


def test_mfcc_differences() -> None:
    ramp = np.tile(np.arange(10, dtype=np.float32), (16, 1)) + np.arange(16)[:, None]  # +1 per frame
    out = mfcc(np.stack([ramp, ramp]), n_mfcc=5)
    assert out.shape == (2, 15, 10)
    coefficient0 = out[0, 0]
    np.testing.assert_allclose(out[0, 5, 1:], np.diff(coefficient0), rtol=1e-5)  # first differences
    assert out[0, 5, 0] == 0 and np.allclose(out[0, 10, 2:], 0, atol=1e-4)  # linear: 2nd diff = 0


def test_histograms_pick_the_nearest_centroid() -> None:
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(7, 3)).astype(np.float32)
    vocab = Vocabulary(mean=np.zeros(3), scale=np.ones(3), centroids=centroids)
    mfccs = rng.normal(size=(4, 3, 20)).astype(np.float32)
    hist = vocab.histograms(mfccs)
    assert hist.shape == (4, 7)
    np.testing.assert_allclose(hist.sum(axis=1), 1.0)
    for b in range(4):
        frames = mfccs[b].T
        nearest = np.argmin(((frames[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
        np.testing.assert_allclose(hist[b], np.bincount(nearest, minlength=7) / 20)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_baselines_predict_every_track_and_beat_chance() -> None:
    store, factors, plays = tiny_world()
    predictions = fit_bag_of_words_baselines(store, factors, SMALL, seed=3)
    assert set(predictions) == {"mfcc-linear", "mfcc-mlp"}
    for song_ids, predicted in predictions.values():
        assert sorted(song_ids) == sorted(store.track_ids)
        assert predicted.shape == (len(store.track_ids), factors.n_factors)
        assert predicted.dtype == np.float32 and np.isfinite(predicted).all()
    again = fit_bag_of_words_baselines(store, factors, SMALL, seed=3)
    np.testing.assert_array_equal(again["mfcc-linear"][1], predictions["mfcc-linear"][1])
    np.testing.assert_array_equal(again["mfcc-mlp"][1], predictions["mfcc-mlp"][1])

    results = evaluate_models(factors, PlayMatrix.from_frame(plays), predictions, k=10)
    auc = {r["model"]: r["auc"] for r in results["models"]}
    assert auc["mfcc-linear"] > auc["random"] + 0.1
    assert auc["mfcc-mlp"] > auc["random"] + 0.05
    assert auc["upper-bound-unit"] >= auc["mfcc-linear"]


def test_too_few_training_songs() -> None:
    store, factors, _ = tiny_world(n_songs=12)
    with pytest.raises(DataError, match="training songs"):
        fit_bag_of_words_baselines(store, factors, SMALL)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_fit_baselines_run_writes_predictions(tmp_path, monkeypatch) -> None:
    store, factors, _ = tiny_world(seed=1, n_songs=60, n_users=20)
    run = RunDir(tmp_path / "run")
    factors.save(run.factors)
    fake = types.ModuleType("sonicrec.features")
    fake.FeatureStore = lambda root: store
    monkeypatch.setitem(sys.modules, "sonicrec.features", fake)
    paths = fit_baselines_run(run, seed=0, show_progress=False, cfg=SMALL)
    assert paths == {"mfcc-linear": run.prediction("mfcc-linear"), "mfcc-mlp": run.prediction("mfcc-mlp")}
    saved = load_npz(paths["mfcc-linear"])
    assert list(saved["song_ids"]) == store.track_ids
    assert saved["factors"].shape == (60, factors.n_factors)
