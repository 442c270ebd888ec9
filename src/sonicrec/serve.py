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

import logging
import multiprocessing
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable
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
from sonicrec.config import AudioConfig, Config
from sonicrec.errors import AudioError, DataError, MissingExtraError, SonicrecError, UnknownIdError
from sonicrec.factors import unit_rows
from sonicrec.recommend import Ranking, Recommender
from sonicrec.rundir import RunDir

try:
    from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("the web service needs FastAPI: pip install 'sonicrec[serve]'") from exc

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 50.0
DEFAULT_DECODE_TIMEOUT_S = 60.0
MAP_MAX_POINTS = 5000  # songs drawn on the map (a seeded sample of larger catalogs)
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


def _decode_in_worker(path: str, cfg: AudioConfig) -> np.ndarray:
    """Log-mel of an uploaded file, in the decode worker process: (n_mels, n_frames) float32."""
    import torch

    torch.set_num_threads(1)  # one core per upload; the server keeps the others
    return file_to_logmel(path, cfg)


class DecodeWorker:
    """Decodes untrusted audio in a separate process, one file at a time, killed after a timeout.

    A file that crashes or hangs a decoder takes down the worker process, not the server; the
    next file gets a fresh process. The process is started on first use.
    """

    def __init__(self, cfg: AudioConfig, *, timeout_s: float) -> None:
        self.cfg = cfg
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._pool = None

    def logmel(self, path: Path, *, name: str) -> np.ndarray:
        """(n_mels, n_frames) float32 log-mel of ``path``; errors name the file ``name``, not the path."""
        if not self._lock.acquire(timeout=self.timeout_s):
            raise AudioError(f"{name}: the server is busy decoding other uploads; try again in a minute")
        try:
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(1)
            job = self._pool.apply_async(_decode_in_worker, (str(path), self.cfg))
            try:
                x = job.get(self.timeout_s)
            except multiprocessing.TimeoutError:
                self.close()
                raise AudioError(
                    f"{name}: decoding took longer than {self.timeout_s:g} s and was stopped; "
                    "upload a shorter file or a common format"
                ) from None
            except AudioError as exc:
                raise AudioError(str(exc).replace(str(path), name)) from None
            except Exception as exc:  # the worker died or the decoder failed unexpectedly
                self.close()
                raise AudioError(f"{name}: cannot decode this file ({type(exc).__name__})") from None
        finally:
            self._lock.release()
        if x.ndim != 2 or not np.isfinite(x).all():
            raise AudioError(f"{name}: decoding gave no usable spectrogram")
        return x

    def close(self) -> None:
        """Stop the worker process (a later file starts a new one)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


class LogMelModel(Protocol):
    """What the server needs of :class:`sonicrec.predict.Predictor`."""

    config: Config

    def assess_logmel(self, x: np.ndarray) -> tuple[np.ndarray, Any]: ...


class UploadPredictor:
    """Factors of uploaded files: decoded in a :class:`DecodeWorker`, the CNN in this process.

    Serves as the Recommender's audio predictor. Only files inside ``upload_dir`` are accepted.
    The factors of a file are remembered until :meth:`forget`, so one upload answers several
    questions (similar songs, audience) with one decode.

    Parameters
    ----------
    upload_dir : the server-managed directory uploads are written to
    checkpoint : the model checkpoint, loaded on the first upload (when ``model`` is None)
    model : a loaded model (tests, or a server that already holds one)
    timeout_s : longest decode of one file
    """

    def __init__(
        self, upload_dir: Path, *, checkpoint: Path, model: LogMelModel | None = None,
        timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
    ) -> None:
        self.upload_dir = Path(upload_dir).resolve()
        self.checkpoint = checkpoint
        self.timeout_s = timeout_s
        self._model = model
        self._worker: DecodeWorker | None = None
        self._placed: dict[Path, np.ndarray] = {}
        self._familiarity: dict[Path, dict[str, Any] | None] = {}
        self._load_lock = threading.RLock()

    @property
    def model(self) -> LogMelModel:
        with self._load_lock:
            if self._model is None:
                from sonicrec.predict import Predictor  # a missing checkpoint is a clear DataError there

                self._model = Predictor.load(self.checkpoint)
            return self._model

    @property
    def worker(self) -> DecodeWorker:
        with self._load_lock:
            if self._worker is None:
                self._worker = DecodeWorker(self.model.config.audio, timeout_s=self.timeout_s)
            return self._worker

    def place(self, path: Path, *, name: str) -> np.ndarray:
        """(k,) float32 factors of the upload at ``path``; ``name`` is what error messages call it."""
        path = self._inside(path)
        x = self.worker.logmel(path, name=name)  # (n_mels, n_frames)
        factors, familiarity = self.model.assess_logmel(x[None])
        factors = np.asarray(factors, dtype=np.float32)[0]
        self._placed[path] = factors
        self._familiarity[path] = None if familiarity is None else familiarity.as_dict(0)
        return factors

    def familiarity(self, path: Path) -> dict[str, Any] | None:
        """How familiar a placed upload is to the model (``FamiliarityScores.as_dict``), or None."""
        return self._familiarity.get(self._inside(path))

    def forget(self, path: Path) -> None:
        self._placed.pop(Path(path).resolve(), None)
        self._familiarity.pop(Path(path).resolve(), None)

    def predict_files(self, paths: list[Path]) -> np.ndarray:
        """(len(paths), k) float32 factors of uploaded files (remembered ones are not decoded again)."""
        rows = []
        for p in paths:
            path = self._inside(p)
            rows.append(self._placed[path] if path in self._placed else self.place(path, name=path.name))
        return np.stack(rows)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()

    def _inside(self, path: str | Path) -> Path:
        path = Path(path).resolve()
        if not path.is_relative_to(self.upload_dir):
            raise DataError(f"{path.name}: only files uploaded to this server can be placed")
        return path


class _UploadSizeLimit:
    """ASGI middleware: answer 413 once an upload's request body grows past ``max_bytes``."""

    def __init__(self, app, *, max_bytes: int, message: str) -> None:
        self.app, self.max_bytes, self.message = app, max_bytes, message

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != UPLOAD_PATH:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted_receive, send)


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
    from sonicrec.evaluate import load_predictions

    path = run.analysis / REPORT_FILE
    if path.is_file():
        try:
            return SongMap.from_report(path)
        except DataError as exc:
            log.warning("%s; mapping the predicted factors with PCA instead", exc)
    ids, factors = load_predictions(run.prediction(model), n_factors)
    return SongMap.pca(ids, factors)


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
    predictor: LogMelModel | None = None,
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
    decode_timeout_s : longest decode of one upload before its worker process is stopped
    predictor : the model for uploads (default: RUN/model/MODEL/checkpoint.pt, loaded on first use)
    show_progress : progress bars while building large nearest-neighbour indexes at startup
    """
    if max_upload_mb <= 0 or decode_timeout_s <= 0:
        raise DataError("max_upload_mb and decode_timeout_s must be positive")
    run = RunDir(run_dir)
    config = run.read_config()
    own_upload_dir = upload_dir is None
    uploads_root = Path(tempfile.mkdtemp(prefix="sonicrec-uploads-") if own_upload_dir else upload_dir)
    uploads_root.mkdir(parents=True, exist_ok=True)
    uploads = UploadPredictor(
        uploads_root, checkpoint=run.model / model / "checkpoint.pt", model=predictor,
        timeout_s=decode_timeout_s,
    )
    # Audio-file queries of the Recommender go through the upload worker (decode with a timeout).
    rec = Recommender.load(run.root, model, predictor=uploads, show_progress=show_progress)
    song_map: list[SongMap] = []  # computed on first use
    map_lock = threading.Lock()

    def get_map() -> SongMap:
        with map_lock:
            if not song_map:
                song_map.append(load_song_map(run, model, rec.factors.n_factors))
            return song_map[0]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        uploads.close()
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
        _UploadSizeLimit,
        max_bytes=int(max_upload_mb * 1e6) + _MULTIPART_SLACK,
        message=f"upload larger than {max_mb_text}: send a shorter excerpt or a compressed format",
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

    def song_hits(ranking: Ranking) -> list[SongHit]:
        info = song_metadata(ranking.ids.tolist())
        hits = []
        pairs = zip(ranking.ids.tolist(), ranking.scores.tolist(), strict=True)
        for i, (track_id, score) in enumerate(pairs):
            split = split_or_none(track_id)
            hits.append(SongHit(rank=i + 1, track_id=track_id, score=score, split=split,
                                cold=split is not None and split != "train", **info[i]))
        return hits

    def user_hits(ranking: Ranking) -> list[UserHit]:
        return [UserHit(rank=i + 1, user_id=u, score=s)
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

    def song_metadata(track_ids: list[str]) -> list[dict[str, Any]]:
        """Title, artist, collection and style of songs ({} for songs not in the catalog)."""
        if not run.catalog.is_file():
            return [{} for _ in track_ids]
        out = []
        for track_id in track_ids:
            try:
                t = catalog().get(track_id)
            except UnknownIdError:
                out.append({})
                continue
            out.append({"title": t.title, "artist": t.artist, "collection": t.collection,
                        "style": t.meta.get("style")})
        return out

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
        offset: int = Query(0, ge=0),
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
                n: int = Query(10, ge=1, le=500)) -> SongList:
        """A playlist of ``n`` songs like the track (itself first), by cosine in the latent space."""
        ranking = rec.similar(known_song(track_id), n)
        return SongList(query=track_id, model=model, results=song_hits(ranking))

    @app.get("/api/audience", response_model=UserList, tags=["recommendations"])
    async def audience(track_id: str = Query(..., alias="id", description="track id"),
                 n: int = Query(10, ge=1, le=500)) -> UserList:
        """The ``n`` users most likely to enjoy the track who have not played it yet."""
        ranking = rec.audience(known_song(track_id), n)
        return UserList(query=track_id, model=model, results=user_hits(ranking))

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
    ) -> SongList:
        """Songs for a user: played (warm) and never-played (cold, from audio) songs ranked together."""
        ranking = rec.recommend(user, n, include_cold=include_cold, exclude_played=exclude_played)
        return SongList(query=user, model=model, results=song_hits(ranking))

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
            await run_in_threadpool(lambda: uploads.model)  # loaded on the first upload
        except DataError as exc:
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
            factors, similar_ranking, audience_ranking, familiarity = await run_in_threadpool(
                _place_upload, rec, path, name, n
            )
        finally:
            uploads.forget(path)
            path.unlink(missing_ok=True)
        point = get_map().place(factors, similar_ranking)
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


def _place_upload(
    rec: Recommender, path: Path, name: str, n: int
) -> tuple[np.ndarray, Ranking, Ranking, dict[str, Any] | None]:
    """Decode and predict an upload once, then ask the Recommender about it."""
    factors = rec.predictor.place(path, name=name)  # the server's UploadPredictor
    return factors, rec.similar(path, n), rec.audience(path, n), rec.predictor.familiarity(path)


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

    def handler(status: int) -> Callable:
        async def handle(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)

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


_OPTIONS_VARIABLE = "SONICREC_SERVE_OPTIONS"  # create_app's arguments for each worker process


def app_from_environment() -> FastAPI:
    """``create_app(**json.loads($SONICREC_SERVE_OPTIONS))``: the app factory of worker processes."""
    import json
    import os

    return create_app(**json.loads(os.environ[_OPTIONS_VARIABLE]))


def serve(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str = "cnn-mse",
    upload_dir: str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
    workers: int = 1,
    access_log: bool = False,
    show_progress: bool = False,
) -> None:
    """Run the web app of ``run_dir`` with uvicorn until interrupted (loopback only by default).

    ``workers`` > 1 starts that many server processes, each with its own copy of the indexes
    (searches hold Python's GIL, so processes are how a server uses several cores).
    ``access_log`` logs one line per request (off by default: it costs throughput).
    """
    import uvicorn

    options = dict(
        run_dir=str(run_dir), model=model, upload_dir=None if upload_dir is None else str(upload_dir),
        max_upload_mb=max_upload_mb, decode_timeout_s=decode_timeout_s, show_progress=show_progress,
    )
    if workers == 1:
        uvicorn.run(create_app(**options), host=host, port=port, log_level="info", access_log=access_log)
        return
    import json
    import os

    os.environ[_OPTIONS_VARIABLE] = json.dumps(options)
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=workers, host=host, port=port,
                log_level="info", access_log=access_log)
