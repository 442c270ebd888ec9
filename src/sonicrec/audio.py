"""Audio front end: decode the excerpt of a file to mono float32, then a log-mel spectrogram.

Decoding seeks to the excerpt and reads only it, block by block, mixing down to mono as it goes,
so a 3-hour, 8-channel or 192 kHz file costs no more memory than the excerpt itself.
``soundfile`` (libsndfile: wav, aiff, flac, ogg/vorbis, opus, mp3) is tried first and
``pedalboard`` second (m4a where the platform decoder has it); resampling is done by ``soxr``.
The log-mel spectrogram is computed with ``torch.stft`` in batches; the Slaney mel filterbank is
built here in numpy and agrees with ``librosa.filters.mel``.

>>> cfg = AudioConfig()
>>> logmel(np.zeros((2, excerpt_samples(cfg)), np.float32), cfg).shape
(2, 128, 599)
"""

from __future__ import annotations

import functools
import logging
import math
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sonicrec.config import AudioConfig
from sonicrec.errors import AudioError
from sonicrec.excerpt import block_levels, most_active_start, mostly_silent

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".mp3", ".ogg", ".oga", ".opus", ".flac", ".wav", ".aif", ".aiff", ".m4a")
SILENCE_PEAK = 1e-4  # an excerpt whose peak amplitude stays below this (-80 dBFS) is silent
MAX_PEAK = 1e4  # full scale is 1; a float file reaching this (+80 dBFS) holds no audio signal
MAX_SHORTFALL_SECONDS = 0.5  # decoders may deliver a little less than the header announced
_BLOCK_FRAMES = 1 << 16  # frames decoded per read
# libsndfile's log when a file ends early: a data chunk longer than the file (wav, aiff...),
# an ogg stream without its end-of-stream page
_DATA_CHUNK_LOG = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_OGG_CUT_LOG = "lacks an end-of-stream bit"
_STREAMING_SIZES = (0, 0xFFFFFFFF)  # "unknown length" placeholders, not truncation


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
    """

    samples: np.ndarray
    duration: float
    offset: float
    padded: bool


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


# --- decoding -----------------------------------------------------------------------------------


class _Decoder:
    """A seekable reader over soundfile or pedalboard with one interface: frames in, mono out."""

    def __init__(self, handle, *, channels_last: bool) -> None:
        self._handle = handle
        self._channels_last = channels_last  # soundfile: (frames, channels); pedalboard: (ch, frames)
        self.samplerate = float(handle.samplerate)
        self.frames = int(handle.frames)
        channels = int(handle.channels if channels_last else handle.num_channels)
        self._mix = np.full(channels, 1.0 / channels, dtype=np.float32)  # mono = channel mean

    def truncation(self) -> str | None:
        """Why the file looks cut short, from the decoder's own log (soundfile only), or None."""
        if not self._channels_last:
            return None
        info = self._handle.extra_info
        for announced, actual in _DATA_CHUNK_LOG.findall(info):
            if int(announced) > int(actual) and int(announced) not in _STREAMING_SIZES:
                return f"the header announces {announced} bytes of audio, the file holds {actual}"
        if _OGG_CUT_LOG in info:
            return "the ogg stream has no end-of-stream page"
        return None

    def seek(self, frame: int) -> None:
        self._handle.seek(frame)

    def read_mono(self, n: int) -> np.ndarray:
        """Up to ``n`` frames mixed down to mono, float32 (m,) with m <= n (short at end of file)."""
        if self._channels_last:
            block = self._handle.read(n, dtype="float32", always_2d=True)
            return block @ self._mix if block.shape[1] > 1 else block[:, 0]
        block = self._handle.read(n).astype(np.float32, copy=False)
        return self._mix @ block if block.shape[0] > 1 else block[0]


@contextmanager
def _open_decoder(path: Path) -> Iterator[_Decoder]:
    import soundfile

    try:
        handle, channels_last = soundfile.SoundFile(str(path)), True
    except Exception as sf_exc:  # libsndfile cannot open it: try pedalboard's decoders
        from pedalboard.io import AudioFile

        try:
            handle, channels_last = AudioFile(str(path)), False
        except Exception as pb_exc:
            raise AudioError(
                f"{path}: cannot decode ({_reason(sf_exc)}; {_reason(pb_exc)}): "
                "not an audio file in a supported format, or corrupt; re-encode or remove it"
            ) from pb_exc
    with handle:
        yield _Decoder(handle, channels_last=channels_last)


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_excerpt(path: str | Path, cfg: AudioConfig) -> Excerpt:
    """Decode the excerpt of ``path``: mono float32 at ``cfg.sample_rate``, ``excerpt_samples(cfg)`` long.

    Only the excerpt is read (seek, then blocks of frames), unless it is silent or mostly silent:
    then the whole track is scanned once and its most active window is used (``Excerpt.offset``
    says where). Tracks shorter than the excerpt are zero-padded at the end and flagged ``padded``.

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
                raise AudioError(f"{path}: empty file (0 bytes); re-export it or remove it")
    except OSError as exc:
        raise AudioError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from exc
    try:
        with _open_decoder(path) as dec:
            duration = _check_stream(dec, path)
            offset = excerpt_start(duration, cfg)
            samples = _read_window(dec, path, offset, cfg)
            if mostly_silent(samples, dec.samplerate):  # a silent excerpt too (peak < -80 dBFS)
                offset, samples = _most_active_window(dec, path, duration, offset, samples, cfg)
            native_rate = dec.samplerate
    except AudioError:
        raise
    except Exception as exc:  # decoder failure in the middle of the stream
        raise AudioError(f"{path}: decoding failed ({_reason(exc)}); the file is corrupt") from exc
    if native_rate != cfg.sample_rate:
        samples = soxr.resample(samples, native_rate, cfg.sample_rate, quality="HQ")
    n = excerpt_samples(cfg)
    padded = duration < cfg.excerpt_seconds
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
            f"from {offset:.1f} s); check the file or remove it"
        )
    return Excerpt(np.ascontiguousarray(samples, dtype=np.float32), duration, offset, padded)


def _check_regular_file(path: Path) -> None:
    """Refuse what is not a regular file before opening it: a FIFO would block the open forever."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise AudioError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from exc
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a special file"
        raise AudioError(f"{path}: not a regular file ({kind}); give an audio file")


