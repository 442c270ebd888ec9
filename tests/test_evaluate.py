"""Ranking metrics against a naive sklearn reference, and the evaluation of a small synthetic run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import average_precision_score, ndcg_score, roc_auc_score

from sonicrec import evaluate
from sonicrec.errors import DataError
from sonicrec.evaluate import evaluate_models, evaluate_run, ranking_metrics, relevance_matrix
from sonicrec.factors import Factors
from sonicrec.interactions import PlayMatrix
from sonicrec.io import atomic_save_npz
from sonicrec.rundir import RunDir


def naive_ap_at(scores: np.ndarray, rel: np.ndarray, cutoff: int) -> float:
    """AP@cutoff by its definition: a loop over the top of the ranking."""
    order = np.argsort(-scores, kind="stable")[:cutoff]
    hits, total = 0, 0.0
    for position, song in enumerate(order, start=1):
        if rel[song]:
            hits += 1
            total += hits / position
    return total / min(rel.sum(), cutoff)


def random_case(seed: int, n_users: int = 40, n_songs: int = 30, density: float = 0.15):
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((n_users, 5)).astype(np.float32)
    songs = rng.standard_normal((n_songs, 5)).astype(np.float32)
    rel = rng.random((n_users, n_songs)) < density
    rel[0] = False  # skipped: no relevant song
    rel[1] = True  # AUC undefined: no irrelevant song
    rel[2] = False
    rel[2, 3] = True  # a single relevant song
    return users, songs, rel


@pytest.fixture(params=[0, 16], ids=["sorted-rows", "direct-counts"])
def count_directly(request, monkeypatch) -> int:
    """Both ways of locating the played songs: binary search in sorted rows, direct counting."""
    monkeypatch.setattr(evaluate, "COUNT_DIRECTLY", request.param)
    return request.param


@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_sklearn(seed: int, chunk_size: int | None, count_directly: int) -> None:
    users, songs, rel = random_case(seed)
    k = 5
    m = ranking_metrics(users, songs, sp.csr_matrix(rel), k=k, ap_cutoff=songs.shape[0],
                        chunk_size=chunk_size, workers=2)
    scores = users @ songs.T
    assert m.n_skipped == (~rel.any(axis=1)).sum() >= 1 and 0 not in m.users
    assert list(m.users) == [u for u in range(len(rel)) if rel[u].any()]
    for i, u in enumerate(m.users):
        assert m.n_relevant[i] == rel[u].sum()
        assert m.ap[i] == pytest.approx(average_precision_score(rel[u], scores[u]))
        if rel[u].all():
            assert np.isnan(m.auc[i])
        else:
            assert m.auc[i] == pytest.approx(roc_auc_score(rel[u], scores[u]))
        assert m.ndcg[i] == pytest.approx(ndcg_score(rel[u][None].astype(float), scores[u][None], k=k))
        top = np.argsort(-scores[u])[:k]
        assert m.recall[i] == pytest.approx(rel[u][top].sum() / rel[u].sum())
    summary = m.summary()
    assert summary["n_users_auc"] == len(m.users) - 1  # user 1 has no unplayed song
    assert summary["auc"] == pytest.approx(np.nanmean(m.auc))


@pytest.mark.parametrize("cutoff", [1, 3, 10])
def test_truncated_ap_matches_definition(cutoff: int) -> None:
    users, songs, rel = random_case(3, n_songs=60, density=0.2)
    m = ranking_metrics(users, songs, sp.csr_matrix(rel), ap_cutoff=cutoff)
    scores = users @ songs.T
    expected = [naive_ap_at(scores[u], rel[u], cutoff) for u in m.users]
    np.testing.assert_allclose(m.ap, expected)


def test_truncated_ap_by_hand() -> None:
    # Relevant songs at ranks 1, 3 and 6; AP@4 = (1/1 + 2/3) / min(3, 4).
    scores = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    rel = sp.csr_matrix(np.array([[1, 0, 1, 0, 0, 1]]))
    m = ranking_metrics(np.ones((1, 1)), scores.T, rel, k=2, ap_cutoff=4)
    assert m.ap[0] == pytest.approx((1 + 2 / 3) / 3)
    assert m.recall[0] == pytest.approx(1 / 3)
    # AP@2 = 1/1 normalised by min(3, 2) = 2.
    assert ranking_metrics(np.ones((1, 1)), scores.T, rel, ap_cutoff=2).ap[0] == pytest.approx(0.5)


def test_ties_count_half_in_auc(count_directly: int) -> None:
    rng = np.random.default_rng(4)
    users = np.ones((20, 1), dtype=np.float32)
    songs = rng.integers(0, 4, size=(25, 1)).astype(np.float32)  # many ties
    rel = rng.random((20, 25)) < 0.3
    m = ranking_metrics(users, songs, sp.csr_matrix(rel))
    for i, u in enumerate(m.users):
        assert m.auc[i] == pytest.approx(roc_auc_score(rel[u], songs[:, 0]))
        assert 0 <= m.ap[i] <= 1 and 0 <= m.ndcg[i] <= 1


def test_bad_inputs_raise() -> None:
    with pytest.raises(DataError, match="dimensions"):
        ranking_metrics(np.ones((2, 3)), np.ones((4, 2)), sp.csr_matrix((2, 4)))
    with pytest.raises(DataError, match="NaN"):
        ranking_metrics(np.full((2, 2), np.nan), np.ones((4, 2)), sp.csr_matrix((2, 4)))
    with pytest.raises(DataError, match="relevance"):
        ranking_metrics(np.ones((2, 2)), np.ones((4, 2)), sp.csr_matrix((3, 4)))


# --- a synthetic run ------------------------------------------------------------------------------


def synthetic_world(seed: int = 0, n_users: int = 400, n_songs: int = 150, n_factors: int = 6):
    """Factors with a split and play counts drawn from them (synthetic, made here)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_users, n_factors)).astype(np.float32)
    y = (rng.standard_normal((n_songs, n_factors)) * rng.uniform(0.5, 1.5, (n_songs, 1))).astype(np.float32)
    split = rng.choice(["train", "valid", "test"], size=n_songs, p=[0.6, 0.1, 0.3])
    user_ids = np.array([f"u{i}" for i in range(n_users)])
    song_ids = np.array([f"s{i}" for i in range(n_songs)])
    logits = x @ y.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    rows = []
    for u in range(n_users - 5):  # the last 5 users never play: skipped
        for s in rng.choice(n_songs, size=rng.integers(1, 12), p=p[u]):
            rows.append((user_ids[u], song_ids[s], int(rng.integers(1, 5))))
    rows.append(("stranger", song_ids[split == "test"][0], 3))  # a user without factors
    plays = pd.DataFrame(rows, columns=["user_id", "track_id", "count"])
    plays = plays.groupby(["user_id", "track_id"], as_index=False)["count"].sum()
    return Factors(user_ids, song_ids, x, y, split), plays


