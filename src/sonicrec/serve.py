"""The web service: JSON endpoints over a run's Recommender, catalog audio, live uploads, one web page.

``create_app(run_dir)`` returns a FastAPI app; ``serve(run_dir)`` runs it with uvicorn on
127.0.0.1. Endpoints (schema and a try-it page at ``/docs``, served without a CDN):

    GET  /api/info                      the run: model, song and user counts, upload limits, links
    GET  /api/search?q=                 catalog search over id, title, artist and collection
    GET  /api/track?id=                 one track's metadata, split and excerpt position
    GET  /api/audio?id=                 the track's audio file (HTTP range requests)
    GET  /api/similar?id=&n=            a similar-songs playlist (cosine in the latent space)
    GET  /api/audience?id=&n=           the users most likely to enjoy a song
    GET  /api/users?q=                  user ids
    GET  /api/recommend?user=&n=        songs for a user, never-played (cold) songs marked
    GET  /api/map                       a 2-D map of the songs' audio-predicted factors
    POST /api/upload                    an audio file -> its predicted factors, similar songs, audience
    GET  /                              the web page (sonicrec/web/); /analysis/ the analysis report

Safety: track and user ids are looked up, never used as paths, and only the catalog's own audio
files are served. An upload is limited in size (request body counted as it arrives), must start
like an audio file (WAV, AIFF, FLAC, Ogg, MP3 or M4A), is written under a server-managed directory
with a generated name, decoded in a separate worker process with a timeout, and deleted once
placed. Problems with a request answer 4xx with a ``detail`` message.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import numpy as np

from sonicrec import __version__
from sonicrec.audio import AUDIO_EXTENSIONS, excerpt_start, file_to_logmel
from sonicrec.catalog import Catalog
from sonicrec.config import Config
from sonicrec.errors import AudioError, DataError, MissingExtraError, SonicrecError, UnknownIdError
from sonicrec.factors import unit_rows
from sonicrec.recommend import Ranking, Recommender
from sonicrec.rundir import RunDir
from sonicrec.webguard import DEFAULT_BODY_TIMEOUT_S, WebGuard, hosts_for

try:
    import orjson
    from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("the web service needs FastAPI: pip install 'sonicrec[serve]'") from exc

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 50.0
DEFAULT_DECODE_TIMEOUT_S = 60.0
MAP_MAX_POINTS = 5000  # songs drawn on the map (a seeded sample of larger catalogs)
MAX_OFFSET = 10**9  # largest search offset (SQLite integers end at 2**63)
DEFAULT_UPLOAD_QUEUE = 4  # uploads placed or waiting at once per server process; more answer 503
_SONG_FIELDS = {"title": None, "artist": None, "collection": None, "style": None}  # SongHit's optional
REPORT_FILE = "report.json"  # RUN/analysis/report.json of sonicrec.analysis, with the t-SNE map
UPLOAD_PATH = "/api/upload"
_MULTIPART_SLACK = 64 * 1024  # bytes of multipart envelope allowed on top of the file itself
_MAP_NEIGHBOURS = 5  # an upload lands at the similarity-weighted mean of its nearest mapped songs
_MEDIA_TYPES = {
    ".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".oga": "audio/ogg", ".opus": "audio/ogg",
    ".flac": "audio/flac", ".wav": "audio/wav", ".aif": "audio/aiff", ".aiff": "audio/aiff",
    ".m4a": "audio/mp4",
}
_FORMATS = "WAV, AIFF, FLAC, Ogg (Vorbis/Opus), MP3 or M4A"


# --- uploads ------------------------------------------------------------------------------------


def sniff_audio_format(head: bytes) -> str | None:
    """The file suffix of an audio format recognised from a file's first bytes (>= 64), or None.

    >>> sniff_audio_format(b"RIFF\\x24\\x00\\x00\\x00WAVEfmt ")
    '.wav'
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return ".wav"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return ".aiff"
    if head[:4] == b"fLaC":
        return ".flac"
    if head[:4] == b"OggS":
        return ".opus" if b"OpusHead" in head[:64] else ".ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return ".mp3"
    if head[4:8] == b"ftyp":
        return ".m4a"
    return None


def _start_worker(source, nice: int) -> None:
    """Initialise an upload process: lower CPU priority, one torch thread, the model loaded once
    (a failure is kept and raised by the first job, so the pool does not restart it endlessly)."""
    global _WORKER_MODEL
    try:
        import torch

        os.nice(nice)  # the server's other requests come first on a busy machine
        torch.set_num_threads(1)
        if isinstance(source, (str, Path)):
            from sonicrec.predict import Predictor

            source = Predictor.load(source)
        _WORKER_MODEL = source
    except Exception as exc:  # noqa: BLE001 - reported by _worker_ready
        _WORKER_MODEL = exc


def _worker_ready() -> int:
    """The upload process's id once its model is loaded (or the error that stopped it)."""
    if isinstance(_WORKER_MODEL, Exception):
        raise _WORKER_MODEL
    return os.getpid()


