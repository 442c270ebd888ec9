"""WMF benchmark: implicit's ALS against Spark's (local mode) on the same simulated play counts.

The play counts are SIMULATED, shaped like the Echo Nest Taste Profile (48M triplets, 1M users,
380k songs) scaled to a 2-core, 24 GB machine: ``--scale 1`` is 100k users x 50k songs x 5M
(user, song) pairs; the default ``--scale 0.1`` (10k x 5k x 500k) keeps the run near a few
minutes. Users have lognormal activity and a taste for 1-3 of 50 genres; songs have Zipf-like
popularity within their genre; a pair's count is a sum of geometric repeats.

20% of the pairs are held out; each engine fits WMF on the rest in its own process (so peak
memory is that engine's alone: Python process + Spark's JVM), and the factors are ranked against
the held-out pairs (precision@50 and mAP@50 of implicit.evaluation, on up to ``--eval-users``
users), with popularity as the floor. Times are reported as ratios to implicit's, measured in
the same run.

    python benchmarks/bench_cf.py                     # scale 0.1, both engines
    python benchmarks/bench_cf.py --scale 1           # Taste-Profile-sized for one machine
    python benchmarks/bench_cf.py --engines implicit  # skip Spark
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import sparse

from sonicrec.cf import heldout_ranking_metrics, heldout_split, popularity_metrics
from sonicrec.config import CFConfig


def simulated_plays(n_users: int, n_songs: int, n_pairs: int, seed: int) -> sparse.csr_matrix:
    """(n_users, n_songs) SIMULATED play counts with about ``n_pairs`` stored pairs."""
    rng = np.random.default_rng(seed)
    n_genres = 50
    song_genre = rng.integers(n_genres, size=n_songs)
    popularity = 1.0 / (1.0 + rng.permutation(n_songs)) ** 0.8  # Zipf-like over a random ranking
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    tastes = rng.integers(n_genres, size=(n_users, 3))
    weights = rng.dirichlet(np.full(3, 0.5), size=n_users)

    n_events = int(n_pairs * 1.6)  # many events repeat a pair (popular songs)
    users = rng.choice(n_users, size=n_events, p=activity / activity.sum())
    slot = (rng.random(n_events)[:, None] > np.cumsum(weights[users], axis=1)).sum(axis=1).clip(0, 2)
    genres = tastes[users, slot]
    explore = rng.random(n_events) < 0.1  # 10% of plays ignore taste: popular songs of any genre
    genres[explore] = song_genre[rng.choice(n_songs, size=explore.sum(), p=popularity / popularity.sum())]
    songs = np.empty(n_events, dtype=np.int64)
    for g in range(n_genres):
        members = np.flatnonzero(song_genre == g)
        events = np.flatnonzero(genres == g)
        cumulative = np.cumsum(popularity[members])
        pick = np.searchsorted(cumulative, rng.random(len(events)) * cumulative[-1])
        songs[events] = members[np.minimum(pick, len(members) - 1)]
    counts = rng.geometric(0.4, size=n_events)
    matrix = sparse.csr_matrix((counts, (users, songs)), shape=(n_users, n_songs), dtype=np.int64)
    matrix.sum_duplicates()
    return matrix


def _peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and all its descendants, MiB (Linux /proc)."""
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, StopIteration):
            continue
    return total / 1024


def _fit_child(engine: str, data: str, out: str, cfg_fields: dict, queue) -> None:
    """Fit one engine in a fresh process; report times and peak memory."""
    from sonicrec.cf import fit_wmf
    from sonicrec.spark import session

    cfg = CFConfig(engine=engine, **cfg_fields)
    counts = sparse.load_npz(data).tocsr()
    start = time.perf_counter()
    spark = None
    if engine == "spark":  # start Spark first (kept open by fit_wmf), so startup is timed apart
        spark, _ = session(cfg.spark_master, show_progress=False)
    startup = time.perf_counter() - start
    rss_before = _peak_rss_mib(os.getpid())
    start = time.perf_counter()
    user_factors, song_factors = fit_wmf(counts, cfg, show_progress=False)
    fit_seconds = time.perf_counter() - start
    peak = _peak_rss_mib(os.getpid())
    if spark is not None:
        spark.stop()
    np.savez(out, user_factors=user_factors, song_factors=song_factors)
    queue.put({"startup": startup, "fit": fit_seconds, "peak_mib": peak, "before_mib": rss_before})


def _eval_rows(held: sparse.csr_matrix, n_users: int, seed: int) -> sparse.csr_matrix:
    """Held-out pairs of at most ``n_users`` random users (the rest emptied: not ranked)."""
    if held.shape[0] <= n_users:
        return held
    keep = np.zeros(held.shape[0], dtype=bool)
    keep[np.random.default_rng(seed).choice(held.shape[0], n_users, replace=False)] = True
    return sparse.diags(keep.astype(np.float32)) @ held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1, help="1 = 100k users x 50k songs x 5M pairs")
    parser.add_argument("--engines", nargs="+", default=["implicit", "spark"], choices=["implicit", "spark"])
    parser.add_argument("--factors", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--eval-users", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    n_users, n_songs, n_pairs = (int(x * args.scale) for x in (100_000, 50_000, 5_000_000))
    start = time.perf_counter()
    counts = simulated_plays(n_users, n_songs, n_pairs, args.seed)
    fit, held = heldout_split(counts, fraction=0.2, seed=args.seed)
    held = _eval_rows(held, args.eval_users, args.seed)
    print(f"SIMULATED plays: {n_users:,} users x {n_songs:,} songs, {counts.nnz:,} pairs "
          f"({int(counts.sum()):,} plays), made in {time.perf_counter() - start:.1f} s; "
          f"fit on 80%, ranked on held-out pairs of {int((held.getnnz(axis=1) > 0).sum()):,} users")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    cfg_fields = {"factors": args.factors, "iterations": args.iterations, "seed": args.seed}

    rows = []
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "fit.npz")
        sparse.save_npz(data, fit)
        for engine in args.engines:
            out = str(Path(tmp) / f"{engine}.npz")
            queue = context.Queue()
            child = context.Process(target=_fit_child, args=(engine, data, out, cfg_fields, queue))
            child.start()
            result = queue.get()
            child.join()
            factors = np.load(out)
            start = time.perf_counter()
            metrics = heldout_ranking_metrics(
                factors["user_factors"], factors["song_factors"], fit, held, k=args.k
            )
            result["eval"] = time.perf_counter() - start
            rows.append((engine, result, metrics))
    popularity = popularity_metrics(fit, held, k=args.k)

    reference = next((r["fit"] for e, r, _ in rows if e == "implicit"), None)
    k = args.k
    print(f"\n| engine | fit (s) | fit / implicit | startup (s) | peak RSS (MiB) | P@{k} | mAP@{k} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for engine, r, m in rows:
        ratio = f"{r['fit'] / reference:.1f}" if reference else "-"
        print(f"| {engine} | {r['fit']:.1f} | {ratio} | {r['startup']:.1f} | {r['peak_mib']:,.0f} "
              f"(before fit {r['before_mib']:,.0f}) | {m['precision']:.4f} | {m['map']:.4f} |")
    print(f"| popularity | - | - | - | - | {popularity['precision']:.4f} | {popularity['map']:.4f} |")


if __name__ == "__main__":
    main()