def row(results: dict, model: str) -> dict:
    return next(r for r in results["models"] if r["model"] == model)


def test_perfect_predictor_equals_upper_bound_and_random_is_chance() -> None:
    factors, plays = synthetic_world()
    predictions = {
        "perfect": (factors.song_ids, factors.song_factors),
        "perfect-unit": (factors.song_ids[::-1], factors.song_factors_unit[::-1]),  # order is irrelevant
    }
    results = evaluate_models(factors, PlayMatrix.from_frame(plays), predictions, k=10, seed=1)
    metrics = ["map@500", "auc", "ndcg@10", "recall@10", "n_users"]
    assert {m: row(results, "perfect")[m] for m in metrics} == {
        m: row(results, "upper-bound")[m] for m in metrics
    }
    assert {m: row(results, "perfect-unit")[m] for m in metrics} == {
        m: row(results, "upper-bound-unit")[m] for m in metrics
    }
    assert row(results, "upper-bound")["auc"] > 0.75
    assert abs(row(results, "random")["auc"] - 0.5) < 0.05
    assert row(results, "upper-bound")["map@500"] > 2 * row(results, "random")["map@500"]
    names = [r["model"] for r in results["models"]]
    assert names[:2] == ["random", "popularity"] and names[-1] == "upper-bound"
    data = results["data"]
    assert data["n_users_without_factors"] == 1
    assert data["n_songs"] == (factors.split == "test").sum()
    test_plays = plays[plays.track_id.isin(factors.songs("test")) & plays.user_id.isin(factors.user_ids)]
    assert data["n_user_song_pairs"] == len(test_plays)
    assert data["n_users"] + data["n_users_skipped_no_plays"] == len(factors.user_ids)
    assert data["n_users"] == test_plays.user_id.nunique()


def test_songs_missing_from_a_prediction_are_left_out_for_all() -> None:
    factors, plays = synthetic_world(seed=2)
    test_songs = factors.songs("test")
    partial = (test_songs[3:], np.zeros((len(test_songs) - 3, factors.n_factors)) + 1.0)
    results = evaluate_models(factors, PlayMatrix.from_frame(plays), {"partial": partial}, split="test")
    assert results["data"]["n_songs"] == len(test_songs) - 3
    assert results["data"]["n_songs_left_out"] == 3


