"""SIMULATED listeners of the demo world: play counts drawn from a generative model of taste.

No listening data exists for the demo tracks, so every play produced here is simulated, and
says so: :class:`SimulatedListening` carries ``simulated=True``, the frames carry
``attrs["simulated"] = True`` and the Parquet files carry the key-value metadata ``simulated=true``.

The model (docs/demo-world.md, "Simulated listeners"):

* each track has a latent popularity, Zipf-like over a random ranking (independent of its
  music and metadata);
* each user has a heavy-tailed (lognormal) activity, so a few users play a lot;
* each user has a taste over the tracks' *metadata* (style, collection, composer, instrument
  family, tempo band, mode, register band, texture band): a sparse Dirichlet preference over
  the values of each attribute and a per-user weight per attribute. Taste never looks at audio
  features, so no audio model is favoured by construction;
* a play event picks a track from ``softmax(taste affinity + log popularity)``, or (with the
  user's repeat probability) one of the user's few favourite tracks, or (rarely) a track
  uniformly at random (exploration).

A user's events are drawn together as one multinomial over this mixture, which is the same as
drawing them one by one; counts of (user, track) pairs are the play counts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sonicrec.config import check_seed
from sonicrec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_USER_CHUNK = 512  # users simulated at once: bounds memory to a (512, n_tracks) block


@dataclass(frozen=True)
class Attribute:
    """One attribute of taste: a track-table column, its mean share of taste, its bands if numeric."""

    name: str
    column: str
    importance: float
    edges: tuple[float, ...] = ()  # numeric columns: band edges, bands are [edge_i, edge_i+1)
    labels: tuple[str, ...] = ()  # one label per band (len(edges) + 1)


ATTRIBUTES = (
    Attribute("style", "style", 0.25),
    Attribute("collection", "collection", 0.12),
    Attribute("composer", "composer", 0.15),
    Attribute("instrument_family", "instrument_family", 0.16),
    Attribute(
        "tempo", "tempo", 0.09, edges=(80.0, 110.0, 140.0),
        labels=("slow (<80 bpm)", "moderate (80-110 bpm)", "fast (110-140 bpm)", "very fast (>=140 bpm)"),
    ),
    Attribute("mode", "mode", 0.07),
    Attribute(
        "register", "pitch_mean", 0.08, edges=(55.0, 62.0, 69.0),
        labels=("low (<G3)", "lower middle (G3-D4)", "upper middle (D4-A4)", "high (>=A4)"),
    ),
    Attribute(
        "texture", "n_voices", 0.08, edges=(1.5, 2.5, 4.5),
        labels=("1 voice", "2 voices", "3-4 voices", "5+ voices"),
    ),
)
REQUIRED_COLUMNS = ("track_id",) + tuple(a.column for a in ATTRIBUTES)
UNKNOWN = "unknown"  # the value of a missing (NaN/None) attribute


@dataclass(frozen=True)
class ListenerParams:
    """Parameters of the simulated-listener model; the defaults are the demo world's."""

    activity_sigma: float = 1.1  # lognormal sigma of user activity (heavier tail when larger)
    popularity_exponent: float = 0.8  # latent track popularity ~ rank ** -exponent
    taste_strength: float = 3.0  # sum of a user's attribute weights (0 = taste ignored)
    taste_concentration: float = 1.5  # Dirichlet mass of each value preference (small = sparse)
    weight_concentration: float = 4.0  # Dirichlet mass of the attribute weights around importance
    smoothing: float = 0.1  # share of the catalogue base rate mixed into every preference
    explore_fraction: float = 0.05  # share of plays of a uniformly random track
    repeat_mean: float = 0.5  # mean share of non-exploration plays going to favourites (Beta)
    repeat_concentration: float = 3.0  # Beta mass of the repeat share
    favourites_mean: float = 5.0  # favourites per user: 1 + Poisson(favourites_mean - 1)
    max_favourites: int = 15

    def __post_init__(self) -> None:
        checks = {
            "activity_sigma": self.activity_sigma >= 0,
            "popularity_exponent": self.popularity_exponent >= 0,
            "taste_strength": self.taste_strength >= 0,
            "taste_concentration": self.taste_concentration > 0,
            "weight_concentration": self.weight_concentration > 0,
            "smoothing": 0 < self.smoothing <= 1,
            "explore_fraction": 0 <= self.explore_fraction < 1,
            "repeat_mean": 0 < self.repeat_mean < 1,
            "repeat_concentration": self.repeat_concentration > 0,
            "favourites_mean": 1 <= self.favourites_mean <= self.max_favourites,
            "max_favourites": self.max_favourites >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ConfigError(f"simulated-listener parameter(s) out of range: {values}")


@dataclass
class SimulatedListening:
    """SIMULATED play counts and the simulated users who made them.

    Attributes
    ----------
    plays : DataFrame, columns user_id (str), track_id (str), count (int64 > 0); one row per pair
    users : DataFrame, one row per simulated user: user_id, activity, n_plays, n_tracks,
        repeat_fraction, n_favourites, favourite_tracks (list of str), and for every taste
        attribute A: fav_A (the value the user prefers most) and weight_A (its weight in taste)
    simulated : always True: this is not real listening data
    parameters : seed, sizes and :class:`ListenerParams` values, saved with the files
    """

    plays: pd.DataFrame
    users: pd.DataFrame
    simulated: bool = True
    parameters: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Counts and distribution statistics of the simulated plays (JSON-serialisable)."""
        per_user = self.users["n_plays"].to_numpy()
        per_track = self.plays.groupby("track_id", sort=False)["count"].sum().to_numpy()
        n_tracks = int(self.parameters.get("n_tracks", len(per_track)))
        per_track = np.concatenate([per_track, np.zeros(n_tracks - len(per_track), dtype=np.int64)])
        counts = self.plays["count"].to_numpy()
        return {
            "simulated": self.simulated,
            "n_users": len(self.users),
            "n_tracks": n_tracks,
            "n_tracks_played": int((per_track > 0).sum()),
            "n_play_events": int(counts.sum()),
            "n_pairs": len(self.plays),
            "density": len(self.plays) / max(1, len(self.users) * n_tracks),
            "plays_per_user": _distribution(per_user),
            "tracks_per_user": _distribution(self.users["n_tracks"].to_numpy()),
            "plays_per_track": {**_distribution(per_track), "zipf_slope": rank_frequency_slope(per_track)},
            "count_per_pair": {
                **_distribution(counts),
                "p90": float(np.percentile(counts, 90)),
                "p99": float(np.percentile(counts, 99)),
                "share_above_1": float((counts > 1).mean()),
            },
        }

    def save(self, run_dir_root: str | Path) -> None:
        """Write RUN/plays.parquet and RUN/users.parquet atomically, marked ``simulated=true``."""
        from sonicrec.interactions import write_plays
        from sonicrec.rundir import RunDir

        run = RunDir(Path(run_dir_root))
        write_plays(self.plays, run.plays, metadata=self._file_metadata())
        _write_parquet(self.users, run.users, self._file_metadata())
        log.info("wrote SIMULATED plays to %s and simulated users to %s", run.plays, run.users)

    def _file_metadata(self) -> dict[bytes, bytes]:
        from sonicrec.interactions import SIMULATED_MARK

        parameters = json.dumps(self.parameters, sort_keys=True).encode()
        return {**SIMULATED_MARK, b"sonicrec.simulation": parameters}


def simulate_listening(
    tracks: pd.DataFrame,
    *,
    n_users: int,
    n_plays: int,
    seed: int,
    params: ListenerParams | None = None,
) -> SimulatedListening:
    """Simulate ``n_users`` listeners making ``n_plays`` play events on ``tracks``.

    Parameters
    ----------
    tracks : DataFrame, one row per track with the columns of :data:`REQUIRED_COLUMNS`
        (the demo-world metadata; other columns are ignored)
    n_users : number of simulated users, each with at least one play event
    n_plays : total number of play events (>= n_users)
    seed : seed of the numpy Generator; the same seed gives identical frames
    params : the model's parameters (default :class:`ListenerParams`)

    Returns
    -------
    SimulatedListening with ``plays`` (n_pairs rows), ``users`` (n_users rows), simulated=True
    """
    params = params or ListenerParams()
    _check_sizes(n_users, n_plays, seed)
    track_ids, codes, values = _encode_tracks(tracks)
    n_tracks = len(track_ids)
    rng = np.random.default_rng(seed)
    log.info(
        "simulating %d SIMULATED listeners making %d play events on %d tracks (seed %d)",
        n_users, n_plays, n_tracks, seed,
    )
    # Tracks: latent Zipf-like popularity over a random ranking, independent of everything else.
    log_popularity = -params.popularity_exponent * np.log1p(rng.permutation(n_tracks))
    listeners = _draw_listeners(n_users, n_plays, codes, values, params, rng)
    rows, cols, counts, favourites = _draw_plays(listeners, log_popularity, codes, track_ids, params, rng)

    user_ids = np.array([f"simuser-{i:0{len(str(n_users - 1))}d}" for i in range(n_users)], dtype=object)
    plays = pd.DataFrame(
        {"user_id": user_ids[rows], "track_id": track_ids[cols], "count": counts.astype(np.int64)}
    )
    users = pd.DataFrame(
        {
            "user_id": user_ids,
            "activity": listeners.activity,
            "n_plays": listeners.events.astype(np.int64),
            "n_tracks": np.bincount(rows, minlength=n_users).astype(np.int64),
            "repeat_fraction": listeners.repeat,
            "n_favourites": listeners.n_favourites.astype(np.int64),
            "favourite_tracks": favourites,
        }
    )
    for a, attr in enumerate(ATTRIBUTES):
        users[f"fav_{attr.name}"] = values[a][listeners.preferences[a].argmax(axis=1)]
        users[f"weight_{attr.name}"] = listeners.weights[:, a]
    for frame in (plays, users):
        frame.attrs["simulated"] = True
    parameters = {
        "seed": seed, "n_users": n_users, "n_plays": n_plays, "n_tracks": n_tracks, **asdict(params)
    }
    result = SimulatedListening(plays=plays, users=users, parameters=parameters)
    log.info("SIMULATED listening: %d (user, track) pairs; these are not real plays", len(plays))
    return result


@dataclass(frozen=True)
class _Listeners:
    """The simulated users' traits (U users, A attributes, K_a values of attribute a)."""

    activity: np.ndarray  # (U,) lognormal activity
    events: np.ndarray  # (U,) int play events, each >= 1, summing to n_plays
    weights: np.ndarray  # (U, A) weight of each attribute in the user's taste
    preferences: list[np.ndarray]  # per attribute (U, K_a): preference over its values
    log_lift: list[np.ndarray]  # per attribute (U, K_a): log of preference over the base rate
    repeat: np.ndarray  # (U,) share of non-exploration plays going to favourites
    n_favourites: np.ndarray  # (U,) int favourite tracks, each <= max_favourites
    max_favourites: int  # the most favourites a user has in this catalogue


def _draw_listeners(
    n_users: int, n_plays: int, codes: list[np.ndarray], values: list[np.ndarray],
    params: ListenerParams, rng: np.random.Generator,
) -> _Listeners:
    """Activity, play events, attribute weights, value preferences and repeat behaviour of each user."""
    n_tracks = len(codes[0])
    activity = rng.lognormal(0.0, params.activity_sigma, size=n_users)
    events = 1 + rng.multinomial(n_plays - n_users, activity / activity.sum())
    importance = np.array([a.importance for a in ATTRIBUTES])
    weights = params.taste_strength * rng.dirichlet(params.weight_concentration * importance, n_users)
    base_rates = [np.bincount(c, minlength=len(v)) / n_tracks for c, v in zip(codes, values, strict=True)]
    preferences = [rng.dirichlet(params.taste_concentration * q, n_users) for q in base_rates]
    log_lift = [  # smoothed so that no value is impossible
        np.log((1 - params.smoothing) * p + params.smoothing * q) - np.log(q)
        for p, q in zip(preferences, base_rates, strict=True)
    ]
    repeat = rng.beta(
        params.repeat_mean * params.repeat_concentration,
        (1 - params.repeat_mean) * params.repeat_concentration,
        size=n_users,
    )
    max_fav = min(params.max_favourites, n_tracks)
    n_fav = np.minimum(1 + rng.poisson(params.favourites_mean - 1, size=n_users), max_fav)
    return _Listeners(activity, events, weights, preferences, log_lift, repeat, n_fav, max_fav)


def _draw_plays(
    listeners: _Listeners, log_popularity: np.ndarray, codes: list[np.ndarray], track_ids: np.ndarray,
    params: ListenerParams, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str]]]:
    """Every user's play events, drawn as one multinomial over taste, favourites and exploration.

    Returns the user row, track column and count (P,) of each played pair, and each user's
    favourite track ids; users are simulated ``_USER_CHUNK`` at a time.
    """
    n_users, n_tracks, max_fav = len(listeners.events), len(track_ids), listeners.max_favourites
    rows, cols, counts, favourites = [], [], [], []
    for start in range(0, n_users, _USER_CHUNK):
        chunk = slice(start, min(start + _USER_CHUNK, n_users))
        logits = log_popularity + sum(  # (B, T) taste affinity + log popularity
            listeners.weights[chunk, a, None] * listeners.log_lift[a][chunk][:, codes[a]]
            for a in range(len(ATTRIBUTES))
        )
        taste = _softmax_rows(logits)
        # Favourites: n_fav tracks drawn without replacement from the taste (Gumbel top-k).
        top = np.argsort(-(logits + rng.gumbel(size=logits.shape)), axis=1)[:, :max_fav]
        ranks = np.arange(1, max_fav + 1)
        n_fav = listeners.n_favourites[chunk]
        fav_weight = np.where(ranks <= n_fav[:, None], 1.0 / ranks, 0.0)  # (B, max_fav)
        fav = np.zeros_like(taste)
        np.put_along_axis(fav, top, fav_weight / fav_weight.sum(axis=1, keepdims=True), axis=1)
        r = listeners.repeat[chunk, None]
        e = params.explore_fraction
        mixture = e / n_tracks + (1 - e) * ((1 - r) * taste + r * fav)
        mixture /= mixture.sum(axis=1, keepdims=True)
        block = rng.multinomial(listeners.events[chunk], mixture)  # (B, T) play counts
        u, t = np.nonzero(block)
        rows.append(u + start)
        cols.append(t)
        counts.append(block[u, t])
        favourites.extend(track_ids[top[i, : n_fav[i]]].tolist() for i in range(top.shape[0]))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(counts), favourites


