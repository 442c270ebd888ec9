"""The demo world's audio: real scores of the music21 corpus rendered to 30-s Ogg Vorbis excerpts.

Each piece (a score file, or one tune of a many-tune ABC file) is parsed with music21, performed
at the score's metronome mark (or a style-typical tempo with seeded jitter) by General MIDI
instruments chosen per piece from a family plausible for its style, synthesised with the
``TimGM6mb.sf2`` soundfont that ``pretty_midi`` ships (through ``tinysoundfont``), given a touch of
room reverb (pedalboard), loudness-normalised and written as 22,050 Hz mono Ogg Vorbis.

Rendering is the expensive step, so every rendered file and its metadata (a JSON sidecar) live in
a cache keyed by everything that determines them; ``render_world`` links them into the world's
audio directory.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from sonicrec.catalog import Track
from sonicrec.demo.production import (
    DRUM_CHANNEL,
    PRODUCTIONS,
    Mix,
    apply_mix,
    draw_mix,
    drum_pattern,
    rms,
    soundfonts,
)
from sonicrec.errors import DataError, require
from sonicrec.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

#: Bump whenever a change here alters rendered audio or metadata (it is part of the cache key).
RENDER_VERSION = 1
SAMPLE_RATE = 22050
EXCERPT_SECONDS = 30.0
OGG_COMPRESSION = 0.7  # libsndfile's Vorbis compression level in [0, 1]: ~40 kbit/s mono
TARGET_RMS_DB = -20.0
PEAK_LIMIT = 0.95
HEAD_MEASURES = 48  # MusicXML is cut to its first measures before parsing (30 s need fewer)
SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".abc")  # in order of preference

META_KEYS = (
    "composer", "collection", "style", "key", "mode", "meter", "tempo", "instruments",
    "instrument_family", "n_voices", "pitch_mean", "source", "seed",
)


@dataclass(frozen=True)
class _Collection:
    style: str
    composer: str | None  # None: from the score's metadata, else `anonymous`
    anonymous: str = "Traditional"
    tunes: bool = False  # an ABC file holds many tunes, each a piece (else: one piece per file)


#: The corpus collections used (top-level folders of music21's corpus); others are left out
#: (``demos``, ``theoryExercises`` are test files).
COLLECTIONS: dict[str, _Collection] = {
    "trecento": _Collection("medieval", None, "Anonymous"),
    "ciconia": _Collection("medieval", "Johannes Ciconia"),
    "luca": _Collection("medieval", "Don Paolo da Firenze (D. Luca)"),
    "palestrina": _Collection("renaissance polyphony", "Giovanni Pierluigi da Palestrina"),
    "josquin": _Collection("renaissance polyphony", "Josquin des Prez"),
    "monteverdi": _Collection("renaissance polyphony", "Claudio Monteverdi"),
    "lusitano": _Collection("renaissance polyphony", "Vicente Lusitano"),
    "bach": _Collection("baroque chorale", "Johann Sebastian Bach"),
    "handel": _Collection("baroque", "George Frideric Handel"),
    "corelli": _Collection("baroque", "Arcangelo Corelli"),
    "cpebach": _Collection("classical", "Carl Philipp Emanuel Bach"),
    "haydn": _Collection("classical", "Joseph Haydn"),
    "mozart": _Collection("classical", "Wolfgang Amadeus Mozart"),
    "beethoven": _Collection("classical", "Ludwig van Beethoven"),
    "schubert": _Collection("romantic", "Franz Schubert"),
    "schumann_robert": _Collection("romantic", "Robert Schumann"),
    "schumann_clara": _Collection("romantic", "Clara Schumann"),
    "chopin": _Collection("romantic", "Frédéric Chopin"),
    "weber": _Collection("romantic", "Carl Maria von Weber"),
    "verdi": _Collection("romantic", "Giuseppe Verdi"),
    "beach": _Collection("romantic", "Amy Beach"),
    "schoenberg": _Collection("modern", "Arnold Schoenberg"),
    "webern": _Collection("modern", "Anton Webern"),
    "joplin": _Collection("popular song", "Scott Joplin"),
    "johnson_j_r": _Collection("popular song", "J. Rosamond Johnson"),
    "liliuokalani": _Collection("popular song", "Liliuokalani"),
    "leadSheet": _Collection("popular song", None, "Anonymous"),
    "ryansMammoth": _Collection("fiddle tune", None),
    "oneills1850": _Collection("fiddle tune", None, tunes=True),
    "airdsAirs": _Collection("fiddle tune", None, tunes=True),
    "nottingham-dataset": _Collection("fiddle tune", None, tunes=True),
    "essenFolksong": _Collection("folk song", None, tunes=True),
    "miscFolk": _Collection("folk song", None, tunes=True),
}
_EXCLUDED_FILES = re.compile(r"^essenFolksong/test")  # Essen's test sets repeat its songs


@dataclass(frozen=True)
class _Palette:
    bass: tuple[int, ...]  # GM programs for a contrasting lowest part
    blend: bool  # one instrument plays every part (piano, organ, choir)


#: Instrument families (the ``instrument_family`` values) with their contrasting basses.
FAMILIES: dict[str, _Palette] = {
    "keyboard": _Palette((), blend=True),
    "organ": _Palette((), blend=True),
    "choir": _Palette((), blend=True),
    "guitar": _Palette((32, 33), blend=False),
    "strings": _Palette((42, 43), blend=False),
    "brass": _Palette((57, 58), blend=False),
    "reed": _Palette((70,), blend=False),
    "pipe": _Palette((70, 42), blend=False),
    "mallet": _Palette((32, 12), blend=False),
    "plucked": _Palette((32, 42), blend=False),
}

#: Per style: the plausible families and, for each, the GM programs (0-based) its parts draw from.
STYLE_INSTRUMENTS: dict[str, dict[str, tuple[int, ...]]] = {
    "medieval": {
        "pipe": (74, 73, 75), "plucked": (46,), "reed": (68, 69, 109), "organ": (19, 20),
        "choir": (52, 53), "strings": (40, 41, 110),
    },
    "renaissance polyphony": {
        "choir": (52, 53), "organ": (19, 20), "strings": (40, 41, 48, 49), "brass": (56, 60, 61),
        "reed": (68, 69, 71), "pipe": (74, 73),
    },
    "baroque chorale": {
        "organ": (19, 20, 16), "choir": (52, 53), "strings": (40, 41, 48, 49),
        "brass": (56, 60, 61), "keyboard": (0, 6),
    },
    "baroque": {
        "keyboard": (6, 0), "strings": (40, 41, 48), "organ": (19, 20), "reed": (68, 69),
        "pipe": (73, 74),
    },
    "classical": {
        "strings": (40, 41, 48, 49), "keyboard": (0, 1, 6), "reed": (68, 69, 71),
        "brass": (56, 60, 61),
    },
    "romantic": {
        "keyboard": (0, 1, 2), "strings": (40, 41, 48, 49), "reed": (68, 69, 71), "brass": (60, 61),
    },
    "modern": {"keyboard": (0, 4), "strings": (40, 41), "reed": (68, 71), "mallet": (11, 12, 8)},
    "popular song": {
        "keyboard": (0, 1, 2, 4, 5), "guitar": (24, 25, 26, 27), "brass": (56, 59, 61),
        "reed": (64, 65, 66, 71), "mallet": (11, 12),
    },
    "fiddle tune": {
        "strings": (110, 40), "guitar": (24, 25, 26), "reed": (21, 22, 23, 109, 71),
        "pipe": (73, 78, 72, 74), "keyboard": (0, 1, 4, 6), "plucked": (105, 46),
        "mallet": (12, 13, 11),
    },
    "folk song": {
        "pipe": (73, 74, 75, 78, 79, 77), "guitar": (24, 25), "reed": (21, 22, 23, 68, 71),
        "keyboard": (0, 1, 4), "plucked": (46, 105, 104, 107, 106), "mallet": (12, 11, 10, 108, 9),
        "strings": (110, 40, 48), "choir": (52, 53),
    },
}

#: Beats per minute when a score has no metronome mark (the beat is the meter's, e.g. a dotted
#: quarter in 6/8, a half note in 4/2); jittered by +-10 % per piece.
STYLE_BEAT_BPM: dict[str, float] = {
    "medieval": 66, "renaissance polyphony": 66, "baroque chorale": 84, "baroque": 80,
    "classical": 100, "romantic": 84, "modern": 72, "popular song": 100, "fiddle tune": 104,
    "folk song": 92,
}


@dataclass(frozen=True)
class Piece:
    """One piece of the corpus: a score file, or tune ``number`` (ABC ``X:``) of a many-tune file."""

    collection: str
    path: str  # relative to the music21 corpus folder, e.g. "bach/bwv66.6.mxl"
    number: int | None = None

    @property
    def style(self) -> str:
        return COLLECTIONS[self.collection].style

    @property
    def source(self) -> str:
        """The corpus path, with ``#X`` for a tune of a many-tune ABC file."""
        return self.path if self.number is None else f"{self.path}#{self.number}"

    @property
    def track_id(self) -> str:
        """A readable id, e.g. ``bach-bwv66.6``, ``essenFolksong-han1-12``."""
        stem = str(Path(self.path).with_suffix("")).replace("/", "-")
        if self.number is not None:
            stem = f"{stem}-{self.number}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


