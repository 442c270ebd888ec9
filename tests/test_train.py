import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sonicrec.checkpoint import load_checkpoint
from sonicrec.config import CFConfig, Config, ModelConfig, TrainConfig
from sonicrec.errors import ConfigError, DataError, TrainingError
from sonicrec.factors import Factors, unit_rows
from sonicrec.features import MemoryStore
from sonicrec.interactions import PlayMatrix
from sonicrec.predict import Predictor
from sonicrec.train import MSEObjective, WPEObjective, band_statistics, fit

N_FACTORS = 4
N_FRAMES = 160


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_world(n_songs: int = 48, seed: int = 0):
    """Songs of 4 kinds, each loud in its own quarter of the mel bands; the target is its kind's
    direction in factor space (plus noise), so features determine targets."""
    rng = np.random.default_rng(seed)
    kinds = np.arange(n_songs) % N_FACTORS
    directions = np.eye(N_FACTORS) + 0.1 * rng.standard_normal((N_FACTORS, N_FACTORS))
    arrays, targets = {}, []
    for i, kind in enumerate(kinds):
        x = rng.normal(-40.0, 3.0, (128, N_FRAMES))
        x[32 * kind : 32 * (kind + 1)] += 12.0
        arrays[f"song{i:03d}"] = x
        targets.append(directions[kind] + 0.05 * rng.standard_normal(N_FACTORS))
    return MemoryStore(arrays), unit_rows(np.array(targets))


def toy_config(**train) -> Config:
    model = ModelConfig.small(conv_channels=(16, 16, 16, 16), dense_units=(32,))
    settings = dict(batch_size=8, epochs=4, patience=10, num_workers=0, learning_rate=0.02, crop_frames=128)
    return Config(cf=CFConfig(factors=N_FACTORS), model=model, train=TrainConfig(**{**settings, **train}))


def fit_toy(tmp_path, cfg: Config, store=None, targets=None, **kwargs):
    if store is None:
        store, targets = toy_world()
    ids = store.track_ids
    return fit(
        store, ids[:32], MSEObjective(targets[:32]), ids[32:], MSEObjective(targets[32:]), cfg, tmp_path,
        show_progress=False, **kwargs,
    )


def test_training_learns_a_learnable_target(tmp_path):
    result = fit_toy(tmp_path, toy_config(epochs=8, num_workers=1))
    metrics = pd.read_csv(result.metrics)
    assert list(metrics.epoch) == list(range(1, 9))
    assert metrics.train_loss.iloc[-1] < 0.5 * metrics.train_loss.iloc[0]
    assert result.best_valid < 0.5 * result.baseline_valid  # clearly beats the mean target
    assert 0 <= result.data_wait < 1 and result.samples_per_s > 0


def test_resume_continues_bit_for_bit(tmp_path):
    straight = fit_toy(tmp_path / "a", toy_config(epochs=3))
    fit_toy(tmp_path / "b", toy_config(epochs=1))
    resumed = fit_toy(tmp_path / "b", toy_config(epochs=3), resume=True)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert b["epoch"] == 3 and b["step"] == a["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"][-1]["valid_loss"] == b["history"][-1]["valid_loss"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_resume_refuses_other_settings(tmp_path):
    fit_toy(tmp_path, toy_config(epochs=1))
    with pytest.raises(ConfigError, match="train.learning_rate"):
        fit_toy(tmp_path, toy_config(epochs=2, learning_rate=0.1), resume=True)


def test_a_plateau_cuts_the_learning_rate_before_it_stops(tmp_path):
    store, targets = toy_world()
    noise = np.random.default_rng(5).standard_normal(targets.shape)  # validation cannot improve for long
    targets = np.concatenate([targets[:32], unit_rows(noise[32:])])
    cfg = toy_config(epochs=12, patience=1)
    stopped = fit_toy(tmp_path / "a", cfg, store, targets)
    assert stopped.epochs < 12  # the plateau ends training without decays
    with_decay = cfg.replace(train=dataclasses.replace(cfg.train, lr_decays=1))
    decayed = fit_toy(tmp_path / "b", with_decay, store, targets)
    lrs = pd.read_csv(decayed.metrics).lr.to_numpy()
    assert decayed.epochs > stopped.epochs
    assert set(np.round(lrs, 6)) == {0.02, 0.002}  # cut once, by lr_decay_factor
    assert np.all(np.diff(lrs) <= 0)
    assert load_checkpoint(decayed.checkpoint)["lr_decays_done"] == 1


def test_the_paper_variant_trains_on_windows(tmp_path):
    cfg = toy_config(epochs=1, crop_frames=None)
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, architecture="paper", window_frames=110))
    result = fit_toy(tmp_path, cfg)
    assert math.isfinite(result.best_valid)


