"""The feature store and the ingest job: round trips, atomic shards, bad files, resume, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sonicrec import features as features_module
from sonicrec.catalog import Catalog, Track
from sonicrec.cli import main
from sonicrec.config import AudioConfig, Config
from sonicrec.errors import AudioError, ConfigError, DataError, UnknownIdError
from sonicrec.features import (
    FeatureStore,
    FeatureStoreWriter,
    discover_tracks,
    extract_track,
    ingest,
    ingest_run,
    read_manifest,
    register_tracks,
)
from sonicrec.rundir import RunDir
from test_audio import BAD_KINDS, SHORT, make_bad_file, tone


def random_features(n: int, cfg: AudioConfig, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(-10, 10, (n, cfg.n_mels, cfg.n_frames)).astype(np.float16)


def test_store_round_trip_across_shards(tmp_path):
    data = random_features(7, SHORT)
    ids = [f"t{i}" for i in range(7)]
    with FeatureStoreWriter(tmp_path / "fs", SHORT, shard_size=3) as writer:
        committed = [writer.add(i, x) for i, x in zip(ids, data, strict=True)]
    assert committed[2] == ids[:3] and committed[5] == ids[3:6] and committed[6] == []
    store = FeatureStore(tmp_path / "fs")
    assert len(store) == 7 and store.track_ids == ids and "t6" in store and "t7" not in store
    assert (store.n_mels, store.n_frames) == (128, SHORT.n_frames)
    assert store.audio_config == SHORT
    assert store.get("t4").dtype == np.float16
    np.testing.assert_array_equal(store.get("t4"), data[4])
    np.testing.assert_array_equal(store.get_many(["t6", "t0", "t4"]), data[[6, 0, 4]])
    with pytest.raises(UnknownIdError, match="t9"):
        store.get("t9")
    assert len(list((tmp_path / "fs").glob("shard-*.npy"))) == 3


def test_uncommitted_shards_are_never_read_and_are_cleaned_up(tmp_path):
    root = tmp_path / "fs"
    data = random_features(4, SHORT)
    with FeatureStoreWriter(root, SHORT, shard_size=2) as writer:
        for i in range(4):
            writer.add(f"t{i}", data[i])
    (root / "shard-000001.json").unlink()  # as if killed between writing shard 1's data and its ids
    (root / ".shard-000002.abc.tmp.npy").write_bytes(b"half")
    store = FeatureStore(root)
    assert store.track_ids == ["t0", "t1"]
    with FeatureStoreWriter(root, SHORT, shard_size=2) as writer:
        assert "t2" not in writer
        writer.add("t2", data[2])
    assert not (root / ".shard-000002.abc.tmp.npy").exists()
    np.testing.assert_array_equal(FeatureStore(root).get("t2"), data[2])


def test_writer_refuses_other_audio_settings_and_duplicates(tmp_path):
    with FeatureStoreWriter(tmp_path / "fs", SHORT) as writer:
        writer.add("a", random_features(1, SHORT)[0])
        with pytest.raises(DataError, match="already"):
            writer.add("a", random_features(1, SHORT)[0])
    with pytest.raises(ConfigError, match="delete"):
        FeatureStoreWriter(tmp_path / "fs", AudioConfig())
    with pytest.raises(DataError, match="not a feature store"):
        FeatureStore(tmp_path)


def test_store_reopens_its_maps_after_pickling(tmp_path):
    import pickle

    with FeatureStoreWriter(tmp_path / "fs", SHORT) as writer:
        writer.add("a", random_features(1, SHORT)[0])
    store = FeatureStore(tmp_path / "fs")
    store.get("a")
    clone = pickle.loads(pickle.dumps(store))  # what a spawned DataLoader worker receives
    assert clone._maps == {}
    np.testing.assert_array_equal(clone.get("a"), store.get("a"))


def make_catalog(run: RunDir, n_good: int, bad_kinds: list[str]) -> list[str]:
    """Register ``n_good`` short tone files and one file per bad kind; returns the good ids."""
    run.audio.mkdir(parents=True, exist_ok=True)
    tracks = []
    for i in range(n_good):
        path = run.audio / f"good{i}.wav"
        sf.write(path, tone(200.0 * (i + 1), 2.5 + i % 3, 22050), 22050)
        tracks.append(Track(f"good{i}", path=str(path)))
    for kind in bad_kinds:
        tracks.append(Track(f"bad-{kind}", path=str(make_bad_file(kind, run.audio))))
    with Catalog(run.catalog) as catalog:
        catalog.upsert(tracks)
    return [t.track_id for t in tracks[:n_good]]


def test_every_bad_file_is_recorded_and_the_others_succeed(tmp_path):
    run = RunDir(tmp_path / "run")
    good = make_catalog(run, 3, BAD_KINDS)
    result = ingest_run(run, SHORT, workers=1, show_progress=False)
    assert (result.ok, result.failed, result.skipped) == (3, len(BAD_KINDS), 0)
    with Catalog(run.catalog) as catalog:
        for kind in BAD_KINDS:
            track = catalog.get(f"bad-{kind}")
            assert track.status == "failed" and Path(track.path).name in track.error
        ok = catalog.get("good1")
        assert ok.status == "ok" and ok.error is None and ok.duration == pytest.approx(3.5)
        assert ok.meta["excerpt_padded"] is False and ok.meta["excerpt_offset"] == pytest.approx(0.75)
    assert sorted(FeatureStore(run.features).track_ids) == good
    again = ingest_run(run, SHORT, workers=1, show_progress=False)
    assert (again.ok, again.failed, again.skipped) == (0, 0, 3 + len(BAD_KINDS))
    retried = ingest_run(run, SHORT, workers=1, retry_failed=True, show_progress=False)
    assert (retried.ok, retried.failed) == (0, len(BAD_KINDS))


def test_strict_stops_at_the_first_failure_and_keeps_what_was_done(tmp_path):
    run = RunDir(tmp_path / "run")
    make_catalog(run, 2, ["silent"])  # ids sort as bad-silent, good0, good1
    with Catalog(run.catalog) as catalog:
        catalog.upsert([Track("zz-after", path=catalog.get("good0").path)])
    with pytest.raises(AudioError, match="silent"):
        ingest_run(run, SHORT, workers=1, strict=True, show_progress=False)
    with Catalog(run.catalog) as catalog:
        assert catalog.get("bad-silent").status == "failed"
        assert catalog.counts() == {"new": 3, "ok": 0, "failed": 1}


def test_resumed_ingest_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    whole, parts = RunDir(tmp_path / "whole"), RunDir(tmp_path / "parts")
    good = make_catalog(whole, 6, ["corrupt"])
    assert make_catalog(parts, 6, ["corrupt"]) == good
    ingest_run(whole, SHORT, workers=2, shard_size=4, show_progress=False)  # worker processes

    calls = []
    real_extract = features_module.extract_track

    def extract_then_interrupt(*args):
        calls.append(args[0])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_extract(*args)

    monkeypatch.setattr(features_module, "extract_track", extract_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ingest_run(parts, SHORT, workers=1, shard_size=4, show_progress=False)
    assert len(FeatureStore(parts.features)) == 3  # good0..2 committed on the way out (bad-corrupt first)
    monkeypatch.setattr(features_module, "extract_track", real_extract)
    resumed = ingest_run(parts, SHORT, workers=1, shard_size=4, show_progress=False)
    assert (resumed.ok, resumed.skipped) == (3, 4)

    a, b = FeatureStore(whole.features), FeatureStore(parts.features)
    assert sorted(a.track_ids) == sorted(b.track_ids) == good
    np.testing.assert_array_equal(a.get_many(good), b.get_many(good))
    with Catalog(whole.catalog) as ca, Catalog(parts.catalog) as cb:
        fa, fb = (c.to_frame().drop(columns=["path", "error"]) for c in (ca, cb))  # paths differ
        assert fa.equals(fb) and (fa.status == "failed").sum() == 1


class StoreFirstExtractor:
    """An engine like Spark's: it stores every track itself, then gives the results (no features)."""

    name, stops_early = "store-first", False

    def extract(self, tracks, cfg, store):
        results = [extract_track(t.track_id, t.path, cfg) for t in tracks]
        for r in results:
            if r.features is not None:
                store.add(r.track_id, r.features)
        store.commit()
        for r in results:
            yield features_module.Extracted(r.track_id, None, r.duration, r.offset, r.padded, r.error,
                                            r.decoder, r.notes)


