import sys

import numpy as np
import pytest

from sonicrec.config import IndexConfig
from sonicrec.errors import DataError, MissingExtraError
from sonicrec.index import VectorIndex, voyager_available

DIMS = 12
needs_voyager = pytest.mark.skipif(not voyager_available(), reason="voyager (sonicrec[ann]) not installed")
BACKENDS = ["exact", pytest.param("voyager", marks=needs_voyager)]


def _data(n: int, seed: int = 0, scale_spread: bool = True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIMS)).astype(np.float32)
    if scale_spread:  # norms that differ, so inner product and cosine rankings differ
        x *= rng.uniform(0.2, 3.0, (n, 1)).astype(np.float32)
    return np.array([f"s{i}" for i in range(n)]), x


def _brute_force(x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q)
    return x @ q


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_exact_search_matches_brute_force(metric):
    ids, x = _data(300)
    index = VectorIndex.build(ids, x, metric=metric, backend="exact")
    q = np.random.default_rng(1).standard_normal(DIMS).astype(np.float32)
    found, scores = index.query(q, 15, exclude=["s3", "not-in-index"])
    truth = _brute_force(x, q, metric)
    truth[3] = -np.inf
    expected = np.argsort(-truth, kind="stable")[:15]
    assert found.tolist() == ids[expected].tolist()
    np.testing.assert_allclose(scores, truth[expected], rtol=1e-5, atol=1e-5)
    assert metric == "ip" or scores[0] <= 1.0 + 1e-6


@needs_voyager
@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_hnsw_recall_against_exact_search(metric):
    ids, x = _data(3000)
    queries = np.random.default_rng(2).standard_normal((50, DIMS)).astype(np.float32)
    exact = VectorIndex.build(ids, x, metric=metric, backend="exact")
    hnsw = VectorIndex.build(ids, x, metric=metric, backend="voyager",
                             config=IndexConfig(m=12, ef_construction=100, ef=100))
    assert hnsw.backend == "voyager"
    truth, truth_scores = exact.query(queries, 10)
    found, found_scores = hnsw.query(queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.9
    # the scores are the true similarities of the ids returned
    rows = np.array([[int(s[1:]) for s in row] for row in found])
    expected = np.stack([_brute_force(x[r], q, metric) for r, q in zip(rows, queries, strict=True)])
    np.testing.assert_allclose(found_scores, expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(found_scores, axis=1) <= 1e-6)


@needs_voyager
def test_hnsw_honours_exclusions():
    ids, x = _data(2000)
    index = VectorIndex.build(ids, x, metric="cosine", backend="voyager")
    q = x[7]
    top, _ = index.query(q, 5)
    assert top[0] == "s7"
    without, _ = index.query(q, 5, exclude=top[:3].tolist())
    assert len(without) == 5
    assert not set(without) & set(top[:3])
    assert without[:2].tolist() == top[3:5].tolist()


@needs_voyager
def test_auto_backend_switches_at_the_threshold_and_on_incremental_add():
    ids, x = _data(200)
    cfg = IndexConfig(exact_below=150)
    small = VectorIndex.build(ids[:100], x[:100], config=cfg)
    assert small.backend == "exact"
    small.add(ids[100:], x[100:])
    assert small.backend == "voyager"
    assert len(small) == 200
    found, scores = small.query(x[150], 1)
    assert found.tolist() == ["s150"] and scores[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_incremental_add_finds_the_new_songs(backend, metric):
    ids, x = _data(1200)
    index = VectorIndex.build(ids[:1000], x[:1000], metric=metric, backend=backend)
    index.add(ids[1000:], x[1000:])
    assert len(index) == 1200 and "s1100" in index and index.ids[-1] == "s1199"
    queries = x[1000:1050] if metric == "cosine" else x[1000:1050] / np.linalg.norm(x[1000:1050], axis=1,
                                                                                      keepdims=True)
    found, _ = index.query(queries, 10)
    exact = VectorIndex.build(ids, x, metric=metric, backend="exact").query(queries, 10)[0]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, exact, strict=True)])
    assert recall >= (1.0 if backend == "exact" else 0.9)
    if metric == "cosine":  # every new song is its own nearest neighbour
        assert (found[:, 0] == ids[1000:1050]).mean() >= 0.98


def test_add_rejects_duplicates_and_bad_vectors():
    ids, x = _data(20)
    index = VectorIndex.build(ids, x, backend="exact")
    with pytest.raises(DataError, match="'s3'"):
        index.add(["new", "s3"], x[:2])
    with pytest.raises(DataError, match="'dup'"):
        index.add(["dup", "dup"], x[:2])
    with pytest.raises(DataError, match="shape"):
        index.add(["a"], x[:1, :5])
    bad = x[:1].copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="'nan-song'"):
        index.add(["nan-song"], bad)
    assert len(index) == 20  # nothing was added by the failed calls
    with pytest.raises(DataError, match="length"):
        index.query(np.ones(DIMS + 1, dtype=np.float32), 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_save_load_round_trip(tmp_path, backend, metric):
    ids, x = _data(500)
    cfg = IndexConfig(m=8, ef_construction=64, ef=40, seed=3)
    index = VectorIndex.build(ids, x, metric=metric, backend=backend, config=cfg, source="hash123")
    path = tmp_path / "sub" / "songs.npz"
    index.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["songs.npz"]  # no temporary file left
    loaded = VectorIndex.load(path)
    assert (loaded.backend, loaded.metric, loaded.config, loaded.source) == (backend, metric, cfg, "hash123")
    assert loaded.ids.tolist() == ids.tolist()
    queries = np.random.default_rng(4).standard_normal((20, DIMS)).astype(np.float32)
    a_ids, a_scores = index.query(queries, 8, exclude=["s1"])
    b_ids, b_scores = loaded.query(queries, 8, exclude=["s1"])
    assert a_ids.tolist() == b_ids.tolist()
    np.testing.assert_allclose(a_scores, b_scores, rtol=1e-6)
    loaded.add(["extra"], x[:1] * 2)  # a loaded index keeps growing
    assert "extra" in loaded and len(loaded) == 501


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no index at"):
        VectorIndex.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz")
    with pytest.raises(DataError, match="junk.npz"):
        VectorIndex.load(junk)


def test_falls_back_to_exact_search_without_voyager(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "voyager", None)  # makes `import voyager` fail
    ids, x = _data(300)
    index = VectorIndex.build(ids, x, config=IndexConfig(exact_below=100))
    assert index.backend == "exact"
    assert "voyager is not installed" in caplog.text
    assert index.query(x[5], 1)[0].tolist() == ["s5"]
    with pytest.raises(MissingExtraError, match=r"sonicrec\[ann\]"):
        VectorIndex(DIMS, backend="voyager")


def test_query_returns_what_there_is():
    ids, x = _data(4)
    index = VectorIndex.build(ids, x, backend="exact")
    found, scores = index.query(x[0], 10, exclude=["s1"])
    assert sorted(found.tolist()) == ["s0", "s2", "s3"] and scores.shape == (3,)
    assert index.query(x[0], 3, exclude=ids.tolist())[0].shape == (0,)
