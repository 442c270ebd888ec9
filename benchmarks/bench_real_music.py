"""Real-music check: how a run's audio models behave on real recordings they were never trained on.

    python benchmarks/bench_real_music.py RUN TRACKS.csv [--models cnn-mse ...] [--cache DIR]

``TRACKS.csv`` has columns ``track_id,path`` and a group column (``group`` or ``game``: tracks of
one group share composer, production and style, e.g. one game's soundtrack; see
``../shared/scripts/get_dev_music.sh``). Files that cannot be decoded are skipped and counted.
For every content model of the run (``RUN/model/*/checkpoint.pt``), for the per-band mean/std of
the log-mel (2 x n_mels numbers, z-scored over the tracks) and for random vectors it prints:

* **same@10**: the share of a track's 10 nearest other tracks (cosine) from its own group, with its
  standard error over tracks, the chance level (a random neighbour: (n_group - 1) / (N - 1)) and the
  difference to the log-mel mean/std baseline with the paired standard error of that difference;
* **cos**: mean pairwise cosine of the vectors (0 for isotropic ones; 1 when all collapse together);
* **PR**: participation ratio of the covariance of the unit vectors, (sum l)^2 / sum l^2 over its
  eigenvalues l (the number of directions the tracks spread over; at most the dimension);
* **unfamiliar**: the share of tracks the model's familiarity score flags (``sonicrec.familiarity``;
  an adapted model's is with the recordings it was adapted to);
* through ``Recommender.similar`` / ``audience`` on the files themselves (models of the run only):
  the share of the top-10 lists holding the single most frequent song (user), and how many distinct
  songs (users) all lists return, and the same for the raw scores.

``--adapt`` adds each model adapted to the recordings (:mod:`sonicrec.adapt`, which sees audio only,
never the groups): "adapted to the other half" splits the groups in two halves, adapts on one half
and measures the other, both ways (as a catalogue adapted to would meet new albums; every figure is
then measured within a half, so the baseline is given within halves too); "adapted (all)" adapts
on the very tracks it measures.

A second table gives the same list statistics for the run's own test songs (simulated listeners),
queried by track id, for reference. Log-mel spectrograms are cached in ``--cache`` (keyed by the
file list and the front-end settings), so a rerun with another model does not decode again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from sonicrec.adapt import MIN_TRACKS, adapt_predictor, training_predictions
from sonicrec.config import AudioConfig
from sonicrec.factors import Factors, Predictions, unit_rows
from sonicrec.features import extract_track
from sonicrec.predict import Predictor
from sonicrec.recommend import Recommender
from sonicrec.rundir import CHECKPOINT_FILE, RunDir

K = 10


def read_tracks(path: Path) -> pd.DataFrame:
    """track_id, path, group (from a ``group`` or ``game`` column) of a tracks CSV."""
    frame = pd.read_csv(path, dtype=str)
    group = next((c for c in ("group", "game") if c in frame.columns), None)
    if group is None or not {"track_id", "path"} <= set(frame.columns):
        raise SystemExit(f"{path}: need columns track_id, path and group (or game): {list(frame.columns)}")
    return frame.rename(columns={group: "group"})[["track_id", "path", "group"]]


def decode(tracks: pd.DataFrame, cfg: AudioConfig, cache: Path | None) -> tuple[pd.DataFrame, np.ndarray]:
    """The decodable tracks and their log-mels, float16 (N, n_mels, n_frames); prints what was skipped."""
    key = hashlib.blake2b(
        json.dumps([tracks.to_numpy().tolist(), repr(cfg)]).encode(), digest_size=8
    ).hexdigest()
    cached = cache / f"real-music-{key}.npz" if cache else None
    if cached is not None and cached.exists():
        data = np.load(cached)
        return tracks[tracks.track_id.isin(data["track_ids"])].reset_index(drop=True), data["logmels"]
    started = time.perf_counter()
    results = [extract_track(t.track_id, t.path, cfg) for t in tracks.itertuples()]
    ok = np.array([r.error is None for r in results])
    reasons = Counter(Path(t.path).suffix.lower() for t, r in zip(tracks.itertuples(), results, strict=True)
                      if r.error is not None)
    print(f"decoded {ok.sum()} of {len(tracks)} tracks in {time.perf_counter() - started:.0f} s; "
          f"skipped {len(tracks) - ok.sum()} undecodable ({dict(reasons) or 'none'})")
    for r in results:
        if r.error is not None:
            print(f"  skipped: {r.error[:160]}")
    kept = tracks[ok].reset_index(drop=True)
    logmels = np.stack([r.features for r in results if r.error is None])
    if cached is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(cached, track_ids=kept.track_id.to_numpy(str), logmels=logmels)
    return kept, logmels


def same_group_share(vectors: np.ndarray, groups: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Per track: share of its k cosine-nearest other tracks in its group, and the chance level, (N,) each."""
    unit = unit_rows(vectors.astype(np.float64))
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    share = (groups[nearest] == groups[:, None]).mean(axis=1)
    sizes = pd.Series(groups).map(pd.Series(groups).value_counts()).to_numpy()
    return share, (sizes - 1) / (len(groups) - 1)


