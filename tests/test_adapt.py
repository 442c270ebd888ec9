"""Adapting a trained CNN to another domain's audio (sonicrec.adapt)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from sonicrec.adapt import MIN_TRACKS, adapt_predictor, adapt_run
from sonicrec.config import Config, ModelConfig
from sonicrec.errors import DataError
from sonicrec.factors import Predictions
from sonicrec.model import AudioCNN
from sonicrec.predict import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_MELS, N_FRAMES = 16, 64


def small_predictor(seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    cfg = ModelConfig.small(conv_channels=(8, 8), pool_sizes=(2,), dense_units=(16,))
    model = AudioCNN(cfg, n_mels=N_MELS, n_factors=4)
    return Predictor(model, Config(model=cfg), target="unit", device=torch.device("cpu"))


def logmels(n: int, rng: np.random.Generator, *, level: float = -40.0, tilt: float = 0.0) -> np.ndarray:
    """Spectrograms with a random loud band each, shifted by ``level`` dB and tilted by ``tilt`` dB/band."""
    x = rng.normal(level, 3.0, (n, N_MELS, N_FRAMES)) + tilt * np.arange(N_MELS)[:, None]
    for i, band in enumerate(rng.integers(0, N_MELS - 4, n)):
        x[i, band : band + 4] += 12.0
    return x.astype(np.float32)


def test_adapted_predictions_of_new_recordings_take_the_training_distribution():
    rng = np.random.default_rng(0)
    predictor = small_predictor()
    predictor.model.set_input_norm(torch.full((N_MELS,), -40.0), torch.full((N_MELS,), 5.0))
    reference = predictor.predict_logmel(logmels(200, rng))
    other = logmels(2 * MIN_TRACKS, rng, level=-10.0, tilt=1.5)  # louder, brighter: another production
    fit, held_out = other[:MIN_TRACKS], other[MIN_TRACKS:]

    def gap(vectors: np.ndarray) -> float:
        return float(np.linalg.norm(vectors.mean(axis=0) - reference.mean(axis=0)))

    before = gap(predictor.predict_logmel(held_out))
    adapted = adapt_predictor(predictor, fit, reference)
    after = adapted.predict_logmel(held_out)
    assert gap(after) < 0.25 * before  # on recordings it was not adapted on
    np.testing.assert_allclose(adapted.predict_logmel(fit).mean(axis=0), reference.mean(axis=0), atol=1e-4)
    spread_ratio = np.trace(np.cov(after, rowvar=False)) / np.trace(np.cov(reference, rowvar=False))
    assert 0.5 < spread_ratio < 2.0
    assert adapted.model.band_mean.mean() == pytest.approx(float(fit.mean()), abs=0.01)
    norms = [m for m in adapted.model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(m.momentum == 0.1 and not m.training for m in norms)
    # the source is left as it was
    assert predictor.model.band_mean[0] == -40.0
    assert gap(predictor.predict_logmel(held_out)) == pytest.approx(before)


def test_adapting_needs_enough_recordings():
    rng = np.random.default_rng(1)
    predictor = small_predictor()
    with pytest.raises(DataError, match=f"at least {MIN_TRACKS} recordings"):
        adapt_predictor(predictor, logmels(MIN_TRACKS - 1, rng), rng.normal(size=(50, 4)))
    with pytest.raises(DataError, match="do not match"):
        adapt_predictor(predictor, logmels(MIN_TRACKS, rng), rng.normal(size=(50, 3)))


def test_adapt_command_writes_a_model_for_the_new_domain(tiny_world, tmp_path, capsys):
    from sonicrec.cf import factorize_run
    from sonicrec.cli import main
    from sonicrec.predict import predict_run
    from sonicrec.recommend import Recommender
    from sonicrec.train import train_run

    run = tiny_world
    cfg = run.read_config()
    factorize_run(run, cfg.cf, show_progress=False)
    train_run(run, cfg, name="cnn-mse", show_progress=False)
    predict_run(run, "cnn-mse", show_progress=False)

    rng = np.random.default_rng(2)
    t = np.arange(int(6.5 * 22050)) / 22050
    files = []
    for i in range(MIN_TRACKS):  # another domain: louder chords with a noise floor
        path = tmp_path / "real" / f"take{i:02d}.wav"
        path.parent.mkdir(exist_ok=True)
        chord = sum(np.sin(2 * np.pi * f * t) for f in 80 * rng.uniform(1, 8, 3))
        y = chord / 3 + 0.1 * rng.standard_normal(t.size)
        soundfile.write(path, (0.8 * y / np.abs(y).max()).astype(np.float32), 22050)
        files.append(path)
    broken = tmp_path / "real" / "broken.wav"
    broken.write_bytes(b"RIFF not really")

    noise = tmp_path / "noise.wav"
    soundfile.write(noise, rng.uniform(-1, 1, t.size).astype(np.float32), 22050)
    assert main(["--no-progress", "similar", str(run.root), str(noise)]) == 0
    shown = capsys.readouterr().out
    assert "UNFAMILIAR" in shown and f"sonicrec adapt {run.root} FILES... --model cnn-mse" in shown

    assert main(["--no-progress", "adapt", str(run.root), *map(str, files), str(broken)]) == 0
    out = capsys.readouterr().out
    assert "failed: " in out and "broken.wav" in out
    assert f"cnn-mse adapted to {MIN_TRACKS} recordings; 1 files could not be used" in out
    adapted = Predictor.load(run.checkpoint("cnn-mse-adapted"))
    assert adapted.adapted_from == "cnn-mse"
    # familiar: recordings like those it was adapted to, more than the run's own tones
    familiar_files = adapted.assess_files(files)[1].familiar.mean()
    assert familiar_files >= 0.75
    tones = [run.audio / f"song{i:02d}.wav" for i in range(32)]
    assert adapted.assess_files(tones)[1].familiar.mean() < familiar_files - 0.2
    # the run's songs stay placed by the source model
    source = Predictions.load(run.prediction("cnn-mse"), n_factors=4)
    copy = Predictions.load(run.prediction("cnn-mse-adapted"), n_factors=4)
    np.testing.assert_array_equal(copy.song_ids, source.song_ids)
    np.testing.assert_array_equal(copy.factors, source.factors)
    # queries of the new domain go through the adapted network
    query = files[0]
    original = Predictor.load(run.checkpoint("cnn-mse"))
    assert not np.allclose(adapted.predict_files([query]), original.predict_files([query]))
    assert len(Recommender.load(run.root, "cnn-mse-adapted").similar(query, 3).ids) == 3
    assert main(["--no-progress", "similar", str(run.root), str(noise), "--model", "cnn-mse-adapted"]) == 0
    shown = capsys.readouterr().out
    assert "UNFAMILIAR" in shown and "sonicrec adapt" not in shown  # no hint to adapt an adapted model

    with pytest.raises(DataError, match="itself adapted"):
        adapt_run(run, "cnn-mse-adapted", files)
    with pytest.raises(DataError, match="other than its source"):
        adapt_run(run, "cnn-mse", files, name="cnn-mse")
    with pytest.raises(DataError, match=f"at least {MIN_TRACKS} recordings"):
        adapt_run(run, "cnn-mse", files[:3] + [broken], name="few")


def test_each_step_can_be_left_out():
    rng = np.random.default_rng(3)
    predictor = small_predictor()
    other, reference = logmels(MIN_TRACKS, rng, level=-10.0), rng.normal(size=(50, 4))
    only_input = adapt_predictor(predictor, other, reference, steps=("input",))
    norms = [m for m in only_input.model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms)  # untouched
    assert torch.equal(only_input.model.output.weight, predictor.model.output.weight)
    assert only_input.model.band_mean.mean() == pytest.approx(float(other.mean()), abs=0.01)
    only_coral = adapt_predictor(predictor, other, reference, steps=("coral",))
    assert torch.equal(only_coral.model.band_mean, predictor.model.band_mean)
    coral_mean = only_coral.predict_logmel(other).mean(axis=0)
    np.testing.assert_allclose(coral_mean, reference.mean(axis=0), atol=1e-4)
    with pytest.raises(DataError, match="unknown adaptation steps"):
        adapt_predictor(predictor, other, reference, steps=("reverb",))
