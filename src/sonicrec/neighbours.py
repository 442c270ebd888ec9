"""Precomputed answers: every catalog song's similar songs and every user's top songs.

A batch job (``sonicrec neighbours RUN``) asks the Recommender's own indexes for every song and
every user at once, in blocks, and stores the answers as four memory-mapped ``.npy`` arrays in
``RUN/neighbours/MODEL/``::

    song_rows.npy     (S, K) int32    the K nearest other songs of each song, rows of Recommender.song_ids
    song_scores.npy   (S, K) float32  their cosines
    user_rows.npy     (U, N) int32    each user's top N songs (cold included, played left out)
    user_scores.npy   (U, N) float32  x_u . y / |y|
    lists.json        format, the hash of what they were computed from, K, N, seconds taken

A server then answers ``similar(track, n <= K + 1)`` and ``recommend(user, n <= N)`` with a slice
of a memory-mapped file (pages shared by every worker process) instead of a search; uploads,
calibrated or filtered queries and longer lists still search. The lists carry a hash of the song
and user vectors, the plays and the index settings (``Recommender.lists_source``): lists of older
factors are ignored until the job is run again, which recomputes only when that hash changed.

The job is embarrassingly parallel over blocks of query rows (:func:`query_blocks`). On one
machine :func:`compute_lists` answers them in turn; on a cluster
(:func:`sonicrec.spark.neighbours_run_spark`) each Spark task loads the Recommender from the run's
cached index files (``RUN/index/MODEL/``) once and answers its blocks
(:meth:`QueryBlock.answer`), and the driver writes the blocks at their rows
(:func:`assemble_lists`) into the same files, with the same hash.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from sonicrec.errors import DataError
from sonicrec.io import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from sonicrec.recommend import Recommender

log = logging.getLogger(__name__)

FORMAT = "sonicrec-neighbours-1"
# neighbours stored per song: similar(track, n) for n <= 26 needs no search (an HNSW query re-ranks
# max(4 n, 100) raw neighbours by mutual proximity, the same 100 for every n up to 25)
DEFAULT_SONGS = 25
DEFAULT_USERS = 50  # songs stored per user
_BLOCK_SCORES = 1 << 24  # scores per block of exact search (64 MiB of float32)
_ARRAYS = ("song_rows", "song_scores", "user_rows", "user_scores")


@dataclass(frozen=True)
class NeighbourLists:
    """Precomputed similar-song and user lists (memory-mapped when loaded).

    Attributes
    ----------
    path : the folder they were loaded from (None when computed in memory)
    source : :attr:`sonicrec.recommend.Recommender.lists_source` of the Recommender that computed them
    song_rows, song_scores : (S, K) int32 / float32
    user_rows, user_scores : (U, N) int32 / float32
    seconds : time the computation took
    complete : False when only some songs have lists (the others' rows are -1 and are searched)
    """

    path: Path | None
    source: str
    song_rows: np.ndarray
    song_scores: np.ndarray
    user_rows: np.ndarray
    user_scores: np.ndarray
    seconds: float = 0.0
    complete: bool = True

    def similar(self, song: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The ``n`` nearest other songs of song row ``song``: (n,) rows and cosines, or None when
        the stored list is shorter (then search)."""
        return _head(self.song_rows, self.song_scores, song, n)

    def recommend(self, user: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The top ``n`` songs of user row ``user``: (n,) rows and scores, or None (then search)."""
        return _head(self.user_rows, self.user_scores, user, n)

    def save(self, folder: str | Path) -> None:
        """Write the arrays, then lists.json (atomically each; a reader checks the json last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            with atomic_path(folder / f"{name}.npy") as tmp:
                np.save(tmp, getattr(self, name))
        meta = {"format": FORMAT, "source": self.source, "songs": self.song_rows.shape[1],
                "users": self.user_rows.shape[1], "seconds": round(self.seconds, 1),
                "complete": self.complete}
        atomic_write_text(folder / "lists.json", json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> NeighbourLists:
        """Memory-map the lists in ``folder`` (written by :meth:`save`)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "lists.json").read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{folder}: not readable neighbour lists ({exc}); recompute them") from exc
        if arrays["song_rows"].shape != arrays["song_scores"].shape or \
                arrays["user_rows"].shape != arrays["user_scores"].shape:
            raise DataError(f"{folder}: the neighbour lists' arrays disagree in shape; recompute them")
        return cls(folder, str(meta["source"]), seconds=float(meta.get("seconds", 0)),
                   complete=bool(meta.get("complete", True)), **arrays)


def _head(rows: np.ndarray, scores: np.ndarray, row: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    if n > rows.shape[1]:
        return None
    hit = np.asarray(rows[row, :n])
    if n and hit[-1] < 0:
        return None
    return hit, np.asarray(scores[row, :n])


@dataclass(frozen=True)
class QueryBlock:
    """One block of the batch job: ``kind`` "songs" (rows of Recommender.song_ids) or "users" (rows
    of factors.user_ids), ``rows`` (B,) int64, asked for ``width`` neighbours or songs each."""

    kind: str
    rows: np.ndarray
    width: int

    def answer(self, rec: Recommender) -> tuple[np.ndarray, np.ndarray]:
        """(B, width) int32 song rows and (B, width) float32 scores: ``rec.similar_rows`` or
        ``rec.recommend_rows`` of this block."""
        ask = rec.similar_rows if self.kind == "songs" else rec.recommend_rows
        return ask(self.rows, self.width)


def query_blocks(
    rec: Recommender, *, songs: int = DEFAULT_SONGS, users: int = DEFAULT_USERS,
    only_songs: np.ndarray | None = None,
) -> list[QueryBlock]:
    """The blocks of query rows of the job: every song (or ``only_songs``), then every user, a few
    thousand at a time through HNSW and ~64 MiB of scores for exact search. Every engine answers
    these same blocks, so the lists do not depend on the engine."""
    if songs <= 0 or users <= 0:
        raise DataError(f"list lengths must be positive, got songs={songs}, users={users}")
    n_songs = len(rec.song_ids)
    asked = np.arange(n_songs) if only_songs is None else np.unique(np.asarray(only_songs, dtype=np.int64))
    block = max(64, min(4096, _BLOCK_SCORES // max(n_songs, 1)))
    return [QueryBlock(kind, rows[lo : lo + block], width)
            for kind, rows, width in (("songs", asked, songs),
                                      ("users", np.arange(len(rec.factors.user_ids)), users))
            for lo in range(0, len(rows), block)]


def assemble_lists(
    rec: Recommender, answers: Iterable[tuple[QueryBlock, np.ndarray, np.ndarray]], *,
    songs: int, users: int, seconds_since: float,
) -> NeighbourLists:
    """Write each block's answers (``QueryBlock``, (B, width) rows, (B, width) scores) at its rows:
    the lists of ``rec`` (songs never answered keep rows of -1). ``seconds_since``: the job's start
    (``time.perf_counter()``)."""
    n_songs, n_users = len(rec.song_ids), len(rec.factors.user_ids)
    arrays = {"songs": _unanswered(n_songs, songs), "users": _unanswered(n_users, users)}
    answered = 0
    for block, rows, scores in answers:
        rows_out, scores_out = arrays[block.kind]
        rows_out[block.rows], scores_out[block.rows] = rows, scores
        answered += len(block.rows) if block.kind == "songs" else 0
    seconds = time.perf_counter() - seconds_since
    log.info("neighbour lists of %d songs and %d users computed in %.1f s", answered, n_users, seconds)
    return NeighbourLists(None, rec.lists_source, *arrays["songs"], *arrays["users"], seconds,
                          complete=answered == n_songs)


def _unanswered(n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, width) int32 rows of -1 and (n, width) float32 scores of -inf."""
    return np.full((n, width), -1, np.int32), np.full((n, width), -np.inf, np.float32)


def compute_lists(
    rec: Recommender, *, songs: int = DEFAULT_SONGS, users: int = DEFAULT_USERS,
    only_songs: np.ndarray | None = None, show_progress: bool = False,
) -> NeighbourLists:
    """Ask ``rec`` for the ``songs`` nearest songs of every song and the top ``users`` songs of every
    user, block by block (:func:`query_blocks`) on this machine.

    ``only_songs``: rows of ``rec.song_ids`` to compute lists for (e.g. the most played songs);
    the other songs get empty rows and are searched when asked about.
    """
    t0 = time.perf_counter()
    blocks = query_blocks(rec, songs=songs, users=users, only_songs=only_songs)
    with tqdm(total=sum(len(b.rows) for b in blocks), desc="neighbours", unit="row",
              disable=not show_progress) as bar:
        def answers() -> Iterator[tuple[QueryBlock, np.ndarray, np.ndarray]]:
            for block in blocks:
                yield block, *block.answer(rec)
                bar.update(len(block.rows))

        return assemble_lists(rec, answers(), songs=songs, users=users, seconds_since=t0)


ListsEngine = Callable[..., NeighbourLists]
"""How the lists are computed: ``engine(rec, songs=, users=, show_progress=)``; :func:`compute_lists`
(this machine) or the Spark job of :func:`sonicrec.spark.neighbours_run_spark`."""


def neighbours_run(
    run_dir: str | Path, model: str = "cnn-mse", *, songs: int = DEFAULT_SONGS, users: int = DEFAULT_USERS,
    force: bool = False, show_progress: bool = False, engine: ListsEngine = compute_lists,
) -> tuple[NeighbourLists, bool]:
    """Compute (by ``engine``) and save RUN/neighbours/MODEL/ unless lists of the current factors are there.

    Returns the lists and whether they were computed (False: the stored ones are current).
    """
    from sonicrec.recommend import Recommender
    from sonicrec.rundir import RunDir

    run = RunDir(run_dir)
    rec = Recommender.load(run.root, model, show_progress=show_progress)
    folder = run.neighbours / model
    current = rec.lists
    if not force and current is not None and current.complete and current.song_rows.shape[1] == songs \
            and current.user_rows.shape[1] == users:
        return current, False
    lists = engine(rec, songs=songs, users=users, show_progress=show_progress)
    lists.save(folder)
    return NeighbourLists.load(folder), True