def test_exploding_loss_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match="lower train.learning_rate"):
        fit_toy(tmp_path, toy_config(learning_rate=1e12, epochs=2))


def test_bad_inputs_are_refused(tmp_path):
    store, targets = toy_world()
    ids = store.track_ids
    with pytest.raises(TrainingError, match="only 3 training song"):
        fit(store, ids[:3], MSEObjective(targets[:3]), [], None, toy_config(), tmp_path, show_progress=False)
    store.get(ids[5])[7, 9] = np.nan
    with pytest.raises(DataError, match="song005"):
        fit_toy(tmp_path, toy_config(), store, targets)


def test_band_statistics():
    store, _ = toy_world(8)
    mean, std = band_statistics(store, store.track_ids, chunk=3)
    x = store.get_many(store.track_ids).astype(np.float64)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, x.std(axis=(0, 2)), rtol=1e-4)


def test_wpe_matches_the_wmf_objective_with_users_fixed():
    rng = np.random.default_rng(1)
    n_users, k = 30, 3
    songs = ["a", "b", "c", "silent"]
    factors = Factors(
        user_ids=[f"u{i}" for i in range(n_users)], song_ids=songs,
        user_factors=rng.standard_normal((n_users, k)), song_factors=rng.standard_normal((4, k)),
        split=["train"] * 4,
    )
    plays = pd.DataFrame(
        [(f"u{u}", s, int(rng.integers(1, 20))) for s in "abc" for u in rng.choice(n_users, 8, replace=False)]
        + [("stranger", "a", 3)],  # a user without factors is left out
        columns=["user_id", "track_id", "count"],
    )
    cf = CFConfig(alpha=2.0, epsilon=1.0, regularization=0.1)
    kept, objective = WPEObjective.from_plays(PlayMatrix.from_frame(plays), factors, songs, cf)
    assert kept == ["a", "b", "c"]  # the song nobody played is skipped
    y = rng.standard_normal((3, k))
    got = objective.per_song(torch.tensor(y, dtype=torch.float32), torch.arange(3)).numpy() * objective.scale
    x = factors.user_factors.astype(np.float64)
    for row, song in enumerate(kept):
        p, c = np.zeros(n_users), np.ones(n_users)
        for user, count in plays[(plays.track_id == song) & (plays.user_id != "stranger")][
            ["user_id", "count"]
        ].itertuples(index=False):
            p[int(user[1:])] = 1
            c[int(user[1:])] = 1 + 2.0 * np.log1p(count / 1.0)
        naive = (c * (p - x @ y[row]) ** 2).sum() + 0.1 * y[row] @ y[row]
        assert got[row] == pytest.approx(naive, rel=1e-4)
    # the best constant minimises the summed loss
    best = objective.best_constant()
    total = lambda v: objective.per_song(v.expand(3, -1), torch.arange(3)).sum()  # noqa: E731
    assert total(best) < total(best + 0.01) and total(best) < total(best - 0.01)


def test_predictor_reproduces_the_trained_model(tmp_path):
    store, targets = toy_world()
    result = fit_toy(tmp_path, toy_config(epochs=2), store, targets)
    predictor = Predictor.load(result.checkpoint)
    ids, predicted = predictor.predict_store(store, batch_size=5)
    assert list(ids) == store.track_ids and predicted.shape == (48, N_FACTORS)
    state = load_checkpoint(result.checkpoint)
    assert predictor.model.band_mean.tolist() == state["input_norm"]["mean"].tolist()
    # the same numbers from float32 input (rounded to float16 inside) and in other batch sizes
    again = predictor.predict_logmel(store.get_many(ids[:7]).astype(np.float32), batch_size=3)
    np.testing.assert_allclose(again, predicted[:7], rtol=1e-5, atol=1e-6)


# --- on a run directory: the real feature store, front end and factors file ---------------------


