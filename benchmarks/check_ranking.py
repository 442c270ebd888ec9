"""Check of the learning-to-rank models against cnn-mse on a run (figures in docs/results.md).

For every model named, on the run's cold-start split (``--split``, "valid" to choose settings):
mAP@500, AUC and NDCG@50 (``sonicrec.evaluate.evaluate_models``), the training time from its
metrics.csv, and what the model does to retrieval (``sonicrec.recommend.Recommender``):

- recommend: share of never-played (cold) songs in the top 10 of ``--users`` users drawn at random
  (the catalog's cold share beside it);
- similar: for every song of the split (a cold query), the share of its top-10 lists (query left
  out) holding the single most frequent song, the number of distinct songs in them, and their cold
  share;
- audience: for every song of the split, the share of top-10 audiences holding the single most
  frequent user, and the number of distinct users;

each by default (hubness reduction, warm and cold songs merged by z-score) and with raw scores.

    python benchmarks/check_ranking.py RUN --models cnn-mse cnn-bpr [--split valid] [--users 1000]
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import pandas as pd

from sonicrec.evaluate import evaluate_models
from sonicrec.factors import Factors, Predictions
from sonicrec.interactions import read_play_matrix
from sonicrec.recommend import Recommender
from sonicrec.rundir import RunDir


def hub_share(lists: list[np.ndarray]) -> tuple[float, int]:
    """Share of the lists holding the most frequent item, and the number of distinct items."""
    counts = Counter(item for items in lists for item in set(items.tolist()))
    return counts.most_common(1)[0][1] / len(lists), len(counts)


def retrieval_figures(rec: Recommender, queries: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """The retrieval figures (module docstring), by default and with raw scores."""
    cold = list(rec.cold_ids)
    figures = {}
    for raw in (False, True):
        how = " (raw)" if raw else ""
        top = [rec.recommend(u, 10, raw=raw).ids for u in users]
        figures[f"recommend: cold share{how}"] = np.mean([np.isin(ids, cold).mean() for ids in top])
        similar = [rec.similar(q, 11, raw=raw).ids[1:] for q in queries]
        figures[f"similar: lists with the top song{how}"], figures[f"similar: distinct songs{how}"] = (
            hub_share(similar)
        )
        figures[f"similar: cold share{how}"] = np.mean([np.isin(ids, cold).mean() for ids in similar])
        audiences = [rec.audience(q, 10, raw=raw).ids for q in queries]
        figures[f"audience: lists with the top user{how}"], figures[f"audience: distinct users{how}"] = (
            hub_share(audiences)
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--models", nargs="+", default=["cnn-mse", "cnn-bpr"])
    parser.add_argument("--split", default="test", choices=("test", "valid"))
    parser.add_argument("--users", type=int, default=1000, help="users whose recommendations are counted")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run = RunDir(args.run_dir)
    factors = Factors.load(run.factors)
    plays = read_play_matrix(run.plays, "parquet")
    loaded = {m: Predictions.load(run.prediction(m), n_factors=factors.n_factors) for m in args.models}
    predictions = {m: (p.song_ids, p.factors) for m, p in loaded.items()}
    table = evaluate_models(factors, plays, predictions, split=args.split)
    rows = {r["model"]: r for r in table["models"]}
    users = np.random.default_rng(args.seed).choice(factors.user_ids, args.users, replace=False)
    queries = factors.songs(args.split)
    print(f"{args.split} split: {table['data']}")
    print(f"catalog cold share: {np.mean(factors.split != 'train'):.3f}")
    out = {}
    for model in args.models:
        history = pd.read_csv(run.model / model / "metrics.csv")
        figures = {key: rows[model][key] for key in ("map@500", "auc", "ndcg@50")}
        figures["train seconds"] = history["seconds"].sum()
        figures["epochs (best)"] = f"{len(history)} ({history['valid_loss'].idxmin() + 1})"
        figures.update(retrieval_figures(Recommender.load(run.root, model), queries, users))
        out[model] = figures
    print(f"| figure | {' | '.join(out)} |")
    print(f"|---|{'---:|' * len(out)}")
    for key in next(iter(out.values())):
        cells = [f"{v[key]:.4g}" if isinstance(v[key], float) else str(v[key]) for v in out.values()]
        print(f"| {key} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