# --- the demo extra ------------------------------------------------------------------------------

#: The packages of the ``demo`` extra: the corpus, the soundfont (and instrument names), the synthesiser.
DEMO_PACKAGES = ("music21", "pretty_midi", "tinysoundfont")


def _package_dir(module: str) -> Path:
    """The folder of an installed package of the demo extra, found without importing it (music21
    takes seconds); a missing one raises MissingExtraError ("pip install 'sonicrec[demo]'")."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        require(module, "demo")  # raises: the package cannot be imported
    if spec is None or spec.origin is None:
        raise DataError(f"{module} is installed without its files: pip install --force-reinstall {module}")
    return Path(spec.origin).parent


def require_demo_packages() -> None:
    """Fail in one line, before any work, when a package of the ``demo`` extra is missing."""
    for module in DEMO_PACKAGES:
        _package_dir(module)


# --- selection -----------------------------------------------------------------------------------


def corpus_root() -> Path:
    """The music21 corpus folder (found without importing music21)."""
    return _package_dir("music21") / "corpus"


@cache
def corpus_pieces() -> tuple[Piece, ...]:
    """Every piece of the known collections, in a fixed order (tunes of ABC files included).

    Duplicate encodings of one score (``bwv277.krn`` beside ``bwv277.mxl``) are left out.
    """
    root = corpus_root()
    chosen: dict[str, Path] = {}  # path without suffix -> preferred file
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (
            path.suffix not in SCORE_SUFFIXES
            or rel.split("/")[0] not in COLLECTIONS
            or _EXCLUDED_FILES.match(rel)
        ):
            continue
        stem = rel[: -len(path.suffix)]
        if stem not in chosen or SCORE_SUFFIXES.index(path.suffix) < SCORE_SUFFIXES.index(
            chosen[stem].suffix
        ):
            chosen[stem] = path
    pieces = []
    for stem in sorted(chosen):
        path = chosen[stem]
        rel = path.relative_to(root).as_posix()
        collection = rel.split("/")[0]
        if COLLECTIONS[collection].tunes and path.suffix == ".abc":
            pieces.extend(Piece(collection, rel, number) for number in _abc_numbers(path))
        else:
            pieces.append(Piece(collection, rel))
    return tuple(pieces)


def _abc_numbers(path: Path) -> list[int]:
    """The distinct reference numbers (``X:`` fields) of an ABC file, in file order."""
    text = path.read_text(encoding="utf-8", errors="replace")
    numbers = (int(m) for m in re.findall(r"^X:\s*(\d+)", text, flags=re.MULTILINE))
    return list(dict.fromkeys(numbers))


def candidate_pieces(seed: int) -> list[Piece]:
    """All corpus pieces in the order a world of seed ``seed`` takes them.

    Stratified: round-robin over styles (in a seeded order), and within a style round-robin over
    its collections, each collection seeded-shuffled. Any prefix therefore spreads evenly over
    styles and collections until the small ones run out, and a smaller world of the same seed
    is a subset of a larger one (so it shares the cache).
    """
    rng = np.random.default_rng(seed)
    by_collection: dict[str, list[Piece]] = {}
    for piece in corpus_pieces():
        by_collection.setdefault(piece.collection, []).append(piece)
    by_style: dict[str, list[list[Piece]]] = {}
    for collection in sorted(by_collection):
        pieces = by_collection[collection]
        shuffled = [pieces[i] for i in rng.permutation(len(pieces))]
        by_style.setdefault(COLLECTIONS[collection].style, []).append(shuffled)
    styles = sorted(by_style)
    styles = [styles[i] for i in rng.permutation(len(styles))]
    return list(_round_robin([list(_round_robin(by_style[s])) for s in styles]))


def _round_robin(sequences: Sequence[Sequence[Piece]]) -> Iterator[Piece]:
    for i in range(max(map(len, sequences), default=0)):
        for seq in sequences:
            if i < len(seq):
                yield seq[i]


def piece_seed(seed: int, piece: Piece) -> int:
    """The seed of one piece's rendering: depends on the world seed and the piece only."""
    seq = np.random.SeedSequence([seed, zlib.crc32(piece.source.encode())])
    return int(seq.generate_state(1)[0])