def make_run(root, n_songs: int = 24, seed: int = 0):
    """A tiny run: synthetic tones (each song a kind of pitch) ingested into a real feature store,
    random factors with a train/valid/test split, and play counts (for WPE)."""
    import soundfile

    from sonicrec.catalog import Catalog, Track
    from sonicrec.config import AudioConfig
    from sonicrec.features import ingest_run
    from sonicrec.rundir import RunDir

    run = RunDir(root)
    audio = AudioConfig(excerpt_seconds=6.0, n_frames=120)
    rng = np.random.default_rng(seed)
    t = np.arange(int(6.5 * 22050)) / 22050
    tracks = []
    for i in range(n_songs):
        path = run.audio / f"song{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        y = 0.3 * np.sin(2 * np.pi * 110 * 2 ** (i % 4) * t) + 0.01 * rng.standard_normal(t.size)
        soundfile.write(path, y.astype(np.float32), 22050)
        tracks.append(Track(f"song{i:02d}", path=str(path)))
    with Catalog(run.catalog) as catalog:
        catalog.upsert(tracks)
    ingest_run(run, audio, workers=1, show_progress=False)

    ids = [t.track_id for t in tracks]
    users = [f"user{u}" for u in range(20)]
    split = ["valid" if i % 6 == 0 else "test" if i % 6 == 1 else "train" for i in range(n_songs)]
    Factors(users, ids, rng.standard_normal((20, N_FACTORS)), rng.standard_normal((n_songs, N_FACTORS)),
            split).save(run.factors)
    plays = [(u, s, int(rng.integers(1, 9))) for s in ids for u in rng.choice(users, 5, replace=False)]
    pd.DataFrame(plays, columns=["user_id", "track_id", "count"]).to_parquet(run.plays)
    cfg = toy_config(epochs=2, batch_size=4, crop_frames=110)
    return run, cfg.replace(audio=audio)


def test_train_and_predict_a_run(tmp_path):
    from sonicrec.io import load_npz
    from sonicrec.predict import predict_run
    from sonicrec.train import train_run

    run, cfg = make_run(tmp_path / "run")
    for loss in ("mse", "wpe"):
        loss_cfg = cfg.replace(train=dataclasses.replace(cfg.train, loss=loss))
        result = train_run(run, loss_cfg, name=f"cnn-{loss}", show_progress=False)
        assert (result.train_songs, result.valid_songs) == (16, 4)
        assert pd.read_csv(run.model / f"cnn-{loss}" / "metrics.csv").shape[0] == 2
        written = load_npz(predict_run(run, f"cnn-{loss}", show_progress=False))
        assert written["song_ids"].tolist() == [f"song{i:02d}" for i in range(24)]
        assert written["factors"].shape == (24, N_FACTORS) and written["factors"].dtype == np.float32

    # predicting from the audio files gives exactly what predicting from their stored features gives
    from sonicrec.features import FeatureStore

    predictor = Predictor.load(run.checkpoint("cnn-wpe"))
    assert predictor.target == "raw" and predictor.config.audio == cfg.audio
    from_files = predictor.predict_files([run.audio / "song03.wav", run.audio / "song07.wav"])
    stored = FeatureStore(run.features).get_many(["song03", "song07"])
    np.testing.assert_array_equal(from_files, predictor.predict_logmel(stored))
    # and, up to float rounding in other batch sizes, what predict_run wrote
    np.testing.assert_allclose(from_files, written["factors"][[3, 7]], rtol=1e-5, atol=1e-6)

    with pytest.raises(ConfigError, match="n_factors"):
        train_run(run, cfg.replace(cf=dataclasses.replace(cfg.cf, factors=7)), name="x")
    with pytest.raises(ConfigError, match="model name"):
        train_run(run, cfg, name="../escape")


