"""How a demo track is produced: a varied mix, so the rendered world sounds less like one studio.

The clean rendering (``production = "clean"``) plays every piece with one soundfont, a touch of room
reverb and one loudness. Real recordings differ from it in ways listeners do not care about: the
instrument samples, a drum kit, bass and treble balance, band limits, compression and saturation,
a noise floor and the master level (issue 14: the lowest mel band averages +0.3 dB on real game
soundtracks against -22.8 dB on the clean demo). ``production = "varied"`` draws all of these per
track from the piece's own seed, independently of everything the simulated listeners' taste reads
(style, composer, instruments, tempo, ...), so a model trained on the world has a reason to ignore
them. The draws are recorded in the track's metadata (``production``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PRODUCTIONS = ("clean", "varied")

#: General MIDI soundfonts Debian installs (``fluid-soundfont-gm``); a varied world draws from the
#: bundled one and each of these that exists. (MuseScore's .sf3 fonts take ~3 s a track to load.)
SYSTEM_SOUNDFONTS = (Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),)
PEAK = 0.9  # soft-clip ceiling of the master
DRUM_CHANNEL = 9
KICK, SNARE, CLOSED_HAT, RIDE = 36, 38, 42, 51


@dataclass(frozen=True)
class Mix:
    """One track's production (drawn by :func:`draw_mix`); 0 Hz means the filter is off."""

    soundfont: str  # file name of the soundfont the parts are played with
    drums: bool
    drum_level_db: float  # velocity scale of the kit
    low_shelf_hz: float
    low_shelf_db: float
    mid_hz: float
    mid_db: float
    high_shelf_hz: float
    high_shelf_db: float
    highpass_hz: float
    lowpass_hz: float
    drive_db: float  # saturation; 0 = none
    threshold_db: float  # compressor
    ratio: float
    noise_snr_db: float  # 0 = no noise floor
    noise_slope: float  # noise power ~ f**slope: 0 white, -1 pink, -2 brown
    loudness_db: float  # RMS of the master, dBFS

    def describe(self) -> dict[str, float | str | bool]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def soundfonts(bundled: Path) -> tuple[Path, ...]:
    """The soundfonts a varied world draws from: ``bundled`` and the installed system ones."""
    return (bundled, *(p.resolve() for p in SYSTEM_SOUNDFONTS if p.is_file()))


def draw_mix(rng: np.random.Generator, fonts: tuple[Path, ...]) -> Mix:
    """A random production, plausible for a released recording (seeded by ``rng``)."""
    return Mix(
        soundfont=fonts[rng.integers(len(fonts))].name,
        drums=bool(rng.random() < 0.5),
        drum_level_db=float(rng.uniform(-6.0, 4.0)),
        low_shelf_hz=float(rng.uniform(80.0, 250.0)),
        low_shelf_db=float(rng.uniform(-3.0, 12.0)),
        mid_hz=float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0)))),
        mid_db=float(rng.uniform(-6.0, 6.0)),
        high_shelf_hz=float(rng.uniform(2500.0, 8000.0)),
        high_shelf_db=float(rng.uniform(-9.0, 6.0)),
        highpass_hz=float(rng.uniform(30.0, 200.0)) if rng.random() < 0.4 else 0.0,
        lowpass_hz=float(np.exp(rng.uniform(np.log(3000.0), np.log(10000.0)))) if rng.random() < 0.3 else 0.0,
        drive_db=float(rng.uniform(2.0, 18.0)) if rng.random() < 0.25 else 0.0,
        threshold_db=float(rng.uniform(-35.0, -10.0)),
        ratio=float(rng.uniform(1.5, 10.0)),
        noise_snr_db=float(rng.uniform(20.0, 55.0)) if rng.random() < 0.5 else 0.0,
        noise_slope=float(rng.choice([0.0, -1.0, -2.0])),
        loudness_db=float(rng.uniform(-26.0, -10.0)),
    )