def rank_frequency_slope(frequencies: np.ndarray) -> float:
    """Slope of log(frequency) against log(rank) over the non-zero frequencies (Zipf: about -1).

    frequencies : (n,) non-negative counts, any order
    """
    f = np.sort(np.asarray(frequencies, dtype=np.float64))[::-1]
    f = f[f > 0]
    if len(f) < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.arange(1, len(f) + 1)), np.log(f), 1)[0])


def _check_sizes(n_users: int, n_plays: int, seed: int) -> None:
    for name, value in (("n_users", n_users), ("n_plays", n_plays), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"{name}={value!r}: must be an integer")
    if n_users <= 0:
        raise ConfigError(f"n_users={n_users}: the simulation needs at least one user")
    if n_plays < n_users:
        raise ConfigError(
            f"n_plays={n_plays} < n_users={n_users}: every simulated user plays at least once; "
            "raise n_plays or lower n_users"
        )
    check_seed(seed)


def _encode_tracks(tracks: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Track ids (T,), and per attribute the value code of each track (T,) and the values (K_a,)."""
    if not isinstance(tracks, pd.DataFrame):
        raise DataError(f"tracks must be a pandas DataFrame, got {type(tracks).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in tracks.columns]
    if missing:
        raise DataError(
            f"track table lacks column(s) {', '.join(missing)}: the simulated listeners' taste needs "
            f"{', '.join(REQUIRED_COLUMNS)} (the demo-world metadata)"
        )
    if len(tracks) == 0:
        raise DataError("track table is empty: there is nothing for simulated listeners to play")
    empty = (tracks["track_id"].isna() | (tracks["track_id"].astype(str) == "")).to_numpy()
    if empty.any():
        raise DataError(f"track table row {int(empty.argmax())} has an empty track_id: give every track one")
    ids = tracks["track_id"].astype(str)
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise DataError(f"track table repeats track_id {duplicated.iloc[0]!r}: track ids must be unique")
    codes, values = [], []
    for attr in ATTRIBUTES:
        labels = _band_labels(tracks, attr, ids) if attr.edges else _category_labels(tracks[attr.column])
        value, code = np.unique(labels, return_inverse=True)
        codes.append(code)
        values.append(value.astype(object))
    return ids.to_numpy(dtype=object), codes, values


def _category_labels(column: pd.Series) -> np.ndarray:
    labels = column.astype(object).where(column.notna(), UNKNOWN)
    return np.array([str(v) for v in labels], dtype=object)


def _band_labels(tracks: pd.DataFrame, attr: Attribute, ids: pd.Series) -> np.ndarray:
    raw = tracks[attr.column]
    x = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(x) & raw.notna().to_numpy()
    if bad.any():
        i = int(bad.argmax())
        raise DataError(f"track {ids.iloc[i]!r}: {attr.column}={raw.iloc[i]!r} is not a number")
    band = np.searchsorted(np.asarray(attr.edges), x, side="right")
    labels = np.array(attr.labels, dtype=object)[np.minimum(band, len(attr.labels) - 1)]
    labels[np.isnan(x)] = UNKNOWN
    return labels


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _distribution(x: np.ndarray) -> dict[str, float]:
    """min, median, mean, max, max/median and the share held by the top 10% of entries."""
    x = np.sort(np.asarray(x, dtype=np.float64))[::-1]
    top = max(1, int(np.ceil(0.1 * len(x))))
    median = float(np.median(x))
    return {
        "min": float(x[-1]),
        "median": median,
        "mean": float(x.mean()),
        "max": float(x[0]),
        "max_over_median": float(x[0] / median) if median > 0 else float("inf"),
        "top10pct_share": float(x[:top].sum() / x.sum()),
    }


def _write_parquet(frame: pd.DataFrame, path: Path, metadata: dict[bytes, bytes]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sonicrec.io import atomic_path

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
