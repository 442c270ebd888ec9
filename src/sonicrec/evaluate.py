"""Cold-start evaluation: rank held-out songs for every user and score the ranking against real plays.

For every user u and every held-out (test) song i the score is ``x_u . y_i``: x_u is the user's WMF
factor (fitted on training songs only) and y_i the song factor a model predicts (from audio, for the
content models). Each user's ranking of the test songs is compared with the test songs the user
actually played (binary relevance, as the paper's preference p_ui).

Definitions, with R_u the user's relevant (played) test songs, n_u = |R_u| and rank(i) the 1-based
position of song i when all test songs are sorted by descending score:

``AP@L`` (L = 500, as in van den Oord et al. 2013 and the MSD challenge)
    ``AP@L(u) = 1 / min(n_u, L) * sum_{i in R_u, rank(i) <= L} P(rank(i))`` with
    ``P(r) = |{j in R_u : rank(j) <= r}| / r``. mAP@L is the mean over evaluated users. When L is at
    least the number of songs it equals sklearn's ``average_precision_score``.
``AUC``
    Per user, the probability that a played song scores higher than an unplayed one (ties count one
    half), i.e. sklearn's ``roc_auc_score``; averaged over users with at least one played and one
    unplayed test song.
``NDCG@k``
    ``sum_{i in R_u, rank(i) <= k} 1 / log2(rank(i) + 1)`` divided by its ideal value
    ``sum_{r=1}^{min(n_u, k)} 1 / log2(r + 1)`` (binary gains; sklearn's ``ndcg_score`` with ``k``).
``recall@k``
    ``|{i in R_u : rank(i) <= k}| / n_u``.

Users without a played test song are skipped (and counted). Tied scores: AUC gives ties one half;
for the rank metrics a played song is placed after every song with a strictly higher score and
before unplayed songs with the same score (optimistic). The baselines here produce no ties.

The work is chunked over users (one chunk holds about ``2**24`` scores) and run on a few threads;
users without a played song are not scored at all. For each user the songs scoring above and below
each played song are counted, by two comparison passes over the row when the user played few songs
and by binary search in the sorted row otherwise. Memory stays bounded for 1M users x 380k songs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sonicrec.bootstrap import DEFAULT_RESAMPLES, LEVEL, bootstrap_means
from sonicrec.errors import DataError
from sonicrec.factors import Factors, Predictions, unit_rows
from sonicrec.interactions import PlayMatrix, marked_simulated, read_play_matrix
from sonicrec.io import atomic_write_json, atomic_write_text
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)

AP_CUTOFF = 500
DEFAULT_K = 50
CHUNK_SCORES = 2**24  # scores held per chunk (64 MiB of float32, plus its sorted copy)
COUNT_DIRECTLY = 16  # up to this many relevant songs, two comparison passes beat sorting the row
RANDOM_DIM = 64  # random baseline: near-independent random rankings per user
PAIRED_BASELINES = ("mfcc-linear", "random")  # every prediction is compared with these, user by user

# Row order of the table; prediction files not named here follow in alphabetical order.
MODEL_ORDER = (
    "random", "popularity", "mfcc-linear", "mfcc-mlp", "cnn-mse", "cnn-wpe", "cnn-bpr", "cnn-softmax",
    "cnn-mse-bpr",
)
UPPER_BOUNDS = ("upper-bound-unit", "upper-bound")
MODEL_NOTES = {
    "random": "chance: random user and song factors (a random ranking per user)",
    "popularity": "warm-start reference, NOT cold-start: ranks test songs by their own test play counts",
    "mfcc-linear": "MFCC bag-of-words + PCA + ridge regression (the paper's linear baseline)",
    "mfcc-mlp": "MFCC bag-of-words + PCA + MLP (the paper's MLP baseline)",
    "cnn-mse": "CNN on log-mel spectrograms, mean squared error",
    "cnn-wpe": "CNN on log-mel spectrograms, weighted prediction error",
    "cnn-bpr": "CNN on log-mel spectrograms, BPR: played songs ranked over unplayed ones, user factors fixed",
    "cnn-softmax": "CNN on log-mel spectrograms, in-batch softmax ranking, user factors fixed",
    "cnn-mse-bpr": "CNN on log-mel spectrograms, mean squared error plus BPR ranking",
    "upper-bound-unit": "true CF factors of the test songs, unit-normalised: the content models' target",
    "upper-bound": "true CF factors of the test songs (popularity in the norm): the upper bound",
}


@dataclass(frozen=True)
class RankingMetrics:
    """Per-user ranking metrics of one model; the arrays cover the evaluated users only.

    Attributes
    ----------
    users : (n,) int64 — rows of the evaluated users in the user-factor matrix
    n_relevant : (n,) int64 — played test songs per evaluated user
    ap, auc, ndcg, recall : (n,) float64 — AP@ap_cutoff, AUC (NaN when every song is relevant),
        NDCG@k and recall@k per user
    """

    users: np.ndarray
    n_relevant: np.ndarray
    ap: np.ndarray
    auc: np.ndarray
    ndcg: np.ndarray
    recall: np.ndarray
    k: int
    ap_cutoff: int
    n_songs: int
    n_skipped: int

    def summary(self) -> dict[str, float | int]:
        """Means over users, keyed ``map@500``, ``auc``, ``ndcg@k``, ``recall@k`` and counts."""
        auc_defined = ~np.isnan(self.auc)
        return {
            f"map@{self.ap_cutoff}": _mean(self.ap),
            "auc": _mean(self.auc[auc_defined]),
            f"ndcg@{self.k}": _mean(self.ndcg),
            f"recall@{self.k}": _mean(self.recall),
            "n_users": int(len(self.users)),
            "n_users_auc": int(auc_defined.sum()),
            "n_users_skipped": int(self.n_skipped),
        }


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def ranking_metrics(
    user_factors: np.ndarray,
    song_factors: np.ndarray,
    relevant: sp.csr_matrix,
    *,
    k: int = DEFAULT_K,
    ap_cutoff: int = AP_CUTOFF,
    chunk_size: int | None = None,
    workers: int | None = None,
    show_progress: bool = False,
) -> RankingMetrics:
    """Rank every song for every user by ``user_factors @ song_factors.T`` and score the rankings.

    Parameters
    ----------
    user_factors : (U, f) float
    song_factors : (S, f) float
    relevant : (U, S) sparse; nonzero entries are the songs each user played
    k : cutoff of NDCG@k and recall@k
    ap_cutoff : cutoff L of AP@L
    chunk_size : users scored at once; None holds about 2**24 scores per chunk
    workers : threads (numpy's comparisons and sorts release the GIL); None = min(4, CPU count)
    """
    user_factors, song_factors, relevant = _checked_inputs(
        user_factors, song_factors, relevant, k=k, ap_cutoff=ap_cutoff
    )
    n_songs = song_factors.shape[0]
    n_rel_all = np.diff(relevant.indptr)
    users = np.flatnonzero(n_rel_all).astype(np.int64)
    chunk_size = chunk_size or max(1, CHUNK_SCORES // max(n_songs, 1))
    # Discounts for NDCG: idcg[m] is the ideal DCG of m relevant songs (m <= k).
    idcg = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])

    def run_chunk(rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return _chunk_metrics(
            user_factors[rows], song_factors, relevant[rows], k=k, ap_cutoff=ap_cutoff, idcg=idcg
        )

    ap, auc, ndcg, recall = _over_chunks(
        run_chunk, [users[i : i + chunk_size] for i in range(0, len(users), chunk_size)],
        workers=workers or min(4, os.cpu_count() or 1), show_progress=show_progress,
    )
    return RankingMetrics(
        users=users,
        n_relevant=n_rel_all[users].astype(np.int64),
        ap=ap,
        auc=auc,
        ndcg=ndcg,
        recall=recall,
        k=k,
        ap_cutoff=ap_cutoff,
        n_songs=n_songs,
        n_skipped=int(user_factors.shape[0] - len(users)),
    )


def _checked_inputs(
    user_factors: np.ndarray, song_factors: np.ndarray, relevant: sp.csr_matrix, *, k: int, ap_cutoff: int
) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """The inputs of :func:`ranking_metrics` checked and as it computes on them: contiguous float32
    factors (U, f) and (S, f), and a (U, S) float32 CSR matrix without duplicates or stored zeros."""
    user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
    song_factors = np.ascontiguousarray(song_factors, dtype=np.float32)
    if user_factors.shape[1] != song_factors.shape[1]:
        raise DataError(
            f"user factors have {user_factors.shape[1]} dimensions, song factors {song_factors.shape[1]}"
        )
    if not (np.isfinite(user_factors).all() and np.isfinite(song_factors).all()):
        raise DataError("factors contain NaN or infinite values: re-run the stage that wrote them")
    if k < 1 or ap_cutoff < 1:
        raise ValueError("k and ap_cutoff must be >= 1")
    relevant = sp.csr_matrix(relevant, dtype=np.float32)
    expected = (user_factors.shape[0], song_factors.shape[0])
    if relevant.shape != expected:
        raise DataError(f"relevance matrix is {relevant.shape}, expected {expected}")
    relevant.sum_duplicates()
    relevant.eliminate_zeros()
    return user_factors, song_factors, relevant


def _over_chunks(
    run_chunk: Callable[[np.ndarray], tuple[np.ndarray, ...]],
    chunks: list[np.ndarray],
    *,
    workers: int,
    show_progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four (n,) metric arrays of every chunk of users, computed on ``workers`` threads and
    concatenated in the order of the chunks."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(
            tqdm(
                pool.map(run_chunk, chunks),
                total=len(chunks),
                desc="ranking",
                unit="chunk",
                disable=not show_progress,
            )
        )
    ap, auc, ndcg, recall = (
        np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(4)
    )
    return ap, auc, ndcg, recall


def _chunk_metrics(
    user_factors: np.ndarray,
    song_factors: np.ndarray,
    relevant: sp.csr_matrix,
    *,
    k: int,
    ap_cutoff: int,
    idcg: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Metrics of one chunk of users that all have >= 1 relevant song. Returns four (B,) arrays."""
    n_songs = song_factors.shape[0]
    scores = user_factors @ song_factors.T  # (B, S)
    indptr, indices = relevant.indptr, relevant.indices
    n_rel = np.diff(indptr)  # (B,)
    rows = np.repeat(np.arange(len(n_rel)), n_rel)  # (nnz,) user of each relevant pair
    rel_scores = scores[rows, indices]  # (nnz,)
    # Songs strictly below / above each relevant score in its user's row: counted directly for
    # users with few relevant songs, by binary search in the sorted row for the others.
    below = np.empty(len(rows), dtype=np.int64)
    above = np.empty(len(rows), dtype=np.int64)
    for r in range(len(n_rel)):
        seg = slice(indptr[r], indptr[r + 1])
        row, values = scores[r], rel_scores[seg]
        if len(values) <= COUNT_DIRECTLY:
            below[seg] = np.count_nonzero(row < values[:, None], axis=1)
            above[seg] = np.count_nonzero(row > values[:, None], axis=1)
        else:
            ordered = np.sort(row)
            below[seg] = np.searchsorted(ordered, values, side="left")
            above[seg] = n_songs - np.searchsorted(ordered, values, side="right")
    tied = n_songs - below - above  # includes the song itself

    # AUC by the Mann-Whitney statistic with mid-ranks (ties count one half).
    midrank = below + (tied + 1) / 2.0
    n_neg = n_songs - n_rel
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (np.bincount(rows, midrank, len(n_rel)) - n_rel * (n_rel + 1) / 2.0) / (n_rel * n_neg)
    auc[n_neg == 0] = np.nan

    # Rank positions: relevant songs of a user in descending score order; j-th of them (1-based)
    # sits at position j + max_{i <= j}(above_i + 1 - i), which keeps tied relevant songs consecutive.
    order = np.lexsort((above, rows))
    rows_o, above_o = rows[order], above[order]
    j = np.arange(len(rows_o)) - indptr[:-1][rows_o] + 1
    big = 4 * (n_songs + 1)  # separates users in one running maximum
    offset = rows_o.astype(np.int64) * big
    position = j + np.maximum.accumulate(above_o + 1 - j + offset) - offset

    in_ap = position <= ap_cutoff
    ap = np.bincount(rows_o[in_ap], j[in_ap] / position[in_ap], len(n_rel)) / np.minimum(n_rel, ap_cutoff)
    in_k = position <= k
    dcg = np.bincount(rows_o[in_k], 1.0 / np.log2(position[in_k] + 1.0), len(n_rel))
    ndcg = dcg / idcg[np.minimum(n_rel, k)]
    recall = np.bincount(rows_o[in_k], minlength=len(n_rel)) / n_rel
    return ap, auc, ndcg, recall


# --- data of one split ----------------------------------------------------------------------------


def relevance_matrix(
    plays: PlayMatrix, user_ids: np.ndarray, song_ids: np.ndarray
) -> tuple[sp.csr_matrix, int]:
    """Binary (U, S) float32 matrix of which of ``user_ids`` played which of ``song_ids``.

    Returns the matrix and the number of distinct users who played one of the songs but have no
    user factor (they cannot be scored and are left out).
    """
    listeners = plays.user_ids[plays.aligned(song_ids=song_ids).getnnz(axis=1) > 0]
    n_unknown = int(np.count_nonzero(~np.isin(listeners, np.asarray(user_ids).astype(str))))
    return plays.played(user_ids, song_ids), n_unknown


# --- the comparison of models ---------------------------------------------------------------------


def evaluate_models(
    factors: Factors,
    plays: PlayMatrix,
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    split: str = "test",
    k: int = DEFAULT_K,
    ap_cutoff: int = AP_CUTOFF,
    seed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES,
    show_progress: bool = False,
) -> dict:
    """Compare predicted song factors, the baselines and the upper bound on one song split.

    Parameters
    ----------
    factors : WMF factors with the split; user factors score every model
    plays : the run's play counts; plays of the split's songs are the ground truth
    predictions : name -> (song_ids (S,) str, factors (S, f)); e.g. mfcc-linear, cnn-mse
    seed : seed of the random baseline, the popularity tie-break and the bootstrap
    n_resamples : bootstrap resamples of the users for the intervals; 0 = no intervals

    Returns
    -------
    dict with ``data`` (users, songs, plays evaluated), ``models`` (one row per model, with the
    95% ``interval`` of every metric), ``paired`` (each prediction minus mfcc-linear and minus
    random on the same users) and ``bootstrap`` (how the intervals were made; see
    :func:`compare_models`). Every model ranks the same songs: the split's songs present in every
    predictions file.
    """
    split_songs = factors.songs(split)
    songs = _songs_of_every_model(split_songs, predictions, split=split)
    relevant, n_unknown_users = relevance_matrix(plays, factors.user_ids, songs)
    counts = np.asarray(plays.aligned(song_ids=songs).sum(axis=0)).ravel()  # (S,) plays per song
    candidates = _candidate_factors(factors, songs, counts, predictions, seed=seed)
    n_listeners = int(np.count_nonzero(np.diff(relevant.indptr)))
    results, per_user = [], {}
    for name in _ordered(candidates):
        log.info("evaluating %s: %d users x %d %s songs", name, n_listeners, len(songs), split)
        user_f, song_f = candidates[name]
        per_user[name] = ranking_metrics(
            user_f, song_f, relevant, k=k, ap_cutoff=ap_cutoff, show_progress=show_progress
        )
        results.append({"model": name, **per_user[name].summary(), "note": MODEL_NOTES.get(name, "")})
    summary = results[-1]
    comparisons = [
        (name, base) for name in predictions for base in PAIRED_BASELINES if base != name
    ]
    intervals = compare_models(per_user, comparisons, n_resamples=n_resamples, seed=seed)
    for row in results:
        row["interval"] = intervals["interval"].get(row["model"], {})
    return {
        "split": split,
        "k": k,
        "ap_cutoff": ap_cutoff,
        "seed": seed,
        "bootstrap": intervals["bootstrap"],
        "paired": intervals["paired"],
        "data": {
            "n_users": summary["n_users"],
            "n_users_skipped_no_plays": summary["n_users_skipped"],
            "n_users_without_factors": n_unknown_users,
            "n_songs": int(len(songs)),
            "n_songs_left_out": int(len(split_songs) - len(songs)),
            "n_user_song_pairs": int(relevant.nnz),
            "n_plays": int(counts.sum()),
        },
        "models": results,
    }


def _songs_of_every_model(
    split_songs: np.ndarray, predictions: Mapping[str, tuple[np.ndarray, np.ndarray]], *, split: str
) -> np.ndarray:
    """The split's songs (S,) that every predictions file covers, in the split's order; warns of the
    songs a model lacks."""
    if len(split_songs) == 0:
        raise DataError(f"the factors have no {split!r} songs: factorize with a nonzero {split} fraction")
    songs = split_songs
    for name, (song_ids, _) in predictions.items():
        kept = songs[np.isin(songs, song_ids)]
        if len(kept) < len(songs):
            log.warning("%s lacks %d of the %s songs; they are left out for every model",
                        name, len(songs) - len(kept), split)
        songs = kept
    if len(songs) < 2:
        raise DataError(f"fewer than 2 {split} songs have predictions from every model")
    return songs


def _candidate_factors(
    factors: Factors,
    songs: np.ndarray,
    counts: np.ndarray,
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every model as (user factors (U, f), song factors (S, f)) over ``songs`` (S,): the random and
    popularity baselines (``counts`` (S,) test plays per song), the predictions and the upper bounds."""
    rng = np.random.default_rng(seed)
    n_users = len(factors.user_ids)
    candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "random": (rng.standard_normal((n_users, RANDOM_DIM)), rng.standard_normal((len(songs), RANDOM_DIM))),
        # Ties in play counts are broken at random (a uniform offset below one play).
        "popularity": (np.ones((n_users, 1)), (counts + 0.5 * rng.random(len(songs)))[:, None]),
    }
    for name, (song_ids, pred) in predictions.items():
        index = pd.Index(song_ids).get_indexer(songs)
        candidates[name] = (factors.user_factors, pred[index])
    rows = factors.song_index(songs)
    candidates["upper-bound-unit"] = (factors.user_factors, unit_rows(factors.song_factors[rows]))
    candidates["upper-bound"] = (factors.user_factors, factors.song_factors[rows])
    return candidates


def evaluate_regression(
    factors: Factors, predictions: Mapping[str, tuple[np.ndarray, np.ndarray]], *, split: str = "test"
) -> dict:
    """How close each model's predicted factors are to the split's true factors; no users needed.

    The fallback of :func:`evaluate_run` for factors imported without user factors, or a run
    without plays: ranking users needs both. Per model, over the split's songs it predicted: the
    mean cosine between predicted and true factors and the mean squared error of the unit-norm
    factors (the CNN's MSE target), against a mean-direction baseline (every song predicted as the
    mean unit factor of the train songs).
    """
    split_songs = factors.songs(split)
    if len(split_songs) == 0:
        raise DataError(f"the factors have no {split!r} songs: import or draw a split with {split} songs")
    truth = factors.song_factors_unit
    mean = unit_rows(truth[factors.split == "train"].mean(axis=0, keepdims=True))[0]
    candidates = {"mean-direction": (split_songs, np.broadcast_to(mean, (len(split_songs), len(mean))))}
    candidates.update(predictions)
    rows = []
    for name in _ordered(candidates):
        song_ids, pred = candidates[name]
        keep = np.isin(song_ids, split_songs)
        target = truth[factors.song_index(np.asarray(song_ids)[keep])]
        pred = unit_rows(np.asarray(pred, dtype=np.float32)[keep])
        rows.append({
            "model": name, "n_songs": int(keep.sum()),
            "cosine": _mean(np.sum(pred * target, axis=1)),
            "mse": _mean(np.mean((pred - target) ** 2, axis=1)),
            "note": MODEL_NOTES.get(name, "every song predicted as the train songs' mean unit factor"
                                    if name == "mean-direction" else ""),
        })
    return {"kind": "regression", "split": split, "n_songs": int(len(split_songs)), "models": rows}


def compare_models(
    per_user: Mapping[str, RankingMetrics],
    comparisons: list[tuple[str, str]],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """Bootstrap intervals (over users) of every model's metrics and of paired differences.

    Parameters
    ----------
    per_user : name -> per-user metrics; every model evaluated on the same users
    comparisons : (model, baseline) pairs; each gets ``model - baseline`` on every metric
    n_resamples : resamples of the users (0: no intervals, empty results)

    Returns
    -------
    dict with ``interval`` (name -> metric -> [low, high]), ``paired`` (one dict per comparison:
    ``model``, ``baseline`` and per metric ``diff``, ``interval``, ``p``) and ``bootstrap`` (the
    method, resamples, level and seed).
    """
    method = {"over": "users", "method": "percentile", "n_resamples": n_resamples, "level": level,
              "seed": seed}
    comparisons = [(a, b) for a, b in comparisons if a in per_user and b in per_user]
    if n_resamples == 0 or not per_user:
        return {"interval": {}, "paired": [], "bootstrap": method}
    names = list(per_user)
    first = per_user[names[0]]
    if any(not np.array_equal(m.users, first.users) for m in per_user.values()):
        raise ValueError("paired intervals need every model evaluated on the same users")
    keys = [f"map@{first.ap_cutoff}", "auc", f"ndcg@{first.k}", f"recall@{first.k}"]
    columns = [getattr(m, field) for m in per_user.values() for field in ("ap", "auc", "ndcg", "recall")]
    reps = bootstrap_means(np.column_stack(columns), n_resamples=n_resamples, seed=seed)
    bounds = reps.interval(level)

    def column(name: str, key: int) -> int:
        return names.index(name) * len(keys) + key

    interval = {
        name: {key: bounds[column(name, i)].tolist() for i, key in enumerate(keys)} for name in names
    }
    paired = [
        {"model": a, "baseline": b,
         **{key: reps.difference(column(a, i), column(b, i), level) for i, key in enumerate(keys)}}
        for a, b in comparisons
    ]
    return {"interval": interval, "paired": paired, "bootstrap": method}


def _ordered(names) -> list[str]:
    known = [n for n in MODEL_ORDER if n in names]
    others = sorted(n for n in names if n not in MODEL_ORDER and n not in UPPER_BOUNDS)
    return known + others + [n for n in UPPER_BOUNDS if n in names]


# --- reports --------------------------------------------------------------------------------------


def results_markdown(results: dict, *, description: str | None = None) -> str:
    """The results as a Markdown table shaped like the paper's, preceded by what data was used."""
    lines = [f"# Cold-start evaluation ({results['split']} songs)", ""]
    if description:
        lines += [description, ""]
    if results.get("kind") == "regression":
        return "\n".join(lines + _regression_lines(results))
    d, k, cut = results["data"], results["k"], results["ap_cutoff"]
    lines += [
        f"{d['n_users']:,} users x {d['n_songs']:,} held-out songs; {d['n_user_song_pairs']:,} "
        f"(user, song) pairs played, {d['n_plays']:,} plays. Users without a play of these songs "
        f"skipped: {d['n_users_skipped_no_plays']:,}; users without factors: "
        f"{d['n_users_without_factors']:,}; {results['split']} songs left out (no prediction): "
        f"{d['n_songs_left_out']:,}.",
        "",
        f"| model | mAP@{cut} | AUC | NDCG@{k} | recall@{k} |",
        "|---|---:|---:|---:|---:|",
    ]
    keys = (f"map@{cut}", "auc", f"ndcg@{k}", f"recall@{k}")
    for row in results["models"]:
        name = f"{row['model']} (warm-start reference)" if row["model"] == "popularity" else row["model"]
        cells = [_with_interval(row[key], row.get("interval", {}).get(key)) for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _paired_markdown(results)
    lines += ["", "Models:", ""]
    lines += [f"- **{row['model']}**: {row['note']}" for row in results["models"] if row["note"]]
    lines += [
        "",
        f"mAP@{cut}: AP truncated at {cut} and normalised by min(#played, {cut}), averaged over users; "
        "AUC per user, averaged; binary relevance (played or not). See `sonicrec.evaluate`.",
        "",
    ]
    return "\n".join(lines)


def _regression_lines(results: dict) -> list[str]:
    lines = [
        f"**Not computed: {results['not_computed']}**", "",
        f"Factor regression on {results['n_songs']:,} {results['split']} songs:", "",
        "| model | songs | mean cosine to the true factors | MSE of unit factors |", "|---|---:|---:|---:|",
    ]
    rows = results["models"]
    lines += [f"| {r['model']} | {r['n_songs']:,} | {r['cosine']:.5f} | {r['mse']:.5f} |" for r in rows]
    lines += ["", "Models:", ""] + [f"- **{r['model']}**: {r['note']}" for r in rows if r["note"]]
    return lines + [""]


def _with_interval(value: float, interval: list[float] | None) -> str:
    if interval is None:
        return f"{value:.5f}"
    return f"{value:.5f} [{interval[0]:.4f}, {interval[1]:.4f}]"


def _paired_markdown(results: dict) -> list[str]:
    """The paired differences as a Markdown table, with how the intervals were made."""
    boot = results.get("bootstrap", {})
    if not boot.get("n_resamples"):
        return ["", "No intervals (bootstrap off)."]
    level, n = round(100 * boot["level"]), boot["n_resamples"]
    lines = [
        "",
        f"[brackets]: {level}% percentile intervals from {n:,} bootstrap resamples of the users "
        "(the songs held fixed), so they show how the table would move with other users, not with "
        "other test songs or another training run.",
    ]
    if not results.get("paired"):
        return lines
    keys = (f"map@{results['ap_cutoff']}", "auc", f"ndcg@{results['k']}")
    lines += [
        "",
        f"Paired differences on the same users and songs ({level}% interval; p: two-sided, "
        f"recentred bootstrap, resolution 1/{n + 1:,}):",
        "",
        "| model - baseline | " + " | ".join(f"diff {key} | p" for key in keys) + " |",
        "|---|" + "---:|---:|" * len(keys),
    ]
    for pair in results["paired"]:
        cells = [f"{_with_interval(pair[key]['diff'], pair[key]['interval'])} | {pair[key]['p']:.3f}"
                 for key in keys]
        lines.append(f"| {pair['model']} - {pair['baseline']} | " + " | ".join(cells) + " |")
    return lines


def plot_results(results: dict, path: Path) -> None:
    """Bar chart of mAP and AUC per model, written atomically to ``path`` (PNG)."""
    from sonicrec.plotting import png_figure

    names = [f"{r['model']} (warm ref.)" if r["model"] == "popularity" else r["model"]
             for r in results["models"]]
    cut = results["ap_cutoff"]
    data = results["data"]
    boot = results.get("bootstrap", {})
    bars = (f"; bars: {round(100 * boot['level'])}% bootstrap intervals over users"
            if boot.get("n_resamples") else "")
    size = (10, 0.45 * len(names) + 1.5)
    with png_figure(path, dpi=100, ncols=2, figsize=size, sharey=True) as (fig, axes):
        for ax, key, title, chance in (
            (axes[0], f"map@{cut}", f"mAP@{cut}", None),
            (axes[1], "auc", "AUC", 0.5),
        ):
            values = np.array([r[key] for r in results["models"]])
            bounds = np.array([r.get("interval", {}).get(key, [r[key]] * 2) for r in results["models"]])
            ax.barh(names, values, color=["#999999" if "warm" in n else "#3070b0" for n in names],
                    xerr=np.abs(bounds.T - values), ecolor="k", capsize=3)
            ax.set_title(title)
            if chance is not None:
                ax.axvline(chance, color="k", lw=0.8, ls="--")
        axes[0].invert_yaxis()  # shared: the first model on top
        fig.suptitle(f"Cold-start evaluation: {data['n_users']:,} users x {data['n_songs']:,} "
                     f"{results['split']} songs{bars}")
        fig.tight_layout()


def evaluate_run(
    run: RunDir | str | Path,
    *,
    split: str = "test",
    k: int = DEFAULT_K,
    seed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES,
    description: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Evaluate every model of a run; write RUN/evaluation/results.json, results.md and results.png.

    Reads RUN/cf/factors.npz, RUN/plays.parquet and every RUN/predictions/*.npz. Without user
    factors (imported song factors only) or without plays, only the factor regression is evaluated
    (:func:`evaluate_regression`; no chart), and ``results["not_computed"]`` says what is missing.
    ``description`` is written above the table; by default, plays marked simulated (the Parquet
    key-value metadata ``simulated=true`` of the demo world) are said to be simulated.
    """
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    factors = Factors.load(run.factors)
    loaded = {path.stem: Predictions.load(path, n_factors=factors.n_factors)
              for path in sorted(run.predictions.glob("*.npz"))}
    predictions = {name: (p.song_ids, p.factors) for name, p in loaded.items()}
    if not predictions:
        log.warning("no predictions in %s: only the baselines and the upper bound are evaluated",
                    run.predictions)
    needed = (("user factors", factors.has_users), (f"play counts ({run.plays.name})", run.plays.is_file()))
    missing = [what for what, present in needed if not present]
    if missing:
        results = evaluate_regression(factors, predictions, split=split)
        results["not_computed"] = (
            f"mAP@{AP_CUTOFF}, AUC, NDCG and recall need {' and '.join(missing)}, which this run lacks"
        )
        log.warning("%s: %s", run.root, results["not_computed"])
    else:
        plays = read_play_matrix(run.plays, "parquet", show_progress=show_progress)
        if description is None and marked_simulated(run.plays):
            description = "Listeners and their plays are SIMULATED (demo world); the music is real."
        results = evaluate_models(
            factors, plays, predictions, split=split, k=k, seed=seed, n_resamples=n_resamples,
            show_progress=show_progress,
        )
    if description:
        results["description"] = description
    out = run.evaluation
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results, description=description))
    if not missing:
        plot_results(results, out / "results.png")
    return results
