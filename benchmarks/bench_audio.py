"""Audio front end per format: every decoder, every stage, and the ratio to librosa, in one run.

Files like a catalogue's: real music, 44.1 kHz stereo, several minutes, transcoded with the
``ffmpeg`` command to mp3 (LAME V2), ogg/vorbis (q5, ~160 kbps), flac, opus (128 kbps) and m4a
(AAC 192 kbps). The source is the development music of ``../shared/scripts/get_dev_music.sh``
(``--music tracks.csv``, default ``/work/devmusic/tracks.csv``: its 44.1 kHz stereo tracks of at
least 2 minutes); without it, the real recordings of ``../shared/data/recordings``, upsampled to
44.1 kHz stereo and joined into 4-minute pieces. For each format it prints, as CPU milliseconds per
30-s excerpt (median over rounds, interleaved track by track, this process and its children, one
thread):

- each decoder of :mod:`sonicrec.decode` alone (seek + read the centred excerpt, mixed to mono),
  and pedalboard's reader for comparison, with the largest sample difference from a full decode;
- the stages of sonicrec's pipeline: decode + mix, mix alone, resample (soxr HQ), log-mel;
- sonicrec end to end (``file_to_logmel``) against librosa (``load(offset, duration, sr=22050)``
  + ``melspectrogram`` + dB), their ratio, and the largest dB difference between the two.

    python benchmarks/bench_audio.py [--tracks 6] [--rounds 5] [--music CSV]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before numpy / torch / librosa are imported

RECORDINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "recordings"
DEV_MUSIC = Path("/work/devmusic/tracks.csv")
RATE, PIECE_SECONDS = 44100, 240
ENCODINGS = {  # format -> ffmpeg output options
    "mp3": ["-c:a", "libmp3lame", "-q:a", "2"],
    "ogg": ["-c:a", "libvorbis", "-q:a", "5"],
    "flac": ["-c:a", "flac"],
    "opus": ["-c:a", "libopus", "-b:a", "128k"],
    "m4a": ["-c:a", "aac", "-b:a", "192k"],
}
# the ffmpeg command is left out: it decodes from the start by design (the last resort, for
# tracker modules), so its cost grows with the excerpt's position
DECODERS = ("soundfile", "miniaudio", "pyav", "pedalboard")


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (the ffmpeg command), seconds."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def source_tracks(music: Path, n: int, folder: Path) -> tuple[list[Path], str]:
    """Up to ``n`` 44.1 kHz stereo wav files of real music and where they came from."""
    import numpy as np
    import soundfile as sf
    import soxr

    if music.is_file():
        rows = list(csv.DictReader(open(music, newline="", encoding="utf-8")))
        long = [r["path"] for r in rows if _is_catalogue_like(r["path"])]
        picked = long[:: max(1, len(long) // n)][:n]
        out = []
        for i, path in enumerate(picked):
            wav = folder / f"src{i:02d}.wav"
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", path, "-map", "0:a:0", str(wav)], check=True)
            out.append(wav)
        return out, f"{len(out)} real tracks from {music} (44.1 kHz stereo, >= 2 min)"
    ys = []
    for path in sorted(RECORDINGS.glob("*.ogg")):
        y, rate = sf.read(path, dtype="float32", always_2d=True)
        ys.append(soxr.resample(y.mean(axis=1), rate, RATE))
    joined = np.concatenate(ys)
    delay = round(0.0075 * RATE)  # right channel = left delayed by 7.5 ms
    out = []
    for i in range(min(n, joined.size // (PIECE_SECONDS * RATE))):
        y = joined[i * PIECE_SECONDS * RATE : (i + 1) * PIECE_SECONDS * RATE]
        stereo = np.stack([y, np.concatenate([np.zeros(delay, np.float32), y[:-delay]])], axis=1)
        sf.write(folder / f"src{i:02d}.wav", 0.9 * stereo, RATE, subtype="PCM_16")
        out.append(folder / f"src{i:02d}.wav")
    return out, f"{len(out)} pieces of {PIECE_SECONDS} s joined from the real recordings in {RECORDINGS}"


def _is_catalogue_like(path: str) -> bool:
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception:
        return False
    return info.samplerate == RATE and info.channels == 2 and info.duration >= 120


def transcode(sources: list[Path], folder: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {fmt: [] for fmt in ENCODINGS}
    for src in sources:
        for fmt, options in ENCODINGS.items():
            out = folder / f"{src.stem}.{fmt}"
            cmd = ["ffmpeg", "-v", "error", "-y", "-i", str(src), "-map", "0:a:0", *options, str(out)]
            subprocess.run(cmd, check=True)
            files[fmt].append(out)
    return files


def librosa_logmel(path: Path, offset: float, cfg):
    import librosa
    import numpy as np

    y, _ = librosa.load(path, sr=cfg.sample_rate, mono=True, offset=offset, duration=cfg.excerpt_seconds)
    mel = librosa.feature.melspectrogram(
        y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels,
        fmin=cfg.fmin, fmax=cfg.fmax, power=2.0,
    )
    return 10 * np.log10(np.maximum(mel, cfg.log_floor))


def excerpt_range(path: Path, cfg) -> tuple[int, int]:
    """(first frame, frames) of the centred excerpt at the file's native rate."""
    import math

    from sonicrec.audio import excerpt_start
    from sonicrec.decode import AudioSource

    with AudioSource(path) as src:
        first = round(excerpt_start(src.duration, cfg) * src.samplerate)
        return first, min(math.ceil(cfg.excerpt_seconds * src.samplerate), src.frames - first)


