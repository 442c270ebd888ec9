"""Warm-up blending: a song with its first plays is placed by its sound and its listeners together.

A new release collects its first plays within hours. Its CF factor folded in from those plays
(WMF's half-step with the user factors fixed) is noisy; the CNN's prediction from its audio is
the same quality whatever the plays. Both are estimates of one direction in the latent space,
each with an uncertainty, and they are combined by their precisions.

CF, read as a Gaussian model (the WMF objective is its negative log-posterior)::

    E_i = sum_{u plays i} (c_ui - 1) x_u x_u' + lambda I                (k, k): the plays' evidence
    A_i = X'X + E_i,  y_i = A_i^{-1} b_i,  b_i = sum_{u plays i} c_ui x_u   the fold-in (cf.fold_in_songs)

A_i is y_i's posterior precision, but most of it, X'X, says "every other user did not play it",
which for a song out for hours means "has not heard it yet", not "dislikes it". The blend therefore
trusts the fold-in by what its listeners say, E_i: the direction ``d_i = y_i / |y_i|`` gets the
covariance ``tau E_i^{-1} / |y_i|^2`` (first order; tau: the unknown noise scale of WMF's squared
error). Weighting by the full A_i instead was measured too: on the demo world it trusted one or
two listeners too much and ranked the song's other listeners worse than the audio alone (AUC 0.757
vs 0.775 with one listener revealed). The audio direction ``p_i`` (the model's unit-norm prediction)
has error ``d_true - p``, whose second-moment matrix ``S`` is measured on the validation songs
(never trained on). The blend is the precision-weighted mean, normalised::

    z_i = (w_i E_i + S^{-1})^{-1} (w_i E_i d_i + S^{-1} p_i),   w_i = |y_i|^2 / tau

With no plays w_i = 0 and the song is placed by its sound alone; as plays accrue, E_i and |y_i| grow
and the listeners take over. tau is fitted on the validation songs: their listeners are revealed
a few at a time (:data:`CALIBRATION_REVEALS`, seeded) and tau minimises the mean squared distance
between the blend and the direction of the song's fold-in from all its plays.

:func:`warmup_vectors` applies this to a run: train songs with fewer than ``below`` listeners
(their WMF factors rest on few plays) and songs outside the CF factors that have plays (new
releases: their plays were appended to the play log after the factors were fitted). Held-out
valid/test songs are not touched: their plays are the evaluation's ground truth.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from sonicrec.cf import confidence
from sonicrec.config import CFConfig
from sonicrec.errors import DataError
from sonicrec.factors import Factors, Predictions, unit_rows
from sonicrec.interactions import PlayMatrix, read_play_matrix
from sonicrec.io import atomic_path, atomic_write_text
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)

DEFAULT_BELOW = 50  # listeners under which a train song's CF factor is blended with its audio
CALIBRATION_REVEALS = (1, 2, 5, 10, 20)  # listeners revealed per validation song to fit tau
TAUS = np.logspace(-3, 4, 29)  # candidate noise scales of the CF fold-in
_RIDGE = 1e-6  # added to the audio error matrix before inverting it


@dataclass(frozen=True)
class FoldIn:
    """Fold-ins of n songs. factors : (n, k) float64 y_i; evidence : (n, k, k) E_i (module docstring)."""

    factors: np.ndarray
    evidence: np.ndarray


def fold_in_posterior(user_factors: np.ndarray, counts: sparse.spmatrix, cfg: CFConfig) -> FoldIn:
    """The fold-in of songs from their plays and the plays' evidence (module docstring).

    Parameters
    ----------
    user_factors : (U, k) fixed user factors
    counts : (U, n) play counts of the n songs (a song without plays gets y = 0, E = lambda I)
    """
    x = np.asarray(user_factors, dtype=np.float64)
    counts = sparse.csc_matrix(counts)
    if counts.shape[0] != x.shape[0]:
        raise DataError(f"fold-in: {counts.shape[0]} users in the plays, {x.shape[0]} user factors")
    k, n = x.shape[1], counts.shape[1]
    evidence = np.broadcast_to(cfg.regularization * np.eye(k), (n, k, k)).copy()
    rhs = np.zeros((n, k))
    for j in range(n):
        rows = counts.indices[counts.indptr[j] : counts.indptr[j + 1]]
        if len(rows) == 0:
            continue
        c = confidence(counts.data[counts.indptr[j] : counts.indptr[j + 1]], alpha=cfg.alpha,
                       epsilon=cfg.epsilon).astype(np.float64)
        xi = x[rows]  # (m, k)
        evidence[j] += (xi * (c - 1.0)[:, None]).T @ xi
        rhs[j] = xi.T @ c
    precision = x.T @ x + evidence  # (n, k, k) A_i
    return FoldIn(np.linalg.solve(precision, rhs[..., None])[..., 0], evidence)


@dataclass(frozen=True)
class WarmupBlend:
    """The blend's two uncertainties: the audio error precision S^{-1} (k, k) and the CF scale tau."""

    audio_precision: np.ndarray
    tau: float

    def blend(self, fold: FoldIn, predicted: np.ndarray) -> np.ndarray:
        """(n, k) unit directions of n songs from their fold-ins and (n, k) audio predictions."""
        p = unit_rows(np.asarray(predicted, dtype=np.float64)).astype(np.float64)
        y, e, q = fold.factors, fold.evidence, self.audio_precision
        norm = np.linalg.norm(y, axis=1)  # (n,)
        w = norm**2 / self.tau
        d = y / np.maximum(norm, 1e-12)[:, None]
        system = w[:, None, None] * e + q  # (n, k, k)
        rhs = w[:, None] * np.einsum("nij,nj->ni", e, d) + p @ q.T  # (n, k)
        return unit_rows(np.linalg.solve(system, rhs[..., None])[..., 0])

    @classmethod
    def fit(
        cls,
        user_factors: np.ndarray,
        counts: sparse.spmatrix,
        predicted: np.ndarray,
        cfg: CFConfig,
        *,
        reveals: tuple[int, ...] = CALIBRATION_REVEALS,
        seed: int = 0,
    ) -> WarmupBlend:
        """Measure the audio error and fit tau on validation songs (module docstring).

        Parameters
        ----------
        user_factors : (U, k)
        counts : (U, n) all plays of n validation songs; their full fold-in is the truth
        predicted : (n, k) the audio model's predictions of those songs
        """
        counts = sparse.csc_matrix(counts)
        truth = unit_rows(fold_in_posterior(user_factors, counts, cfg).factors).astype(np.float64)
        played = np.diff(counts.indptr) > 0
        if played.sum() < 2:
            raise DataError("warm-up blending needs at least 2 validation songs with plays to calibrate")
        error = truth[played] - unit_rows(np.asarray(predicted, dtype=np.float64)[played])
        second_moment = error.T @ error / len(error) + _RIDGE * np.eye(error.shape[1])
        audio = cls(np.linalg.inv(second_moment), 1.0)
        rng = np.random.default_rng(seed)
        trials = []  # (fold-in from a few listeners, prediction, truth) per reveal level
        for m in reveals:
            songs = np.flatnonzero(np.diff(counts.indptr) > m)
            if len(songs) == 0:
                continue
            revealed, _ = reveal_listeners(counts[:, songs], m, rng)
            trials.append((fold_in_posterior(user_factors, revealed, cfg), predicted[songs], truth[songs]))
        if not trials:
            raise DataError("warm-up blending: no validation song has more listeners than are revealed")
        losses = [
            np.mean(np.concatenate([np.sum((cls(audio.audio_precision, t).blend(f, p) - d) ** 2, axis=1)
                                    for f, p, d in trials]))
            for t in TAUS
        ]
        tau = float(TAUS[int(np.argmin(losses))])
        log.info("warm-up blend: tau %.3g fitted on %d validation songs", tau, int(played.sum()))
        return cls(audio.audio_precision, tau)


