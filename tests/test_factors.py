import numpy as np
import pytest

from sonicrec.errors import DataError, UnknownIdError
from sonicrec.factors import Factors, Predictions, unit_rows
from sonicrec.io import atomic_save_npz


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
    np.testing.assert_allclose(np.linalg.norm(g.song_factors_unit, axis=1), 1, rtol=1e-6)
    with np.load(tmp_path / "cf" / "factors.npz", allow_pickle=False) as raw:
        assert sorted(raw.files) == ["song_factors", "song_ids", "split", "user_factors", "user_ids"]


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
    with pytest.raises(DataError, match="factorize the play counts"):
        Factors.load(tmp_path / "nope.npz")


# --- predictions -----------------------------------------------------------------------------------


def test_predictions_round_trip_with_extra_arrays(tmp_path):
    path = tmp_path / "predictions" / "cnn-mse.npz"
    made = Predictions(["b", "a"], np.arange(6).reshape(2, 3), {"paths": np.array(["b.ogg", "a.ogg"])})
    made.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["cnn-mse.npz"]  # written atomically
    back = Predictions.load(path, n_factors=3)
    assert back.song_ids.tolist() == ["b", "a"] and back.n_factors == 3
    assert back.factors.dtype == np.float32
    np.testing.assert_array_equal(back.factors, made.factors)
    assert back.extra["paths"].tolist() == ["b.ogg", "a.ogg"]


def test_predictions_refuse_nan_duplicates_and_other_shapes():
    with pytest.raises(DataError, match="NaN"):
        Predictions(["a", "b"], [[1.0, np.nan], [0.0, 1.0]])
    with pytest.raises(DataError, match="repeat song ids"):
        Predictions(["a", "a"], np.ones((2, 2)))
    with pytest.raises(DataError, match="one row per song id"):
        Predictions(["a", "b", "c"], np.ones((2, 2)))
    with pytest.raises(DataError, match="one row per song id"):
        Predictions(["a", "b"], np.ones(2))
    with pytest.raises(DataError, match="one value per song"):
        Predictions(["a", "b"], np.ones((2, 2)), {"paths": np.array(["x"])})


@pytest.mark.parametrize("bad", ["dimension", "nan", "duplicate", "not-npz", "no-factors"])
def test_loading_bad_predictions_names_the_file(tmp_path, bad):
    path = tmp_path / "cnn-wpe.npz"
    ids, factors = np.array(["a", "b"]), np.ones((2, 4))
    if bad == "not-npz":
        path.write_bytes(b"not an npz file")
    elif bad == "no-factors":
        atomic_save_npz(path, song_ids=ids)
    else:
        if bad == "nan":
            factors[1, 2] = np.nan
        atomic_save_npz(path, song_ids=np.array(["a", "a"]) if bad == "duplicate" else ids, factors=factors)
    n_factors = 5 if bad == "dimension" else 4
    with pytest.raises(DataError, match=r"cnn-wpe\.npz: .*re-run the stage that wrote it"):
        Predictions.load(path, n_factors=n_factors)