# --- performing a score --------------------------------------------------------------------------


@dataclass
class _Performance:
    """Note events of the excerpt and the metadata of the piece."""

    onsets: np.ndarray  # (N,) float64 seconds
    offsets: np.ndarray  # (N,) float64 seconds
    channels: np.ndarray  # (N,) int
    pitches: np.ndarray  # (N,) int MIDI
    velocities: np.ndarray  # (N,) int
    programs: list[int]  # GM program per channel
    family: str
    title: str
    meta: dict[str, Any]


def _parse(piece: Piece):
    from music21 import converter, stream

    path = corpus_root() / piece.path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix in (".mxl", ".xml", ".musicxml"):
            score = converter.parse(_musicxml_head(path, HEAD_MEASURES), format="musicxml")
        else:
            score = converter.parse(path, number=piece.number, forceSource=True, storePickle=False)
    if isinstance(score, stream.Opus):  # an ABC file with one voice per tune (josquin)
        score = score.mergeScores()
    return score


def _musicxml_head(path: Path, measures: int) -> str:
    """The text of a (partwise) MusicXML file, each part cut after its first ``measures`` measures.

    Parsing is the slow step and grows with the score, while an excerpt needs its start only: a
    whole Beethoven quartet parses in seconds, its first measures in a fraction of one.
    """
    if path.suffix == ".mxl":
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            name = next(
                n for n in names if not n.startswith("META-INF/") and n.endswith((".xml", ".musicxml"))
            )
            data = archive.read(name)
    else:
        data = path.read_bytes()
    text = data.decode("utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")

    def cut(part: re.Match) -> str:
        starts = [m.start() for m in re.finditer(r"<measure[\s>]", part.group(0))]
        return part.group(0) if len(starts) <= measures else part.group(0)[: starts[measures]] + "</part>"

    return re.sub(r"<part[\s>].*?</part>", cut, text, flags=re.DOTALL)