def _factors_in_worker(path: str) -> tuple[np.ndarray, dict[str, Any] | None]:
    """In the upload process: decode, log-mel, the CNN -> (k,) float32 factors of an uploaded file
    and its familiarity (``FamiliarityScores.as_dict``, None without a familiarity model)."""
    model = _WORKER_MODEL
    x = file_to_logmel(path, model.config.audio)  # (n_mels, n_frames)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise AudioError(f"{path}: decoding gave no usable spectrogram")
    factors, familiarity = model.assess_logmel(x[None])
    factors = np.asarray(factors, dtype=np.float32)[0]
    if not np.isfinite(factors).all():
        raise AudioError(f"{path}: the model gave factors that are not finite")
    return factors, None if familiarity is None else familiarity.as_dict(0)


_WORKER_MODEL = None  # the model of an upload process (set by _start_worker)


def _upload_context():
    """Upload processes are forked from a clean server process that has imported torch and the
    front end once (multiprocessing's forkserver): a new or restarted one is ready in moments."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "sonicrec.audio", "sonicrec.predict"])
    return context


class UploadWorker:
    """Decodes an upload and runs the CNN on it in a separate process, one file at a time.

    The process runs at a lower CPU priority with one torch thread, so uploads never take the
    cores the server's other requests need. It is started ahead (:meth:`start`) and its start-up
    (imports, model) is not part of a file's ``timeout_s``: a file is timed from the moment the
    process begins on it. A file that hangs or crashes a decoder takes down the process, not the
    server; a new one is started ahead at once. Waiting for the process holds no thread.

    Parameters
    ----------
    model : a checkpoint path (loaded in the process) or a picklable model (tests)
    timeout_s : longest decode + prediction of one file
    startup_timeout_s : longest start-up of the process
    nice : CPU priority decrement of the process
    """

    def __init__(self, model: Path | LogMelModel, *, timeout_s: float, startup_timeout_s: float = 300.0,
                 nice: int = 10) -> None:
        self.model, self.timeout_s, self.startup_timeout_s = model, timeout_s, startup_timeout_s
        self.nice = nice
        self._pool = None
        self._ready: asyncio.Future | None = None
        self._closed = False
        self._lock = asyncio.Lock()
        self.pid: int | None = None

    def start(self) -> None:
        """Start the process, from the event loop and without blocking it (a thread opens the
        pool and waits for the model); :meth:`ready` waits for it."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._closed = False
        threading.Thread(target=self._open, args=(loop, self._ready), daemon=True).start()

    def _open(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future) -> None:
        try:
            pool = _upload_context().Pool(1, _start_worker, (self.model, self.nice))
            if self._closed:  # closed while it was starting
                pool.terminate()
                return
            self._pool = pool
            pid, error = pool.apply(_worker_ready), None
        except Exception as exc:  # noqa: BLE001 - handed to the waiting coroutine
            pid, error = None, exc
        loop.call_soon_threadsafe(_settle, ready, pid, error)

    async def ready(self) -> None:
        """Wait until the process is ready (its start-up is not timed by ``timeout_s``).

        Raises :class:`UploadsUnavailable` when it cannot be: no usable model, or a failed start-up.
        """
        if self._ready is None:
            self.start()
        try:
            self.pid = await asyncio.wait_for(asyncio.shield(self._ready), self.startup_timeout_s)
        except SonicrecError as exc:  # no usable model: every upload would fail alike
            raise UploadsUnavailable(str(exc)) from None
        except Exception as exc:
            await self._restart()
            raise UploadsUnavailable(f"the upload process did not start ({type(exc).__name__})") from None

    async def factors(self, path: Path, *, name: str) -> tuple[np.ndarray, dict[str, Any] | None]:
        """(k,) float32 factors of the file at ``path`` and its familiarity; errors call it
        ``name``, never by its path."""
        async with self._lock:
            await self.ready()
            job = self._submit(asyncio.get_running_loop(), _factors_in_worker, (str(path),))
            try:
                return await asyncio.wait_for(job, self.timeout_s)
            except TimeoutError:
                await self._restart()
                raise AudioError(f"{name}: decoding took longer than {self.timeout_s:g} s and was stopped; "
                                 "upload a shorter file or a common format") from None
            except AudioError as exc:
                raise AudioError(exc.message.replace(str(path), name), remedy=exc.remedy) from None
            except Exception as exc:  # the process died or the decoder failed unexpectedly
                await self._restart()
                raise AudioError(f"{name}: cannot decode this file ({type(exc).__name__})") from None

    def _submit(self, loop: asyncio.AbstractEventLoop, fn, args: tuple) -> asyncio.Future:
        """Run ``fn(*args)`` in the process; the result arrives as an asyncio future."""
        future = loop.create_future()
        self._pool.apply_async(
            fn, args,
            callback=lambda value: loop.call_soon_threadsafe(_settle, future, value, None),
            error_callback=lambda exc: loop.call_soon_threadsafe(_settle, future, None, exc),
        )
        return future

    async def _restart(self) -> None:
        """Replace the process (terminated in a thread, the new one started ahead)."""
        old, self._pool = self._pool, None
        self.start()
        if old is not None:
            await asyncio.to_thread(old.terminate)

    def close(self) -> None:
        """Stop the process."""
        self._closed = True
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def _settle(future: asyncio.Future, value, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


class UploadsUnavailable(SonicrecError):
    """Uploads cannot be placed by this server now (no model, or the upload process fails to start)."""


class UploadQueue:
    """Uploads admitted in one server process: at most ``capacity`` placed or waiting at once.

    The :class:`UploadGate` asks before a request's body is read; a full queue answers 503 with a
    ``Retry-After`` from the recent time per upload.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise DataError(f"the upload queue needs room for at least one upload, got {capacity}")
        self.capacity = capacity
        self.active = 0
        self._seconds: deque[float] = deque(maxlen=20)

    def admit(self) -> bool:
        if self.active >= self.capacity:
            return False
        self.active += 1
        return True

    def release(self, seconds: float) -> None:
        self.active -= 1
        self._seconds.append(seconds)

    @property
    def retry_after(self) -> int:
        """Seconds after which a refused upload may find room: the queue's length in typical uploads."""
        typical = float(np.median(self._seconds)) if self._seconds else 5.0
        return int(min(max(np.ceil(typical * self.capacity), 1), 120))


class UploadGate:
    """ASGI middleware in front of POST /api/upload: admission, then the size limit.

    A full :class:`UploadQueue` answers 503 with ``Retry-After`` before the body is read; a body
    larger than ``max_bytes`` answers 413 (by its Content-Length, or as it arrives).
    """

    def __init__(self, app, *, queue: UploadQueue, max_bytes: int, message: str) -> None:
        self.app, self.queue, self.max_bytes, self.message = app, queue, max_bytes, message

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != UPLOAD_PATH:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
        if not self.queue.admit():
            wait = self.queue.retry_after
            busy = JSONResponse({"detail": f"the server is placing {self.queue.capacity} other uploads; "
                                           f"try again in {wait} s"},
                                status_code=503, headers={"Retry-After": str(wait)})
            return await busy(scope, receive, send)
        received, t0 = 0, time.perf_counter()

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message)
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            self.queue.release(time.perf_counter() - t0)