def test_an_engine_that_stores_first_is_recorded_as_the_local_one(tmp_path):
    local, other = RunDir(tmp_path / "local"), RunDir(tmp_path / "other")
    good = make_catalog(local, 3, ["silent", "corrupt"])
    make_catalog(other, 3, ["silent", "corrupt"])
    assert ingest_run(local, SHORT, show_progress=False) == ingest(
        other, StoreFirstExtractor(), SHORT, show_progress=False)
    assert sorted(FeatureStore(other.features).track_ids) == good
    with Catalog(local.catalog) as ca, Catalog(other.catalog) as cb:
        fa, fb = (c.to_frame().drop(columns=["path", "error"]) for c in (ca, cb))  # paths differ
        assert fa.equals(fb)

    strict = RunDir(tmp_path / "strict")  # it cannot stop early: every track recorded, then raised
    make_catalog(strict, 2, ["silent", "corrupt"])
    with pytest.raises(AudioError, match="2 track"):
        ingest(strict, StoreFirstExtractor(), SHORT, strict=True, show_progress=False)
    with Catalog(strict.catalog) as catalog:
        assert catalog.counts() == {"new": 0, "ok": 2, "failed": 2}


def test_discover_folders_files_and_manifests(tmp_path):
    (tmp_path / "lib" / "jazz").mkdir(parents=True)
    for name in ("jazz/a.wav", "b.flac", "notes.txt"):
        sf.write(tmp_path / "lib" / name, tone(440, 0.1, 8000), 8000) if name[-3:] != "txt" else None
    (tmp_path / "lib" / "notes.txt").write_text("not audio")
    manifest = tmp_path / "m.tsv"
    manifest.write_text("track_id\tpath\ttitle\tartist\nx1\tlib/b.flac\tBee\tAnon\n")
    tracks = discover_tracks([tmp_path / "lib", manifest])
    assert [t.track_id for t in tracks] == ["b.flac", "jazz/a.wav", "x1"]
    assert tracks[2].path == str((tmp_path / "lib" / "b.flac").resolve()) and tracks[2].artist == "Anon"
    with pytest.raises(DataError, match="both"):
        discover_tracks([tmp_path / "lib", tmp_path / "lib" / "b.flac"])
    bad = tmp_path / "bad.csv"
    bad.write_text("track_id,path\nok,a.wav\n,missing-id.wav\n")
    with pytest.raises(DataError, match="line 3"):
        read_manifest(bad)
    with Catalog(tmp_path / "c.sqlite") as catalog:
        assert register_tracks(catalog, tracks) == 3
        assert register_tracks(catalog, tracks) == 0
        with pytest.raises(DataError, match="x1"):
            register_tracks(catalog, [Track("x1", path="/elsewhere.wav")])