def decode_with(name: str, path: Path, first: int, n: int):
    """The excerpt decoded by one decoder, mono float32, or None if it cannot open the file."""
    import numpy as np

    from sonicrec.decode import AudioSource

    if name == "pedalboard":  # for comparison only: not exact on mp3, silent on truncated flac
        from pedalboard.io import AudioFile

        with AudioFile(str(path)) as f:
            f.seek(first)
            block = f.read(n)
        return np.full(block.shape[0], 1 / block.shape[0], np.float32) @ block
    with AudioSource(path, (name,)) as src:
        return src.read(first, n)


def timed(pipelines: dict, items: list, rounds: int) -> dict[str, float]:
    """CPU seconds per item of each pipeline (median over rounds), interleaved item by item."""
    per_round: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(rounds):
        totals = dict.fromkeys(pipelines, 0.0)
        for item in items:
            for name, fn in pipelines.items():
                start = cpu_seconds()
                fn(item)
                totals[name] += cpu_seconds() - start
        for name, total in totals.items():
            per_round[name].append(total / len(items))
    return {name: statistics.median(values) for name, values in per_round.items()}


def opens(name: str, path: Path) -> bool:
    try:
        decode_with(name, path, 0, 1)
    except Exception:
        return False
    return True


def decoder_rows(fmt: str, paths: list[Path], cfg, rounds: int) -> list[str]:
    """Markdown rows: each decoder's CPU ms per excerpt and its largest difference from a full decode."""
    import numpy as np

    from sonicrec.decode import AudioSource, chain_for

    ranges = {p: excerpt_range(p, cfg) for p in paths}
    names = [d for d in DECODERS if opens(d, paths[0])]
    pipelines = {d: (lambda p, d=d: decode_with(d, p, *ranges[p])) for d in names}
    seconds = timed(pipelines, paths, rounds)
    rows = []
    for d in names:
        worst = 0.0
        for p in paths:
            first, n = ranges[p]
            with AudioSource(p, (d if d != "pedalboard" else chain_for(p)[0],)) as src:
                whole = src.read(0, src.frames)
            part = decode_with(d, p, first, n)
            worst = max(worst, float(np.abs(part - whole[first : first + part.size]).max()))
        chain = chain_for(paths[0])
        place = f"{chain.index(d) + 1} of {len(chain)}" if d in chain else "not used"
        rows.append(f"| {fmt} | {d} | {seconds[d] * 1e3:.1f} | {worst:.1e} | {place} |")
    return rows


