"""The web service on a tiny synthetic run: 24 simulated tones, a tiny real CNN, simulated factors."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
sf = pytest.importorskip("soundfile")
torch = pytest.importorskip("torch")

from fastapi.testclient import TestClient  # noqa: E402

from sonicrec.audio import file_to_logmel  # noqa: E402
from sonicrec.catalog import Catalog, Track  # noqa: E402
from sonicrec.config import AudioConfig, CFConfig, Config, ModelConfig  # noqa: E402
from sonicrec.factors import Factors, unit_rows  # noqa: E402
from sonicrec.io import atomic_save_npz  # noqa: E402
from sonicrec.model import AudioCNN  # noqa: E402
from sonicrec.predict import Predictor  # noqa: E402
from sonicrec.recommend import Recommender  # noqa: E402
from sonicrec.rundir import RunDir  # noqa: E402
from sonicrec.serve import create_app, sniff_audio_format  # noqa: E402
from sonicrec.songmap import SongMap, load_song_map  # noqa: E402

K = 8
N_SONGS, N_USERS = 24, 30
SR = 8000
SPLIT = np.array(["train", "train", "train", "train", "valid", "test"] * 4)  # 16 train, 4 valid, 4 test
CONFIG = Config(
    audio=AudioConfig(sample_rate=SR, excerpt_seconds=2.0, n_mels=16, n_fft=256, hop_length=128,
                      n_frames=126),
    cf=CFConfig(factors=K),
    model=ModelConfig(conv_channels=(4, 4), kernel_size=3, pool_sizes=(2,), dense_units=(8,), dropout=0.0),
)


def tiny_predictor() -> Predictor:
    """An untrained tiny CNN (seeded): a real model, so uploads go through the real front end."""
    torch.manual_seed(0)
    return Predictor(AudioCNN.for_config(CONFIG), CONFIG, target="unit", device=torch.device("cpu"))


def tone(i: int) -> np.ndarray:
    """3 s of a simulated tone: pitch and vibrato rate vary with i."""
    t = np.arange(3 * SR) / SR
    f = 110 * 2 ** (i / 5)
    vibrato = 1 + 0.5 * np.sin(2 * np.pi * (1 + i % 4) * t)
    return (0.3 * np.sin(2 * np.pi * f * t) * vibrato).astype(np.float32)


def make_run(root: Path, predictor: Predictor) -> RunDir:
    """A run directory: config, catalog + wav files, simulated plays, Factors, cnn-mse predictions.

    Predictions are the tiny CNN's outputs for each file, and the simulated CF factors of every song
    are its prediction plus noise, so an uploaded copy of a cold song finds that song first.
    """
    rng = np.random.default_rng(0)
    run = RunDir(root)
    CONFIG.save(run.config)
    ids = [f"t{i:02d}" for i in range(N_SONGS)]
    tracks = []
    for i, track_id in enumerate(ids):
        path = run.audio / f"{track_id}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone(i), SR)
        group = "low" if i < N_SONGS // 2 else "high"
        tracks.append(Track(track_id, path=str(path), title=f"Tone {i}", artist=f"Composer {group}",
                            collection=group, duration=3.0, status="ok", meta={"style": f"{group} tones"}))
    tracks.append(Track("broken", path=str(root / "missing.wav"), title="Gone", status="failed"))
    tracks.append(Track("dir/odd id&x=1", path=str(run.audio / "t00.wav"), title="Odd", status="ok"))
    with Catalog(run.catalog) as catalog:
        catalog.upsert(tracks)
    logmels = np.stack([file_to_logmel(run.audio / f"{s}.wav", CONFIG.audio) for s in ids])
    predicted = predictor.predict_logmel(logmels)  # (24, K)
    factors = Factors(
        user_ids=np.array([f"u{i:02d}" for i in range(N_USERS)]),
        song_ids=np.array(ids),
        user_factors=rng.standard_normal((N_USERS, K)).astype(np.float32),
        song_factors=(unit_rows(predicted) + 0.3 * rng.standard_normal((N_SONGS, K))).astype(np.float32),
        split=SPLIT,
    )
    factors.save(run.factors)
    atomic_save_npz(run.prediction("cnn-mse"), song_ids=np.array(ids), factors=predicted)
    plays = pd.DataFrame(
        [(u, s, int(rng.integers(1, 5)))
         for u in factors.user_ids for s in rng.choice(ids, 6, replace=False)],
        columns=["user_id", "track_id", "count"],
    )
    plays.to_parquet(run.plays, index=False)
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    predictor = tiny_predictor()
    run = make_run(tmp_path_factory.mktemp("run"), predictor)
    return run, predictor


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def client(world, upload_dir):
    run, predictor = world
    app = create_app(run.root, upload_dir=upload_dir, max_upload_mb=0.2, predictor=predictor)
    with TestClient(app) as c:
        yield c


def _wav_bytes(i: int, tmp_path: Path) -> bytes:
    path = tmp_path / f"copy{i}.wav"
    sf.write(path, tone(i), SR)
    return path.read_bytes()


def _expected_similar(world, path: Path, n: int) -> list[str]:
    """The library's similar-songs list for an audio file (hub-corrected, warm and cold merged)."""
    run, predictor = world
    return Recommender.load(run.root, predictor=predictor).similar(path, n).ids.tolist()


