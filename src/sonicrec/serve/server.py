"""Running the web app: uvicorn on a socket opened before loading, one process or several forked
ones sharing what was loaded."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from sonicrec.errors import DataError
from sonicrec.serve.app import create_app
from sonicrec.serve.uploads import DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_UPLOAD_MB, DEFAULT_UPLOAD_QUEUE
from sonicrec.webguard import hosts_for

log = logging.getLogger(__name__)


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