class LogMelModel(Protocol):
    """What the server needs of :class:`sonicrec.predict.Predictor`."""

    config: Config

    def assess_logmel(self, x: np.ndarray) -> tuple[np.ndarray, Any]: ...


class UploadPredictor:
    """Factors of uploaded files, placed by an :class:`UploadWorker`; the Recommender's audio predictor.

    Only files inside ``upload_dir`` are accepted. The factors of a placed file are remembered
    until :meth:`forget`, so one upload answers several questions (similar songs, audience) with
    one decode; the Recommender asks :meth:`predict_files` about placed files only.
    """

    def __init__(self, upload_dir: Path, worker: UploadWorker) -> None:
        self.upload_dir = Path(upload_dir).resolve()
        self.worker = worker
        self._placed: dict[Path, np.ndarray] = {}

    async def place(self, path: Path, *, name: str) -> tuple[np.ndarray, dict[str, Any] | None]:
        """(k,) float32 factors of the upload at ``path`` and how familiar it is to the model
        (``FamiliarityScores.as_dict``, None without a familiarity model); ``name`` is what error
        messages call it."""
        path = self._inside(path)
        factors, familiarity = await self.worker.factors(path, name=name)
        self._placed[path] = factors
        return factors, familiarity

    def forget(self, path: Path) -> None:
        self._placed.pop(Path(path).resolve(), None)

    def predict_files(self, paths: list[Path]) -> np.ndarray:
        """(len(paths), k) float32 factors of files placed before."""
        rows = []
        for p in paths:
            path = self._inside(p)
            if path not in self._placed:
                raise DataError(f"{path.name}: an upload is placed before it is asked about")
            rows.append(self._placed[path])
        return np.stack(rows)

    def _inside(self, path: str | Path) -> Path:
        path = Path(path).resolve()
        if not path.is_relative_to(self.upload_dir):
            raise DataError(f"{path.name}: only files uploaded to this server can be placed")
        return path


