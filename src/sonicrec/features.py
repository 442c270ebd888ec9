"""The feature store (log-mel spectrograms on disk) and the ingest job that fills it.

Layout of a store directory (RUN/features/)::

    store.json             format version, shapes, dtype, the AudioConfig that made the features
    shard-000000.npy       float16 (rows, n_mels, n_frames), at most ``shard_size`` rows
    shard-000000.json      {"track_ids": [...]}: row i of the shard is track_ids[i]

A shard is committed by writing its ``.npy`` and then its ``.json`` (each atomically): a shard
without its ``.json`` was never committed and is neither read nor kept. Readers build an id ->
(shard, row) dict from the ``.json`` files and memory-map shards lazily, so a store of a million
tracks (~150 GB) is read without loading it and each track costs O(1) to find.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from sonicrec.catalog import Catalog, Track
from sonicrec.config import AudioConfig
from sonicrec.errors import (
    AudioError,
    ChooseOutput,
    ConfigError,
    DataError,
    OutputDirError,
    RunStage,
    UnknownIdError,
)
from sonicrec.io import atomic_path, atomic_write_text
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPE = np.float16
DEFAULT_SHARD_SIZE = 256  # 256 x 128 x 599 float16 = 39 MB per shard
WORKERS_PER_CORE = 2  # decoding waits on I/O a little; more processes than this only cost memory
_SHARD_NAME = re.compile(r"^shard-(\d{6})\.json$")
_SHARD_DATA = re.compile(r"^shard-(\d{6})\.npy$")


def _shard_stem(index: int) -> str:
    return f"shard-{index:06d}"


def _committed_shards(root: Path) -> list[tuple[int, list[str]]]:
    """(shard index, track ids) of every committed shard, in shard order."""
    shards = []
    for entry in os.scandir(root):
        match = _SHARD_NAME.match(entry.name)
        if match:
            ids = json.loads(Path(entry.path).read_text(encoding="utf-8"))["track_ids"]
            shards.append((int(match.group(1)), ids))
    return sorted(shards)


class LogMelStore(Protocol):
    """What training and prediction read from a feature store (:class:`FeatureStore` is one)."""

    n_mels: int
    n_frames: int

    @property
    def track_ids(self) -> list[str]: ...

    def get(self, track_id: str) -> np.ndarray: ...

    def get_many(self, track_ids: Sequence[str]) -> np.ndarray: ...


class MemoryStore:
    """A :class:`LogMelStore` of log-mels held in memory, float16 like a :class:`FeatureStore`."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        if not arrays:
            raise DataError("a store needs at least one log-mel spectrogram")
        self._arrays = {k: np.asarray(v, np.float16) for k, v in arrays.items()}
        self.n_mels, self.n_frames = next(iter(self._arrays.values())).shape

    @property
    def track_ids(self) -> list[str]:
        return list(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def get(self, track_id: str) -> np.ndarray:
        return self._arrays[track_id]

    def get_many(self, track_ids: Sequence[str]) -> np.ndarray:
        return np.stack([self._arrays[t] for t in track_ids])


class FeatureStore:
    """Read-only access to a feature store: ``store.get(track_id) -> (n_mels, n_frames) float16``.

    Shards are memory-mapped on first use, separately in each process, so a store can be handed
    to DataLoader worker processes (forked or spawned).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / "store.json"
        if not meta_path.is_file():
            raise DataError(f"{self.root}: not a feature store (no store.json)", remedy=RunStage("ingest"))
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.n_mels: int = meta["n_mels"]
        self.n_frames: int = meta["n_frames"]
        self.audio_config = AudioConfig(**meta["audio"])
        self._index: dict[str, tuple[int, int]] = {}
        for shard, ids in _committed_shards(self.root):
            for row, track_id in enumerate(ids):
                self._index[track_id] = (shard, row)
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    @property
    def track_ids(self) -> list[str]:
        """Ids of the stored tracks, in storage order."""
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, track_id: object) -> bool:
        return track_id in self._index

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are reopened in the receiving process
        return state

    def _shard(self, index: int) -> np.ndarray:
        if self._pid != os.getpid():  # forked: do not share the parent's maps
            self._maps, self._pid = {}, os.getpid()
        shard = self._maps.get(index)
        if shard is None:
            shard = np.load(self.root / f"{_shard_stem(index)}.npy", mmap_mode="r", allow_pickle=False)
            self._maps[index] = shard
        return shard

    def get(self, track_id: str) -> np.ndarray:
        """The log-mel spectrogram of one track, float16 (n_mels, n_frames), memory-mapped read-only."""
        try:
            shard, row = self._index[track_id]
        except KeyError:
            raise UnknownIdError(f"track {track_id!r} is not in the feature store {self.root}") from None
        return self._shard(shard)[row]

    def get_many(self, track_ids: Sequence[str]) -> np.ndarray:
        """Log-mel spectrograms of several tracks, float16 (B, n_mels, n_frames), in the given order."""
        out = np.empty((len(track_ids), self.n_mels, self.n_frames), dtype=DTYPE)
        for i, track_id in enumerate(track_ids):
            out[i] = self.get(track_id)
        return out


class FeatureStoreWriter:
    """Appends features to a store, one atomically committed shard at a time.

    Opening an existing store checks that it was made with the same audio configuration, removes
    what an interrupted writer left behind (temporary files, uncommitted shards) and continues
    with new shards. Use as a context manager: leaving the block commits the pending rows.
    """

    def __init__(self, root: str | Path, cfg: AudioConfig, *, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        if shard_size <= 0:
            raise ValueError("shard_size must be positive")
        self.root = Path(root)
        self.cfg = cfg
        self.shard_size = shard_size
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_or_create_meta()
        shards = _committed_shards(self.root)
        self._stored = {track_id for _, ids in shards for track_id in ids}
        self._next_shard = shards[-1][0] + 1 if shards else 0
        self._remove_uncommitted({index for index, _ in shards})
        self._buffer = np.empty((shard_size, cfg.n_mels, cfg.n_frames), dtype=DTYPE)
        self._pending: list[str] = []

    def _check_or_create_meta(self) -> None:
        meta_path = self.root / "store.json"
        audio = asdict(self.cfg)
        if meta_path.is_file():
            stored = json.loads(meta_path.read_text(encoding="utf-8"))
            if stored.get("audio") != audio:
                raise ConfigError(
                    f"{self.root} holds features made with audio settings {stored.get('audio')}, not "
                    f"{audio}: use the same [audio] config or delete {self.root} to start over"
                )
            return
        if any(self.root.iterdir()):
            raise DataError(f"{self.root} is not empty and is not a feature store", remedy=ChooseOutput())
        meta = {
            "format": FORMAT_VERSION, "dtype": np.dtype(DTYPE).name, "n_mels": self.cfg.n_mels,
            "n_frames": self.cfg.n_frames, "shard_size": self.shard_size, "audio": audio,
        }
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")

    def _remove_uncommitted(self, committed: set[int]) -> None:
        for entry in os.scandir(self.root):
            name = entry.name
            data = _SHARD_DATA.match(name)
            if (data and int(data.group(1)) not in committed) or (name.startswith(".") and ".tmp" in name):
                log.info("removing %s left by an interrupted ingest", entry.path)
                os.unlink(entry.path)

    def __contains__(self, track_id: object) -> bool:
        return track_id in self._stored or track_id in self._pending

    def add(self, track_id: str, features: np.ndarray) -> list[str]:
        """Queue one track's (n_mels, n_frames) features; returns the ids committed by this call."""
        if track_id in self:
            raise DataError(f"track {track_id!r} is already in the feature store {self.root}")
        expected = (self.cfg.n_mels, self.cfg.n_frames)
        if features.shape != expected:
            raise ValueError(f"track {track_id}: features of shape {features.shape}, expected {expected}")
        if not np.isfinite(features).all():
            raise DataError(f"track {track_id!r}: its features are not finite (NaN/inf); not stored")
        self._buffer[len(self._pending)] = features
        self._pending.append(track_id)
        return self.commit() if len(self._pending) == self.shard_size else []

    def commit(self) -> list[str]:
        """Write the pending rows as a new shard (data first, then its id list); returns their ids."""
        if not self._pending:
            return []
        stem = _shard_stem(self._next_shard)
        with atomic_path(self.root / f"{stem}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, self._buffer[: len(self._pending)], allow_pickle=False)
        atomic_write_text(self.root / f"{stem}.json", json.dumps({"track_ids": self._pending}) + "\n")
        committed, self._pending = self._pending, []
        self._stored.update(committed)
        self._next_shard += 1
        return committed

    def adopt(self, source: str | Path) -> list[str]:
        """Move the committed shards of another store into this one; returns the ids moved.

        ``source`` must hold features made with the same audio settings and on the same file
        system (shards are renamed, not copied). Each shard becomes a new shard here, committed as
        :meth:`commit` does (data first, then its id list), so an interrupted adoption leaves both
        stores readable. Distributed ingest (:mod:`sonicrec.spark`) writes one store per partition
        and adopts them on the driver.
        """
        source = Path(source)
        other = FeatureStore(source)
        if other.audio_config != self.cfg:
            raise ConfigError(f"{source} holds features made with other audio settings than {self.root}")
        self.commit()
        moved: list[str] = []
        for index, ids in _committed_shards(source):
            duplicate = next((t for t in ids if t in self), None)
            if duplicate is not None:
                raise DataError(f"track {duplicate!r} of {source} is already in the store {self.root}")
            stem, src = _shard_stem(self._next_shard), _shard_stem(index)
            os.replace(source / f"{src}.npy", self.root / f"{stem}.npy")
            atomic_write_text(self.root / f"{stem}.json", json.dumps({"track_ids": ids}) + "\n")
            (source / f"{src}.json").unlink()
            self._stored.update(ids)
            self._next_shard += 1
            moved += ids
        return moved

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.commit()


# --- ingest -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestResult:
    """What one ingest run did: tracks newly stored, newly failed, and left as they were."""

    ok: int
    failed: int
    skipped: int


@dataclass(frozen=True)
class Extracted:
    """One track's extraction: its features, or the reason it failed."""

    track_id: str
    features: np.ndarray | None  # float16 (n_mels, n_frames); None on failure or once stored
    duration: float | None
    offset: float | None
    padded: bool
    error: str | None
    decoder: str | None = None  # the decoder that delivered the excerpt (sonicrec.decode)
    notes: tuple[str, ...] = ()  # what the decoder libraries printed about the file


def extract_track(track_id: str, path: str | None, cfg: AudioConfig) -> Extracted:
    """Features of one track (the front end of :func:`sonicrec.audio.file_to_logmel`, rounded to
    the store's float16); every failure is returned as a reason, never raised."""
    from sonicrec.audio import excerpt_logmel, load_excerpt

    try:
        if not path:
            raise AudioError(f"track {track_id} has no audio path in the catalog")
        excerpt = load_excerpt(path, cfg)
        features = excerpt_logmel(excerpt, cfg, path).astype(DTYPE)
        return Extracted(
            track_id, features, excerpt.duration, excerpt.offset, excerpt.padded, None,
            excerpt.decoder, excerpt.notes,
        )
    except AudioError as exc:
        return Extracted(track_id, None, None, None, False, str(exc))
    except Exception as exc:  # a decoder bug or exhausted memory must not stop a catalog
        reason = f"{path}: unexpected {type(exc).__name__}: {exc}"
        return Extracted(track_id, None, None, None, False, reason)


_worker_cfg: AudioConfig | None = None


def _init_worker(cfg: AudioConfig) -> None:
    import torch

    global _worker_cfg
    _worker_cfg = cfg
    torch.set_num_threads(1)  # one core per worker process


def _extract_in_worker(task: tuple[str, str | None]) -> Extracted:
    assert _worker_cfg is not None
    return extract_track(*task, _worker_cfg)


def worker_count(requested: int, n_tasks: int) -> int:
    """Worker processes worth starting: at most one per task and :data:`WORKERS_PER_CORE` per core."""
    return max(1, min(requested, n_tasks, WORKERS_PER_CORE * (os.cpu_count() or 1)))


def _extract_all(tasks: list[tuple[str, str | None]], cfg: AudioConfig, workers: int) -> Iterator[Extracted]:
    """Results in task order, computed here (one worker) or by a pool of worker processes."""
    wanted, workers = workers, worker_count(workers, len(tasks))
    if workers < wanted:
        log.info("ingest: %d worker processes (asked for %d)", workers, wanted)
    if workers <= 1:
        for track_id, path in tasks:
            yield extract_track(track_id, path, cfg)
        return
    ctx = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        yield from pool.imap(_extract_in_worker, tasks, chunksize=4)


def tracks_to_extract(
    catalog: Catalog, store: FeatureStoreWriter, *, retry_failed: bool = False
) -> list[Track]:
    """Catalog tracks not yet in the store (``failed`` ones only if ``retry_failed``).

    Tracks found in the store but not marked ``ok`` (committed just before an interruption) are
    marked ``ok`` in the catalog on the way.
    """
    todo, done_rows = [], []
    for track in catalog.tracks():
        if track.track_id in store:
            if track.status != "ok":
                track.status, track.error = "ok", None
                done_rows.append(track)
        elif track.status != "failed" or retry_failed:
            todo.append(track)
    catalog.upsert(done_rows)
    return todo


def mark_extracted(track: Track, result: Extracted) -> Track:
    """The catalog row of a track after extraction: ``ok`` with its duration, excerpt, decoder and
    the decoder's notes (meta ``decoder``, ``decoder_notes``), or ``failed`` with the reason
    (``result.features`` is not looked at)."""
    if result.error is not None:
        track.status, track.error = "failed", result.error
        return track
    track.status, track.error, track.duration = "ok", None, result.duration
    meta = {k: v for k, v in track.meta.items() if k != "decoder_notes"}
    meta.update(excerpt_offset=result.offset, excerpt_padded=result.padded, decoder=result.decoder)
    if result.notes:
        meta["decoder_notes"] = list(result.notes)
    track.meta = meta
    return track


class Extractor(Protocol):
    """An engine that computes the features of catalog tracks for :func:`ingest`.

    ``extract`` yields one :class:`Extracted` per track, in any order. A result with features is
    added to ``store`` by :func:`ingest`; a successful result without features was committed into
    ``store`` by the extractor itself (:meth:`FeatureStoreWriter.adopt`). ``stops_early``: results
    arrive while the work goes on, so a strict ingest stops at the first failure (otherwise it
    records every result and then raises).
    """

    name: str
    stops_early: bool

    def extract(
        self, tracks: Sequence[Track], cfg: AudioConfig, store: FeatureStoreWriter
    ) -> Iterator[Extracted]: ...


@dataclass(frozen=True)
class LocalExtractor:
    """Extraction in this process (``workers`` <= 1) or in spawned worker processes."""

    workers: int = 1
    name: str = "local"
    stops_early: bool = True

    def extract(
        self, tracks: Sequence[Track], cfg: AudioConfig, store: FeatureStoreWriter
    ) -> Iterator[Extracted]:
        return _extract_all([(t.track_id, t.path) for t in tracks], cfg, self.workers)


def ingest(
    run: RunDir | str | Path,
    extractor: Extractor,
    cfg: AudioConfig | None = None,
    *,
    strict: bool = False,
    retry_failed: bool = False,
    show_progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> IngestResult:
    """Extract, with ``extractor``, the features of the catalog tracks not yet in the run's store.

    Tracks marked ``failed`` are left alone unless ``retry_failed``. A track becomes ``ok`` in the
    catalog once its shard is committed; a failure is recorded with its reason. Re-running after an
    interruption continues where the last committed shard ended.

    Parameters
    ----------
    run : the run directory (RUN/catalog.sqlite is read, RUN/features/ written).
    extractor : :class:`LocalExtractor`, or :class:`sonicrec.spark.SparkExtractor`.
    cfg : audio settings; None = ``Config.load(RUN/config.toml).audio`` or the defaults.
    strict : raise the first failure as :class:`AudioError` instead of recording it and going on.
    """
    from tqdm.auto import tqdm

    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = cfg or run.read_config().audio
    ok, failures = 0, []
    writer = FeatureStoreWriter(run.features, cfg, shard_size=shard_size)
    with Catalog(run.catalog) as catalog, writer as store:
        todo = tracks_to_extract(catalog, store, retry_failed=retry_failed)
        skipped = len(catalog) - len(todo)
        log.info("ingest (%s): %d tracks to extract, %d already done or failed", extractor.name,
                 len(todo), skipped)
        rows = _CatalogRows(catalog, store, todo)
        try:
            with tqdm(total=len(todo), unit="track", desc="ingest", disable=not show_progress) as bar:
                for result in extractor.extract(todo, cfg, store):
                    bar.update()
                    rows.add(result)
                    if result.error is None:
                        ok += 1
                        continue
                    failures.append(result.error)
                    log.warning("%s", result.error)
                    if strict and extractor.stops_early:
                        raise AudioError(f"{result.error} (strict: stopping at the first failure)")
        finally:
            rows.commit()  # an interrupted run keeps every track extracted so far
    if strict and failures:
        raise AudioError(f"{failures[0]} (strict: {len(failures)} track(s) failed)")
    return IngestResult(ok=ok, failed=len(failures), skipped=skipped)


class _CatalogRows:
    """Extraction results into the store and the catalog: a track's row is written once its
    features are committed (the failures with them), a shard's worth or more per transaction."""

    def __init__(self, catalog: Catalog, store: FeatureStoreWriter, todo: Sequence[Track]) -> None:
        self.catalog, self.store = catalog, store
        self.todo = {t.track_id: t for t in todo}
        self.finished: dict[str, Track] = {}  # extracted, their rows waiting for their shard
        self.failures: list[Track] = []
        self.committed: list[str] = []  # in the store, their rows not yet written

    def add(self, result: Extracted) -> None:
        """Record one result; its features, if it has them, go to the store."""
        track = mark_extracted(self.todo.pop(result.track_id), result)
        if result.error is not None:
            self.failures.append(track)
            return
        self.finished[track.track_id] = track
        if result.features is None:  # committed by the extractor
            self.committed.append(track.track_id)
        else:
            self.committed += self.store.add(track.track_id, result.features)
        if len(self.committed) >= self.store.shard_size:
            self._write()

    def commit(self) -> None:
        """Commit the pending features and write every row recorded so far."""
        self.committed += self.store.commit()
        self._write()

    def _write(self) -> None:
        self.catalog.upsert([self.finished.pop(t) for t in self.committed] + self.failures)
        self.committed, self.failures = [], []


def ingest_run(
    run: RunDir | str | Path,
    cfg: AudioConfig | None = None,
    *,
    workers: int = 1,
    strict: bool = False,
    retry_failed: bool = False,
    show_progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> IngestResult:
    """:func:`ingest` with worker processes on this machine (:class:`LocalExtractor`).

    ``workers``: extraction processes (<= 1: in this process); capped by :func:`worker_count`.
    """
    return ingest(
        run, LocalExtractor(workers), cfg, strict=strict, retry_failed=retry_failed,
        show_progress=show_progress, shard_size=shard_size,
    )


@dataclass(frozen=True)
class IngestReport:
    """The state of a run's catalog: tracks per status and, for each failed track, its
    ``track_id``, ``path`` and ``error``."""

    counts: dict[str, int]
    failed: list[dict[str, str | None]]


def ingest_report(run: RunDir | str | Path) -> IngestReport:
    """What the ingests of a run have done so far (read from RUN/catalog.sqlite)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    if not run.catalog.is_file():
        raise OutputDirError(f"{run.root}: no catalog.sqlite", remedy=RunStage("ingest", run.root))
    with Catalog(run.catalog) as catalog:
        failed = [
            {"track_id": t.track_id, "path": t.path, "error": t.error} for t in catalog.tracks("failed")
        ]
        return IngestReport(catalog.counts(), failed)


# --- registering audio files --------------------------------------------------------------------


def discover_tracks(paths: Iterable[str | Path]) -> list[Track]:
    """Tracks (status "new") for audio files, folders (searched recursively) and CSV/TSV manifests.

    A manifest has a header with at least ``track_id,path`` (optional ``title``, ``artist``);
    relative paths are relative to the manifest. A file's id is its name, or, inside a given folder,
    its path relative to that folder (e.g. ``jazz/take1.mp3``). Inside folders, every entry with an
    audio extension that is not a folder is a track: a dangling link, a pipe or a device is then
    recorded as failed by the ingest (never opened), not skipped silently.
    """
    from sonicrec.audio import AUDIO_EXTENSIONS

    tracks: list[Track] = []
    for item in map(Path, paths):
        if item.is_dir():
            files = sorted(
                p for p in item.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and not p.is_dir()
            )
            if not files:
                log.warning("no audio files (%s) under %s", " ".join(AUDIO_EXTENSIONS), item)
            for f in files:
                track_id = f.relative_to(item).as_posix()
                tracks.append(Track(track_id, path=str(_absolute(f)), title=f.stem))
        elif item.suffix.lower() in (".csv", ".tsv"):
            tracks.extend(read_manifest(item))
        elif item.exists() or item.is_symlink():
            tracks.append(Track(item.name, path=str(_absolute(item)), title=item.stem))
        else:
            raise DataError(f"{item}: no such file or folder")
    seen: dict[str, str | None] = {}
    for t in tracks:
        if t.track_id in seen:
            raise DataError(
                f"track id {t.track_id!r} is used by both {seen[t.track_id]} and {t.path}: "
                "give unique ids in a manifest (track_id,path)"
            )
        seen[t.track_id] = t.path
    return tracks


def _absolute(path: Path) -> Path:
    """The file a path leads to, absolute; a dangling link stays a link (its target is not there)."""
    return path.resolve() if path.exists() else path.absolute()


def read_manifest(path: str | Path) -> list[Track]:
    """Tracks from a CSV (comma) or TSV (tab) manifest with columns ``track_id,path[,title,artist]``."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            rows = [(reader.line_num, row) for row in reader]  # line_num: the row's last line
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read manifest ({exc})") from exc
    if not {"track_id", "path"} <= set(columns):
        raise DataError(
            f"{path}: a manifest needs a header line with columns track_id,path[,title,artist]; "
            f"its first line has {columns}"
        )
    if not rows:
        raise DataError(f"{path}: the manifest lists no tracks (a header line only)")
    tracks = []
    for line, row in rows:
        track_id, file = (row.get("track_id") or "").strip(), (row.get("path") or "").strip()
        if not track_id or not file:
            raise DataError(f"{path}, line {line}: track_id and path must both be given")
        file_path = Path(file) if Path(file).is_absolute() else path.parent / file
        tracks.append(
            Track(track_id, path=str(file_path.resolve()), title=row.get("title") or None,
                  artist=row.get("artist") or None)
        )
    return tracks


def register_tracks(catalog: Catalog, tracks: Iterable[Track]) -> int:
    """Add new tracks to the catalog (status "new"); returns how many were new.

    A track already registered with the same path is kept as it is (with its status); the same id
    with another path is an error.
    """
    new = []
    for t in tracks:
        if t.track_id in catalog:
            known = catalog.get(t.track_id)
            if known.path != t.path:
                raise DataError(
                    f"track id {t.track_id!r} is already in {catalog.path} with path {known.path}, "
                    f"not {t.path}: give it another id or use a new run directory"
                )
            continue
        new.append(t)
    catalog.upsert(new)
    return len(new)

