"""Data-parallel training: 2 gloo processes under torchrun follow the single-process run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sonicrec.checkpoint import load_checkpoint
from sonicrec.config import AudioConfig, CFConfig, Config, ModelConfig, TrainConfig
from sonicrec.errors import ConfigError
from sonicrec.factors import Factors
from sonicrec.features import FeatureStoreWriter
from sonicrec.rundir import RunDir
from sonicrec.train import CropSampler, distributed_rank, train_run

# 2-s excerpts: 128 mel bands x 40 frames
AUDIO = AudioConfig(excerpt_seconds=2.0, n_frames=1 + 44100 // 1105)
# DDP equals one process only without dropout and per-process BatchNorm statistics (module docstring
# of sonicrec.train); random crops and the song order are shared through the sampler.
CF = CFConfig(factors=4)
MODEL = ModelConfig(conv_channels=(8, 8), pool_sizes=(2,), dense_units=(16,), dropout=0.0)
TRAIN = TrainConfig(batch_size=8, epochs=3, patience=10, learning_rate=0.05, crop_frames=32, num_workers=0,
                    device="cpu", seed=3)
# Measured: max abs weight difference 3e-8, loss relative difference < 1e-6 (float32 sums in
# another order: the gradient of a batch of 8 against the mean of two batches of 4).
WEIGHT_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_run(root, n_train: int = 20, n_valid: int = 5, seed: int = 0) -> RunDir:
    """A run directory with a feature store and factors: each song's bands encode its factors."""
    rng = np.random.default_rng(seed)
    run = RunDir(root)
    n = n_train + n_valid
    song_ids = np.array([f"s{i:02d}" for i in range(n)])
    song_factors = rng.standard_normal((n, CF.factors)).astype(np.float32)
    with FeatureStoreWriter(run.features, AUDIO, shard_size=8) as writer:
        for song, f in zip(song_ids, song_factors, strict=True):
            x = rng.normal(-40, 3, (AUDIO.n_mels, AUDIO.n_frames))
            x[: 4 * CF.factors] += 5 * np.repeat(f, 4)[:, None]
            writer.add(str(song), x.astype(np.float16))
    users = rng.standard_normal((6, CF.factors)).astype(np.float32)
    split = np.array(["train"] * n_train + ["valid"] * n_valid)
    Factors(np.array([f"u{i}" for i in range(6)]), song_ids, users, song_factors, split).save(run.factors)
    Config(audio=AUDIO, cf=CF, model=MODEL, train=TRAIN).save(run.config)
    return run


@pytest.mark.parametrize(("n_songs", "shuffle"), [(20, True), (21, True), (7, False)])
def test_process_shards_make_up_the_single_process_batches(n_songs, shuffle):
    single = list(CropSampler(n_songs, shuffle=shuffle, max_offset=9, seed=1))
    samplers = [CropSampler(n_songs, shuffle=shuffle, max_offset=9, seed=1, num_replicas=2, rank=r)
                for r in range(2)]
    shards = [list(s) for s in samplers]
    assert [len(s) for s in shards] == [len(s) for s in samplers]
    if shuffle:  # equal lengths; 4-song batches of each process interleave into 8-song batches
        assert len(shards[0]) == len(shards[1]) == -(-n_songs // 2)
        for b in range(0, len(shards[0]), 4):
            together = shards[0][b : b + 4] + shards[1][b : b + 4]
            assert sorted(together) == sorted((single + single)[2 * b : 2 * b + len(together)])
    else:  # no padding: every key once
        assert sorted(shards[0] + shards[1]) == single


def test_ddp_needs_torchrun_and_refuses_several_plain_processes(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    assert distributed_rank(False) == 0
    with pytest.raises(ConfigError, match="torchrun"):
        distributed_rank(True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--ddp"):
        distributed_rank(False)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    run = make_run(tmp_path / "run")
    single = train_run(run, Config.load(run.config), name="single", show_progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "sonicrec.cli", "--no-progress", "train", str(run.root), "--name", "ddp", "--ddp",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("best validation loss") == 1  # rank 0 alone reports

    one, two = load_checkpoint(single.checkpoint), load_checkpoint(run.checkpoint("ddp"))
    assert two["epoch"] == one["epoch"] == TRAIN.epochs and two["step"] == one["step"]
    worst = 0.0
    for key in ("train_loss", "valid_loss"):
        a = np.array([row[key] for row in one["history"]])
        b = np.array([row[key] for row in two["history"]])
        np.testing.assert_allclose(b, a, rtol=LOSS_TOLERANCE)
        worst = max(worst, float(np.max(np.abs(b - a) / np.abs(a))))
    assert one["history"][-1]["train_loss"] < one["history"][0]["train_loss"]  # it did learn
    assert set(two["model"]) == set(one["model"])  # saved without the DDP wrapper
    diff = max((two["model"][k].float() - one["model"][k].float()).abs().max().item() for k in one["model"])
    print(f"DDP vs single process: max abs weight difference {diff:.2e}, loss relative {worst:.2e}")
    assert diff < WEIGHT_TOLERANCE
