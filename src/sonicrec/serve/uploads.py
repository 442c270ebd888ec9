"""Uploads: admission (a bounded queue, 503 + Retry-After), the size limit, and a worker process
that turns an uploaded audio file into factors.

An upload is limited in size (request body counted as it arrives), must start like an audio file
(WAV, AIFF, FLAC, Ogg, MP3 or M4A), is written under a server-managed directory with a generated
name, decoded and run through the CNN in a separate worker process with a timeout, and deleted
once its factors are known.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from sonicrec.audio import file_to_logmel
from sonicrec.config import Config
from sonicrec.errors import AudioError, DataError, SonicrecError

DEFAULT_MAX_UPLOAD_MB = 50.0
DEFAULT_DECODE_TIMEOUT_S = 60.0
DEFAULT_UPLOAD_QUEUE = 4  # uploads placed or waiting at once per server process; more answer 503
UPLOAD_PATH = "/api/upload"
MULTIPART_SLACK = 64 * 1024  # bytes of multipart envelope allowed on top of the file itself
FORMATS = "WAV, AIFF, FLAC, Ogg (Vorbis/Opus), MP3 or M4A"


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
            raise UploadsUnavailable(exc.message, remedy=exc.remedy) from None
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
    """What the upload process needs of :class:`sonicrec.predict.Predictor`."""

    config: Config

    def assess_logmel(self, x: np.ndarray) -> tuple[np.ndarray, Any]: ...


@dataclass(frozen=True)
class PlacedUpload:
    """An uploaded file turned into factors (the file itself is gone).

    Attributes
    ----------
    upload_id : the generated name it was stored under
    filename : the client's file name, for display only
    format : its audio format, recognised from its first bytes ("wav", "mp3", ...)
    size_bytes : its size
    factors : (k,) float32 factors the model predicts for it
    familiarity : ``FamiliarityScores.as_dict`` (None without a familiarity model)
    """

    upload_id: str
    filename: str
    format: str
    size_bytes: int
    factors: np.ndarray
    familiarity: dict[str, Any] | None


class Uploads:
    """Uploaded files stored under generated names in ``upload_dir``, placed by an
    :class:`UploadWorker`, deleted once placed."""

    def __init__(self, upload_dir: Path, worker: UploadWorker) -> None:
        self.upload_dir = Path(upload_dir)
        self.worker = worker

    async def place(self, file: UploadFile) -> PlacedUpload:
        """The factors of an uploaded file. Raises :class:`UploadsUnavailable` without a usable
        model, HTTP 415 for a file that is not audio, :class:`AudioError` when it cannot be decoded."""
        await self.worker.ready()  # waits without holding a thread
        name = _display_name(file.filename)
        suffix = sniff_audio_format(await file.read(64))
        if suffix is None:
            raise HTTPException(415, f"{name}: not a recognised audio file; upload {FORMATS}")
        await file.seek(0)
        upload_id = uuid.uuid4().hex
        path = self.upload_dir / f"{upload_id}{suffix}"
        try:
            size = await run_in_threadpool(_copy_file, file.file, path)
            factors, familiarity = await self.worker.factors(path, name=name)  # in the upload process
        finally:
            path.unlink(missing_ok=True)
        return PlacedUpload(upload_id, name, suffix.lstrip("."), size, factors, familiarity)


def _copy_file(source, path: Path) -> int:
    """Copy an uploaded file object to ``path`` (a new file); returns its size in bytes."""
    with open(path, "xb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
        return out.tell()


def _display_name(filename: str | None) -> str:
    """The client's file name, for messages only: its last component, printable, at most 80 chars."""
    base = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    clean = "".join(c for c in base if c.isprintable())[:80]
    return clean or "upload"