def _check_stream(dec: _Decoder, path: Path) -> float:
    """The track's duration in seconds; AudioError when it has no frames or is cut short."""
    rate = dec.samplerate
    if not rate > 0 or dec.frames <= 0:
        raise AudioError(f"{path}: no audio frames (rate {rate:g} Hz, {dec.frames} frames); remove it")
    cut = dec.truncation()
    if cut:
        raise AudioError(f"{path}: truncated: {cut}; re-encode or remove it")
    return dec.frames / rate


def _read_window(dec: _Decoder, path: Path, offset: float, cfg: AudioConfig) -> np.ndarray:
    """Mono float32 samples at the native rate of the excerpt starting ``offset`` seconds in."""
    rate = dec.samplerate
    first = round(offset * rate)
    wanted = min(math.ceil(cfg.excerpt_seconds * rate), dec.frames - first)
    dec.seek(first)
    out = np.empty(wanted, dtype=np.float32)
    got = 0
    while got < wanted:
        block = dec.read_mono(min(_BLOCK_FRAMES, wanted - got))
        if block.size == 0:
            break
        out[got : got + block.size] = block
        got += block.size
    if wanted - got > MAX_SHORTFALL_SECONDS * rate:
        raise AudioError(
            f"{path}: truncated: the header announces {dec.frames / rate:.1f} s but decoding stopped at "
            f"{(first + got) / rate:.1f} s; re-encode or remove it"
        )
    return out[:got]


def _all_blocks(dec: _Decoder) -> Iterator[np.ndarray]:
    """The whole track, mono, in blocks of at most ``_BLOCK_FRAMES`` frames."""
    dec.seek(0)
    while (block := dec.read_mono(_BLOCK_FRAMES)).size:
        yield block


def _most_active_window(
    dec: _Decoder, path: Path, duration: float, offset: float, samples: np.ndarray, cfg: AudioConfig
) -> tuple[float, np.ndarray]:
    """The (offset, samples) of the track's most active excerpt, scanning the whole track once.

    Keeps the given excerpt when no window holds more sound (the caller refuses a silent one).
    """
    levels = block_levels(_all_blocks(dec), dec.samplerate)
    start = most_active_start(levels, cfg.excerpt_seconds)
    if start is None:
        return offset, samples
    start = min(start, max(0.0, duration - cfg.excerpt_seconds))
    if start == offset:
        return offset, samples
    log.info("%s: the excerpt at %.1f s is mostly silent; using the most active one at %.1f s",
             path, offset, start)
    return start, _read_window(dec, path, start, cfg)


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
def _kernels(cfg: AudioConfig, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.hann_window(cfg.n_fft, device=device)  # periodic, as librosa's "hann"
    filters = mel_filterbank(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax
    )
    return window, torch.from_numpy(filters).to_sparse().to(device)  # ~2 non-zeros per column


def logmel(
    waveforms: np.ndarray | torch.Tensor, cfg: AudioConfig | None = None, *, batch_size: int | None = None
) -> np.ndarray | torch.Tensor:
    """Log-mel spectrograms in dB: ``10 log10(max(mel power, cfg.log_floor))``.

    Centred frames (zero padding), periodic Hann window, power spectrum, Slaney mel filters:
    the same numbers as ``librosa.feature.melspectrogram`` with the same parameters.

    Parameters
    ----------
    waveforms : (B, n_samples) float array or tensor at ``cfg.sample_rate``.
    cfg : the front-end configuration (defaults if None).
    batch_size : waveforms per STFT call; None = 1 on a CPU (fastest: the spectrogram stays in
        cache), all at once on an accelerator.

    Returns
    -------
    (B, n_mels, 1 + n_samples // hop_length) float32, numpy for numpy input, else a tensor on the
    input's device.
    """
    cfg = cfg or AudioConfig()
    as_numpy = not isinstance(waveforms, torch.Tensor)
    x = torch.from_numpy(np.asarray(waveforms, dtype=np.float32)) if as_numpy else waveforms.float()
    if x.ndim != 2:
        raise ValueError(f"logmel expects (batch, samples) waveforms, got shape {tuple(x.shape)}")
    window, filters = _kernels(cfg, str(x.device))
    if batch_size is None:
        batch_size = 1 if x.device.type == "cpu" else max(1, len(x))
    out = []
    with torch.no_grad():
        for chunk in x.split(batch_size):
            spec = torch.stft(
                chunk, cfg.n_fft, cfg.hop_length, window=window, center=True,
                pad_mode="constant", return_complex=True,
            )  # (b, 1 + n_fft // 2, frames) complex
            power = spec.real.square() + spec.imag.square()
            b, n_bins, frames = power.shape
            mel = torch.sparse.mm(filters, power.transpose(0, 1).reshape(n_bins, b * frames))
            mel = mel.reshape(cfg.n_mels, b, frames).transpose(0, 1)  # (b, n_mels, frames)
            out.append(10.0 * torch.log10(mel.clamp_min(cfg.log_floor)))
    result = torch.cat(out) if out else x.new_empty((0, cfg.n_mels, frame_count(x.shape[1], cfg)))
    return result.numpy() if as_numpy else result


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