def drum_pattern(
    meter: str, bpm: float, seconds: float, level_db: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A plain kit groove for ``meter`` at ``bpm`` quarter notes per minute: onsets (s), GM drum
    pitches and velocities. Kick on the downbeat (and mid-bar in four or more even beats), snare on
    the other beats of an even meter or the second of three, hi-hat or ride on every subdivision."""
    numerator, denominator = _meter(meter)
    compound = denominator == 8 and numerator % 3 == 0 and numerator > 3
    beats = numerator // 3 if compound else numerator
    beat_s = (1.5 if compound else 4.0 / denominator) * 60.0 / bpm
    subdivisions = 3 if compound else int(rng.choice([1, 2]))
    cymbal = int(rng.choice([CLOSED_HAT, RIDE]))
    hits: list[tuple[float, int, float]] = []
    bar, t = 0, 0.0
    while t < seconds:
        for beat in range(beats):
            at = (bar * beats + beat) * beat_s
            if at >= seconds:
                break
            if beat == 0 or (beats >= 4 and beats % 2 == 0 and beat == beats // 2):
                hits.append((at, KICK, 100.0))
            elif beats % 2 == 0 or beat == 1:
                hits.append((at, SNARE, 92.0))
            for sub in range(subdivisions):
                hits.append((at + sub * beat_s / subdivisions, cymbal, 72.0 if sub == 0 else 58.0))
        bar += 1
        t = bar * beats * beat_s
    onsets, pitches, base = (np.array(c) for c in zip(*hits, strict=True))
    scale = 10 ** (level_db / 40)  # velocity ~ amplitude**0.5 in most soundfonts
    velocity = (base * scale + rng.normal(0.0, 5.0, base.shape)).clip(20, 127).astype(int)
    keep = onsets < seconds
    return onsets[keep], pitches[keep].astype(int), velocity[keep]


def _meter(meter: str) -> tuple[int, int]:
    try:
        numerator, denominator = (int(x) for x in meter.split("/"))
    except ValueError:
        return 4, 4  # "free" or an odd signature: a plain 4/4 groove
    if numerator < 1 or denominator not in (1, 2, 4, 8, 16):
        return 4, 4
    return numerator, denominator


def apply_mix(y: np.ndarray, mix: Mix, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """EQ, band limits, saturation, compression and a noise floor (pedalboard), at ``mix.loudness_db``
    RMS with peaks soft-clipped under PEAK; ``y`` is mono float32."""
    import pedalboard

    board = pedalboard.Pedalboard([
        pedalboard.LowShelfFilter(cutoff_frequency_hz=mix.low_shelf_hz, gain_db=mix.low_shelf_db),
        pedalboard.PeakFilter(cutoff_frequency_hz=mix.mid_hz, gain_db=mix.mid_db, q=1.0),
        pedalboard.HighShelfFilter(cutoff_frequency_hz=mix.high_shelf_hz, gain_db=mix.high_shelf_db),
    ])
    if mix.highpass_hz:
        board.append(pedalboard.HighpassFilter(cutoff_frequency_hz=mix.highpass_hz))
    if mix.lowpass_hz:
        board.append(pedalboard.LowpassFilter(cutoff_frequency_hz=mix.lowpass_hz))
    if mix.drive_db:
        board.append(pedalboard.Distortion(drive_db=mix.drive_db))
    y = board(_at_rms(y, -20.0)[None, :], sample_rate)[0]  # a fixed level into the compressor
    compressor = pedalboard.Compressor(
        threshold_db=mix.threshold_db, ratio=mix.ratio, attack_ms=10.0, release_ms=150.0
    )
    y = compressor(y[None, :], sample_rate)[0]
    if mix.noise_snr_db:
        noise = coloured_noise(len(y), mix.noise_slope, rng)
        y = y + noise * (rms(y) / rms(noise) * 10 ** (-mix.noise_snr_db / 20))
    y = _at_rms(y, mix.loudness_db)
    return (PEAK * np.tanh(y / PEAK)).astype(np.float32)  # a loud master's peaks are clipped softly


def coloured_noise(n: int, slope: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as ``f**slope`` (0 white, -1 pink, -2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spectrum * f ** (slope / 2), n).astype(np.float32)


def rms(y: np.ndarray) -> float:
    """Root mean square (float64 accumulation), at least 1e-9."""
    return max(float(np.sqrt(np.mean(np.square(y, dtype=np.float64)))), 1e-9)


def _at_rms(y: np.ndarray, db: float) -> np.ndarray:
    return (y * (10 ** (db / 20) / rms(y))).astype(np.float32)


__all__ = [
    "PRODUCTIONS", "Mix", "apply_mix", "coloured_noise", "draw_mix", "drum_pattern", "rms", "soundfonts",
]
