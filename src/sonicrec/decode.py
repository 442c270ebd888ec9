"""The decoder chain: open any audio file this machine can decode, seek exactly, read mono frames.

Each format has an ordered chain of decoders, the fastest exact one first (measured with
``benchmarks/bench_audio.py``, see docs/benchmarks.md), then PyAV (FFmpeg's libraries, shipped in
its wheels), which reads nearly everything, then the system's ``ffmpeg`` command where it is
installed, for what PyAV's build lacks (tracker modules via libopenmpt). A decoder that cannot open
a file, or that fails or stops short in the middle of a read, hands over to the next one, which
reads the same frames again.

Every decoder counts frames the same way, from the first sample of the decoded signal (encoder
delay, priming and Opus pre-skip removed; for PyAV, timestamps taken relative to the first decoded
frame's, not to the container's ``start_time``), so a position names the same sample whichever
decoder delivers it; the track's length is the one announced by the first decoder that opened
the file. What a decoder library prints about the file (mpg123's "Note:" lines,
FFmpeg's packet errors) never reaches stderr: it is kept in :attr:`AudioSource.notes`.

>>> with AudioSource("song.mp3") as src:                      # doctest: +SKIP
...     mono = src.read(src.frames // 2, round(30 * src.samplerate))
...     src.decoder, src.notes
('soundfile', ())
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sonicrec.errors import AudioError

log = logging.getLogger(__name__)

TRACKER_EXTENSIONS = (".it", ".xm", ".mod", ".s3m", ".mptm")
# the chain per file extension, fastest exact decoder first (docs/benchmarks.md, "Decoders")
CHAINS: dict[str, tuple[str, ...]] = {
    ".wav": ("soundfile", "pyav"),
    ".aif": ("soundfile", "pyav"),
    ".aiff": ("soundfile", "pyav"),
    ".flac": ("miniaudio", "soundfile", "pyav"),
    ".mp3": ("soundfile", "pyav"),
    # libsndfile seeks 256 frames off in Ogg Vorbis streams whose granules start late (cut by ffmpeg)
    ".ogg": ("miniaudio", "pyav"),
    ".oga": ("miniaudio", "pyav"),
    ".opus": ("pyav", "soundfile"),
    **{ext: ("pyav",) for ext in (".m4a", ".aac", ".mp4", ".wma", ".mka", ".webm")},
    **{ext: ("ffmpeg",) for ext in TRACKER_EXTENSIONS},
}
DEFAULT_CHAIN = ("soundfile", "pyav")  # unknown extensions; "ffmpeg" is appended to every chain
AUDIO_EXTENSIONS = tuple(CHAINS)
MAX_SHORTFALL_SECONDS = 0.5  # decoders may deliver a little less than the header announced
SEEK_PREROLL_SECONDS = 1.0  # PyAV: seek this far before the target and decode up to it (mp3 bit
# reservoir, Opus pre-roll), so the frames equal those of a decode from the start
_BLOCK_FRAMES = 1 << 16  # frames decoded per read call
_MAX_NOTES = 20
_ANCHOR_FRAMES = 8  # PyAV: frames whose timestamps place the first frame after a seek
# libsndfile's log when a file ends early: a data chunk longer than the file (wav, aiff...),
# an ogg stream without its end-of-stream page
_DATA_CHUNK_LOG = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_OGG_CUT_LOG = "lacks an end-of-stream bit"
_STREAMING_SIZES = (0, 0xFFFFFFFF)  # "unknown length" placeholders, not truncation
# libsndfile says this of any file it does not recognise, though the file exists and is regular
_SNDFILE_MISLEADING = "File does not exist or is not a regular file"


class _Truncated(AudioError):
    """The file ends before its header says: definitive, no other decoder is tried."""


class _Decoder:
    """One decoder library on one file. Subclasses set ``samplerate``, ``frames``, ``channels``."""

    name = ""
    samplerate: float
    frames: int  # length of the track, frames at ``samplerate``
    channels: int

    def __init__(self, path: Path, notes: list[str]) -> None:
        self.path = path
        self.notes = notes  # shared with the AudioSource: messages the library wrote about the file

    def blocks(self, first: int, n: int) -> Iterator[np.ndarray]:
        """Mono float32 blocks (m,) from frame ``first`` on, ``n`` frames or fewer in all."""
        raise NotImplementedError

    def read(self, first: int, n: int) -> np.ndarray:
        """Up to ``n`` mono frames from frame ``first``: float32 (m,), m < n only at end of stream."""
        out = np.empty(n, dtype=np.float32)
        got = 0
        with self._library_output():
            for block in self.blocks(first, n):
                take = min(block.size, n - got)
                out[got : got + take] = block[:take]
                got += take
                if got == n:
                    break
        return out[:got]

    def _library_output(self) -> contextlib.AbstractContextManager:
        """Where the library's own messages go while it decodes (nowhere special by default)."""
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def _mono(block: np.ndarray, channels_axis: int) -> np.ndarray:
    """Channel mean of a float32 block, (m,)."""
    if block.shape[channels_axis] == 1:
        return block[:, 0] if channels_axis == 1 else block[0]
    mix = np.full(block.shape[channels_axis], 1.0 / block.shape[channels_axis], dtype=np.float32)
    return block @ mix if channels_axis == 1 else mix @ block


