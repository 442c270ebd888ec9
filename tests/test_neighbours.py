"""Precomputed neighbour lists answer exactly what live queries answer, and go stale with the factors."""

import os
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from sonicrec.cli import main
from sonicrec.config import Config, IndexConfig
from sonicrec.factors import Factors
from sonicrec.index import VectorIndex, voyager_available
from sonicrec.interactions import PlayMatrix
from sonicrec.io import atomic_save_npz
from sonicrec.neighbours import NeighbourLists, compute_lists, neighbours_run
from sonicrec.recommend import Recommender
from sonicrec.rundir import RunDir
from test_recommend import _recommender, world  # noqa: F401 - the simulated world fixture

BACKENDS = [pytest.param(IndexConfig(), id="exact"),
            pytest.param(IndexConfig(exact_below=0), id="hnsw",
                         marks=pytest.mark.skipif(not voyager_available(), reason="needs voyager"))]


@pytest.mark.parametrize("config", BACKENDS)
def test_query_rows_equals_one_query_per_row(config):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 6)).astype(np.float32)
    index = VectorIndex.build([f"v{i}" for i in range(300)], vectors, metric="cosine", config=config)
    queries = rng.standard_normal((20, 6)).astype(np.float32)
    left_out = [rng.choice(300, int(rng.integers(0, 9)), replace=False) for _ in range(20)]
    exclude = sp.csr_matrix((np.ones(sum(map(len, left_out))),
                             (np.repeat(np.arange(20), list(map(len, left_out))), np.concatenate(left_out))),
                            shape=(20, 300))
    rows, scores = index.query_rows(queries, 7, exclude=exclude)
    for i in range(20):
        ids, expected = index.query(queries[i], 7, exclude=index.ids[left_out[i]])
        assert index.ids[rows[i]].tolist() == ids.tolist()
        np.testing.assert_allclose(scores[i], expected, rtol=1e-5)
    wide_rows, wide_scores = index.query_rows(queries[:1], 305)  # more than the index holds: padded
    assert (wide_rows[0, 300:] == -1).all() and np.isneginf(wide_scores[0, 300:]).all()


@pytest.mark.parametrize("config", BACKENDS)
def test_precomputed_lists_equal_live_queries(world, config, monkeypatch):  # noqa: F811
    live = _recommender(world, index_config=config)
    lists = compute_lists(live, songs=12, users=15)
    served = _recommender(world, index_config=config)
    assert served.use_lists(lists)

    def no_search(*args, **kwargs):
        raise AssertionError("searched although the lists hold the answer")

    def agree(query: str, queries: list[str], sizes: tuple[int, ...], stored: int) -> None:
        for n in sizes:
            for q in queries:
                with monkeypatch.context() as m:
                    if n <= stored:
                        m.setattr(served, "_nearest_songs", no_search)
                    got, want = getattr(served, query)(q, n), getattr(live, query)(q, n)
                assert got.ids.tolist() == want.ids.tolist(), (q, n)
                np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)

    agree("similar", live.song_ids.tolist(), (1, 2, 8, 13, 20), 13)  # the song itself + 12 stored
    agree("recommend", live.factors.user_ids.tolist(), (1, 7, 15, 16), 15)
    raw = served.recommend("u03", 5, raw=True)  # not stored: searched, still right
    assert raw.ids.tolist() == live.recommend("u03", 5, raw=True).ids.tolist()
    raw_similar = served.similar("t01", 5, raw=True)
    assert raw_similar.ids.tolist() == live.similar("t01", 5, raw=True).ids.tolist()


