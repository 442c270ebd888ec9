"""Excerpt choice: a silent or mostly silent excerpt moves to the track's most active window."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from sonicrec.audio import load_excerpt
from sonicrec.config import AudioConfig
from sonicrec.errors import AudioError
from sonicrec.excerpt import block_levels, most_active_start, mostly_silent

RATE = 8000
SHORT = AudioConfig(excerpt_seconds=2.0, n_frames=1 + 44100 // 1105)


def tone(seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def test_block_levels_do_not_depend_on_how_the_stream_is_cut():
    x = np.random.default_rng(0).normal(0, 0.1, 5 * RATE + 123).astype(np.float32)
    whole = block_levels([x], RATE)
    pieces = block_levels(np.array_split(x, 17), RATE)
    assert len(whole) == 6 and np.allclose(whole, pieces)
    assert whole[0] == pytest.approx(-20.0, abs=0.2)  # RMS 0.1


def test_most_active_start_prefers_the_louder_music_and_says_none_for_silence():
    levels = np.array([-20, -20, -200, -200, -200, -10, -10, -10, -200.0])
    assert most_active_start(levels, 2.0) == 5.0
    assert most_active_start(np.full(9, -np.inf), 2.0) is None
    assert most_active_start(levels[:2], 30.0) == 0.0  # shorter than the window


def test_mostly_silent_counts_silent_seconds():
    assert mostly_silent(np.concatenate([tone(1, 0.5), silence(2)]), RATE)
    assert not mostly_silent(np.concatenate([tone(2, 0.5), silence(1)]), RATE)


def test_a_track_silent_in_the_middle_gets_its_most_active_excerpt(tmp_path):
    path = tmp_path / "gap.wav"  # quiet music, 10 s of silence (the centred excerpt), loud music
    sf.write(path, np.concatenate([tone(4, 0.05), silence(10), tone(6, 0.5)]), RATE)
    excerpt = load_excerpt(path, SHORT)
    assert excerpt.offset == 14.0 and excerpt.duration == 20.0
    assert np.abs(excerpt.samples).max() > 0.4


def test_a_mostly_silent_excerpt_moves_but_a_musical_one_stays(tmp_path):
    moved, kept = tmp_path / "moved.wav", tmp_path / "kept.wav"
    cfg = AudioConfig(excerpt_seconds=10.0, n_frames=1 + 220500 // 1105)  # centred: 10-20 s of 30 s
    sf.write(moved, np.concatenate([tone(13, 0.3), silence(17)]), RATE)  # 10-20 s: 70% silent
    sf.write(kept, np.concatenate([tone(16, 0.3), silence(14)]), RATE)  # 10-20 s: 40% silent
    assert load_excerpt(moved, cfg).offset == 0.0
    assert load_excerpt(kept, cfg).offset == 10.0


def test_a_track_silent_throughout_is_refused(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, silence(12), RATE)
    with pytest.raises(AudioError, match="silent throughout"):
        load_excerpt(path, SHORT)
