"""Audio front end: decode the excerpt of a file to mono float32, then a log-mel spectrogram.

Decoding seeks to the excerpt and reads only it, block by block, mixing down to mono as it goes,
so a 3-hour, 8-channel or 192 kHz file costs no more memory than the excerpt itself.
The decoder chain of :mod:`sonicrec.decode` delivers the frames (exact seeking, fallback to
FFmpeg), ``soxr`` resamples them, and the log-mel spectrogram is computed with ``scipy.fft`` and a
sparse Slaney mel filterbank built here, which agrees with ``librosa.filters.mel``.

>>> cfg = AudioConfig()
>>> logmel(np.zeros((2, excerpt_samples(cfg)), np.float32), cfg).shape
(2, 128, 599)
"""

from __future__ import annotations

import functools
import logging
import math
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.sparse

from sonicrec.config import AudioConfig
from sonicrec.decode import AUDIO_EXTENSIONS, AudioSource  # noqa: F401 (AUDIO_EXTENSIONS: re-exported)
from sonicrec.errors import AudioError, CheckFile
from sonicrec.excerpt import block_levels, most_active_start, mostly_silent

log = logging.getLogger(__name__)

SILENCE_PEAK = 1e-4  # an excerpt whose peak amplitude stays below this (-80 dBFS) is silent
MAX_PEAK = 1e4  # full scale is 1; a float file reaching this (+80 dBFS) holds no audio signal
_SCAN_SECONDS = 60.0  # frames per read when a whole track is scanned for its most active window


@dataclass(frozen=True)
class Excerpt:
    """The decoded excerpt of one track.

    Attributes
    ----------
    samples : np.ndarray
        float32 (excerpt_samples(cfg),) mono at ``cfg.sample_rate``, zero-padded at the end if short.
    duration : float
        Length of the whole track in seconds.
    offset : float
        Where the excerpt starts in the track, seconds: the configured start, or the start of the
        most active window when that excerpt is (mostly) silent (:mod:`sonicrec.excerpt`).
    padded : bool
        True when the track is shorter than the excerpt.
    decoder : str
        Name of the decoder that delivered the samples (:mod:`sonicrec.decode`).
    notes : tuple of str
        What the decoder libraries printed about the file (warnings), for the catalog.
    """

    samples: np.ndarray
    duration: float
    offset: float
    padded: bool
    decoder: str = ""
    notes: tuple[str, ...] = ()


def excerpt_samples(cfg: AudioConfig) -> int:
    """Number of samples of an excerpt at ``cfg.sample_rate``."""
    return round(cfg.excerpt_seconds * cfg.sample_rate)


def frame_count(n_samples: int, cfg: AudioConfig) -> int:
    """Number of centred STFT frames of ``n_samples`` samples (``cfg.n_frames`` for an excerpt)."""
    return 1 + n_samples // cfg.hop_length


def excerpt_start(duration: float, cfg: AudioConfig) -> float:
    """Start of the excerpt in seconds: ``cfg.excerpt_offset`` or centred, kept inside the track."""
    latest = max(0.0, duration - cfg.excerpt_seconds)
    if cfg.excerpt_offset is None:
        return latest / 2
    return min(max(0.0, cfg.excerpt_offset), latest)


def track_excerpt_start(
    duration: float | None, cfg: AudioConfig, *, recorded: float | None = None
) -> float | None:
    """Where an ingested track's excerpt starts, seconds: the one answer for the catalog's tracks.

    ``recorded`` is the offset ingest recorded (the catalog's ``meta["excerpt_offset"]``, which
    differs from :func:`excerpt_start` when that excerpt was mostly silent and the most active one
    was used); without it (None or NaN: ingested before offsets were recorded) the planned
    :func:`excerpt_start` of ``duration``; None when the duration is unknown too.
    """
    if recorded is not None and math.isfinite(recorded):
        return float(recorded)
    if duration is None or not math.isfinite(duration):
        return None
    return excerpt_start(duration, cfg)


# --- decoding -----------------------------------------------------------------------------------


