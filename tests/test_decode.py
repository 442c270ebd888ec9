"""The decoder chain: exact seeking per format and decoder, fallback, decoder names and notes, formats."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sonicrec import decode
from sonicrec.audio import load_excerpt, logmel
from sonicrec.catalog import Catalog, Track
from sonicrec.config import AudioConfig
from sonicrec.decode import AudioSource
from sonicrec.errors import AudioError
from sonicrec.features import ingest_run
from sonicrec.rundir import RunDir
from test_audio import RECORDINGS, tone

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg command is not installed")
ENCODINGS = {  # format -> ffmpeg options: catalogue quality; AAC without noise substitution (random)
    "wav": [], "flac": [], "ogg": ["-c:a", "libvorbis", "-q:a", "8"],
    "opus": ["-c:a", "libopus", "-b:a", "192k"], "mp3": ["-c:a", "libmp3lame", "-b:a", "320k"],
    "m4a": ["-c:a", "aac", "-aac_pns", "0", "-b:a", "256k"],
}
EXCERPT = AudioConfig(excerpt_seconds=4.0, n_frames=1 + 88200 // 1105)


def transcode(source: Path, folder: Path, stem: str, seconds: float, *, stereo: bool = False) -> dict:
    """The middle ``seconds`` of ``source`` at 44.1 kHz (opus: 48) in every format, by one ffmpeg run."""
    start = max(0.0, (sf.info(source).duration - seconds) / 2)
    args = [FFMPEG, "-v", "error", "-nostdin", "-y", "-ss", f"{start:.3f}", "-t", str(seconds)]
    args += ["-i", str(source)]
    layout = ["-af", "pan=stereo|c0=c0|c1=0.5*c0"] if stereo else []  # two different channels
    files = {fmt: folder / f"{stem}.{fmt}" for fmt in ENCODINGS}
    for fmt, options in ENCODINGS.items():
        rate = "48000" if fmt == "opus" else "44100"
        args += ["-map", "0:a:0", "-ar", rate, *layout, *options, str(files[fmt])]
    subprocess.run(args, check=True)
    return files


@pytest.fixture(scope="session")
def transcoded(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """6 s of each of the 9 shared recordings in every format (once per session)."""
    if FFMPEG is None:
        pytest.skip("the ffmpeg command is not installed")
    sources = sorted(RECORDINGS.glob("*.ogg"))
    if len(sources) < 9:
        pytest.skip("shared recordings not available")
    folder = tmp_path_factory.mktemp("transcoded")
    return {src.stem: transcode(src, folder, f"rec{i}", 6.0) for i, src in enumerate(sources)}


@pytest.fixture(scope="session")
def stereo_song(tmp_path_factory) -> dict[str, Path]:
    """20 s of a real recording, 44.1 kHz stereo, in every format (for the seek tests)."""
    if FFMPEG is None:
        pytest.skip("the ffmpeg command is not installed")
    waltz = next(iter(RECORDINGS.glob("*waltz*.ogg")), None)
    if waltz is None:
        pytest.skip("shared recordings not available")
    return transcode(waltz, tmp_path_factory.mktemp("stereo"), "song", 20.0, stereo=True)


def logmel_of(path: Path, cfg: AudioConfig = EXCERPT) -> np.ndarray:
    return logmel(load_excerpt(path, cfg).samples[None], cfg)[0]


@needs_ffmpeg
def test_every_recording_decodes_in_every_format_close_to_the_wav(transcoded):
    """All 9 shared recordings, transcoded to each format: excerpts within 0.5 dB mean of the wav's."""
    for name, files in transcoded.items():
        reference = logmel_of(files["wav"])
        for fmt, path in files.items():
            diff = np.abs(logmel_of(path) - reference).mean()
            assert diff < 0.5, f"{name}.{fmt}: {diff:.2f} dB mean from the wav"


