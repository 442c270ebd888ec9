"""The demo end to end on a tiny world (same code paths as `sonicrec demo --quick`), and its bad input."""

import json
import sys
import tomllib

import pandas as pd
import pytest

from sonicrec.catalog import Catalog
from sonicrec.cli import main
from sonicrec.demo import DemoConfig, DemoOptions, run_demo
from sonicrec.errors import ConfigError
from sonicrec.factors import Factors
from sonicrec.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "run"
    cache = tmp_path_factory.mktemp("cache")
    options = DemoOptions.preset(
        size="quick", n_tracks=40, n_users=200, n_plays=6000, seed=3, cache_dir=cache, show_progress=False
    )
    summary = run_demo(root, options)
    return RunDir(root), summary


def test_demo_runs_every_stage(tiny_run):
    run, summary = tiny_run
    with Catalog(run.catalog) as catalog:
        assert catalog.counts()["ok"] == 40
    plays = pd.read_parquet(run.plays)
    assert plays["count"].sum() == 6000
    assert set(plays.track_id) <= set(Catalog(run.catalog).ids())
    factors = Factors.load(run.factors)
    assert set(factors.split) == {"train", "valid", "test"}
    for name in ("cnn-mse", "cnn-wpe", "mfcc-linear", "mfcc-mlp"):
        assert run.prediction(name).is_file(), name
    results = json.loads((run.evaluation / "results.json").read_text())
    assert "SIMULATED" in summary and "mAP@500" in summary
    assert str(run.root.resolve()) in summary
    assert results  # the table the summary printed was written too
    assert (run.analysis / "index.html").is_file()


def test_the_world_is_saved_beside_the_config(tiny_run):
    run, _ = tiny_run
    assert DemoConfig.load(run.demo_config) == DemoConfig(n_tracks=40, n_users=200, n_plays=6000, seed=3)
    assert "demo" not in tomllib.loads(run.config.read_text())  # the core config holds no demo world


def test_the_demo_config_round_trips_and_names_its_problems(tmp_path):
    world = DemoConfig(n_tracks=50, n_users=40, n_plays=400, seed=7)
    world.save(tmp_path / "demo.toml")
    assert DemoConfig.load(tmp_path / "demo.toml") == world
    for text, words in [("[demo]\nseed = -1\n", "seed"), ("[demo]\nn_trax = 3\n", "n_trax"),
                        ("[cf]\nfactors = 3\n", "cf"), ("[demo\n", "TOML")]:
        with pytest.raises(ConfigError, match=words):
            DemoConfig.from_toml(text)
    with pytest.raises(ConfigError, match="cannot read"):
        DemoConfig.load(tmp_path / "absent.toml")


def test_a_missing_demo_extra_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tinysoundfont", None)  # as if it were not installed
    assert main(["-q", "demo", "--quick", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tinysoundfont" in err and "pip install 'sonicrec[demo]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # it stopped before any work


def test_an_existing_run_directory_is_reused(tiny_run):
    run, _ = tiny_run
    assert RunDir.prepare(run.root) == run


@pytest.mark.parametrize(
    "argv, words", [(["--tracks", "5"], "n_tracks=5"), (["--users", "50", "--plays", "10"], "n_plays")]
)
def test_impossible_world_sizes_are_one_line_errors(argv, words, tmp_path, capsys):
    assert main(["-q", "demo", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_foreign_output_directory_is_refused(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    assert main(["-q", "demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and str(tmp_path) in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["-q", "demo", "--out", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--seed", "abc"], ["--seed", "-1"], ["--tracks", "0"], ["--users", "x"]])
def test_bad_seed_or_count_is_a_one_line_usage_error(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "run"), *argv])
    assert exc.value.code == 2
    assert argv[1] in capsys.readouterr().err


def test_world_sizes(monkeypatch):
    import torch

    from sonicrec.config import ModelConfig
    from sonicrec.demo import MEDIUM_MODEL
    from sonicrec.demo.render import candidate_pieces
    from sonicrec.interactions import split_songs
    from sonicrec.model import AudioCNN

    assert DemoOptions.preset().world.n_tracks == 1200  # the default world stays as it was
    assert DemoOptions.preset(size="quick").world.n_users == 1500
    large_options = DemoOptions.preset(size="large", seed=5)
    large, demo = large_options.config, large_options.world
    assert (demo.n_tracks, demo.n_users, demo.n_plays, demo.seed) == (10_000, 50_000, 2_500_000, 5)
    split = split_songs(demo.n_tracks, valid_fraction=large.cf.valid_fraction,
                        test_fraction=large.cf.test_fraction, seed=5)
    assert (split == "test").sum() >= 1000
    assert len(candidate_pieces(5)) >= demo.n_tracks  # the corpus has enough pieces to render

    def parameters(cfg: ModelConfig) -> int:
        return sum(p.numel() for p in AudioCNN(cfg, n_mels=128, n_factors=40).parameters())

    on_cpu = large.model if not torch.cuda.is_available() else MEDIUM_MODEL
    assert on_cpu == MEDIUM_MODEL and 2 * parameters(ModelConfig.small()) < parameters(on_cpu) < 2_000_000
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert DemoOptions.preset(size="large").config.model == ModelConfig()  # the blog model on a GPU
    with pytest.raises(ConfigError, match="huge"):
        DemoOptions.preset(size="huge")