# --- hardening (issue 15): corrupt checkpoints, non-finite values, the predict command -------------


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A trained toy model: (checkpoint path, its store)."""
    store, targets = toy_world()
    result = fit_toy(tmp_path_factory.mktemp("toy"), toy_config(epochs=1), store, targets)
    return result.checkpoint, store


def test_non_finite_inputs_and_outputs_are_never_returned(toy_checkpoint):
    checkpoint, store = toy_checkpoint
    predictor = Predictor.load(checkpoint)
    ids = store.track_ids[:6]
    x = store.get_many(ids).astype(np.float32)
    x[2, 5, 7] = np.inf
    with pytest.raises(DataError, match=r"spectrogram\(s\) \[2\] of the batch are not finite"):
        predictor.predict_logmel(x)
    broken = MemoryStore({t: x[i] for i, t in enumerate(ids)})
    kept, factors = predictor.predict_store(broken, batch_size=4)
    assert kept.tolist() == ids[:2] + ids[3:] and np.isfinite(factors).all()
    expected = predictor.predict_logmel(np.delete(x, 2, axis=0))
    np.testing.assert_allclose(factors, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        next(predictor.model.parameters()).fill_(np.nan)
    with pytest.raises(DataError, match="non-finite factors"):
        predictor.predict_logmel(np.delete(x, 2, axis=0))


def _toy_run(root, store) -> "RunDir":  # noqa: F821
    from sonicrec.config import AudioConfig
    from sonicrec.features import FeatureStoreWriter
    from sonicrec.rundir import RunDir

    run = RunDir(root)
    cfg = AudioConfig(excerpt_seconds=(N_FRAMES - 1) * 1105 / 22050, n_frames=N_FRAMES)
    with FeatureStoreWriter(run.features, cfg) as writer:
        for track_id in store.track_ids[:10]:
            writer.add(track_id, store.get(track_id))
    return run


def test_predict_catalog_uses_the_given_checkpoint_and_batch_size(tmp_path, toy_checkpoint, monkeypatch):
    from sonicrec.cli import main
    from sonicrec.io import load_npz

    checkpoint, store = toy_checkpoint
    run = _toy_run(tmp_path / "run", store)
    sizes = []
    original = Predictor.embed_store
    monkeypatch.setattr(Predictor, "embed_store",
                        lambda self, *a, **kw: sizes.append(kw["batch_size"]) or original(self, *a, **kw))
    argv = ["--no-progress", "predict", str(run.root), "--catalog", "--checkpoint", str(checkpoint),
            "--name", "toy", "--batch-size", "3"]
    assert main(argv) == 0
    written = load_npz(run.prediction("toy"))
    assert sizes == [3] and written["song_ids"].tolist() == store.track_ids[:10]
    expected = Predictor.load(checkpoint).predict_logmel(store.get_many(store.track_ids[:10]))
    np.testing.assert_allclose(written["factors"], expected, rtol=1e-5, atol=1e-6)


def test_predict_files_names_clashing_stems_apart_and_reads_manifests(tmp_path):
    from sonicrec.predict import audio_inputs

    for folder in ("a", "b", "c/a"):
        (tmp_path / folder).mkdir(parents=True)
    manifest = tmp_path / "m.csv"
    manifest.write_text("track_id,path\nmine,a/snow.ogg\nsnow,b/snow.ogg\n")
    inputs = audio_inputs([tmp_path / "a" / "snow.ogg", tmp_path / "b" / "snow.ogg", manifest,
                           tmp_path / "c" / "a" / "snow.ogg", tmp_path / "rain.ogg", tmp_path / "rain.ogg"])
    ids = [track_id for track_id, _ in inputs]
    assert ids == [f"{tmp_path.name}/a/snow", "b/snow", "mine", "snow", "c/a/snow", "rain", "rain#2"]
    assert inputs[2][1] == (tmp_path / "a" / "snow.ogg").resolve()
    with pytest.raises(DataError, match="'x' is given twice"):
        (tmp_path / "twice.csv").write_text("track_id,path\nx,a.ogg\nx,b.ogg\n")
        audio_inputs([tmp_path / "twice.csv"])


def test_predict_files_records_failures_and_goes_on(tmp_path, toy_checkpoint, capsys):
    import soundfile

    from sonicrec.cli import main
    from sonicrec.io import load_npz

    checkpoint, _ = toy_checkpoint
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)).astype(np.float32)
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        soundfile.write(tmp_path / folder / "snow.wav", wave, 22050)
    (tmp_path / "bad.mp3").write_bytes(b"\x00" * 500)
    out = tmp_path / "out.npz"
    files = [str(tmp_path / "x" / "snow.wav"), str(tmp_path / "bad.mp3"), str(tmp_path / "y" / "snow.wav")]
    run = str(tmp_path / "run")
    # options before, between and after the files
    argv = ["--no-progress", "predict", run, "--checkpoint", str(checkpoint), files[0], "--out", str(out),
            *files[1:], "--workers", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("failed: bad\t") == 1 and "(2 tracks x 4 factors, 1 failed)" in printed
    written = load_npz(out)
    assert written["song_ids"].tolist() == ["x/snow", "y/snow"]
    assert written["paths"].tolist() == [files[0], files[2]]
    expected = Predictor.load(checkpoint).predict_files([files[0], files[2]])
    np.testing.assert_array_equal(written["factors"], expected)
    out.unlink()
    assert main([*argv, "--strict"]) == 2
    assert "bad.mp3" in capsys.readouterr().err and not out.exists()
