import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sonicrec.catalog import Catalog, Track
from sonicrec.cli import main
from sonicrec.config import Config, IndexConfig
from sonicrec.errors import DataError, UnknownIdError
from sonicrec.factors import Factors, unit_rows
from sonicrec.index import voyager_available
from sonicrec.interactions import PlayMatrix
from sonicrec.io import atomic_save_npz
from sonicrec.recommend import Ranking, Recommender
from sonicrec.rundir import RunDir

K = 8
N_USERS, N_SONGS, N_NEW = 40, 60, 5


class FakePredictor:
    """Stands in for sonicrec.predict.Predictor: a file's factors are looked up by its name."""

    def __init__(self, factors_by_name: dict[str, np.ndarray]):
        self.factors_by_name = factors_by_name
        self.calls = 0

    def predict_files(self, paths):
        self.calls += 1
        return np.stack([self.factors_by_name[Path(p).name] for p in paths])


@pytest.fixture(scope="module")
def world():
    """Simulated factors (40 train, 10 valid, 10 test songs), predictions, plays."""
    rng = np.random.default_rng(0)
    song_ids = np.array([f"t{i:02d}" for i in range(N_SONGS)])
    split = np.array(["train"] * 40 + ["valid"] * 10 + ["test"] * 10)
    factors = Factors(
        user_ids=[f"u{i:02d}" for i in range(N_USERS)],
        song_ids=song_ids,
        user_factors=rng.standard_normal((N_USERS, K)),
        song_factors=rng.standard_normal((N_SONGS, K)) * rng.uniform(0.3, 3, (N_SONGS, 1)),
        split=split,
    )
    # predicted factors for every song (noisy copies, like a CNN) and for 5 new songs
    predicted_ids = np.concatenate([song_ids, [f"new{i}" for i in range(N_NEW)]])
    predicted = np.concatenate([factors.song_factors_unit + 0.3 * rng.standard_normal((N_SONGS, K)),
                                rng.standard_normal((N_NEW, K))]).astype(np.float32)
    # plays: each user played 8 songs, train and held-out alike
    plays = pd.DataFrame(
        [(u, s, int(rng.integers(1, 5))) for u in factors.user_ids
         for s in rng.choice(song_ids, 8, replace=False)],
        columns=["user_id", "track_id", "count"],
    )
    return factors, predicted_ids, predicted, plays


def _recommender(world, **kwargs) -> Recommender:
    factors, predicted_ids, predicted, plays = world
    return Recommender(factors, predicted_ids, predicted, PlayMatrix.from_frame(plays), **kwargs)


def _song_table(world):
    """Every rankable song with the vector the Recommender should use: (ids, (S, K) unit rows)."""
    factors, predicted_ids, predicted, _ = world
    train = factors.split == "train"
    cold = ~np.isin(predicted_ids, factors.song_ids[train])
    ids = np.concatenate([factors.song_ids[train], predicted_ids[cold]])
    return ids, np.concatenate([factors.song_factors_unit[train], unit_rows(predicted[cold])])


def _top(ids, scores, n, allowed=None):
    mask = np.ones(len(ids), bool) if allowed is None else allowed
    order = np.argsort(-np.where(mask, scores, -np.inf), kind="stable")[:n]
    return ids[order].tolist(), scores[order]


def test_recommend_matches_brute_force_over_warm_and_cold_songs(world):
    factors, _, _, plays = world
    rec = _recommender(world)
    ids, vectors = _song_table(world)
    for user in ["u00", "u07", "u31"]:
        x = factors.user_factors[factors.user_index([user])[0]]
        played_train = set(plays.track_id[plays.user_id == user]) & set(factors.songs("train"))
        allowed = ~np.isin(ids, list(played_train))
        expected_ids, expected_scores = _top(ids, vectors @ x, 12, allowed)
        got = rec.recommend(user, 12, raw=True)
        assert isinstance(got, Ranking)
        assert got.ids.tolist() == expected_ids
        np.testing.assert_allclose(got.scores, expected_scores, rtol=1e-5)
    assert any(rec.split_of(s) != "train" for s in rec.recommend("u00", 30).ids)  # cold songs compete


def test_exclude_played_is_honoured(world):
    factors, _, _, plays = world
    rec = _recommender(world)
    train = set(factors.songs("train"))
    for user in factors.user_ids[:10]:
        played_train = set(plays.track_id[plays.user_id == user]) & train
        assert not played_train & set(rec.recommend(user, 50).ids)
        everything = rec.recommend(user, 200, exclude_played=False)
        assert played_train <= set(everything.ids)
        assert len(everything.ids) == 40 + 20 + N_NEW
    warm_only = rec.recommend("u03", 100, include_cold=False)
    assert set(warm_only.ids) <= train and len(warm_only.ids) == 40 - len(
        set(plays.track_id[plays.user_id == "u03"]) & train)