# --- reading endpoints ----------------------------------------------------------------------------


def test_info_counts_the_run(client):
    info = client.get("/api/info").json()
    assert (info["n_users"], info["n_warm_songs"], info["n_cold_songs"]) == (N_USERS, 16, 8)
    assert info["model"] == "cnn-mse" and info["n_factors"] == K
    assert info["analysis_url"] is None and info["max_upload_mb"] == 0.2


def test_search_and_track_metadata(client):
    hits = client.get("/api/search", params={"q": "tone 1"}).json()["results"]
    assert [h["track_id"] for h in hits] == ["t01", "t10", "t11", "t12", "t13", "t14", "t15", "t16", "t17",
                                             "t18", "t19"]
    assert client.get("/api/search", params={"q": "%"}).json()["results"] == []  # no LIKE wildcard
    t = client.get("/api/track", params={"id": "t05"}).json()
    assert t["title"] == "Tone 5" and t["split"] == "test" and t["playable"]
    assert t["meta"]["style"] == "low tones" and t["excerpt_start"] == pytest.approx(0.5)
    assert client.get(t["audio_url"]).status_code == 200
    odd = client.get("/api/track", params={"id": "dir/odd id&x=1"}).json()  # catalog only, no factors
    assert odd["split"] is None and client.get(odd["audio_url"]).status_code == 200
    broken = client.get("/api/track", params={"id": "broken"}).json()
    assert broken["split"] is None and not broken["playable"] and broken["audio_url"] is None


