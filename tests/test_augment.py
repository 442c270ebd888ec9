"""Training-time augmentation: shapes, seeding, what each augmentation does, and input normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sonicrec.augment import Augmenter
from sonicrec.config import AUGMENTATIONS, AudioConfig, ModelConfig, TrainConfig
from sonicrec.errors import ConfigError
from sonicrec.model import AudioCNN

AUDIO = AudioConfig()
FLOOR = 10 * np.log10(AUDIO.log_floor)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(-20, 6, (4, 128, 60))).float()


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_augmentation_keeps_the_shape_stays_finite_and_changes_the_input(name):
    x = batch()
    y = Augmenter([name], AUDIO, seed=0)(x, epoch=0)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all() and (y >= FLOOR - 1e-4).all()
    assert not torch.allclose(y, x)


def test_draws_are_seeded_by_seed_epoch_and_rank():
    x = batch()
    def run(seed=0, epoch=0, rank=0):
        return Augmenter(AUGMENTATIONS, AUDIO, seed=seed, rank=rank)(x, epoch=epoch)
    assert torch.equal(run(), run())
    assert not torch.equal(run(), run(seed=1))
    assert not torch.equal(run(), run(epoch=1))
    assert not torch.equal(run(), run(rank=1))
    aug = Augmenter(AUGMENTATIONS, AUDIO, seed=0)
    first, second = aug(x, epoch=0), aug(x, epoch=0)  # the stream goes on within an epoch...
    assert not torch.equal(first, second)
    assert torch.equal(aug(x, epoch=5), run(epoch=5))  # ...and restarts with each epoch


def test_eq_boosts_bass_more_than_treble_on_average():
    x = batch()
    y = Augmenter(["eq"], AUDIO, seed=0)(x, epoch=0)
    change = (y - x).mean(dim=(0, 2))  # (M,)
    assert change[:5].mean() > change[-20:].mean() + 3  # low shelf of 0-24 dB


def test_bandlimit_lowers_only_the_top_bands():
    y = Augmenter(["bandlimit"], AUDIO, seed=3)(batch(), epoch=0)
    change = y - batch()
    assert torch.all(change[:, :40] == 0)  # below ~1.4 kHz: untouched (corners are above 3 kHz)
    assert (change[:, -10:] < -10).any()


def test_unknown_augmentation_is_a_config_error():
    with pytest.raises(ConfigError, match="bogus"):
        TrainConfig(augment=("gain", "bogus"))
    with pytest.raises(ConfigError, match="bogus"):
        Augmenter(["bogus"], AUDIO, seed=0)


@pytest.mark.parametrize("norm", ["excerpt", "excerpt-band"])
def test_excerpt_normalisation_makes_the_model_level_invariant(norm):
    torch.manual_seed(0)
    model = AudioCNN(ModelConfig.small(input_norm=norm), n_mels=128, n_factors=4).eval()
    x = torch.cat([batch(), batch(1)], dim=2)  # 120 frames: the small model needs 103
    with torch.no_grad():
        assert torch.allclose(model(x), model(x + 15.0), atol=1e-4)
        if norm == "excerpt-band":  # a fixed EQ curve is removed too
            tilt = torch.linspace(10, -10, 128)[None, :, None]
            assert torch.allclose(model(x), model(x + tilt), atol=1e-4)
