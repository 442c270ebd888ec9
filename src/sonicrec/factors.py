"""Latent factors: the WMF factors of users and songs with the song split (:class:`Factors`), and
the song factors a model predicts from audio (:class:`Predictions`), each saved as one ``.npz``
(no pickle)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sonicrec.errors import DataError, RunStage, UnknownIdError
from sonicrec.io import atomic_save_npz, load_npz

SPLITS = ("train", "valid", "test")


def unit_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero). (n, k) -> (n, k)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


@dataclass
class Factors:
    """WMF factors. Song factors of valid/test songs are folded in with the users fixed.

    Attributes
    ----------
    user_ids : (U,) str — U may be 0: song factors imported without users (similar songs and
        the regression work, ranking users does not)
    song_ids : (S,) str
    user_factors : (U, k) float32
    song_factors : (S, k) float32 — raw; popularity lives in the norm
    split : (S,) str, each one of "train", "valid", "test"
    """

    user_ids: np.ndarray
    song_ids: np.ndarray
    user_factors: np.ndarray
    song_factors: np.ndarray
    split: np.ndarray

    def __post_init__(self) -> None:
        self.user_ids = np.asarray(self.user_ids).astype(str)
        self.song_ids = np.asarray(self.song_ids).astype(str)
        self.user_factors = np.asarray(self.user_factors, dtype=np.float32)
        self.song_factors = np.asarray(self.song_factors, dtype=np.float32)
        if self.user_factors.size == 0 and self.song_factors.ndim == 2:
            self.user_factors = self.user_factors.reshape(0, self.song_factors.shape[1])
        self.split = np.asarray(self.split).astype(str)
        n_users, n_songs = len(self.user_ids), len(self.song_ids)
        if self.user_factors.shape[0] != n_users or self.song_factors.shape[0] != n_songs:
            raise DataError("factor rows do not match the number of ids")
        if self.user_factors.shape[1] != self.song_factors.shape[1]:
            raise DataError("user and song factors differ in dimension")
        if self.split.shape != (n_songs,) or not np.isin(self.split, SPLITS).all():
            raise DataError(f"split must give one of {SPLITS} per song")
        if not (np.isfinite(self.user_factors).all() and np.isfinite(self.song_factors).all()):
            raise DataError("factors hold NaN/infinite values: refit them")
        self._song_index = {s: i for i, s in enumerate(self.song_ids)}
        self._user_index = {u: i for i, u in enumerate(self.user_ids)}

    @property
    def n_factors(self) -> int:
        return self.song_factors.shape[1]

    @property
    def has_users(self) -> bool:
        """Whether there are user factors (imported song factors may come without them)."""
        return len(self.user_ids) > 0

    @property
    def song_factors_unit(self) -> np.ndarray:
        """(S, k) song factors with unit L2 norm: the CNN's regression target."""
        return unit_rows(self.song_factors)

    def songs(self, split: str) -> np.ndarray:
        """Song ids of one split, (n,) str."""
        return self.song_ids[self.split == split]

    def song_index(self, song_ids) -> np.ndarray:
        """Row numbers of song ids; unknown ids raise :class:`UnknownIdError`."""
        return _lookup(self._song_index, song_ids, "song")

    def user_index(self, user_ids) -> np.ndarray:
        return _lookup(self._user_index, user_ids, "user")

    def save(self, path: str | Path) -> None:
        atomic_save_npz(
            path,
            user_ids=self.user_ids,
            song_ids=self.song_ids,
            user_factors=self.user_factors,
            song_factors=self.song_factors,
            split=self.split,
        )

    @classmethod
    def load(cls, path: str | Path) -> Factors:
        try:
            data = load_npz(path)
        except (FileNotFoundError, NotADirectoryError):
            raise DataError(f"no factors at {path}", remedy=RunStage("factorize")) from None
        return cls(
            user_ids=data["user_ids"],
            song_ids=data["song_ids"],
            user_factors=data["user_factors"],
            song_factors=data["song_factors"],
            split=data["split"],
        )


@dataclass
class Predictions:
    """Song factors predicted by one model (RUN/predictions/NAME.npz: ``song_ids``, ``factors``).

    Attributes
    ----------
    song_ids : (S,) str, unique
    factors : (S, k) float32, finite
    extra : name -> (S,) array saved beside them, e.g. ``paths``, ``familiar`` of audio files
    """

    song_ids: np.ndarray
    factors: np.ndarray
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.song_ids = np.asarray(self.song_ids).astype(str)
        self.factors = np.asarray(self.factors, dtype=np.float32)
        self.extra = {name: np.asarray(values) for name, values in self.extra.items()}
        n = len(self.song_ids)
        if self.song_ids.ndim != 1 or self.factors.ndim != 2 or len(self.factors) != n:
            raise DataError(f"predicted factors have shape {self.factors.shape}, expected ({n}, k), "
                            "one row per song id")
        if not np.isfinite(self.factors).all():
            raise DataError("predicted factors hold NaN/infinite values")
        if len(np.unique(self.song_ids)) < n:
            raise DataError("predictions repeat song ids")
        wrong = [name for name, values in self.extra.items() if name in _PREDICTION_KEYS or len(values) != n]
        if wrong:
            raise DataError(f"extra prediction arrays {wrong} are not one value per song")

    @property
    def n_factors(self) -> int:
        return self.factors.shape[1]

    def save(self, path: str | Path) -> None:
        atomic_save_npz(path, song_ids=self.song_ids, factors=self.factors, **self.extra)

    @classmethod
    def load(cls, path: str | Path, *, n_factors: int | None = None) -> Predictions:
        """Read and check a predictions file; ``n_factors``: the dimension it must have (that of the
        run's CF factors). Raises :class:`DataError` naming the file."""
        try:
            data = load_npz(path)
            song_ids, factors = data.pop("song_ids"), data.pop("factors")
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{path}: not a predictions file with song_ids and factors ({exc}); delete "
                            "it or re-run the stage that wrote it") from exc
        try:
            predictions = cls(song_ids, factors, data)
        except DataError as exc:
            raise DataError(f"{path}: {exc}; re-run the stage that wrote it") from exc
        if n_factors is not None and predictions.n_factors != n_factors:
            raise DataError(
                f"{path}: factors have shape {predictions.factors.shape}, expected "
                f"({len(predictions.song_ids)}, {n_factors}) to match RUN/cf/factors.npz; re-run the "
                "stage that wrote it"
            )
        return predictions


_PREDICTION_KEYS = ("song_ids", "factors")


def _lookup(index: dict[str, int], ids, kind: str) -> np.ndarray:
    ids = [ids] if isinstance(ids, str) else list(ids)
    missing = [i for i in ids if i not in index]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise UnknownIdError(f"unknown {kind} id(s): {shown}" + (" ..." if len(missing) > 5 else ""))
    return np.fromiter((index[i] for i in ids), dtype=np.int64, count=len(ids))