# --- the song map -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SongMap:
    """2-D positions of songs: the analysis report's t-SNE map, or PCA of the audio-predicted factors.

    Attributes
    ----------
    ids : (n,) str
    xy : (n, 2) float32
    method : "pca", or "t-SNE, analysis report"
    mean, components : (k,), (2, k) the PCA projection of unit-norm factors (None for other maps)
    """

    ids: np.ndarray
    xy: np.ndarray
    method: str
    mean: np.ndarray | None = None
    components: np.ndarray | None = None

    @classmethod
    def pca(cls, ids: np.ndarray, factors: np.ndarray, *, seed: int = 0, fit_max: int = 50_000) -> SongMap:
        """Map songs by the first two principal components of their unit-norm factors (S, k)."""
        unit = unit_rows(factors)
        rng = np.random.default_rng(seed)
        fit = unit if len(unit) <= fit_max else unit[rng.choice(len(unit), fit_max, replace=False)]
        mean = fit.mean(axis=0)
        components = np.linalg.svd(fit - mean, full_matrices=False)[2][:2]  # (2, k)
        if len(components) < 2:  # one song or one factor: pad with a zero axis
            components = np.vstack([components, np.zeros((2 - len(components), unit.shape[1]))])
        components = components.astype(np.float32)
        return cls(np.asarray(ids).astype(str), (unit - mean) @ components.T, "pca", mean, components)

    @classmethod
    def from_report(cls, path: Path) -> SongMap:
        """The t-SNE map of the analysis report: ``map.points`` of RUN/analysis/report.json, each
        ``{"track_id", "x", "y", ...}``."""
        import json

        try:
            points = json.loads(path.read_text(encoding="utf-8"))["map"]["points"]
            ids = np.asarray([p["track_id"] for p in points]).astype(str)
            xy = np.asarray([[p["x"], p["y"]] for p in points], dtype=np.float32).reshape(-1, 2)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: no map points with track_id, x and y ({exc})") from exc
        if not len(ids) or not np.isfinite(xy).all():
            raise DataError(f"{path}: the map has no points, or coordinates that are not finite")
        return cls(ids, xy, "t-SNE, analysis report")

    def place(self, factors: np.ndarray, neighbours: Ranking) -> tuple[float, float] | None:
        """Where a new song with ``factors`` (k,) lands: its PCA projection, or else the
        similarity-weighted mean of its nearest songs on the map (None if none of them is)."""
        if self.components is not None:
            x, y = (unit_rows(factors.reshape(1, -1))[0] - self.mean) @ self.components.T
            return float(x), float(y)
        row = {s: i for i, s in enumerate(self.ids.tolist())}
        hits = [(row[s], w) for s, w in zip(neighbours.ids.tolist(), neighbours.scores.tolist(), strict=True)
                if s in row][:_MAP_NEIGHBOURS]
        if not hits:
            return None
        weights = np.maximum([w for _, w in hits], 1e-3)
        x, y = np.average(self.xy[[r for r, _ in hits]], axis=0, weights=weights)
        return float(x), float(y)


def load_song_map(run: RunDir, model: str, n_factors: int) -> SongMap:
    """The analysis report's t-SNE map when present and valid, else PCA of RUN/predictions/MODEL.npz."""
    from sonicrec.factors import Predictions

    path = run.analysis / REPORT_FILE
    if path.is_file():
        try:
            return SongMap.from_report(path)
        except DataError as exc:
            log.warning("%s; mapping the predicted factors with PCA instead", exc)
    predicted = Predictions.load(run.prediction(model), n_factors=n_factors)
    return SongMap.pca(predicted.song_ids, predicted.factors)


# --- response models (the OpenAPI schema at /docs) ------------------------------------------------


class SongHit(BaseModel):
    rank: int
    track_id: str
    score: float
    split: str | None  # train (played: true CF factors), valid/test/new (cold: predicted from audio)
    cold: bool
    title: str | None = None
    artist: str | None = None
    collection: str | None = None
    style: str | None = None


class UserHit(BaseModel):
    rank: int
    user_id: str
    score: float


class SongList(BaseModel):
    query: str
    model: str
    results: list[SongHit]


class UserList(BaseModel):
    query: str
    model: str
    results: list[UserHit]


class TrackInfo(BaseModel):
    track_id: str
    title: str | None
    artist: str | None
    collection: str | None
    duration: float | None
    split: str | None  # None: not rankable (no factors of this model)
    playable: bool
    audio_url: str | None
    excerpt_start: float | None
    excerpt_seconds: float
    meta: dict[str, Any]


class SearchResult(BaseModel):
    query: str
    results: list[TrackInfo]


class UserIds(BaseModel):
    query: str
    total: int
    results: list[str]


class MapPoint(BaseModel):
    x: float
    y: float


class MapData(BaseModel):
    method: str
    n_songs: int  # songs on the whole map; the lists below may be a seeded sample
    ids: list[str]
    x: list[float]
    y: list[float]
    split: list[str | None]
    group: list[str | None]  # style, else collection, else artist: the colour on the map
    title: list[str | None]


class UploadResult(BaseModel):
    upload_id: str
    filename: str
    format: str
    size_bytes: int
    factors: list[float]
    map: MapPoint | None
    similar: list[SongHit]
    audience: list[UserHit]
    familiarity: dict[str, Any] | None = None  # distance, threshold, percentile, familiar[, message]


class Info(BaseModel):
    run: str
    model: str
    n_factors: int
    n_users: int
    n_warm_songs: int
    n_cold_songs: int
    catalog: bool
    analysis_url: str | None
    docs_url: str
    max_upload_mb: float
    upload_formats: str


