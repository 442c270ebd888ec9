"""Cost of the ranking losses per training step, against MSE and against the CNN itself.

On a SIMULATED world of the demo's size (5,000 users, 960 training songs, ~90 listeners per song,
40 factors), times for a batch of 32 songs: the loss's forward + backward for ``mse``, ``bpr`` and
``softmax`` (``sonicrec.losses``: drawing ``--users`` listeners per song, in-batch scores, the
"played" mask), and the demo CNN's forward + backward on the same batch of log-mels, all in this
process. The ratios say what a ranking loss adds to a training step.

    python benchmarks/bench_losses.py [--users 8] [--repeats 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sonicrec.config import AudioConfig
from sonicrec.factors import unit_rows
from sonicrec.losses import RankingObjective
from sonicrec.model import AudioCNN
from sonicrec.train import MSEObjective

N_USERS, N_SONGS, K, BATCH = 5000, 960, 40, 32


def simulated_objectives(users_per_song: int, seed: int = 0) -> dict[str, object]:
    """MSE, BPR and softmax objectives over SIMULATED factors and listeners (Zipf-like song popularity)."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, N_SONGS + 1) ** 0.8
    counts = np.maximum(1, rng.poisson(90 * N_SONGS * popularity / popularity.sum()))
    listeners = [np.sort(rng.choice(N_USERS, min(c, N_USERS), replace=False)) for c in counts]
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in listeners])])
    user_factors = rng.standard_normal((N_USERS, K)) * 0.3
    objectives: dict[str, object] = {"mse": MSEObjective(unit_rows(rng.standard_normal((N_SONGS, K))))}
    for kind in ("bpr", "softmax"):
        objectives[kind] = RankingObjective(
            user_factors, indptr, np.concatenate(listeners), kind=kind, users_per_song=users_per_song
        )
    return objectives


def seconds_per_call(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8, help="listeners drawn per song (train.rank_users)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    from sonicrec.demo import DEMO_MODEL

    torch.manual_seed(0)
    rows = torch.randperm(N_SONGS)[:BATCH]
    pred = torch.randn(BATCH, K, requires_grad=True)
    timings = {}
    for name, objective in simulated_objectives(args.users).items():

        def step(objective=objective) -> None:
            objective.per_song(pred, rows).mean().backward()

        timings[name] = seconds_per_call(step, args.repeats)
    n_mels = AudioConfig().n_mels
    model = AudioCNN(DEMO_MODEL, n_mels=n_mels, n_factors=K)
    x = torch.randn(BATCH, n_mels, 599)

    def cnn_step() -> None:
        model(x).square().mean().backward()

    cnn = seconds_per_call(cnn_step, max(3, args.repeats // 10))
    threads = torch.get_num_threads()
    print(f"batch {BATCH} songs, {args.users} listeners drawn per song, torch threads {threads}")
    print("| loss | ms per step (loss forward+backward) | / mse | / CNN forward+backward |")
    print("|---|---:|---:|---:|")
    for name, seconds in timings.items():
        print(f"| {name} | {1000 * seconds:.3f} | {seconds / timings['mse']:.1f} | {seconds / cnn:.4f} |")
    print(f"| (CNN, demo model) | {1000 * cnn:.1f} | | 1 |")


if __name__ == "__main__":
    main()