def _part_notes(part) -> list[tuple[float, float, int, bool]]:
    """(onset, duration in quarter notes, MIDI pitch, on a downbeat) of a part, ties merged."""
    from music21 import harmony, stream

    measures = list(part.getElementsByClass(stream.Measure))
    containers = [(float(m.offset), m) for m in measures] if measures else [(0.0, part)]
    metered = bool(measures)
    notes: list[list] = []
    held: dict[int, list] = {}  # MIDI pitch -> the note a tie continues
    for base, container in containers:
        for element in container.recurse().notes:
            duration = float(element.quarterLength)
            if duration <= 0 or isinstance(element, harmony.Harmony):
                continue  # grace notes, chord symbols
            local = float(element.getOffsetInHierarchy(container))
            onset = base + local
            for note in element.notes if element.isChord else [element]:
                if not hasattr(note, "pitch"):
                    continue  # unpitched percussion
                midi = note.pitch.midi
                tie = note.tie.type if note.tie is not None else None
                previous = held.get(midi)
                if tie in ("stop", "continue") and previous and abs(previous[0] + previous[1] - onset) < 1e-6:
                    previous[1] += duration
                else:
                    held[midi] = entry = [onset, duration, midi, metered and local == 0]
                    notes.append(entry)
    return [tuple(n) for n in notes]


_TONICS = {
    "major": ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"),
    "minor": ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B"),
}


def _key_and_mode(score, pitch_classes: np.ndarray, durations: np.ndarray) -> tuple[str, str]:
    """The key (e.g. "G major") and mode of a piece.

    A church mode stated by the score (ABC ``K:Ador``) is kept, mode "other"; otherwise the key is
    music21's key-finding profile (the one ``Stream.analyze("key")`` uses) best correlated with
    the duration-weighted pitch-class histogram of the parsed notes ``pitch_classes`` (N,),
    ``durations`` (N,), as ``analyze`` does (without its cost of building 24 ``Key`` objects).
    """
    from music21 import key
    from music21.analysis import discrete

    declared = score.recurse().getElementsByClass(key.Key).first()
    if declared is not None and declared.mode not in ("major", "minor"):
        return f"{declared.tonic.name.replace('-', 'b')} {declared.mode}", "other"
    histogram = np.bincount(pitch_classes, weights=durations, minlength=12)
    profiles = discrete.analysisClassFromMethodName("key")()
    best = (-np.inf, "", 0)
    for mode in ("major", "minor"):
        weights = np.asarray(profiles.getWeights(mode), dtype=float)
        for tonic in range(12):
            r = np.corrcoef(histogram, np.roll(weights, tonic))[0, 1]
            if r > best[0]:
                best = (r, mode, tonic)
    _, mode, tonic = best
    return f"{_TONICS[mode][tonic]} {mode}", mode


def _title(score, piece: Piece) -> str:
    md = score.metadata
    for text in (md.title if md else None, md.movementName if md else None):
        if text and Path(str(text)).name != Path(piece.path).name and not str(text).isupper():
            return str(text).strip()
    name = " ".join(Path(piece.path).with_suffix("").parts[1:])  # e.g. "opus19 movement6"
    return name if piece.number is None else f"{name} {piece.number}"


def _composer(score, piece: Piece) -> str:
    collection = COLLECTIONS[piece.collection]
    if collection.composer:
        return collection.composer
    named = score.metadata.composer if score.metadata else None
    return str(named).strip() if named and str(named).strip() else collection.anonymous


