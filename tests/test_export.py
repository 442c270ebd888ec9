"""sonicrec export: Parquet tables read back equal to the run's arrays; the voyager index, loaded
by voyager alone in a fresh process, answers queries as the run's index does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import test_recommend
from sonicrec.cli import main
from sonicrec.config import Config, IndexConfig
from sonicrec.export import export_run
from sonicrec.factors import Predictions
from sonicrec.index import VectorIndex
from sonicrec.recommend import Recommender
from test_recommend import _write_run

pytest.importorskip("voyager")
world = test_recommend.world  # the fixture of the simulated factors, predictions and plays

# A fresh interpreter that knows nothing of sonicrec: voyager, json and numpy only.
LOAD_AND_QUERY = """
import json, sys
import numpy as np
import voyager
folder, queries, n = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3])
index = voyager.Index.load(folder + "/index.hnsw")
names = json.load(open(folder + "/names.json"))
index.ef = 200
labels, distances = index.query(queries, k=n)
print(json.dumps({"names": [[names[i] for i in row] for row in labels.tolist()],
                  "distances": distances.tolist(), "space": str(index.space), "dims": index.num_dimensions}))
"""


def query_in_fresh_process(folder, queries: np.ndarray, n: int) -> dict:
    np.save(folder / "queries.npy", queries.astype(np.float32))
    command = [sys.executable, "-c", LOAD_AND_QUERY, str(folder), str(folder / "queries.npy"), str(n)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def run(tmp_path, world):
    config = Config(index=IndexConfig(m=8, ef_construction=100, ef=200))
    return _write_run(tmp_path / "run", world, config)


def test_parquet_tables_read_back_equal_to_the_run(run, world, capsys):
    factors, predicted_ids, predicted, _ = world
    assert main(["export", str(run.root), "--what", "predictions,neighbours,topn", "--n", "5"]) == 0
    out = run.export("cnn-mse")
    assert f"predictions: {out / 'predictions.parquet'}" in capsys.readouterr().out

    table = pd.read_parquet(out / "predictions.parquet")
    predicted = Predictions.load(run.prediction("cnn-mse"), n_factors=factors.n_factors)
    ids, vectors = predicted.song_ids, predicted.factors
    assert table["track_id"].tolist() == ids.tolist()
    np.testing.assert_array_equal(np.stack(table["vector"].to_numpy()), vectors)

    rec = Recommender.load(run.root)
    neighbours = pd.read_parquet(out / "neighbours.parquet").set_index("track_id")
    assert sorted(neighbours.index) == sorted(rec.song_ids.tolist())
    for song in ("t00", "t45", "new3"):
        ids, scores = rec.similar(song, 6)
        assert neighbours.loc[song, "neighbour_ids"].tolist() == ids[1:].tolist()
        np.testing.assert_array_equal(neighbours.loc[song, "scores"], scores[1:])
    topn = pd.read_parquet(out / "topn.parquet").set_index("user_id")
    assert len(topn) == len(factors.user_ids)
    ids, scores = rec.recommend("u07", 5)
    assert topn.loc["u07", "track_ids"].tolist() == ids.tolist()
    np.testing.assert_array_equal(topn.loc["u07", "scores"], scores)


def test_voyager_index_answers_the_same_queries_in_a_fresh_process(run, world):
    factors = world[0]
    written = export_run(run.root, what=("index",))
    rec = Recommender.load(run.root)
    song_ids, song_vectors = rec.song_vectors()
    queries = np.random.default_rng(3).standard_normal((6, factors.n_factors)).astype(np.float32)
    reference = VectorIndex.build(song_ids, song_vectors, metric="cosine", backend="exact")
    answer = query_in_fresh_process(written["index"], queries, 10)
    assert answer["dims"] == factors.n_factors and "Cosine" in answer["space"]
    ref_ids = reference.query(queries, 10)[0].tolist()
    # the graph is approximate: ask for near-total recall, and exact cosines for the ids it returns
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(answer["names"], ref_ids, strict=True)])
    assert recall >= 0.95
    unit = song_vectors / np.linalg.norm(song_vectors, axis=1, keepdims=True)
    row = {s: i for i, s in enumerate(song_ids.tolist())}
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for b, names in enumerate(answer["names"]):
        cosines = unit[[row[s] for s in names]] @ q[b]
        np.testing.assert_allclose(1 - np.array(answer["distances"][b]), cosines, atol=1e-5)

    users = query_in_fresh_process(written["index"].parent / "users", queries[:2], 5)
    exact = VectorIndex.build(factors.user_ids, factors.user_factors, metric="ip", backend="exact")
    assert "InnerProduct" in users["space"]
    assert users["names"] == exact.query(queries[:2], 5)[0].tolist()


def test_bad_requests_are_clear(run, capsys):
    from sonicrec.errors import DataError

    with pytest.raises(DataError, match="choose from predictions"):
        export_run(run.root, what=("vectors",))
    with pytest.raises(SystemExit):
        main(["export", str(run.root), "--what", "everything"])
    assert "choose from predictions,neighbours,topn,index" in capsys.readouterr().err
