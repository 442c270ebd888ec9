"""Web-service load test: an open-loop generator at fixed offered rates, with and without uploads.

Starts ``sonicrec serve`` in a subprocess on 127.0.0.1 (loopback only) and drives it from this
process over keep-alive HTTP/1.1 connections. Each phase sends ``GET /api/similar?id=RANDOM&n=10``
or ``GET /api/recommend?user=RANDOM&n=10`` on a fixed schedule, request i due at ``start + i/rate``,
and counts its latency from that scheduled time, so a server that falls behind shows its queue
(no coordinated omission). A phase is bounded in count (``rate * duration`` requests) and in time
(a request not answered ``--timeout`` s after its due time is an error). Reported per phase:
achieved rate (answers with status 200 per second), p50/p90/p99/max latency, errors by kind
(status code, timeout, connection reset), and the CPU share of this generator and of the server's
processes, so a saturated generator is visible. With ``--uploads`` every phase runs twice: alone,
and with a stream of uploads alongside (one POST /api/upload of a 30-s WAV at a time, continuously).

The world: ``--run RUN`` (e.g. a copy of the demo) or, by default, a cached run directory of
SIMULATED data with ``--songs`` songs (synthetic 40-d clustered factors, 95% "played", 5% "cold"
with noisy predicted factors, 10,000 users, a catalog row per song, and an untrained CNN
checkpoint of the default architecture for uploads: the cost of an upload, not its quality).

    python benchmarks/bench_serve.py --songs 1000000 --workers 2 --uploads
    python benchmarks/bench_serve.py --run /tmp/demo --rates 200 500 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sonicrec.catalog import Catalog, Track
from sonicrec.config import Config, IndexConfig
from sonicrec.factors import Factors
from sonicrec.io import atomic_save_npz
from sonicrec.recommend import Recommender
from sonicrec.rundir import RunDir

N_USERS = 10_000
DIMS = 40
COLD_FRACTION = 0.05
HOST = "127.0.0.1"
KEEPALIVE_EXPIRY_S = 4.0  # sonicrec serve closes keep-alive connections idle for 5 s (uvicorn)


# --- the simulated world ------------------------------------------------------------------------


def simulated_factors(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 40) float32 synthetic song factors around 2,000 'genre' centres, decaying spectrum."""
    scale = 1.0 / np.sqrt(1.0 + np.arange(DIMS, dtype=np.float32))
    centres = rng.standard_normal((2000, DIMS), dtype=np.float32) * scale
    out = np.empty((n, DIMS), np.float32)
    for lo in range(0, n, 200_000):
        hi = min(lo + 200_000, n)
        noise = rng.standard_normal((hi - lo, DIMS), dtype=np.float32) * (0.5 * scale)
        out[lo:hi] = centres[rng.integers(0, len(centres), hi - lo)] + noise
    return out


# A lighter HNSW than the default (M=16, ef_construction=200, ef=400), so that a 1M-song graph builds
# in minutes rather than an hour on a loaded 2-core machine; the lists hold n + played <= ef.
BENCH_INDEX = IndexConfig(m=12, ef_construction=64, ef=128)


def build_run(root: Path, n_songs: int, seed: int = 0) -> RunDir:
    """A run directory of simulated data (factors, cold predictions, plays, catalog), its indexes,
    an untrained checkpoint and its neighbour lists; each stage is kept once done."""
    run = RunDir(root)
    if not (run.root / "DATA").exists():
        write_simulated_data(run, n_songs, seed)
        (run.root / "DATA").touch()
    Config(index=BENCH_INDEX).save(run.config)
    write_untrained_checkpoint(run)
    if not (run.root / "READY").exists():
        t0 = time.perf_counter()
        Recommender.load(run.root, "cnn-mse", show_progress=True)  # builds and caches the HNSW indexes
        print(f"indexes built in {time.perf_counter() - t0:.0f} s")
        (run.root / "READY").touch()
    return run