def _instrumentation(style: str, n_parts: int, rng: np.random.Generator) -> tuple[str, list[int]]:
    """The lead family and one GM program per part (parts ordered from highest to lowest)."""
    families = STYLE_INSTRUMENTS[style]
    family = sorted(families)[rng.integers(len(families))]
    upper = families[family]
    palette = FAMILIES[family]
    lead = int(upper[rng.integers(len(upper))])
    if palette.blend:
        return family, [lead] * n_parts
    programs = [lead if rng.random() < 0.5 else int(upper[rng.integers(len(upper))]) for _ in range(n_parts)]
    programs[0] = lead
    if n_parts >= 2 and rng.random() < 0.7:
        programs[-1] = int(palette.bass[rng.integers(len(palette.bass))])
    return family, programs


def _perform(piece: Piece, seed: int) -> _Performance:
    """Parse a piece and lay out its first ``EXCERPT_SECONDS`` (looped if shorter) as note events."""
    from music21 import meter

    rng = np.random.default_rng(seed)
    score = _parse(piece)
    part_notes = _parts_highest_first(score, piece)
    signature = score.recurse().getElementsByClass(meter.TimeSignature).first()
    bpm = _tempo(score, signature, piece.style, rng)
    family, programs = _instrumentation(piece.style, len(part_notes), rng)
    onset, offset, channel, pitch, velocity = _note_events(part_notes, bpm, piece, rng)
    meta = {
        "composer": _composer(score, piece),
        "collection": piece.collection,
        "style": piece.style,
        "meter": signature.ratioString if signature is not None else "free",
        "tempo": round(bpm, 2),
        "instruments": list(dict.fromkeys(_program_name(p) for p in programs)),
        "instrument_family": family,
        "n_voices": len(part_notes),
        "pitch_mean": round(float(pitch.mean()), 3),
        "source": piece.source,
        "seed": seed,
    }
    all_notes = np.array([n[1:3] for notes in part_notes for n in notes])  # (N, 2) duration, pitch
    meta["key"], meta["mode"] = _key_and_mode(score, all_notes[:, 1].astype(int) % 12, all_notes[:, 0])
    return _Performance(
        onsets=onset,
        offsets=offset,
        channels=channel,
        pitches=pitch,
        velocities=velocity,
        programs=programs,
        family=family,
        title=_title(score, piece),
        meta={k: meta[k] for k in META_KEYS},
    )


def _parts_highest_first(score, piece: Piece) -> list[list[tuple[float, float, int, bool]]]:
    """The notes of each part that has notes (:func:`_part_notes`), highest part (mean pitch) first."""
    parts = list(score.parts) if score.parts else [score]
    part_notes = [n for n in (_part_notes(p) for p in parts) if n]
    if not part_notes:
        raise DataError(f"{piece.source}: the score has no notes")
    part_notes.sort(key=lambda ns: -np.mean([n[2] for n in ns]))
    return part_notes


def _tempo(score, signature, style: str, rng: np.random.Generator) -> float:
    """Quarter notes per minute: the score's stated metronome mark, else the style's beat tempo
    (:data:`STYLE_BEAT_BPM`, jittered by +-10 %), clipped to [30, 260]."""
    from music21 import tempo

    beat_ql = float(signature.beatDuration.quarterLength) if signature is not None else 1.0
    mark = next(
        (m for m in score.recurse().getElementsByClass(tempo.MetronomeMark) if _stated(m)), None
    )
    jitter = rng.uniform(0.9, 1.1)  # drawn even with a mark: the seeded stream stays the same
    bpm = mark.getQuarterBPM() if mark is not None else STYLE_BEAT_BPM[style] * beat_ql * jitter
    return float(np.clip(bpm, 30.0, 260.0))


