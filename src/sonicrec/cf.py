"""Weighted matrix factorisation (WMF) of play counts: implicit's ALS on one machine, Spark's on a cluster.

The objective is Hu, Koren & Volinsky's, with the confidence of van den Oord et al. (2013)::

    min  sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + lambda (sum_u |x_u|^2 + sum_i |y_i|^2)
    p_ui = 1 if user u played song i else 0
    c_ui = 1 + alpha * log(1 + count_ui / epsilon)    (c_ui = 1 where u never played i)

How each engine is given that confidence (checked against their sources):

* implicit (``implicit/cpu/_als.pyx``): the matrix passed to ``fit`` holds c_ui itself for every
  played pair; unplayed pairs weigh 1 through the shared ``Y^T Y`` term, and played ones add
  ``(value - 1) y y^T``. So the stored values are ``1 + alpha * log(1 + count / epsilon)`` and
  implicit's own ``alpha`` (a plain multiplier of the values, which would scale the 1 too) stays 1.
* Spark (``ml.recommendation.ALS``, ``implicitPrefs=True``): c_ui = 1 + alpha_spark * rating, so
  the ratings column is ``alpha * log(1 + count / epsilon)`` and alpha_spark is 1. Spark scales
  lambda by each user's / song's number of plays (ALS-WR), implicit does not: the same
  ``regularization`` value regularises more strongly on Spark (docs/cf.md).

Cold start (:func:`factorize` with a split): WMF is fitted on the train songs' columns only; every
user is kept (a user with no train plays gets a zero factor: implicit's solver sets empty rows to
zero). Valid and test songs are then folded in with the user factors fixed: one exact ALS
half-step per song from its own plays (implicit's ``recalculate_item``, a Cholesky solve), for
either engine. Those folded-in factors are the held-out songs' "true" CF factors.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from sonicrec.config import CFConfig
from sonicrec.errors import DataError, RunStage
from sonicrec.factors import SPLITS, Factors
from sonicrec.interactions import PlayMatrix, read_play_matrix, split_songs
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)


def confidence(counts: np.ndarray, *, alpha: float, epsilon: float) -> np.ndarray:
    """The paper's confidence ``1 + alpha * log(1 + counts / epsilon)``, float32, same shape."""
    return (1.0 + alpha * np.log1p(np.asarray(counts, dtype=np.float64) / epsilon)).astype(np.float32)


def confidence_matrix(counts: sparse.spmatrix, cfg: CFConfig) -> sparse.csr_matrix:
    """(U, S) play counts -> (U, S) float32 confidences on the same sparsity (implicit's input)."""
    counts = sparse.csr_matrix(counts)
    values = confidence(counts.data, alpha=cfg.alpha, epsilon=cfg.epsilon)
    return sparse.csr_matrix((values, counts.indices, counts.indptr), shape=counts.shape)


