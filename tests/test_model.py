import pytest
import torch

from sonicrec.config import AudioConfig, CFConfig, Config, ModelConfig
from sonicrec.errors import ConfigError, DataError
from sonicrec.model import AudioCNN, GlobalTemporalPooling

TINY = dict(conv_channels=(8, 8, 16, 16), dense_units=(16,))


def _model(seed: int = 0, *, n_factors: int = 40, **overrides) -> AudioCNN:
    torch.manual_seed(seed)
    return AudioCNN(ModelConfig(**overrides), n_mels=128, n_factors=n_factors).eval()


@pytest.mark.parametrize("frames", [599, 1000, 103])
@pytest.mark.parametrize("architecture", ["blog", "paper"])
def test_default_sizes_give_one_vector_per_excerpt(architecture, frames):
    model = _model(architecture=architecture)
    with torch.no_grad():
        out = model(torch.randn(2, 128, frames))
    assert out.shape == (2, 40)
    assert torch.isfinite(out).all()


def test_blog_model_layer_sizes():
    # The blog post's shapes: 599 frames -> 32 steps of 512 maps -> 1536 pooled features.
    model = _model()
    with torch.no_grad():
        h = model.conv(torch.randn(1, 128, 599))
    assert h.shape == (1, 512, 32)
    assert model.dense[0].in_features == 1536 and model.dense[0].out_features == 2048
    assert model.output.out_features == 40


def test_min_frames_is_the_shortest_input():
    cfg = ModelConfig(**TINY)
    model = _model(n_factors=5, **TINY)
    with torch.no_grad():
        assert model(torch.randn(1, 128, cfg.min_frames)).shape == (1, 5)
        with pytest.raises(DataError, match="at least 103"):
            model(torch.randn(1, 128, cfg.min_frames - 1))
    with pytest.raises(DataError, match="mel bands"):
        model(torch.randn(1, 64, 599))
    # a pooling size after the last convolution too (3 convolutions, 3 poolings)
    assert ModelConfig(conv_channels=(4, 4, 4), pool_sizes=(4, 2, 2)).min_frames == 55


def test_global_pooling_on_a_hand_made_input():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 0.0, 0.0]]])  # (1, 2 channels, 4 steps)
    pooled = GlobalTemporalPooling()(x)
    expected = torch.tensor([[2.5, -0.25, 4.0, 0.0, 30.0**0.5, 1.0]])  # means, maxima, L2 norms
    torch.testing.assert_close(pooled, expected)


def test_paper_variant_averages_its_windows():
    model = _model(architecture="paper", window_frames=120, window_hop=60, n_factors=5, **TINY)
    x = torch.randn(3, 128, 300)
    with torch.no_grad():
        whole = model(x)
        windows = [model(x[:, :, s : s + 120]) for s in (0, 60, 120, 180)]  # 1 + (300 - 120) // 60
    torch.testing.assert_close(whole, torch.stack(windows).mean(dim=0))


def test_input_norm_standardises_each_band():
    model = _model(n_factors=5, **TINY)
    x = torch.randn(2, 128, 150) * 3 + 7
    mean, std = torch.full((128,), 7.0), torch.linspace(1, 3, 128)
    with torch.no_grad():
        reference = model((x - mean[:, None]) / std[:, None])
        model.set_input_norm(mean, std)
        torch.testing.assert_close(model(x), reference)


def test_small_preset_is_smaller_and_overridable():
    small, full = ModelConfig.small(), ModelConfig()
    n_params = [sum(p.numel() for p in AudioCNN(c, n_mels=128, n_factors=40).parameters())
                for c in (small, full)]
    assert n_params[0] * 20 < n_params[1]
    assert ModelConfig.small(dropout=0.1).dropout == 0.1
    small_model = AudioCNN(ModelConfig.small(), n_mels=128, n_factors=7).eval()
    assert small_model(torch.randn(1, 128, 599)).shape == (1, 7)


def test_the_network_takes_its_bands_and_output_size_from_the_audio_and_cf_sections():
    audio = AudioConfig(sample_rate=8000, excerpt_seconds=2.0, hop_length=100, n_frames=161, n_mels=16)
    model = AudioCNN.for_config(Config(audio=audio, cf=CFConfig(factors=6), model=ModelConfig.small()))
    assert (model.n_mels, model.n_factors, model.output.out_features) == (16, 6, 6)
    assert model.conv[0].in_channels == 16
    with pytest.raises(ConfigError, match="n_factors=0"):
        AudioCNN(ModelConfig.small(), n_mels=16, n_factors=0)


def test_bad_model_configs_are_refused():
    with pytest.raises(ConfigError, match="pool"):
        ModelConfig(conv_channels=(8,), pool_sizes=(4, 2))
    with pytest.raises(ConfigError, match="receptive field"):
        ModelConfig(architecture="paper", window_frames=50)
    with pytest.raises(ConfigError, match="input_norm"):
        ModelConfig(input_norm="batch")


def test_pcen_is_the_first_order_agc_and_cancels_level_and_tilt():
    import numpy as np
    import scipy.signal

    from sonicrec.model import PCEN_TIME_FRAMES, pcen

    rng = np.random.default_rng(0)
    db = torch.tensor(rng.normal(-20.0, 10.0, (2, 3, 400)), dtype=torch.float32)
    out = pcen(db).numpy()
    # reference: the IIR smoother run exactly, started at the first frame's steady state
    energy = 10 ** (db.numpy().astype(np.float64) / 10)
    t2 = PCEN_TIME_FRAMES**2
    s = (np.sqrt(1 + 4 * t2) - 1) / (2 * t2)
    zi = scipy.signal.lfilter_zi([s], [1, s - 1]) * energy[..., :1]
    smooth, _ = scipy.signal.lfilter([s], [1, s - 1], energy, axis=-1, zi=zi)
    expected = (energy / (1e-6 + smooth) ** 0.98 + 2.0) ** 0.5 - 2.0**0.5
    assert out.shape == (2, 3, 400)
    np.testing.assert_allclose(out, expected, atol=0.02)
    # 20 dB louder and a static tilt of up to 15 dB across the bands barely move it (gain 0.98)
    tilt = torch.linspace(-15.0, 15.0, 3)[None, :, None]
    moved = pcen(db + 20.0 + tilt).numpy()
    assert np.abs(moved - out).mean() < 0.1 * np.abs(out).mean()
    plain = AudioCNN(ModelConfig.small(input_norm="pcen"), n_mels=3, n_factors=4).eval()
    assert plain(db).shape == (2, 4)