def _note_events(
    part_notes: list[list[tuple[float, float, int, bool]]], bpm: float, piece: Piece, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """The excerpt's notes, the score looped to fill it, slightly humanised.

    Returns onsets and offsets (N,) float64 seconds, and channels (the part), MIDI pitches and
    velocities (N,) int; downbeats and the highest part are played louder.
    """
    seconds_per_ql = 60.0 / bpm
    length_ql = max(max(n[0] + n[1] for n in notes) for notes in part_notes)
    period = length_ql * seconds_per_ql
    if period < 1.0:
        raise DataError(f"{piece.source}: the score lasts {period:.2f} s, too short to loop")
    repeats = int(np.ceil(EXCERPT_SECONDS / period))
    rows = [
        (n[0] * seconds_per_ql + r * period, n[1] * seconds_per_ql, ch, n[2], n[3])
        for ch, notes in enumerate(part_notes)
        for r in range(repeats)
        for n in notes
        if n[0] * seconds_per_ql + r * period < EXCERPT_SECONDS
    ]
    onset, duration, channel, pitch, downbeat = (np.array(c) for c in zip(*rows, strict=True))
    onset = np.maximum(onset + rng.normal(0.0, 0.005, onset.shape).clip(-0.015, 0.015), 0.0)
    base = np.where(channel == 0, 92, 80)
    velocity = (base + 12 * downbeat + rng.normal(0.0, 4.0, onset.shape)).clip(30, 127).astype(int)
    return onset, onset + 0.95 * duration, channel.astype(int), pitch.astype(int), velocity


def _stated(mark) -> bool:
    """Whether a metronome mark states a tempo: a playback-only 120 bpm (``<sound tempo>`` in
    MusicXML) is the notation programs' default, not the editor's choice."""
    return bool(mark.getQuarterBPM()) and (mark.number is not None or mark.numberSounding != 120)


def _program_name(program: int) -> str:
    import pretty_midi

    return pretty_midi.program_to_instrument_name(program)


# --- synthesis -----------------------------------------------------------------------------------


@cache
def _soundfont() -> bytes:
    """The General MIDI soundfont shipped with pretty_midi."""
    return _bundled_soundfont().read_bytes()


def _bundled_soundfont() -> Path:
    return _package_dir("pretty_midi") / "TimGM6mb.sf2"


def _font_path(name: str) -> Path:
    """The soundfont a varied mix names (one of :func:`production.soundfonts`)."""
    return next(p for p in soundfonts(_bundled_soundfont()) if p.name == name)


def _synthesize(perf: _Performance, rng: np.random.Generator, mix: Mix | None = None) -> np.ndarray:
    """Render a performance to mono float32 audio (SAMPLE_RATE * EXCERPT_SECONDS,): clean (one
    soundfont, room reverb, TARGET_RMS_DB), or produced by ``mix`` (its soundfont, drum kit and chain)."""
    import pedalboard
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=SAMPLE_RATE)
    sfid = synth.sfload(_soundfont() if mix is None else str(_font_path(mix.soundfont)))
    channel_of = [c if c < 9 else c + 1 for c in range(15)]  # the melodic channels (9: drums)
    for part, program in enumerate(perf.programs):
        synth.program_select(channel_of[part % 15], sfid, 0, program)
    channels = np.array(channel_of)[perf.channels % 15]
    onsets, offsets, pitches, velocities = perf.onsets, _no_overlap(perf), perf.pitches, perf.velocities
    if mix is not None and mix.drums:
        synth.program_select(DRUM_CHANNEL, sfid, 128, 0, True)
        hits, kit, strength = drum_pattern(
            perf.meta["meter"], perf.meta["tempo"], EXCERPT_SECONDS, mix.drum_level_db, rng
        )
        onsets = np.concatenate([onsets, hits])
        offsets = np.concatenate([offsets, np.minimum(hits + 0.1, EXCERPT_SECONDS)])
        pitches, velocities = np.concatenate([pitches, kit]), np.concatenate([velocities, strength])
        channels = np.concatenate([channels, np.full(len(hits), DRUM_CHANNEL)])

    times = np.concatenate([offsets, onsets])
    is_on = np.concatenate([np.zeros(len(offsets), bool), np.ones(len(onsets), bool)])
    idx = np.concatenate([np.arange(len(offsets))] * 2)
    order = np.lexsort((is_on, times))  # at equal times, note-offs first

    n = int(SAMPLE_RATE * EXCERPT_SECONDS)
    stereo = np.zeros((n, 2), np.float32)
    buffer = memoryview(stereo.reshape(-1).view(np.uint8))
    frame_bytes = 2 * 4
    position = 0
    for i in order:
        at = min(int(times[i] * SAMPLE_RATE), n)
        if at > position:
            synth.generate_simple(at - position, buffer=buffer[position * frame_bytes : at * frame_bytes])
            position = at
        j = idx[i]
        if is_on[i]:
            synth.noteon(int(channels[j]), int(pitches[j]), int(velocities[j]))
        else:
            synth.noteoff(int(channels[j]), int(pitches[j]))
    if position < n:
        synth.generate_simple(n - position, buffer=buffer[position * frame_bytes :])

    large_room = perf.family in ("choir", "organ")
    reverb = pedalboard.Reverb(
        room_size=rng.uniform(0.7, 0.95) if large_room else rng.uniform(0.2, 0.7),
        wet_level=rng.uniform(0.15, 0.3) if large_room else rng.uniform(0.05, 0.2),
        dry_level=0.8,
    )
    mono = reverb(stereo.mean(axis=1)[None, :], SAMPLE_RATE)[0].astype(np.float32)
    if mix is None:
        return _normalise(mono)
    _audible_rms(mono)
    return _fade(apply_mix(mono, mix, SAMPLE_RATE, rng))


