"""Tests of the SIMULATED listeners on a small synthetic track table made here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sonicrec.demo.listeners import (
    ListenerParams,
    SimulatedListening,
    rank_frequency_slope,
    simulate_listening,
)
from sonicrec.errors import ConfigError, DataError
from sonicrec.rundir import RunDir

N_USERS, N_PLAYS = 800, 40_000
STYLES = {  # style -> (instrument families, voices range, tempo range)
    "folk song": (["guitar", "reed"], (1, 1), (70, 120)),
    "fiddle tune": (["strings", "pipe"], (1, 2), (110, 180)),
    "baroque chorale": (["organ", "choir"], (4, 4), (60, 90)),
    "renaissance polyphony": (["choir", "brass"], (4, 6), (50, 80)),
}


def make_tracks(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """A synthetic demo-world metadata table: styles of unequal size, attributes tied to style."""
    rng = np.random.default_rng(seed)
    styles = rng.choice(list(STYLES), size=n, p=[0.4, 0.3, 0.2, 0.1])
    rows = []
    for i, style in enumerate(styles):
        families, (v0, v1), (t0, t1) = STYLES[style]
        rows.append({
            "track_id": f"t{i:04d}",
            "style": style,
            "collection": f"{style.split()[0]}-{rng.integers(2)}",
            "composer": f"{style.split()[0]}-composer-{rng.integers(3)}",
            "instrument_family": rng.choice(families),
            "mode": rng.choice(["major", "minor"]),
            "meter": "4/4",
            "tempo": float(rng.uniform(t0, t1)),
            "n_voices": int(rng.integers(v0, v1 + 1)),
            "pitch_mean": float(rng.uniform(55, 75)),
        })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tracks() -> pd.DataFrame:
    return make_tracks()


@pytest.fixture(scope="module")
def world(tracks: pd.DataFrame) -> SimulatedListening:
    return simulate_listening(tracks, n_users=N_USERS, n_plays=N_PLAYS, seed=7)


def test_same_seed_same_world_other_seed_other_world(tracks, world):
    again = simulate_listening(tracks, n_users=N_USERS, n_plays=N_PLAYS, seed=7)
    pd.testing.assert_frame_equal(world.plays, again.plays)
    pd.testing.assert_frame_equal(world.users, again.users)
    other = simulate_listening(tracks, n_users=N_USERS, n_plays=N_PLAYS, seed=8)
    assert not world.plays.equals(other.plays)
    assert not np.allclose(world.users["activity"], other.users["activity"])


def test_counts_and_ids_are_consistent(tracks, world):
    plays, users = world.plays, world.users
    assert world.simulated is True and plays.attrs["simulated"] and users.attrs["simulated"]
    assert list(plays.columns) == ["user_id", "track_id", "count"]
    assert len(users) == N_USERS and users["user_id"].is_unique
    assert plays["count"].sum() == N_PLAYS
    assert plays["count"].dtype == np.int64 and (plays["count"] >= 1).all()
    assert set(plays["track_id"]) <= set(tracks["track_id"])
    assert set(plays["user_id"]) == set(users["user_id"])  # every simulated user plays
    assert not plays.duplicated(["user_id", "track_id"]).any()
    per_user = plays.groupby("user_id")["count"].sum()
    assert (per_user.reindex(users["user_id"]).to_numpy() == users["n_plays"].to_numpy()).all()
    distinct = plays.groupby("user_id").size().reindex(users["user_id"]).to_numpy()
    assert (distinct == users["n_tracks"].to_numpy()).all()
    fav_lengths = users["favourite_tracks"].map(len).to_numpy()
    assert (fav_lengths == users["n_favourites"].to_numpy()).all() and fav_lengths.min() >= 1


def top_share(x: np.ndarray, fraction: float = 0.1) -> float:
    x = np.sort(np.asarray(x, dtype=float))[::-1]
    return x[: max(1, int(fraction * len(x)))].sum() / x.sum()


def test_activity_is_heavy_tailed(world):
    per_user = world.users["n_plays"].to_numpy()
    assert top_share(per_user) > 0.35
    assert per_user.max() / np.median(per_user) > 10


def test_track_popularity_is_zipf_like(tracks, world):
    per_track = world.plays.groupby("track_id")["count"].sum().reindex(tracks["track_id"], fill_value=0)
    assert top_share(per_track.to_numpy()) > 0.35
    ranks = np.arange(1, len(per_track) + 1)
    freq = np.sort(per_track.to_numpy())[::-1]
    slope = np.polyfit(np.log(ranks[freq > 0]), np.log(freq[freq > 0]), 1)[0]
    assert -1.5 < slope < -0.4
    assert rank_frequency_slope(per_track.to_numpy()) == pytest.approx(slope)


def test_repeat_listening_gives_a_long_tail_of_counts(world):
    counts = world.plays["count"].to_numpy()
    assert np.median(counts) in (1, 2)
    assert (counts > 1).mean() > 0.1 and counts.max() >= 20
    favourites = world.users[["user_id", "favourite_tracks"]].explode("favourite_tracks")
    favourites = favourites.rename(columns={"favourite_tracks": "track_id"})
    merged = world.plays.merge(favourites, on=["user_id", "track_id"], how="left", indicator=True)
    is_fav = (merged["_merge"] == "both").to_numpy()
    assert counts[is_fav].mean() > 2 * counts[~is_fav].mean()


def style_odds_ratio(tracks: pd.DataFrame, sim: SimulatedListening) -> pd.Series:
    """Per style S: odds of playing S for users whose favourite style is S / odds for the others."""
    plays = sim.plays.assign(
        is_s=sim.plays["track_id"].map(tracks.set_index("track_id")["style"]),
        fav=sim.plays["user_id"].map(sim.users.set_index("user_id")["fav_style"]),
    )
    ratios = {}
    for style in STYLES:
        fan = plays["fav"] == style
        hit = plays["is_s"] == style
        share_fans = plays.loc[fan & hit, "count"].sum() / plays.loc[fan, "count"].sum()
        share_rest = plays.loc[~fan & hit, "count"].sum() / plays.loc[~fan, "count"].sum()
        ratios[style] = share_fans / (1 - share_fans) / (share_rest / (1 - share_rest))
    return pd.Series(ratios)


def test_taste_drives_plays(tracks, world):
    assert (style_odds_ratio(tracks, world) > 2).all()
    no_taste = simulate_listening(
        tracks, n_users=N_USERS, n_plays=N_PLAYS, seed=7, params=ListenerParams(taste_strength=0.0)
    )
    assert style_odds_ratio(tracks, no_taste).between(0.7, 1.4).all()


def test_summary_reports_the_world(world):
    summary = world.summary()
    json.dumps(summary)
    assert summary["simulated"] is True
    assert summary["n_users"] == N_USERS and summary["n_play_events"] == N_PLAYS
    assert summary["n_pairs"] == len(world.plays) and summary["n_tracks"] == 300
    assert summary["plays_per_user"]["top10pct_share"] == pytest.approx(top_share(world.users["n_plays"]))
    assert summary["count_per_pair"]["max"] == world.plays["count"].max()


def test_save_writes_marked_parquet_atomically(tmp_path, world):
    world.save(tmp_path)
    run = RunDir(tmp_path)
    for path, frame in ((run.plays, world.plays), (run.users, world.users)):
        table = pq.read_table(path)
        assert table.schema.metadata[b"simulated"] == b"true"
        assert json.loads(table.schema.metadata[b"sonicrec.simulation"])["seed"] == 7
        back = table.to_pandas()
        if "favourite_tracks" in back.columns:  # Parquet lists come back as numpy arrays
            back["favourite_tracks"] = back["favourite_tracks"].map(list)
        pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plays.parquet", "users.parquet"]


def test_missing_metadata_values_become_unknown(tracks):
    holes = tracks.copy()
    holes.loc[0, "composer"] = None
    holes.loc[1, "tempo"] = np.nan
    sim = simulate_listening(holes, n_users=50, n_plays=500, seed=0)
    assert sim.plays["count"].sum() == 500


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_users": 0}, "n_users=0"),
        ({"n_users": -5}, "n_users=-5"),
        ({"n_users": 10.0}, "must be an integer"),
        ({"n_plays": 10}, "n_plays=10 < n_users"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_sizes_raise_config_error(tracks, kwargs, message):
    args = {"n_users": 20, "n_plays": 100, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        simulate_listening(tracks, **args)


def test_bad_parameters_raise_config_error():
    with pytest.raises(ConfigError, match="smoothing"):
        ListenerParams(smoothing=0.0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.iloc[0:0], "empty"),
        (lambda t: t.assign(track_id=[""] + list(t["track_id"][1:])), "row 0 has an empty track_id"),
        (lambda t: t.drop(columns=["style", "tempo"]), "lacks column.*style, tempo"),
        (lambda t: t.assign(track_id=["dup"] * len(t)), "repeats track_id 'dup'"),
        (lambda t: t.assign(tempo=["fast"] + [100.0] * (len(t) - 1)), "t0000.*tempo='fast'"),
    ],
)
def test_bad_track_tables_raise_data_error(tracks, mutate, message):
    with pytest.raises(DataError, match=message):
        simulate_listening(mutate(tracks), n_users=20, n_plays=100, seed=0)