def pipeline_row(fmt: str, paths: list[Path], cfg, rounds: int) -> str:
    """Markdown row: stage times, sonicrec end to end vs librosa, and their agreement in dB."""
    import numpy as np
    import soxr

    from sonicrec.audio import file_to_logmel, load_excerpt, logmel
    from sonicrec.decode import AudioSource

    ranges = {p: excerpt_range(p, cfg) for p in paths}
    rates = {p: AudioSource(p).samplerate for p in paths}
    native = {p: decode_with_chain(p, *ranges[p]) for p in paths}
    stereo = {p: np.repeat(native[p][:, None], 2, axis=1) for p in paths}
    waves = {p: load_excerpt(p, cfg).samples for p in paths}
    mix = np.full(2, 0.5, np.float32)
    offsets = {p: load_excerpt(p, cfg).offset for p in paths}
    pipelines = {
        "decode + mix": lambda p: decode_with_chain(p, *ranges[p]),
        "mix": lambda p: stereo[p] @ mix,
        "resample": lambda p: soxr.resample(native[p], rates[p], cfg.sample_rate, quality="HQ"),
        "log-mel": lambda p: logmel(waves[p][None], cfg),
        "sonicrec": lambda p: file_to_logmel(p, cfg),
        "librosa": lambda p: librosa_logmel(p, offsets[p], cfg),
    }
    for fn in pipelines.values():
        fn(paths[0])  # warm-up: imports, caches, numba
    s = timed(pipelines, paths, rounds)
    diff = np.stack([
        np.abs(file_to_logmel(p, cfg) - librosa_logmel(p, offsets[p], cfg)[:, : cfg.n_frames]) for p in paths
    ])
    ms = {k: v * 1e3 for k, v in s.items()}
    return (
        f"| {fmt} | {ms['decode + mix']:.1f} | {ms['mix']:.1f} | {ms['resample']:.1f} | {ms['log-mel']:.1f} "
        f"| {ms['sonicrec']:.1f} | {ms['librosa']:.1f} | {s['librosa'] / s['sonicrec']:.2f}x "
        f"| {diff.max():.4f} | {diff.mean():.5f} |"
    )


def decode_with_chain(path: Path, first: int, n: int):
    from sonicrec.decode import AudioSource

    with AudioSource(path) as src:
        return src.read(first, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracks", type=int, default=6, help="source tracks (each in every format)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (median is reported)")
    parser.add_argument("--music", type=Path, default=DEV_MUSIC, help="tracks.csv of get_dev_music.sh")
    parser.add_argument("--formats", nargs="+", default=list(ENCODINGS), choices=list(ENCODINGS))
    parser.add_argument("--decoders-only", action="store_true", help="skip the pipeline table")
    args = parser.parse_args()

    import warnings

    import torch

    from sonicrec.config import AudioConfig

    warnings.filterwarnings("ignore", module="librosa")  # audioread fallback notices (m4a)

    torch.set_num_threads(1)
    cfg = AudioConfig()
    with tempfile.TemporaryDirectory() as tmp:
        sources, origin = source_tracks(args.music, args.tracks, Path(tmp))
        files = transcode(sources, Path(tmp))
        print(f"source: {origin}; load average at start {os.getloadavg()[0]:.1f}")
        print("\n| format | decoder | CPU ms per 30-s excerpt | max abs diff from a full decode "
              "| place in the chain |")
        print("|---|---|---:|---:|---|")
        for fmt in args.formats:
            print("\n".join(decoder_rows(fmt, files[fmt], cfg, args.rounds)), flush=True)
        if args.decoders_only:
            return
        print("\n| format | decode + mix | mix | resample | log-mel | sonicrec end to end | librosa "
              "| ratio | max dB diff vs librosa | mean dB diff |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for fmt in args.formats:
            print(pipeline_row(fmt, files[fmt], cfg, args.rounds), flush=True)
    print(f"(CPU ms per 30-s excerpt; load average at end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
