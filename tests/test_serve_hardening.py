"""Hostile and odd requests to the web app (issue 15 items 23, 24, and the favicon of 26)."""

import asyncio
import json
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from sonicrec.errors import DataError  # noqa: E402
from sonicrec.serve import create_app  # noqa: E402
from test_serve import make_run, tiny_predictor  # noqa: E402

HUGE = "9223372036854775808"  # 2**63: past SQLite's integers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), tiny_predictor())


@pytest.fixture(scope="module")
def guarded(run, tmp_path_factory):
    app = create_app(run.root, upload_dir=tmp_path_factory.mktemp("uploads"), predictor=tiny_predictor(),
                     allowed_hosts=["127.0.0.1", "localhost", "::1"], body_timeout_s=0.5)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


@pytest.mark.parametrize("path", [
    f"/api/search?offset={HUGE}", f"/api/search?limit={HUGE}", f"/api/similar?id=t01&n={HUGE}",
    f"/api/audience?id=t01&n={HUGE}", f"/api/recommend?user=u01&n={HUGE}", f"/api/users?limit={HUGE}",
    f"/api/map?max_points={HUGE}", "/api/search?offset=-1", "/api/search?offset=1e400",
])
def test_numeric_parameters_out_of_range_are_422_not_500(guarded, path):
    r = guarded.get(path)
    assert r.status_code == 422, (path, r.status_code, r.text)


def test_security_and_cache_headers(guarded):
    page = guarded.get("/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    for r in (page, *(guarded.get(p) for p in ("/api/info", "/static/app.js", "/api/track?id=zzz"))):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert guarded.get("/api/info").headers["cache-control"] == "no-store"
    assert guarded.get("/").headers["cache-control"] == "no-cache"
    assert "max-age" in guarded.get("/api/audio?id=t01").headers["cache-control"]


def test_the_favicon_is_served(guarded):
    r = guarded.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")


def test_a_foreign_host_header_is_refused(guarded):
    assert guarded.get("/api/info", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert guarded.get("/api/info", headers={"Host": "[::1]:8000"}).status_code == 200
    r = guarded.get("/api/info", headers={"Host": "attacker.example:8000"})
    assert r.status_code == 400 and "Host" in r.json()["detail"]


def test_cross_origin_uploads_are_refused(guarded):
    junk = {"file": ("x.wav", b"not audio at all" * 8, "audio/wav")}
    evil = guarded.post("/api/upload", files=junk, headers={"Origin": "http://attacker.example"})
    assert evil.status_code == 403
    site = guarded.post("/api/upload", files=junk, headers={"Sec-Fetch-Site": "cross-site"})
    assert site.status_code == 403
    own = guarded.post("/api/upload", files=junk, headers={"Origin": "http://127.0.0.1:8000"})
    assert own.status_code == 415  # reached the endpoint: not audio
    assert guarded.post("/api/upload", files=junk).status_code == 415  # no Origin: curl, scripts


def test_oversized_headers_are_refused(guarded):
    r = guarded.get("/api/info", headers={"X-Padding": "x" * 20_000})
    assert r.status_code == 431


def test_a_stalled_upload_body_is_cut(guarded):
    app = guarded.app
    sent = []

    async def go():
        chunks = [{"type": "http.request", "body": b"--b\r\n", "more_body": True}]

        async def receive():
            if chunks:
                return chunks.pop()
            await asyncio.sleep(30)  # the client stops sending

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/api/upload", "raw_path": b"/api/upload", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
                 "headers": [(b"host", b"127.0.0.1:8000"),
                             (b"content-type", b"multipart/form-data; boundary=b"),
                             (b"content-length", b"1000")]}
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(go())
    assert sent[0]["status"] == 408


def test_the_report_json_shows_no_absolute_paths(run, tmp_path):
    report = {"run": str(run.root.resolve()), "tracks": "test",
              "playlists": {"max": [{"tracks": [{"id": "t01", "src": str(run.audio / "t01.wav")}]}]},
              "map": {"points": [{"track_id": "t01", "x": 0.0, "y": 1.0}]}}
    (run.analysis).mkdir(exist_ok=True)
    (run.analysis / "report.json").write_text(json.dumps(report))
    try:
        app = create_app(run.root, upload_dir=tmp_path / "uploads", predictor=tiny_predictor())
        with TestClient(app) as client:
            r = client.get("/analysis/report.json")
    finally:
        (run.analysis / "report.json").unlink()
    assert r.status_code == 200
    assert str(run.root.resolve()) not in r.text and str(Path.home()) not in r.text
    served = r.json()
    assert served["map"] == report["map"] and served["run"] == run.root.name


def test_the_temporary_upload_folder_goes_when_start_up_is_interrupted(run, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    before = set(Path(tempfile.gettempdir()).glob("sonicrec-uploads-*"))
    monkeypatch.setattr("sonicrec.recommend.Recommender.load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        create_app(run.root, predictor=tiny_predictor())
    assert set(Path(tempfile.gettempdir()).glob("sonicrec-uploads-*")) == before


def test_a_queue_without_room_is_a_clear_error(run, tmp_path):
    with pytest.raises(DataError, match="at least one upload"):
        create_app(run.root, upload_dir=tmp_path, predictor=tiny_predictor(), upload_queue=0)
