"""Spark batch jobs (local[2]): feature extraction and prediction equal the local path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from sonicrec.catalog import Catalog
from sonicrec.cli import main
from sonicrec.config import AudioConfig, CFConfig, Config, ModelConfig, TrainConfig
from sonicrec.features import FeatureStore, discover_tracks, ingest_run, register_tracks
from sonicrec.predict import Predictor, predict_run
from sonicrec.rundir import RunDir
from sonicrec.train import MSEObjective, fit

pytestmark = [
    pytest.mark.spark,
    pytest.mark.skipif(
        shutil.which("java") is None and not os.environ.get("JAVA_HOME"), reason="Java missing (Spark)"
    ),
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
pyspark = pytest.importorskip("pyspark")

AUDIO = AudioConfig(excerpt_seconds=2.0, n_frames=1 + 44100 // 1105)  # 2-s excerpts: 128 x 40
CF = CFConfig(factors=4)
MODEL = ModelConfig(conv_channels=(8, 8), pool_sizes=(2,), dense_units=(16,), dropout=0.0)
N_GOOD = 10


@pytest.fixture(scope="module")
def spark():
    from sonicrec.spark import session

    spark, created = session("local[2]", show_progress=False)
    yield spark
    if created:
        spark.stop()


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """Short wav and ogg files of chords (different lengths, rates and channels) and one bad file."""
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        rate = (22050, 44100, 16000)[i % 3]
        t = np.arange(int((1.5 + 0.5 * i) * rate)) / rate
        y = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 3000, 3)) / 4
        y = np.stack([y, 0.5 * y], axis=1) if i % 2 else y
        sf.write(folder / f"song{i:02d}.{'ogg' if i % 4 == 3 else 'wav'}", y.astype(np.float32), rate)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav file")
    return folder


def new_run(root: Path, audio_dir: Path) -> RunDir:
    run = RunDir(root)
    run.root.mkdir(parents=True)
    Config(audio=AUDIO, cf=CF, model=MODEL).save(run.config)
    with Catalog(run.catalog) as catalog:
        register_tracks(catalog, discover_tracks([audio_dir]))
    return run


def catalog_rows(run: RunDir) -> dict[str, tuple]:
    with Catalog(run.catalog) as catalog:
        return {t.track_id: (t.status, t.duration, t.meta.get("excerpt_offset"), t.error is None)
                for t in catalog.tracks()}


def test_spark_ingest_and_predict_equal_the_local_path(spark, audio_dir, tmp_path, capsys):
    from sonicrec.spark import predict_frame

    local, distributed = new_run(tmp_path / "local", audio_dir), new_run(tmp_path / "spark", audio_dir)
    ingest_run(local, workers=1, show_progress=False)
    argv = ["--no-progress", "ingest", "--out", str(distributed.root), "--engine", "spark",
            "--master", "local[2]", "--partitions", "3"]
    assert main(argv) == 0
    assert f"{N_GOOD} ok, 1 failed" in capsys.readouterr().out

    a, b = FeatureStore(local.features), FeatureStore(distributed.features)
    assert sorted(a.track_ids) == sorted(b.track_ids) and len(b) == N_GOOD
    ids = sorted(a.track_ids)
    diff = np.abs(a.get_many(ids).astype(np.float32) - b.get_many(ids).astype(np.float32)).max()
    assert diff == 0.0  # the same front end, the same float16 rounding
    assert catalog_rows(distributed) == catalog_rows(local)
    assert not list(distributed.features.glob(".spark-staging-*"))  # staging stores are cleaned up
    assert main(argv) == 0 and "0 ok, 0 failed" in capsys.readouterr().out  # nothing left to do

    # a tiny trained model, copied into both runs
    torch.manual_seed(0)
    targets = np.random.default_rng(1).standard_normal((N_GOOD, CF.factors))
    cfg = Config(audio=AUDIO, cf=CF, model=MODEL, train=TrainConfig(batch_size=4, epochs=1, num_workers=0))
    fit(a, a.track_ids, MSEObjective(targets), [], None, cfg, local.model / "cnn-mse", show_progress=False)
    shutil.copytree(local.model, distributed.model)

    local_npz = np.load(predict_run(local, "cnn-mse", show_progress=False))
    assert main(["--no-progress", "predict", str(distributed.root), "--catalog", "--engine", "spark",
                 "--batch-size", "3"]) == 0
    spark_npz = np.load(distributed.prediction("cnn-mse"))
    mine, theirs = np.argsort(spark_npz["song_ids"]), np.argsort(local_npz["song_ids"])
    assert list(spark_npz["song_ids"][mine]) == list(local_npz["song_ids"][theirs])
    factor_diff = np.abs(spark_npz["factors"][mine] - local_npz["factors"][theirs])
    assert factor_diff.max() < 1e-5
    table = pd.read_parquet(distributed.predictions / "cnn-mse.parquet")
    assert list(table.columns) == ["track_id"] + [f"factor_{j}" for j in range(CF.factors)]
    np.testing.assert_array_equal(table.set_index("track_id").loc[spark_npz["song_ids"]].to_numpy(),
                                  spark_npz["factors"])

    # from audio files, without a feature store: equal to Predictor.predict_files; bad files reported
    paths = sorted(audio_dir.iterdir())
    tracks = spark.createDataFrame(pd.DataFrame({"track_id": [p.name for p in paths],
                                                 "path": [str(p) for p in paths]})).repartition(2)
    out = predict_frame(tracks, local.checkpoint("cnn-mse"), batch_size=4).toPandas()
    out = out.set_index("track_id").loc[[p.name for p in paths]]
    assert out["error"].notna().tolist() == [p.name == "broken.wav" for p in paths]
    good = [p for p in paths if p.name != "broken.wav"]
    expected = Predictor.load(local.checkpoint("cnn-mse")).predict_files(good)
    audio_diff = np.abs(np.stack(out.loc[[p.name for p in good], "factors"]) - expected).max()
    print(f"spark vs local: features max abs diff {diff}, factors (store) {factor_diff.max():.2e}, "
          f"factors (audio) {audio_diff:.2e}")
    assert audio_diff < 1e-5
