"""Spark batch jobs: feature extraction and CNN prediction over a DataFrame of tracks, neighbour lists.

The jobs run the local code inside ``mapInPandas`` (one Python worker per task), so a cluster
computes exactly what one machine does, and :func:`session` is the one place Spark is started:

* :func:`extract_features` runs :func:`sonicrec.features.extract_track` (the front end of
  :func:`sonicrec.audio.file_to_logmel`) on a DataFrame of ``(track_id, path)``. Each task writes
  its own feature store (``FeatureStoreWriter``, atomically committed shards) in a staging folder
  inside the run's store. :class:`SparkExtractor` is the Spark engine of the one ingest,
  :func:`sonicrec.features.ingest`: it moves the shards of the successful tasks into the store on
  the driver (``FeatureStoreWriter.adopt``: the index commit), and the ingest records every track
  in the catalog as it does for local worker processes.
* :func:`predict_frame` runs :class:`sonicrec.predict.Predictor`'s own batch functions
  (``predict_stored``, ``predict_each``) on each partition; :func:`predict_run_spark` writes
  RUN/predictions/NAME.parquet (``track_id``, ``factor_0`` ...) and, through the step
  :func:`sonicrec.predict.predict_run` uses, RUN/predictions/NAME.npz.
* :func:`neighbours_run_spark` is :func:`sonicrec.neighbours.neighbours_run` with the blocks of
  query rows answered by tasks (each loads the run's Recommender once), written by the driver.

Executors must see the audio files, the run directory and the checkpoint at the same paths as the
driver (a shared file system), and have sonicrec installed. pyspark is the ``spark`` extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sonicrec.catalog import Catalog, Track
from sonicrec.config import AudioConfig
from sonicrec.errors import DataError, MissingExtraError, RunStage, SetOption, require
from sonicrec.features import DEFAULT_SHARD_SIZE, Extracted, FeatureStoreWriter, IngestResult, ingest
from sonicrec.neighbours import (
    DEFAULT_SONGS,
    DEFAULT_USERS,
    NeighbourLists,
    QueryBlock,
    assemble_lists,
    neighbours_run,
    query_blocks,
)
from sonicrec.rundir import RunDir

if TYPE_CHECKING:
    from sonicrec.recommend import Recommender

log = logging.getLogger(__name__)

_STAGING_PREFIX = ".spark-staging-"  # inside the feature store: same file system, so shards are renamed
_EXTRACT_COLUMNS = ["track_id", "error", "duration", "offset", "padded", "decoder", "notes", "staging"]
_EXTRACT_SCHEMA = (
    "track_id string, error string, duration double, offset double, padded boolean, decoder string, "
    "notes array<string>, staging string"
)
_PREDICT_SCHEMA = "track_id string, error string, factors array<float>"
# pyspark 4 with pandas 3 warns on every conversion; the conversions sonicrec uses work
_PANDAS_WARNINGS = ("PySpark does not yet fully support pandas", "The copy keyword is deprecated")


@contextlib.contextmanager
def quiet_pandas_warnings() -> Iterator[None]:
    """Silence the warnings pyspark 4 with pandas 3 gives on every conversion (those sonicrec uses work)."""
    with warnings.catch_warnings():
        for message in _PANDAS_WARNINGS:
            warnings.filterwarnings("ignore", message, Warning)
        yield


def session(master: str, *, show_progress: bool = True):
    """(SparkSession, created): the active session, or a new one on ``master`` (``local[2]``,
    ``spark://host:7077``, ``yarn``, ``k8s://...``). Stop it when ``created`` and done.

    Every Spark job of sonicrec (ALS in :mod:`sonicrec.cf`, ingest and predict here) starts Spark
    through this, and leaves an active session open: a caller that runs several jobs starts Spark
    once by calling this first.
    """
    require("pyspark", "spark")
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    if master.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        os.environ["PYSPARK_PYTHON"] = sys.executable  # local workers must import this sonicrec
    builder = (
        SparkSession.builder.master(master)
        .appName("sonicrec")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", str(show_progress).lower())
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
    )
    if master.startswith("local"):  # the driver does all the work: give it memory, few partitions
        builder = builder.config("spark.driver.memory", "4g").config("spark.sql.shuffle.partitions", "8")
    try:
        with quiet_pandas_warnings():
            spark = builder.getOrCreate()
    except Exception as exc:  # Java missing or the master unreachable: py4j/pyspark raise many kinds
        raise MissingExtraError(
            f"Spark could not start on {master!r} ({type(exc).__name__}: {exc}); Spark needs Java 17+ "
            "(JAVA_HOME) and a reachable master (cf.spark_master)", remedy=SetOption("cf.engine", "implicit"),
        ) from exc
    spark.sparkContext.setLogLevel("WARN")
    return spark, True


# --- feature extraction -------------------------------------------------------------------------


def _extract_partition(
    batches: Iterator[pd.DataFrame], *, staging: str, cfg: AudioConfig, shard_size: int
) -> Iterator[pd.DataFrame]:
    """mapInPandas body: extract each track and commit it into this task attempt's own store."""
    from pyspark import TaskContext

    from sonicrec.features import FeatureStoreWriter, extract_track

    task = TaskContext.get()
    root = Path(staging) / f"part-{task.partitionId():05d}-{task.attemptNumber()}"
    with FeatureStoreWriter(root, cfg, shard_size=shard_size) as writer:
        for batch in batches:
            rows = []
            for track_id, path in zip(batch["track_id"], batch["path"], strict=True):
                result = extract_track(track_id, path, cfg)
                if result.features is not None:
                    writer.add(track_id, result.features)
                rows.append((track_id, result.error, result.duration, result.offset, result.padded,
                             result.decoder, list(result.notes), root))
            yield pd.DataFrame(rows, columns=_EXTRACT_COLUMNS).astype({"staging": str})


def extract_features(tracks, staging: str | Path, cfg: AudioConfig, *, shard_size: int = DEFAULT_SHARD_SIZE):
    """Lazy Spark job: features of ``tracks`` (DataFrame with ``track_id``, ``path``) into stores.

    Every task writes a feature store ``staging/part-PPPPP-A`` (partition P, attempt A). Returns a
    DataFrame with one row per track: ``track_id``, ``error`` (null when extracted), ``duration``,
    ``offset``, ``padded`` (the excerpt), ``decoder``, ``notes`` (what the decoder printed) and
    ``staging`` (the store holding its features); only
    stores named there come from successful task attempts.
    """
    body = partial(_extract_partition, staging=str(Path(staging).resolve()), cfg=cfg, shard_size=shard_size)
    return tracks.select("track_id", "path").mapInPandas(body, _EXTRACT_SCHEMA)


@dataclass(frozen=True)
class SparkExtractor:
    """The :class:`sonicrec.features.Extractor` of :func:`sonicrec.features.ingest` on Spark.

    One job extracts every track (:func:`extract_features`) into staging stores inside the run's
    store; their shards are then moved into the store (the index commit) before any result is
    given, so a strict ingest records every result before it raises.
    """

    master: str
    partitions: int | None = None  # None = max(default parallelism, tracks / (4 shard_size))
    show_progress: bool = True
    name: str = "spark"
    stops_early: bool = False

    def extract(
        self, tracks: Sequence[Track], cfg: AudioConfig, store: FeatureStoreWriter
    ) -> Iterator[Extracted]:
        for stale in store.root.glob(f"{_STAGING_PREFIX}*"):  # left by an interrupted job
            log.info("removing %s left by an interrupted Spark ingest", stale)
            shutil.rmtree(stale)
        if not tracks:
            return
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=store.root))
        try:
            results = self._extract_into(staging, tracks, cfg, shard_size=store.shard_size)
            for part in sorted(set(results["staging"])):  # the index commit
                store.adopt(part)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        yield from map(_as_extracted, results.itertuples())

    @quiet_pandas_warnings()
    def _extract_into(
        self, staging: Path, tracks: Sequence[Track], cfg: AudioConfig, *, shard_size: int
    ) -> pd.DataFrame:
        """The result rows of :func:`extract_features` over ``tracks``, run on this engine's master."""
        spark, created = session(self.master, show_progress=self.show_progress)
        try:
            default = max(spark.sparkContext.defaultParallelism, -(-len(tracks) // (4 * shard_size)))
            frame = pd.DataFrame([(t.track_id, t.path) for t in tracks], columns=["track_id", "path"])
            frame = spark.createDataFrame(frame).repartition(self.partitions or default)
            return extract_features(frame, staging, cfg, shard_size=shard_size).toPandas()
        finally:
            if created:
                spark.stop()


def ingest_run_spark(
    run: RunDir | str | Path,
    cfg: AudioConfig | None = None,
    *,
    master: str | None = None,
    partitions: int | None = None,
    strict: bool = False,
    retry_failed: bool = False,
    show_progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> IngestResult:
    """:func:`sonicrec.features.ingest` as a Spark job (:class:`SparkExtractor`).

    ``master``: None = ``cf.spark_master`` of the run's config. ``partitions``: Spark tasks.
    ``strict``: after the job, raise the first failure (the tracks extracted are kept either way).
    On a cluster the run directory is a shared path.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    extractor = SparkExtractor(master or run.read_config().cf.spark_master, partitions, show_progress)
    return ingest(
        run, extractor, cfg, strict=strict, retry_failed=retry_failed, show_progress=show_progress,
        shard_size=shard_size,
    )


def _as_extracted(row) -> Extracted:
    """A result row of :func:`extract_features` with plain Python values (no features)."""
    if isinstance(row.error, str):
        return Extracted(row.track_id, None, None, None, False, row.error)
    return Extracted(
        row.track_id, None, float(row.duration), float(row.offset), bool(row.padded), None,
        row.decoder, tuple(row.notes if row.notes is not None else ()),
    )


# --- prediction ---------------------------------------------------------------------------------


def _predict_partition(
    batches: Iterator[pd.DataFrame], *, checkpoint: str, store: str | None, batch_size: int
) -> Iterator[pd.DataFrame]:
    """mapInPandas body: factors of each track from the store (``store``) or its audio file, by the
    Predictor's own batch functions."""
    from sonicrec.features import FeatureStore
    from sonicrec.predict import Predictor

    predictor = Predictor.load(checkpoint)
    features = FeatureStore(store) if store is not None else None
    for batch in batches:
        ids = batch["track_id"].tolist()
        if features is None:
            result = predictor.predict_each(batch["path"].tolist(), batch_size=batch_size)
        else:
            result = predictor.predict_stored(features, ids, batch_size=batch_size)
        factors, errors = result.per_input(len(ids))
        yield pd.DataFrame({"track_id": ids, "error": errors, "factors": factors})


def predict_frame(tracks, checkpoint: str | Path, *, store: str | Path | None = None, batch_size: int = 64):
    """Lazy Spark job: CNN factors of ``tracks`` with the model of ``checkpoint``.

    ``tracks`` has a ``track_id`` column, and a ``path`` column unless ``store`` (a feature store
    holding every track) is given. Returns a DataFrame ``track_id``, ``error`` (null on success),
    ``factors`` (array<float> of length k; null on failure). Each task loads the model once.
    """
    columns = ["track_id"] if store is not None else ["track_id", "path"]
    body = partial(
        _predict_partition, checkpoint=str(Path(checkpoint).resolve()),
        store=str(Path(store).resolve()) if store is not None else None, batch_size=batch_size,
    )
    return tracks.select(*columns).mapInPandas(body, _PREDICT_SCHEMA)


@quiet_pandas_warnings()
def predict_run_spark(
    run: RunDir | str | Path,
    name: str,
    *,
    master: str | None = None,
    partitions: int | None = None,
    from_audio: bool = False,
    batch_size: int = 64,
    checkpoint: str | Path | None = None,
    show_progress: bool = True,
) -> tuple[Path, Path]:
    """:func:`sonicrec.predict.predict_run` as a Spark job.

    Predicts every track of RUN/features (``from_audio``: every ``ok`` catalog track, straight from
    its audio file, without a feature store) with model ``name``; writes RUN/predictions/NAME.parquet
    (a Spark folder: ``track_id`` and ``factor_0`` ... ``factor_{k-1}``, float32) and
    RUN/predictions/NAME.npz (``song_ids``, ``factors``) for the local pipeline. ``checkpoint``:
    the model file (default RUN/model/NAME/checkpoint.pt); an adapted model's songs are predicted
    by its source (:mod:`sonicrec.adapt`).

    Returns
    -------
    (parquet folder, npz file)
    """
    from sonicrec.predict import Predictor, run_checkpoint, save_run_predictions

    run, checkpoint = run_checkpoint(run, name, checkpoint)
    predictor = Predictor.load(checkpoint, device="cpu")  # fails early on a bad checkpoint
    if predictor.adapted_from is not None:  # as predict_run: the run's songs are placed by the source
        checkpoint = run.checkpoint(predictor.adapted_from)
    n_factors = predictor.n_factors
    frame, store = _tracks_to_predict(run, from_audio=from_audio)
    parquet = run.predictions / f"{name}.parquet"
    staged = run.predictions / f".{name}.parquet.{uuid.uuid4().hex}"
    spark, created = session(master or run.read_config().cf.spark_master, show_progress=show_progress)
    try:
        tracks = spark.createDataFrame(frame).repartition(partitions or spark.sparkContext.defaultParallelism)
        out = predict_frame(tracks, checkpoint, store=store, batch_size=batch_size)
        failures = _write_factor_columns(out, staged, n_factors)
    finally:
        if created:
            spark.stop()
    for row in failures.itertuples(index=False):
        log.warning("track %s: %s", row.track_id, row.error)
    _replace_folder(staged, parquet)
    table = pd.read_parquet(parquet).set_index("track_id")
    table = table.reindex([t for t in frame["track_id"] if t in table.index])  # the store's order
    path = save_run_predictions(run, name, table.index.to_numpy(dtype=str), table.to_numpy(np.float32))
    log.info("spark prediction: %d tracks failed; factors also in %s", len(failures), parquet)
    return parquet, path


def _tracks_to_predict(run: RunDir, *, from_audio: bool) -> tuple[pd.DataFrame, Path | None]:
    """(``track_id`` [, ``path``] frame, feature store or None): the stored tracks, or with
    ``from_audio`` the catalog's ``ok`` tracks and their files."""
    from sonicrec.predict import stored_tracks

    if not from_audio:
        return pd.DataFrame({"track_id": stored_tracks(run).track_ids}), run.features
    with Catalog(run.catalog) as catalog:
        ok = [(t.track_id, t.path) for t in catalog.tracks("ok")]
    if not ok:
        raise DataError(f"no tracks to predict in {run.root}", remedy=RunStage("ingest", run.root))
    return pd.DataFrame(ok, columns=["track_id", "path"]), None


def _write_factor_columns(out, folder: Path, n_factors: int) -> pd.DataFrame:
    """Write the successful rows of a :func:`predict_frame` result as Parquet ``folder`` (``track_id``,
    ``factor_0`` ...); returns the failed rows (``track_id``, ``error``)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    out = out.persist(StorageLevel.MEMORY_AND_DISK)
    columns = [F.col("factors")[j].alias(f"factor_{j}") for j in range(n_factors)]
    out.where(F.col("error").isNull()).select("track_id", *columns).write.parquet(str(folder.resolve()))
    failures = out.where(F.col("error").isNotNull()).select("track_id", "error").toPandas()
    out.unpersist()
    return failures


def _replace_folder(new: Path, old: Path) -> None:
    """Put folder ``new`` in place of ``old`` (two renames; ``old`` is deleted afterwards)."""
    if old.exists():
        trash = old.with_name(f".{old.name}.old-{uuid.uuid4().hex}")
        os.replace(old, trash)
        os.replace(new, old)
        shutil.rmtree(trash)
    else:
        os.replace(new, old)


# --- neighbour lists ----------------------------------------------------------------------------

_NEIGHBOURS_SCHEMA = "block int, source string, rows binary, scores binary"


def _neighbours_partition(batches: Iterator[pd.DataFrame], *, run: str, model: str) -> Iterator[pd.DataFrame]:
    """mapInPandas body: load the run's Recommender once (from its cached index files) and answer
    this task's blocks (``block``, ``kind``, ``width``, ``query``: int64 rows as bytes)."""
    from sonicrec.recommend import Recommender

    rec = None
    for batch in batches:
        rec = rec if rec is not None else Recommender.load(run, model)
        out = []
        for block, kind, width, query in batch[["block", "kind", "width", "query"]].itertuples(index=False):
            rows, scores = QueryBlock(kind, np.frombuffer(query, np.int64), int(width)).answer(rec)
            out.append((block, rec.lists_source, rows.tobytes(), scores.tobytes()))
        yield pd.DataFrame(out, columns=["block", "source", "rows", "scores"])


@quiet_pandas_warnings()
def _spark_lists(
    rec: Recommender, *, songs: int, users: int, show_progress: bool, run: str, model: str, master: str,
    partitions: int | None,
) -> NeighbourLists:
    """The :data:`sonicrec.neighbours.ListsEngine` on Spark: the blocks of
    :func:`sonicrec.neighbours.query_blocks` answered by tasks, written at their rows on the driver."""
    t0 = time.perf_counter()
    blocks = query_blocks(rec, songs=songs, users=users)
    frame = pd.DataFrame({"block": np.arange(len(blocks), dtype=np.int32), "kind": [b.kind for b in blocks],
                          "width": [b.width for b in blocks],
                          "query": [np.asarray(b.rows, np.int64).tobytes() for b in blocks]})
    spark, created = session(master, show_progress=show_progress)
    try:
        tasks = spark.createDataFrame(frame).repartition(partitions or spark.sparkContext.defaultParallelism)
        answered = tasks.mapInPandas(partial(_neighbours_partition, run=run, model=model),
                                     _NEIGHBOURS_SCHEMA).collect()
    finally:
        if created:
            spark.stop()

    def answers() -> Iterator[tuple[QueryBlock, np.ndarray, np.ndarray]]:
        for row in answered:
            if row.source != rec.lists_source:
                raise DataError(f"{run} changed while its neighbour lists were computed; run the job again")
            block = blocks[row.block]
            shape = (len(block.rows), block.width)
            yield (block, np.frombuffer(row.rows, np.int32).reshape(shape),
                   np.frombuffer(row.scores, np.float32).reshape(shape))

    return assemble_lists(rec, answers(), songs=songs, users=users, seconds_since=t0)


def neighbours_run_spark(
    run: RunDir | str | Path,
    model: str = "cnn-mse",
    *,
    master: str | None = None,
    partitions: int | None = None,
    songs: int = DEFAULT_SONGS,
    users: int = DEFAULT_USERS,
    force: bool = False,
    show_progress: bool = True,
) -> tuple[NeighbourLists, bool]:
    """:func:`sonicrec.neighbours.neighbours_run` as a Spark job: the same blocks, files and hash.

    Each task loads the run's Recommender once (the index files cached in RUN/index/MODEL/ by the
    driver's load) and answers its blocks of song and user rows; the driver writes the blocks at
    their rows into RUN/neighbours/MODEL/ (it holds the lists and, briefly, the tasks' answers).
    ``master``: None = ``cf.spark_master`` of the run's config. ``partitions``: Spark tasks.
    On a cluster the run directory is a shared path.

    Returns
    -------
    (NeighbourLists, computed): as :func:`sonicrec.neighbours.neighbours_run`
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    engine = partial(_spark_lists, run=str(run.root.resolve()), model=model,
                     master=master or run.read_config().cf.spark_master, partitions=partitions)
    return neighbours_run(run.root, model, songs=songs, users=users, force=force,
                          show_progress=show_progress, engine=engine)
