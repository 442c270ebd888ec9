"""The audio front end: framing, mel filters, tones, channel/rate handling, excerpts, bad files."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sonicrec.audio import (
    Excerpt,
    band_centres,
    excerpt_logmel,
    excerpt_samples,
    file_to_logmel,
    load_excerpt,
    logmel,
    mel_filterbank,
)
from sonicrec.config import AudioConfig
from sonicrec.errors import AudioError, ConfigError

RECORDINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "recordings"
SHORT = AudioConfig(excerpt_seconds=2.0, n_frames=1 + 44100 // 1105)  # 2-s excerpts keep tests fast


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def loudest_band(features: np.ndarray) -> int:
    return int(np.argmax(features.mean(axis=-1)))


def test_default_framing_gives_599_frames_for_30_s():
    cfg = AudioConfig()
    assert excerpt_samples(cfg) == 30 * 22050
    out = logmel(np.zeros((2, excerpt_samples(cfg)), np.float32), cfg)
    assert out.shape == (2, 128, 599) and out.dtype == np.float32
    assert np.all(out == pytest.approx(10 * np.log10(cfg.log_floor)))  # silence sits on the floor


def test_inconsistent_frame_count_is_a_config_error():
    with pytest.raises(ConfigError, match="set n_frames = 40"):
        AudioConfig(excerpt_seconds=2.0)


def test_file_to_logmel_shape_for_30_s_file(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(440, 31, 22050), 22050)
    features = file_to_logmel(path, AudioConfig())
    assert features.shape == (128, 599) and features.dtype == np.float32


@pytest.mark.parametrize("kwargs", [{}, {"fmin": 30.0, "fmax": 8000.0}, {"n_mels": 40, "n_fft": 1024}])
def test_mel_filterbank_matches_librosa(kwargs):
    librosa = pytest.importorskip("librosa")
    args = {"sample_rate": 22050, "n_fft": 2048, "n_mels": 128, **kwargs}
    ours = mel_filterbank(**args)
    ref = librosa.filters.mel(
        sr=args["sample_rate"], n_fft=args["n_fft"], n_mels=args["n_mels"],
        fmin=args.get("fmin", 0.0), fmax=args.get("fmax"),
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)


def test_logmel_agrees_with_librosa_on_the_same_waveform():
    librosa = pytest.importorskip("librosa")
    cfg = SHORT
    rng = np.random.default_rng(0)
    y = (tone(330, 2, 22050) + 0.05 * rng.standard_normal(44100)).astype(np.float32)
    ours = logmel(y[None], cfg)[0]
    mel = librosa.feature.melspectrogram(
        y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels, power=2.0
    )
    ref = 10 * np.log10(np.maximum(mel, cfg.log_floor))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 0.01  # dB


@pytest.mark.parametrize("freq", [150.0, 1000.0, 5000.0])
def test_pure_tone_lands_in_the_nearest_band(freq):
    features = logmel(tone(freq, 2, 22050)[None], SHORT)[0]
    assert loudest_band(features) == int(np.argmin(np.abs(band_centres(SHORT) - freq)))


@pytest.mark.parametrize(
    ("rate", "channels", "fmt"),
    [(22050, 1, "WAV"), (44100, 2, "WAV"), (48000, 2, "FLAC"), (16000, 1, "FLAC"), (96000, 6, "WAV")],
)
def test_channels_and_sample_rates_give_the_same_spectrum(tmp_path, rate, channels, fmt):
    y = tone(1000, 5, rate)
    path = tmp_path / f"t.{fmt.lower()}"
    sf.write(path, np.repeat(y[:, None], channels, axis=1), rate, format=fmt)
    excerpt = load_excerpt(path, SHORT)
    assert excerpt.samples.shape == (excerpt_samples(SHORT),) and excerpt.samples.dtype == np.float32
    assert excerpt.duration == pytest.approx(5.0)
    assert np.abs(excerpt.samples).max() == pytest.approx(0.5, abs=0.01)  # mono = mean, not sum
    ours = logmel(excerpt.samples[None], SHORT)[0]
    ref = logmel(tone(1000, 2, 22050)[None], SHORT)[0]
    band = loudest_band(ref)
    assert loudest_band(ours) == band
    assert np.abs(ours[band] - ref[band]).max() < 0.5  # dB


def test_excerpt_is_centred_or_at_the_offset(tmp_path):
    rate, parts = 22050, [tone(f, 4, 22050) for f in (300.0, 1000.0, 3000.0)]
    path = tmp_path / "three.flac"
    sf.write(path, np.concatenate(parts), rate)
    expect = [int(np.argmin(np.abs(band_centres(SHORT) - f))) for f in (300.0, 1000.0, 3000.0)]
    for offset, part in [(None, 1), (0.5, 0), (100.0, 2)]:  # centred, given, clamped to the end
        cfg = AudioConfig(excerpt_seconds=2.0, n_frames=SHORT.n_frames, excerpt_offset=offset)
        excerpt = load_excerpt(path, cfg)
        assert not excerpt.padded
        assert loudest_band(logmel(excerpt.samples[None], cfg)[0]) == expect[part]
    assert load_excerpt(path, SHORT).offset == pytest.approx(5.0)


def test_short_track_is_padded_and_flagged(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, tone(440, 0.5, 22050), 22050)
    excerpt = load_excerpt(path, SHORT)
    assert excerpt.padded and excerpt.duration == pytest.approx(0.5)
    assert excerpt.samples.shape == (excerpt_samples(SHORT),)
    assert np.all(excerpt.samples[11025:] == 0)
    features = logmel(excerpt.samples[None], SHORT)[0]
    assert np.all(features[:, 12:] == pytest.approx(10 * np.log10(SHORT.log_floor)))


def test_many_channels_at_192_khz_decode_only_the_excerpt(tmp_path):
    rate, seconds, channels = 192000, 8, 8
    path = tmp_path / "big.wav"
    y = tone(2000, seconds, rate)
    sf.write(path, np.repeat(y[:, None], channels, axis=1), rate, subtype="PCM_16")
    cfg = AudioConfig(excerpt_seconds=1.0, n_frames=1 + 22050 // 1105)
    tracemalloc.start()
    excerpt = load_excerpt(path, cfg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole_file = seconds * rate * channels * 4  # the whole file as float32: 49 MB
    assert peak < whole_file / 5, f"peak {peak / 1e6:.1f} MB"
    assert excerpt.samples.shape == (22050,)
    expected_band = int(np.argmin(np.abs(band_centres(cfg) - 2000)))
    assert loudest_band(logmel(excerpt.samples[None], cfg)[0]) == expected_band


def make_bad_file(kind: str, directory: Path) -> Path:
    """One file of each class that must fail with AudioError."""
    if kind == "missing":
        return directory / "missing.wav"
    if kind == "directory":
        path = directory / "folder.mp3"
        path.mkdir()
        return path
    path = directory / {"empty": "empty.wav", "non-audio": "notes.ogg", "corrupt": "corrupt.mp3",
                        "silent": "silent.flac", "truncated-flac": "cut.flac", "truncated-wav": "cut.wav",
                        "truncated-ogg": "cut.ogg", "not-finite": "nan.wav", "huge-float": "huge.wav",
                        "fifo": "pipe.ogg", "dangling-link": "gone.flac"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling-link":
        path.symlink_to(directory / "never-there.flac")
    elif kind == "huge-float":  # finite float32 samples whose power overflows: +inf log-mels
        sf.write(path, np.full(22050 * 3, 1e30, np.float32) * np.sign(tone(300, 3, 22050)), 22050,
                 subtype="FLOAT")
    elif kind == "empty":
        path.touch()
    elif kind == "non-audio":
        path.write_text("track_id,path\nnot,audio\n" * 50)
    elif kind == "corrupt":
        path.write_bytes(np.random.default_rng(1).bytes(20000))
    elif kind == "silent":
        sf.write(path, np.zeros(22050 * 3, np.float32), 22050)
    elif kind == "not-finite":
        sf.write(path, np.where(np.arange(22050 * 3) == 33075, np.nan, 0.1), 22050, subtype="FLOAT")
    else:
        fmt = path.suffix[1:].upper()
        noise = np.random.default_rng(2).uniform(-0.5, 0.5, 22050 * 6).astype(np.float32)
        sf.write(path, noise, 22050, format=fmt, **({"subtype": "VORBIS"} if fmt == "OGG" else {}))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


BAD_KINDS = ["missing", "directory", "empty", "non-audio", "corrupt", "silent", "truncated-flac",
             "truncated-wav", "truncated-ogg", "not-finite", "huge-float", "fifo", "dangling-link"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_audio_error_naming_the_file(tmp_path, kind, deadline):
    path = make_bad_file(kind, tmp_path)
    with deadline(20), pytest.raises(AudioError, match=path.name):
        load_excerpt(path, SHORT)


def test_a_pipe_is_refused_without_being_opened(tmp_path, deadline):
    path = make_bad_file("fifo", tmp_path)
    with deadline(20), pytest.raises(AudioError, match=r"pipe\.ogg: not a regular file \(a pipe\)"):
        file_to_logmel(path, SHORT)


def test_non_finite_log_mels_are_refused(tmp_path):
    huge = make_bad_file("huge-float", tmp_path)
    with pytest.raises(AudioError, match=r"huge\.wav: samples reach 1e\+30"):
        file_to_logmel(huge, SHORT)
    overflowing = Excerpt(np.full(excerpt_samples(SHORT), 1e30, np.float32), 2.0, 0.0, False)
    with pytest.raises(AudioError, match=r"x\.wav: the log-mel spectrogram is not finite"):
        excerpt_logmel(overflowing, SHORT, "x.wav")


def test_real_recordings_decode():
    files = sorted(RECORDINGS.glob("*.ogg"))
    if not files:
        pytest.skip("shared recordings not available")
    trumpet = next(f for f in files if "trumpet" in f.name)  # 5.3 s: shorter than the excerpt
    waltz = next(f for f in files if "waltz" in f.name)  # 49 s
    cfg = AudioConfig()
    assert load_excerpt(trumpet, cfg).padded
    excerpt = load_excerpt(waltz, cfg)
    assert not excerpt.padded and excerpt.offset == pytest.approx((excerpt.duration - 30) / 2, abs=1e-3)
    features = file_to_logmel(waltz, cfg)
    assert features.shape == (128, 599) and np.isfinite(features).all()
    assert features.max() > 0 > features.min() >= 10 * np.log10(cfg.log_floor)


def test_pyav_decodes_what_soundfile_cannot_open(tmp_path, monkeypatch):
    import soundfile

    path = tmp_path / "stereo.wav"
    y = tone(700, 3, 44100)
    sf.write(path, np.stack([y, 0.5 * y], axis=1), 44100)
    expected = load_excerpt(path, SHORT)

    def refuse(*args, **kwargs):
        raise RuntimeError("format not supported")

    monkeypatch.setattr(soundfile, "SoundFile", refuse)
    fallback = load_excerpt(path, SHORT)
    assert (expected.decoder, fallback.decoder) == ("soundfile", "pyav")
    assert fallback.duration == pytest.approx(expected.duration)
    np.testing.assert_allclose(fallback.samples, expected.samples, atol=1e-4)
