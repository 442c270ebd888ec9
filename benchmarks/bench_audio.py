"""Audio front end: tracks/second on one core, sonicrec vs librosa, and their numeric agreement.

For each format (mp3, ogg/vorbis, flac) it times, in the same process and on the same 30-s clips:

- sonicrec: ``file_to_logmel`` (soundfile decode, soxr resample, torch.stft + mel filters);
- librosa:  ``librosa.load(sr=22050)`` + ``librosa.feature.melspectrogram`` + dB with the same floor;
- decode only: ``soundfile.read`` of the whole clip (the floor under any pipeline).

The clips are the middle 30 s of the real recordings in ../shared/data/recordings that are long
enough, resampled to 44.1 kHz stereo (right channel = left delayed by 7.5 ms) as in a typical
catalogue; without them, SIMULATED clips (tones + noise) are used and the output says so.
Everything runs single-threaded (one core). Agreement is the max abs dB difference of the log-mel
spectrograms: on the same waveform (mel computation only) and end to end (decoder and resampler
included).

    python benchmarks/bench_audio.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before numpy / torch / librosa are imported

RECORDINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "recordings"
CLIP_RATE, CLIP_SECONDS, FORMATS = 44100, 30, ("mp3", "ogg", "flac")


def source_clips(seed: int = 0) -> tuple[list, str]:
    """Mono 30-s float32 signals at 44.1 kHz and a description of where they came from."""
    import numpy as np
    import soundfile as sf
    import soxr

    clips = []
    for path in sorted(RECORDINGS.glob("*.ogg")):
        y, rate = sf.read(path, dtype="float32", always_2d=True)
        y = y.mean(axis=1)
        n = CLIP_SECONDS * rate
        if y.size >= n:
            start = (y.size - n) // 2
            clips.append(soxr.resample(y[start : start + n], rate, CLIP_RATE).astype(np.float32))
    if clips:
        return clips, f"{len(clips)} real recordings from {RECORDINGS}"
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SECONDS * CLIP_RATE) / CLIP_RATE
    for f in (220.0, 440.0, 880.0, 1760.0):
        y = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)
        clips.append(y.astype(np.float32))
    return clips, f"{len(clips)} SIMULATED clips (tones + noise): shared recordings not found"


def write_clips(clips: list, folder: Path) -> dict[str, list[Path]]:
    import numpy as np
    from pedalboard.io import AudioFile

    delay = round(0.0075 * CLIP_RATE)
    quality = {"mp3": "V2", "ogg": "160 kbps", "flac": None}
    out: dict[str, list[Path]] = {fmt: [] for fmt in FORMATS}
    for i, y in enumerate(clips):
        stereo = np.stack([y, np.concatenate([np.zeros(delay, np.float32), y[:-delay]])]) * 0.9
        for fmt in FORMATS:
            path = folder / f"clip{i:02d}.{fmt}"
            kwargs = {"quality": quality[fmt]} if quality[fmt] else {}
            with AudioFile(str(path), "w", CLIP_RATE, 2, **kwargs) as f:
                f.write(stereo)
            out[fmt].append(path)
    return out


def librosa_logmel(path: Path, cfg):
    import librosa
    import numpy as np

    y, _ = librosa.load(path, sr=cfg.sample_rate, mono=True)
    mel = librosa.feature.melspectrogram(
        y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels,
        fmin=cfg.fmin, fmax=cfg.fmax, power=2.0,
    )
    return 10 * np.log10(np.maximum(mel, cfg.log_floor))


def cpu_seconds_per_track(pipelines: dict, paths: list, rounds: int) -> dict[str, float]:
    """CPU seconds per track of each pipeline (median over rounds), interleaved clip by clip.

    CPU time of this single-threaded process, not wall time, so other jobs on the machine
    change the figures little; interleaving exposes every pipeline to the same conditions.
    """
    per_round: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(rounds):
        totals = dict.fromkeys(pipelines, 0.0)
        for p in paths:
            for name, fn in pipelines.items():
                start = time.process_time()
                fn(p)
                totals[name] += time.process_time() - start
        for name, total in totals.items():
            per_round[name].append(total / len(paths))
    return {name: statistics.median(values) for name, values in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (median is reported)")
    args = parser.parse_args()

    import librosa
    import numpy as np
    import soundfile as sf
    import torch

    from sonicrec.audio import file_to_logmel, logmel
    from sonicrec.config import AudioConfig

    torch.set_num_threads(1)
    cfg = AudioConfig()
    clips, origin = source_clips()
    print(f"clips: {origin}; 30 s, {CLIP_RATE} Hz stereo; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_clips(clips, Path(tmp))
        pipelines = {
            "sonicrec": lambda p: file_to_logmel(p, cfg),
            "librosa": lambda p: librosa_logmel(p, cfg),
            "decode only": lambda p: sf.read(p, dtype="float32"),
        }
        rows = []
        for fmt in FORMATS:
            for fn in pipelines.values():
                fn(files[fmt][0])  # warm-up (imports, caches, numba)
            seconds = cpu_seconds_per_track(pipelines, files[fmt], args.rounds)
            ours = np.stack([file_to_logmel(p, cfg) for p in files[fmt]])
            ref = np.stack([librosa_logmel(p, cfg) for p in files[fmt]])
            same_wave = []
            for p in files[fmt]:
                y, _ = librosa.load(p, sr=cfg.sample_rate)
                y = y[: 30 * cfg.sample_rate]
                mel = librosa.feature.melspectrogram(
                    y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                    n_mels=cfg.n_mels, power=2.0,
                )
                ref_db = 10 * np.log10(np.maximum(mel, cfg.log_floor))
                same_wave.append(np.abs(logmel(y[None], cfg)[0] - ref_db).max())
            diff = np.abs(ours - ref[..., : ours.shape[-1]])
            rows.append((fmt, seconds, max(same_wave), diff.max(), np.percentile(diff, 99.9)))

        # log-mel alone: 16 waveforms per call, in batches of 1, 4 or 16 for sonicrec
        waves = librosa.load(files["flac"][0], sr=cfg.sample_rate)[0][None].repeat(16, axis=0)

        def librosa_mel(_: None) -> None:
            for w in waves:
                librosa.feature.melspectrogram(
                    y=w, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels
                )

        mel = {"librosa": librosa_mel}
        for b in (1, 4, 16):
            mel[f"sonicrec batch {b}"] = lambda _, b=b: [
                logmel(waves[i : i + b], cfg) for i in range(0, 16, b)
            ]
        mel_seconds = cpu_seconds_per_track(mel, [None], args.rounds)

    print("\n| format | sonicrec tracks/CPU-s | librosa tracks/CPU-s | speed-up | decode-only tracks/CPU-s "
          "| ceiling: librosa / decode only | max dB diff, same waveform | max dB diff, end to end "
          "| 99.9th pct dB diff, end to end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt, s, same, worst, p999 in rows:
        print(
            f"| {fmt} | {1 / s['sonicrec']:.1f} | {1 / s['librosa']:.1f} | "
            f"{s['librosa'] / s['sonicrec']:.2f}x | {1 / s['decode only']:.1f} | "
            f"{s['librosa'] / s['decode only']:.2f}x | {same:.4f} | {worst:.4f} | {p999:.4f} |"
        )
    print("\nlog-mel only (30 s at 22.05 kHz), CPU ms per track: " + ", ".join(
        f"{name} {t * 1e3 / 16:.2f}" for name, t in mel_seconds.items()
    ))

if __name__ == "__main__":
    main()
