"""The song map: 2-D positions of a run's songs, and where a new song lands among them.

The map is the analysis report's t-SNE map when the run has one, else the first two principal
components of the songs' unit-norm audio-predicted factors. A new song (an upload) is projected
by the PCA, or placed at the similarity-weighted mean of its nearest songs on a t-SNE map.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sonicrec.errors import DataError
from sonicrec.factors import Predictions, unit_rows
from sonicrec.recommend import Ranking
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"  # RUN/analysis/report.json of sonicrec.analysis, with the t-SNE map
_MAP_NEIGHBOURS = 5  # a new song lands at the similarity-weighted mean of its nearest mapped songs


@dataclass(frozen=True)
class SongMap:
    """2-D positions of songs: the analysis report's t-SNE map, or PCA of the audio-predicted factors.

    Attributes
    ----------
    ids : (n,) str
    xy : (n, 2) float32
    method : "pca", or "t-SNE, analysis report"
    mean, components : (k,), (2, k) the PCA projection of unit-norm factors (None for other maps)
    """

    ids: np.ndarray
    xy: np.ndarray
    method: str
    mean: np.ndarray | None = None
    components: np.ndarray | None = None

    @classmethod
    def pca(cls, ids: np.ndarray, factors: np.ndarray, *, seed: int = 0, fit_max: int = 50_000) -> SongMap:
        """Map songs by the first two principal components of their unit-norm factors (S, k)."""
        unit = unit_rows(factors)
        rng = np.random.default_rng(seed)
        fit = unit if len(unit) <= fit_max else unit[rng.choice(len(unit), fit_max, replace=False)]
        mean = fit.mean(axis=0)
        components = np.linalg.svd(fit - mean, full_matrices=False)[2][:2]  # (2, k)
        if len(components) < 2:  # one song or one factor: pad with a zero axis
            components = np.vstack([components, np.zeros((2 - len(components), unit.shape[1]))])
        components = components.astype(np.float32)
        return cls(np.asarray(ids).astype(str), (unit - mean) @ components.T, "pca", mean, components)

    @classmethod
    def from_report(cls, path: Path) -> SongMap:
        """The t-SNE map of the analysis report: ``map.points`` of RUN/analysis/report.json, each
        ``{"track_id", "x", "y", ...}``."""
        try:
            points = json.loads(path.read_text(encoding="utf-8"))["map"]["points"]
            ids = np.asarray([p["track_id"] for p in points]).astype(str)
            xy = np.asarray([[p["x"], p["y"]] for p in points], dtype=np.float32).reshape(-1, 2)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: no map points with track_id, x and y ({exc})") from exc
        if not len(ids) or not np.isfinite(xy).all():
            raise DataError(f"{path}: the map has no points, or coordinates that are not finite")
        return cls(ids, xy, "t-SNE, analysis report")

    def sample_rows(self, max_points: int, *, seed: int = 0) -> np.ndarray:
        """(m,) sorted rows of at most ``max_points`` songs: all of them, or a seeded sample."""
        rows = np.arange(len(self.ids))
        if len(rows) > max_points:
            rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_points, replace=False))
        return rows

    def place(self, factors: np.ndarray, neighbours: Ranking) -> tuple[float, float] | None:
        """Where a new song with ``factors`` (k,) lands: its PCA projection, or else the
        similarity-weighted mean of its nearest songs on the map (None if none of them is)."""
        if self.components is not None:
            x, y = (unit_rows(factors.reshape(1, -1))[0] - self.mean) @ self.components.T
            return float(x), float(y)
        row = {s: i for i, s in enumerate(self.ids.tolist())}
        hits = [(row[s], w) for s, w in zip(neighbours.ids.tolist(), neighbours.scores.tolist(), strict=True)
                if s in row][:_MAP_NEIGHBOURS]
        if not hits:
            return None
        weights = np.maximum([w for _, w in hits], 1e-3)
        x, y = np.average(self.xy[[r for r, _ in hits]], axis=0, weights=weights)
        return float(x), float(y)


def load_song_map(run: RunDir, model: str, n_factors: int) -> SongMap:
    """The analysis report's t-SNE map when present and valid, else PCA of RUN/predictions/MODEL.npz."""
    path = run.analysis / REPORT_FILE
    if path.is_file():
        try:
            return SongMap.from_report(path)
        except DataError as exc:
            log.warning("%s; mapping the predicted factors with PCA instead", exc)
    predicted = Predictions.load(run.prediction(model), n_factors=n_factors)
    return SongMap.pca(predicted.song_ids, predicted.factors)