def write_simulated_data(run: RunDir, n_songs: int, seed: int) -> None:
    """Factors, cold predictions, plays and a catalog of ``n_songs`` SIMULATED songs."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    ids = np.array([f"s{i:07d}" for i in range(n_songs)])
    split = np.where(rng.random(n_songs) < COLD_FRACTION, "test", "train")
    songs = simulated_factors(n_songs, rng)
    factors = Factors(
        user_ids=np.array([f"u{i:05d}" for i in range(N_USERS)]), song_ids=ids,
        user_factors=rng.standard_normal((N_USERS, DIMS), dtype=np.float32), song_factors=songs,
        split=split,
    )
    factors.save(run.factors)
    cold = split != "train"
    noisy = songs[cold] + 0.3 * rng.standard_normal((int(cold.sum()), DIMS), dtype=np.float32)
    atomic_save_npz(run.prediction("cnn-mse"), song_ids=ids[cold], factors=noisy)
    train_ids = ids[~cold]
    plays = pd.DataFrame({
        "user_id": np.repeat(factors.user_ids, 20),
        "track_id": train_ids[rng.integers(0, len(train_ids), N_USERS * 20)],
        "count": rng.integers(1, 10, N_USERS * 20),
    }).drop_duplicates(["user_id", "track_id"])
    plays.to_parquet(run.plays, index=False)
    with Catalog(run.catalog) as catalog:
        for lo in range(0, n_songs, 100_000):
            catalog.upsert(
                Track(s, title=f"Simulated song {s}", artist=f"Simulated artist {int(s[1:]) % 5000}",
                      collection="simulated", status="ok", meta={"style": "simulated"})
                for s in ids[lo : lo + 100_000].tolist()
            )
    print(f"simulated run of {n_songs:,} songs written in {time.perf_counter() - t0:.0f} s")


def write_untrained_checkpoint(run: RunDir, model: str = "cnn-mse") -> None:
    """RUN/model/MODEL/checkpoint.pt of a seeded, untrained CNN of the default architecture."""
    import torch

    from sonicrec.checkpoint import save_checkpoint
    from sonicrec.model import AudioCNN

    path = run.checkpoint(model)
    if path.exists():
        return
    config = Config()
    torch.manual_seed(0)
    net = AudioCNN.for_config(config)
    n_mels = config.audio.n_mels
    state = {"config": config.to_dict(), "loss": "mse", "target": "unit",
             "best_model": net.state_dict(),
             "input_norm": {"mean": torch.zeros(n_mels), "std": torch.ones(n_mels)}}
    save_checkpoint(state, path)


def upload_body(seconds: float = 30.0, sample_rate: int = 22050) -> tuple[bytes, str]:
    """A multipart/form-data body holding a WAV of simulated tones, and its content type."""
    import soundfile as sf

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t)))
    wav = io.BytesIO()
    sf.write(wav, tone.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    boundary = "sonicrec-bench-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"tone.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + wav.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# --- HTTP over loopback -------------------------------------------------------------------------


def check_port_free(port: int) -> None:
    """Refuse a port something already listens on (its answers would be taken for the server's)."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise SystemExit(f"port {port} on {HOST} is busy ({exc.strerror}): choose another --port") \
                from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


async def request(reader, writer, method: str, path: str, body: bytes = b"",
                  content_type: str = "") -> tuple[int, bytes]:
    """One HTTP/1.1 request on an open keep-alive connection: (status, body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
    if body:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    answer = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in answer.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return int(answer[9:12]), await reader.readexactly(length)


@dataclass
class Phase:
    """What one open-loop phase measured; latencies in seconds from each request's due time."""

    offered: float
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # "200", "503", "timeout", "ConnectionResetError"
    elapsed: float = 0.0
    client_cpu: float = 0.0  # CPU-seconds of this process / elapsed: share of one core
    server_cpu: float = 0.0  # the same for the server's processes (upload processes included)

    @property
    def errors(self) -> int:
        return sum(n for kind, n in self.outcomes.items() if kind != "200")

    def row(self, name: str) -> str:
        ms = np.asarray(self.latencies) * 1000 if self.latencies else np.full(1, np.nan)
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        errors = ", ".join(f"{n} {kind}" for kind, n in sorted(self.outcomes.items()) if kind != "200") or "0"
        answered = max(sum(self.outcomes.values()) - self.outcomes["timeout"], 1)
        per_request = 1000 * self.server_cpu * self.elapsed / answered
        return (f"| {name} | {self.offered:.0f}/s | {self.outcomes['200'] / self.elapsed:.0f}/s | "
                f"{p50:.1f} / {p90:.1f} / {p99:.1f} / {ms.max():.0f} ms | {errors} | "
                f"{100 * self.client_cpu:.0f}% | {100 * self.server_cpu:.0f}%, {per_request:.2f} ms/req |")


async def open_loop(port: int, paths: list[str], rate: float, duration: float, *,
                    max_connections: int = 256, timeout: float = 5.0) -> Phase:
    """Send ``paths`` (at most ``rate * duration``) on a fixed schedule; latency from the due time.

    Connections are opened as needed, at most ``max_connections``; a request waiting for one
    keeps its due time. Every outcome is counted once, after its request finished. Like httpx's
    ``keepalive_expiry``, a connection idle for ``KEEPALIVE_EXPIRY_S`` (below the server's 5-s
    keep-alive timeout) is closed rather than reused, so no request is sent on a connection the
    server is closing.
    """
    phase = Phase(offered=rate)
    free: list = []
    opened = 0
    available = asyncio.Condition()

    async def connection():
        nonlocal opened
        async with available:
            while not free and opened >= max_connections:
                await available.wait()
            while free:
                reader, writer, idle_since = free.pop()
                if time.perf_counter() - idle_since < KEEPALIVE_EXPIRY_S:
                    return reader, writer
                writer.close()
                opened -= 1
            opened += 1
        try:
            return await asyncio.open_connection(HOST, port)
        except OSError:
            opened -= 1
            raise

    async def give_back(conn) -> None:
        nonlocal opened
        async with available:
            if conn is None:
                opened -= 1
            else:
                free.append((*conn, time.perf_counter()))
            available.notify()

    async def one(due: float, path: str) -> None:
        conn = None
        try:
            async with asyncio.timeout_at(loop_start + (due - start) + timeout):
                conn = await connection()
                status, _ = await request(*conn, "GET", path)
            kind = str(status)
        except TimeoutError:
            kind = "timeout"
        except (OSError, asyncio.IncompleteReadError) as exc:
            kind = type(exc).__name__
        if not kind.isdigit():  # a timeout or a broken connection: its state is unknown
            if conn is not None:
                conn[1].close()
            conn = None
        await give_back(conn)
        phase.outcomes[kind] += 1  # no await between reading and writing the counter
        if kind == "200":
            phase.latencies.append(time.perf_counter() - due)

    n = min(len(paths), int(rate * duration))
    cpu0, start = time.process_time(), time.perf_counter()
    loop_start = asyncio.get_running_loop().time()
    tasks, i = [], 0
    while i < n:
        now = time.perf_counter()
        while i < n and start + i / rate <= now:
            tasks.append(asyncio.create_task(one(start + i / rate, paths[i])))
            i += 1
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
    await asyncio.gather(*tasks)
    phase.elapsed = time.perf_counter() - start
    phase.client_cpu = (time.process_time() - cpu0) / phase.elapsed
    for _, writer, _ in free:
        writer.close()
    return phase


@dataclass
class UploadStream:
    """Uploads sent one at a time, back to back, while a phase runs."""

    outcomes: Counter = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)

    async def run(self, port: int, body: bytes, content_type: str, stop: asyncio.Event) -> None:
        conn = await asyncio.open_connection(HOST, port)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _ = await request(*conn, "POST", "/api/upload?n=10", body, content_type)
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.outcomes[type(exc).__name__] += 1
                conn = await asyncio.open_connection(HOST, port)
                continue
            self.outcomes[str(status)] += 1
            self.seconds.append(time.perf_counter() - t0)
            if status == 503:
                await asyncio.sleep(0.5)
        conn[1].close()

    def summary(self) -> str:
        median = f"{np.median(self.seconds):.2f} s each" if self.seconds else "none answered"
        return f"{sum(self.outcomes.values())} uploads ({dict(self.outcomes)}), {median}"


