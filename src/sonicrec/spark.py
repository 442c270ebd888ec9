"""Spark batch jobs: feature extraction and CNN prediction over a DataFrame of tracks.

Both jobs run the local code inside ``mapInPandas`` (one Python worker per task), so a cluster
computes exactly what one machine does:

* :func:`extract_features` runs :func:`sonicrec.features.extract_track` (the front end of
  :func:`sonicrec.audio.file_to_logmel`) on a DataFrame of ``(track_id, path)``. Each task writes
  its own feature store (``FeatureStoreWriter``, atomically committed shards) in a staging folder
  inside the run's store; :func:`ingest_run_spark` then moves the shards of the successful tasks
  into the store on the driver (``FeatureStoreWriter.adopt``: the index commit) and records every
  track in the catalog, as ``sonicrec ingest`` does.
* :func:`predict_frame` runs :class:`sonicrec.predict.Predictor` on stored features or audio files;
  :func:`predict_run_spark` writes RUN/predictions/NAME.parquet (``track_id``, ``factor_0`` ...)
  and the local pipeline's RUN/predictions/NAME.npz.

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
import uuid
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from sonicrec.catalog import Catalog
from sonicrec.config import AudioConfig
from sonicrec.errors import AudioError, DataError, require
from sonicrec.features import DEFAULT_SHARD_SIZE, Extracted, IngestResult
from sonicrec.rundir import RunDir, check_model_name

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
def _quiet_pandas_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _PANDAS_WARNINGS:
            warnings.filterwarnings("ignore", message, Warning)
        yield


def session(master: str, *, show_progress: bool = True):
    """(SparkSession, created): the active session, or a new one on ``master`` (``local[2]``,
    ``spark://host:7077``, ``yarn``, ``k8s://...``). Stop it when ``created`` and done."""
    require("pyspark", "spark")
    from sonicrec.cf import spark_session

    if master.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        os.environ["PYSPARK_PYTHON"] = sys.executable  # local workers must import this sonicrec
    return spark_session(master, show_progress)


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


@_quiet_pandas_warnings()
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
    """:func:`sonicrec.features.ingest_run` as a Spark job: the catalog's pending tracks in, shards out.

    Parameters
    ----------
    run : the run directory (catalog read, RUN/features written; on a cluster, a shared path).
    cfg : audio settings; None = ``Config.load(RUN/config.toml).audio`` or the defaults.
    master : Spark master; None = ``cf.spark_master`` of the run's config.
    partitions : Spark tasks; None = max(default parallelism, tracks / (4 shard_size)).
    strict : after the job, raise the first failure as :class:`AudioError` (the tracks extracted
        are kept either way).
    """
    from sonicrec.features import FeatureStoreWriter, mark_extracted, tracks_to_extract

    run = run if isinstance(run, RunDir) else RunDir(run)
    config = run.read_config()
    cfg = cfg or config.audio
    writer = FeatureStoreWriter(run.features, cfg, shard_size=shard_size)
    for stale in run.features.glob(f"{_STAGING_PREFIX}*"):  # left by an interrupted job
        log.info("removing %s left by an interrupted Spark ingest", stale)
        shutil.rmtree(stale)
    with Catalog(run.catalog) as catalog, writer as store:
        todo = tracks_to_extract(catalog, store, retry_failed=retry_failed)
        skipped = len(catalog) - len(todo)
        log.info("spark ingest: %d tracks to extract, %d already done or failed", len(todo), skipped)
        if not todo:
            return IngestResult(ok=0, failed=0, skipped=skipped)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=run.features))
        spark, created = session(master or config.cf.spark_master, show_progress=show_progress)
        try:
            n = partitions or max(spark.sparkContext.defaultParallelism, -(-len(todo) // (4 * shard_size)))
            frame = pd.DataFrame({"track_id": [t.track_id for t in todo], "path": [t.path for t in todo]})
            tracks = spark.createDataFrame(frame).repartition(n)
            results = extract_features(tracks, staging, cfg, shard_size=shard_size).toPandas()
            for part in sorted(set(results["staging"])):  # the index commit
                store.adopt(part)
        finally:
            if created:
                spark.stop()
            shutil.rmtree(staging, ignore_errors=True)
        by_id = {t.track_id: t for t in todo}
        catalog.upsert(mark_extracted(by_id[r.track_id], _as_extracted(r)) for r in results.itertuples())
    failures = results["error"].dropna()
    for reason in failures:
        log.warning("%s", reason)
    if strict and len(failures):
        raise AudioError(f"{failures.iloc[0]} (--strict: {len(failures)} track(s) failed)")
    return IngestResult(ok=len(results) - len(failures), failed=len(failures), skipped=skipped)


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
    """mapInPandas body: factors of each track from the store (``store``) or its audio file."""
    from sonicrec.audio import file_to_logmel
    from sonicrec.features import FeatureStore
    from sonicrec.predict import Predictor, finite_rows

    predictor = Predictor.load(checkpoint)
    features = FeatureStore(store) if store is not None else None
    for batch in batches:
        for start in range(0, len(batch), batch_size):
            chunk = batch.iloc[start : start + batch_size]
            ids = chunk["track_id"].tolist()
            errors: list[str | None] = [None] * len(ids)
            if features is not None:
                x = features.get_many(ids)  # (B, n_mels, n_frames) float16
                finite = finite_rows(x)
                for i in np.flatnonzero(~finite):
                    errors[i] = f"track {ids[i]}: its stored features are not finite"
                x = x[finite] if finite.any() else None
            else:
                logmels = []
                for i, path in enumerate(chunk["path"]):
                    try:
                        logmels.append(file_to_logmel(path, predictor.config.audio))
                    except AudioError as exc:
                        errors[i] = str(exc)
                x = np.stack(logmels) if logmels else None
            predicted = iter(predictor.predict_logmel(x, batch_size=batch_size) if x is not None else [])
            factors = [None if error else next(predicted) for error in errors]
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


@_quiet_pandas_warnings()
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
    the model file (default RUN/model/NAME/checkpoint.pt).

    Returns
    -------
    (parquet folder, npz file)
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from sonicrec.factors import Predictions
    from sonicrec.features import FeatureStore
    from sonicrec.predict import Predictor

    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    check_model_name(name)
    checkpoint = Path(checkpoint or run.checkpoint(name))
    n_factors = Predictor.load(checkpoint, device="cpu").n_factors  # fails early on a bad checkpoint
    config = run.read_config()
    if from_audio:
        with Catalog(run.catalog) as catalog:
            ok = [(t.track_id, t.path) for t in catalog.tracks("ok")]
        frame = pd.DataFrame(ok, columns=["track_id", "path"])
        store = None
    else:
        frame = pd.DataFrame({"track_id": FeatureStore(run.features).track_ids})
        store = run.features
    if frame.empty:
        raise DataError(f"no tracks to predict in {run.root}: run sonicrec ingest first")
    parquet = run.predictions / f"{name}.parquet"
    staged = run.predictions / f".{name}.parquet.{uuid.uuid4().hex}"
    spark, created = session(master or config.cf.spark_master, show_progress=show_progress)
    try:
        tracks = spark.createDataFrame(frame).repartition(partitions or spark.sparkContext.defaultParallelism)
        out = predict_frame(tracks, checkpoint, store=store, batch_size=batch_size)
        out = out.persist(StorageLevel.MEMORY_AND_DISK)
        columns = [F.col("factors")[j].alias(f"factor_{j}") for j in range(n_factors)]
        out.where(F.col("error").isNull()).select("track_id", *columns).write.parquet(str(staged.resolve()))
        failures = out.where(F.col("error").isNotNull()).select("track_id", "error").toPandas()
        out.unpersist()
    finally:
        if created:
            spark.stop()
    for row in failures.itertuples(index=False):
        log.warning("track %s: %s", row.track_id, row.error)
    _replace_folder(staged, parquet)
    table = pd.read_parquet(parquet).set_index("track_id")
    table = table.reindex([t for t in frame["track_id"] if t in table.index])  # the store's order
    path = run.prediction(name)
    Predictions(table.index.to_numpy(dtype=str), table.to_numpy(np.float32)).save(path)
    log.info("predicted %d tracks with %s (%d failed) -> %s, %s", len(table), name, len(failures), parquet,
             path)
    return parquet, path


def _replace_folder(new: Path, old: Path) -> None:
    """Put folder ``new`` in place of ``old`` (two renames; ``old`` is deleted afterwards)."""
    if old.exists():
        trash = old.with_name(f".{old.name}.old-{uuid.uuid4().hex}")
        os.replace(old, trash)
        os.replace(new, old)
        shutil.rmtree(trash)
    else:
        os.replace(new, old)
