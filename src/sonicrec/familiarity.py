"""Familiarity: how far an input lies from the audio a model was trained on.

A prediction from audio is only as good as the input resembles the training songs. The model's
penultimate-layer activations h (``AudioCNN.embed``) of the training songs are summarised by their
mean and a shrunk covariance (Ledoit & Wolf style: ``(1 - a) S + a tr(S) / D I``, a = 0.1); an
input's distance is the Mahalanobis distance ``sqrt((h - m)' S^-1 (h - m))`` (as in Lee, Lee, Lee &
Shin, *A simple unified framework for detecting out-of-distribution samples*, NeurIPS 2018).
The threshold is calibrated on held-out songs the network never trained on (the validation split):
the 99th percentile of their distances, so about 99% of songs like the training ones count as
familiar. ``percentile`` says how many of those held-out songs lie closer than the input.

>>> rng = np.random.default_rng(0)
>>> fam = Familiarity.fit(rng.normal(size=(500, 4)), rng.normal(size=(200, 4)))
>>> bool(fam.score(np.full((1, 4), 8.0)).familiar[0])
False
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sonicrec.errors import DataError
from sonicrec.io import atomic_save_npz

SHRINKAGE = 0.1
QUANTILE = 0.99
UNFAMILIAR_MESSAGE = "unlike anything the model was trained on: treat these results with care"


def shrunk_covariance(x: np.ndarray, shrinkage: float = SHRINKAGE) -> np.ndarray:
    """``(1 - a) S + a tr(S) / D I`` of the sample covariance S of rows x (n, D): positive definite."""
    x = np.asarray(x, np.float64)
    d = x.shape[1]
    cov = np.cov(x, rowvar=False).reshape(d, d)
    return (1 - shrinkage) * cov + shrinkage * max(np.trace(cov) / d, 1e-12) * np.eye(d)


@dataclass(frozen=True)
class FamiliarityScores:
    """Familiarity of n inputs.

    Attributes
    ----------
    distance : float32 (n,) Mahalanobis distance of the penultimate activations to the training songs'
    percentile : float32 (n,) share of the held-out calibration songs closer than the input (0-100)
    familiar : bool (n,) ``distance <= threshold``
    threshold : the calibrated distance
    """

    distance: np.ndarray
    percentile: np.ndarray
    familiar: np.ndarray
    threshold: float

    def as_dict(self, i: int = 0) -> dict[str, Any]:
        """Input ``i``'s scores as plain JSON-able values, with the message when it is unfamiliar."""
        out = {
            "distance": round(float(self.distance[i]), 3),
            "threshold": round(self.threshold, 3),
            "percentile": round(float(self.percentile[i]), 1),
            "familiar": bool(self.familiar[i]),
        }
        if not out["familiar"]:
            out["message"] = UNFAMILIAR_MESSAGE
        return out


@dataclass(frozen=True)
class Familiarity:
    """Mean (D,) and precision (D, D) of training activations, and the calibration songs' sorted distances."""

    mean: np.ndarray
    precision: np.ndarray
    reference: np.ndarray  # (M,) sorted distances of the calibration songs
    threshold: float

    @classmethod
    def fit(cls, train: np.ndarray, calibration: np.ndarray, *, quantile: float = QUANTILE) -> Familiarity:
        """Fit on training activations (N, D); calibrate the threshold on held-out ones (M, D).

        With no held-out songs the training songs calibrate (their distances are smaller: the
        threshold then flags more held-out songs than ``1 - quantile``).
        """
        train = np.asarray(train, np.float64)
        if train.ndim != 2 or len(train) < 2:
            raise DataError(f"familiarity needs at least 2 training activations (N, D), not {train.shape}")
        mean = train.mean(axis=0)
        fam = cls(mean, np.linalg.inv(shrunk_covariance(train)), np.zeros(0), 0.0)
        calibration = np.asarray(calibration, np.float64)
        reference = np.sort(fam.distances(calibration if len(calibration) else train))
        return cls(mean, fam.precision, reference, float(np.quantile(reference, quantile)))

    def distances(self, activations: np.ndarray) -> np.ndarray:
        """Mahalanobis distances, float64 (n,), of activations (n, D)."""
        h = np.asarray(activations, np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", h, self.precision, h), 0.0))

    def score(self, activations: np.ndarray) -> FamiliarityScores:
        """Distances, percentiles and familiar flags of activations (n, D)."""
        dist = self.distances(activations)
        percentile = 100.0 * np.searchsorted(self.reference, dist, side="left") / max(len(self.reference), 1)
        return FamiliarityScores(
            dist.astype(np.float32), percentile.astype(np.float32), dist <= self.threshold, self.threshold
        )

    def save(self, path: str | Path) -> None:
        atomic_save_npz(Path(path), mean=self.mean, precision=self.precision, reference=self.reference,
                        threshold=np.float64(self.threshold))

    @classmethod
    def load(cls, path: str | Path) -> Familiarity:
        try:
            with np.load(Path(path)) as data:
                return cls(data["mean"], data["precision"], data["reference"], float(data["threshold"]))
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path} is not a readable familiarity model: {exc}") from exc