def test_relevance_matrix_is_binary() -> None:
    plays = PlayMatrix.from_frame(pd.DataFrame(
        {"user_id": ["a", "a", "b", "z"], "track_id": ["s1", "s2", "s2", "s1"], "count": [5, 1, 2, 1]}
    ))
    matrix, unknown = relevance_matrix(plays, np.array(["a", "b"]), np.array(["s2", "s1"]))
    assert unknown == 1
    np.testing.assert_array_equal(matrix.toarray(), [[1, 1], [1, 0]])


def test_evaluate_run_writes_reports(tmp_path) -> None:
    factors, plays = synthetic_world(seed=3, n_users=120)
    run = RunDir(tmp_path / "run")
    factors.save(run.factors)
    plays.to_parquet(run.plays)
    atomic_save_npz(run.prediction("cnn-mse"), song_ids=factors.song_ids, factors=factors.song_factors_unit)
    results = evaluate_run(run, k=5, description="synthetic test data", show_progress=False)
    assert [r["model"] for r in results["models"]] == [
        "random", "popularity", "cnn-mse", "upper-bound-unit", "upper-bound"
    ]
    saved = json.loads((run.evaluation / "results.json").read_text())
    assert saved["data"] == results["data"] and saved["description"] == "synthetic test data"
    md = (run.evaluation / "results.md").read_text()
    assert "| model | mAP@500 | AUC | NDCG@5 | recall@5 |" in md
    assert "popularity (warm-start reference)" in md and "synthetic test data" in md
    assert (run.evaluation / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "Paired differences" in md and "| cnn-mse - random |" in md


def test_intervals_bracket_the_table_and_pair_every_prediction() -> None:
    factors, frame = synthetic_world(seed=6)
    plays = PlayMatrix.from_frame(frame)
    noisy = factors.song_factors + np.random.default_rng(0).normal(0, 0.5, factors.song_factors.shape)
    predictions = {
        "mfcc-linear": (factors.song_ids, noisy), "cnn-mse": (factors.song_ids, factors.song_factors)
    }
    results = evaluate_models(factors, plays, predictions, k=10, seed=1, n_resamples=300)
    for r in results["models"]:
        for key in ("map@500", "auc", "ndcg@10", "recall@10"):
            low, high = r["interval"][key]
            assert low <= r[key] <= high and low < high
    pairs = {(p["model"], p["baseline"]): p for p in results["paired"]}
    assert set(pairs) == {("mfcc-linear", "random"), ("cnn-mse", "mfcc-linear"), ("cnn-mse", "random")}
    better = pairs[("cnn-mse", "random")]["map@500"]
    difference = row(results, "cnn-mse")["map@500"] - row(results, "random")["map@500"]
    assert better["diff"] == pytest.approx(difference)
    assert better["interval"][0] > 0 and better["p"] < 0.01
    assert results["bootstrap"]["n_resamples"] == 300
    again = evaluate_models(factors, plays, predictions, k=10, seed=1, n_resamples=300)
    assert again == results
    off = evaluate_models(factors, plays, predictions, k=10, seed=1, n_resamples=0)
    assert off["paired"] == [] and off["models"][0]["interval"] == {}


@pytest.mark.parametrize("bad", ["shape", "nan"])
def test_evaluate_run_rejects_bad_predictions(tmp_path, bad: str) -> None:
    factors, plays = synthetic_world(seed=4, n_users=50)
    run = RunDir(tmp_path / "run")
    factors.save(run.factors)
    plays.to_parquet(run.plays)
    predicted = np.ones((3, 2)) if bad == "shape" else np.full(factors.song_factors.shape, np.nan)
    atomic_save_npz(run.prediction("cnn-wpe"), song_ids=factors.song_ids, factors=predicted)
    with pytest.raises(DataError, match="cnn-wpe.npz"):
        evaluate_run(run, show_progress=False)


def test_simulated_plays_are_labelled(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    factors, plays = synthetic_world(seed=5, n_users=60)
    run = RunDir(tmp_path / "run")
    factors.save(run.factors)
    table = pa.Table.from_pandas(plays, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"simulated": b"true"}), run.plays)
    results = evaluate_run(run, show_progress=False)
    assert "SIMULATED" in results["description"]
    assert "SIMULATED" in (run.evaluation / "results.md").read_text()
