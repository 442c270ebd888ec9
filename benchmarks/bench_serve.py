"""Web-service load test: similar-songs requests per second and latency at 1M indexed songs.

Builds once (cached under ``--work``) a run directory of SIMULATED data: ``--songs`` songs with
synthetic 40-d factors (clustered like WMF factors), 95% "played" (true factors, HNSW index) and 5%
"cold" (audio-predicted factors, their own index), 10,000 users and a catalog with a row per song.
Then it starts ``sonicrec serve`` in a subprocess on 127.0.0.1 and drives it from this process over
keep-alive HTTP/1.1 connections, loopback only:

1. closed loop: ``--connections`` clients each send GET /api/similar?id=RANDOM&n=10 back to back,
   ``--requests`` requests in all (stopped after ``--duration`` s): the highest rate;
2. open loop: the same requests sent on a fixed schedule at ``--rate`` per second (latency counted
   from the scheduled time, so a stalled server cannot hide its queue): p99 at the target rate;
3. reference, same process and server: the closed loop on GET /api/info (routing and JSON, no
   search): the HTTP floor of this machine.

The server and this client share the machine's cores (and, on the development machine, other jobs
do too): the load average is printed.

    python benchmarks/bench_serve.py                          # 1M songs
    python benchmarks/bench_serve.py --songs 100000 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sonicrec.catalog import Catalog, Track
from sonicrec.config import Config
from sonicrec.factors import Factors
from sonicrec.io import atomic_save_npz
from sonicrec.recommend import Recommender
from sonicrec.rundir import RunDir

N_USERS = 10_000
DIMS = 40
COLD_FRACTION = 0.05


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


def build_run(root: Path, n_songs: int, seed: int = 0) -> RunDir:
    """A run directory of simulated data (factors, cold predictions, plays, catalog), and its indexes."""
    run = RunDir(root)
    if (run.root / "READY").exists():
        return run
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    Config().save(run.config)  # the default index: HNSW (M=16, ef_construction=200, ef=100)
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
    print(f"simulated run of {n_songs:,} songs written in {time.perf_counter() - t0:.0f} s; building indexes")
    t0 = time.perf_counter()
    Recommender.load(run.root, "cnn-mse", show_progress=True)  # builds and caches the HNSW indexes
    print(f"indexes built in {time.perf_counter() - t0:.0f} s")
    (run.root / "READY").touch()
    return run


async def _request(reader, writer, path: str) -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return int(head[9:12])


async def closed_loop(port: int, paths: list[str], connections: int, duration: float) -> dict:
    """Each connection sends the next request when its previous answer is in."""
    todo = iter(paths)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path in todo:
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            errors += await _request(reader, writer, path) != 200
            latencies.append(time.perf_counter() - t0)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return _summary(latencies, errors, time.perf_counter() - start)


async def open_loop(port: int, paths: list[str], rate: float, duration: float, pool: int = 64) -> dict:
    """Request i is due at start + i / rate; latency counts from then (no coordinated omission)."""
    free: asyncio.Queue = asyncio.Queue()
    for _ in range(pool):
        free.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    n = min(len(paths), int(rate * duration))

    async def one(due: float, path: str) -> None:
        nonlocal errors
        reader, writer = await free.get()
        errors += await _request(reader, writer, path) != 200
        latencies.append(time.perf_counter() - due)
        free.put_nowait((reader, writer))

    tasks = []
    for i, path in enumerate(paths[:n]):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(due, path)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    while not free.empty():
        free.get_nowait()[1].close()
    return _summary(latencies, errors, elapsed)


def _summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {"n": len(ms), "errors": errors, "rate": len(ms) / elapsed, "p50": np.percentile(ms, 50),
            "p99": np.percentile(ms, 99), "max": ms.max()}


def _line(name: str, s: dict) -> str:
    return (f"{name:<34} {s['n']:>6} req {s['rate']:>7.0f} req/s  p50 {s['p50']:6.1f} ms  "
            f"p99 {s['p99']:6.1f} ms  max {s['max']:6.1f} ms  errors {s['errors']}")


def wait_ready(port: int, server: subprocess.Popen, timeout: float) -> None:
    async def probe() -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        status = await _request(reader, writer, "/api/info")
        writer.close()
        return status == 200

    deadline = time.monotonic() + timeout
    while not asyncio.run(probe()):
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--songs", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, help="cache of the simulated run (default ~/.cache/sonicrec)")
    parser.add_argument("--requests", type=int, default=5000, help="requests per phase (5000)")
    parser.add_argument("--duration", type=float, default=30.0, help="longest phase, seconds (30)")
    parser.add_argument("--connections", type=int, default=8, help="closed-loop connections (8)")
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop requests per second (500)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (1)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    work = args.work or Path.home() / ".cache" / "sonicrec" / f"bench-serve-{args.songs}"
    run = build_run(work, args.songs)
    factors = Factors.load(run.factors)
    rng = np.random.default_rng(1)
    queries = factors.song_ids[rng.integers(0, len(factors.song_ids), 2 * args.requests + 500)].tolist()
    similar = [f"/api/similar?id={s}&n=10" for s in queries]

    server = subprocess.Popen(
        [sys.executable, "-m", "sonicrec.cli", "-q", "serve", str(run.root), "--port", str(args.port),
         "--workers", str(args.workers)],
        stdout=subprocess.DEVNULL,
    )
    try:
        t0 = time.perf_counter()
        wait_ready(args.port, server, timeout=600)
        print(f"server ready in {time.perf_counter() - t0:.1f} s ({len(factors.song_ids):,} songs, "
              f"{int((factors.split != 'train').sum()):,} cold)")
        asyncio.run(closed_loop(args.port, similar[:500], args.connections, args.duration))  # warm-up
        load = os.getloadavg()[0]
        info = asyncio.run(closed_loop(args.port, ["/api/info"] * args.requests, args.connections,
                                       args.duration))
        top = asyncio.run(closed_loop(args.port, similar[500 : 500 + args.requests], args.connections,
                                      args.duration))
        steady = asyncio.run(open_loop(args.port, similar[500 + args.requests :], args.rate, args.duration))
    finally:
        server.send_signal(signal.SIGINT)  # a clean shutdown, as Ctrl-C
        server.wait(30)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} "
          f"before the runs; {args.workers} server process(es) and this client on the same cores")
    print(_line("reference: /api/info, closed loop", info))
    print(_line(f"/api/similar, closed loop ({args.connections} conn)", top))
    print(_line(f"/api/similar, open loop {args.rate:.0f}/s", steady))
    print(f"similar / info throughput: {top['rate'] / info['rate']:.2f}")


if __name__ == "__main__":
    main()