@needs_ffmpeg
@pytest.mark.parametrize("fmt", list(ENCODINGS))
def test_seeking_is_exact_against_a_full_decode_for_every_decoder(stereo_song, fmt):
    path = stereo_song[fmt]
    tried = 0
    for name in decode.chain_for(path):
        with AudioSource(path, (name,)) as src:
            whole = src.read(0, src.frames)
            assert abs(whole.size - src.frames) <= 1100, f"{name}: {whole.size} of {src.frames} frames"
            for seconds in (0.3, 7.77, 16.0):
                first, n = round(seconds * src.samplerate), round(3.0 * src.samplerate)
                part = src.read(first, n)
                np.testing.assert_allclose(
                    part, whole[first : first + n], atol=1e-5, err_msg=f"{fmt} {name} at {seconds} s"
                )
        tried += 1
    assert tried >= 2  # at least a fast path and a fallback


@needs_ffmpeg
@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3", "opus", "m4a"])
def test_every_decoder_gives_the_same_excerpt(stereo_song, fmt):
    path = stereo_song[fmt]
    excerpts = {}
    for name in decode.chain_for(path):
        with AudioSource(path, (name,)) as src:
            excerpts[name] = (src.frames, src.read(round(9.1 * src.samplerate), 44100))
    (frames, first), *others = excerpts.values()
    for name, (n, samples) in zip(list(excerpts)[1:], others, strict=True):
        # lengths: end padding that some decoders keep (AAC via the ffmpeg command: 688 frames)
        assert abs(n - frames) <= 1024, f"{name}: {n} frames, {list(excerpts)[0]}: {frames}"
        np.testing.assert_allclose(samples, first, atol=2e-3, err_msg=name)  # codec rounding only


def test_a_failure_in_the_middle_of_the_stream_falls_back(tmp_path, monkeypatch):
    path = tmp_path / "t.wav"
    y = tone(500, 6, 44100)
    sf.write(path, np.stack([y, 0.5 * y], axis=1), 44100)
    expected = load_excerpt(path, EXCERPT)
    assert expected.decoder == "soundfile"

    def fail_after_one_block(self, first, n):
        yield np.zeros(1000, np.float32)
        raise RuntimeError("Supported file format but file is malformed")

    monkeypatch.setattr(decode._Soundfile, "blocks", fail_after_one_block)
    fallback = load_excerpt(path, EXCERPT)
    assert fallback.decoder == "pyav"
    np.testing.assert_allclose(fallback.samples, expected.samples, atol=1e-6)


@needs_ffmpeg
def test_opus_that_libsndfile_fails_on_mid_read_still_decodes(transcoded):
    """libsndfile 1.2 fails part-way through some Opus files made by ffmpeg: PyAV reads them."""
    for files in transcoded.values():
        with AudioSource(files["opus"], ("soundfile", "pyav")) as src:
            samples = src.read(0, src.frames)
            assert src.frames - samples.size < 0.5 * src.samplerate
        with AudioSource(files["opus"], ("pyav",)) as reference:
            whole = reference.read(0, reference.frames)
        np.testing.assert_allclose(samples, whole[: samples.size], atol=1e-3)


def test_a_file_every_decoder_stops_short_on_is_truncated(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, 44100 * 6).astype(np.float32), 44100)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AudioError, match=r"cut\.flac: truncated: the header announces 6\.0 s"):
        load_excerpt(path, EXCERPT)


def corrupt_mp3(path: Path) -> Path:
    sf.write(path, tone(440, 12, 44100) + tone(3000, 12, 44100, 0.2), 44100, format="MP3")
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(3)
    for i in rng.integers(2000, len(data), 300):
        data[i] = rng.integers(256)
    path.write_bytes(bytes(data))
    return path


def test_decoder_messages_never_reach_stderr_and_are_kept_with_the_track(tmp_path, capfd):
    path = corrupt_mp3(tmp_path / "flipped.mp3")
    excerpt = load_excerpt(path, EXCERPT)
    assert capfd.readouterr().err == ""  # mpg123 writes "Note: ..." and layer3 errors to fd 2
    assert any(n.startswith("Note:") or "error" in n for n in excerpt.notes), excerpt.notes


