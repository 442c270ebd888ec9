import dataclasses
import logging

import pytest

from sonicrec.config import AudioConfig, CFConfig, Config, IndexConfig, ModelConfig, TrainConfig, check_seed
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
        ("[index]\nseed = -1\n", "seed"),
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


def test_seeds_are_checked_in_one_place():
    assert check_seed(2**32 - 1) == 2**32 - 1
    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=rf"index.seed={seed}: must be in \[0, 2\*\*32\)"):
            IndexConfig(seed=seed)


def test_an_old_config_with_a_demo_section_loads_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sonicrec.config"):
        cfg = Config.from_toml("[cf]\nfactors = 16\n[demo]\nn_tracks = 300\nseed = 3\n")
    assert cfg.cf.factors == 16
    assert "[demo]" in caplog.text and "demo.toml" in caplog.text


def test_the_network_size_has_one_home_and_old_model_keys_move_there(caplog):
    assert not {"n_mels", "n_factors"} & set(Config().to_dict()["model"])
    old = "[audio]\nn_mels = 128\n[cf]\nfactors = 16\n[model]\nn_mels = 128\nn_factors = 16\ndropout = 0.3\n"
    with caplog.at_level(logging.WARNING, logger="sonicrec.config"):
        cfg = Config.from_toml(old)
    assert (cfg.audio.n_mels, cfg.cf.factors, cfg.model.dropout) == (128, 16, 0.3)
    assert not caplog.text  # they agree: nothing to say
    with caplog.at_level(logging.WARNING, logger="sonicrec.config"):
        cfg = Config.from_dict({"model": {"n_factors": 20}})  # a checkpoint's: the network has 20 outputs
    assert cfg.cf.factors == 20 and "n_factors" in caplog.text
