"""The Recommender: songs for a user, the audience of a new song, similar songs, and outlier flags.

Every song is a unit vector in the WMF latent space. Warm songs (the train split, which the CF model
was fitted on) use their true CF factors; cold songs (the valid/test split, and new songs nobody has
played) use the factors a model predicts from their audio. The CNN predicts unit-norm factors, so
warm factors are unit-normalised too: songs are ranked by direction only, without the popularity
that WMF puts in a song's norm, which gives new and unknown artists the same chance as hits.

Raw scores: a user's score for a song is ``x_u . y_i / |y_i|`` (recommend, audience); two songs'
similarity is their cosine (similar). By default (``raw=False``) two corrections apply:

* **Fair merge** (recommend, similar): warm and cold songs are merged by how far each stands above
  its own group (z-scores), since audio-predicted factors crowd towards the average taste and raw
  scores would fill the lists with cold songs.
* **Hubness reduction** (similar, audience): mutual proximity (:mod:`sonicrec.hubness`; Schnitzer
  et al., JMLR 2012): the score is ``Phi(z_q) Phi(z_y)``, where z_q is that fair-merge z-score of the
  similarity among the query's similarities to the candidate's group, and z_y the z-score of the
  same similarity among the candidate's similarities to the audio-predicted song factors (the kind
  of vector an audio query is). Songs and users that are close to every prediction stop turning up
  in almost every list.

Retrieval has one path: a query's song (a track id, or an audio file the model predicts factors
for) is resolved to its vector first, then scored by :meth:`Recommender.similar_to_vector` or
:meth:`Recommender.audience_of_vector`, which the web service's uploads call directly.

Searches go through :class:`sonicrec.index.VectorIndex` (exact below ``IndexConfig.exact_below``
vectors, HNSW above), one index for warm songs, one for cold songs and one for users; large
indexes are cached in ``RUN/index/MODEL/``. With hubness reduction an exact index re-ranks all its
vectors, an HNSW one its ``max(4 n, 100)`` nearest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sonicrec.catalog import Catalog
from sonicrec.config import IndexConfig
from sonicrec.errors import DataError, RunStage, UnknownIdError
from sonicrec.factors import Factors, Predictions, unit_rows
from sonicrec.hubness import Moments, mutual_proximity
from sonicrec.index import VectorIndex
from sonicrec.interactions import PlayMatrix, read_play_matrix
from sonicrec.neighbours import NeighbourLists
from sonicrec.rundir import RunDir
from sonicrec.warmup import DEFAULT_BELOW

log = logging.getLogger(__name__)

Query = str | Path  # a track id, or the path of an audio file
_MAD_FLOOR = 0.01  # smallest spread (cosine distance) used by flag_outliers' robust z-score
_SAME_SONG = 1 - 1e-5  # cosine above which two factor vectors are one recording's
_REMEMBERED_FILES = 64  # audio files whose familiarity the Recommender keeps
_MUTUAL_BLOCK = 1 << 18  # candidates re-ranked at once by a batch of mutual-proximity queries


class Ranking(NamedTuple):
    """Ranked ids with their scores, best first (unpacks like implicit's ``(ids, scores)``)."""

    ids: np.ndarray  # (n,) str
    scores: np.ndarray  # (n,) float32


@dataclass(frozen=True)
class OutlierFlags:
    """How far each song of a list sounds from the rest of the list.

    Attributes
    ----------
    ids : (n,) str, in the order given
    distance : (n,) float32, ``1 - cos(p_i, mean of the others' p_j)`` with p the unit-norm
        factors predicted from audio (NaN for a song without a prediction)
    score : (n,) float32, robust z-score of ``distance`` within the list (median / 1.4826 MAD)
    flagged : (n,) bool, ``score > threshold``
    """

    ids: np.ndarray
    distance: np.ndarray
    score: np.ndarray
    flagged: np.ndarray


class AudioPredictor(Protocol):
    """What the Recommender needs of :class:`sonicrec.predict.Predictor` (which also has
    ``assess_files``, used when present, for :meth:`Recommender.familiarity`)."""

    def predict_files(self, paths: list[Path]) -> np.ndarray: ...


class Recommender:
    """Recommendations over warm (true CF) and cold (audio-predicted) songs together.

    Parameters
    ----------
    factors : WMF factors with the song split
    predicted_ids : (P,) str, songs a model has predicted factors for (any split, or new songs)
    predicted_factors : (P, k) float, their predicted factors
    plays : the run's play counts (who played which train song is all that is used)
    catalog : path of the catalog SQLite file, for :meth:`metadata`
    predictor : turns audio files into factors; loaded from ``checkpoint`` when first needed if None
    checkpoint : the model checkpoint for audio-file queries
    index_config : nearest-neighbour search parameters
    index_dir : where indexes too large for exact search are cached (None: not cached)
    show_progress : progress bars while building large indexes
    blended : (ids (n,) str, vectors (n, k)): songs placed by the warm-up blend of their first
        plays and their audio (:mod:`sonicrec.warmup`) instead of their CF factors or prediction
    """

    def __init__(
        self,
        factors: Factors,
        predicted_ids: np.ndarray,
        predicted_factors: np.ndarray,
        plays: PlayMatrix,
        *,
        catalog: Path | None = None,
        predictor: AudioPredictor | None = None,
        checkpoint: Path | None = None,
        index_config: IndexConfig | None = None,
        index_dir: Path | None = None,
        show_progress: bool = False,
        blended: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        predicted_ids = np.asarray(predicted_ids).astype(str)
        predicted_factors = np.asarray(predicted_factors, dtype=np.float32)
        if predicted_factors.shape != (len(predicted_ids), factors.n_factors):
            raise DataError(
                f"predicted factors have shape {predicted_factors.shape}, expected "
                f"({len(predicted_ids)}, {factors.n_factors}) to match the CF factors"
            )
        self.factors = factors
        self.catalog = catalog
        self.checkpoint = checkpoint
        self._predictor = predictor
        self._config = index_config or IndexConfig()
        self._index_dir = index_dir
        self._show_progress = show_progress
        self._familiarity: dict[str, dict[str, Any] | None] = {}  # recent audio files' (familiarity)

        # audio-predicted factors of every song that has them (flag_outliers, cold songs)
        self._predicted_unit = unit_rows(predicted_factors)
        self._predicted_row = {s: r for r, s in enumerate(predicted_ids.tolist())}

        is_warm = factors.split == "train"
        self.warm_ids = factors.song_ids[is_warm]
        self._warm_unit = factors.song_factors_unit[is_warm]
        is_cold = ~np.isin(predicted_ids, self.warm_ids)
        self.cold_ids = predicted_ids[is_cold]
        missing = np.setdiff1d(factors.song_ids[~is_warm], self.cold_ids)
        if len(missing):
            log.warning(
                "%d held-out songs have no predicted factors and cannot be recommended (e.g. %r)",
                len(missing), missing[0],
            )
        self._warm_row = {s: r for r, s in enumerate(self.warm_ids.tolist())}
        self._cold_row = {s: r for r, s in enumerate(self.cold_ids.tolist())}
        self._cold_unit = self._predicted_unit[is_cold]
        known = pd.Index(factors.song_ids).get_indexer(self.cold_ids)  # -1: a new song, never played
        self._cold_split = np.where(known >= 0, factors.split[np.maximum(known, 0)], "new")
        self._song_ids = np.concatenate([self.warm_ids, self.cold_ids])  # the rows of precomputed lists
        self._lists: NeighbourLists | None = None
        self.blended_ids = self._place_blended(blended)

        self._songs_warm = self._index("songs-train", self.warm_ids, self._warm_unit, "cosine")
        self._songs_cold = self._index("songs-cold", self.cold_ids, self._cold_unit, "cosine")
        self._users = self._index("users", factors.user_ids, factors.user_factors, "ip")
        self._queries = Moments.of(self._predicted_unit)  # what audio queries look like (hubness)
        self._groups = [
            _Group(self._songs_warm, self._warm_unit, self._queries),
            _Group(self._songs_cold, self._cold_unit, self._queries),
        ]
        self._user_group = _Group(self._users, factors.user_factors, self._queries)
        self._plays = plays.played(factors.user_ids, self.warm_ids)  # (U, W) CSR
        self._listeners = self._plays.T.tocsr()  # (W, U)

    def _place_blended(self, blended: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Put the warm-up blend's vectors in place of the songs' own; returns their ids."""
        if blended is None:
            return np.empty(0, dtype=str)
        ids, vectors = np.asarray(blended[0]).astype(str), unit_rows(np.asarray(blended[1], np.float32))
        for song, vector in zip(ids.tolist(), vectors, strict=True):
            if song in self._warm_row:
                self._warm_unit[self._warm_row[song]] = vector
            elif song in self._cold_row:
                self._cold_unit[self._cold_row[song]] = vector
            else:
                raise self._unknown_song(song)
        return ids

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        model: str = "cnn-mse",
        *,
        predictor: AudioPredictor | None = None,
        show_progress: bool = False,
        warmup_below: int = DEFAULT_BELOW,
    ) -> Recommender:
        """The Recommender of a run directory, with the predicted factors of model ``model``.

        Audio-file queries use ``predictor`` if given, else the model's checkpoint (loaded lazily).
        Train songs with fewer than ``warmup_below`` listeners, and songs outside the CF factors that
        have plays, are placed by the warm-up blend of their plays and their audio
        (:func:`sonicrec.warmup.warmup_vectors`); 0 turns the blend off.
        """
        from sonicrec.warmup import warmup_vectors

        run = RunDir(run_dir)
        config = run.read_config()
        factors = Factors.load(run.factors)
        path = run.prediction(model)
        if not path.exists():
            known = sorted(p.stem for p in run.predictions.glob("*.npz"))
            raise DataError(
                f"no predictions of model {model!r} at {path}"
                + (f" (there are: {', '.join(known)})" if known else ""),
                remedy=RunStage("predict", run.root, model),
            )
        predictions = Predictions.load(path, n_factors=factors.n_factors)
        predicted_ids, predicted = predictions.song_ids, predictions.factors
        plays = (read_play_matrix(run.plays, "parquet", show_progress=show_progress) if run.plays.is_file()
                 else PlayMatrix.empty())  # factors imported without plays
        blended = None
        if warmup_below > 0:
            blended = warmup_vectors(factors, predicted_ids, predicted, plays, config.cf,
                                     below=warmup_below, seed=config.cf.seed)
        rec = cls(
            factors,
            predicted_ids,
            predicted,
            plays,
            catalog=run.catalog if run.catalog.exists() else None,
            predictor=predictor,
            checkpoint=run.checkpoint(model),
            index_config=config.index,
            index_dir=run.index / model,
            show_progress=show_progress,
            blended=blended,
        )
        lists_dir = run.neighbours / model
        if lists_dir.is_dir():
            rec.use_lists(NeighbourLists.load(lists_dir))
        return rec

    # --- the four questions -------------------------------------------------------------------

    def recommend(
        self,
        user: str,
        n: int = 10,
        *,
        include_cold: bool = True,
        exclude_played: bool = True,
        raw: bool = False,
    ) -> Ranking:
        """The ``n`` songs ``user`` is most likely to enjoy, warm and never-played songs together.

        Parameters
        ----------
        user : a user id of the CF factors
        n : number of songs
        include_cold : also rank songs nobody has played (valid/test and new songs, by their
            audio-predicted factors)
        exclude_played : leave out the train songs the user has played
        raw : rank by raw score. By default warm and cold songs are merged by how far each stands
            above its own group for this user (z-scores): audio-predicted factors crowd towards the
            average taste, so raw scores favour cold songs (on the demo world they fill about half
            of a top 10 while being a fifth of the catalog).

        Returns
        -------
        Ranking of song ids, scores: z-scores within the song's group, or ``x_u . y_i / |y_i|`` if raw
        """
        row = self._user_row(user)
        if include_cold and exclude_played and not raw and self._lists is not None:
            hit = self._lists.recommend(row, n)
            if hit is not None:
                return Ranking(self._song_ids[hit[0]], hit[1])
        x = self.factors.user_factors[row]
        played = self.warm_ids[self._row_cols(self._plays, row)] if exclude_played else ()
        ids, scores = self._nearest_songs(
            x, n, exclude=played, include_cold=include_cold, mode="raw" if raw else "calibrated"
        )
        return Ranking(ids, (scores * np.linalg.norm(x)).astype(np.float32) if raw else scores)

    def audience(
        self, song: Query, n: int = 10, *, exclude_played: bool = True, raw: bool = False
    ) -> Ranking:
        """The ``n`` users most likely to enjoy a song: a track id or a (new) audio file.

        ``exclude_played`` leaves out the users who already played it (a train song). Returns a
        Ranking of user ids, scores: mutual proximity (module docstring), or ``x_u . y / |y|`` if
        ``raw``.
        """
        self._check_has_users()
        y, track = self._song_vector(song)
        listeners = ()
        if exclude_played and track in self._warm_row:
            listeners = self.factors.user_ids[self._row_cols(self._listeners, self._warm_row[track])]
        return self._audience(y, n, listeners, raw=raw)

    def similar(self, song: Query, n: int = 10, *, raw: bool = False) -> Ranking:
        """A playlist of ``n`` songs like ``song`` (a track id or an audio file).

        A track id comes first (score 1) followed by its ``n - 1`` nearest songs; an audio file's
        playlist is its ``n`` nearest songs (the file's own track first when it is in the run).
        By default songs are scored by mutual proximity (module docstring), which also merges warm
        and cold songs fairly (a new file's raw neighbours are mostly other audio-predicted, cold
        songs); ``raw``: by cosine alone.
        """
        y, track = self._song_vector(song)
        if track is None:
            return self.similar_to_vector(y, n, raw=raw)
        ids, scores = np.array([track]), np.ones(1, dtype=np.float32)
        hit = None
        if n > 1 and not raw and self._lists is not None:
            hit = self._lists.similar(self._song_row(track), n - 1)
        if hit is not None:
            ids, scores = np.concatenate([ids, self._song_ids[hit[0]]]), np.concatenate([scores, hit[1]])
        elif n > 1:
            others = self.similar_to_vector(y, n - 1, exclude=[track], raw=raw)
            ids, scores = np.concatenate([ids, others.ids]), np.concatenate([scores, others.scores])
        return Ranking(ids, scores)

    # --- vector queries: what every id or audio-file query above comes down to ---------------------

    def similar_to_vector(
        self, vector: np.ndarray, n: int = 10, *, exclude: Iterable[str] = (), raw: bool = False
    ) -> Ranking:
        """The ``n`` songs nearest a point of the latent space, e.g. the factors predicted for an upload.

        Parameters
        ----------
        vector : (k,) factors (only the direction counts)
        n : number of songs
        exclude : track ids left out
        raw : score by cosine alone; by default by mutual proximity (module docstring)

        Returns
        -------
        Ranking of song ids (warm and cold merged), scores
        """
        vector = self._checked_query(vector)
        return Ranking(*self._nearest_songs(vector, n, exclude=exclude, mode="raw" if raw else "mutual"))

    def audience_of_vector(
        self, vector: np.ndarray, n: int = 10, *, exclude: Iterable[str] = (), raw: bool = False
    ) -> Ranking:
        """The ``n`` users most likely to enjoy a song whose factors are ``vector`` (k,).

        ``exclude``: user ids left out. Returns a Ranking of user ids, scores: mutual proximity
        (module docstring), or ``x_u . y / |y|`` if ``raw``.
        """
        self._check_has_users()
        return self._audience(unit_rows(self._checked_query(vector).reshape(1, -1))[0], n, exclude, raw=raw)

    def _audience(self, direction: np.ndarray, n: int, exclude, *, raw: bool) -> Ranking:
        """The ``n`` best users for a unit song vector (k,), leaving out the user ids ``exclude``."""
        return Ranking(*self._user_group.scores(direction, n, exclude, mode="raw" if raw else "mutual"))

    def _check_has_users(self) -> None:
        if not self.factors.has_users:
            raise DataError("this run has song factors but no user factors (imported without user factors): "
                            "it cannot rank users")

    def familiarity(self, song: Query) -> dict[str, Any] | None:
        """How far an audio file lies from the songs the model trained on (``FamiliarityScores.as_dict``:
        distance, threshold, percentile, familiar, and a message when unfamiliar); None for a track
        id of the run, or a model without a familiarity model. Remembers the last files asked about,
        so asking after :meth:`similar` or :meth:`audience` does not predict again.
        """
        if isinstance(song, str) and (song in self._warm_row or song in self._cold_row):
            return None
        key = str(Path(song).resolve())
        if key not in self._familiarity:
            self._song_vector(song)
        return self._familiarity.get(key)

    def flag_outliers(self, user_recs: Ranking | list[str], *, threshold: float = 3.0) -> OutlierFlags:
        """Flag the songs of a list (e.g. CF recommendations) whose sound is far from the rest.

        Each song's audio-predicted factors are compared with the mean of the others' (intros,
        outros, covers and remixes share listeners with the songs they belong with, but not their
        sound). Needs at least three songs with predicted factors.
        """
        ids = np.asarray(user_recs.ids if isinstance(user_recs, Ranking) else user_recs).astype(str)
        rows = np.array([self._predicted_row.get(s, -1) for s in ids.tolist()], dtype=np.int64)
        have = rows >= 0
        if have.sum() < 3:
            raise DataError(
                f"flag_outliers needs at least 3 songs with audio-predicted factors, got {int(have.sum())} "
                f"of {len(ids)}", remedy=RunStage("predict"),
            )
        p = self._predicted_unit[rows[have]]  # (m, k)
        others = (p.sum(axis=0) - p) / (len(p) - 1)  # (m, k) mean of the other songs
        distance = np.full(len(ids), np.nan, dtype=np.float32)
        distance[have] = 1.0 - np.sum(p * unit_rows(others), axis=1)
        median = np.median(distance[have])
        spread = max(1.4826 * float(np.median(np.abs(distance[have] - median))), _MAD_FLOOR)
        score = ((distance - median) / spread).astype(np.float32)
        return OutlierFlags(ids, distance, score, np.nan_to_num(score, nan=-np.inf) > threshold)

    # --- every song and every user at once (precomputed by sonicrec.neighbours) ----------------

    def similar_rows(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """What :meth:`similar` answers after the song itself, for many songs at once.

        Parameters
        ----------
        rows : (B,) rows of :attr:`song_ids` (warm songs, then cold songs)
        k : neighbours per song

        Returns
        -------
        neighbours : (B, k) int32 rows of :attr:`song_ids`, best first, the song itself left out
            (-1 pads a row when the catalog is smaller)
        scores : (B, k) float32, mutual proximity as :meth:`similar` scores them
        """
        rows = np.asarray(rows, dtype=np.int64)
        n_warm = len(self.warm_ids)
        warm, cold = rows < n_warm, rows >= n_warm
        vectors = np.empty((len(rows), self.factors.n_factors), np.float32)
        vectors[warm], vectors[cold] = self._warm_unit[rows[warm]], self._cold_unit[rows[cold] - n_warm]
        own, ones = np.arange(len(rows)), np.ones(len(rows), np.float32)
        own_warm = sp.csr_matrix((ones[warm], (own[warm], rows[warm])), shape=(len(rows), n_warm))
        own_cold = sp.csr_matrix((ones[cold], (own[cold], rows[cold] - n_warm)),
                                 shape=(len(rows), len(self.cold_ids)))
        return self._nearest_song_rows(vectors, k, [own_warm, own_cold], "mutual")

    def recommend_rows(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """What :meth:`recommend` answers (cold songs included, played songs left out, calibrated),
        for many users: ``users`` (B,) rows of ``factors.user_ids`` -> (B, n) int32 rows of
        :attr:`song_ids` (-1 pads) and (B, n) float32 z-scores."""
        users = np.asarray(users, dtype=np.int64)
        return self._nearest_song_rows(self.factors.user_factors[users], n, [self._plays[users], None],
                                       "calibrated")

    def _nearest_song_rows(
        self, x: np.ndarray, n: int, exclude: list, mode: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Batched :meth:`_nearest_songs`: (B, n) int32 rows of :attr:`song_ids` and (B, n) scores."""
        norms = np.array([max(float(np.linalg.norm(v)), 1e-12) for v in x], np.float32)  # as one by one
        directions = x / norms[:, None]
        (warm_rows, warm_scores), (cold_rows, cold_scores) = [
            group.scores_rows(directions, n, left_out, mode=mode)
            for group, left_out in zip(self._groups, exclude, strict=True)
        ]
        cold_rows = np.where(cold_rows >= 0, cold_rows + len(self.warm_ids), -1)
        rows = np.concatenate([warm_rows, cold_rows], axis=1)
        scores = np.concatenate([warm_scores, cold_scores], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]  # as _merge: warm before cold on ties
        return (np.take_along_axis(rows, order, axis=1).astype(np.int32),
                np.take_along_axis(scores, order, axis=1).astype(np.float32))

    @property
    def lists_source(self) -> str:
        """A hash of everything precomputed lists depend on: song and user vectors, plays, index settings."""
        h = hashlib.blake2b(digest_size=16)
        for part in (self._songs_warm.source, self._songs_cold.source, self._users.source):
            h.update(part.encode())
        for array in (self._plays.indptr, self._plays.indices):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    @property
    def lists(self) -> NeighbourLists | None:
        """The precomputed lists in use (None: every query searches)."""
        return self._lists

    def use_lists(self, lists: NeighbourLists) -> bool:
        """Answer :meth:`similar` and :meth:`recommend` from precomputed lists when they hold the
        answer; lists computed from other factors or plays are ignored (False, with a warning)."""
        expected = (len(self._song_ids), len(self.factors.user_ids))
        if lists.source != self.lists_source or (len(lists.song_rows), len(lists.user_rows)) != expected:
            log.warning("ignoring the neighbour lists at %s: computed from other factors or plays; "
                        "recompute them (sonicrec neighbours)", lists.path)
            self._lists = None
            return False
        self._lists = lists
        return True

    # --- lookups ------------------------------------------------------------------------------

    def metadata(self, ids: list[str] | np.ndarray) -> list[dict[str, Any]]:
        """Catalog metadata (title, artist, collection, style) of tracks; {} for unknown ones."""
        if self.catalog is None:
            return [{} for _ in ids]
        out = []
        with Catalog(self.catalog) as catalog:
            for track_id in ids:
                if track_id not in catalog:
                    out.append({})
                    continue
                t = catalog.get(str(track_id))
                info = {"title": t.title, "artist": t.artist, "collection": t.collection}
                if "style" in t.meta:
                    info["style"] = t.meta["style"]
                out.append(info)
        return out

    def split_of(self, track_id: str) -> str:
        """"train" (true CF factors), "valid"/"test" (predicted) or "new" (predicted, never played)."""
        if track_id in self._warm_row:
            return "train"
        row = self._cold_row.get(track_id)
        if row is None:
            raise self._unknown_song(track_id)
        return str(self._cold_split[row])

    @property
    def song_ids(self) -> np.ndarray:
        """(n,) str: every song it places, warm (true CF factors) first, then cold (predicted); the
        rows of precomputed lists."""
        return self._song_ids

    def song_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every song it places and the unit vector it ranks it by: ids (n,) str, vectors (n, k)."""
        return self.song_ids, np.concatenate([self._warm_unit, self._cold_unit])

    @property
    def predictor(self) -> AudioPredictor:
        """The audio model (loaded on first use from ``checkpoint``)."""
        if self._predictor is None:
            if self.checkpoint is None:
                raise DataError("audio-file queries need a model: give a predictor or a checkpoint")
            from sonicrec.predict import Predictor  # a missing checkpoint is a clear DataError there

            self._predictor = Predictor.load(self.checkpoint)
        return self._predictor

    def _nearest_songs(
        self,
        x: np.ndarray,
        n: int,
        *,
        exclude=(),
        include_cold: bool = True,
        mode: str = "mutual",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` warm and cold songs best aligned with ``x`` (k,): ids and scores of ``mode``
        (:meth:`_Group.scores`)."""
        direction = x / max(float(np.linalg.norm(x)), 1e-12)
        groups = self._groups[: 2 if include_cold else 1]
        return _merge([group.scores(direction, n, exclude, mode=mode) for group in groups], n)

    def _checked_query(self, vector: np.ndarray) -> np.ndarray:
        """A query vector as (k,) float32, after checking its length and that it is finite."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.factors.n_factors,):
            raise DataError(f"a query vector has {self.factors.n_factors} factors, got shape {vector.shape}")
        if not np.isfinite(vector).all():
            raise DataError("a query vector is not finite (NaN/inf)")
        return vector

    def _song_vector(self, song: Query) -> tuple[np.ndarray, str | None]:
        """(k,) unit factors of a song and its track id (None for an audio file)."""
        if isinstance(song, str) and song in self._warm_row:
            return self._warm_unit[self._warm_row[song]], song
        if isinstance(song, str) and song in self._cold_row:
            return self._cold_unit[self._cold_row[song]], song
        path = Path(song)
        if not path.is_file():
            raise self._unknown_song(str(song))
        assess = getattr(self.predictor, "assess_files", None)
        if assess is None:
            predicted, scores = self.predictor.predict_files([path]), None
        else:
            predicted, scores = assess([path])
        predicted = np.asarray(predicted, dtype=np.float32)
        if not np.isfinite(predicted).all():
            raise DataError(f"{path}: the model's factors for it are not finite (NaN/inf)")
        while len(self._familiarity) >= _REMEMBERED_FILES:
            self._familiarity.pop(next(iter(self._familiarity)))
        self._familiarity[str(path.resolve())] = None if scores is None else scores.as_dict(0)
        return unit_rows(predicted.reshape(1, -1))[0], None

    def _unknown_song(self, song: str) -> UnknownIdError:
        return UnknownIdError(
            f"unknown track id {song!r}, and no audio file there: give a track id of the run "
            f"({len(self.warm_ids)} played + {len(self.cold_ids)} predicted songs) or an audio file"
        )

    def _user_row(self, user: str) -> int:
        try:
            return int(self.factors.user_index([user])[0])
        except UnknownIdError:
            raise UnknownIdError(
                f"unknown user id {user!r}: not among the {len(self.factors.user_ids)} users of the CF "
                "factors (users with plays of train songs in plays.parquet)"
            ) from None

    def _song_row(self, track: str) -> int:
        """The row of a known track id in :attr:`song_ids`."""
        row = self._warm_row.get(track)
        return row if row is not None else len(self.warm_ids) + self._cold_row[track]

    @staticmethod
    def _row_cols(matrix: sp.csr_matrix, row: int) -> np.ndarray:
        return matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]]

    def _index(self, name: str, ids: np.ndarray, vectors: np.ndarray, metric: str) -> VectorIndex:
        """An index over ``vectors``; large ones are cached in ``index_dir`` keyed by a content hash."""
        h = hashlib.blake2b(digest_size=16)
        for part in (ids.astype(str).tobytes(), np.ascontiguousarray(vectors).tobytes(),
                     json.dumps([metric, asdict(self._config)]).encode()):
            h.update(part)
        source = h.hexdigest()
        path = None if self._index_dir is None else Path(self._index_dir) / f"{name}.npz"
        if path is not None and path.exists():
            try:
                cached = VectorIndex.load(path)
            except DataError as exc:
                log.warning("ignoring the cached index %s: %s", path, exc)
            else:
                if cached.source == source:
                    return cached
        index = VectorIndex.build(
            ids, vectors, metric=metric, config=self._config, source=source,
            show_progress=self._show_progress,
        )
        if path is not None and index.backend == "voyager":
            index.save(path)
            log.info("cached the %s index (%d vectors) at %s", name, len(index), path)
        return index


class _Group:
    """Songs (warm or cold) or users: their index and vectors, scored for a query in one of three modes.

    * ``raw``: the index's similarity (cosine or inner product);
    * ``calibrated``: its z-score among the query's similarities to the whole group (fair merge);
    * ``mutual``: mutual proximity, that z-score's normal CDF times that of the z-score of the same
      similarity among the candidate's similarities to the ``queries`` (:mod:`sonicrec.hubness`).
    """

    def __init__(self, index: VectorIndex, vectors: np.ndarray, queries: Moments) -> None:
        self.index, self.vectors, self.queries = index, vectors, queries
        self.moments = Moments.of(vectors)
        self._row = {s: r for r, s in enumerate(index.ids.tolist())}

    def scores(self, query: np.ndarray, n: int, exclude, *, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best ids for ``query`` (k,) and their scores, best first."""
        if mode != "mutual":
            ids, sims = self.index.query(query, n, exclude=exclude)
            return ids, sims if mode == "raw" else self.moments.z_scores(query, sims)
        ids, sims = self.index.query(query, _pool(self.index, n), exclude=exclude)
        candidates = self.vectors[[self._row[i] for i in ids.tolist()]]
        if self.index.metric == "cosine":
            candidates = unit_rows(candidates)
        mp = mutual_proximity(self.moments.z_scores(query, sims), self.queries.z_scores(candidates, sims))
        if self.index.metric == "cosine":
            mp[sims >= _SAME_SONG] = 1.0  # the query's own recording (an upload of a catalog song) first
        order = np.argsort(-mp, kind="stable")[:n]
        return ids[order], mp[order]

    def scores_rows(
        self, queries: np.ndarray, n: int, exclude, *, mode: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`scores` of many unit queries (B, k) at once, each leaving out its rows of ``exclude``
        ((B, len(index)) sparse, or None): (B, n) rows of the index (-1 pads) and scores (-inf pads)."""
        if len(self.index) == 0:
            return np.full((len(queries), n), -1, np.int64), np.full((len(queries), n), -np.inf, np.float32)
        if mode != "mutual":
            rows, sims = self.index.query_rows(queries, n, exclude=exclude)
            if mode == "raw":
                return rows, sims
            return rows, np.where(rows >= 0, self.moments.z_scores_rows(queries, sims), -np.inf)
        pool = max(_pool(self.index, n), 1)
        step = max(1, _MUTUAL_BLOCK // pool)  # (queries x pool x k) candidates in memory at once
        parts = [self._mutual_rows(queries[lo : lo + step], n, pool,
                                   None if exclude is None else exclude[lo : lo + step])
                 for lo in range(0, len(queries), step)]
        return np.concatenate([r for r, _ in parts]), np.concatenate([m for _, m in parts])

    def _mutual_rows(
        self, queries: np.ndarray, n: int, pool: int, exclude
    ) -> tuple[np.ndarray, np.ndarray]:
        rows, sims = self.index.query_rows(queries, pool, exclude=exclude)
        flat = self.vectors[np.maximum(rows, 0)].reshape(-1, self.vectors.shape[1])  # (B * pool, k)
        if self.index.metric == "cosine":
            flat = unit_rows(flat)
        z_candidate = self.queries.z_scores(flat, sims.ravel()).reshape(sims.shape)
        mp = mutual_proximity(self.moments.z_scores_rows(queries, sims), z_candidate)
        if self.index.metric == "cosine":
            mp[sims >= _SAME_SONG] = 1.0
        mp[rows < 0] = -np.inf
        order = np.argsort(-mp, axis=1, kind="stable")[:, :n]
        return np.take_along_axis(rows, order, axis=1), np.take_along_axis(mp, order, axis=1)


def _pool(index: VectorIndex, n: int) -> int:
    """How many raw neighbours to re-rank: all of an exact index, else a generous multiple of n."""
    return len(index) if index.backend == "exact" else max(4 * n, 100)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best of several (ids, scores) results, best first."""
    ids = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts]).astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:n]
    return ids[order], scores[order]
