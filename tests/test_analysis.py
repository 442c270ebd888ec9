import json
import re
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from sonicrec.analysis import (
    activation_playlists,
    build_report,
    concentration,
    excerpt_offsets,
    filter_activations,
    first_layer_filters,
    latent_map,
    peak_seconds,
)
from sonicrec.catalog import Catalog, Track
from sonicrec.cli import main
from sonicrec.config import AudioConfig, CFConfig, Config, ModelConfig, TrainConfig
from sonicrec.factors import Factors
from sonicrec.features import FeatureStoreWriter
from sonicrec.model import AudioCNN
from sonicrec.plotting import filter_mosaic, plot_filters
from sonicrec.report_page import render_report_page
from sonicrec.rundir import RunDir
from sonicrec.train import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_filter_mosaic_places_scaled_filters_between_gaps(tmp_path):
    filters = np.random.default_rng(0).standard_normal((10, 16, 4)).astype(np.float32)
    mosaic = filter_mosaic(filters, columns=4)
    assert mosaic.shape == (3 * 16 + 2, 4 * 4 + 3)  # 3 rows of 4 filters, one-pixel gaps
    assert np.isnan(mosaic[:, 4]).all() and np.isnan(mosaic[16, :]).all()
    # filter 5 sits in row 1, column 1, highest band on top, scaled by its largest |weight|
    block = mosaic[17:33, 5:9]
    np.testing.assert_allclose(block, filters[5][::-1] / np.abs(filters[5]).max(), rtol=1e-6)
    assert np.nanmax(np.abs(mosaic)) == pytest.approx(1.0)
    assert np.isnan(mosaic[34:, 15:]).all()  # the two unused slots of the last row stay empty

    path = plot_filters(filters, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_layer_filters_shape():
    cfg = ModelConfig(conv_channels=(8, 6), pool_sizes=(2,), dense_units=(5,))
    model = AudioCNN(cfg, n_mels=16, n_factors=3)
    assert first_layer_filters(model).shape == (8, 16, 4)


def band_detector() -> AudioCNN:
    """Filter k sums band k over 4 frames; the input normalisation is x -> (x - 1) / 2."""
    cfg = ModelConfig(conv_channels=(8, 4), pool_sizes=(2,), dense_units=(5,))
    model = AudioCNN(cfg, n_mels=8, n_factors=2).eval()
    with torch.no_grad():
        conv = model.conv[0]
        conv.weight.zero_()
        conv.bias.zero_()
        for k in range(8):
            conv.weight[k, k, :] = 1.0
    model.set_input_norm(torch.ones(8), 2 * torch.ones(8))
    return model


def test_activation_playlists_rank_by_max_and_mean_with_peak_times():
    frames = 64
    raw = np.zeros((5, 8, frames), np.float32)
    raw[0, 0, 10:14] = 5.0  # a burst in band 0: highest max (20), low mean
    raw[1, 0, :] = 2.0  # steady band 0: max 8, highest mean
    raw[2, 0, 40:44] = 3.0  # a weaker burst in band 0, later: max 12
    raw[3, 3, 30:34] = 9.0  # band 3 only
    raw[4, 1, :] = 1.0
    x = 2 * raw + 1  # what the model normalises back to ``raw``
    acts = filter_activations(band_detector(), x)
    assert acts.max.shape == acts.mean.shape == acts.argmax.shape == (5, 8)
    np.testing.assert_allclose(acts.max[:, 0], [20, 8, 12, 0, 0], atol=1e-4)
    assert acts.argmax[0, 0] == 10 and acts.argmax[2, 0] == 40 and acts.argmax[3, 3] == 30

    ids = [f"t{i}" for i in range(5)]
    peaks = peak_seconds(acts.argmax, kernel_size=4, hop_length=100, sample_rate=1000, offset=2.0)
    by_max = activation_playlists(acts.max, ids, [0, 3], n=3, peaks=peaks)
    assert by_max[0].track_ids == ["t0", "t2", "t1"]
    assert by_max[0].peaks[:2] == pytest.approx([2 + 11.5 * 0.1, 2 + 41.5 * 0.1])
    assert by_max[1].track_ids[0] == "t3" and by_max[1].peaks[0] == pytest.approx(2 + 31.5 * 0.1)
    by_mean = activation_playlists(acts.mean, ids, [0], n=3, kind="filter-mean")
    assert by_mean[0].track_ids == ["t1", "t0", "t2"]
    assert by_mean[0].kind == "filter-mean" and by_mean[0].peaks is None


def test_filter_activations_are_what_the_second_layer_sees():
    """Input normalisation, convolution, batch norm and ReLU, as in the model's own forward."""
    torch.manual_seed(0)
    cfg = ModelConfig(conv_channels=(6, 5), pool_sizes=(2,), dense_units=(4,), batch_norm=True)
    model = AudioCNN(cfg, n_mels=12, n_factors=3)
    model.train()
    x = torch.randn(4, 12, 40) * 3 + 2
    with torch.no_grad():
        model(x)  # non-trivial running statistics
    model.eval()
    model.set_input_norm(torch.full((12,), 2.0), torch.full((12,), 3.0))
    seen = []
    hook = model.conv[2].register_forward_hook(lambda _m, _i, out: seen.append(out))  # the first ReLU
    with torch.no_grad():
        model(x)
    hook.remove()
    acts = filter_activations(model, x.numpy())
    np.testing.assert_allclose(acts.max, seen[0].amax(dim=2).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts.mean, seen[0].mean(dim=2).numpy(), rtol=1e-5, atol=1e-6)


def test_latent_map_shape_and_determinism(monkeypatch):
    factors = np.random.default_rng(1).standard_normal((60, 6))
    a = latent_map(factors, seed=3)
    assert a.shape == (60, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, latent_map(factors, seed=3))
    assert not np.allclose(a, latent_map(factors, seed=4))

    monkeypatch.setitem(sys.modules, "openTSNE", None)  # scikit-learn's TSNE instead
    b = latent_map(factors[:30], seed=3)
    assert b.shape == (30, 2)
    np.testing.assert_array_equal(b, latent_map(factors[:30], seed=3))


def test_concentration_of_a_one_label_playlist():
    labels = pd.Series(["a"] * 20 + ["b"] * 30 + ["c"] * 50, index=[f"t{i}" for i in range(100)])
    stats = concentration([f"t{i}" for i in range(10)], labels, n_random=500, seed=0)
    assert (stats["value"], stats["count"], stats["n"]) == ("a", 10, 10)
    assert stats["catalog_rate"] == pytest.approx(0.2) and stats["lift"] == pytest.approx(5.0)
    # random playlists of 10 are all of one label with probability ~6e-4 (mostly all "c")
    assert stats["p_hypergeom"] < 1e-6 and stats["p_random"] < 0.01
    mixed = concentration([f"t{i}" for i in range(0, 100, 10)], labels, n_random=500, seed=0)
    assert mixed["value"] == "c" and mixed["p_random"] > 0.3


def test_excerpt_offsets_read_what_ingest_recorded():
    """The recorded offset (the most active window of a mostly silent track) wins over the planned
    centred start, which only tracks ingested without a recorded offset fall back to."""
    cfg = AudioConfig(excerpt_seconds=30.0)
    catalog = pd.DataFrame(
        {"duration": [100.0, 100.0, np.nan, None], "excerpt_offset": [5.0, np.nan, 12.5, None]},
        index=["recorded", "planned", "recorded-no-duration", "unknown"],
    )
    offsets = excerpt_offsets(catalog, ["planned", "recorded", "unknown", "recorded-no-duration"], cfg)
    np.testing.assert_array_equal(offsets, [35.0, 5.0, 0.0, 12.5])
    no_column = excerpt_offsets(catalog[["duration"]], ["recorded"], cfg)
    np.testing.assert_array_equal(no_column, [35.0])


# --- build_report on a tiny run -----------------------------------------------------------------

STYLES = ("fiddle tune", "baroque chorale")
FAMILIES = ("strings", "organ")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    run = RunDir(root)
    audio = AudioConfig(sample_rate=8000, excerpt_seconds=2.0, hop_length=100, n_frames=161, n_mels=16,
                        n_fft=256)
    model = ModelConfig.small(conv_channels=(8, 8, 8, 8), dense_units=(16,))
    train = TrainConfig(epochs=1, batch_size=8, num_workers=0, learning_rate=0.01)
    cfg = Config(audio=audio, cf=CFConfig(factors=4), model=model, train=train)
    cfg.save(run.config)
    rng = np.random.default_rng(0)
    ids = [f"song{i:02d}" for i in range(40)]
    run.audio.mkdir()
    tracks = []
    with FeatureStoreWriter(run.features, audio) as writer:
        for i, track_id in enumerate(ids):
            kind = i % 2
            path = run.audio / f"{track_id}.wav"
            sf.write(path, 0.1 * rng.standard_normal(4 * 8000).astype(np.float32), 8000)
            x = rng.normal(-40, 3, (16, 161))
            x[8 * kind : 8 * kind + 8] += 15
            writer.add(track_id, x.astype(np.float16))
            tracks.append(Track(
                track_id, path=str(path), title=f"Song {i}", artist=f"composer {i % 3}", collection="toy",
                duration=4.0, status="ok",
                meta={"style": STYLES[kind], "instrument_family": FAMILIES[kind],
                      "composer": f"composer {i % 3}"},
            ))
    with Catalog(run.catalog) as catalog:
        catalog.upsert(tracks)
    split = np.array(["train"] * 24 + ["valid"] * 8 + ["test"] * 8)
    Factors([f"u{i}" for i in range(10)], ids, rng.standard_normal((10, 4)), rng.standard_normal((40, 4)),
            split).save(run.factors)
    train_run(run, cfg, name="cnn-mse", show_progress=False)
    return run


def test_build_report_writes_page_images_json_and_audio_links(tiny_run):
    page = build_report(tiny_run, filters=[7], n_filters=2, n_units=2, n_queries=2, length=5,
                        show_progress=False)
    out = tiny_run.analysis
    assert page == out / "index.html"
    for name in ("filters.png", "latent-map.png", "report.json", "filter-007.png"):
        assert (out / name).is_file(), name
    text = page.read_text(encoding="utf-8")
    assert '<img src="filters.png"' in text and "latent-map.png" in text and "<svg id='map-svg'" in text
    peaks = re.findall(r"<audio controls preload='none' src='\.\./audio/(song\d\d)\.wav#t=([\d.]+)'>", text)
    assert len(peaks) >= 3 * 5  # the max-activation playlists start at the peak
    assert {t for t, _ in peaks} <= {f"song{i}" for i in range(32, 40)}  # test tracks only
    assert all(0 <= float(s) <= 4.0 for _, s in peaks)
    assert "src='../audio/song" in text.split("Similar songs")[1]

    report = json.loads((out / "report.json").read_text())
    assert report["filters"]["shape"] == [8, 16, 4]
    assert report["n_tracks"] == 8 and report["n_map_tracks"] == 40
    assert 7 in report["filters"]["selected"] and len(report["filters"]["selected"]) == 3
    first = report["playlists"]["filter_max"][0]
    assert len(first["entries"]) == 5 and {"instrument_family", "style"} <= set(first["concentration"])
    assert len(report["playlists"]["similar"]) == 2 and len(report["map"]["points"]) == 40
    summaries = report["non_randomness"]
    assert summaries["filter_max"]["tests"] == 3 * 2 and summaries["units"]["tests"] == 2 * 2
    assert summaries["filter_max"]["strongest"]["kind"] == "filter-max"

    with Catalog(tiny_run.catalog) as catalog:
        frame = catalog.to_frame().set_index("track_id")
    assert render_report_page(report, frame, out=out) == text  # the page is made of report.json


def test_analyse_command_reports_bad_options(tiny_run, capsys):
    assert main(["-q", "analyse", str(tiny_run.root), "--color-by", "tempo"]) == 2
    assert "color_by='tempo'" in capsys.readouterr().err
    assert main(["-q", "analyse", str(tiny_run.root), "--filters", "99"]) == 2
    assert "filters 0..7" in capsys.readouterr().err
