from dataclasses import replace

import pytest

from sonicrec.catalog import Catalog, Track
from sonicrec.errors import DataError, UnknownIdError


def _tracks():
    return [
        Track("b", path="/x/b.ogg", title="B", artist="Bach", collection="bach",
              duration=30.0, meta={"mode": "minor", "instruments": ["Church Organ"]}),
        Track("a", path="/x/a.ogg", title="A", artist="Palestrina", collection="palestrina"),
    ]


def test_upsert_get_and_order(tmp_path):
    with Catalog(tmp_path / "catalog.sqlite") as cat:
        cat.upsert(_tracks())
        assert len(cat) == 2
        assert "a" in cat and "zzz" not in cat
        assert cat.ids() == ["a", "b"]
        b = cat.get("b")
        assert b.meta == {"mode": "minor", "instruments": ["Church Organ"]}
        assert b.duration == 30.0


def test_catalog_persists_and_replaces(tmp_path):
    path = tmp_path / "catalog.sqlite"
    with Catalog(path) as cat:
        cat.upsert(_tracks())
    with Catalog(path) as cat:
        cat.upsert([Track("a", title="A2")])
        assert len(cat) == 2
        assert cat.get("a").title == "A2"


def test_status_transitions_and_counts(tmp_path):
    with Catalog(tmp_path / "c.sqlite") as cat:
        cat.upsert(_tracks())
        assert cat.counts() == {"new": 2, "ok": 0, "failed": 0}
        b, a = _tracks()
        cat.upsert([replace(a, status="failed", error="silent audio"), replace(b, status="ok")])
        assert cat.counts() == {"new": 0, "ok": 1, "failed": 1}
        assert [t.error for t in cat.tracks("failed")] == ["silent audio"]
        with pytest.raises(DataError):
            replace(a, status="half-done")


def test_unknown_id_and_bad_rows():
    cat = Catalog(":memory:")
    with pytest.raises(UnknownIdError, match="'missing'"):
        cat.get("missing")
    with pytest.raises(DataError):
        Track("")
    with pytest.raises(DataError):
        Track("x", status="weird")


def test_to_frame_flattens_meta():
    cat = Catalog(":memory:")
    cat.upsert(_tracks())
    frame = cat.to_frame()
    assert list(frame["track_id"]) == ["a", "b"]
    assert frame.loc[frame.track_id == "b", "mode"].item() == "minor"
    assert Catalog(":memory:").to_frame().empty
