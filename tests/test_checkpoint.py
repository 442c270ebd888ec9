"""The checkpoint file: a round trip, and clear errors for corrupt, foreign or incomplete files."""

import numpy as np
import pytest
import torch

from sonicrec.checkpoint import FORMAT, load_checkpoint, resume_checkpoint, save_checkpoint
from sonicrec.config import Config, TrainConfig
from sonicrec.errors import ConfigError, DataError


def _state() -> dict:
    config = Config()
    n_mels = config.audio.n_mels
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    return {
        "config": config.to_dict(), "loss": "mse", "target": "unit", "model": weights,
        "best_model": weights, "optimizer": {"state": {}, "param_groups": []},
        "input_norm": {"mean": torch.zeros(n_mels), "std": torch.ones(n_mels)},
        "epoch": 2, "step": 10, "best_valid": 0.5, "best_epoch": 1,
        "history": [{"epoch": 1, "valid_loss": 0.5}, {"epoch": 2, "valid_loss": 0.6}],
        "rng": {"torch": torch.get_rng_state()},
    }


def test_round_trip_keeps_every_value_and_writes_nothing_else(tmp_path):
    path = tmp_path / "model" / "checkpoint.pt"
    save_checkpoint(_state(), path)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    back = load_checkpoint(path)
    assert back["format"] == FORMAT and back["history"] == _state()["history"]
    assert torch.equal(back["best_model"]["w"], _state()["best_model"]["w"])
    assert back["config"] == Config().to_dict()
    assert resume_checkpoint(path, Config(), loss="mse")["step"] == 10


def test_resume_refuses_other_settings_and_starts_afresh_without_a_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    assert resume_checkpoint(path, Config(), loss="mse") is None
    save_checkpoint(_state(), path)
    other = Config().replace(train=TrainConfig(learning_rate=0.5))
    with pytest.raises(ConfigError, match="train.learning_rate"):
        resume_checkpoint(path, other, loss="mse")
    with pytest.raises(ConfigError, match="loss"):
        resume_checkpoint(path, Config(), loss="wpe")


@pytest.mark.parametrize("content", [b"", np.random.default_rng(0).bytes(5000), b"PK\x03\x04" + bytes(200)],
                         ids=["empty", "random-bytes", "zip-header"])
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "corrupt or not a sonicrec checkpoint" in message
    assert "\n" not in message and "weights_only" not in message
    torch.save({"format": "something-else"}, path)
    with pytest.raises(DataError, match="corrupt or not a sonicrec checkpoint"):
        load_checkpoint(path)


def test_missing_or_incomplete_checkpoints_are_named(tmp_path):
    with pytest.raises(DataError, match="no model checkpoint at .*train the model first"):
        load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "checkpoint.pt"
    state = {k: v for k, v in _state().items() if k != "best_model"}
    torch.save({"format": FORMAT, **state}, path)
    with pytest.raises(DataError, match=r"checkpoint.pt: not a complete sonicrec checkpoint \(no best_model"):
        load_checkpoint(path)
    with pytest.raises(DataError, match="no best_model"):
        save_checkpoint(state, tmp_path / "other.pt")
