import numpy as np
import pytest

from sonicrec.io import atomic_path, atomic_save_npz, atomic_write_text, load_npz


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_npz_round_trip_without_pickle(tmp_path):
    atomic_save_npz(tmp_path / "a.npz", ids=np.array(["x", "yy"]), v=np.arange(3))
    data = load_npz(tmp_path / "a.npz")
    assert data["ids"].dtype.kind == "U"
    assert list(data["v"]) == [0, 1, 2]


def test_outputs_get_the_usual_permissions(tmp_path):
    import os

    from sonicrec import io

    atomic_write_text(tmp_path / "r.txt", "x")
    assert (tmp_path / "r.txt").stat().st_mode & 0o777 == 0o666 & ~io._UMASK
    assert os.access(tmp_path / "r.txt", os.R_OK)
