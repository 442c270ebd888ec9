"""Scratch check of the SIMULATED listeners (not part of the package; figures in docs/demo-world.md).

Builds a SYNTHETIC track table whose metadata is distributed like the demo world's music21
collections, simulates the default world (DemoConfig: 5,000 users, 250,000 play events), prints
timing and summary statistics, then fits WMF with `implicit` on the plays and asks how well the
song factors predict each metadata attribute (5-fold kNN and logistic regression vs. chance).
A control world with taste_strength=0 (popularity + noise only) must sit at chance.

    OPENBLAS_NUM_THREADS=1 python benchmarks/check_simulated_listeners.py [--catalog RUN/catalog.sqlite]

With --catalog, the tracks are a run's real catalog (its "ok" tracks) instead of the synthetic table.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp
from implicit.als import AlternatingLeastSquares
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from sonicrec.catalog import Catalog
from sonicrec.config import CFConfig
from sonicrec.demo import DemoConfig
from sonicrec.demo.listeners import ATTRIBUTES, ListenerParams, _encode_tracks, simulate_listening

# style -> (share, collections, composers (Zipf-weighted), instrument families, voices, tempo, pitch)
STYLES = {
    "folk song": (0.25, ["essenFolksong"], ["traditional"], ["guitar", "plucked", "reed", "pipe"],
                  (1, 1), (70, 125), (62, 72)),
    "fiddle tune": (0.22, ["ryansMammoth", "oneills1850"], ["traditional", "O'Carolan", "Scott Skinner"],
                    ["strings", "pipe", "reed", "plucked"], (1, 2), (100, 190), (68, 78)),
    "baroque chorale": (0.20, ["bach"], ["J. S. Bach"], ["organ", "choir", "strings", "brass"],
                        (4, 4), (60, 96), (57, 64)),
    "renaissance polyphony": (0.15, ["palestrina", "monteverdi", "josquin"],
                              ["Palestrina", "Monteverdi", "Josquin", "Lassus"], ["choir", "organ", "brass"],
                              (4, 6), (50, 84), (56, 64)),
    "classical": (0.12, ["haydn", "mozart", "beethoven", "schubert"],
                  ["Haydn", "Mozart", "Beethoven", "Schubert"], ["strings", "keyboard", "reed"],
                  (2, 4), (60, 170), (58, 70)),
    "medieval": (0.06, ["trecento", "ciconia", "machaut"], ["anonymous", "Landini", "Ciconia", "Machaut"],
                 ["plucked", "pipe", "choir", "mallet"], (1, 3), (60, 110), (58, 70)),
}


def synthetic_tracks(n: int, seed: int) -> pd.DataFrame:
    """A SYNTHETIC demo-world metadata table (no audio), shaped like the music21 collections."""
    rng = np.random.default_rng(seed)
    names = list(STYLES)
    shares = np.array([STYLES[s][0] for s in names])
    rows = []
    for i, s in enumerate(rng.choice(names, size=n, p=shares / shares.sum())):
        _, colls, composers, families, (v0, v1), (t0, t1), (p0, p1) = STYLES[s]
        zipf = 1 / np.arange(1, len(composers) + 1)
        family_w = 1 / np.arange(1, len(families) + 1) ** 0.7
        modal = s in ("renaissance polyphony", "medieval")
        mode = rng.choice(["major", "minor", "other"], p=[0.25, 0.25, 0.5] if modal else [0.65, 0.33, 0.02])
        rows.append({
            "track_id": f"t{i:05d}", "style": s, "collection": rng.choice(colls),
            "composer": rng.choice(composers, p=zipf / zipf.sum()),
            "instrument_family": rng.choice(families, p=family_w / family_w.sum()),
            "n_voices": int(rng.integers(v0, v1 + 1)), "tempo": float(rng.uniform(t0, t1)),
            "pitch_mean": float(rng.uniform(p0, p1)), "mode": mode,
            "meter": rng.choice(["4/4", "3/4", "6/8", "2/4"]),
        })
    return pd.DataFrame(rows)


def wmf_song_factors(plays: pd.DataFrame, track_ids: np.ndarray, cfg: CFConfig) -> np.ndarray:
    users, u = np.unique(plays["user_id"], return_inverse=True)
    t = pd.Index(track_ids).get_indexer(plays["track_id"])
    conf = 1 + cfg.alpha * np.log1p(plays["count"].to_numpy() / cfg.epsilon)
    ui = sp.csr_matrix((conf.astype(np.float32), (u, t)), shape=(len(users), len(track_ids)))
    model = AlternatingLeastSquares(factors=cfg.factors, regularization=cfg.regularization,
                                    iterations=cfg.iterations, random_state=cfg.seed, num_threads=1)
    model.fit(ui, show_progress=False)
    return np.asarray(model.item_factors)


def attribute_accuracy(factors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    x = factors / np.maximum(np.linalg.norm(factors, axis=1, keepdims=True), 1e-12)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    _, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, np.unique(labels)[counts >= 5])
    x, y = x[keep], labels[keep]
    return {
        "chance": float(np.bincount(np.unique(y, return_inverse=True)[1]).max() / len(y)),
        "knn10": float(cross_val_score(KNeighborsClassifier(10), x, y, cv=folds).mean()),
        "logistic": float(cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=folds).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", help="a run's catalog.sqlite (default: the synthetic table)")
    args = parser.parse_args()
    demo = DemoConfig()
    if args.catalog:
        with Catalog(args.catalog) as catalog:
            tracks = catalog.to_frame().query("status == 'ok'").reset_index(drop=True)
    else:
        tracks = synthetic_tracks(demo.n_tracks, seed=1)
    ids, codes, values = _encode_tracks(tracks)
    worlds = ((ListenerParams(), "default"), (ListenerParams(taste_strength=0.0), "no-taste control"))
    for params, label in worlds:
        t0 = time.perf_counter()
        sim = simulate_listening(
            tracks, n_users=demo.n_users, n_plays=demo.n_plays, seed=demo.seed, params=params
        )
        elapsed = time.perf_counter() - t0
        print(f"== {label}: simulated in {elapsed:.2f} s")
        if label == "default":
            print(json.dumps(sim.summary(), indent=1))
            style = dict(zip(tracks["track_id"], tracks["style"], strict=True))
            plays = sim.plays.assign(style=sim.plays["track_id"].map(style))
            fav = dict(zip(sim.users["user_id"], sim.users["fav_style"], strict=True))
            plays["fav_style"] = plays["user_id"].map(fav)
            total = plays.groupby("style")["count"].sum()
            fans = plays[plays["style"] == plays["fav_style"]].groupby("style")["count"].sum()
            fans_all = plays.groupby("fav_style")["count"].sum()
            table = pd.DataFrame({
                "base": total / total.sum(),
                "fans": fans / fans_all,
                "others": (total - fans) / (plays["count"].sum() - fans_all),
            })
            odds = table / (1 - table)
            table["lift"] = table["fans"] / table["base"]
            table["odds_ratio"] = odds["fans"] / odds["others"]
            print("share of style S in the plays of all users (base), of users whose favourite style")
            print("is S (fans) and of the other users; lift = fans / base:")
            print(table.round(3).to_string())
        t0 = time.perf_counter()
        factors = wmf_song_factors(sim.plays, ids, CFConfig())
        print(f"WMF ({CFConfig().factors} factors) in {time.perf_counter() - t0:.1f} s")
        for a, attr in enumerate(ATTRIBUTES):
            acc = attribute_accuracy(factors, values[a][codes[a]].astype(str))
            print(f"  {attr.name:18s} " + "  ".join(f"{k}={v:.3f}" for k, v in acc.items()))
        # Beyond style: attributes predicted among the tracks of one style only (style held fixed).
        styles = tracks["style"].to_numpy()
        for s in ("fiddle tune", "baroque chorale"):
            inside = styles == s
            if inside.sum() < 50:
                continue
            for a in (3, 4, 6):
                acc = attribute_accuracy(factors[inside], values[a][codes[a]].astype(str)[inside])
                print(f"  within {s!r:17s} {ATTRIBUTES[a].name:18s} "
                      + "  ".join(f"{k}={v:.3f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
