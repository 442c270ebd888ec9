import dataclasses

import pytest

from sonicrec.config import AudioConfig, CFConfig, Config, DemoConfig, ModelConfig, TrainConfig
from sonicrec.errors import ConfigError


def test_default_config_round_trips_through_toml():
    cfg = Config()
    assert Config.from_toml(cfg.to_toml()) == cfg


def test_changed_values_round_trip_through_a_file(tmp_path):
    cfg = Config(
        audio=AudioConfig(excerpt_offset=12.5, fmax=8000.0),
        cf=CFConfig(engine="spark", factors=50, alpha=10),
        model=ModelConfig(conv_channels=(8, 16, 16), dense_units=(32,)),
        train=TrainConfig(loss="wpe", crop_frames=512),
        demo=DemoConfig(n_tracks=50, n_users=40, n_plays=400, seed=7),
    )
    path = tmp_path / "config.toml"
    cfg.save(path)
    loaded = Config.load(path)
    assert loaded == cfg
    assert loaded.model.conv_channels == (8, 16, 16)
    assert isinstance(loaded.cf.alpha, float)


def test_partial_toml_keeps_defaults():
    cfg = Config.from_toml("[cf]\nfactors = 16\n")
    assert cfg.cf.factors == 16
    assert cfg.cf.alpha == CFConfig().alpha
    assert cfg.audio == AudioConfig()


@pytest.mark.parametrize(
    "text, words",
    [
        ("[cf]\nfactorz = 3\n", "factorz"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[cf]\nfactors = 'many'\n", "factors"),
        ("[cf]\nengine = 'mapreduce'\n", "engine"),
        ("[train]\nloss = 'l1'\n", "loss"),
        ("[demo]\nseed = -1\n", "seed"),
        ("[cf\n", "TOML"),
    ],
)
def test_bad_config_names_the_problem(text, words):
    with pytest.raises(ConfigError, match=words):
        Config.from_toml(text)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().cf.factors = 3  # type: ignore[misc]


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        Config.load(tmp_path / "absent.toml")
