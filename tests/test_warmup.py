"""Warm-up blending: the fold-in posterior is implicit's fold-in, the blend goes from the audio (no
plays) to the listeners (many plays), and beats each part alone when few listeners are known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from sonicrec.cf import factorize, fold_in_songs
from sonicrec.config import CFConfig, Config
from sonicrec.factors import unit_rows
from sonicrec.interactions import PlayMatrix, split_songs
from sonicrec.io import atomic_save_npz
from sonicrec.recommend import Recommender
from sonicrec.rundir import RunDir
from sonicrec.warmup import FoldIn, WarmupBlend, fold_in_posterior, play_counts, reveal_listeners

CF = CFConfig(factors=6, iterations=8, regularization=0.5, seed=0)


@pytest.fixture(scope="module")
def world():
    """Users and songs with tastes in 6 dimensions, plays drawn from them, WMF factors (songs split
    train/valid/test: valid and test folded in) and an audio stand-in: the song's true CF
    direction plus noise, as a CNN's prediction would be."""
    rng = np.random.default_rng(0)
    n_users, n_songs, k = 400, 150, 6
    tastes, styles = rng.standard_normal((n_users, k)), unit_rows(rng.standard_normal((n_songs, k)))
    p = 1 / (1 + np.exp(-(2.5 * tastes @ styles.T - 3.5)))
    played = rng.random(p.shape) < p
    users, songs = np.nonzero(played)
    plays = pd.DataFrame({"user_id": [f"u{u:03d}" for u in users], "track_id": [f"s{s:03d}" for s in songs],
                          "count": rng.integers(1, 6, len(users))})
    matrix = PlayMatrix.from_frame(plays)
    split = split_songs(matrix.n_songs, valid_fraction=0.3, test_fraction=0.3, seed=0)
    factors = factorize(matrix, CF, split=split, show_progress=False)
    audio = unit_rows(factors.song_factors_unit + 0.35 * rng.standard_normal(factors.song_factors.shape))
    return factors, plays, audio


def songs_of(factors, plays, audio, split):
    ids = factors.songs(split)
    rows = factors.song_index(ids)
    counts = play_counts(PlayMatrix.from_frame(plays), factors.user_ids, ids)
    return counts, audio[rows], factors.song_factors_unit[rows]


def test_the_fold_in_posterior_is_implicits_fold_in(world):
    factors, plays, _ = world
    counts = play_counts(PlayMatrix.from_frame(plays), factors.user_ids, factors.songs("test"))
    fold = fold_in_posterior(factors.user_factors, counts, CF)
    np.testing.assert_allclose(fold.factors, fold_in_songs(factors.user_factors, counts, CF), atol=2e-4)
    # the evidence of a song's plays: its listeners' outer products weighted by c - 1, plus lambda I
    rows = counts[:, [0]].indices
    x = factors.user_factors[rows].astype(np.float64)
    weight = CF.alpha * np.log1p(counts[:, [0]].data / CF.epsilon)
    np.testing.assert_allclose(fold.evidence[0], (x * weight[:, None]).T @ x + CF.regularization * np.eye(6),
                               rtol=1e-5)
    nobody = fold_in_posterior(factors.user_factors, sparse.csc_matrix((len(factors.user_ids), 1)), CF)
    assert np.all(nobody.factors == 0) and np.allclose(nobody.evidence[0], CF.regularization * np.eye(6))


def test_the_blend_moves_from_the_audio_to_the_listeners(world):
    factors, plays, audio = world
    blend = WarmupBlend.fit(factors.user_factors, *songs_of(factors, plays, audio, "valid")[:2], CF)
    assert np.isfinite(blend.tau) and blend.tau > 0
    counts, predicted, truth = songs_of(factors, plays, audio, "test")
    nobody = FoldIn(np.zeros_like(predicted, dtype=np.float64),
                    np.broadcast_to(np.eye(6), (len(predicted), 6, 6)).copy())
    np.testing.assert_allclose(blend.blend(nobody, predicted), predicted, atol=1e-6)
    everyone = blend.blend(fold_in_posterior(factors.user_factors, counts, CF), predicted)
    error = [np.mean(np.sum((v - truth) ** 2, axis=1)) for v in (everyone, predicted)]
    assert error[0] < 0.2 * error[1]  # every listener known: the blend is near the CF factor

    rng = np.random.default_rng(1)
    for m in (1, 2, 5, 10):
        revealed, _ = reveal_listeners(counts, m, rng)
        fold = fold_in_posterior(factors.user_factors, revealed, CF)
        errors = {name: np.mean(np.sum((v - truth) ** 2, axis=1)) for name, v in (
            ("cf", unit_rows(fold.factors)), ("audio", predicted), ("blend", blend.blend(fold, predicted)))}
        assert errors["blend"] <= min(errors["cf"], errors["audio"]), (m, errors)