async def measure(port: int, paths: list[str], rate: float, duration: float, server_pid: int,
                  upload: tuple[bytes, str] | None, timeout: float) -> tuple[Phase, UploadStream | None]:
    """One phase, with an upload stream alongside when ``upload`` is given."""
    stop, stream, task = asyncio.Event(), None, None
    if upload is not None:
        stream = UploadStream()
        task = asyncio.create_task(stream.run(port, *upload, stop))
        await asyncio.sleep(1.0)  # the first upload is under way
    cpu0 = process_tree_cpu(server_pid)
    phase = await open_loop(port, paths, rate, duration, timeout=timeout)
    phase.server_cpu = (process_tree_cpu(server_pid) - cpu0) / phase.elapsed
    if task is not None:
        stop.set()
        await task
    return phase, stream


# --- the server's processes ---------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def process_tree_cpu(pid: int) -> float:
    """CPU-seconds used so far by ``pid`` and its living descendants."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_tree_memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB of ``pid`` and its descendants; PSS splits shared pages between processes."""
    rss = pss = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def start_server(run: RunDir, port: int, workers: int, extra: list[str]) -> subprocess.Popen:
    check_port_free(port)
    return subprocess.Popen(
        [sys.executable, "-m", "sonicrec.cli", "-q", "serve", str(run.root), "--port", str(port),
         "--workers", str(workers), *extra],
        stdout=subprocess.DEVNULL,
    )