def test_cli_ingest_and_report(tmp_path, capsys):
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(2):
        sf.write(lib / f"song{i}.wav", tone(300 + 100 * i, 3, 22050), 22050)
    (lib / "broken.mp3").write_bytes(b"\x00" * 1000)
    run = tmp_path / "run"
    run.mkdir()
    Config().replace(audio=SHORT).save(run / "config.toml")
    assert main(["--no-progress", "ingest", str(lib), "--out", str(run), "--workers", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"2 ok, 1 failed, see sonicrec ingest --report {run}"
    assert main(["ingest", "--report", str(run)]) == 0
    report = capsys.readouterr().out
    assert report.startswith("broken.mp3\t") and "2 ok, 1 failed" in report
    assert FeatureStore(run / "features").n_frames == SHORT.n_frames
    assert main(["ingest", str(lib), "--out", str(tmp_path)]) == 2  # not a run directory


def test_manifest_errors_name_the_real_line_and_the_real_problem(tmp_path):
    blank_lines = tmp_path / "m.csv"
    blank_lines.write_text("track_id,path\na,a.wav\n\n\n,b.wav\n\nc,c.wav\n")
    with pytest.raises(DataError, match=r"m\.csv, line 5: track_id and path"):
        read_manifest(blank_lines)
    header_only = tmp_path / "h.csv"
    header_only.write_text("track_id,path,title\n")
    with pytest.raises(DataError, match="lists no tracks"):
        read_manifest(header_only)
    no_newline = tmp_path / "n.csv"
    no_newline.write_text("track_id,path")
    with pytest.raises(DataError, match="lists no tracks"):
        read_manifest(no_newline)
    mac = tmp_path / "mac.csv"
    mac.write_bytes(b"track_id,path\rx,x.wav\ry,y.wav\r")
    assert [t.track_id for t in read_manifest(mac)] == ["x", "y"]
    wrong = tmp_path / "w.csv"
    wrong.write_text("id,file\nx,x.wav\n")
    with pytest.raises(DataError, match=r"needs a header line .* has \['id', 'file'\]"):
        read_manifest(wrong)


def test_the_writer_refuses_non_finite_features(tmp_path):
    x = random_features(2, SHORT)
    x[1, 3, 4] = np.inf
    with FeatureStoreWriter(tmp_path / "store", SHORT) as writer:
        writer.add("fine", x[0])
        with pytest.raises(DataError, match="'broken': its features are not finite"):
            writer.add("broken", x[1])
    assert FeatureStore(tmp_path / "store").track_ids == ["fine"]


def test_a_float_file_of_huge_samples_fails_instead_of_storing_inf(tmp_path):
    run = RunDir(tmp_path / "run")
    make_catalog(run, 1, ["huge-float"])
    result = ingest_run(run, SHORT, workers=1, show_progress=False)
    assert (result.ok, result.failed) == (1, 1)
    store = FeatureStore(run.features)
    assert store.track_ids == ["good0"] and np.isfinite(store.get_many(store.track_ids)).all()


def test_links_to_nothing_and_pipes_in_a_folder_are_recorded_as_failed(tmp_path, deadline):
    lib = tmp_path / "lib"
    lib.mkdir()
    sf.write(lib / "fine.wav", tone(440, 3, 22050), 22050)
    make_bad_file("dangling-link", lib)
    make_bad_file("fifo", lib)
    tracks = discover_tracks([lib])
    assert [t.track_id for t in tracks] == ["fine.wav", "gone.flac", "pipe.ogg"]
    assert tracks[1].path == str(lib.absolute() / "gone.flac")  # the link, not where it pointed
    run = RunDir(tmp_path / "run")
    with Catalog(run.catalog) as catalog:
        register_tracks(catalog, tracks)
    with deadline(60):
        result = ingest_run(run, SHORT, workers=1, show_progress=False)
        again = ingest_run(run, SHORT, workers=1, show_progress=False)
    assert (result.ok, result.failed) == (1, 2) and (again.ok, again.failed) == (0, 0)
    with Catalog(run.catalog) as catalog:
        assert "not a regular file (a pipe)" in catalog.get("pipe.ogg").error
        assert "gone.flac: cannot read (No such file" in catalog.get("gone.flac").error
    with deadline(20):
        assert [t.track_id for t in discover_tracks([lib / "pipe.ogg"])] == ["pipe.ogg"]  # given alone


def test_workers_are_capped_by_files_and_cores(tmp_path, monkeypatch):
    cores = features_module.os.cpu_count()
    assert features_module.worker_count(1000, 1) == 1
    assert features_module.worker_count(1000, 10**6) == features_module.WORKERS_PER_CORE * cores
    assert features_module.worker_count(3, 10) == min(3, 2 * cores)
    run = RunDir(tmp_path / "run")
    make_catalog(run, 1, [])

    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool was started for one file")

    monkeypatch.setattr(features_module.multiprocessing, "get_context", no_pool)
    assert ingest_run(run, SHORT, workers=1000, show_progress=False).ok == 1


def test_report_escapes_names_and_offers_json(tmp_path, capsys):
    import json

    lib = tmp_path / "lib"
    lib.mkdir()
    sf.write(lib / "song.wav", tone(300, 3, 22050), 22050)
    (lib / "bad\nname\t.mp3").write_bytes(b"\x00" * 1000)
    run = tmp_path / "run"
    run.mkdir()
    Config().replace(audio=SHORT).save(run / "config.toml")
    assert main(["--no-progress", "ingest", str(lib), "--out", str(run), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["ingest", "--report", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1] == "1 ok, 1 failed, 0 not yet extracted"
    track_id, path, reason = lines[0].split("\t")
    assert track_id == "bad\\nname\\t.mp3" and path.endswith("bad\\nname\\t.mp3")
    assert reason.startswith(path)  # the reason names the file, escaped too
    assert main(["ingest", "--report", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failed"][0]["track_id"] == "bad\nname\t.mp3" and report["counts"]["ok"] == 1
