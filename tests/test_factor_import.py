"""Bring your own factors: every format reads back the same table, bad files are named, and a CNN
trains on factors that implicit and Spark ALS fitted to the same plays."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from sonicrec.cli import main
from sonicrec.errors import DataError
from sonicrec.evaluate import evaluate_run
from sonicrec.factor_import import import_factors_run, read_factor_table, read_id_list, read_split
from sonicrec.factors import Factors
from sonicrec.recommend import Recommender
from sonicrec.rundir import RunDir
from test_train import make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = np.array(["a", "b", "c", "d", "e"])
VECTORS = np.arange(15, dtype=np.float32).reshape(5, 3) / 7 - 1


def write_ids(path, ids) -> str:
    path.write_text("\n".join(ids) + "\n", encoding="utf-8")
    return path


def spark_style_folder(folder, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Parquet part files with integer ``id`` and array ``features``, as Spark writes ALS factors."""
    folder.mkdir()
    frame = pd.DataFrame({"id": ids, "features": [v.tolist() for v in vectors]})
    frame.iloc[:2].to_parquet(folder / "part-00000.snappy.parquet", index=False)
    frame.iloc[2:].to_parquet(folder / "part-00001.snappy.parquet", index=False)
    (folder / "_SUCCESS").write_bytes(b"")


def format_cases(tmp_path) -> dict[str, tuple]:
    """name -> (path, id list or None) of the same five vectors in every supported layout."""
    ids_file = write_ids(tmp_path / "ids.txt", IDS)
    np.save(tmp_path / "f.npy", VECTORS)
    np.savez(tmp_path / "named.npz", track_ids=IDS, vectors=VECTORS)
    np.savez(tmp_path / "implicit.npz", item_factors=VECTORS, user_factors=VECTORS[:2], factors=3)
    wide = pd.DataFrame(VECTORS, columns=["f0", "f1", "f2"]).assign(track_id=IDS)
    wide.to_parquet(tmp_path / "wide.parquet", index=False)
    wide.to_csv(tmp_path / "wide.csv", index=False)
    lists = pd.DataFrame({"id": IDS, "vector": [json.dumps(v.tolist()) for v in VECTORS]})
    lists.to_csv(tmp_path / "lists.csv", index=False)
    spark_style_folder(tmp_path / "itemFactors", np.arange(5)[::-1], VECTORS[::-1])
    return {
        "npy + ids": (tmp_path / "f.npy", ids_file),
        "npz": (tmp_path / "named.npz", None),
        "implicit": (tmp_path / "implicit.npz", ids_file),
        "parquet wide": (tmp_path / "wide.parquet", None),
        "csv wide": (tmp_path / "wide.csv", None),
        "csv lists": (tmp_path / "lists.csv", None),
        "spark folder": (tmp_path / "itemFactors", ids_file),
    }


def test_every_format_reads_the_same_table(tmp_path):
    for name, (path, ids_file) in format_cases(tmp_path).items():
        ids = read_id_list(ids_file) if ids_file else None
        table = read_factor_table(path, ids=ids)
        order = np.argsort(table.ids)
        assert table.ids[order].tolist() == IDS.tolist(), name
        np.testing.assert_allclose(table.vectors[order], VECTORS, rtol=1e-6, err_msg=name)
    users = read_factor_table(tmp_path / "implicit.npz", kind="users", ids=np.array(["u1", "u2"]))
    np.testing.assert_array_equal(users.vectors, VECTORS[:2])