def test_lists_of_some_songs_answer_for_those_and_the_others_are_searched(world, monkeypatch):  # noqa: F811
    live = _recommender(world)
    lists = compute_lists(live, songs=6, users=4, only_songs=np.array([0, 3]))
    assert not lists.complete and (lists.song_rows[1] == -1).all()
    served = _recommender(world)
    assert served.use_lists(lists)
    searched = []
    real = served._nearest_songs
    monkeypatch.setattr(served, "_nearest_songs", lambda *a, **k: searched.append(1) or real(*a, **k))
    for row in range(len(live.song_ids)):
        track = live.song_ids[row]
        assert served.similar(track, 5).ids.tolist() == live.similar(track, 5).ids.tolist()
    assert len(searched) == len(live.song_ids) - 2


def test_lists_of_other_factors_are_ignored(world):  # noqa: F811
    factors, predicted_ids, predicted, plays = world
    lists = compute_lists(_recommender(world), songs=5, users=5)
    moved = Factors(factors.user_ids, factors.song_ids, factors.user_factors[::-1].copy(),
                    factors.song_factors, factors.split)
    assert not Recommender(moved, predicted_ids, predicted, PlayMatrix.from_frame(plays)).use_lists(lists)
    fewer_plays = PlayMatrix.from_frame(plays.iloc[10:])
    assert not Recommender(factors, predicted_ids, predicted, fewer_plays).use_lists(lists)


def _write_run(root, world) -> RunDir:  # noqa: F811
    factors, predicted_ids, predicted, plays = world
    run = RunDir(root)
    Config().save(run.config)
    factors.save(run.factors)
    atomic_save_npz(run.prediction("cnn-mse"), song_ids=predicted_ids, factors=predicted)
    plays.to_parquet(run.plays, index=False)
    return run


def test_the_job_writes_memory_mapped_lists_and_recomputes_only_when_factors_change(
    tmp_path, world, capsys  # noqa: F811
):
    run = _write_run(tmp_path / "run", world)
    assert main(["-q", "neighbours", str(run.root), "--songs", "6", "--users", "4"]) == 0
    assert "written:" in capsys.readouterr().out
    lists = NeighbourLists.load(run.neighbours / "cnn-mse")
    assert isinstance(lists.song_rows, np.memmap) and lists.song_rows.shape == (65 - 10 + 10, 6)
    assert Recommender.load(run.root).lists is not None  # served from the lists from now on
    assert neighbours_run(run.root, songs=6, users=4)[1] is False  # current: nothing recomputed
    factors = world[0]
    Factors(factors.user_ids, factors.song_ids, factors.user_factors * 2, factors.song_factors,
            factors.split).save(run.factors)
    assert Recommender.load(run.root).lists is None  # stale lists are not used
    assert neighbours_run(run.root, songs=6, users=4)[1] is True


@pytest.mark.spark
@pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
                    reason="Java missing (Spark)")
@pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas")
@pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")
def test_the_spark_job_writes_the_lists_the_local_job_writes(tmp_path, world, monkeypatch, capsys):  # noqa: F811
    pytest.importorskip("pyspark")
    monkeypatch.setattr("sonicrec.neighbours._BLOCK_SCORES", 1)  # blocks of 64 rows: 2 of songs
    index = IndexConfig(exact_below=0) if voyager_available() else IndexConfig()  # executors load its files
    runs = [_write_run(tmp_path / name, world) for name in ("local", "spark")]
    for run in runs:
        Config(index=index).save(run.config)
    local, _ = neighbours_run(runs[0].root, songs=6, users=4)
    assert main(["-q", "--no-progress", "neighbours", str(runs[1].root), "--songs", "6", "--users", "4",
                 "--engine", "spark", "--spark-master", "local[2]"]) == 0
    assert "written:" in capsys.readouterr().out
    distributed = NeighbourLists.load(runs[1].neighbours / "cnn-mse")
    assert distributed.source == local.source and distributed.complete
    for name in ("song_rows", "song_scores", "user_rows", "user_scores"):
        np.testing.assert_array_equal(getattr(distributed, name), getattr(local, name), err_msg=name)
    assert Recommender.load(runs[1].root).lists is not None  # the server reads them unchanged
