"""Familiarity: Mahalanobis distance of penultimate activations, calibrated on held-out songs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sonicrec.config import CFConfig, Config, ModelConfig
from sonicrec.errors import DataError
from sonicrec.factors import Factors
from sonicrec.familiarity import UNFAMILIAR_MESSAGE, Familiarity, FamiliarityScores
from sonicrec.interactions import PlayMatrix
from sonicrec.model import AudioCNN
from sonicrec.predict import Predictor
from sonicrec.recommend import Recommender

D = 24


def correlated(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    mixing = np.random.default_rng(99).standard_normal((D, D)) / np.sqrt(D)  # the same for every set
    return rng.standard_normal((n, D)) @ mixing + shift


def test_familiarity_separates_a_shifted_distribution_from_the_training_one():
    rng = np.random.default_rng(0)
    fam = Familiarity.fit(correlated(rng, 800), correlated(rng, 200))
    same = fam.score(correlated(rng, 500))
    shifted = fam.score(correlated(rng, 500, shift=1.0))
    assert same.familiar.mean() >= 0.95  # calibrated at the held-out 99th percentile
    assert shifted.familiar.mean() < 0.05
    assert np.median(shifted.distance) > 1.5 * np.median(same.distance)
    assert 40 < np.median(same.percentile) < 60 and np.median(shifted.percentile) == 100


def test_save_load_and_the_json_form(tmp_path):
    rng = np.random.default_rng(1)
    fam = Familiarity.fit(correlated(rng, 100), correlated(rng, 50))
    fam.save(tmp_path / "f.npz")
    again = Familiarity.load(tmp_path / "f.npz")
    x = correlated(rng, 5, shift=3.0)
    np.testing.assert_allclose(again.distances(x), fam.distances(x))
    out = again.score(x).as_dict(0)
    assert out["familiar"] is False and out["message"] == UNFAMILIAR_MESSAGE
    assert "message" not in again.score(correlated(rng, 1) * 0).as_dict(0)  # the mean itself
    (tmp_path / "bad.npz").write_bytes(b"not npz")
    with pytest.raises(DataError, match="bad.npz"):
        Familiarity.load(tmp_path / "bad.npz")


def test_the_model_output_is_the_linear_layer_of_its_embedding():
    torch.manual_seed(0)
    for architecture in ("blog", "paper"):
        model = AudioCNN(ModelConfig.small(architecture=architecture), n_mels=128, n_factors=4).eval()
        x = torch.randn(2, 128, 300)
        with torch.no_grad():
            torch.testing.assert_close(model(x), model.output(model.embed(x)))


class _Assessing:
    """A predictor whose files all get the same factors; loud ones are unfamiliar."""

    def __init__(self, k: int) -> None:
        self.k = k

    def predict_files(self, paths):
        return np.ones((len(paths), self.k))

    def assess_files(self, paths):
        far = np.array(["loud" in Path(p).name for p in paths])
        scores = FamiliarityScores(np.where(far, 9.0, 1.0), np.where(far, 100.0, 50.0), ~far, 3.0)
        return self.predict_files(paths), scores


def test_recommender_reports_the_familiarity_of_audio_files(tmp_path):
    rng = np.random.default_rng(2)
    factors = Factors(np.array(["u0", "u1"]), np.array(["a", "b", "c"]), rng.standard_normal((2, 4)),
                      rng.standard_normal((3, 4)), np.array(["train", "train", "test"]))
    plays = PlayMatrix.from_frame(pd.DataFrame({"user_id": ["u0"], "track_id": ["a"], "count": [1]}))
    rec = Recommender(factors, np.array(["c"]), rng.standard_normal((1, 4)), plays, predictor=_Assessing(4))
    quiet, loud = tmp_path / "quiet.ogg", tmp_path / "loud.ogg"
    for f in (quiet, loud):
        f.write_bytes(b"audio")
    rec.similar(loud, 2)
    assert rec.familiarity(loud)["familiar"] is False
    assert rec.familiarity(quiet)["familiar"] is True  # asked directly: predicted then
    assert rec.familiarity("a") is None  # a track of the run


def test_predictor_assesses_log_mels_with_its_familiarity_model():
    torch.manual_seed(0)
    cfg = Config(cf=CFConfig(factors=4), model=ModelConfig.small())
    predictor = Predictor(AudioCNN.for_config(cfg), cfg, target="unit", device=torch.device("cpu"))
    x = np.random.default_rng(3).normal(-30, 5, (12, 128, 120)).astype(np.float32)
    factors, scores = predictor.assess_logmel(x)
    assert scores is None and factors.shape == (12, 4)
    _, h = predictor.embed_logmel(x)
    predictor.familiarity = Familiarity.fit(h[:8], h[8:])
    factors_again, scores = predictor.assess_logmel(np.concatenate([x[:2], x[:2] + 40]))
    np.testing.assert_allclose(factors_again[:2], factors[:2], rtol=1e-5)
    assert scores.distance[2:].min() > scores.distance[:2].max()  # 40 dB louder: farther away
