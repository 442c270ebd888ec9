"""A loaded run as the endpoints see it: the Recommender, the catalog, the song map, and the
fields of the answers built from them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sonicrec.audio import AUDIO_EXTENSIONS, track_excerpt_start
from sonicrec.catalog import Catalog, Track
from sonicrec.errors import UnknownIdError
from sonicrec.recommend import Ranking, Recommender
from sonicrec.rundir import RunDir
from sonicrec.serve.schemas import SONG_FIELDS, TrackInfo
from sonicrec.songmap import SongMap, load_song_map


class ServedRun:
    """The run behind the endpoints: ids are looked up, never used as paths.

    Parameters
    ----------
    run : the run directory
    rec : its Recommender
    model : the model whose predictions and checkpoint are served
    """

    def __init__(self, run: RunDir, rec: Recommender, model: str) -> None:
        self.run, self.rec, self.model = run, rec, model
        self.config = run.read_config()
        self.has_catalog = run.catalog.is_file()
        self._local = threading.local()  # one catalog connection per thread
        self._map: SongMap | None = None  # computed on first use
        self._map_lock = threading.Lock()

    def catalog(self) -> Catalog:
        """This thread's connection to the catalog (an SQLite connection stays in its thread)."""
        if not hasattr(self._local, "catalog"):
            if not self.run.catalog.is_file():
                raise UnknownIdError(
                    f"{self.run.root} has no catalog.sqlite: no track metadata or audio to serve")
            self._local.catalog = Catalog(self.run.catalog)
        return self._local.catalog

    def song_map(self) -> SongMap:
        with self._map_lock:
            if self._map is None:
                self._map = load_song_map(self.run, self.model, self.rec.factors.n_factors)
            return self._map

    def split_or_none(self, track_id: str) -> str | None:
        try:
            return self.rec.split_of(track_id)
        except UnknownIdError:
            return None

    def known_song(self, track_id: str) -> str:
        """The id itself, after checking it names a song of the run (never a path)."""
        self.rec.split_of(track_id)  # UnknownIdError -> 404
        return track_id

    def song_metadata(self, track_ids: list[str]) -> list[dict[str, Any]]:
        """Title, artist, collection and style of songs ({} for songs not in the catalog): one query."""
        if not self.has_catalog:
            return [{} for _ in track_ids]
        found = self.catalog().labels(track_ids)
        return [found.get(track_id, {}) for track_id in track_ids]

    def song_hits(self, ranking: Ranking) -> list[dict[str, Any]]:
        """The fields of :class:`SongHit` for each song of a ranking."""
        info = self.song_metadata(ranking.ids.tolist())
        hits = []
        pairs = zip(ranking.ids.tolist(), ranking.scores.tolist(), strict=True)
        for i, (track_id, score) in enumerate(pairs):
            split = self.split_or_none(track_id)
            hits.append({"rank": i + 1, "track_id": track_id, "score": score, "split": split,
                         "cold": split is not None and split != "train", **SONG_FIELDS, **info[i]})
        return hits

    @staticmethod
    def user_hits(ranking: Ranking) -> list[dict[str, Any]]:
        """The fields of :class:`UserHit` for each user of a ranking."""
        return [{"rank": i + 1, "user_id": u, "score": s}
                for i, (u, s) in enumerate(zip(ranking.ids.tolist(), ranking.scores.tolist(), strict=True))]

    def track_info(self, track: Track) -> TrackInfo:
        playable = self.audio_file(track) is not None
        audio = self.config.audio
        return TrackInfo(
            track_id=track.track_id, title=track.title, artist=track.artist, collection=track.collection,
            duration=track.duration, split=self.split_or_none(track.track_id), playable=playable,
            audio_url=f"/api/audio?id={quote(track.track_id, safe='')}" if playable else None,
            excerpt_start=track_excerpt_start(
                track.duration, audio, recorded=track.meta.get("excerpt_offset")
            ),
            excerpt_seconds=audio.excerpt_seconds, meta=track.meta,
        )

    def audio_file(self, track: Track) -> Path | None:
        """The catalog's audio file of a track if it exists and has an audio suffix (relative paths
        are relative to the run directory), else None."""
        if not track.path:
            return None
        path = Path(track.path)
        path = path if path.is_absolute() else self.run.root / path
        if path.suffix.lower() not in AUDIO_EXTENSIONS or not path.is_file():
            return None
        return path
