"""The paper's content baseline: MFCC bag-of-words, regressed onto the WMF song factors.

Pipeline (van den Oord et al. 2013, section 4.1): 13 MFCCs per frame plus their first and second
order differences (39 coefficients); a k-means vocabulary of those frames; per track, the histogram
of the words its frames fall into (normalised to sum 1); PCA keeping 95% of the variance; then linear
regression ("mfcc-linear", ridge here) or an MLP with one hidden layer of 1000 units ("mfcc-mlp")
trained on the training songs to predict their unit-normalised factors. Predictions are written in the
same format as the CNN's (RUN/predictions/NAME.npz) and evaluated by :mod:`sonicrec.evaluate`, which
also computes the random and popularity baselines and the upper bound.

Differences from the paper: the MFCCs are computed from the stored log-mel spectrograms (a DCT over
the mel bands), so their frames are the CNN's frames rather than 23-ms windows; the vocabulary has
1000 words by default (the paper used 4000 for 380k songs); the MFCCs are standardised before k-means;
the PCA output is whitened; the MLP is regularised by an L2 penalty rather than early stopping,
which is unstable with the few hundred training songs of the demo.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sonicrec.errors import DataError, RunStage
from sonicrec.factors import Factors, Predictions
from sonicrec.rundir import RunDir

if TYPE_CHECKING:
    from sonicrec.features import LogMelStore

log = logging.getLogger(__name__)

REGRESSORS = ("linear", "mlp")
MIN_TRAIN_SONGS = 10


@dataclass(frozen=True)
class BagOfWordsConfig:
    """Settings of the MFCC bag-of-words baselines (defaults follow the paper where it says)."""

    n_mfcc: int = 13
    n_words: int = 1000  # k-means vocabulary size (paper: 4000)
    vocabulary_tracks: int = 2000  # training tracks sampled to fit the vocabulary
    frames_per_track: int = 100  # frames sampled from each of them
    pca_variance: float = 0.95
    ridge_alpha: float = 1.0
    mlp_hidden: int = 1000
    mlp_alpha: float = 1.0  # L2 penalty (no early stopping: unstable with few training songs)
    mlp_max_iter: int = 200
    batch_size: int = 64  # tracks read at once


def mfcc(logmel: np.ndarray, n_mfcc: int = 13) -> np.ndarray:
    """MFCCs and their first and second order differences from a log-mel spectrogram.

    Parameters
    ----------
    logmel : (..., n_mels, T) log-compressed mel spectrogram(s)
    n_mfcc : coefficients kept from the orthonormal DCT-II over the mel bands

    Returns
    -------
    (..., 3 * n_mfcc, T) float32: coefficients, then differences (0 at the first frame), then
    differences of those.
    """
    from scipy.fft import dct

    coefficients = dct(np.asarray(logmel, dtype=np.float32), type=2, axis=-2, norm="ortho")[..., :n_mfcc, :]
    delta = np.diff(coefficients, axis=-1, prepend=coefficients[..., :1])
    delta2 = np.diff(delta, axis=-1, prepend=delta[..., :1])
    return np.concatenate([coefficients, delta, delta2], axis=-2).astype(np.float32)


@dataclass(frozen=True)
class Vocabulary:
    """A k-means vocabulary of standardised MFCC frames.

    Attributes
    ----------
    mean, scale : (d,) standardisation of the frames
    centroids : (n_words, d) k-means centroids in standardised units
    """

    mean: np.ndarray
    scale: np.ndarray
    centroids: np.ndarray

    @property
    def n_words(self) -> int:
        return self.centroids.shape[0]

    def histograms(self, mfccs: np.ndarray) -> np.ndarray:
        """(B, d, T) MFCC frames -> (B, n_words) float32 word histograms, each summing to 1."""
        n_tracks, d, n_frames = mfccs.shape
        frames = (mfccs.transpose(0, 2, 1).reshape(-1, d) - self.mean) / self.scale
        # Nearest centroid by squared distance, without the constant |frame|^2 term.
        words = np.argmin(
            (self.centroids**2).sum(axis=1) - 2.0 * frames @ self.centroids.T, axis=1
        )
        words = words + np.repeat(np.arange(n_tracks), n_frames) * self.n_words
        counts = np.bincount(words, minlength=n_tracks * self.n_words).reshape(n_tracks, self.n_words)
        return (counts / n_frames).astype(np.float32)


def fit_vocabulary(
    store: LogMelStore,
    track_ids: Sequence[str],
    cfg: BagOfWordsConfig = BagOfWordsConfig(),
    *,
    seed: int = 0,
    show_progress: bool = False,
) -> Vocabulary:
    """Fit the k-means vocabulary (sklearn MiniBatchKMeans) on frames sampled from ``track_ids``."""
    from sklearn.cluster import MiniBatchKMeans
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    chosen = rng.permutation(np.asarray(track_ids))[: cfg.vocabulary_tracks]
    samples = []
    for start in tqdm(range(0, len(chosen), cfg.batch_size), desc="MFCC vocabulary frames",
                      unit="batch", disable=not show_progress):
        coefficients = mfcc(store.get_many(list(chosen[start : start + cfg.batch_size])), cfg.n_mfcc)
        n_frames = coefficients.shape[-1]
        for track in coefficients:
            picked = rng.choice(n_frames, size=min(cfg.frames_per_track, n_frames), replace=False)
            samples.append(track[:, picked].T)
    frames = np.concatenate(samples)
    mean, scale = frames.mean(axis=0), frames.std(axis=0) + 1e-6
    n_words = min(cfg.n_words, len(frames))
    log.info("fitting a %d-word vocabulary on %d MFCC frames of %d tracks", n_words, len(frames), len(chosen))
    kmeans = MiniBatchKMeans(n_clusters=n_words, batch_size=4096, n_init=1, random_state=seed)
    kmeans.fit((frames - mean) / scale)
    return Vocabulary(mean, scale, kmeans.cluster_centers_.astype(np.float32))


def bag_of_words(
    store: LogMelStore,
    track_ids: Sequence[str],
    vocabulary: Vocabulary,
    cfg: BagOfWordsConfig = BagOfWordsConfig(),
    *,
    show_progress: bool = False,
) -> np.ndarray:
    """(n, n_words) float32 normalised word histograms of ``track_ids``."""
    from tqdm.auto import tqdm

    track_ids = list(track_ids)
    out = np.empty((len(track_ids), vocabulary.n_words), dtype=np.float32)
    for start in tqdm(range(0, len(track_ids), cfg.batch_size), desc="MFCC bag-of-words",
                      unit="batch", disable=not show_progress):
        batch = track_ids[start : start + cfg.batch_size]
        out[start : start + len(batch)] = vocabulary.histograms(mfcc(store.get_many(batch), cfg.n_mfcc))
    return out


def make_regressor(kind: str, cfg: BagOfWordsConfig = BagOfWordsConfig(), *, seed: int = 0):
    """An unfitted sklearn regressor of the PCA-reduced histograms: ridge ("linear") or an MLP."""
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor

    if kind not in REGRESSORS:
        raise ValueError(f"regressor {kind!r}: use one of {REGRESSORS}")
    if kind == "linear":
        return Ridge(alpha=cfg.ridge_alpha)
    return MLPRegressor(
        hidden_layer_sizes=(cfg.mlp_hidden,),
        alpha=cfg.mlp_alpha,
        max_iter=cfg.mlp_max_iter,
        random_state=seed,
    )


def fit_bag_of_words_baselines(
    store: LogMelStore,
    factors: Factors,
    cfg: BagOfWordsConfig = BagOfWordsConfig(),
    *,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fit both bag-of-words regressors on the training songs; predict every track of the store.

    Returns
    -------
    ``{"mfcc-linear": (song_ids (S,), factors (S, k)), "mfcc-mlp": ...}`` over the store's tracks.
    """
    from sklearn.decomposition import PCA

    track_ids = np.asarray(store.track_ids, dtype=str)
    train = np.intersect1d(factors.songs("train"), track_ids)
    if len(train) < MIN_TRAIN_SONGS:
        raise DataError(
            f"only {len(train)} training songs have log-mel features (need {MIN_TRAIN_SONGS}): the "
            "features and the factors must be of the same catalog", remedy=RunStage("ingest"),
        )
    vocabulary = fit_vocabulary(store, train, cfg, seed=seed, show_progress=show_progress)
    features = bag_of_words(store, track_ids, vocabulary, cfg, show_progress=show_progress)
    # PCA keeping cfg.pca_variance of the variance, whitened, fitted on the training songs.
    train_rows = _positions(track_ids, train)
    pca = PCA(n_components=cfg.pca_variance, whiten=True, random_state=seed).fit(features[train_rows])
    reduced = pca.transform(features)
    log.info("bag-of-words: %d words -> %d PCA components", vocabulary.n_words, pca.n_components_)
    x_train = reduced[train_rows]
    y_train = factors.song_factors_unit[factors.song_index(train)]
    predictions = {}
    for kind in REGRESSORS:
        log.info("fitting mfcc-%s on %d training songs", kind, len(train))
        model = make_regressor(kind, cfg, seed=seed).fit(x_train, y_train)
        predictions[f"mfcc-{kind}"] = (track_ids, model.predict(reduced).astype(np.float32))
    return predictions


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Indices in ``ids`` of each of ``wanted`` (all present)."""
    order = np.argsort(ids)
    return order[np.searchsorted(ids, wanted, sorter=order)]


def fit_baselines_run(
    run: RunDir | str | Path,
    *,
    seed: int = 0,
    show_progress: bool = True,
    cfg: BagOfWordsConfig = BagOfWordsConfig(),
) -> dict[str, Path]:
    """Fit the MFCC baselines of a run from RUN/features and RUN/cf/factors.npz.

    Writes RUN/predictions/mfcc-linear.npz and mfcc-mlp.npz; returns their paths by name.
    """
    from sonicrec.features import FeatureStore

    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    factors = Factors.load(run.factors)
    store = FeatureStore(run.features)
    predictions = fit_bag_of_words_baselines(store, factors, cfg, seed=seed, show_progress=show_progress)
    paths = {}
    for name, (song_ids, predicted) in predictions.items():
        paths[name] = run.prediction(name)
        Predictions(song_ids, predicted).save(paths[name])
    return paths
