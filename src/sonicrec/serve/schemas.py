"""The web service's response models (the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

SONG_FIELDS = {"title": None, "artist": None, "collection": None, "style": None}  # SongHit's optional


class SongHit(BaseModel):
    rank: int
    track_id: str
    score: float
    split: str | None  # train (played: true CF factors), valid/test/new (cold: predicted from audio)
    cold: bool
    title: str | None = None
    artist: str | None = None
    collection: str | None = None
    style: str | None = None


class UserHit(BaseModel):
    rank: int
    user_id: str
    score: float


class SongList(BaseModel):
    query: str
    model: str
    results: list[SongHit]


class UserList(BaseModel):
    query: str
    model: str
    results: list[UserHit]


class TrackInfo(BaseModel):
    track_id: str
    title: str | None
    artist: str | None
    collection: str | None
    duration: float | None
    split: str | None  # None: not rankable (no factors of this model)
    playable: bool
    audio_url: str | None
    excerpt_start: float | None
    excerpt_seconds: float
    meta: dict[str, Any]


class SearchResult(BaseModel):
    query: str
    results: list[TrackInfo]


class UserIds(BaseModel):
    query: str
    total: int
    results: list[str]


class MapPoint(BaseModel):
    x: float
    y: float


class MapData(BaseModel):
    method: str
    n_songs: int  # songs on the whole map; the lists below may be a seeded sample
    ids: list[str]
    x: list[float]
    y: list[float]
    split: list[str | None]
    group: list[str | None]  # style, else collection, else artist: the colour on the map
    title: list[str | None]


class UploadResult(BaseModel):
    upload_id: str
    filename: str
    format: str
    size_bytes: int
    factors: list[float]
    map: MapPoint | None
    similar: list[SongHit]
    audience: list[UserHit]
    familiarity: dict[str, Any] | None = None  # distance, threshold, percentile, familiar[, message]


class Info(BaseModel):
    run: str
    model: str
    n_factors: int
    n_users: int
    n_warm_songs: int
    n_cold_songs: int
    catalog: bool
    analysis_url: str | None
    docs_url: str
    max_upload_mb: float
    upload_formats: str
