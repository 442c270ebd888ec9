"""The load generator of benchmarks/bench_serve.py: exact outcome counts, and only its own server."""

import asyncio
import json
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_serve  # noqa: E402

from sonicrec.rundir import RunDir  # noqa: E402


async def _slow_server(handle_path) -> asyncio.Server:
    """A keep-alive HTTP server on a free loopback port answering ``handle_path(path) -> (status, body)``
    after a short delay, so that many requests are in flight at once."""

    async def client(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                await asyncio.sleep(0.02)
                status, body = handle_path(path)
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(client, bench_serve.HOST, 0)


def test_open_loop_counts_every_outcome_under_concurrency():
    def handle(path):  # every third request fails
        return (500, b"no") if int(path.rsplit("=", 1)[1]) % 3 == 0 else (200, b"{}")

    async def go():
        server = await _slow_server(handle)
        port = server.sockets[0].getsockname()[1]
        paths = [f"/x?i={i}" for i in range(300)]
        phase = await bench_serve.open_loop(port, paths, rate=1500, duration=0.2, max_connections=50)
        server.close()
        return phase

    phase = asyncio.run(go())
    assert dict(phase.outcomes) == {"200": 200, "500": 100}  # 1500/s x 0.2 s, each counted once
    assert phase.errors == 100 and len(phase.latencies) == 200
    assert min(phase.latencies) >= 0.02  # measured from the scheduled time, answers took 20 ms


def test_open_loop_counts_late_answers_as_timeouts():
    async def go():
        server = await _slow_server(lambda path: (200, b"{}"))
        port = server.sockets[0].getsockname()[1]
        phase = await bench_serve.open_loop(port, ["/x"] * 40, rate=400, duration=0.1, timeout=0.005)
        server.close()
        return phase

    assert dict(asyncio.run(go()).outcomes) == {"timeout": 40}


def test_a_busy_port_is_refused():
    with socket.socket() as busy:
        busy.bind((bench_serve.HOST, 0))
        busy.listen()
        with pytest.raises(SystemExit, match="busy"):
            bench_serve.check_port_free(busy.getsockname()[1])


class _Running:
    returncode = None

    def poll(self):
        return None


def test_a_server_of_another_run_is_not_taken_for_ours(tmp_path):
    body = json.dumps({"run": "someone-else"}).encode()

    async def serve(ready: threading.Event, stop: asyncio.Event, port: list):
        server = await _slow_server(lambda path: (200, body))
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        await stop.wait()
        server.close()

    loop = asyncio.new_event_loop()
    ready, stop, port = threading.Event(), asyncio.Event(), []
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(ready, stop, port),))
    thread.start()
    try:
        assert ready.wait(5)
        with pytest.raises(SystemExit, match="not 'mine'"):
            bench_serve.wait_ready(port[0], _Running(), RunDir(tmp_path / "mine"), timeout=5)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()