def wait_ready(port: int, server: subprocess.Popen, run: RunDir, timeout: float) -> dict:
    """/api/info of the server we started (its run's name), once it answers; else exit."""

    async def probe() -> dict | None:
        try:
            conn = await asyncio.open_connection(HOST, port)
        except OSError:
            return None
        try:
            status, body = await request(*conn, "GET", "/api/info")
        except (OSError, asyncio.IncompleteReadError):  # the server went away while loading
            return None
        finally:
            conn[1].close()
        return json.loads(body) if status == 200 else None

    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode} before answering")
        info = asyncio.run(probe())
        if info is not None:
            if info.get("run") != run.root.name:
                raise SystemExit(f"port {port} answers for run {info.get('run')!r}, not {run.root.name!r}")
            return info
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not answer within {timeout:.0f} s")
        time.sleep(0.5)


# --- the benchmark ------------------------------------------------------------------------------


def query_pool(run: RunDir, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The songs (a seeded sample of ``size``, all when 0) and users the requests ask about."""
    factors = Factors.load(run.factors)
    songs = factors.song_ids
    if 0 < size < len(songs):
        songs = songs[np.sort(np.random.default_rng(2).choice(len(songs), size, replace=False))]
    return songs, factors.user_ids


def prepare_lists(run: RunDir, mode: str, songs: np.ndarray) -> None:
    """Neighbour lists for the benchmark: none (every query searches), of the queried songs and
    all users (timed, and extrapolated to the whole catalog), or as they are."""
    import shutil

    from sonicrec.neighbours import compute_lists

    folder = run.neighbours / "cnn-mse"
    if mode == "keep":
        return
    shutil.rmtree(folder, ignore_errors=True)
    if mode == "none":
        return
    rec = Recommender.load(run.root, "cnn-mse")
    rows = np.flatnonzero(np.isin(rec.song_ids, songs))
    users_s = compute_lists(rec, only_songs=rows[:0]).seconds  # the users' lists alone
    lists = compute_lists(rec, only_songs=rows)
    songs_s = lists.seconds - users_s
    lists.save(folder)
    print(f"neighbour lists: {len(rec.factors.user_ids):,} users in {users_s:.1f} s; {len(rows):,} songs in "
          f"{songs_s:.1f} s, so all {len(rec.song_ids):,} songs would take about "
          f"{songs_s * len(rec.song_ids) / max(len(rows), 1) / 60:.0f} min at this load "
          f"({os.getloadavg()[0]:.1f})", flush=True)


def run_phases(args, run: RunDir, port: int, server: subprocess.Popen, songs: np.ndarray,
               users: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    upload = upload_body() if args.uploads else None
    targets = {"similar": ("/api/similar?id={}&n=10", songs),
               "recommend": ("/api/recommend?user={}&n=10", users)}
    print("| endpoint | offered | achieved | p50 / p90 / p99 / max | errors | generator CPU | server CPU "
          "| load (1 min) |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for endpoint in args.endpoints:
        template, ids = targets[endpoint]

        def draw(n: int, template=template, ids=ids) -> list[str]:
            return [template.format(s) for s in ids[rng.integers(0, len(ids), n)].tolist()]

        asyncio.run(open_loop(port, draw(400), 200, 2.0))  # warm-up
        for rate in args.rates:
            for with_uploads in ([False, True] if upload else [False]):
                time.sleep(1.0)
                load = os.getloadavg()[0]
                phase, stream = asyncio.run(measure(
                    port, draw(int(rate * args.duration)), rate, args.duration, server.pid,
                    upload if with_uploads else None, args.timeout,
                ))
                name = f"{endpoint}{' + uploads' if with_uploads else ''}"
                print(f"{phase.row(name)} {load:.1f} -> {os.getloadavg()[0]:.1f} |", flush=True)
                if stream is not None:
                    print(f"|  | uploads alongside: {stream.summary()} | | | | | | |", flush=True)
    rss, pss = process_tree_memory(server.pid)
    print(f"server memory after the runs: RSS {rss:,.0f} MiB, PSS {pss:,.0f} MiB "
          f"({args.workers} worker(s), their parent and any upload processes)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="an existing run directory (default: a simulated one)")
    parser.add_argument("--songs", type=int, default=1_000_000, help="songs of the simulated run")
    parser.add_argument("--work", type=Path, help="cache of the simulated run (default ~/.cache/sonicrec)")
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 500, 1000, 2000])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase (30)")
    parser.add_argument("--timeout", type=float, default=5.0, help="a request later than this is an error")
    parser.add_argument("--endpoints", nargs="+", choices=["similar", "recommend"],
                        default=["similar", "recommend"])
    parser.add_argument("--uploads", action="store_true", help="also run each phase with uploads alongside")
    parser.add_argument("--workers", type=int, default=1, help="server processes (1)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--server-args", default="", help="more options for `sonicrec serve`")
    parser.add_argument("--query-pool", type=int, default=20_000,
                        help="songs the similar requests ask about, a seeded sample (0: all)")
    parser.add_argument("--lists", choices=["pool", "none", "keep"], default="pool",
                        help="lists of the queried songs and all users (pool), none, or as they are")
    args = parser.parse_args()

    if args.run is not None:
        run = RunDir(args.run)
    else:
        work = args.work or Path.home() / ".cache" / "sonicrec" / f"bench-serve-{args.songs}"
        run = build_run(work, args.songs)
    songs, users = query_pool(run, args.query_pool)
    prepare_lists(run, args.lists, songs)
    port = args.port or free_port()
    server = start_server(run, port, args.workers, args.server_args.split())
    try:
        t0 = time.perf_counter()
        info = wait_ready(port, server, run, timeout=900)
        print(f"server ready in {time.perf_counter() - t0:.1f} s: {info['n_warm_songs']:,} played + "
              f"{info['n_cold_songs']:,} cold songs, {info['n_users']:,} users; {args.workers} worker(s); "
              f"{os.cpu_count()} cores; this generator and the server share them")
        run_phases(args, run, port, server, songs, users)
    finally:
        server.send_signal(signal.SIGINT)  # a clean shutdown, as Ctrl-C
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