def reveal_listeners(
    counts: sparse.spmatrix, m: int, rng: np.random.Generator
) -> tuple[sparse.csc_matrix, sparse.csc_matrix]:
    """Split each song's listeners: ``m`` drawn at random (all when fewer) and the rest.

    counts : (U, n) play counts. Returns (revealed, remaining), both (U, n) with the same counts.
    """
    counts = sparse.csc_matrix(counts)
    keep = np.zeros(counts.nnz, dtype=bool)
    for j in range(counts.shape[1]):
        lo, hi = counts.indptr[j], counts.indptr[j + 1]
        keep[lo + rng.permutation(hi - lo)[:m]] = True
    revealed, remaining = counts.copy(), counts.copy()
    revealed.data = np.where(keep, counts.data, 0)
    remaining.data = np.where(keep, 0, counts.data)
    revealed.eliminate_zeros()
    remaining.eliminate_zeros()
    return revealed, remaining


def play_counts(plays: PlayMatrix, user_ids: np.ndarray, song_ids: np.ndarray) -> sparse.csc_matrix:
    """(U, S) float64 play counts of ``song_ids`` by ``user_ids`` (others left out), by song."""
    return plays.aligned(user_ids, song_ids).astype(np.float64).tocsc()


def warmup_vectors(
    factors: Factors,
    predicted_ids: np.ndarray,
    predicted: np.ndarray,
    plays: PlayMatrix,
    cfg: CFConfig,
    *,
    below: int = DEFAULT_BELOW,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Blended unit vectors of a run's warming-up songs (module docstring): ids (n,), (n, k).

    None when the run cannot blend: no user factors, no plays, or no validation songs with
    predictions and plays to calibrate on.
    """
    predicted_ids = np.asarray(predicted_ids).astype(str)
    if not factors.has_users or plays.n_pairs == 0:
        return None
    valid = factors.songs("valid")
    valid = valid[np.isin(valid, predicted_ids)]
    row = pd.Index(predicted_ids)
    try:
        blend = WarmupBlend.fit(factors.user_factors, play_counts(plays, factors.user_ids, valid),
                                predicted[row.get_indexer(valid)], cfg, seed=seed)
    except DataError as exc:
        log.warning("no warm-up blending: %s", exc)
        return None
    train = factors.songs("train")
    candidates = np.concatenate([train[np.isin(train, predicted_ids)],
                                 predicted_ids[~np.isin(predicted_ids, factors.song_ids)]])
    counts = play_counts(plays, factors.user_ids, candidates)
    listeners = np.diff(counts.indptr)
    is_new = ~np.isin(candidates, factors.song_ids)
    chosen = (listeners > 0) & (is_new | (listeners < below))
    if not chosen.any():
        return None
    fold = fold_in_posterior(factors.user_factors, counts[:, np.flatnonzero(chosen)], cfg)
    ids = candidates[chosen]
    log.info("warm-up blend: %d songs with fewer than %d listeners or new", len(ids), below)
    return ids, blend.blend(fold, predicted[row.get_indexer(ids)])


# --- the warm-up curve ------------------------------------------------------------------------------

CURVE_REVEALS = (1, 2, 5, 10, 20, 50)
METHODS = ("fold-in", "audio", "blend")


def warmup_curve(
    factors: Factors,
    plays: PlayMatrix,
    predicted_ids: np.ndarray,
    predicted: np.ndarray,
    cfg: CFConfig,
    *,
    reveals: tuple[int, ...] = CURVE_REVEALS,
    seed: int = 0,
    ap_cutoff: int = 500,
) -> list[dict]:
    """mAP@``ap_cutoff`` and AUC of placing test songs from their first listeners, by method.

    For each ``m`` in ``reveals`` and each test song with more than ``m`` listeners, ``m`` of them
    are revealed (seeded); the song is placed by its fold-in from their plays, by its audio
    prediction, and by the blend (calibrated on the valid songs); the song then ranks every user
    not revealed by ``x_u . v`` and the remaining listeners are the relevant ones (song-centric:
    finding a new release's audience). Returns one row per (m, method): m, method, n_songs,
    map@cutoff, auc (means over songs).
    """
    from sonicrec.evaluate import ranking_metrics

    predicted_ids = np.asarray(predicted_ids).astype(str)
    row = pd.Index(predicted_ids)
    valid = factors.songs("valid")
    blend = WarmupBlend.fit(factors.user_factors, play_counts(plays, factors.user_ids, valid),
                            predicted[row.get_indexer(valid)], cfg, seed=seed)
    test = factors.songs("test")
    test = test[np.isin(test, predicted_ids)]
    counts = play_counts(plays, factors.user_ids, test)
    audio = unit_rows(predicted[row.get_indexer(test)])
    users = factors.user_factors
    rng = np.random.default_rng(seed)
    out = []
    for m in reveals:
        songs = np.flatnonzero(np.diff(counts.indptr) > m)
        if len(songs) == 0:
            log.warning("warm-up curve: no test song has more than %d listeners", m)
            continue
        revealed, remaining = reveal_listeners(counts[:, songs], m, rng)
        fold = fold_in_posterior(users, revealed, cfg)
        placed = {"fold-in": unit_rows(fold.factors), "audio": audio[songs],
                  "blend": blend.blend(fold, audio[songs])}
        for method in METHODS:
            ap, auc = [], []
            for j in range(len(songs)):
                hidden = np.ones(len(users), dtype=bool)
                hidden[revealed.indices[revealed.indptr[j] : revealed.indptr[j + 1]]] = False
                relevant = sparse.csr_matrix(remaining[:, j].T)[:, np.flatnonzero(hidden)]
                metrics = ranking_metrics(placed[method][j][None], users[hidden], relevant,
                                          ap_cutoff=ap_cutoff, workers=1)
                ap.append(metrics.ap[0])
                auc.append(metrics.auc[0])
            out.append({"m": m, "method": method, "n_songs": len(songs),
                        f"map@{ap_cutoff}": float(np.mean(ap)), "auc": float(np.mean(auc))})
        log.info("warm-up curve: %d listeners revealed, %d test songs", m, len(songs))
    return out


def curve_markdown(rows: list[dict], *, description: str = "") -> str:
    """The warm-up curve as a Markdown table: one line per number of revealed listeners."""
    cut = next(k for k in rows[0] if k.startswith("map@"))
    by = {(r["m"], r["method"]): r for r in rows}
    lines = [description, ""] if description else []
    header = f"| revealed | test songs | {cut}: fold-in | audio | blend | AUC: fold-in | audio | blend |"
    lines += [header, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in sorted({r["m"] for r in rows}):
        cells = [f"{by[(m, method)][key]:.4f}" for key in (cut, "auc") for method in METHODS]
        lines.append(f"| {m} | {by[(m, 'blend')]['n_songs']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(rows: list[dict], path: Path, *, title: str) -> None:
    """mAP and AUC against revealed listeners (log scale), one line per method; PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cut = next(k for k in rows[0] if k.startswith("map@"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], cut, cut.replace("map", "mAP")), (axes[1], "auc", "AUC")):
        for method, style in zip(METHODS, ("-o", "--s", "-^"), strict=True):
            points = sorted((r["m"], r[key]) for r in rows if r["method"] == method)
            ax.plot(*zip(*points, strict=True), style, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("listeners revealed per test song")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def warmup_curve_run(run: RunDir | str | Path, model: str = "cnn-mse", *, seed: int = 0) -> list[dict]:
    """The warm-up curve of a run's model; writes RUN/evaluation/warmup.json, warmup.md, warmup.png."""
    from sonicrec.interactions import marked_simulated

    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = run.read_config()
    factors = Factors.load(run.factors)
    if not factors.has_users or not run.plays.is_file():
        raise DataError(f"{run.root}: the warm-up curve needs user factors and play counts")
    predicted = Predictions.load(run.prediction(model), n_factors=factors.n_factors)
    plays = read_play_matrix(run.plays, "parquet", show_progress=False)
    rows = warmup_curve(factors, plays, predicted.song_ids, predicted.factors, cfg.cf, seed=seed)
    simulated = "Listeners are SIMULATED (demo world). " if marked_simulated(run.plays) else ""
    description = (f"{simulated}Model {model}; per test song, its listeners revealed (seed {seed}) place it, "
                   "the others are ranked among all users not revealed.")
    out = run.evaluation
    atomic_write_text(out / "warmup.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "warmup.md", curve_markdown(rows, description=description))
    title = f"Warm-up: placing test songs from their first listeners ({model})"
    plot_curve(rows, out / "warmup.png", title=title)
    return rows