def fit_wmf(
    counts: sparse.spmatrix, cfg: CFConfig, *, show_progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Fit WMF to play counts with the engine ``cfg.engine``.

    Parameters
    ----------
    counts : (U, S) sparse play counts (> 0 where played)

    Returns
    -------
    user_factors : (U, k) float32 (zero for users without plays)
    song_factors : (S, k) float32 (zero for songs without plays)
    """
    counts = sparse.csr_matrix(counts)
    start = time.perf_counter()
    if cfg.engine == "spark":
        user_factors, song_factors = _fit_spark(counts, cfg, show_progress)
    else:
        user_factors, song_factors = _fit_implicit(counts, cfg, show_progress)
    log.info(
        "WMF (%s): %d users x %d songs, %d factors, %d iterations in %.1f s", cfg.engine,
        counts.shape[0], counts.shape[1], cfg.factors, cfg.iterations, time.perf_counter() - start,
    )
    return user_factors.astype(np.float32), song_factors.astype(np.float32)


def fold_in_songs(user_factors: np.ndarray, counts: sparse.spmatrix, cfg: CFConfig) -> np.ndarray:
    """Song factors solved from their own plays with the user factors fixed (one ALS half-step).

    Parameters
    ----------
    user_factors : (U, k) fixed user factors
    counts : (U, n) play counts of the songs to fold in

    Returns
    -------
    (n, k) float32 song factors (zero for a song without plays)
    """
    counts = sparse.csr_matrix(counts)
    if counts.shape[0] != user_factors.shape[0]:
        raise DataError(f"fold-in: {counts.shape[0]} users in the plays, {user_factors.shape[0]} factors")
    model = _implicit_als(cfg)
    model.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
    song_users = confidence_matrix(counts.T, cfg)
    return model.recalculate_item(np.arange(counts.shape[1]), song_users).astype(np.float32)


def factorize(
    plays: PlayMatrix,
    cfg: CFConfig,
    *,
    split: np.ndarray | None = None,
    show_progress: bool = True,
) -> Factors:
    """WMF user and song factors of play counts, optionally with held-out (folded-in) songs.

    Parameters
    ----------
    plays : the play counts (:meth:`PlayMatrix.from_frame` makes them of a plays table)
    split : (S,) "train" | "valid" | "test" per song of ``plays`` (in ``PlayMatrix.song_ids``
        order); None = every song is "train". WMF sees the train songs' plays only; the others
        are folded in (:func:`fold_in_songs`).
    """
    split = np.full(plays.n_songs, "train") if split is None else np.asarray(split).astype(str)
    if split.shape != (plays.n_songs,) or not np.isin(split, SPLITS).all():
        raise DataError(f"split must give one of {SPLITS} for each of the {plays.n_songs} songs")
    train = split == "train"
    if not train.any():
        raise DataError("no train songs to fit WMF on: lower cf.valid_fraction / cf.test_fraction")
    user_factors, train_factors = fit_wmf(plays.songs(train), cfg, show_progress=show_progress)
    song_factors = np.zeros((plays.n_songs, cfg.factors), dtype=np.float32)
    song_factors[train] = train_factors
    if (~train).any():
        song_factors[~train] = fold_in_songs(user_factors, plays.songs(~train), cfg)
    n_cold = int((plays.songs(train).getnnz(axis=1) == 0).sum())
    if n_cold:
        log.info("%d of %d users have no plays of train songs: zero factors", n_cold, plays.n_users)
    return Factors(plays.user_ids, plays.song_ids, user_factors, song_factors, split)


def factorize_run(
    run: RunDir | str | Path,
    cfg: CFConfig,
    *,
    plays: PlayMatrix | None = None,
    show_progress: bool = True,
) -> Factors:
    """Factorise RUN/plays.parquet with a seeded song split and save RUN/cf/factors.npz.

    Songs are split into train/valid/test (``cfg.valid_fraction``, ``cfg.test_fraction``,
    ``cfg.seed``); WMF is fitted on the train songs, valid and test songs are folded in.
    ``plays``: the run's plays when already in memory (else read from RUN/plays.parquet).
    RUN/config.toml is updated with ``cfg``: the settings the factors were made with.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    run.read_config().replace(cf=cfg).save(run.config)
    if plays is not None:
        matrix = plays
    elif run.plays.is_file():
        matrix = read_play_matrix(run.plays, "parquet", on_bad="error", show_progress=show_progress)
    else:
        raise DataError(f"no play counts at {run.plays}", remedy=RunStage("plays", run.root))
    split = split_songs(
        matrix.n_songs, valid_fraction=cfg.valid_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed
    )
    factors = factorize(matrix, cfg, split=split, show_progress=show_progress)
    factors.save(run.factors)
    log.info("saved %s (%s)", run.factors, ", ".join(f"{s}: {(split == s).sum()} songs" for s in SPLITS))
    return factors


# --- held-out plays: WMF against popularity ------------------------------------------------------


def heldout_split(
    counts: sparse.spmatrix, *, fraction: float, seed: int
) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """Hold out a random fraction of (user, song) pairs: (fit counts, held-out counts), both (U, S)."""
    from implicit.evaluation import train_test_split

    if not 0 < fraction < 1:
        raise DataError(f"held-out fraction {fraction} must be in (0, 1)")
    fit, held = train_test_split(sparse.coo_matrix(counts), train_percentage=1 - fraction, random_state=seed)
    return fit.tocsr(), held.tocsr()


def heldout_ranking_metrics(
    user_factors: np.ndarray,
    song_factors: np.ndarray,
    fit_counts: sparse.spmatrix,
    heldout_counts: sparse.spmatrix,
    *,
    k: int,
    show_progress: bool = False,
) -> dict[str, float]:
    """precision, map, ndcg and auc at k of ranking by ``x_u . y_i`` (implicit.evaluation).

    Songs a user played in ``fit_counts`` are not ranked; relevant songs are those in
    ``heldout_counts``. implicit's precision@k divides by min(k, number of relevant songs).
    ``k`` is capped at the number of songs (implicit reports impossible values beyond it); the
    returned dict holds the ``k`` used. Users who played every song (fit or held out) have no
    song to rank their held-out songs above, so no AUC: they are left out.
    """
    from implicit.cpu.matrix_factorization_base import MatrixFactorizationBase
    from implicit.evaluation import ranking_metrics_at_k

    class _Scores(MatrixFactorizationBase):  # implicit's ranking code over given factors
        def fit(self, *args, **kwargs):
            raise NotImplementedError

        def save(self, *args, **kwargs):
            raise NotImplementedError

    n_songs = song_factors.shape[0]
    if k > n_songs:
        log.info("held-out metrics at k=%d: there are only %d songs, so k=%d", k, n_songs, n_songs)
        k = n_songs
    fit_counts, heldout_counts = sparse.csr_matrix(fit_counts), sparse.csr_matrix(heldout_counts)
    played_all = (fit_counts + heldout_counts).getnnz(axis=1) >= n_songs
    heldout_counts = (sparse.diags((~played_all).astype(np.float32)) @ heldout_counts).tocsr()
    heldout_counts.eliminate_zeros()
    if heldout_counts.nnz == 0:
        raise DataError(
            "no held-out plays to rank: too few (user, song) pairs, or every user with held-out "
            f"plays played all {n_songs} songs"
        )
    model = _Scores()
    model.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
    model.item_factors = np.ascontiguousarray(song_factors, dtype=np.float32)
    metrics = ranking_metrics_at_k(model, fit_counts, heldout_counts, K=k, show_progress=show_progress)
    return {name: float(value) for name, value in metrics.items()} | {"k": k}


def popularity_metrics(
    fit_counts: sparse.spmatrix, heldout_counts: sparse.spmatrix, *, k: int
) -> dict[str, float]:
    """The popularity baseline: every user gets the songs with most listeners in ``fit_counts``."""
    listeners = np.asarray((sparse.csr_matrix(fit_counts) > 0).sum(axis=0), dtype=np.float32).reshape(-1, 1)
    users = np.ones((fit_counts.shape[0], 1), dtype=np.float32)
    return heldout_ranking_metrics(users, listeners, fit_counts, heldout_counts, k=k)


def evaluate_heldout(
    plays: PlayMatrix | sparse.spmatrix,
    cfg: CFConfig,
    *,
    k: int = 50,
    fraction: float = 0.2,
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Fit WMF without a random ``fraction`` of (user, song) pairs, then rank them back.

    Returns
    -------
    {"wmf": metrics, "popularity": metrics}, metrics as in :func:`heldout_ranking_metrics`
    (seeded by ``cfg.seed``; ``metrics["k"]`` is ``k`` capped at the number of songs).
    """
    counts = plays.counts if isinstance(plays, PlayMatrix) else sparse.csr_matrix(plays)
    fit, held = heldout_split(counts, fraction=fraction, seed=cfg.seed)
    if held.nnz == 0 or fit.nnz == 0:
        raise DataError(
            f"too few plays for a held-out evaluation: {counts.nnz} (user, song) pair(s) leave "
            f"{fit.nnz} to fit and {held.nnz} to hold out at fraction {fraction}"
        )
    user_factors, song_factors = fit_wmf(fit, cfg, show_progress=show_progress)
    return {
        "wmf": heldout_ranking_metrics(user_factors, song_factors, fit, held, k=k),
        "popularity": popularity_metrics(fit, held, k=k),
    }


# --- engines -------------------------------------------------------------------------------------


def _implicit_als(cfg: CFConfig):
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit parallelises itself; BLAS threads slow it down
        return AlternatingLeastSquares(
            factors=cfg.factors,
            regularization=cfg.regularization,
            alpha=1.0,  # the confidences are the matrix values (module docstring)
            iterations=cfg.iterations,
            calculate_training_loss=True,
            random_state=cfg.seed,
        )


def _fit_implicit(counts: sparse.csr_matrix, cfg: CFConfig, show_progress: bool):
    from threadpoolctl import threadpool_limits

    model = _implicit_als(cfg)

    def on_iteration(iteration: int, seconds: float, loss: float) -> None:
        log.debug("ALS iteration %d/%d: loss %.6f (%.2f s)", iteration + 1, cfg.iterations, loss, seconds)

    with threadpool_limits(1, "blas"):
        model.fit(confidence_matrix(counts, cfg), show_progress=show_progress, callback=on_iteration)
    return model.user_factors, model.item_factors


def _fit_spark(counts: sparse.csr_matrix, cfg: CFConfig, show_progress: bool):
    """Spark's ALS on a session from :func:`sonicrec.spark.session` (stopped here only if started here)."""
    from sonicrec.spark import quiet_pandas_warnings, session

    coo = counts.tocoo()
    ratings = pd.DataFrame(
        {
            "user": coo.row.astype(np.int32),
            "song": coo.col.astype(np.int32),
            # Spark's confidence is 1 + alpha_spark * rating (module docstring)
            "rating": confidence(coo.data, alpha=cfg.alpha, epsilon=cfg.epsilon) - np.float32(1.0),
        }
    )
    with quiet_pandas_warnings():
        spark, owned = session(cfg.spark_master, show_progress=show_progress)
        try:
            from pyspark.ml.recommendation import ALS

            als = ALS(
                rank=cfg.factors,
                maxIter=cfg.iterations,
                regParam=cfg.regularization,
                implicitPrefs=True,
                alpha=1.0,
                userCol="user",
                itemCol="song",
                ratingCol="rating",
                seed=cfg.seed,
                numUserBlocks=spark.sparkContext.defaultParallelism,  # Spark's default 10 is slow locally
                numItemBlocks=spark.sparkContext.defaultParallelism,
            )
            model = als.fit(spark.createDataFrame(ratings))
            users = model.userFactors.toPandas()
            songs = model.itemFactors.toPandas()
        finally:
            if owned:
                spark.stop()
    user_factors = np.zeros((counts.shape[0], cfg.factors), dtype=np.float32)
    song_factors = np.zeros((counts.shape[1], cfg.factors), dtype=np.float32)
    if len(users):
        user_factors[users["id"].to_numpy()] = np.stack(users["features"].to_numpy())
    if len(songs):
        song_factors[songs["id"].to_numpy()] = np.stack(songs["features"].to_numpy())
    return user_factors, song_factors