def _no_overlap(perf: _Performance) -> np.ndarray:
    """Note-off times, cut so a note ends before the next onset of its pitch on its channel."""
    offsets = np.minimum(perf.offsets, EXCERPT_SECONDS).copy()
    order = np.lexsort((perf.onsets, perf.pitches, perf.channels))
    same = (np.diff(perf.channels[order]) == 0) & (np.diff(perf.pitches[order]) == 0)
    current, following = order[:-1][same], order[1:][same]
    offsets[current] = np.minimum(offsets[current], perf.onsets[following])
    return offsets


def _audible_rms(y: np.ndarray) -> float:
    """The RMS of rendered audio; silent audio is an error."""
    level = rms(y)
    if level < 1e-5:
        raise DataError("the rendered audio is silent")
    return level


def _normalise(y: np.ndarray) -> np.ndarray:
    """Scale to TARGET_RMS_DB (peaks held under PEAK_LIMIT), with a short fade in and out."""
    y = y * (10 ** (TARGET_RMS_DB / 20) / _audible_rms(y))
    peak = float(np.abs(y).max())
    if peak > PEAK_LIMIT:
        y *= PEAK_LIMIT / peak
    return _fade(y)


def _fade(y: np.ndarray) -> np.ndarray:
    fade_in, fade_out = int(0.01 * SAMPLE_RATE), int(1.0 * SAMPLE_RATE)
    y = y.astype(np.float32, copy=True)
    y[:fade_in] *= np.linspace(0.0, 1.0, fade_in, dtype=np.float32)
    y[-fade_out:] *= np.linspace(1.0, 0.0, fade_out, dtype=np.float32)
    return y