def load_excerpt(path: str | Path, cfg: AudioConfig) -> Excerpt:
    """Decode the excerpt of ``path``: mono float32 at ``cfg.sample_rate``, ``excerpt_samples(cfg)`` long.

    Only the excerpt is read (exact seek, then blocks of frames, by the decoder chain of
    :mod:`sonicrec.decode`), unless it is silent or mostly silent: then the whole track is scanned
    once and its most active window is used (``Excerpt.offset`` says where). Tracks shorter than
    the excerpt are zero-padded at the end and flagged ``padded``.

    Raises
    ------
    AudioError
        The file is missing, unreadable, empty, not audio, corrupt, truncated or silent throughout.
    """
    import soxr

    path = Path(path)
    _check_regular_file(path)
    try:
        with open(path, "rb") as fh:
            if not fh.read(1):
                raise AudioError(f"{path}: empty file (0 bytes)", remedy=CheckFile())
    except OSError as exc:
        raise AudioError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from exc
    with AudioSource(path) as src:
        if not src.samplerate > 0 or src.frames <= 0:
            raise AudioError(f"{path}: no audio frames (rate {src.samplerate:g} Hz, {src.frames} frames)")
        offset = excerpt_start(src.duration, cfg)
        samples = _read_window(src, offset, cfg)
        if mostly_silent(samples, src.samplerate):  # a silent excerpt too (peak < -80 dBFS)
            offset, samples = _most_active_window(src, offset, samples, cfg)
    if src.samplerate != cfg.sample_rate:
        samples = soxr.resample(samples, src.samplerate, cfg.sample_rate, quality="HQ")
    n = excerpt_samples(cfg)
    padded = src.duration < cfg.excerpt_seconds
    if samples.size >= n:
        samples = samples[:n]
    else:
        samples = np.pad(samples, (0, n - samples.size))
    peak = float(np.abs(samples).max(initial=0.0))  # NaN or inf if any sample is
    if not math.isfinite(peak):
        raise AudioError(f"{path}: decoded samples are not finite (NaN/inf); the file is corrupt")
    if peak > MAX_PEAK:
        raise AudioError(f"{path}: samples reach {peak:.3g}, far outside [-1, 1]: corrupt, or not audio")
    if peak < SILENCE_PEAK:
        raise AudioError(
            f"{path}: silent throughout (peak {peak:.1e} at the loudest {cfg.excerpt_seconds:g} s, "
            f"from {offset:.1f} s)", remedy=CheckFile(),
        )
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    return Excerpt(samples, src.duration, offset, padded, src.decoder, tuple(src.notes))


def _check_regular_file(path: Path) -> None:
    """Refuse what is not a regular file before opening it: a FIFO would block the open forever."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise AudioError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from exc
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a special file"
        raise AudioError(f"{path}: not a regular file ({kind}); give an audio file")


def _read_window(src: AudioSource, offset: float, cfg: AudioConfig) -> np.ndarray:
    """Mono float32 samples at the native rate of the excerpt starting ``offset`` seconds in."""
    first = round(offset * src.samplerate)
    return src.read(first, min(math.ceil(cfg.excerpt_seconds * src.samplerate), src.frames - first))


def _all_blocks(src: AudioSource) -> Iterator[np.ndarray]:
    """The whole track, mono, in blocks of ``_SCAN_SECONDS``."""
    size = round(_SCAN_SECONDS * src.samplerate)
    for first in range(0, src.frames, size):
        yield src.read(first, size)


def _most_active_window(
    src: AudioSource, offset: float, samples: np.ndarray, cfg: AudioConfig
) -> tuple[float, np.ndarray]:
    """The (offset, samples) of the track's most active excerpt, scanning the whole track once.

    Keeps the given excerpt when no window holds more sound (the caller refuses a silent one).
    """
    levels = block_levels(_all_blocks(src), src.samplerate)
    start = most_active_start(levels, cfg.excerpt_seconds)
    if start is None:
        return offset, samples
    start = min(start, max(0.0, src.duration - cfg.excerpt_seconds))
    if start == offset:
        return offset, samples
    log.info("%s: the excerpt at %.1f s is mostly silent; using the most active one at %.1f s",
             src.path, offset, start)
    return start, _read_window(src, start, cfg)


# --- log-mel ------------------------------------------------------------------------------------


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (as librosa with ``htk=False``)."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    log_part = min_log_hz / f_sp + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, log_part, hz / f_sp)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_frequencies(n: int, fmin: float, fmax: float) -> np.ndarray:
    """``n`` frequencies (Hz) equally spaced on the mel scale from ``fmin`` to ``fmax``."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n))