def test_audience_matches_brute_force_and_leaves_out_listeners(world):
    factors, _, _, plays = world
    rec = _recommender(world)
    ids, vectors = _song_table(world)
    for song in ["t05", "t45", "new2"]:
        y = vectors[list(ids).index(song)]
        listeners = set(plays.user_id[plays.track_id == song]) if song in factors.songs("train") else set()
        allowed = ~np.isin(factors.user_ids, list(listeners))
        expected_ids, expected_scores = _top(factors.user_ids, factors.user_factors @ y, 7, allowed)
        got = rec.audience(song, 7, raw=True)
        assert got.ids.tolist() == expected_ids
        np.testing.assert_allclose(got.scores, expected_scores, rtol=1e-5)
    assert len(rec.audience("t05", 100, exclude_played=False).ids) == N_USERS


def test_similar_puts_the_query_first_then_cosine_order(world):
    rec = _recommender(world)
    ids, vectors = _song_table(world)
    for song in ["t02", "t55", "new0"]:
        y = vectors[list(ids).index(song)]
        expected_ids, expected_scores = _top(ids, vectors @ y, 6, ids != song)
        got = rec.similar(song, 7, raw=True)
        assert got.ids.tolist() == [song, *expected_ids]
        np.testing.assert_allclose(got.scores, [1.0, *expected_scores], rtol=1e-5)
    assert rec.similar("t02", 1).ids.tolist() == ["t02"]


def test_audio_file_query_equals_id_query_for_the_same_track(world, tmp_path):
    _, predicted_ids, predicted, _ = world
    audio = tmp_path / "t52.wav"  # a test-split track: placed by its predicted factors
    audio.write_bytes(b"fake audio")
    predictor = FakePredictor({"t52.wav": predicted[list(predicted_ids).index("t52")]})
    rec = _recommender(world, predictor=predictor)
    by_file, by_id = rec.similar(audio, 8, raw=True), rec.similar("t52", 8, raw=True)
    assert by_file.ids.tolist() == by_id.ids.tolist()
    np.testing.assert_allclose(by_file.scores, by_id.scores, rtol=1e-5)
    assert rec.similar(audio, 8).ids.tolist() == rec.similar("t52", 8).ids.tolist()  # hub-corrected
    assert rec.audience(str(audio), 5).ids.tolist() == rec.audience("t52", 5).ids.tolist()
    assert predictor.calls == 3


def test_vector_queries_answer_what_file_queries_answer(world, tmp_path):
    _, predicted_ids, predicted, _ = world
    vector = predicted[list(predicted_ids).index("t52")]
    audio = tmp_path / "t52.wav"
    audio.write_bytes(b"fake audio")
    rec = _recommender(world, predictor=FakePredictor({"t52.wav": vector}))
    for raw in (True, False):
        by_vector, by_file = rec.similar_to_vector(3 * vector, 8, raw=raw), rec.similar(audio, 8, raw=raw)
        assert by_vector.ids.tolist() == by_file.ids.tolist()  # only the direction counts
        np.testing.assert_allclose(by_vector.scores, by_file.scores, rtol=1e-5)
        assert (rec.audience_of_vector(vector, 5, raw=raw).ids.tolist()
                == rec.audience(audio, 5, exclude_played=False, raw=raw).ids.tolist())
    assert "t52" not in rec.similar_to_vector(vector, 8, exclude=["t52"]).ids
    for bad in (np.full(K, np.nan, np.float32), np.ones(K + 1, np.float32)):
        with pytest.raises(DataError, match="query vector"):
            rec.similar_to_vector(bad)


def test_unknown_ids_are_clear_errors(world, tmp_path):
    rec = _recommender(world, checkpoint=tmp_path / "model" / "checkpoint.pt")
    with pytest.raises(UnknownIdError, match="'nobody'"):
        rec.recommend("nobody")
    for call in (rec.similar, rec.audience):
        with pytest.raises(UnknownIdError, match="'no-such-song'"):
            call("no-such-song")
    audio = tmp_path / "song.ogg"
    audio.write_bytes(b"x")
    with pytest.raises(DataError, match="checkpoint"):  # a file needs a trained model
        rec.similar(audio)


