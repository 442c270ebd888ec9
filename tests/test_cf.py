import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.stats import rankdata

from sonicrec.cf import (
    confidence,
    evaluate_heldout,
    factorize,
    factorize_run,
    fit_wmf,
    fold_in_songs,
    heldout_split,
)
from sonicrec.cli import main
from sonicrec.config import CFConfig
from sonicrec.errors import DataError
from sonicrec.factors import Factors
from sonicrec.interactions import PlayMatrix, write_plays
from sonicrec.rundir import RunDir

CFG = CFConfig(factors=8, iterations=10, regularization=0.1, seed=0)


def _groups(n_users, n_songs, n_groups, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(n_groups, size=n_users), rng.integers(n_groups, size=n_songs), rng


def _low_rank_plays(n_users=300, n_songs=200, n_groups=5, seed=0) -> sparse.csr_matrix:
    """SIMULATED rank-5 plays: a user plays half the songs of their group, almost none of others."""
    user_group, song_group, rng = _groups(n_users, n_songs, n_groups, seed)
    same = user_group[:, None] == song_group[None, :]
    played = rng.random((n_users, n_songs)) < np.where(same, 0.5, 0.002)
    counts = rng.geometric(0.4, size=(n_users, n_songs)) * played
    return sparse.csr_matrix(counts.astype(np.int64))


def _mean_auc(user_factors, song_factors, fit, held) -> float:
    """Mean over users of the AUC of held-out plays against never-played songs."""
    scores = user_factors @ song_factors.T
    fit, held = fit.toarray() > 0, held.toarray() > 0
    aucs = []
    for u in range(scores.shape[0]):
        pos, neg = held[u], ~(held[u] | fit[u])
        if pos.any() and neg.any():
            ranks = rankdata(scores[u][pos | neg])[pos[pos | neg]]
            n_pos, n_neg = pos.sum(), neg.sum()
            aucs.append((ranks.sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def _matrix(counts: sparse.csr_matrix) -> PlayMatrix:
    users = np.array([f"u{i:04d}" for i in range(counts.shape[0])])
    songs = np.array([f"s{i:04d}" for i in range(counts.shape[1])])
    return PlayMatrix(counts, users, songs)


def test_confidence_is_the_papers():
    counts = np.array([1, 2, 10, 100])
    expected = 1 + 2.0 * np.log(1 + counts / 0.5)
    np.testing.assert_allclose(confidence(counts, alpha=2.0, epsilon=0.5), expected, rtol=1e-6)


def test_fold_in_solves_the_weighted_least_squares_exactly():
    """implicit's half-step must minimise sum_u c_ui (p_ui - x_u.y)^2 + lambda |y|^2.

    with the paper's confidence c_ui = 1 + alpha log(1 + r_ui / epsilon) (1 where unplayed).
    """
    rng = np.random.default_rng(1)
    cfg = CFConfig(factors=4, alpha=3.0, epsilon=0.7, regularization=0.5)
    users = rng.normal(size=(30, 4)).astype(np.float32)
    counts = sparse.random(30, 3, density=0.3, random_state=2, data_rvs=lambda n: rng.integers(1, 20, n))
    got = fold_in_songs(users, counts.tocsr(), cfg)
    dense = counts.toarray()
    for i in range(3):
        c = np.where(dense[:, i] > 0, confidence(dense[:, i], alpha=cfg.alpha, epsilon=cfg.epsilon), 1.0)
        p = (dense[:, i] > 0).astype(float)
        a = users.T @ (c[:, None] * users) + cfg.regularization * np.eye(4)
        expected = np.linalg.solve(a, users.T @ (c * p))
        np.testing.assert_allclose(got[i], expected, rtol=1e-3, atol=1e-4)


def test_wmf_recovers_low_rank_structure():
    counts = _low_rank_plays()
    fit, held = heldout_split(counts, fraction=0.2, seed=0)
    user_factors, song_factors = fit_wmf(fit, CFG, show_progress=False)
    assert user_factors.shape == (300, 8) and song_factors.shape == (200, 8)
    user_group, song_group, _ = _groups(300, 200, 5, seed=0)
    oracle = _mean_auc(np.eye(5)[user_group], np.eye(5)[song_group], fit, held)  # ranks by true group
    auc = _mean_auc(user_factors, song_factors, fit, held)
    assert auc > 0.9 and auc > oracle - 0.02


def test_heldout_evaluation_beats_popularity():
    results = evaluate_heldout(_low_rank_plays(), CFG, k=20, show_progress=False)
    assert results["wmf"]["map"] > 2 * results["popularity"]["map"]
    assert results["wmf"]["precision"] > results["popularity"]["precision"]


def test_cold_start_split_test_songs_never_reach_the_fit():
    counts = _low_rank_plays(seed=2)
    matrix = _matrix(counts)
    split = np.where(np.arange(200) % 5 == 0, "test", np.where(np.arange(200) % 5 == 1, "valid", "train"))
    factors = factorize(matrix, CFG, split=split, show_progress=False)
    assert factors.user_factors.shape == (300, 8) and factors.song_factors.shape == (200, 8)
    np.testing.assert_array_equal(factors.split, split)
    # change every play of held-out songs: the user factors (fitted on train songs) must not move
    changed = counts.toarray()
    changed[:, split != "train"] = np.random.default_rng(9).integers(0, 3, size=(300, 80))
    other = factorize(_matrix(sparse.csr_matrix(changed)), CFG, split=split, show_progress=False)
    np.testing.assert_allclose(other.user_factors, factors.user_factors, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(other.song_factors[split == "train"], factors.song_factors[split == "train"],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(other.song_factors[split == "test"], factors.song_factors[split == "test"])
    # folded-in test songs rank their own listeners high (they are the CF upper bound)
    test = split == "test"
    held = sparse.csr_matrix(counts.toarray() * test[None, :])
    fit = sparse.csr_matrix(counts.toarray() * ~test[None, :])
    assert _mean_auc(factors.user_factors, factors.song_factors * test[:, None], fit, held) > 0.9


def test_factorize_frame_without_split_and_users_without_train_plays():
    plays = PlayMatrix.from_frame(pd.DataFrame(
        {"user_id": ["a", "a", "b", "c"], "track_id": ["x", "y", "x", "z"], "count": [1, 2, 3, 4]}
    ))
    factors = factorize(plays, CFConfig(factors=2, iterations=2), show_progress=False)
    assert set(factors.split) == {"train"}
    cold = factorize(plays, CFConfig(factors=2, iterations=2), split=np.array(["train", "train", "test"]),
                     show_progress=False)  # songs sorted: x, y, z; user c played only z
    np.testing.assert_array_equal(cold.user_factors[cold.user_index(["c"])[0]], 0.0)
    with pytest.raises(DataError, match="split must give"):
        factorize(plays, CFG, split=np.array(["train", "bogus", "train"]), show_progress=False)


def test_factorize_run_saves_factors_with_unit_norms(tmp_path):
    run = RunDir(tmp_path / "run")
    write_plays(_matrix(_low_rank_plays()), run.plays)
    cfg = CFConfig(factors=8, iterations=5, valid_fraction=0.1, test_fraction=0.2, seed=4)
    factors = factorize_run(run, cfg, show_progress=False)
    loaded = Factors.load(run.factors)
    np.testing.assert_array_equal(loaded.song_factors, factors.song_factors)
    assert (loaded.split == "test").sum() == 40 and (loaded.split == "valid").sum() == 20
    norms = np.linalg.norm(loaded.song_factors_unit, axis=1)
    played = np.linalg.norm(loaded.song_factors, axis=1) > 0
    np.testing.assert_allclose(norms[played], 1.0, rtol=1e-5)
    again = factorize_run(run, cfg, show_progress=False)
    np.testing.assert_array_equal(again.split, factors.split)  # seeded
    with pytest.raises(DataError, match="no play counts"):
        factorize_run(tmp_path / "empty", cfg, show_progress=False)


def test_cli_factorize_plays_file(tmp_path, capsys):
    plays = tmp_path / "plays.tsv"
    coo = _low_rank_plays(n_users=60, n_songs=40).tocoo()
    rows = zip(coo.row, coo.col, coo.data, strict=True)
    plays.write_text("".join(f"u{u}\ts{s}\t{c}\n" for u, s, c in rows))
    out = tmp_path / "run"
    argv = ["--no-progress", "factorize", "--plays", str(plays), "--out", str(out), "--factors", "4",
            "--iterations", "3", "--eval-k", "5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "popularity" in printed and "wmf" in printed
    assert Factors.load(RunDir(out).factors).n_factors == 4
    assert main(["factorize", str(tmp_path / "missing-run"), "--no-eval"]) == 2


def _write_plays(path: Path, counts: sparse.csr_matrix) -> Path:
    coo = counts.tocoo()
    path.write_text("".join(f"u{u}\ts{s}\t{c}\n" for u, s, c in zip(coo.row, coo.col, coo.data, strict=True)))
    return path


def test_heldout_k_beyond_the_number_of_songs_is_capped(capsys, tmp_path):
    counts = _low_rank_plays(n_users=60, n_songs=40)
    results = evaluate_heldout(counts, CFG, k=10**6, show_progress=False)
    capped = evaluate_heldout(counts, CFG, k=40, show_progress=False)
    assert results == capped and results["wmf"]["k"] == 40
    assert all(0 <= m[name] <= 1 for m in results.values() for name in ("precision", "map", "ndcg", "auc"))
    plays = _write_plays(tmp_path / "plays.tsv", counts)
    argv = ["--no-progress", "factorize", "--plays", str(plays), "--out", str(tmp_path / "run"),
            "--factors", "4", "--iterations", "3", "--eval-k", "1000000"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "--eval-k 1000000 is more than the 40 songs: metrics at k = 40" in printed and "P@40" in printed


@pytest.mark.parametrize("text", ["u1\ts1\t3\n", "".join(f"u{i}\ts1\t{i % 3 + 1}\n" for i in range(50))])
def test_one_row_or_one_song_plays_give_a_clear_error_not_a_zero_division(tmp_path, capsys, text):
    plays = tmp_path / "plays.tsv"
    plays.write_text(text)
    matrix = PlayMatrix(*_as_matrix(plays))
    with pytest.raises(DataError, match="held-out"):
        evaluate_heldout(matrix, CFG, k=10, show_progress=False)
    argv = ["--no-progress", "factorize", "--plays", str(plays), "--out", str(tmp_path / "run"),
            "--iterations", "2"]
    assert main(argv) == 2
    assert "error: " in capsys.readouterr().err


def _as_matrix(path: Path):
    from sonicrec.interactions import read_play_matrix

    m = read_play_matrix(path, "triplets", show_progress=False)
    return m.counts, m.user_ids, m.song_ids


def test_users_who_played_every_song_are_left_out_of_the_auc():
    from sonicrec.cf import heldout_ranking_metrics

    fit = sparse.csr_matrix(np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]]))
    held = sparse.csr_matrix(np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1]]))  # user 0 played all 3 songs
    ones = np.ones((3, 2), np.float32)
    got = heldout_ranking_metrics(ones, ones, fit, held, k=2)
    kept = heldout_ranking_metrics(ones[1:], ones, fit[1:], held[1:], k=2)
    assert got == kept


def test_negative_regularisation_is_a_config_error(tmp_path, capsys):
    from sonicrec.errors import ConfigError

    with pytest.raises(ConfigError, match="cf.regularization=-1"):
        CFConfig(regularization=-1.0)
    plays = _write_plays(tmp_path / "plays.tsv", _low_rank_plays(n_users=20, n_songs=10))
    assert main(["factorize", "--plays", str(plays), "--out", str(tmp_path / "run"), "--reg", "-1"]) == 2
    assert "cf.regularization=-1.0: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "run" / "cf").exists()


def test_factorize_plays_refuses_a_run_that_has_plays_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    first = _write_plays(tmp_path / "a.tsv", _low_rank_plays(n_users=30, n_songs=20, seed=1))
    second = _write_plays(tmp_path / "b.tsv", _low_rank_plays(n_users=40, n_songs=25, seed=2))
    base = ["--no-progress", "factorize", "--out", str(out), "--factors", "4", "--iterations", "2",
            "--no-eval"]
    assert main(base + ["--plays", str(first)]) == 0
    before = (out / "plays.parquet").read_bytes(), (out / "cf" / "factors.npz").read_bytes()
    assert main(base + ["--plays", str(second)]) == 2
    assert "already holds play counts" in capsys.readouterr().err
    assert ((out / "plays.parquet").read_bytes(), (out / "cf" / "factors.npz").read_bytes()) == before
    assert main(base + ["--plays", str(second), "--force"]) == 0
    assert (out / "plays.parquet").read_bytes() != before[0]
    assert len(Factors.load(RunDir(out).factors).song_ids) == 25


def test_song_queries_on_a_file_instead_of_a_run_are_clear_errors(tmp_path, capsys):
    not_a_run = tmp_path / "plays.tsv"
    not_a_run.write_text("u\ts\t1\n")
    for command in (["similar", str(not_a_run), "x"], ["audience", str(not_a_run), "x"],
                    ["recommend", str(not_a_run), "--user", "u"]):
        assert main(command) == 2
        assert "no factors at" in capsys.readouterr().err


def _have_spark() -> bool:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None or bool(__import__("os").environ.get("JAVA_HOME"))


@pytest.mark.spark
@pytest.mark.skipif(not _have_spark(), reason="pyspark or Java missing")
def test_spark_engine_matches_implicit_quality():
    counts = _low_rank_plays(n_users=150, n_songs=100, seed=5)
    fit, held = heldout_split(counts, fraction=0.2, seed=0)
    spark_cfg = CFConfig(engine="spark", factors=8, iterations=4, regularization=0.01,
                         spark_master="local[2]")
    user_factors, song_factors = fit_wmf(fit, spark_cfg, show_progress=False)
    assert user_factors.shape == (150, 8) and song_factors.shape == (100, 8)
    spark_auc = _mean_auc(user_factors, song_factors, fit, held)
    implicit_auc = _mean_auc(*fit_wmf(fit, CFG, show_progress=False), fit, held)
    assert spark_auc > 0.9 and abs(spark_auc - implicit_auc) < 0.05


def test_missing_run_factors_message(tmp_path):
    with pytest.raises(DataError, match="factorize the play counts"):
        Factors.load(Path(tmp_path) / "cf" / "factors.npz")