def test_reveal_listeners_splits_each_songs_listeners(world):
    factors, plays, _ = world
    counts = play_counts(PlayMatrix.from_frame(plays), factors.user_ids, factors.songs("test"))
    revealed, remaining = reveal_listeners(counts, 3, np.random.default_rng(0))
    listeners = np.diff(counts.indptr)
    assert np.array_equal(np.diff(revealed.indptr), np.minimum(listeners, 3))
    assert (revealed + remaining - counts).nnz == 0 and revealed.multiply(remaining).nnz == 0


def write_run(root, world) -> RunDir:
    """The world as a run directory, with one new song ("new0") predicted but not in the factors."""
    factors, plays, audio = world
    run = RunDir(root)
    Config(cf=CF).save(run.config)
    factors.save(run.factors)
    new = unit_rows(np.random.default_rng(2).standard_normal((1, 6)))
    atomic_save_npz(run.prediction("cnn-mse"), song_ids=np.append(factors.song_ids, "new0"),
                    factors=np.concatenate([audio, new]))
    plays.to_parquet(run.plays)
    return run


def test_the_recommender_blends_songs_with_few_listeners_and_new_songs(world, tmp_path):
    factors, plays, audio = world
    run = write_run(tmp_path / "run", world)
    listeners_of_s000 = plays.loc[plays["track_id"] == factors.songs("train")[0], "user_id"].to_numpy()
    first_plays = pd.DataFrame({"user_id": listeners_of_s000[:5], "track_id": "new0", "count": 3})
    pd.concat([plays, first_plays]).to_parquet(run.plays)

    rec = Recommender.load(run.root, warmup_below=30)
    listeners = plays[plays["track_id"].isin(factors.songs("train"))].groupby("track_id")["user_id"].nunique()
    assert sorted(rec.blended_ids.tolist()) == sorted(listeners.index[listeners < 30].tolist() + ["new0"])
    plain = Recommender.load(run.root, warmup_below=0)
    assert len(plain.blended_ids) == 0
    ids, vectors = rec.song_vectors()
    plain_vectors = dict(zip(*plain.song_vectors(), strict=True))
    moved = {s for s, v in zip(ids.tolist(), vectors, strict=True) if not np.allclose(v, plain_vectors[s])}
    assert moved == set(rec.blended_ids.tolist())
    # the new song's first listeners find it higher once their plays count
    first = set(first_plays["user_id"])
    rank = {name: [u in first for u in r.audience("new0", 60, exclude_played=False).ids].count(True)
            for name, r in (("blend", rec), ("audio", plain))}
    assert rank["blend"] > rank["audio"]


def test_the_warmup_curve_ranks_remaining_listeners(world):
    from sonicrec.warmup import warmup_curve

    factors, plays, audio = world
    rows = warmup_curve(factors, PlayMatrix.from_frame(plays), factors.song_ids, audio, CF, reveals=(1, 5),
                        ap_cutoff=50)
    table = {(r["m"], r["method"]): r for r in rows}
    assert {r["method"] for r in rows} == {"fold-in", "audio", "blend"} and len(rows) == 6
    for m in (1, 5):
        assert table[(m, "fold-in")]["n_songs"] == table[(m, "blend")]["n_songs"] > 0
        best_part = max(table[(m, "fold-in")]["auc"], table[(m, "audio")]["auc"])
        assert table[(m, "blend")]["auc"] >= best_part - 0.01
        assert all(0.5 < table[(m, method)]["auc"] < 1 for method in ("fold-in", "audio", "blend"))
    assert table[(5, "fold-in")]["auc"] > table[(1, "fold-in")]["auc"]  # more listeners, better fold-in


def test_the_warmup_command_writes_the_curve(world, tmp_path, capsys):
    from sonicrec.cli import main

    run = write_run(tmp_path / "run", world)
    assert main(["-q", "warmup", str(run.root)]) == 0
    assert "| 1 |" in capsys.readouterr().out
    rows = json.loads((run.evaluation / "warmup.json").read_text())
    assert {r["m"] for r in rows} <= {1, 2, 5, 10, 20, 50} and {r["method"] for r in rows} == {
        "fold-in", "audio", "blend"}
    assert (run.evaluation / "warmup.png").stat().st_size > 1000
    assert "| revealed |" in (run.evaluation / "warmup.md").read_text()
