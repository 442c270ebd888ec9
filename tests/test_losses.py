import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sonicrec.checkpoint import load_checkpoint
from sonicrec.evaluate import ranking_metrics
from sonicrec.factors import Factors
from sonicrec.interactions import PlayMatrix
from sonicrec.losses import RankingObjective, SumObjective
from sonicrec.train import MSEObjective, fit
from test_train import N_FACTORS, MemoryStore, make_run, toy_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LISTENERS = [[0, 2], [1], [0, 1, 3], [2, 3]]  # song row -> the user rows who played it


def small_objective(kind: str, users_per_song=None, seed: int = 0) -> RankingObjective:
    rng = np.random.default_rng(3)
    indptr = np.cumsum([0] + [len(u) for u in LISTENERS])
    return RankingObjective(
        rng.standard_normal((4, 3)), indptr, np.concatenate(LISTENERS), kind=kind,
        users_per_song=users_per_song, seed=seed,
    )


def naive_loss(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Every (user, played song) pair, in loops; song i's loss sums its pairs / mean listeners."""
    mean_listeners = np.mean([len(u) for u in LISTENERS])
    loss = np.zeros(len(y))
    for i, users in enumerate(LISTENERS):
        for u in users:
            s = x[u] @ y.T
            negatives = [j for j in range(len(y)) if u not in LISTENERS[j]]
            if kind == "bpr":
                pair = np.mean([np.log1p(np.exp(-(s[i] - s[j]))) for j in negatives]) if negatives else 0.0
            else:
                pair = -s[i] + np.log(np.exp(s[i]) + sum(np.exp(s[j]) for j in negatives))
            loss[i] += pair / mean_listeners
    return loss


@pytest.mark.parametrize("kind", ["bpr", "softmax"])
def test_ranking_loss_matches_a_naive_reference(kind):
    objective = small_objective(kind)
    y = np.random.default_rng(4).standard_normal((4, 3))
    got = objective.per_song(torch.tensor(y, dtype=torch.float32), torch.arange(4)).numpy()
    np.testing.assert_allclose(got, naive_loss(kind, objective.user_factors.numpy().astype(np.float64), y),
                               rtol=1e-5)
    # a batch in another order gives each song the same loss
    order = torch.tensor([2, 0, 3, 1])
    shuffled = objective.per_song(torch.tensor(y[order.numpy()], dtype=torch.float32), order).numpy()
    np.testing.assert_allclose(shuffled, got[order.numpy()], rtol=1e-5)
    # a constant prediction ranks every song alike: ln 2 per pair with a negative (bpr)
    constant = objective.per_song(objective.best_constant().expand(4, -1), torch.arange(4)).numpy()
    if kind == "bpr":  # song 2's listeners 0, 1 and 3 each have a negative; the pairs weigh 1 / mean 2
        np.testing.assert_allclose(constant, np.log(2) * np.array([2, 1, 3, 2]) / 2, rtol=1e-6)


def test_draws_are_seeded_listeners_reseeded_each_epoch():
    objective = small_objective("bpr", users_per_song=64)
    rows = torch.tensor([0, 1, 2, 3])

    def draw(epoch: int) -> torch.Tensor:
        objective.set_epoch(epoch)
        return objective._pairs(rows)[1].reshape(4, 64)

    first = draw(0)
    for i, users in enumerate(LISTENERS):
        assert set(first[i].tolist()) == set(users)  # only listeners, all of them drawn
    assert torch.equal(draw(0), first) and not torch.equal(draw(1), first)
    # on average the draws weigh each (user, song) pair as the full sum over listeners does
    y = torch.tensor(np.random.default_rng(5).standard_normal((4, 3)), dtype=torch.float32)
    full = small_objective("bpr").per_song(y, rows)
    drawn = torch.stack([(objective.set_epoch(e), objective.per_song(y, rows))[1] for e in range(50)])
    np.testing.assert_allclose(drawn.mean(0).numpy(), full.numpy(), rtol=0.05)


def test_from_plays_keeps_songs_with_listeners_and_the_sum_adds_mse():
    factors = Factors(
        user_ids=["u0", "u1", "u2"], song_ids=["a", "b", "c"], user_factors=np.eye(3),
        song_factors=np.arange(9.0).reshape(3, 3) + 1, split=["train"] * 3,
    )
    plays = PlayMatrix.from_frame(pd.DataFrame(
        {"user_id": ["u0", "u1", "u1", "stranger", "u2"], "track_id": ["a", "a", "a", "b", "c"],
         "count": [1, 2, 3, 4, 5]}
    ))
    kept, objective = RankingObjective.from_plays(
        plays, factors, ["a", "b", "c"], kind="bpr", users_per_song=None
    )
    assert kept == ["a", "c"]  # "b" was played only by a user without factors
    assert objective.listeners.tolist() == [0, 1, 2] and objective.mean_listeners == 1.5
    mse = MSEObjective(factors.song_factors_unit[[0, 2]])
    both = SumObjective(mse, objective, weight=0.5)
    assert (both.name, both.target, len(both)) == ("mse+bpr", "unit", 2)
    y, rows = torch.randn(2, 3), torch.arange(2)
    expected = mse.per_song(y, rows) + 0.5 * objective.per_song(y, rows)
    assert torch.allclose(both.per_song(y, rows), expected)


def ranking_world(n_songs: int = 64, n_users: int = 40, seed: int = 0):
    """Songs of 4 kinds, each loud in its own quarter of the mel bands; every user likes one kind
    (user factor: that kind's axis plus noise) and played a random half of that kind's songs. The
    right ranking for a user is their kind's songs first."""
    rng = np.random.default_rng(seed)
    kinds = np.arange(n_songs) % N_FACTORS
    arrays = {}
    for i, kind in enumerate(kinds):
        x = rng.normal(-40.0, 3.0, (128, 160))
        x[32 * kind : 32 * (kind + 1)] += 12.0
        arrays[f"song{i:03d}"] = x
    taste = np.arange(n_users) % N_FACTORS
    user_factors = np.eye(N_FACTORS)[taste] + 0.1 * rng.standard_normal((n_users, N_FACTORS))
    plays = [
        (f"user{u}", f"song{i:03d}", 1)
        for u in range(n_users) for i in np.flatnonzero(kinds == taste[u]) if rng.random() < 0.5
    ]
    likes = sp.csr_matrix((taste[:, None] == kinds[None, :]).astype(np.float32))  # (users, songs)
    factors = Factors(
        [f"user{u}" for u in range(n_users)], list(arrays), user_factors,
        np.zeros((n_songs, N_FACTORS)), ["train"] * n_songs,
    )
    plays = PlayMatrix.from_frame(pd.DataFrame(plays, columns=["user_id", "track_id", "count"]))
    return MemoryStore(arrays), factors, plays, likes


def held_out_auc(predictor_path, store, factors, likes, held_out) -> float:
    from sonicrec.predict import Predictor

    _, y = Predictor.load(predictor_path).predict_store(store, held_out)
    rows = factors.song_index(held_out)
    return ranking_metrics(factors.user_factors, y, likes[:, rows]).summary()["auc"]


@pytest.mark.parametrize("loss", ["bpr", "softmax"])
def test_ranking_loss_learns_the_right_ranking(tmp_path, loss):
    store, factors, plays, likes = ranking_world()
    ids = store.track_ids
    train, valid, held_out = ids[:40], ids[40:48], ids[48:]
    train_ids, train_obj = RankingObjective.from_plays(plays, factors, train, kind=loss, users_per_song=4)
    valid_ids, valid_obj = RankingObjective.from_plays(
        plays, factors, valid, kind=loss, users_per_song=None, mean_listeners=train_obj.mean_listeners
    )
    cfg = toy_config(epochs=6, learning_rate=0.01, optimizer="adam")
    untrained = fit(store, train_ids, train_obj, valid_ids, valid_obj,
                    cfg.replace(train=dataclasses.replace(cfg.train, epochs=1, learning_rate=1e-9)),
                    tmp_path / "untrained", show_progress=False)
    trained = fit(store, train_ids, train_obj, valid_ids, valid_obj, cfg, tmp_path / "trained",
                  show_progress=False)
    assert trained.best_valid < 0.7 * trained.baseline_valid
    auc_untrained = held_out_auc(untrained.checkpoint, store, factors, likes, held_out)
    auc_trained = held_out_auc(trained.checkpoint, store, factors, likes, held_out)
    # songs never trained on: each user's kind first (chance 0.5), far better than the untrained net
    assert auc_trained > 0.9 and auc_trained > auc_untrained + 0.2, (auc_trained, auc_untrained)


def test_ranking_training_resumes_bit_for_bit(tmp_path):
    store, factors, plays, _ = ranking_world(n_songs=32, n_users=16)
    ids = store.track_ids

    def run(out, epochs, resume=False):
        train_ids, objective = RankingObjective.from_plays(plays, factors, ids[:24], kind="bpr",
                                                           users_per_song=2)
        valid_ids, valid = RankingObjective.from_plays(plays, factors, ids[24:], kind="bpr",
                                                       users_per_song=None)
        return fit(store, train_ids, objective, valid_ids, valid, toy_config(epochs=epochs), out,
                   resume=resume, show_progress=False)

    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 3, resume=True)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"][-1]["valid_loss"] == b["history"][-1]["valid_loss"]


def test_train_run_with_ranking_losses(tmp_path):
    from sonicrec.train import train_run

    run, cfg = make_run(tmp_path / "run")
    for loss, target in (("bpr", "raw"), ("mse+softmax", "unit")):
        result = train_run(run, cfg.replace(train=dataclasses.replace(cfg.train, loss=loss, rank_users=3)),
                           name=loss.replace("+", "-"), show_progress=False)
        assert result.loss == loss and (result.train_songs, result.valid_songs) == (16, 4)
        assert math.isfinite(result.best_valid)
        assert load_checkpoint(result.checkpoint)["target"] == target
