"""The demo world's audio: music21 scores rendered to 30-s Ogg Vorbis excerpts, with a cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sonicrec.demo import render
from sonicrec.errors import DataError

N_TRACKS = 6


def _render(root: Path, *, seed: int = 0, n: int = N_TRACKS, workers: int = 1, cache: str = "cache"):
    return render.render_world(
        root / "audio", n_tracks=n, seed=seed, cache_dir=root / cache, workers=workers,
        show_progress=False,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, _render(root)


def test_files_are_30s_mono_ogg_and_not_silent(world):
    root, tracks = world
    assert len(tracks) == N_TRACKS
    for track in tracks:
        path = Path(track.path)
        assert path.is_absolute() and path == (root / "audio" / f"{track.track_id}.ogg").resolve()
        info = sf.info(path)
        assert (info.format, info.samplerate, info.channels) == ("OGG", render.SAMPLE_RATE, 1)
        assert info.duration == pytest.approx(30.0, abs=0.05)
        assert track.duration == pytest.approx(30.0, abs=0.05)
        y, _ = sf.read(path, dtype="float32")
        rms = float(np.sqrt(np.mean(y**2)))
        assert 0.03 < rms < 0.3, (track.track_id, rms)  # normalised near -20 dBFS
        assert np.abs(y).max() <= 1.0
        assert np.sqrt(np.mean(y[: 5 * render.SAMPLE_RATE] ** 2)) > 0.005  # music from the start


def test_metadata_keys_types_and_spread(world):
    _, tracks = world
    ids = [t.track_id for t in tracks]
    assert len(set(ids)) == len(ids)
    for t in tracks:
        m = t.meta
        assert set(m) == set(render.META_KEYS)
        assert t.status == "new" and t.title and t.artist == m["composer"]
        assert t.collection == m["collection"] and t.track_id.startswith(f"{m['collection']}-")
        assert m["style"] == render.COLLECTIONS[m["collection"]].style
        assert m["instrument_family"] in render.STYLE_INSTRUMENTS[m["style"]]
        assert m["mode"] in ("major", "minor", "other")
        assert isinstance(m["key"], str)
        assert m["key"].endswith(f" {m['mode']}") or m["mode"] == "other"
        assert isinstance(m["meter"], str) and m["meter"]
        assert isinstance(m["tempo"], float) and 30 <= m["tempo"] <= 260
        assert isinstance(m["instruments"], list) and all(isinstance(i, str) for i in m["instruments"])
        assert isinstance(m["n_voices"], int) and 1 <= len(m["instruments"]) <= m["n_voices"]
        assert isinstance(m["pitch_mean"], float) and 30 < m["pitch_mean"] < 100
        assert m["source"].startswith(m["collection"] + "/") and isinstance(m["seed"], int)
    # stratified: a handful of tracks already spans as many styles
    assert len({t.meta["style"] for t in tracks}) == N_TRACKS


def test_same_seed_same_world_in_worker_processes(world, tmp_path):
    _, tracks = world
    again = _render(tmp_path, workers=2)
    assert [t.track_id for t in again] == [t.track_id for t in tracks]
    assert [t.meta for t in again] == [t.meta for t in tracks]
    for a, b in zip(again, tracks, strict=True):
        np.testing.assert_array_equal(sf.read(a.path)[0], sf.read(b.path)[0])


def test_second_call_comes_from_the_cache(world, tmp_path, monkeypatch):
    root, tracks = world

    def no_rendering(workers):
        raise AssertionError("rendered although every track is cached")

    monkeypatch.setattr(render, "_executor", no_rendering)
    again = render.render_world(
        tmp_path / "audio", n_tracks=N_TRACKS, seed=0, cache_dir=root / "cache", show_progress=False
    )
    assert [(t.track_id, t.meta) for t in again] == [(t.track_id, t.meta) for t in tracks]
    assert all(Path(t.path).parent == (tmp_path / "audio").resolve() for t in again)
    # a smaller world of the same seed is a subset of the larger one: cached too
    smaller = render.render_world(
        tmp_path / "small", n_tracks=3, seed=0, cache_dir=root / "cache", show_progress=False
    )
    assert [t.track_id for t in smaller] == [t.track_id for t in tracks[:3]]


def test_seeds_change_selection_and_instrumentation():
    ids = [[p.track_id for p in render.candidate_pieces(seed)[:N_TRACKS]] for seed in (0, 1)]
    assert ids[0] != ids[1]
    chorale = next(p for p in render.corpus_pieces() if p.source == "bach/bwv66.6.mxl")
    played = {
        (perf.family, tuple(perf.programs))
        for perf in (render._perform(chorale, render.piece_seed(s, chorale)) for s in range(6))
    }
    assert len(played) > 1
    assert len({f for f, _ in played}) > 1


def test_candidates_are_stratified_and_ids_unique():
    pieces = render.corpus_pieces()
    assert len(pieces) > 5000  # tunes of many-tune ABC files count one by one
    assert len({p.track_id for p in pieces}) == len(pieces)
    candidates = render.candidate_pieces(0)
    assert sorted(candidates, key=lambda p: p.source) == sorted(pieces, key=lambda p: p.source)
    n_styles = len({c.style for c in render.COLLECTIONS.values()})
    assert len({p.style for p in candidates[:n_styles]}) == n_styles


def test_failed_pieces_are_skipped_and_replaced(tmp_path, monkeypatch, caplog):
    chorales = [p for p in render.corpus_pieces() if p.collection == "bach"][:2]
    broken = render.Piece("bach", "bach/no-such-chorale.mxl")
    monkeypatch.setattr(render, "candidate_pieces", lambda seed: [broken, *chorales])
    with caplog.at_level(logging.WARNING, logger="sonicrec.demo.render"):
        tracks = _render(tmp_path, n=2)
    assert [t.track_id for t in tracks] == [p.track_id for p in chorales]
    assert broken.track_id in caplog.text
    with pytest.raises(DataError, match="only 2 pieces"):
        _render(tmp_path, n=3)
