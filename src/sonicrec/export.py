"""Export what a run predicts in files a service reads as they are: Parquet tables and voyager indexes.

``sonicrec export RUN --what predictions,neighbours,topn,index`` writes into RUN/export/MODEL/:

``predictions.parquet``
    ``track_id`` (string), ``vector`` (list<float>): the factors model MODEL predicts from audio.
``neighbours.parquet``
    ``track_id``, ``neighbour_ids`` (list<string>), ``scores`` (list<float>, cosine): the nearest
    songs of every song the Recommender places (warm and cold), itself left out.
``topn.parquet``
    ``user_id``, ``track_ids`` (list<string>), ``scores`` (list<float>): each user's top songs,
    as :meth:`sonicrec.recommend.Recommender.recommend` ranks them (played songs left out).
``index/songs/index.hnsw`` + ``names.json``, ``index/users/...``
    voyager indexes in voyager's own file format with the JSON list of names that voyager's Java
    ``StringIndex`` reads (label i is ``names[i]``): songs in the Cosine space (unit vectors, the
    ones the Recommender ranks), users in the InnerProduct space. Load them with
    ``voyager.Index.load(path)`` in Python or ``StringIndex.load(index, names, SpaceType.Cosine,
    k, StorageDataType.Float32)`` in Java (docs/service.md); voyager's distance is
    ``1 - similarity`` in both spaces.

The neighbour and top-N lists are computed by :func:`neighbour_lists` and :func:`top_n_lists`
through the Recommender, one place to swap for precomputed lists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from sonicrec.config import IndexConfig
from sonicrec.errors import DataError, require
from sonicrec.factors import Predictions
from sonicrec.index import VectorIndex
from sonicrec.io import atomic_path, atomic_write_text
from sonicrec.recommend import Recommender
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)

WHAT = ("predictions", "neighbours", "topn", "index")


def neighbour_lists(rec: Recommender, n: int) -> pd.DataFrame:
    """The ``n`` nearest songs (cosine) of every song ``rec`` places: track_id, neighbour_ids, scores."""
    rows = []
    for track in rec.song_ids.tolist():
        ids, scores = rec.similar(track, n + 1)
        rows.append((track, ids[1:].tolist(), scores[1:].astype(np.float32)))
    return pd.DataFrame(rows, columns=["track_id", "neighbour_ids", "scores"])


def top_n_lists(rec: Recommender, n: int) -> pd.DataFrame:
    """Every user's ``n`` best songs (played ones left out): user_id, track_ids, scores."""
    rows = []
    for user in rec.factors.user_ids.tolist():
        ids, scores = rec.recommend(user, n)
        rows.append((user, ids.tolist(), scores.astype(np.float32)))
    return pd.DataFrame(rows, columns=["user_id", "track_ids", "scores"])


def vector_table(ids: np.ndarray, vectors: np.ndarray, id_name: str = "track_id") -> pd.DataFrame:
    """(n,) ids and (n, k) vectors as a table with a list<float32> ``vector`` column."""
    vectors = list(np.asarray(vectors, dtype=np.float32))
    return pd.DataFrame({id_name: np.asarray(ids).astype(str), "vector": vectors})


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """``frame`` as Parquet at ``path``, atomically; list columns keep float32 / string items."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for name in frame.columns:
        values = frame[name].tolist()
        if values and isinstance(values[0], np.ndarray):
            columns[name] = pa.array([v.tolist() for v in values], type=pa.list_(pa.float32()))
        elif values and isinstance(values[0], list):
            columns[name] = pa.array(values, type=pa.list_(pa.string()))
        else:
            columns[name] = pa.array([str(v) for v in values], type=pa.string())
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)
    return path


def write_voyager(ids: np.ndarray, vectors: np.ndarray, folder: Path, *, metric: str,
                  config: IndexConfig | None = None) -> Path:
    """A voyager index of ``vectors`` (n, k) as ``folder/index.hnsw`` + ``folder/names.json`` (ids)."""
    require("voyager", "ann")
    index = VectorIndex.build(ids, vectors, metric=metric, backend="voyager", config=config)
    with atomic_path(folder / "index.hnsw") as tmp:
        index.graph.save(str(tmp))
    atomic_write_text(folder / "names.json", json.dumps(index.ids.tolist()))
    return folder


def export_run(
    run: RunDir | str | Path,
    *,
    model: str = "cnn-mse",
    what: tuple[str, ...] = WHAT,
    n: int = 50,
    out: Path | None = None,
    show_progress: bool = False,
) -> dict[str, Path]:
    """Write the exports ``what`` of model ``model`` (module docstring); returns name -> path.

    ``out`` defaults to RUN/export/MODEL; ``n`` is the length of the neighbour and top-N lists.
    """
    unknown = sorted(set(what) - set(WHAT))
    if unknown or not what:
        named = ", ".join(unknown) or "(empty)"
        raise DataError(f"nothing to export named {named}: choose from {', '.join(WHAT)}")
    run = run if isinstance(run, RunDir) else RunDir(run)
    rec = Recommender.load(run.root, model, show_progress=show_progress)
    out = Path(out) if out is not None else run.export(model)
    written: dict[str, Path] = {}
    if "predictions" in what:
        predicted = Predictions.load(run.prediction(model), n_factors=rec.factors.n_factors)
        table = vector_table(predicted.song_ids, predicted.factors)
        written["predictions"] = write_parquet(table, out / "predictions.parquet")
    if "neighbours" in what:
        written["neighbours"] = write_parquet(neighbour_lists(rec, n), out / "neighbours.parquet")
    if "topn" in what:
        if not rec.factors.has_users:
            raise DataError(f"{run.root} has no user factors: there are no user top-N lists to export")
        written["topn"] = write_parquet(top_n_lists(rec, n), out / "topn.parquet")
    if "index" in what:
        config = run.read_config().index
        written["index"] = write_voyager(*rec.song_vectors(), out / "index" / "songs", metric="cosine",
                                         config=config)
        if rec.factors.has_users:
            write_voyager(rec.factors.user_ids, rec.factors.user_factors, out / "index" / "users",
                          metric="ip", config=config)
    for name, path in written.items():
        log.info("exported %s: %s", name, path)
    return written