def test_flag_outliers_finds_the_song_that_sounds_different(world):
    factors, predicted_ids, predicted, plays = world
    rng = np.random.default_rng(5)
    centre = rng.standard_normal(K)
    ids = [f"x{i}" for i in range(10)]
    pred = centre + 0.1 * rng.standard_normal((10, K))
    pred[6] = -centre  # the remix that sounds nothing like the rest
    rec = Recommender(factors, np.concatenate([predicted_ids, ids]),
                      np.concatenate([predicted, pred]).astype(np.float32), PlayMatrix.from_frame(plays))
    flags = rec.flag_outliers(Ranking(np.array(ids + ["unknown"]), np.zeros(11)))
    assert flags.flagged.tolist() == [i == 6 for i in range(11)]
    assert np.argmax(np.nan_to_num(flags.score, nan=-1)) == 6 and np.isnan(flags.distance[10])
    with pytest.raises(DataError, match="at least 3"):
        rec.flag_outliers(["x0", "x1"])


def _write_run(root: Path, world, config: Config | None = None) -> RunDir:
    factors, predicted_ids, predicted, plays = world
    run = RunDir(root)
    factors.save(run.factors)
    atomic_save_npz(run.prediction("cnn-mse"), song_ids=predicted_ids, factors=predicted)
    plays.to_parquet(run.plays)
    (config or Config()).save(run.config)
    with Catalog(run.catalog) as catalog:
        catalog.upsert(Track(s, title=f"Title {s}", artist="Palestrina", collection="palestrina",
                             status="ok", meta={"style": "renaissance polyphony"}) for s in predicted_ids)
    return run


