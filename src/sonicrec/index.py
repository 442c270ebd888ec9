"""Nearest-neighbour search over latent factors: HNSW (voyager) for large sets, exact numpy below.

Vectors are keyed by string ids (track or user ids); voyager's integer id of a vector is its
position in :attr:`VectorIndex.ids`. Two metrics:

- ``"cosine"``: cosine similarity (similar songs, and a user's ranking over unit-norm song factors);
- ``"ip"``: inner product (the users most likely to enjoy a song). voyager's InnerProduct space turns
  it into a nearest-neighbour search with the order-preserving augmentation of Bachrach et al. (2014),
  one extra coordinate ``sqrt(max_norm**2 - |x|**2)``; vectors are inserted largest norm first so
  ``max_norm`` is fixed before the graph grows. A later :meth:`VectorIndex.add` of a vector with a
  larger norm still scores exactly, but the graph around older vectors is a little less well built.

With ``backend="auto"`` an index searches exactly while it holds fewer than
``IndexConfig.exact_below`` vectors (or when voyager is not installed) and builds the HNSW graph
as soon as it grows past that size.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from sonicrec.config import IndexConfig
from sonicrec.errors import DataError, require
from sonicrec.factors import unit_rows
from sonicrec.io import atomic_save_npz, load_npz

log = logging.getLogger(__name__)

METRICS = ("cosine", "ip")
BACKENDS = ("auto", "voyager", "exact")
_FORMAT = 1
_CHUNK = 20_000  # vectors per voyager insertion call (progress-bar granularity)


def voyager_available() -> bool:
    """Whether the optional ANN backend (``pip install 'sonicrec[ann]'``) can be imported."""
    try:
        import voyager  # noqa: F401
    except ImportError:
        return False
    return True


class VectorIndex:
    """Top-n search over string-keyed vectors by cosine similarity or inner product.

    >>> idx = VectorIndex.build(["a", "b"], np.eye(2, dtype=np.float32), metric="ip")
    >>> idx.query(np.array([0.2, 1.0], dtype=np.float32), 1)[0].tolist()
    ['b']

    Parameters
    ----------
    n_dims : vector length
    metric : "cosine" or "ip"
    backend : "auto" (exact below ``config.exact_below`` vectors, voyager from there), "voyager"
        (always HNSW; needs the ``ann`` extra) or "exact" (numpy, always)
    config : HNSW parameters and the size threshold; assigning a new config changes the ``ef``
        of later queries (``m`` and ``ef_construction`` are fixed once the graph is built)
    source : free text stored with the index (e.g. a hash of what it was built from)
    """

    def __init__(
        self,
        n_dims: int,
        *,
        metric: str = "cosine",
        backend: str = "auto",
        config: IndexConfig | None = None,
        source: str = "",
    ) -> None:
        if metric not in METRICS:
            raise DataError(f"index metric {metric!r} not in {METRICS}")
        if backend not in BACKENDS:
            raise DataError(f"index backend {backend!r} not in {BACKENDS}")
        if n_dims <= 0:
            raise DataError(f"index needs vectors of positive length, got n_dims={n_dims}")
        if backend == "voyager":
            require("voyager", "ann")
        self.n_dims = int(n_dims)
        self.metric = metric
        self.requested_backend = backend
        self.config = config or IndexConfig()
        self.source = source
        self._ids = np.empty(0, dtype=str)
        self._row: dict[str, int] = {}
        self._matrix = np.empty((0, self.n_dims), dtype=np.float32)  # exact backend only
        self._graph = None  # voyager.Index once the HNSW backend is in use

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        ids: Iterable[str],
        vectors: np.ndarray,
        *,
        metric: str = "cosine",
        backend: str = "auto",
        config: IndexConfig | None = None,
        source: str = "",
        show_progress: bool = False,
    ) -> VectorIndex:
        """An index over ``vectors`` (n, d) float keyed by ``ids`` (n,) str."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise DataError(f"index vectors must be a 2-D array, got shape {vectors.shape}")
        index = cls(vectors.shape[1], metric=metric, backend=backend, config=config, source=source)
        index.add(ids, vectors, show_progress=show_progress)
        return index

    def add(self, ids: Iterable[str], vectors: np.ndarray, *, show_progress: bool = False) -> None:
        """Add new vectors (n, d) under new ids (n,); an id already in the index is an error."""
        ids = np.asarray([str(i) for i in ids], dtype=str)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(ids), self.n_dims):
            raise DataError(
                f"index.add: expected vectors of shape ({len(ids)}, {self.n_dims}), got {vectors.shape}"
            )
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise DataError(f"index.add: vector of id {ids[bad][0]!r} is not finite (NaN or inf)")
        clash = [i for i in ids if i in self._row]
        if clash or len(set(ids.tolist())) != len(ids):
            shown = clash[0] if clash else _first_duplicate(ids)
            raise DataError(f"index.add: id {shown!r} is already in the index (ids must be unique)")
        if self.metric == "cosine":
            vectors = unit_rows(vectors)
        start = len(self._ids)
        self._ids = np.concatenate([self._ids, ids])
        self._row.update((i, start + r) for r, i in enumerate(ids.tolist()))
        if self._graph is not None:
            self._insert(np.arange(start, len(self._ids)), vectors, show_progress)
        elif self._wants_graph(len(self._ids)):
            everything = np.concatenate([self._matrix, vectors])
            self._matrix = np.empty((0, self.n_dims), dtype=np.float32)
            self._graph = self._new_graph()
            log.info("building an HNSW index over %d vectors (%s)", len(everything), self.metric)
            self._insert(np.arange(len(everything)), everything, show_progress)
        else:
            self._matrix = np.concatenate([self._matrix, vectors])

    def _wants_graph(self, n: int) -> bool:
        if self.requested_backend != "auto":
            return self.requested_backend == "voyager"
        if n < self.config.exact_below:
            return False
        if not voyager_available():
            log.warning(
                "voyager is not installed: exact search over %d vectors (pip install 'sonicrec[ann]')", n
            )
            return False
        return True

    def _new_graph(self):
        voyager = require("voyager", "ann")
        space = voyager.Space.Cosine if self.metric == "cosine" else voyager.Space.InnerProduct
        graph = voyager.Index(
            space,
            num_dimensions=self.n_dims,
            M=self.config.m,
            ef_construction=self.config.ef_construction,
            random_seed=self.config.seed,
        )
        graph.ef = self.config.ef
        return graph

    def _insert(self, labels: np.ndarray, vectors: np.ndarray, show_progress: bool) -> None:
        if self.metric == "ip":  # largest norm first: fixes voyager's max_norm before the graph grows
            order = np.argsort(-np.linalg.norm(vectors, axis=1), kind="stable")
            labels, vectors = labels[order], vectors[order]
        with tqdm(total=len(labels), desc="index", unit="vec", disable=not show_progress) as bar:
            for lo in range(0, len(labels), _CHUNK):
                hi = min(lo + _CHUNK, len(labels))
                self._graph.add_items(np.ascontiguousarray(vectors[lo:hi]), labels[lo:hi].tolist())
                bar.update(hi - lo)

    # --- queries ------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The search in use now: "voyager" or "exact"."""
        return "exact" if self._graph is None else "voyager"

    @property
    def graph(self):
        """The ``voyager.Index`` behind a "voyager" backend (None while searching exactly)."""
        return self._graph

    @property
    def ids(self) -> np.ndarray:
        """(n,) str, in insertion order."""
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item: object) -> bool:
        return item in self._row

    def query(
        self, vectors: np.ndarray, n: int, *, exclude: Iterable[str] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best ids for each query vector, best first, leaving out ``exclude``.

        Parameters
        ----------
        vectors : (d,) or (B, d) query vector(s)
        n : results per query (fewer when the index holds fewer vectors)
        exclude : ids never returned (ids not in the index are ignored)

        Returns
        -------
        ids : (n,) or (B, n) str
        scores : (n,) or (B, n) float32: cosine similarity or inner product
        """
        q = np.asarray(vectors, dtype=np.float32)
        single = q.ndim == 1
        q = np.atleast_2d(q)
        if q.ndim != 2 or q.shape[1] != self.n_dims:
            raise DataError(f"query vectors must have length {self.n_dims}, got shape {q.shape}")
        if n <= 0:
            raise DataError(f"number of results must be positive, got {n}")
        excluded = np.fromiter(
            {self._row[i] for i in exclude if i in self._row}, dtype=np.int64
        )
        n_out = min(n, len(self) - len(excluded))
        if n_out <= 0:
            rows = np.empty((len(q), 0), dtype=np.int64)
            scores = np.empty((len(q), 0), dtype=np.float32)
        elif self._graph is None:
            rows, scores = self._query_exact(q, n_out, excluded)
        else:
            rows, scores = self._query_graph(q, n_out, excluded)
        ids = self._ids[rows]
        return (ids[0], scores[0]) if single else (ids, scores)

    def query_rows(
        self, vectors: np.ndarray, n: int, *, exclude: sp.csr_matrix | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best rows for each of many queries, each leaving out its own rows: a batched
        :meth:`query` (row r is ``ids[r]``), for precomputing answers.

        Row i equals ``query(vectors[i], n, exclude=ids[exclude[i].indices])`` (exactly for the
        exact backend; for HNSW while ``n`` plus the most rows left out of one query is at most
        ``config.ef``, since a query's search depth is ``max(ef, k)``).

        Parameters
        ----------
        vectors : (B, d) query vectors
        n : results per query
        exclude : (B, len(self)) sparse matrix whose non-zero entries are rows never returned

        Returns
        -------
        rows : (B, n) int64, best first; -1 where fewer than ``n`` rows remain
        scores : (B, n) float32; -inf where ``rows`` is -1
        """
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.shape[1] != self.n_dims or n <= 0:
            raise DataError(f"query_rows: vectors of length {self.n_dims} and n > 0, got {q.shape}, n={n}")
        if exclude is None:
            exclude = sp.csr_matrix((len(q), len(self)), dtype=np.float32)
        n_out = min(n, len(self))
        if n_out == 0:
            rows, scores = np.empty((len(q), 0), np.int64), np.empty((len(q), 0), np.float32)
        elif self._graph is None:
            rows, scores = self._query_exact(q, n_out, exclude.nonzero())
        else:
            rows, scores = self._query_graph(q, n_out, exclude)
        rows = np.where(np.isfinite(scores), rows, -1)
        pad = n - rows.shape[1]
        return (np.pad(rows, ((0, 0), (0, pad)), constant_values=-1),
                np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32))

    def _query_exact(self, q: np.ndarray, n: int, excluded) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``n``; ``excluded``: rows left out of every query, or (query, row) index pairs."""
        if self.metric == "cosine":
            q = unit_rows(q)
        scores = q @ self._matrix.T  # (B, N)
        if isinstance(excluded, tuple):
            scores[excluded] = -np.inf
        else:
            scores[:, excluded] = -np.inf
        if n < scores.shape[1]:
            top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
            top.sort(axis=1)  # ties are broken by row number below
        else:
            top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")[:, :n]
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)

    def _query_graph(self, q: np.ndarray, n: int, excluded) -> tuple[np.ndarray, np.ndarray]:
        """HNSW top ``n``; ``excluded``: rows left out of every query, or a (B, N) sparse matrix."""
        per_query = sp.issparse(excluded)
        most = int(np.diff(excluded.indptr).max(initial=0)) if per_query else len(excluded)
        k = min(n + most, len(self))
        labels, distances = self._graph.query(
            q[0] if len(q) == 1 else q,
            k=k,
            num_threads=1 if len(q) == 1 else -1,
            query_ef=max(self.config.ef, k),
        )
        labels = np.atleast_2d(labels).astype(np.int64)
        scores = 1.0 - np.atleast_2d(distances)  # both spaces: distance = 1 - similarity
        if most == 0:
            return labels[:, :n], scores[:, :n]
        if per_query:  # (query, row) pairs as one code each
            pairs = excluded.tocoo()
            codes = np.arange(len(q))[:, None] * len(self) + labels
            keep = ~np.isin(codes, pairs.row.astype(np.int64) * len(self) + pairs.col)
        else:
            keep = ~np.isin(labels, excluded)
        # each row keeps its first n non-excluded hits (a stable sort moves them to the front)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :n]
        scores = np.where(np.take_along_axis(keep, order, axis=1), np.take_along_axis(scores, order, axis=1),
                          -np.inf)
        return np.take_along_axis(labels, order, axis=1), scores

    # --- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the index as one ``.npz`` (atomically; the HNSW graph as voyager's bytes)."""
        arrays = {
            "format": np.array(_FORMAT),
            "ids": self._ids,
            "metric": np.array(self.metric),
            "backend": np.array(self.requested_backend),
            "config": np.array(json.dumps(dataclasses.asdict(self.config))),
            "source": np.array(self.source),
            "n_dims": np.array(self.n_dims),
        }
        if self._graph is None:
            arrays["vectors"] = self._matrix
        else:
            arrays["graph"] = np.frombuffer(self._graph.as_bytes(), dtype=np.uint8)
        atomic_save_npz(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        """Read an index written by :meth:`save`."""
        try:
            data = load_npz(path)
        except FileNotFoundError:
            raise DataError(f"no index at {path}") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is not a sonicrec index file: {exc}") from exc
        if int(data.get("format", -1)) != _FORMAT:
            raise DataError(f"{path} is not a sonicrec index file (format {_FORMAT}); rebuild it")
        index = cls(
            int(data["n_dims"]),
            metric=str(data["metric"]),
            backend=str(data["backend"]),
            config=IndexConfig(**json.loads(str(data["config"]))),
            source=str(data["source"]),
        )
        index._ids = data["ids"].astype(str)
        index._row = {i: r for r, i in enumerate(index._ids.tolist())}
        if "graph" in data:
            voyager = require("voyager", "ann")
            index._graph = voyager.Index.load(io.BytesIO(data["graph"].tobytes()))
            index._graph.ef = index.config.ef
        else:
            index._matrix = data["vectors"].astype(np.float32, copy=False)
        return index


def _first_duplicate(ids: np.ndarray) -> str:
    seen: set[str] = set()
    for i in ids.tolist():
        if i in seen:
            return i
        seen.add(i)
    return ""