def spread(vectors: np.ndarray) -> tuple[float, float]:
    """Mean pairwise cosine and participation ratio of the covariance of the unit vectors (N, d)."""
    unit = unit_rows(vectors.astype(np.float64))
    n = len(unit)
    total = unit.sum(axis=0)
    mean_cos = (total @ total - n) / (n * (n - 1))
    eig = np.clip(np.linalg.eigvalsh(np.cov(unit, rowvar=False)), 0, None)
    return float(mean_cos), float(eig.sum() ** 2 / (eig**2).sum())


def list_stats(lists: list[np.ndarray]) -> tuple[float, int]:
    """Share of lists holding the most frequent item, and the number of distinct items."""
    counts = Counter(item for ids in lists for item in set(ids.tolist()))
    return max(counts.values()) / len(lists), len(counts)


class FileVectors:
    """A predictor for ``Recommender``: factors of the files already computed, by path."""

    def __init__(self, paths: list[str], factors: np.ndarray) -> None:
        self.rows = {str(Path(p)): i for i, p in enumerate(paths)}
        self.factors = factors

    def predict_files(self, paths: list[Path]) -> np.ndarray:
        return self.factors[[self.rows[str(p)] for p in paths]]


def recommender_stats(rec: Recommender, queries: list[str], *, skip_query: bool) -> dict[str, float]:
    """List statistics of ``similar`` and ``audience`` for each query, default and raw."""
    out = {}
    for label, options in {"": {}, "raw ": {"raw": True}}.items():
        songs = [rec.similar(q, K + skip_query, **options).ids[int(skip_query):] for q in queries]
        users = [rec.audience(q, K, **options).ids for q in queries]
        (s_top, s_distinct), (u_top, u_distinct) = list_stats(songs), list_stats(users)
        out |= {f"{label}top song": s_top, f"{label}songs": s_distinct,
                f"{label}top user": u_top, f"{label}users": u_distinct}
    return out


def formatted_stats(stats: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.1%}" if "top" in k else f"{v:.0f}" for k, v in stats.items()}


def markdown(rows: list[dict[str, str]]) -> str:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def halves(groups: np.ndarray) -> list[np.ndarray]:
    """Track indices of two halves of the groups (alternate groups in sorted order)."""
    names = np.unique(groups)
    return [np.flatnonzero(np.isin(groups, names[i::2])) for i in (0, 1)]


def adapted_parts(
    run: RunDir, name: str, predictor: Predictor, logmels: np.ndarray, groups: np.ndarray
) -> tuple[dict[str, list[tuple[np.ndarray, np.ndarray]]], dict[str, str]]:
    """(track indices, factors) of ``predictor`` within halves, adapted to the other half's tracks,
    and adapted to all; and the share of tracks the adapted models flag unfamiliar."""
    reference = training_predictions(run, name)
    parts = halves(groups)
    plain = [(part, predictor.predict_logmel(logmels[part])) for part in parts]
    crossed, flagged = [], 0
    for part, other in zip(parts, parts[::-1], strict=True):
        factors, scores = adapt_predictor(predictor, logmels[other], reference).assess_logmel(logmels[part])
        crossed.append((part, factors))
        flagged += int((~scores.familiar).sum())
    every, scores = adapt_predictor(predictor, logmels, reference).assess_logmel(logmels)
    crossed_name, every_name = f"{name} adapted to the other half", f"{name} adapted (all)"
    familiar = {crossed_name: f"{flagged / len(logmels):.1%}",
                every_name: f"{1 - scores.familiar.mean():.1%}"}
    return {f"{name} within halves": plain, crossed_name: crossed,
            every_name: [(np.arange(len(logmels)), every)]}, familiar