def write_m4a(path: Path, y: np.ndarray, rate: int) -> Path:
    """Mono float32 ``y`` as AAC in an MP4 container, written with PyAV (no ffmpeg command needed)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        for start in range(0, y.size, 1024):
            frame = av.AudioFrame.from_ndarray(y[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_the_decoder_and_its_notes_are_recorded_in_the_catalog(tmp_path):
    run = RunDir(tmp_path / "run")
    run.audio.mkdir(parents=True)
    flac, m4a = run.audio / "clean.flac", run.audio / "clean.m4a"
    sf.write(flac, tone(300, 5, 22050), 22050)
    write_m4a(m4a, tone(300, 5, 44100), 44100)
    with Catalog(run.catalog) as catalog:
        catalog.upsert([Track("flac", path=str(flac)), Track("m4a", path=str(m4a)),
                        Track("flipped", path=str(corrupt_mp3(run.audio / "flipped.mp3")))])
    result = ingest_run(run, EXCERPT, show_progress=False)
    assert (result.ok, result.failed) == (3, 0)
    with Catalog(run.catalog) as catalog:
        tracks = {t.track_id: t for t in catalog.tracks()}
    assert tracks["flac"].meta["decoder"] == "miniaudio" and "decoder_notes" not in tracks["flac"].meta
    assert tracks["m4a"].meta["decoder"] == "pyav"
    assert tracks["flipped"].meta["decoder"] in ("soundfile", "pyav")  # mpg123 may stop short on it
    assert any(n.startswith("Note:") for n in tracks["flipped"].meta["decoder_notes"])


def test_a_text_file_named_mp3_is_not_called_missing(tmp_path):
    path = tmp_path / "notes.mp3"
    path.write_text("track_id,path\nnot,audio\n" * 50)
    with pytest.raises(AudioError, match=r"notes\.mp3: unsupported format or corrupt") as info:
        load_excerpt(path, EXCERPT)
    assert "does not exist" not in str(info.value) and "regular file" not in str(info.value)


def tracker_module() -> bytes:
    """A ProTracker module: one looped sine sample struck four times in one 64-row pattern (7.7 s)."""
    wave = (100 * np.sin(2 * np.pi * np.arange(64) / 64)).astype(np.int8).tobytes()
    header = b"sonicrec test".ljust(20, b"\0") + struct.pack(">22sHBBHH", b"sine", 32, 0, 64, 0, 32)
    header += b"".join(struct.pack(">22sHBBHH", b"", 0, 0, 0, 0, 1) for _ in range(30))
    header += bytes([1, 127]) + bytes(128) + b"M.K."
    pattern = bytearray(64 * 16)  # 64 rows x 4 channels x 4 bytes
    for row in range(0, 64, 16):
        pattern[row * 16 : row * 16 + 4] = bytes([428 >> 8, 428 & 0xFF, 0x10, 0])  # sample 1, C-3
    return header + bytes(pattern) + wave


@needs_ffmpeg
def test_tracker_modules_decode_with_the_ffmpeg_command(tmp_path):
    path = tmp_path / "tune.mod"
    path.write_bytes(tracker_module())
    try:
        excerpt = load_excerpt(path, EXCERPT)
    except AudioError as exc:
        if "libopenmpt" in str(exc) or "ffprobe finds no audio" in str(exc):
            pytest.skip(f"this ffmpeg has no libopenmpt: {exc}")
        raise
    assert excerpt.decoder == "ffmpeg"
    assert excerpt.duration == pytest.approx(7.68, abs=0.2)  # 64 rows at speed 6, 125 BPM; and a tail
    assert np.abs(excerpt.samples).max() > 0.05


def test_tracker_modules_without_ffmpeg_are_an_unsupported_format(tmp_path, monkeypatch):
    path = tmp_path / "tune.xm"
    path.write_bytes(tracker_module())
    monkeypatch.setattr(decode, "ffmpeg_command", lambda: None)
    with pytest.raises(AudioError, match=r"tune\.xm: unsupported format: \.xm tracker modules"):
        load_excerpt(path, EXCERPT)