_STDERR_LOCK = threading.RLock()


@contextmanager
def _captured_stderr(notes: list[str]):
    """Redirect the process's file descriptor 2 (where C libraries print) into ``notes``."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            _add_notes(notes, tmp.read().decode("utf-8", "replace"))


def _add_notes(notes: list[str], text: str) -> None:
    for line in text.splitlines():
        line = line.strip()
        if line and line not in notes and len(notes) < _MAX_NOTES:
            notes.append(line)


class _Soundfile(_Decoder):
    """libsndfile: wav, aiff, flac, ogg/vorbis, opus, mp3 (mpg123); sample-accurate seeking."""

    name = "soundfile"

    def __init__(self, path: Path, notes: list[str]) -> None:
        super().__init__(path, notes)
        import soundfile

        with _captured_stderr(notes):
            self._file = soundfile.SoundFile(str(path))
        self.samplerate, self.frames = float(self._file.samplerate), int(self._file.frames)
        self.channels = int(self._file.channels)
        cut = self._truncation(self._file.extra_info)
        if cut:
            self._file.close()
            raise _Truncated(f"{path}: truncated: {cut}")

    @staticmethod
    def _truncation(info: str) -> str | None:
        for announced, actual in _DATA_CHUNK_LOG.findall(info):
            if int(announced) > int(actual) and int(announced) not in _STREAMING_SIZES:
                return f"the header announces {announced} bytes of audio, the file holds {actual}"
        if _OGG_CUT_LOG in info:
            return "the ogg stream has no end-of-stream page"
        return None

    def _library_output(self) -> contextlib.AbstractContextManager:
        return _captured_stderr(self.notes)  # mpg123 prints "Note:" and layer3 errors there

    def blocks(self, first: int, n: int) -> Iterator[np.ndarray]:
        self._file.seek(first)
        left = n
        while left > 0:
            block = self._file.read(min(_BLOCK_FRAMES, left), dtype="float32", always_2d=True)
            if not len(block):
                return
            left -= len(block)
            yield _mono(block, 1)

    def close(self) -> None:
        self._file.close()


def _pcm_to_float(a: np.ndarray) -> np.ndarray:
    """Samples of any FFmpeg sample format as float32 in [-1, 1)."""
    if a.dtype == np.float32:
        return a
    if a.dtype == np.uint8:
        return (a.astype(np.float32) - 128.0) / 128.0
    if a.dtype.kind == "i":
        return a.astype(np.float32) / np.float32(2 ** (8 * a.dtype.itemsize - 1))
    return a.astype(np.float32)


class _PyAV(_Decoder):
    """FFmpeg's libraries through PyAV: Opus, AAC/M4A, WMA, and everything else FFmpeg reads.

    Frame 0 is the first sample decoded from the start (as the ``ffmpeg`` command counts: encoder
    delay and Opus pre-skip already dropped), whose timestamp is the origin. After a seek, the
    position of the first frame is the median over the first frames of their timestamp less the
    samples before them: single timestamps are off by hundreds of samples in some Ogg and MP4 files.
    The length is the stream's end less the origin and the codec's delay.
    """

    name = "pyav"

    def __init__(self, path: Path, notes: list[str]) -> None:
        super().__init__(path, notes)
        import av

        self._av = av
        self._container = None
        self._open()
        stream = self._stream
        self.samplerate = float(stream.rate or stream.codec_context.sample_rate)
        self.channels = stream.codec_context.channels
        first = next(self._decoded(), None)
        start = stream.start_time or 0
        self._origin = first.pts if first is not None and first.pts is not None else start
        # Ogg timestamps after a seek are granule positions, counted from the decoded stream's start
        self._seek_origin = 0 if self._container.format.name == "ogg" else self._origin
        if stream.duration:
            end = float((start + stream.duration - self._origin) * stream.time_base)
        elif self._container.duration:
            end = self._container.duration / 1e6
        else:
            end = sum(b.size for b in self.blocks(0, 1 << 62)) / self.samplerate  # count by decoding
        self.frames = max(0, round(end * self.samplerate) - (stream.codec_context.delay or 0))

    def _open(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._av.open(str(self.path), metadata_errors="ignore")
        if not self._container.streams.audio:
            self._container.close()
            raise AudioError(f"{self.path}: no audio stream")
        self._stream = self._container.streams.audio[0]

    def _decoded(self) -> Iterator:
        """Frames from the current demuxer position; a packet that fails to decode is noted, skipped."""
        for packet in self._container.demux(self._stream):
            try:
                yield from packet.decode()
            except self._av.error.InvalidDataError as exc:
                _add_notes(self.notes, f"pyav: {exc}")

    def _anchor(self, frames: Iterator) -> tuple[int | None, list]:
        """The next frames (up to ``_ANCHOR_FRAMES``) and the position of the first of them."""
        head = list(itertools.islice(frames, _ANCHOR_FRAMES))
        offsets, before = [], 0
        for frame in head:
            if frame.pts is not None:
                at = float((frame.pts - self._seek_origin) * frame.time_base) * self.samplerate
                offsets.append(round(at) - before)
            before += frame.samples
        return (round(statistics.median(offsets)) if offsets else None), head

    def _frames(self, first: int) -> tuple[int, Iterator]:
        """The position of the first frame and the frames, from a seek ``SEEK_PREROLL_SECONDS``
        before ``first``, or from the start when that is sooner or the seek lands past ``first``."""
        target = first / self.samplerate - SEEK_PREROLL_SECONDS
        if target > 0:
            tb = self._stream.time_base
            self._container.seek(self._seek_origin + int(target / tb), stream=self._stream)
            frames = self._decoded()
            pos, head = self._anchor(frames)
            if pos is not None and pos <= first:
                return pos, itertools.chain(head, frames)
        self._open()  # from the start: a fresh demuxer and decoder, as for a full decode
        return 0, self._decoded()

    def blocks(self, first: int, n: int) -> Iterator[np.ndarray]:
        pos, frames = self._frames(first)  # pos: where the next frame starts
        end = first + n
        for frame in frames:
            a = _pcm_to_float(frame.to_ndarray())  # planar (channels, m), packed (1, m * channels)
            mono = _mono(a, 0) if frame.format.is_planar else _mono(a.reshape(-1, self.channels), 1)
            lo, pos = max(0, first - pos), pos + mono.size
            if lo < mono.size:
                yield mono[lo : mono.size - max(0, pos - end)]
            if pos >= end:
                return

    def close(self) -> None:
        self._container.close()


class _Miniaudio(_Decoder):
    """miniaudio (dr_flac, dr_mp3, stb_vorbis, dr_wav), seeking with ``stream_file(seek_frame=)``."""

    name = "miniaudio"

    def __init__(self, path: Path, notes: list[str]) -> None:
        super().__init__(path, notes)
        import miniaudio

        self._ma = miniaudio
        info = miniaudio.get_file_info(str(path))
        self.samplerate, self.frames, self.channels = float(info.sample_rate), info.num_frames, info.nchannels
        if info.file_format == miniaudio.FileFormat.VORBIS and not _ogg_ends_properly(path):
            raise _Truncated(f"{path}: truncated: the ogg stream has no end-of-stream page")

    def blocks(self, first: int, n: int) -> Iterator[np.ndarray]:
        stream = self._ma.stream_file(
            str(self.path), output_format=self._ma.SampleFormat.FLOAT32, nchannels=self.channels,
            sample_rate=int(self.samplerate), frames_to_read=min(n, _BLOCK_FRAMES), seek_frame=first,
        )
        with contextlib.closing(stream):
            for chunk in stream:
                yield _mono(np.frombuffer(chunk, dtype=np.float32).reshape(-1, self.channels), 1)


def _ogg_ends_properly(path: Path) -> bool:
    """Whether the last Ogg page of the file is flagged end-of-stream (a cut file's is not)."""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - (1 << 16)))  # an Ogg page is at most 65,307 bytes
        tail = fh.read()
    last = tail.rfind(b"OggS")
    return last >= 0 and len(tail) > last + 5 and bool(tail[last + 5] & 0x04)


@functools.cache
def ffmpeg_command() -> str | None:
    """Path of the system's ``ffmpeg`` command, or None where it is not installed."""
    return shutil.which("ffmpeg")


class _FFmpegCommand(_Decoder):
    """The system's ``ffmpeg`` command (Debian's build has libopenmpt: tracker modules).

    Decodes from the start into a pipe (native rate and channels, float32) and keeps the frames
    asked for, so positions are exact by construction; the length is counted the same way (a
    container's duration would include encoder delay and padding), rate and channels come from
    ``ffprobe``.
    """

    name = "ffmpeg"

    def __init__(self, path: Path, notes: list[str]) -> None:
        super().__init__(path, notes)
        ffmpeg = ffmpeg_command()
        if ffmpeg is None:
            raise AudioError(f"{path}: the ffmpeg command is not installed")
        self._ffmpeg = ffmpeg
        probe = subprocess.run(
            [str(Path(ffmpeg).with_name("ffprobe")), "-v", "error", "-select_streams", "a:0",
             "-show_entries", "stream=sample_rate,channels", "-of", "json", "--", str(path)],
            capture_output=True, text=True, check=False,
        )
        streams = json.loads(probe.stdout or "{}").get("streams") or []
        if probe.returncode or not streams:
            raise AudioError(f"{path}: ffprobe finds no audio ({_last_line(probe.stderr)})")
        self.samplerate, self.channels = float(streams[0]["sample_rate"]), int(streams[0]["channels"])
        self.frames = sum(len(block) for block in self._decode())

    def _decode(self) -> Iterator[np.ndarray]:
        """The whole stream, float32 (m, channels) blocks; what ffmpeg prints goes to the notes."""
        cmd = [self._ffmpeg, "-v", "error", "-nostdin", "-i", str(self.path), "-map", "0:a:0",
               "-f", "f32le", "-c:a", "pcm_f32le", "-"]
        frame_bytes = 4 * self.channels
        with tempfile.TemporaryFile() as err, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL
        ) as proc:
            try:
                while data := proc.stdout.read(_BLOCK_FRAMES * frame_bytes):
                    usable = len(data) // frame_bytes * frame_bytes
                    yield np.frombuffer(data[:usable], np.float32).reshape(-1, self.channels)
            finally:
                proc.kill()
                err.seek(0)
                _add_notes(self.notes, err.read().decode("utf-8", "replace"))

    def blocks(self, first: int, n: int) -> Iterator[np.ndarray]:
        pos = 0
        for block in self._decode():
            if pos + len(block) > first:
                yield _mono(block[max(0, first - pos) : first + n - pos], 1)
            pos += len(block)
            if pos >= first + n:
                return


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