def band_centres(cfg: AudioConfig) -> np.ndarray:
    """Centre frequency (Hz) of each mel band, float64 (n_mels,)."""
    return mel_frequencies(cfg.n_mels + 2, cfg.fmin, cfg.fmax or cfg.sample_rate / 2)[1:-1]


def mel_filterbank(
    *, sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Slaney-normalised triangular mel filters, float32 (n_mels, 1 + n_fft // 2).

    Same as ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)``.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    bin_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = mel_frequencies(n_mels + 2, fmin, fmax)  # (n_mels + 2,) lower edge, centres, upper edge
    widths = np.diff(edges)
    ramps = edges[:, None] - bin_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # equal area per band
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _kernels(cfg: AudioConfig) -> tuple[np.ndarray, scipy.sparse.csr_matrix]:
    """Periodic Hann window, float32 (n_fft,), as librosa's "hann"; mel filters as CSR (n_mels, bins)."""
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)).astype(np.float32)
    filters = mel_filterbank(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax
    )
    return window, scipy.sparse.csr_matrix(filters)  # ~2 non-zeros per column


def logmel(waveforms: np.ndarray, cfg: AudioConfig | None = None) -> np.ndarray:
    """Log-mel spectrograms in dB: ``10 log10(max(mel power, cfg.log_floor))``.

    Centred frames (zero padding), periodic Hann window, power spectrum, Slaney mel filters:
    the same numbers as ``librosa.feature.melspectrogram`` with the same parameters. One waveform
    at a time (``scipy.fft.rfft`` on a strided view of its frames, then the sparse filters): on a
    CPU that is faster than ``torch.stft`` and than batching (docs/benchmarks.md).

    Parameters
    ----------
    waveforms : float array (B, n_samples) at ``cfg.sample_rate``.
    cfg : the front-end configuration (defaults if None).

    Returns
    -------
    float32 (B, n_mels, 1 + n_samples // hop_length).
    """
    cfg = cfg or AudioConfig()
    x = np.asarray(waveforms, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"logmel expects (batch, samples) waveforms, got shape {x.shape}")
    window, filters = _kernels(cfg)
    out = np.empty((len(x), cfg.n_mels, frame_count(x.shape[1], cfg)), dtype=np.float32)
    for i, y in enumerate(x):
        padded = np.pad(y, cfg.n_fft // 2)
        frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft)[:: cfg.hop_length]
        spec = scipy.fft.rfft(frames * window, axis=-1, workers=1)  # (frames, bins) complex64
        power = np.square(spec.real)
        power += np.square(spec.imag)
        mel = filters @ np.ascontiguousarray(power.T)  # (n_mels, frames)
        np.log10(np.maximum(mel, cfg.log_floor), out=out[i])
    out *= 10.0
    # float32 log10 may round the floor itself a few ulp below 10 log10(floor): the floor is the minimum
    np.maximum(out, np.float32(10.0 * np.log10(cfg.log_floor)), out=out)
    return out


def file_to_logmel(path: str | Path, cfg: AudioConfig | None = None) -> np.ndarray:
    """Decode the excerpt of one file and return its log-mel spectrogram, float32 (n_mels, n_frames).

    Raises :class:`~sonicrec.errors.AudioError` on bad files (see :func:`load_excerpt`).
    """
    cfg = cfg or AudioConfig()
    return excerpt_logmel(load_excerpt(path, cfg), cfg, path)


def excerpt_logmel(excerpt: Excerpt, cfg: AudioConfig, path: str | Path) -> np.ndarray:
    """The log-mel spectrogram of a decoded excerpt, float32 (n_mels, n_frames); raises
    :class:`~sonicrec.errors.AudioError` naming ``path`` if it is not finite (never stored or used)."""
    features = logmel(excerpt.samples[None], cfg)[0]
    if not np.isfinite(features).all():
        raise AudioError(f"{path}: the log-mel spectrogram is not finite; the file is corrupt")
    return features