def test_bad_files_are_named_with_the_row_or_id(tmp_path):
    ids_file = write_ids(tmp_path / "ids.txt", IDS)
    np.save(tmp_path / "nan.npy", np.where(np.arange(15).reshape(5, 3) == 7, np.nan, VECTORS))
    with pytest.raises(DataError, match=r"nan.npy, row 3 \(id 'c'\): NaN"):
        read_factor_table(tmp_path / "nan.npy", ids=read_id_list(ids_file))
    np.save(tmp_path / "short.npy", VECTORS[:4])
    with pytest.raises(DataError, match="short.npy has 4 rows but its id list has 5"):
        read_factor_table(tmp_path / "short.npy", ids=read_id_list(ids_file))
    with pytest.raises(DataError, match="numbers its rows: give the id list"):
        read_factor_table(tmp_path / "short.npy")
    pd.DataFrame({"id": ["a", "b", "a"], "x": [1.0, 2.0, 3.0]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match=r"dup.csv: id 'a' appears more than once \(rows 1 and 3\)"):
        read_factor_table(tmp_path / "dup.csv")
    pd.DataFrame({"id": ["a", "b"], "v": ["[1, 2]", "[1, oops]"]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(DataError, match=r"l.csv, row 2 \(id 'b'\): expected a list of 2 numbers"):
        read_factor_table(tmp_path / "l.csv")
    spark_style_folder(tmp_path / "far", np.array([0, 9]), VECTORS[:2])
    with pytest.raises(DataError, match="row 2: id 9 is not a position in the id list"):
        read_factor_table(tmp_path / "far", ids=read_id_list(ids_file))
    with pytest.raises(DataError, match="unknown factor format"):
        read_factor_table(ids_file)

    pd.DataFrame({"track_id": ["a", "zz"], "split": ["test", "test"]}).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(DataError, match=r"s.csv, row 3: song 'zz' has no imported factors"):
        read_split(tmp_path / "s.csv", IDS)
    pd.DataFrame({"track_id": ["a"], "split": ["held"]}).to_csv(tmp_path / "s2.csv", index=False)
    with pytest.raises(DataError, match=r"row 2: split 'held'"):
        read_split(tmp_path / "s2.csv", IDS)
    assert read_split(tmp_path / "s.csv", np.append(IDS, "zz")).tolist() == [
        "test", "train", "train", "train", "train", "test"]


def test_user_and_song_dimensions_must_agree(tmp_path):
    songs = read_factor_table(_npz(tmp_path / "s.npz", IDS, VECTORS))
    users = read_factor_table(_npz(tmp_path / "u.npz", np.array(["u"]), np.ones((1, 4))))
    with pytest.raises(DataError, match=r"s.npz has 3 factors per song but .*u.npz has 4"):
        import_factors_run(tmp_path / "run", songs, users=users)
    with pytest.raises(DataError, match="names the rows of a user factor file"):
        import_factors_run(tmp_path / "run", songs, user_ids=tmp_path / "users.txt")


def _npz(path, ids, vectors):
    np.savez(path, ids=ids, factors=vectors)
    return path


# --- on a run: train, predict, evaluate, recommend ------------------------------------------------


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A run with a feature store of 24 synthetic songs and play counts (no factors yet)."""
    run, cfg = make_run(tmp_path_factory.mktemp("ingested") / "run")
    run.factors.unlink()
    cfg = cfg.replace(cf=dataclasses.replace(cfg.cf, factors=4, valid_fraction=0.2, test_fraction=0.2))
    cfg.save(run.config)
    return run, cfg


def fresh_run(ingested, tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    shutil.copytree(ingested[0].root, run.root)
    return run


def plays_matrix(run: RunDir):
    """(U, S) counts of the run's plays with the user and song ids of its rows and columns."""
    plays = pd.read_parquet(run.plays)
    users, songs = sorted(plays["user_id"].unique()), sorted(plays["track_id"].unique())
    counts = sparse.csr_matrix((plays["count"].to_numpy(np.float32), (
        pd.Index(users).get_indexer(plays["user_id"]), pd.Index(songs).get_indexer(plays["track_id"]))),
        shape=(len(users), len(songs)))
    return counts, np.array(users), np.array(songs)


def implicit_factors(run: RunDir, out) -> list[str]:
    """Fit implicit's ALS on the run's plays, save the model as implicit does; CLI import options."""
    from implicit.cpu.als import AlternatingLeastSquares

    counts, users, songs = plays_matrix(run)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=4, iterations=3, random_state=0)
        model.fit(counts, show_progress=False)
    model.save(out / "als.npz")
    return ["--songs", str(out / "als.npz"), "--song-ids", str(write_ids(out / "songs.txt", songs)),
            "--users", str(out / "als.npz"), "--user-ids", str(write_ids(out / "users.txt", users))]


def spark_factors(run: RunDir, out) -> list[str]:
    """Fit Spark ALS on the run's plays (integer ids); write itemFactors/userFactors as Spark does."""
    from sonicrec.spark import session

    counts, users, songs = plays_matrix(run)
    coo = counts.tocoo()
    spark, created = session("local[1]", show_progress=False)
    try:
        from pyspark.ml.recommendation import ALS

        ratings = spark.createDataFrame(pd.DataFrame({
            "user": coo.row.astype(np.int32), "item": coo.col.astype(np.int32), "rating": coo.data}))
        model = ALS(rank=4, maxIter=3, implicitPrefs=True, seed=0, userCol="user", itemCol="item",
                    numUserBlocks=1, numItemBlocks=1).fit(ratings)
        model.itemFactors.write.parquet(str(out / "itemFactors"))
        model.userFactors.write.parquet(str(out / "userFactors"))
    finally:
        if created:
            spark.stop()
    return ["--songs", str(out / "itemFactors"), "--song-ids", str(write_ids(out / "songs.txt", songs)),
            "--users", str(out / "userFactors"), "--user-ids", str(write_ids(out / "users.txt", users))]


SPARK = pytest.mark.skipif(
    shutil.which("java") is None and not os.environ.get("JAVA_HOME"), reason="Java missing (Spark)")


@pytest.mark.parametrize("produce", [
    implicit_factors,
    pytest.param(spark_factors, marks=[pytest.mark.spark, SPARK,
                                       pytest.mark.filterwarnings("ignore::FutureWarning"),
                                       pytest.mark.filterwarnings("ignore::DeprecationWarning")]),
], ids=["implicit", "spark"])
def test_a_cnn_trains_on_imported_factors(ingested, tmp_path, capsys, produce):
    from sonicrec.predict import predict_run
    from sonicrec.train import train_run

    run = fresh_run(ingested, tmp_path)
    options = produce(run, tmp_path)
    assert main(["factors", "import", str(run.root), *options]) == 0
    assert "imported 24 songs (train 14, valid 5, test 5) and 20 users, 4 factors" in capsys.readouterr().out
    factors = Factors.load(run.factors)
    songs = read_factor_table(options[1], ids=read_id_list(options[3]))
    np.testing.assert_array_equal(factors.song_factors[factors.song_index(songs.ids)], songs.vectors)
    assert json.loads((run.root / "cf" / "import.json").read_text())["n_with_features"] == 24

    result = train_run(run, run.read_config(), name="cnn-mse", show_progress=False)
    assert (result.train_songs, result.valid_songs) == (14, 5) and np.isfinite(result.best_valid)
    predict_run(run, "cnn-mse", show_progress=False)
    results = evaluate_run(run, k=5, show_progress=False)
    by_model = {row["model"]: row for row in results["models"]}
    assert 0 < by_model["cnn-mse"]["auc"] < 1 and by_model["upper-bound"]["map@500"] > 0
    user = factors.user_ids[0]
    assert len(Recommender.load(run.root).recommend(user, 5).ids) == 5


def test_song_factors_alone_train_and_evaluate_what_they_can(ingested, tmp_path, capsys):
    from sonicrec.predict import predict_run
    from sonicrec.train import train_run

    run = fresh_run(ingested, tmp_path)
    rng = np.random.default_rng(1)
    ids = np.array([f"song{i:02d}" for i in range(24)] + ["not-ingested"])
    pd.DataFrame({"track_id": ids, "features": list(rng.standard_normal((25, 6)))}).to_parquet(
        tmp_path / "songs.parquet")
    held_out = {"track_id": ["song00", "song01", "song02", "song03"], "split": ["test"] * 3 + ["valid"]}
    pd.DataFrame(held_out).to_csv(tmp_path / "split.csv", index=False)
    assert main(["factors", "import", str(run.root), "--songs", str(tmp_path / "songs.parquet"),
                 "--split", str(tmp_path / "split.csv")]) == 0
    out = capsys.readouterr().out
    assert "24 songs have features, 1 do not (e.g. not-ingested)" in out and "and 0 users, 6 factors" in out
    factors = Factors.load(run.factors)
    assert not factors.has_users and factors.songs("test").tolist() == ["song00", "song01", "song02"]
    assert run.read_config().cf.factors == 6

    cfg = run.read_config()
    train_run(run, cfg, name="cnn-mse", show_progress=False)
    predict_run(run, "cnn-mse", show_progress=False)
    results = evaluate_run(run, show_progress=False)
    assert results["kind"] == "regression" and "need user factors" in results["not_computed"]
    rows = {row["model"]: row for row in results["models"]}
    assert rows["cnn-mse"]["n_songs"] == 3 and -1 <= rows["cnn-mse"]["cosine"] <= 1
    assert "Not computed" in (run.evaluation / "results.md").read_text()

    rec = Recommender.load(run.root)
    assert rec.similar("song00", 4).ids[0] == "song00"
    with pytest.raises(DataError, match="no user factors"):
        rec.audience("song00")
    with pytest.raises(DataError, match="wpe"):
        train_run(run, cfg.replace(train=dataclasses.replace(cfg.train, loss="wpe")), name="cnn-wpe",
                  show_progress=False)