def measure(
    run: RunDir, predictors: dict[str, Predictor], tracks: pd.DataFrame, logmels: np.ndarray, *,
    seed: int = 0, adapt: bool = False,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The rows of both tables (module docstring): real recordings, and the run's own test songs.

    A row's vectors come in parts, (track indices, vectors) each: neighbours, spread and lists are
    measured within a part, and averaged over parts (same@10 over tracks); its difference to the
    log-mel baseline pairs it with the baseline measured within the same parts.
    """
    groups = tracks.group.to_numpy(str)
    paths = tracks.path.to_numpy(str)
    lm = logmels.astype(np.float32)
    stats = np.concatenate([lm.mean(axis=2), lm.std(axis=2)], axis=1)
    baseline = (stats - stats.mean(0)) / np.maximum(stats.std(0), 1e-6)
    whole = np.arange(len(tracks))
    factors = Factors.load(run.factors)
    rows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
        "log-mel mean/std": [(whole, baseline)],
        "random": [(whole, np.random.default_rng(seed).standard_normal((len(tracks), factors.n_factors)))],
    }
    if adapt:
        parts = halves(groups)
        smallest = min(len(part) for part in parts)
        if smallest < MIN_TRACKS:
            print(f"--adapt left out: a half of the groups has {smallest} tracks; it needs {MIN_TRACKS}")
            adapt = False
        else:
            rows["log-mel mean/std within halves"] = [(part, baseline[part]) for part in parts]
    familiar, sources = {}, {}
    for name, predictor in predictors.items():
        vectors, scores = predictor.assess_logmel(logmels)
        rows[name], sources[name] = [(whole, vectors)], name
        familiar[name] = "n/a" if scores is None else f"{1 - scores.familiar.mean():.1%}"
        if adapt:
            adapted, adapted_familiar = adapted_parts(run, name, predictor, logmels, groups)
            rows |= adapted
            familiar |= adapted_familiar
            sources |= dict.fromkeys(adapted, name)

    def shares(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [same_group_share(v, groups[index]) for index, v in parts]
        return np.concatenate([s for s, _ in pairs]), np.concatenate([c for _, c in pairs])

    out, demo_rows = [], []
    for name, parts in rows.items():
        share, chance = shares(parts)
        base = shares([(index, baseline[index]) for index, _ in parts])[0]  # within the same parts
        diff, n = share - base, len(share)
        mean_cos, pr = np.mean([spread(v) for _, v in parts], axis=0)
        row = {
            "vectors": name,
            "same@10": f"{share.mean():.3f} ± {share.std(ddof=1) / np.sqrt(n):.3f}",
            "chance": f"{chance.mean():.3f}",
            "vs log-mel": f"{diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(n):.3f}",
            "cos": f"{mean_cos:.3f}",
            "PR": f"{pr:.1f}",
        }
        if name in sources:
            row["unfamiliar"] = familiar.get(name, "")
            lists = []
            for index, v in parts:
                queries = paths[index].tolist()
                rec = Recommender.load(run.root, sources[name], predictor=FileVectors(queries, v))
                lists.append(recommender_stats(rec, queries, skip_query=False))
            row |= formatted_stats({k: float(np.mean([s[k] for s in lists])) for k in lists[0]})
            if name in predictors:
                demo_rows.append(_test_song_row(run, name, predictors[name], factors, rec))
        out.append(row)
    return out, demo_rows


def _test_song_row(run: RunDir, name: str, predictor: Predictor, factors: Factors, rec: Recommender) -> dict:
    predictions = Predictions.load(run.prediction(name), n_factors=factors.n_factors)
    predicted_ids, predicted = predictions.song_ids, predictions.factors
    is_test = np.isin(predicted_ids, factors.songs("test"))
    test = predicted_ids[is_test].tolist()
    mean_cos, pr = spread(predicted[is_test])
    row = {"model": name, "test songs": str(len(test)), "cos": f"{mean_cos:.3f}", "PR": f"{pr:.1f}"}
    if predictor.familiarity is not None:
        from sonicrec.features import FeatureStore

        _, scores = predictor.assess_logmel(FeatureStore(run.features).get_many(test))
        row["unfamiliar"] = f"{1 - scores.familiar.mean():.1%}"
    return row | formatted_stats(recommender_stats(rec, test, skip_query=True))


def check_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments every real-music check takes: RUN TRACKS.csv [--models ...] [--cache DIR]."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("tracks", type=Path)
    parser.add_argument("--models", nargs="*", help="models of the run (default: every checkpoint)")
    parser.add_argument("--cache", type=Path, help="folder for the decoded log-mels")
    return parser


def model_names(run: RunDir, models: list[str] | None) -> list[str]:
    """``models``, or every model of the run with a checkpoint."""
    return models or sorted(p.parent.name for p in run.model.glob(f"*/{CHECKPOINT_FILE}"))


def main() -> None:
    parser = check_arguments(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapt", action="store_true", help="also each model adapted to the recordings")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = RunDir(args.run)
    names = model_names(run, args.models)
    predictors = {name: Predictor.load(run.checkpoint(name)) for name in names}
    audio_cfg = next(iter(predictors.values())).config.audio if predictors else AudioConfig()
    tracks, logmels = decode(read_tracks(args.tracks), audio_cfg, args.cache)
    print(f"{len(tracks)} tracks in {tracks.group.nunique()} groups; run {run.root}; "
          f"load {os.getloadavg()[0]:.1f}")
    rows, demo_rows = measure(run, predictors, tracks, logmels, seed=args.seed, adapt=args.adapt)
    print("\nReal recordings (same@10 ± SE over tracks; vs log-mel: paired difference ± its SE; unfamiliar: "
          "share flagged by the familiarity score)\n")
    print(markdown(rows))
    if demo_rows:
        print("\nThe run's own test songs (simulated listeners), queried by track id\n")
        print(markdown(demo_rows))


if __name__ == "__main__":
    main()
