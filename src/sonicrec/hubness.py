"""Hubness reduction for nearest-neighbour retrieval: mutual proximity with Gaussian similarity models.

In high-dimensional spaces some points ("hubs") are among the nearest neighbours of very many
queries (Radovanović, Nanopoulos & Ivanović, JMLR 2010), and factors predicted from audio make it
worse: they crowd towards the average taste, so the few songs near that region turn up in almost
every list. Mutual proximity (Schnitzer, Flexer, Schedl & Widmer, *Local and global scaling reduce
hubs in space*, JMLR 2012) asks instead whether query and candidate are close *for each other*:
how unusual the similarity s = q . y is among the query's similarities to all candidates, and
among the candidate's similarities to all queries::

    MP(q, y) = Phi(z_q) Phi(z_y),   z_q = (s - mu_q) / sigma_q,   z_y = (s - mu_y) / sigma_y

with Phi the standard normal CDF. As in their "MP Gaussian, independent" variant the similarity
distributions are Gaussian; here their means and variances come in closed form from the mean m and
covariance C of a set of vectors (:class:`Moments`): over vectors p, ``q . p`` has mean ``q . m`` and
variance ``q' C q``. A hub is close to everything, so its mu_y is high and a query's ordinary
similarity to it is no longer special; z_q alone is the per-group z-score the Recommender uses to
merge played and never-played songs fairly.

>>> m = Moments.of(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
>>> [round(float(z), 3) for z in m.z_scores(np.array([1.0, 0.0]), np.array([1.0]))]
[0.577]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

_MIN_STD = 1e-6


@dataclass(frozen=True)
class Moments:
    """Mean (k,) and covariance (k, k) of a set of vectors: the Gaussian model of similarities to it."""

    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def of(cls, vectors: np.ndarray) -> Moments:
        """The moments of ``vectors`` (n, k); a set of fewer than two gives mean 0, identity covariance."""
        vectors = np.asarray(vectors, np.float64)
        k = vectors.shape[1]
        if len(vectors) < 2:
            return cls(np.zeros(k), np.eye(k))
        return cls(vectors.mean(axis=0), np.cov(vectors, rowvar=False))

    def z_scores(self, vectors: np.ndarray, similarities: np.ndarray) -> np.ndarray:
        """How far each similarity ``v . x`` stands above the mean of ``v . p`` over the set, in stds.

        Parameters
        ----------
        vectors : (k,) one vector v for all similarities, or (n, k) one per similarity
        similarities : (n,) the similarities v . x to standardise

        Returns
        -------
        float32 (n,)
        """
        v = np.asarray(vectors, np.float64)
        mean = v @ self.mean
        var = np.einsum("...i,ij,...j->...", v, self.cov, v)
        std = np.sqrt(np.maximum(var, _MIN_STD**2))
        return ((np.asarray(similarities, np.float64) - mean) / std).astype(np.float32)


    def z_scores_rows(self, vectors: np.ndarray, similarities: np.ndarray) -> np.ndarray:
        """:meth:`z_scores` of many vectors at once: ``vectors`` (B, k), one per row of
        ``similarities`` (B, n) -> float32 (B, n)."""
        v = np.asarray(vectors, np.float64)
        mean = v @ self.mean
        std = np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", v, self.cov, v), _MIN_STD**2))
        return ((np.asarray(similarities, np.float64) - mean[:, None]) / std[:, None]).astype(np.float32)


def mutual_proximity(z_query: np.ndarray, z_candidate: np.ndarray) -> np.ndarray:
    """MP = Phi(z_query) Phi(z_candidate), float32 in [0, 1] (module docstring)."""
    product = ndtr(np.asarray(z_query, np.float64)) * ndtr(np.asarray(z_candidate, np.float64))
    return product.astype(np.float32)


def hub_share(lists: Iterable[Iterable[str]]) -> tuple[float, str | None]:
    """The share of lists holding the most frequent item, and that item (None for no lists)."""
    lists = [set(items) for items in lists]
    counts = Counter(item for items in lists for item in items)
    if not counts:
        return 0.0, None
    item, count = counts.most_common(1)[0]
    return count / len(lists), item