DECODERS: dict[str, type[_Decoder]] = {
    d.name: d for d in (_Soundfile, _Miniaudio, _PyAV, _FFmpegCommand)
}


def chain_for(path: str | Path) -> tuple[str, ...]:
    """Names of the decoders tried on ``path``, in order (the system ``ffmpeg`` last, if installed)."""
    chain = CHAINS.get(Path(path).suffix.lower(), DEFAULT_CHAIN)
    if ffmpeg_command() and "ffmpeg" not in chain:
        chain += ("ffmpeg",)
    return chain


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return "format not recognised" if _SNDFILE_MISLEADING in text else text


class AudioSource:
    """An open audio file: exact mono frames from any position, whichever decoder delivers them.

    Attributes
    ----------
    samplerate : float
        Native sample rate, Hz.
    frames : int
        Length of the track in frames, as announced by the first decoder that opened it.
    decoder : str
        Name of the decoder that delivered the last read (or opened the file).
    notes : list of str
        What the decoders printed about this file, deduplicated (at most 20 lines).

    Raises :class:`~sonicrec.errors.AudioError` when no decoder opens the file.
    """

    def __init__(self, path: str | Path, chain: tuple[str, ...] | None = None) -> None:
        self.path = Path(path)
        self.notes: list[str] = []
        self._pending = list(chain or chain_for(self.path))
        self._failures: list[str] = []
        self._decoder = self._open_next()
        if self._decoder is None:
            raise AudioError(self._refusal())
        self.samplerate, self.frames = self._decoder.samplerate, self._decoder.frames

    @property
    def decoder(self) -> str:
        return self._decoder.name

    @property
    def duration(self) -> float:
        """Length of the track in seconds."""
        return self.frames / self.samplerate

    def _open_next(self) -> _Decoder | None:
        while self._pending:
            name = self._pending.pop(0)
            try:
                return DECODERS[name](self.path, self.notes)
            except _Truncated:
                raise
            except Exception as exc:  # this decoder refuses the file: the next one may not
                self._failures.append(f"{name}: {_reason(exc)}")
        return None

    def _refusal(self) -> str:
        suffix = self.path.suffix.lower()
        if suffix in TRACKER_EXTENSIONS and ffmpeg_command() is None:
            return (f"{self.path}: unsupported format: {suffix} tracker modules are decoded by the "
                    "ffmpeg command (with libopenmpt), which is not installed")
        return (f"{self.path}: unsupported format or corrupt: no decoder reads it "
                f"({'; '.join(self._failures)})")

    def read(self, first: int, n: int) -> np.ndarray:
        """``n`` mono frames from frame ``first``, float32 (m,); m < n only near the end of the track.

        A decoder that raises, or stops more than ``MAX_SHORTFALL_SECONDS`` before the frames the
        header announced, hands over to the next decoder of the chain, which reads them again.

        Raises
        ------
        AudioError
            Every decoder failed, or all stopped short (the file is truncated).
        """
        expected = max(0, min(n, self.frames - first))
        stops: list[float] = []  # where the decoders that stopped short stopped, seconds
        while True:
            try:
                samples = self._decoder.read(first, n)
                if expected - samples.size <= MAX_SHORTFALL_SECONDS * self.samplerate:
                    return samples
                stops.append((first + samples.size) / self.samplerate)
                failure = f"stopped at {stops[-1]:.1f} s"
            except Exception as exc:  # a failure in the middle of the stream
                failure = _reason(exc)
            self._failures.append(f"{self.decoder}: {failure}")
            log.debug("%s: %s fails (%s), trying the next decoder", self.path, self.decoder, failure)
            self._decoder.close()
            following = self._open_next()
            if following is None:
                raise AudioError(self._failure_message(stops))
            self._decoder = following

    def _failure_message(self, stops: list[float]) -> str:
        tried = "; ".join(self._failures)
        if stops:
            return (f"{self.path}: truncated: the header announces {self.duration:.1f} s but decoding "
                    f"stopped at {max(stops):.1f} s ({tried})")
        return f"{self.path}: decoding failed, the file is corrupt ({tried})"

    def close(self) -> None:
        self._decoder.close()

    def __enter__(self) -> AudioSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