def test_audio_is_served_with_range_requests(client, world):
    run, _ = world
    data = (run.audio / "t03.wav").read_bytes()
    full = client.get("/api/audio", params={"id": "t03"})
    assert full.status_code == 200 and full.content == data
    assert full.headers["content-type"] == "audio/wav" and full.headers["accept-ranges"] == "bytes"
    part = client.get("/api/audio", params={"id": "t03"}, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"


def test_similar_audience_recommend_match_the_recommender(client, world):
    run, _ = world
    from sonicrec.recommend import Recommender

    rec = Recommender.load(run.root, "cnn-mse")
    got = client.get("/api/similar", params={"id": "t04", "n": 6}).json()
    want = rec.similar("t04", 6)
    assert [h["track_id"] for h in got["results"]] == want.ids.tolist()
    assert got["results"][0]["track_id"] == "t04" and got["results"][0]["cold"]
    assert all(h["cold"] == (h["split"] != "train") for h in got["results"])
    assert got["results"][1]["title"] and got["results"][1]["collection"] in ("low", "high")

    aud = client.get("/api/audience", params={"id": "t00", "n": 5}).json()["results"]
    assert [u["user_id"] for u in aud] == rec.audience("t00", 5).ids.tolist()

    recs = client.get("/api/recommend", params={"user": "u03", "n": 24}).json()["results"]
    want = rec.recommend("u03", 24)
    assert [h["track_id"] for h in recs] == want.ids.tolist()
    np.testing.assert_allclose([h["score"] for h in recs], want.scores, rtol=1e-5)
    assert {h["cold"] for h in recs} == {True, False}  # cold songs compete and are marked
    warm = client.get("/api/recommend", params={"user": "u03", "include_cold": "false"}).json()["results"]
    assert warm and not any(h["cold"] for h in warm)


def test_users_listing(client):
    body = client.get("/api/users", params={"q": "U2"}).json()
    assert body["results"] == ["u20", "u21", "u22", "u23", "u24", "u25", "u26", "u27", "u28", "u29"]
    assert client.get("/api/users", params={"limit": 3}).json() == {
        "query": "", "total": N_USERS, "results": ["u00", "u01", "u02"]}


def test_map_is_pca_of_predicted_factors(client, world):
    run, _ = world
    body = client.get("/api/map").json()
    assert body["method"] == "pca" and body["n_songs"] == N_SONGS == len(body["ids"])
    assert body["group"][0] == "low tones" and body["split"][4] == "valid"
    xy = np.column_stack([body["x"], body["y"]])
    pred = unit_rows(np.load(run.prediction("cnn-mse"))["factors"])
    centred = pred - pred.mean(axis=0)
    # the two coordinates are uncorrelated and carry the two largest variances (PCA)
    assert abs(np.corrcoef(xy.T)[0, 1]) < 1e-4
    top2 = np.linalg.svd(centred, compute_uv=False)[:2] ** 2
    np.testing.assert_allclose(np.sort((xy**2).sum(axis=0))[::-1], top2, rtol=1e-4)
    sample = client.get("/api/map", params={"max_points": 5}).json()
    assert len(sample["ids"]) == 5 and sample["n_songs"] == N_SONGS


def test_the_analysis_reports_map_places_uploads_among_their_neighbours(tmp_path):
    path = tmp_path / "report.json"
    points = [{"track_id": t, "x": x, "y": y, "label": "l"}
              for t, x, y in [("a", 0, 0), ("b", 1, 0), ("c", 0, 2)]]
    path.write_text(json.dumps({"model": "cnn-mse", "map": {"image": "latent-map.png", "points": points}}))
    m = SongMap.from_report(path)
    assert m.ids.tolist() == ["a", "b", "c"] and m.method.startswith("t-SNE")
    from sonicrec.recommend import Ranking

    neighbours = Ranking(np.array(["b", "zz", "c"]), np.array([0.9, 0.8, 0.3], dtype=np.float32))
    assert m.place(np.ones(3), neighbours) == pytest.approx((0.9 / 1.2, 0.6 / 1.2))


# --- uploads ----------------------------------------------------------------------------------------


def test_upload_places_a_new_file_like_its_cold_original(client, world, tmp_path):
    _, predictor = world
    data = _wav_bytes(5, tmp_path)  # a copy of t05 (a test song: placed by its predicted factors)
    r = client.post("/api/upload", files={"file": ("../../my song.wav", data, "audio/wav")},
                    params={"n": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["filename"] == "my song.wav" and body["format"] == "wav" and body["size_bytes"] == len(data)
    expected = predictor.predict_logmel(file_to_logmel(tmp_path / "copy5.wav", CONFIG.audio)[None])[0]
    np.testing.assert_allclose(body["factors"], expected, rtol=1e-5, atol=1e-6)
    similar = [h["track_id"] for h in body["similar"]]
    assert similar == _expected_similar(world, tmp_path / "copy5.wav", 5) and similar[0] == "t05"
    assert body["similar"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert body["familiarity"] is None  # the test model has no familiarity model (predict_run fits one)
    assert len(body["audience"]) == 5 and body["audience"][0]["rank"] == 1
    # it lands on the map exactly where t05 is
    m = client.get("/api/map").json()
    i = m["ids"].index("t05")
    assert (body["map"]["x"], body["map"]["y"]) == pytest.approx((m["x"][i], m["y"][i]), abs=1e-5)


def test_uploads_are_stored_under_generated_names_and_removed(client, upload_dir, tmp_path, monkeypatch):
    import sonicrec.serve.uploads

    seen = []
    real_copy = sonicrec.serve.uploads._copy_file

    def spy(source, path):
        seen.append(path)
        return real_copy(source, path)

    monkeypatch.setattr(sonicrec.serve.uploads, "_copy_file", spy)
    files = {"file": ("../../../etc/x.wav", _wav_bytes(2, tmp_path), "audio/wav")}
    r = client.post("/api/upload", files=files)
    assert r.status_code == 200
    (path,) = seen
    assert path.parent == upload_dir and path.name == r.json()["upload_id"] + ".wav"
    assert list(upload_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (b"just some text, not audio" * 10, 415, "not a recognised audio file"),
        (b"", 415, "not a recognised audio file"),
        (b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(200), 422, "unsupported format or corrupt"),
        (b"RIFF\x10\x00\x00\x00WAVE" + bytes(300_000), 413, "upload larger than 0.2 MB"),
    ],
)
def test_bad_uploads_get_a_clear_4xx(client, payload, status, words):
    r = client.post("/api/upload", files={"file": ("bad.wav", payload, "audio/wav")})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail
    assert "sonicrec-uploads" not in detail and "/tmp" not in detail  # no server path leaks


def test_upload_without_content_length_is_cut_at_the_limit(client):
    chunks = (b"x" * 65536 for _ in range(10))  # chunked transfer: the size is only known as it arrives
    r = client.post("/api/upload", content=chunks,
                    headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 413 and "larger than 0.2 MB" in r.json()["detail"]


def test_upload_without_a_trained_model_is_503(world, tmp_path):
    run, _ = world
    with TestClient(create_app(run.root, upload_dir=tmp_path)) as c:  # no checkpoint in this run
        r = c.post("/api/upload", files={"file": ("a.wav", _wav_bytes(1, tmp_path), "audio/wav")})
    assert r.status_code == 503 and "no model checkpoint" in r.json()["detail"]


def test_cli_serves_on_loopback_by_default(monkeypatch, tmp_path):
    import sonicrec.serve
    from sonicrec.cli import build_parser, main

    calls = []
    monkeypatch.setattr(sonicrec.serve, "serve", lambda run_dir, **kw: calls.append((run_dir, kw)))
    assert main(["--no-progress", "serve", str(tmp_path), "--port", "8123", "--max-upload-mb", "5"]) == 0
    assert calls == [(tmp_path, {"host": "127.0.0.1", "port": 8123, "show_progress": False,
                                 "model": "cnn-mse", "upload_dir": None, "workers": min(os.cpu_count(), 8),
                                 "access_log": False, "allowed_hosts": [], "allowed_origins": [],
                                 "max_upload_mb": 5.0})]
    assert build_parser().parse_args(["demo", "--serve"]).serve


# --- unknown ids and paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "params", "words"),
    [
        ("/api/similar", {"id": "nope"}, "unknown track id 'nope'"),
        ("/api/similar", {"id": "../../etc/passwd"}, "unknown track id"),
        ("/api/audience", {"id": "/etc/passwd"}, "unknown track id"),
        ("/api/track", {"id": "nope"}, "unknown track id 'nope'"),
        ("/api/audio", {"id": "../catalog.sqlite"}, "unknown track id"),
        ("/api/audio", {"id": "broken"}, "no playable audio"),
        ("/api/recommend", {"user": "u99"}, "unknown user id 'u99'"),
    ],
)
def test_unknown_ids_are_404_with_a_message(client, url, params, words):
    r = client.get(url, params=params)
    assert r.status_code == 404 and words in r.json()["detail"]


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("/static/../serve/app.py", b"def create_app"),
        ("/static/%2e%2e/serve/app.py", b"def create_app"),
        ("/static/..%2f..%2f..%2fpyproject.toml", b"[project]"),
        ("/analysis/../config.toml", b"[audio]"),
        ("/analysis/%2e%2e/config.toml", b"[audio]"),
        ("/analysis/..%2fcatalog.sqlite", b"SQLite format"),
    ],
)
def test_path_traversal_is_refused(client, world, url, secret):
    run, _ = world
    run.analysis.mkdir(exist_ok=True)
    try:
        r = client.get(url)
    finally:
        shutil.rmtree(run.analysis)
    assert r.status_code == 404 and secret not in r.content


def test_analysis_report_is_linked_and_served_when_present(client, world):
    run, _ = world
    r = client.get("/analysis/")
    detail = r.json()["detail"]  # web wording: the stage, never a command line
    assert r.status_code == 404 and "analyse the model" in detail and "sonicrec" not in detail
    run.analysis.mkdir()
    try:
        (run.analysis / "index.html").write_text("<h1>the report</h1>")
        assert client.get("/api/info").json()["analysis_url"] == "/analysis/"
        assert client.get("/analysis/").text == "<h1>the report</h1>"
        report = run.analysis / "report.json"
        report.write_text(json.dumps({"map": {"points": [{"track_id": "t01", "x": 1.5, "y": -2}]}}))
        assert load_song_map(run, "cnn-mse", K).method.startswith("t-SNE")
        report.write_text('{"map": {}}')  # a broken report: back to PCA
        assert load_song_map(run, "cnn-mse", K).method == "pca"
    finally:
        shutil.rmtree(run.analysis)


def test_page_docs_and_schema_work_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and "sonicrec" in page.text and "/static/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/similar", "/api/recommend", "/api/upload", "/api/audio", "/api/map"} <= set(paths)


def test_sniff_audio_format():
    assert sniff_audio_format(b"fLaC" + bytes(60)) == ".flac"
    assert sniff_audio_format(b"OggS" + bytes(24) + b"\x13OpusHead" + bytes(27)) == ".opus"
    assert sniff_audio_format(b"OggS" + bytes(24) + b"\x01vorbis" + bytes(29)) == ".ogg"
    assert sniff_audio_format(b"ID3\x04" + bytes(60)) == ".mp3"
    assert sniff_audio_format(b"\xff\xfb\x90\x00" + bytes(60)) == ".mp3"
    assert sniff_audio_format(b"\x00\x00\x00\x20ftypM4A " + bytes(52)) == ".m4a"
    assert sniff_audio_format(b"FORM\x00\x00\x00\x00AIFF" + bytes(52)) == ".aiff"
    assert sniff_audio_format(b"RIFF\x00\x00\x00\x00AVI " + bytes(52)) is None
    assert sniff_audio_format(b"<html>" + bytes(58)) is None
