"""Cold-start evaluation benchmark: mAP@500, AUC, NDCG@k and recall@k of one model on many users.

Times :func:`sonicrec.evaluate.ranking_metrics` (one model: score, sort and locate every user's played
songs) on simulated data shaped like the Taste Profile's held-out songs: Zipf-like song popularity,
negative-binomial test plays per user (mean 5, ~11% of users with none, who are skipped), WMF-like
factors with the popularity in the song norm. The reference, measured in the same process on a
sample of the users, is the floor of any exact method: the score matrix multiply plus a plain
single-threaded row sort; the ratio shows the overhead of the metrics on top of it.

Then the intervals (:func:`sonicrec.evaluate.compare_models`, 1,000 bootstrap resamples of the users
by default) of a table as large as a demo's (8 models: this one's per-user metrics under 8 names) with
7 paired differences, timed against the ranking of one model.

    python benchmarks/bench_evaluate.py                          # 100k users x 20k test songs
    python benchmarks/bench_evaluate.py --users 20000 --songs 5000 --workers 1

The machine may be shared with other processes: absolute times vary, the ratio less so.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np
import scipy.sparse as sp

from sonicrec.evaluate import compare_models, ranking_metrics


def simulated_test_plays(n_users: int, n_songs: int, rng: np.random.Generator) -> sp.csr_matrix:
    """(U, S) binary matrix of simulated plays of the held-out songs."""
    per_user = rng.negative_binomial(1.5, 1.5 / (1.5 + 5.0), size=n_users)
    popularity = 1.0 / (np.arange(n_songs) + 10.0) ** 0.9
    songs = rng.choice(n_songs, size=int(per_user.sum()), p=popularity / popularity.sum())
    users = np.repeat(np.arange(n_users), per_user)
    plays = sp.csr_matrix((np.ones(len(songs), np.float32), (users, songs)), shape=(n_users, n_songs))
    plays.sum_duplicates()
    plays.data[:] = 1.0
    return plays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--songs", type=int, default=20_000)
    parser.add_argument("--factors", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reference-users", type=int, default=3_000)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (intervals)")
    parser.add_argument("--models", type=int, default=8, help="models in the table of intervals")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    relevant = simulated_test_plays(args.users, args.songs, rng)
    user_f = rng.standard_normal((args.users, args.factors), dtype=np.float32)
    norms = rng.lognormal(0.0, 0.5, size=(args.songs, 1)).astype(np.float32)
    song_f = rng.standard_normal((args.songs, args.factors), dtype=np.float32) * norms
    with_plays = int((np.diff(relevant.indptr) > 0).sum())
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"workers={args.workers}"
    )
    print(
        f"simulated: {args.users:,} users x {args.songs:,} test songs x {args.factors} factors; "
        f"{relevant.nnz:,} played pairs; {with_plays:,} users with a play"
    )

    # Reference floor: scores + one plain row sort, single-threaded, on a sample of the users.
    sample = rng.choice(args.users, size=min(args.reference_users, args.users), replace=False)
    start = time.perf_counter()
    for chunk in np.array_split(sample, max(1, len(sample) // 500)):
        np.sort(user_f[chunk] @ song_f.T, axis=1)
    reference = (time.perf_counter() - start) * with_plays / len(sample)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    metrics = ranking_metrics(user_f, song_f, relevant, k=50, workers=args.workers)
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = metrics.summary()
    print(
        f"ranking_metrics: {seconds:.1f} s ({seconds / max(with_plays, 1) * 1e6:.0f} us per user); "
        f"reference (matmul + row sort, 1 thread, extrapolated): {reference:.1f} s; "
        f"ratio {seconds / reference:.2f}"
    )
    print(
        f"peak RSS grew by {(rss_after - rss_before) / 1024:.0f} MiB during ranking; "
        f"mAP@500={summary['map@500']:.5f} AUC={summary['auc']:.4f} "
        f"(chance-level: simulated factors are unrelated to the plays)"
    )

    per_user = {f"model-{i}": metrics for i in range(args.models)}
    pairs = [(f"model-{i}", "model-0") for i in range(1, args.models)]
    start = time.perf_counter()
    compared = compare_models(per_user, pairs, n_resamples=args.resamples, seed=args.seed)
    boot = time.perf_counter() - start
    low, high = compared["interval"]["model-0"]["map@500"]
    print(
        f"intervals ({args.resamples} resamples of {with_plays:,} users, {args.models} models x 4 "
        f"metrics, {len(pairs)} paired differences): {boot:.1f} s, ratio to ranking one model "
        f"{boot / seconds:.2f}; mAP@500 95% interval [{low:.5f}, {high:.5f}]"
    )
    print(f"one model ranked + the intervals of the table: {seconds + boot:.1f} s")


if __name__ == "__main__":
    main()