# --- cache and workers ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$SONICREC_CACHE/render`` if set, else ``~/.cache/sonicrec/render``."""
    root = os.environ.get("SONICREC_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "sonicrec") / "render"


@dataclass(frozen=True)
class _Job:
    piece: Piece
    seed: int  # the piece's own seed
    audio: Path  # cache entry: audio file ...
    sidecar: Path  # ... and its metadata (written last: its presence marks a complete entry)
    fonts: tuple[Path, ...] = ()  # a varied production's soundfonts; () = clean


def _job(piece: Piece, world_seed: int, cache_dir: Path, fonts: tuple[Path, ...] = ()) -> _Job:
    seed = piece_seed(world_seed, piece)
    # a clean job's key is as it was before varied productions existed: its cache entries stay valid
    fonts_key = [[p.name, p.stat().st_size] for p in fonts]
    varied = {"production": "varied", "soundfonts": fonts_key} if fonts else {}
    key = json.dumps(
        {
            **varied,
            "render_version": RENDER_VERSION,
            "source": piece.source,
            "seed": seed,
            "sample_rate": SAMPLE_RATE,
            "seconds": EXCERPT_SECONDS,
            "ogg_compression": OGG_COMPRESSION,
            "versions": [
                importlib.metadata.version(m) for m in ("music21", "tinysoundfont", "pedalboard")
            ],
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = f"{piece.track_id}-{digest}"
    return _Job(piece, seed, cache_dir / f"{stem}.ogg", cache_dir / f"{stem}.json", fonts)


def _render_job(job: _Job) -> dict[str, Any]:
    """Render one piece into the cache (runs in a worker process); returns the sidecar record."""
    import soundfile as sf

    perf = _perform(job.piece, job.seed)
    mix = draw_mix(np.random.default_rng([job.seed, 2]), job.fonts) if job.fonts else None
    audio = _synthesize(perf, np.random.default_rng([job.seed, 1]), mix)
    if mix is not None:
        perf.meta["production"] = mix.describe()
    with atomic_path(job.audio) as tmp:
        sf.write(tmp, audio, SAMPLE_RATE, format="OGG", subtype="VORBIS", compression_level=OGG_COMPRESSION)
    record = {"title": perf.title, "duration": len(audio) / SAMPLE_RATE, "meta": perf.meta}
    atomic_write_text(job.sidecar, json.dumps(record, ensure_ascii=False, sort_keys=True))
    return record


def _cached(job: _Job) -> dict[str, Any] | None:
    if not (job.sidecar.exists() and job.audio.exists()):
        return None
    try:
        return json.loads(job.sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged entry is rendered again


def _place(source: Path, target: Path) -> None:
    """Hard-link (or copy) a cached file to ``target``, atomically."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def _track(job: _Job, record: dict[str, Any], audio_dir: Path) -> Track:
    target = (audio_dir / f"{job.piece.track_id}.ogg").resolve()
    _place(job.audio, target)
    meta = record["meta"]
    return Track(
        track_id=job.piece.track_id,
        path=str(target),
        title=record["title"],
        artist=meta["composer"],
        collection=meta["collection"],
        duration=float(record["duration"]),
        status="new",
        meta=meta,
    )


class _InlineExecutor(cf.Executor):
    """Runs jobs in this process as they are submitted (``workers <= 1``)."""

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to the caller like a pool would
            future.set_exception(exc)
        return future


def render_world(
    audio_dir: Path,
    *,
    n_tracks: int,
    seed: int,
    cache_dir: Path | None = None,
    workers: int = 2,
    show_progress: bool = True,
    production: str = "clean",
) -> list[Track]:
    """Render ``n_tracks`` pieces of the music21 corpus into ``audio_dir/<track_id>.ogg``.

    Pieces are taken in the stratified order of :func:`candidate_pieces`; a piece that fails to
    parse or render is logged and replaced by the next one, so the result is the first
    ``n_tracks`` pieces that render.

    Parameters
    ----------
    audio_dir : folder of the world's audio (created if needed).
    n_tracks : number of tracks to render.
    seed : seed of the selection and of every piece's instrumentation, tempo and touch.
    cache_dir : rendered-file cache; default :func:`default_cache_dir`.
    workers : worker processes for rendering (``<= 1``: render in this process).
    show_progress : show a tqdm progress bar.
    production : ``"clean"`` or ``"varied"`` (:mod:`sonicrec.demo.production`: per-track soundfont,
        drums, EQ, dynamics, noise and level, drawn from the bundled soundfont and the installed ones).

    Returns
    -------
    The tracks (status ``"new"``, ``path`` absolute), in selection order.
    """
    from tqdm.auto import tqdm

    require_demo_packages()
    if n_tracks < 1:
        raise DataError(f"n_tracks={n_tracks}: ask for at least one track")
    if production not in PRODUCTIONS:
        raise DataError(f"production {production!r}: one of {', '.join(PRODUCTIONS)}")
    fonts = soundfonts(_bundled_soundfont()) if production == "varied" else ()
    audio_dir = Path(audio_dir)
    audio_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tqdm(total=n_tracks, desc="render", unit="track", disable=not show_progress) as bar:
        tracks, rendered, failed = _first_that_render(
            n_tracks, seed=seed, audio_dir=audio_dir, cache_dir=cache_dir, workers=workers, bar=bar,
            fonts=fonts,
        )
    if len(tracks) < n_tracks:
        raise DataError(
            f"the music21 corpus has only {len(tracks)} pieces that render ({len(failed)} failed, "
            f"see the log); ask for n_tracks <= {len(tracks)}"
        )
    elapsed = time.perf_counter() - start
    log.info(
        "%d tracks in %s (%d rendered, %d from cache, %d skipped) in %.1f s",
        n_tracks, audio_dir, rendered, n_tracks - rendered, len(failed), elapsed,
    )
    return [tracks[i] for i in sorted(tracks)]


def _first_that_render(
    n_tracks: int, *, seed: int, audio_dir: Path, cache_dir: Path, workers: int, bar, fonts: tuple[Path, ...]
) -> tuple[dict[int, Track], int, list[str]]:
    """The first ``n_tracks`` candidate pieces that render, placed in ``audio_dir``.

    Cached pieces are placed at once; the others are rendered by workers (started at the first
    cache miss), a failed piece replaced by the next candidate. Returns the tracks keyed by their
    position among the candidates, the number rendered (not cached), and the sources that failed.
    """
    candidates = iter(enumerate(candidate_pieces(seed)))
    tracks: dict[int, Track] = {}
    failed: list[str] = []
    rendered = 0
    executor: cf.Executor | None = None
    pending: dict[cf.Future, tuple[int, _Job]] = {}
    try:
        while True:
            while len(tracks) + len(pending) < n_tracks:
                order, piece = next(candidates, (None, None))
                if piece is None:
                    break
                job = _job(piece, seed, cache_dir, fonts)
                record = _cached(job)
                if record is not None:
                    tracks[order] = _track(job, record, audio_dir)
                    bar.update()
                    continue
                if executor is None:
                    executor = _executor(workers)
                pending[executor.submit(_render_job, job)] = (order, job)
            if not pending:
                return tracks, rendered, failed
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                order, job = pending.pop(future)
                error = future.exception()
                if error is not None:
                    log.warning("skipping %s (%s): %s", job.piece.track_id, job.piece.source, error)
                    failed.append(job.piece.source)
                    continue
                tracks[order] = _track(job, future.result(), audio_dir)
                rendered += 1
                bar.update()
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)


def _executor(workers: int) -> cf.Executor:
    if workers <= 1:
        return _InlineExecutor()
    # spawn: safe whatever threads the caller runs, and workers start clean of its state
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


__all__ = [
    "COLLECTIONS", "DEMO_PACKAGES", "FAMILIES", "META_KEYS", "Piece", "RENDER_VERSION", "SAMPLE_RATE",
    "STYLE_INSTRUMENTS", "candidate_pieces", "corpus_pieces", "default_cache_dir", "piece_seed",
    "render_world", "require_demo_packages",
]
