"""The embedded track catalog: one SQLite table of tracks with their metadata and ingest status."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sonicrec.errors import DataError, UnknownIdError

STATUSES = ("new", "ok", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tracks (
    track_id   TEXT PRIMARY KEY,
    path       TEXT,
    title      TEXT,
    artist     TEXT,
    collection TEXT,
    duration   REAL,
    status     TEXT NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'ok', 'failed')),
    error      TEXT,
    meta       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS tracks_status ON tracks (status);
"""
_COLUMNS = ("track_id", "path", "title", "artist", "collection", "duration", "status", "error", "meta")


@dataclass
class Track:
    """One catalog row. ``meta`` holds free-form metadata (key, mode, tempo, instruments ...)."""

    track_id: str
    path: str | None = None
    title: str | None = None
    artist: str | None = None
    collection: str | None = None
    duration: float | None = None
    status: str = "new"
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.track_id or not isinstance(self.track_id, str):
            raise DataError(f"track id must be a non-empty string, got {self.track_id!r}")
        if self.status not in STATUSES:
            raise DataError(f"track {self.track_id}: status {self.status!r} not in {STATUSES}")


class Catalog:
    """A SQLite file of :class:`Track` rows, keyed by ``track_id``.

    >>> cat = Catalog(":memory:")
    >>> cat.upsert([Track("t1", path="a.ogg", title="A")])
    >>> cat.get("t1").title
    'A'
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM tracks").fetchone()[0]

    def __contains__(self, track_id: object) -> bool:
        row = self._db.execute("SELECT 1 FROM tracks WHERE track_id = ?", (track_id,)).fetchone()
        return row is not None

    def upsert(self, tracks: Iterable[Track]) -> None:
        """Insert tracks, replacing rows with the same id (in one transaction)."""
        rows = []
        for t in tracks:
            d = asdict(t)
            d["meta"] = json.dumps(d["meta"], sort_keys=True)
            rows.append(tuple(d[c] for c in _COLUMNS))
        with self._db:
            self._db.executemany(
                f"INSERT OR REPLACE INTO tracks ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                rows,
            )

    def get(self, track_id: str) -> Track:
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM tracks WHERE track_id = ?", (track_id,)
        ).fetchone()
        if row is None:
            raise UnknownIdError(f"unknown track id {track_id!r}")
        return _to_track(row)

    def labels(self, track_ids: list[str]) -> dict[str, dict]:
        """Title, artist, collection and ``meta["style"]`` of the tracks among ``track_ids`` that the
        catalog holds, by id (one query per 500 ids)."""
        found: dict[str, dict] = {}
        for lo in range(0, len(track_ids), 500):
            chunk = track_ids[lo : lo + 500]
            rows = self._db.execute(
                "SELECT track_id, title, artist, collection, json_extract(meta, '$.style') FROM tracks "
                f"WHERE track_id IN ({', '.join('?' * len(chunk))})", chunk,
            )
            found.update((row[0], {"title": row[1], "artist": row[2], "collection": row[3], "style": row[4]})
                         for row in rows)
        return found

    def tracks(self, status: str | None = None) -> Iterator[Track]:
        """All tracks (optionally of one status), ordered by id."""
        query = f"SELECT {', '.join(_COLUMNS)} FROM tracks"
        args: tuple = ()
        if status is not None:
            query += " WHERE status = ?"
            args = (status,)
        for row in self._db.execute(query + " ORDER BY track_id", args):
            yield _to_track(row)

    def search(self, text: str, *, limit: int = 20, offset: int = 0) -> list[Track]:
        """Tracks whose id, title, artist or collection contains ``text`` (ASCII case-insensitive), by id."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where = " OR ".join(f"{c} LIKE :p ESCAPE '\\'" for c in ("track_id", "title", "artist", "collection"))
        rows = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM tracks WHERE {where} ORDER BY track_id LIMIT :n OFFSET :o",
            {"p": pattern, "n": limit, "o": offset},
        )
        return [_to_track(row) for row in rows]

    def ids(self, status: str | None = None) -> list[str]:
        return [t.track_id for t in self.tracks(status)]

    def counts(self) -> dict[str, int]:
        """Number of tracks per status."""
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._db.execute("SELECT status, COUNT(*) FROM tracks GROUP BY status"):
            out[status] = n
        return out

    def to_frame(self):
        """The catalog as a pandas DataFrame, one column per ``meta`` key as well."""
        import pandas as pd

        records = []
        for t in self.tracks():
            d = asdict(t)
            meta = d.pop("meta")
            d.update({k: v for k, v in meta.items() if k not in d})
            records.append(d)
        return pd.DataFrame.from_records(records, columns=None if records else list(_COLUMNS[:-1]))


def _to_track(row: tuple) -> Track:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["meta"] = json.loads(values["meta"])
    return Track(**values)
