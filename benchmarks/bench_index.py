"""Nearest-neighbour index benchmark: HNSW (voyager) against exact numpy search, in the same run.

For each catalog size it builds both backends of :class:`sonicrec.index.VectorIndex` over simulated
song factors, times single similar-songs queries (one query at a time, as the CLI and the server
ask them) and measures recall@10 of HNSW against the exact answer.

Simulated factors: ``--data clustered`` (default) draws songs around 2,000 "genre" centres with a
decaying spectrum, like real WMF factors; ``--data gaussian`` is isotropic noise, the hardest case
for HNSW (the intrinsic dimension is the full 40).

    python benchmarks/bench_index.py                       # 100k songs
    python benchmarks/bench_index.py --sizes 100000 1000000 --ef 50 100 200
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from sonicrec.config import IndexConfig
from sonicrec.factors import unit_rows
from sonicrec.index import VectorIndex


def simulated_factors(n: int, dims: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """(n, dims) float32 simulated song factors."""
    if kind == "gaussian":
        return rng.standard_normal((n, dims), dtype=np.float32)
    scale = 1.0 / np.sqrt(1.0 + np.arange(dims, dtype=np.float32))  # decaying spectrum
    centres = rng.standard_normal((2000, dims), dtype=np.float32) * scale
    members = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, dims), dtype=np.float32) * (0.5 * scale)
    return centres[members] + noise


def exact_top(base_unit: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) row numbers of the true cosine top-k, computed in blocks of queries."""
    out = np.empty((len(queries), k), dtype=np.int64)
    q_unit = unit_rows(queries)
    for lo in range(0, len(queries), 64):
        scores = q_unit[lo : lo + 64] @ base_unit.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[lo : lo + 64] = np.take_along_axis(top, order, axis=1)
    return out


def time_queries(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-query latencies (s) and result ids, one query at a time."""
    latencies = np.empty(len(queries))
    results = []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        ids, _ = index.query(q, k)
        latencies[i] = time.perf_counter() - t0
        results.append(ids)
    return latencies, results


def run_size(n: int, args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    base = simulated_factors(n, args.dims, args.data, rng)
    queries = simulated_factors(args.queries, args.dims, args.data, rng)
    ids = np.char.add("s", np.arange(n).astype(str))
    truth = ids[exact_top(unit_rows(base), queries, args.k)]

    rows = []
    t0 = time.perf_counter()
    exact = VectorIndex.build(ids, base, metric="cosine", backend="exact")
    exact_build = time.perf_counter() - t0
    lat, _ = time_queries(exact, queries[: args.exact_queries], args.k)
    exact_median = float(np.median(lat))
    rows.append(dict(n=n, backend="exact numpy", params="-", build_s=exact_build,
                     median_ms=exact_median * 1e3, p99_ms=np.quantile(lat, 0.99) * 1e3,
                     qps=1 / lat.mean(), recall=1.0, speedup=1.0))
    del exact

    cfg = IndexConfig(exact_below=0, m=args.m, ef_construction=args.ef_construction, seed=args.seed)
    t0 = time.perf_counter()
    ann = VectorIndex.build(ids, base, metric="cosine", backend="voyager", config=cfg, show_progress=True)
    ann_build = time.perf_counter() - t0
    for ef in args.ef:
        ann.config = IndexConfig(exact_below=0, m=args.m, ef_construction=args.ef_construction, ef=ef)
        time_queries(ann, queries[:50], args.k)  # warm-up
        lat, found = time_queries(ann, queries, args.k)
        recall = np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth, strict=True)])
        rows.append(dict(n=n, backend="voyager HNSW", params=f"M={args.m} efC={args.ef_construction} ef={ef}",
                         build_s=ann_build, median_ms=np.median(lat) * 1e3,
                         p99_ms=np.quantile(lat, 0.99) * 1e3, qps=1 / lat.mean(), recall=recall,
                         speedup=exact_median / np.median(lat)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000],
                        help="catalog sizes (add 1000000 for the 1M-song figure; ~3 min build on 2 cores)")
    parser.add_argument("--dims", type=int, default=40)
    parser.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    parser.add_argument("--queries", type=int, default=1000, help="timed HNSW queries")
    parser.add_argument("--exact-queries", type=int, default=100, help="timed exact queries")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--m", type=int, default=IndexConfig().m)
    parser.add_argument("--ef-construction", type=int, default=IndexConfig().ef_construction)
    parser.add_argument("--ef", type=int, nargs="+", default=[IndexConfig().ef])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.dims}-d {args.data} simulated factors, k={args.k}, cosine, one query at a time\n")
    print("| songs | backend | parameters | build s | median ms | p99 ms | queries/s | recall@10 "
          "| speed-up vs exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for r in run_size(n, args):
            print(f"| {r['n']:,} | {r['backend']} | {r['params']} | {r['build_s']:.1f} | "
                  f"{r['median_ms']:.3f} | {r['p99_ms']:.3f} | {r['qps']:,.0f} | {r['recall']:.3f} | "
                  f"{r['speedup']:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
