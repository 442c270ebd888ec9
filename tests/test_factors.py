import numpy as np
import pytest

from sonicrec.errors import DataError, UnknownIdError
from sonicrec.factors import Factors, unit_rows


def _factors(rng):
    return Factors(
        user_ids=["u0", "u1", "u2"],
        song_ids=["s0", "s1", "s2", "s3"],
        user_factors=rng.normal(size=(3, 5)),
        song_factors=rng.normal(size=(4, 5)),
        split=["train", "train", "valid", "test"],
    )


def test_save_load_round_trip(tmp_path):
    f = _factors(np.random.default_rng(0))
    f.save(tmp_path / "cf" / "factors.npz")
    g = Factors.load(tmp_path / "cf" / "factors.npz")
    np.testing.assert_array_equal(g.song_factors, f.song_factors)
    assert list(g.song_ids) == ["s0", "s1", "s2", "s3"]
    assert list(g.songs("test")) == ["s3"]
    with np.load(tmp_path / "cf" / "factors.npz", allow_pickle=False) as raw:
        np.testing.assert_allclose(np.linalg.norm(raw["song_factors_unit"], axis=1), 1, rtol=1e-6)


def test_unit_rows_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(unit_rows(x), [[0.6, 0.8], [0.0, 0.0]])


def test_lookup_and_validation():
    f = _factors(np.random.default_rng(1))
    assert list(f.song_index(["s2", "s0"])) == [2, 0]
    assert list(f.user_index("u1")) == [1]
    with pytest.raises(UnknownIdError, match="'s9'"):
        f.song_index(["s0", "s9"])
    with pytest.raises(DataError, match="split"):
        Factors(["u"], ["s"], np.ones((1, 2)), np.ones((1, 2)), ["holdout"])
    with pytest.raises(DataError, match="dimension"):
        Factors(["u"], ["s"], np.ones((1, 2)), np.ones((1, 3)), ["train"])


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="sonicrec factorize"):
        Factors.load(tmp_path / "nope.npz")
