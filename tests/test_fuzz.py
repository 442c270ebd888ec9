"""Fuzzing the two doors bad data comes in by: audio files and play-count files.

Valid files made here are mutated at random (seeded): audio by truncation, byte flips and header
edits; play counts by random bad rows among good ones. Whatever comes in, the readers must answer
with their own error (AudioError, DataError) or a finite result, in bounded time, and the good
items must come out exactly as they do without the bad ones.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import soundfile as sf

from sonicrec.audio import file_to_logmel
from sonicrec.catalog import Catalog, Track
from sonicrec.errors import AudioError, DataError
from sonicrec.features import FeatureStore, ingest_run
from sonicrec.interactions import MAX_COUNT, read_play_matrix
from sonicrec.rundir import RunDir
from test_audio import SHORT, tone

FORMATS = [("wav", {"subtype": "PCM_16"}), ("wav", {"subtype": "FLOAT"}), ("flac", {}),
           ("ogg", {"subtype": "VORBIS"}), ("aiff", {})]


def _originals(directory) -> list:
    """One valid 2.5-s file per format: two tones and a little noise."""
    rng = np.random.default_rng(0)
    y = 0.4 * tone(330, 2.5, 22050) + 0.2 * tone(1250, 2.5, 22050) + 0.01 * rng.standard_normal(55125)
    paths = []
    for i, (fmt, options) in enumerate(FORMATS):
        path = directory / f"orig{i}.{fmt}"
        sf.write(path, y.astype(np.float32), 22050, format=fmt.upper(), **options)
        paths.append(path)
    return paths


def _mutants(originals, directory, seed: int = 0, per_file: int = 6) -> list:
    """Truncations, byte flips and header edits of each original, written beside them."""
    rng = np.random.default_rng(seed)
    out = []
    for original in originals:
        data = original.read_bytes()
        for j in range(per_file):
            kind = ("truncate", "flip", "header")[j % 3]
            mutated = np.frombuffer(data, np.uint8).copy()
            if kind == "truncate":
                mutated = mutated[: int(rng.integers(1, len(data)))]
            elif kind == "flip":
                at = rng.integers(0, len(data), size=int(rng.integers(1, 40)))
                mutated[at] = rng.integers(0, 256, size=len(at))
            else:  # sizes, rates, channel counts and magic numbers live in the first bytes
                at = rng.integers(0, min(64, len(data)), size=int(rng.integers(1, 8)))
                mutated[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF], size=len(at))
            path = directory / f"{kind}{j}-{original.name}"
            path.write_bytes(mutated.tobytes())
            out.append(path)
    return out


def test_mutated_audio_gives_an_audio_error_or_finite_features(tmp_path, deadline):
    mutants = _mutants(_originals(tmp_path), tmp_path)
    outcomes = {"error": 0, "decoded": 0}
    for path in mutants:
        with deadline(20):
            try:
                features = file_to_logmel(path, SHORT)
            except AudioError as exc:
                assert path.name in str(exc) and "\n" not in str(exc)
                outcomes["error"] += 1
                continue
        assert features.shape == (SHORT.n_mels, SHORT.n_frames) and np.isfinite(features).all()
        outcomes["decoded"] += 1
    assert outcomes["error"] >= 5  # the mutations did break files (else this test tests nothing)


def test_mutated_audio_leaves_the_good_tracks_of_an_ingest_unchanged(tmp_path, deadline):
    originals = _originals(tmp_path)
    mutants = _mutants(originals, tmp_path, seed=1, per_file=3)
    runs = {}
    for name, files in (("clean", originals), ("mixed", originals + mutants)):
        run = RunDir(tmp_path / name)
        with Catalog(run.catalog) as catalog:
            catalog.upsert([Track(p.name, path=str(p)) for p in files])
        with deadline(120):
            runs[name] = (ingest_run(run, SHORT, workers=1, show_progress=False), FeatureStore(run.features))
    clean, mixed = runs["clean"][1], runs["mixed"][1]
    good = [p.name for p in originals]
    mixed_result = runs["mixed"][0]
    assert runs["clean"][0].ok == len(originals) and mixed_result.ok + mixed_result.failed == len(files)
    np.testing.assert_array_equal(mixed.get_many(good), clean.get_many(good))
    assert np.isfinite(mixed.get_many(mixed.track_ids)).all()
    with Catalog(tmp_path / "mixed" / "catalog.sqlite") as catalog:
        for track in catalog.tracks("failed"):
            assert track.track_id in track.error and "unexpected" not in track.error


# --- play counts ------------------------------------------------------------------------------------


def _bad_row(rng: np.random.Generator) -> bytes:
    """One malformed triplet line (never a valid one): junk, wrong fields, bad counts, bad bytes."""
    user, song = f"bad{rng.integers(1000)}".encode(), f"s{rng.integers(1000)}".encode()
    junk = bytes(b for b in rng.integers(0, 256, int(rng.integers(0, 60))).astype(np.uint8).tobytes()
                 if b not in b"\t\n")
    choices = [
        junk,
        user + b"\t" + song,
        user + b"\t" + song + b"\t3\textra",
        b"\t" + song + b"\t2",
        user + b"\t\t2",
        *(user + b"\t" + song + b"\t" + c for c in (b"0", b"-3", b"1.5", b"nan", b"inf", b"x", b"", b"1e-3")),
        b"u\xff\xfe\t" + song + b"\t4",
        user + b"\t\xc3\x28\t4",
    ]
    return choices[int(rng.integers(len(choices)))]


def _good_rows(rng: np.random.Generator, n: int) -> list[bytes]:
    return [f"u{rng.integers(50)}\ts{rng.integers(80)}\t{rng.integers(1, 30)}".encode() for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_random_bad_rows_are_skipped_and_the_good_ones_read_exactly(tmp_path, seed):
    rng = np.random.default_rng(seed)
    good = _good_rows(rng, 400)
    lines = list(good)
    bad_at = sorted(rng.choice(len(lines) + 60, 60, replace=False))
    for at in bad_at:
        lines.insert(int(at), _bad_row(rng))
    clean = tmp_path / "clean.txt"
    clean.write_bytes(b"\n".join(good) + b"\n")
    dirty = tmp_path / "dirty.txt"
    dirty.write_bytes(b"\n".join(lines) + (b"\n" if seed % 2 else b""))
    expected = read_play_matrix(clean, "triplets", show_progress=False)
    got = read_play_matrix(dirty, "triplets", show_progress=False)
    assert (got.counts != expected.counts).nnz == 0
    assert list(got.user_ids) == list(expected.user_ids) and list(got.song_ids) == list(expected.song_ids)
    assert got.report.n_malformed == 60 and got.report.n_rows == 460
    with pytest.raises(DataError, match=r"dirty\.txt: malformed row\(s\): line \d+"):
        read_play_matrix(dirty, "triplets", on_bad="error", show_progress=False)


@pytest.mark.parametrize("seed", range(4))
def test_mutated_compressed_or_overflowing_play_files_are_data_errors(tmp_path, seed):
    rng = np.random.default_rng(100 + seed)
    good = b"\n".join(_good_rows(rng, 3000)) + b"\n"
    data = np.frombuffer(gzip.compress(good), np.uint8).copy()
    at = rng.integers(10, len(data), size=int(rng.integers(1, 6)))
    data[at] = rng.integers(0, 256, size=len(at))
    path = tmp_path / "plays.txt.gz"
    path.write_bytes(data[: int(rng.integers(len(data) // 2, len(data) + 1))].tobytes())
    try:
        m = read_play_matrix(path, "triplets", show_progress=False)
    except DataError as exc:
        assert "plays.txt.gz" in str(exc)
    else:  # a flip gzip does not notice leaves rows that are all valid play counts
        assert m.counts.data.min() > 0 and m.counts.data.max() <= MAX_COUNT
    huge = tmp_path / "huge.txt"
    rows = _good_rows(rng, 50)
    count = rng.choice(["1e30", str(2**63), str(MAX_COUNT + 1)])
    rows.insert(int(rng.integers(50)), f"u1\ts1\t{count}".encode())
    huge.write_bytes(b"\n".join(rows))
    with pytest.raises(DataError, match="above 1,000,000,000"):
        read_play_matrix(huge, "triplets", show_progress=False)