# --- the app ------------------------------------------------------------------------------------


def create_app(
    run_dir: str | Path,
    *,
    model: str = "cnn-mse",
    upload_dir: str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
    upload_queue: int = DEFAULT_UPLOAD_QUEUE,
    predictor: LogMelModel | None = None,
    allowed_hosts: Iterable[str] | None = None,
    allowed_origins: Iterable[str] = (),
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    show_progress: bool = False,
) -> FastAPI:
    """The sonicrec web app over a run directory.

    Parameters
    ----------
    run_dir : run directory with cf/factors.npz, plays.parquet and predictions/MODEL.npz
        (catalog.sqlite for metadata and audio; analysis/ for the report)
    model : whose predicted factors place cold songs, and whose checkpoint places uploads
    upload_dir : where uploads are written while they are placed (default: a temporary
        directory removed at shutdown); file names are generated by the server
    max_upload_mb : largest upload accepted, MB (10^6 bytes)
    decode_timeout_s : longest decode + prediction of one upload before its process is stopped
        (the process is started ahead; its start-up is not counted)
    upload_queue : uploads placed or waiting at once in this process; more answer 503
    predictor : the model for uploads (default: RUN/model/MODEL/checkpoint.pt, loaded by the
        upload process); it runs in that process, so it must be picklable
    allowed_hosts : Host header names served (None: any); see :func:`sonicrec.webguard.hosts_for`
    allowed_origins : other origins whose pages may upload
    body_timeout_s : longest wait for the next chunk of a request body
    show_progress : progress bars while building large nearest-neighbour indexes at startup
    """
    if max_upload_mb <= 0 or decode_timeout_s <= 0 or body_timeout_s <= 0:
        raise DataError("max_upload_mb, decode_timeout_s and body_timeout_s must be positive")
    queue = UploadQueue(upload_queue)
    run = RunDir(run_dir)
    config = run.read_config()
    own_upload_dir = upload_dir is None
    uploads_root = Path(tempfile.mkdtemp(prefix="sonicrec-uploads-") if own_upload_dir else upload_dir)
    checkpoint = run.checkpoint(model)
    worker = UploadWorker(checkpoint if predictor is None else predictor, timeout_s=decode_timeout_s)
    uploads = UploadPredictor(uploads_root, worker)
    try:  # an interrupted start-up leaves no temporary folder behind
        uploads_root.mkdir(parents=True, exist_ok=True)
        # Audio-file queries of the Recommender go through the upload process (timed, isolated).
        rec = Recommender.load(run.root, model, predictor=uploads, show_progress=show_progress)
    except BaseException:
        if own_upload_dir:
            shutil.rmtree(uploads_root, ignore_errors=True)
        raise
    song_map: list[SongMap] = []  # computed on first use
    map_lock = threading.Lock()

    def get_map() -> SongMap:
        with map_lock:
            if not song_map:
                song_map.append(load_song_map(run, model, rec.factors.n_factors))
            return song_map[0]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if predictor is not None or checkpoint.is_file():
            worker.start()  # ahead of the first upload: its start-up is not part of a decode timeout
        try:
            yield
        finally:
            worker.close()
            if own_upload_dir:
                shutil.rmtree(uploads_root, ignore_errors=True)

    app = FastAPI(
        title="sonicrec",
        summary="Recommend music by how it sounds: similar songs, recommendations and the audience "
        "of new audio, from a CNN that predicts collaborative-filtering factors.",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    max_mb_text = f"{max_upload_mb:g} MB"
    app.add_middleware(
        UploadGate, queue=queue,
        max_bytes=int(max_upload_mb * 1e6) + _MULTIPART_SLACK,
        message=f"upload larger than {max_mb_text}: send a shorter excerpt or a compressed format",
    )
    app.add_middleware(  # outermost: every request and response
        WebGuard, allowed_hosts=None if allowed_hosts is None else frozenset(allowed_hosts),
        allowed_origins=allowed_origins, body_timeout_s=body_timeout_s,
    )
    _add_error_handlers(app)

    # --- helpers over the Recommender and the catalog ---

    def split_or_none(track_id: str) -> str | None:
        try:
            return rec.split_of(track_id)
        except UnknownIdError:
            return None

    def known_song(track_id: str) -> str:
        """The id itself, after checking it names a song of the run (never a path)."""
        rec.split_of(track_id)  # UnknownIdError -> 404
        return track_id

    def song_hits(ranking: Ranking) -> list[dict[str, Any]]:
        """The fields of :class:`SongHit` for each song of a ranking."""
        info = song_metadata(ranking.ids.tolist())
        hits = []
        pairs = zip(ranking.ids.tolist(), ranking.scores.tolist(), strict=True)
        for i, (track_id, score) in enumerate(pairs):
            split = split_or_none(track_id)
            hits.append({"rank": i + 1, "track_id": track_id, "score": score, "split": split,
                         "cold": split is not None and split != "train", **_SONG_FIELDS, **info[i]})
        return hits

    def user_hits(ranking: Ranking) -> list[dict[str, Any]]:
        """The fields of :class:`UserHit` for each user of a ranking."""
        return [{"rank": i + 1, "user_id": u, "score": s}
                for i, (u, s) in enumerate(zip(ranking.ids.tolist(), ranking.scores.tolist(), strict=True))]

    def track_info(track) -> TrackInfo:
        playable = _audio_file(run, track) is not None
        return TrackInfo(
            track_id=track.track_id, title=track.title, artist=track.artist, collection=track.collection,
            duration=track.duration, split=split_or_none(track.track_id), playable=playable,
            audio_url=f"/api/audio?id={quote(track.track_id, safe='')}" if playable else None,
            excerpt_start=excerpt_start(track.duration, config.audio) if track.duration else None,
            excerpt_seconds=config.audio.excerpt_seconds, meta=track.meta,
        )

    local = threading.local()

    def catalog() -> Catalog:
        """This thread's connection to the catalog (an SQLite connection stays in its thread)."""
        if not hasattr(local, "catalog"):
            if not run.catalog.is_file():
                raise UnknownIdError(f"{run.root} has no catalog.sqlite: no track metadata or audio to serve")
            local.catalog = Catalog(run.catalog)
        return local.catalog

    has_catalog = run.catalog.is_file()

    def song_metadata(track_ids: list[str]) -> list[dict[str, Any]]:
        """Title, artist, collection and style of songs ({} for songs not in the catalog): one query."""
        if not has_catalog:
            return [{} for _ in track_ids]
        found = catalog().labels(track_ids)
        return [found.get(track_id, {}) for track_id in track_ids]

    # --- endpoints ---

    @app.get("/api/info", response_model=Info, tags=["run"])
    async def info() -> Info:
        """The run: model, numbers of users and songs, upload limits and links."""
        report = run.analysis / "index.html"
        return Info(
            run=run.root.name, model=model, n_factors=rec.factors.n_factors,
            n_users=len(rec.factors.user_ids), n_warm_songs=len(rec.warm_ids),
            n_cold_songs=len(rec.cold_ids), catalog=run.catalog.is_file(),
            analysis_url="/analysis/" if report.is_file() else None, docs_url="/docs",
            max_upload_mb=max_upload_mb, upload_formats=_FORMATS,
        )

    @app.get("/api/search", response_model=SearchResult, tags=["tracks"])
    def search(
        q: str = Query("", max_length=200, description="text in the id, title, artist or collection"),
        limit: int = Query(20, ge=1, le=200),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
    ) -> SearchResult:
        """Catalog tracks matching ``q`` (case-insensitive substring), ordered by id."""
        tracks = catalog().search(q, limit=limit, offset=offset)
        return SearchResult(query=q, results=[track_info(t) for t in tracks])

    @app.get("/api/track", response_model=TrackInfo, tags=["tracks"])
    async def track(track_id: str = Query(..., alias="id", description="track id")) -> TrackInfo:
        """One track: catalog metadata, split, audio URL and where its 30-s excerpt starts."""
        return track_info(catalog().get(track_id))

    @app.get("/api/audio", tags=["tracks"], response_class=FileResponse,
             responses={200: {"content": {"audio/*": {}}}, 206: {"description": "a byte range"}})
    def audio(track_id: str = Query(..., alias="id", description="track id")) -> FileResponse:
        """The track's audio file from the catalog; supports HTTP range requests (seeking)."""
        path = _audio_file(run, catalog().get(track_id))
        if path is None:
            raise HTTPException(404, f"track {track_id!r} has no playable audio file in the catalog")
        return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix.lower()])

    @app.get("/api/similar", response_model=SongList, tags=["recommendations"])
    async def similar(track_id: str = Query(..., alias="id", description="track id"),
                n: int = Query(10, ge=1, le=500)) -> Response:
        """A playlist of ``n`` songs like the track (itself first), by cosine in the latent space."""
        ranking = rec.similar(known_song(track_id), n)
        return _json({"query": track_id, "model": model, "results": song_hits(ranking)})

    @app.get("/api/audience", response_model=UserList, tags=["recommendations"])
    async def audience(track_id: str = Query(..., alias="id", description="track id"),
                 n: int = Query(10, ge=1, le=500)) -> Response:
        """The ``n`` users most likely to enjoy the track who have not played it yet."""
        ranking = rec.audience(known_song(track_id), n)
        return _json({"query": track_id, "model": model, "results": user_hits(ranking)})

    @app.get("/api/users", response_model=UserIds, tags=["users"])
    def users(q: str = Query("", max_length=200, description="text in the user id"),
              limit: int = Query(50, ge=1, le=1000)) -> UserIds:
        """User ids containing ``q`` (case-insensitive), in the order of the CF factors."""
        ids = rec.factors.user_ids
        if q:
            ids = ids[np.char.find(np.char.lower(ids.astype(str)), q.lower()) >= 0]
        return UserIds(query=q, total=len(ids), results=ids[:limit].tolist())

    @app.get("/api/recommend", response_model=SongList, tags=["recommendations"])
    async def recommend(
        user: str = Query(..., description="user id"),
        n: int = Query(10, ge=1, le=500),
        include_cold: bool = Query(True, description="rank never-played songs too"),
        exclude_played: bool = Query(True, description="leave out songs the user has played"),
    ) -> Response:
        """Songs for a user: played (warm) and never-played (cold, from audio) songs ranked together."""
        ranking = rec.recommend(user, n, include_cold=include_cold, exclude_played=exclude_played)
        return _json({"query": user, "model": model, "results": song_hits(ranking)})

    @app.get("/api/map", response_model=MapData, tags=["map"])
    def song_map_data(max_points: int = Query(MAP_MAX_POINTS, ge=1, le=100_000)) -> MapData:
        """2-D positions of the songs (a seeded sample of at most ``max_points``) with labels."""
        m = get_map()
        rows = np.arange(len(m.ids))
        if len(rows) > max_points:
            rows = np.sort(np.random.default_rng(0).choice(len(rows), max_points, replace=False))
        ids = m.ids[rows].tolist()
        meta = song_metadata(ids)
        return MapData(
            method=m.method, n_songs=len(m.ids), ids=ids, x=m.xy[rows, 0].tolist(), y=m.xy[rows, 1].tolist(),
            split=[split_or_none(s) for s in ids],
            group=[d.get("style") or d.get("collection") or d.get("artist") for d in meta],
            title=[d.get("title") for d in meta],
        )

    @app.post(UPLOAD_PATH, response_model=UploadResult, tags=["recommendations"])
    async def upload(
        file: UploadFile = File(  # noqa: B008 - FastAPI's way of declaring a form file
            ..., description=f"an audio file ({_FORMATS}), at most {max_mb_text}"
        ),
        n: int = Query(10, ge=1, le=100),
    ) -> UploadResult:
        """Place a new audio file (cold start): its predicted factors, similar songs and audience."""
        try:
            await worker.ready()  # waits without holding a thread
        except UploadsUnavailable as exc:
            raise HTTPException(503, str(exc)) from None
        name = _display_name(file.filename)
        head = await file.read(64)
        suffix = sniff_audio_format(head)
        if suffix is None:
            raise HTTPException(415, f"{name}: not a recognised audio file; upload {_FORMATS}")
        await file.seek(0)
        upload_id = uuid.uuid4().hex
        path = uploads_root / f"{upload_id}{suffix}"
        try:
            size = await run_in_threadpool(_copy_file, file.file, path)
            factors, familiarity = await uploads.place(path, name=name)  # in the upload process
            similar_ranking, audience_ranking = await run_in_threadpool(_ask_about, rec, path, n)
        finally:
            uploads.forget(path)
            path.unlink(missing_ok=True)
        point = (await run_in_threadpool(get_map)).place(factors, similar_ranking)
        return UploadResult(
            upload_id=upload_id, filename=name, format=suffix.lstrip("."), size_bytes=size,
            factors=factors.tolist(), map=None if point is None else MapPoint(x=point[0], y=point[1]),
            similar=song_hits(similar_ranking), audience=user_hits(audience_ranking),
            familiarity=familiarity,
        )

    # --- the page, the report, the API docs ---

    web = resources.files("sonicrec") / "web"

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(web.joinpath("index.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(web.joinpath("favicon.svg").read_bytes(), media_type="image/svg+xml")

    @app.get(f"/analysis/{REPORT_FILE}", include_in_schema=False)
    def report_json() -> JSONResponse:
        """The report's data without the machine's absolute paths."""
        path = run.analysis / REPORT_FILE
        if not path.is_file():
            raise HTTPException(404, "this run has no analysis report yet")
        return JSONResponse(_without_local_paths(json.loads(path.read_text(encoding="utf-8")), run))

    app.mount("/static", StaticFiles(directory=str(web)), name="static")
    app.mount("/analysis", _ReportFiles(directory=run.analysis, html=True, check_dir=False), name="analysis")
    _add_docs(app)
    return app


class _ReportFiles(StaticFiles):
    """The analysis report's folder; 404 with a hint while the run has none."""

    async def __call__(self, scope, receive, send) -> None:
        if not Path(self.directory).is_dir():
            message = "this run has no analysis report yet: run `sonicrec analyse RUN_DIR`"
            return await JSONResponse({"detail": message}, status_code=404)(scope, receive, send)
        await super().__call__(scope, receive, send)


def _without_local_paths(value: Any, run: RunDir) -> Any:
    """``value`` (parsed JSON) with every absolute file path replaced: the run by its name, files
    inside it by their path relative to it, others by their file name."""
    if isinstance(value, dict):
        return {k: _without_local_paths(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v, run) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and not value.startswith(("/api/", "/analysis/")):
        path, root = Path(value), run.root.resolve()
        if path == root:
            return run.root.name
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    return value


def _ask_about(rec: Recommender, path: Path, n: int) -> tuple[Ranking, Ranking]:
    """Similar songs and audience of a placed upload (the Recommender reads its remembered factors)."""
    return rec.similar(path, n), rec.audience(path, n)


def _json(content: Any) -> Response:
    """A JSON response encoded by orjson (hot endpoints: no pydantic validation of the answer)."""
    return Response(orjson.dumps(content), media_type="application/json")


def _copy_file(source, path: Path) -> int:
    """Copy an uploaded file object to ``path`` (a new file); returns its size in bytes."""
    with open(path, "xb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
        return out.tell()


def _audio_file(run: RunDir, track) -> Path | None:
    """The catalog's audio file of a track if it exists and has an audio suffix (relative paths are
    relative to the run directory), else None."""
    if not track.path:
        return None
    path = Path(track.path)
    path = path if path.is_absolute() else run.root / path
    if path.suffix.lower() not in AUDIO_EXTENSIONS or not path.is_file():
        return None
    return path


def _display_name(filename: str | None) -> str:
    """The client's file name, for messages only: its last component, printable, at most 80 chars."""
    base = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    clean = "".join(c for c in base if c.isprintable())[:80]
    return clean or "upload"


def _add_error_handlers(app: FastAPI) -> None:
    """Errors the client can fix answer 4xx with the library's message as ``detail``."""
    statuses: list[tuple[type[SonicrecError], int]] = [
        (UnknownIdError, 404), (AudioError, 422), (DataError, 422), (SonicrecError, 400),
    ]

    from sonicrec.web_errors import error_detail

    def handler(status: int) -> Callable:
        async def handle(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": error_detail(exc)}, status_code=status)

        return handle

    for error, status in statuses:
        app.add_exception_handler(error, handler(status))


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the swagger-ui-bundle package (the server may be offline)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        log.warning("swagger-ui-bundle-v2 is not installed: no /docs page (pip install 'sonicrec[serve]')")
        return
    app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title="sonicrec API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )


def serve(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str = "cnn-mse",
    upload_dir: str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
    upload_queue: int = DEFAULT_UPLOAD_QUEUE,
    workers: int = 1,
    allowed_hosts: Iterable[str] = (),
    allowed_origins: Iterable[str] = (),
    access_log: bool = False,
    show_progress: bool = False,
) -> None:
    """Run the web app of ``run_dir`` with uvicorn until interrupted (loopback only by default).

    The run is loaded once, then ``workers`` processes are forked that share the listening socket
    and what was loaded: the factors and HNSW graphs (copy-on-write pages) and the memory-mapped
    neighbour lists (the page cache), so N workers cost far less than N copies. Each worker has
    its own upload process and queue of ``upload_queue``. Only Host names of ``host`` (loopback
    names for a loopback address) and ``allowed_hosts`` are answered; pages of
    ``allowed_origins`` may upload. ``access_log`` logs one line per request (it costs throughput).
    """
    import uvicorn

    if not 0 < port < 65536:
        raise DataError(f"port {port} is not a TCP port (1-65535)")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    sock = _listen(host, port)  # a busy port fails before minutes of loading
    own_upload_dir = upload_dir is None
    uploads_root = Path(tempfile.mkdtemp(prefix="sonicrec-uploads-") if own_upload_dir else upload_dir)
    try:  # the temporary folder goes however the server ends, start-up included
        app = create_app(
            run_dir, model=model, upload_dir=uploads_root, max_upload_mb=max_upload_mb,
            decode_timeout_s=decode_timeout_s, upload_queue=upload_queue,
            allowed_hosts=hosts_for(host, allowed_hosts), allowed_origins=allowed_origins,
            show_progress=show_progress,
        )
        config = uvicorn.Config(app, log_level="info", access_log=access_log, timeout_keep_alive=5)
        if workers == 1:
            uvicorn.Server(config).run(sockets=[sock])
        else:
            _run_forked(config, sock, workers)
    finally:
        sock.close()
        if own_upload_dir:
            shutil.rmtree(uploads_root, ignore_errors=True)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DataError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run_forked(config, sock: socket.socket, workers: int) -> None:
    """Fork ``workers`` uvicorn servers on ``sock``; stop them all when one ends or on a signal."""
    import signal

    import uvicorn

    gc.freeze()  # loaded objects stay in shared pages: the collector does not write to them
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve until told to stop
            code = 0
            try:
                uvicorn.Server(config).run(sockets=[sock])
            except BaseException:  # noqa: BLE001 - reported, then the worker ends
                log.exception("server worker %d failed", os.getpid())
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    log.info("%d server workers: %s", workers, ", ".join(map(str, children)))

    def stop(*_) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        os.wait()  # the first worker to end (or a signal) ends them all
        stop()
    finally:
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
