"""Uploads under load (issue 15 items 20-22): a bounded queue, a decode timeout that excludes the
upload process's start-up, and prediction isolated from the server's requests.

A real server (uvicorn in a thread) on the tiny synthetic run of test_serve, driven by concurrent
HTTP clients. The models below are picklable wrappers of the tiny CNN, so they travel to the
upload process and behave there as the test needs (slow, slow to start, reporting where they run).
"""

import asyncio
import os
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from sonicrec.serve import create_app  # noqa: E402
from test_serve import K, make_run, tiny_predictor, tone  # noqa: E402


class SlowModel:
    """The tiny CNN, ``seconds`` slower per file; ``seconds_quiet`` for a quiet file (peak < -10 dB)."""

    def __init__(self, seconds: float = 0.0, seconds_quiet: float = 0.0, startup: float = 0.0):
        self.inner = tiny_predictor()
        self.config = self.inner.config
        self.seconds, self.seconds_quiet, self.startup = seconds, seconds_quiet, startup

    def __setstate__(self, state):  # runs in the upload process as it starts
        self.__dict__.update(state)
        time.sleep(self.startup)

    def assess_logmel(self, x):
        time.sleep(self.seconds_quiet if float(x.max()) < -10 else self.seconds)
        return self.inner.assess_logmel(x)


class WhereModel:
    """Predicts where it runs: (torch threads, niceness, process id, 0, ...)."""

    def __init__(self):
        self.config = tiny_predictor().config

    def assess_logmel(self, x):
        import torch

        out = np.zeros((len(x), K), np.float32)
        out[:, :3] = [torch.get_num_threads(), os.nice(0), os.getpid()]
        return out, None


def _wav(i: int, tmp_path, gain: float = 1.0) -> bytes:
    import soundfile as sf

    path = tmp_path / f"upload-{i}-{gain}.wav"
    sf.write(path, gain * tone(i), 8000)
    return path.read_bytes()


@pytest.fixture
def serve_app(tmp_path):
    """Start a live server for an app made by ``create_app(run, **options)``; yields its URL."""
    run = make_run(tmp_path / "run", tiny_predictor())
    servers = []

    def start(**options) -> str:
        app = create_app(run.root, upload_dir=tmp_path / "uploads", **options)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(20)


async def _upload(client, body: bytes, name: str = "song.wav"):
    t0 = time.perf_counter()
    r = await client.post("/api/upload", files={"file": (name, body, "audio/wav")}, timeout=60)
    return r, time.perf_counter() - t0


async def _get(client, path: str):
    t0 = time.perf_counter()
    r = await client.get(path, timeout=60)
    return r, time.perf_counter() - t0


def test_a_full_upload_queue_answers_503_and_other_endpoints_keep_answering(serve_app, tmp_path):
    url = serve_app(predictor=SlowModel(seconds=1.0), upload_queue=2)
    body = _wav(3, tmp_path)

    async def go():
        async with httpx.AsyncClient(base_url=url) as client:
            await _get(client, "/api/info")
            uploads = [asyncio.create_task(_upload(client, body)) for _ in range(8)]
            await asyncio.sleep(0.3)  # all uploads sent; two admitted, one of them being placed
            reads = await asyncio.gather(*(_get(client, p) for p in
                                           ["/api/search?q=tone", "/api/similar?id=t01", "/api/users", "/"]))
            return await asyncio.gather(*uploads), reads

    uploads, reads = asyncio.run(go())
    statuses = sorted(r.status_code for r, _ in uploads)
    assert statuses == [200, 200] + [503] * 6
    refused = [r for r, _ in uploads if r.status_code == 503]
    assert all(int(r.headers["Retry-After"]) >= 1 and "try again" in r.json()["detail"] for r in refused)
    slowest_upload = max(seconds for r, seconds in uploads if r.status_code == 200)
    assert slowest_upload > 1.5  # the second waited for the first
    for r, seconds in reads:
        assert r.status_code == 200 and seconds < 1.0  # not behind the uploads


def test_the_decode_timeout_counts_the_decode_not_the_upload_process_start_up(serve_app, tmp_path):
    # the upload process takes 2.5 s to start (model unpickling) on top of its imports: more than the timeout
    url = serve_app(predictor=SlowModel(seconds_quiet=6.0, startup=2.5), decode_timeout_s=1.5)

    async def go():
        async with httpx.AsyncClient(base_url=url) as client:
            first, _ = await _upload(client, _wav(3, tmp_path))
            hung, _ = await _upload(client, _wav(3, tmp_path, gain=0.01), "quiet.wav")
            after, _ = await _upload(client, _wav(4, tmp_path))  # a fresh process, started ahead
            return first, hung, after

    first, hung, after = asyncio.run(go())
    assert first.status_code == 200
    assert hung.status_code == 422 and "quiet.wav" in hung.json()["detail"]
    assert "longer than 1.5 s" in hung.json()["detail"]
    assert after.status_code == 200
    assert list((tmp_path / "uploads").iterdir()) == []  # every upload removed, placed or not


def test_prediction_runs_in_its_own_low_priority_single_thread_process(serve_app, tmp_path):
    url = serve_app(predictor=WhereModel())

    async def go():
        async with httpx.AsyncClient(base_url=url) as client:
            return (await _upload(client, _wav(2, tmp_path)))[0]

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    threads, niceness, pid = r.json()["factors"][:3]
    assert threads == 1 and pid != os.getpid()
    assert niceness >= min(os.nice(0) + 10, 19)