def test_load_from_run_dir_and_cache_large_indexes(tmp_path, world):
    # exact_below=0: every index is an HNSW graph, cached in RUN/index
    cfg = Config(index=IndexConfig(exact_below=0, m=8, ef_construction=64, ef=200))
    run = _write_run(tmp_path / "run", world, cfg if voyager_available() else None)
    rec = Recommender.load(run.root, warmup_below=0)  # without the warm-up blend (test_warmup.py)
    reference = _recommender(world)  # exact search
    assert rec.recommend("u04", 10).ids.tolist() == reference.recommend("u04", 10).ids.tolist()
    assert rec.metadata(["t01", "missing"]) == [
        {"title": "Title t01", "artist": "Palestrina", "collection": "palestrina",
         "style": "renaissance polyphony"}, {}]
    assert [rec.split_of(s) for s in ("t01", "t41", "t59", "new1")] == ["train", "valid", "test", "new"]
    if voyager_available():
        cache = run.index / "cnn-mse"
        assert sorted(p.name for p in cache.iterdir()) == ["songs-cold.npz", "songs-train.npz", "users.npz"]
        stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
        Recommender.load(run.root, warmup_below=0)  # the second load reuses the cache
        assert stamps == {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    with pytest.raises(DataError, match="'cnn-wpe'.*cnn-mse"):
        Recommender.load(run.root, "cnn-wpe")


def test_cli_commands(tmp_path, world, capsys):
    run = _write_run(tmp_path / "run", world)
    assert main(["-q", "recommend", str(run.root), "--user", "u02", "--n", "5", "--json", "--outliers"]) == 0
    out = json.loads(capsys.readouterr().out)
    reference = Recommender.load(run.root).recommend("u02", 5)
    assert [r["track_id"] for r in out["results"]] == reference.ids.tolist()
    assert main(["-q", "recommend", str(run.root), "--user", "u02", "--n", "5", "--json",
                 "--blend-below", "0"]) == 0
    unblended = _recommender(world).recommend("u02", 5)
    assert [r["track_id"] for r in json.loads(capsys.readouterr().out)["results"]] == unblended.ids.tolist()
    first = out["results"][0]
    assert first["title"] == f"Title {first['track_id']}" and "outlier_score" in first
    assert main(["-q", "similar", str(run.root), "t07", "--n", "4"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[1].split()[2] == "t07" and "Palestrina" in text
    assert main(["-q", "audience", str(run.root), "new3", "--n", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3
    assert main(["-q", "similar", str(run.root), "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_audio_file_through_the_real_front_end_and_model(world, tmp_path):
    """A wav file placed on the fly equals its track placed from stored features (as predict_run does)."""
    torch = pytest.importorskip("torch")
    sf = pytest.importorskip("soundfile")
    from sonicrec.audio import file_to_logmel
    from sonicrec.config import AudioConfig, CFConfig, ModelConfig
    from sonicrec.model import AudioCNN
    from sonicrec.predict import Predictor

    cfg = Config(
        audio=AudioConfig(sample_rate=8000, excerpt_seconds=2.0, n_mels=16, n_fft=256, hop_length=128,
                          n_frames=126),
        cf=CFConfig(factors=K),
        model=ModelConfig(conv_channels=(4, 4), kernel_size=3, pool_sizes=(2,), dense_units=(8,),
                          dropout=0.0),
    )
    torch.manual_seed(0)
    predictor = Predictor(AudioCNN.for_config(cfg), cfg, target="unit", device=torch.device("cpu"))
    t = np.arange(3 * 8000) / 8000
    audio = tmp_path / "t52.wav"
    sf.write(audio, 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t)), 8000)
    stored = predictor.predict_logmel(file_to_logmel(audio, cfg.audio)[None].astype(np.float16))

    factors, predicted_ids, predicted, plays = world
    predicted = predicted.copy()
    predicted[list(predicted_ids).index("t52")] = stored[0]
    rec = Recommender(factors, predicted_ids, predicted, PlayMatrix.from_frame(plays), predictor=predictor)
    by_file, by_id = rec.similar(audio, 6, raw=True), rec.similar("t52", 6, raw=True)
    assert by_file.ids.tolist() == by_id.ids.tolist()
    np.testing.assert_allclose(by_file.scores, by_id.scores, rtol=1e-4, atol=1e-5)


def test_calibration_gives_cold_songs_their_share_when_predictions_crowd_the_mean(world):
    factors, predicted_ids, _, plays = world
    rng = np.random.default_rng(5)
    # Predictions that all lean towards one direction the users share: raw scores favour them.
    users = factors.user_factors.mean(axis=0)
    crowded = unit_rows(users + 0.15 * rng.standard_normal((len(predicted_ids), K)) * np.linalg.norm(users))
    shifted = Factors(factors.user_ids, factors.song_ids,
                      factors.user_factors + 3 * users, factors.song_factors, factors.split)
    rec = Recommender(shifted, predicted_ids, crowded, PlayMatrix.from_frame(plays))
    cold = set(rec.cold_ids.tolist())
    share = {c: np.mean([np.mean([i in cold for i in rec.recommend(u, 10, raw=not c).ids])
                         for u in shifted.user_ids]) for c in (False, True)}
    catalog_share = len(cold) / (len(cold) + len(rec.warm_ids))
    assert share[False] > catalog_share + 0.3  # raw scores: cold songs crowd the top 10
    assert abs(share[True] - catalog_share) < 0.2
    ranking = rec.recommend("u00", 10)
    assert np.all(np.diff(ranking.scores) <= 0)
    # within a group the order is the raw order
    raw = rec.recommend("u00", 60, raw=True)
    warm_raw = [i for i in raw.ids if i not in cold]
    warm_cal = [i for i in ranking.ids if i not in cold]
    assert warm_cal == warm_raw[: len(warm_cal)]


def test_calibrated_similar_keeps_the_query_first_and_mixes_the_groups(world):
    factors, predicted_ids, _, plays = world
    rng = np.random.default_rng(6)
    centre = rng.standard_normal(K)
    crowded = unit_rows(centre + 0.2 * np.linalg.norm(centre) * rng.standard_normal((len(predicted_ids), K)))
    rec = Recommender(factors, predicted_ids, crowded, PlayMatrix.from_frame(plays))
    cold = set(rec.cold_ids.tolist())
    query = rec.cold_ids[0]
    raw = rec.similar(query, 11, raw=True)
    calibrated = rec.similar(query, 11)
    assert raw.ids[0] == calibrated.ids[0] == query
    share = {name: np.mean([i in cold for i in r.ids[1:]]) for name, r in (("raw", raw), ("cal", calibrated))}
    assert share["raw"] == 1.0  # crowded predictions: every raw neighbour is another cold song
    assert share["cal"] < 0.8


def test_non_finite_factors_are_never_ranked(world, tmp_path):
    factors, predicted_ids, predicted, plays = world
    song = tmp_path / "odd.wav"
    song.write_bytes(b"anything: the fake predictor does not read it")
    rec = _recommender(world, predictor=FakePredictor({"odd.wav": np.full(K, np.nan, np.float32)}))
    for question in (rec.similar, rec.audience):
        with pytest.raises(DataError, match=r"odd\.wav: the model's factors for it are not finite"):
            question(str(song), 5)
    broken = factors.user_factors.copy()
    broken[3, 1] = np.inf
    with pytest.raises(DataError, match="NaN/infinite"):
        Factors(factors.user_ids, factors.song_ids, broken, factors.song_factors, factors.split)
