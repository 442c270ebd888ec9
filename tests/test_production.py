"""A varied demo production: seeded draws, a drum groove on the beat, a mix chain that does what it says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sonicrec.demo import production, render
from sonicrec.demo.world import DemoConfig
from sonicrec.errors import ConfigError, DataError

SR = 22050
FONTS = (Path("a.sf2"), Path("b.sf2"))


def test_draws_are_seeded_and_in_range():
    first = production.draw_mix(np.random.default_rng(3), FONTS)
    assert first == production.draw_mix(np.random.default_rng(3), FONTS)
    mixes = [production.draw_mix(np.random.default_rng(s), FONTS) for s in range(200)]
    assert {m.soundfont for m in mixes} == {"a.sf2", "b.sf2"}
    assert 0.3 < np.mean([m.drums for m in mixes]) < 0.7
    assert all(-26.0 <= m.loudness_db <= -10.0 and 1.5 <= m.ratio <= 10.0 for m in mixes)
    assert any(m.highpass_hz == 0 for m in mixes) and any(m.highpass_hz > 0 for m in mixes)
    assert first.describe()["soundfont"] in ("a.sf2", "b.sf2")


def test_drums_fall_on_the_beats_of_the_meter():
    rng = np.random.default_rng(0)
    onsets, pitches, velocity = production.drum_pattern("4/4", 120.0, 4.0, 0.0, rng)  # beat 0.5 s
    kicks = onsets[pitches == production.KICK]
    snares = onsets[pitches == production.SNARE]
    np.testing.assert_allclose(kicks, [0.0, 1.0, 2.0, 3.0])  # beats 1 and 3 of each bar
    np.testing.assert_allclose(snares, [0.5, 1.5, 2.5, 3.5])  # the backbeat
    assert onsets.max() < 4.0 and ((velocity >= 20) & (velocity <= 127)).all()
    # 6/8 is two dotted-quarter beats: kick on the first, snare on the second
    onsets, pitches, _ = production.drum_pattern("6/8", 120.0, 3.0, 0.0, rng)
    np.testing.assert_allclose(onsets[pitches == production.KICK], [0.0, 1.5])
    np.testing.assert_allclose(onsets[pitches == production.SNARE], [0.75, 2.25])
    # 3/4: one kick a bar, the snare on beat 2; "free" plays a 4/4 groove
    onsets, pitches, _ = production.drum_pattern("3/4", 60.0, 6.0, 0.0, rng)
    np.testing.assert_allclose(onsets[pitches == production.KICK], [0.0, 3.0])
    np.testing.assert_allclose(onsets[pitches == production.SNARE], [1.0, 4.0])
    onsets, pitches, _ = production.drum_pattern("free", 60.0, 4.0, 0.0, rng)
    np.testing.assert_allclose(onsets[pitches == production.KICK], [0.0, 2.0])


def _band_db(y: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(y)) ** 2
    f = np.fft.rfftfreq(len(y), 1 / SR)
    return 10 * np.log10(spectrum[(f >= low) & (f < high)].sum() / spectrum.sum())


def test_the_mix_chain_sets_level_and_tilt():
    y = production.coloured_noise(4 * SR, 0.0, np.random.default_rng(1)) * 0.1
    base = production.draw_mix(np.random.default_rng(0), FONTS)
    flat = dataclasses.replace(
        base, low_shelf_db=0.0, mid_db=0.0, high_shelf_db=0.0, highpass_hz=0.0, lowpass_hz=0.0,
        drive_db=0.0, threshold_db=0.0, ratio=1.5, noise_snr_db=0.0, loudness_db=-20.0,
    )
    out = production.apply_mix(y, flat, SR, np.random.default_rng(2))
    assert out.dtype == np.float32 and out.shape == y.shape and np.abs(out).max() <= 0.9
    assert 20 * np.log10(np.sqrt(np.mean(out.astype(np.float64) ** 2))) == pytest.approx(-20.0, abs=0.5)
    bass = production.apply_mix(y, dataclasses.replace(flat, low_shelf_hz=200.0, low_shelf_db=12.0), SR,
                                 np.random.default_rng(2))
    assert _band_db(bass, 20, 150) > _band_db(out, 20, 150) + 6  # the shelf lifts the bass
    dark = production.apply_mix(y, dataclasses.replace(flat, lowpass_hz=3000.0), SR, np.random.default_rng(2))
    assert _band_db(dark, 6000, 11025) < _band_db(out, 6000, 11025) - 6  # a one-pole low-pass


def test_noise_colour():
    rng = np.random.default_rng(0)
    white, brown = (production.coloured_noise(SR, s, rng) for s in (0.0, -2.0))
    assert _band_db(brown, 1, 200) > _band_db(white, 1, 200) + 10


def test_a_varied_world_renders_seeded_with_its_production_recorded(tmp_path):
    def varied(cache: str):
        return render.render_world(tmp_path / cache / "audio", n_tracks=3, seed=0, cache_dir=tmp_path / cache,
                                   workers=1, show_progress=False, production="varied")

    tracks = varied("one")
    again = varied("two")
    clean = render.render_world(tmp_path / "clean" / "audio", n_tracks=3, seed=0, cache_dir=tmp_path / "one",
                                workers=1, show_progress=False)
    for a, b, c in zip(tracks, again, clean, strict=True):
        assert a.track_id == b.track_id == c.track_id
        mix = a.meta["production"]
        assert mix["soundfont"] in {p.name for p in production.soundfonts(render._bundled_soundfont())}
        assert "production" not in c.meta
        ya, yb, yc = (sf.read(t.path, dtype="float32")[0] for t in (a, b, c))
        np.testing.assert_array_equal(ya, yb)  # same seed, same audio
        assert not np.array_equal(ya, yc)  # the clean rendering is another cache entry
        assert ya.shape == yc.shape and np.abs(ya).max() <= 1.0 and np.sqrt(np.mean(ya**2)) > 0.01
    assert len(list((tmp_path / "one").glob("*.ogg"))) == 6  # clean and varied entries side by side


def test_the_production_is_checked():
    with pytest.raises(ConfigError, match="production"):
        DemoConfig(production="loud")
    assert DemoConfig.from_toml(DemoConfig(production="varied").to_toml()).production == "varied"
    with pytest.raises(DataError, match="production"):
        render.render_world(Path("unused"), n_tracks=1, seed=0, production="loud", show_progress=False)


def test_the_cli_passes_the_production_to_the_world(tmp_path, monkeypatch, capsys):
    import sonicrec.demo
    from sonicrec.cli import main

    seen = {}

    def run_demo(out, options):
        seen["world"] = options.world
        return ""

    monkeypatch.setattr(sonicrec.demo, "run_demo", run_demo)
    assert main(["-q", "demo", "--production", "varied", "--out", str(tmp_path / "run")]) == 0
    assert seen["world"].production == "varied" and seen["world"].n_tracks == 1200
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--production", "loud", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2 and "loud" in capsys.readouterr().err
