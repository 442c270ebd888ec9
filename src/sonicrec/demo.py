"""The demo world, end to end: real scores rendered to audio, SIMULATED listeners, every stage run.

Stages (each a public function of its own module, called here in order):
render (music21 corpus -> audio) -> catalog -> ingest (log-mel features) -> simulate listeners
(SIMULATED play counts) -> factorize (WMF) -> train CNNs (MSE, WPE) -> predict -> baselines ->
evaluate -> analysis report. Rendered audio is cached across runs, so a second demo skips the expensive part.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sonicrec.config import Config, DemoConfig, ModelConfig, TrainConfig
from sonicrec.errors import ConfigError
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)

# A CNN small enough to train on a 2-core CPU in minutes; the blog-size model is ModelConfig().
DEMO_MODEL = ModelConfig.small()
# The large world's CNN on a CPU: twice as wide (~0.6M parameters); on a GPU it is the blog model.
MEDIUM_MODEL = ModelConfig.small(conv_channels=(64, 128, 128, 128), dense_units=(512, 512))
# On the demo world Adam beat Nesterov SGD (lr 0.05): validation MSE 0.0173 vs 0.0204 (docs/results.md).
_ADAM = {"optimizer": "adam", "learning_rate": 0.001}
SIZES = ("quick", "default", "large")


def _world(size: str, seed: int) -> tuple[DemoConfig, TrainConfig, ModelConfig]:
    """The world, training and model of each size.

    quick: 300 tracks, 1,500 simulated users (same code paths, under a minute cached).
    default: 1,200 tracks, 5,000 simulated users, 250,000 plays (~7 min, ~2 min cached).
    large: 10,000 tracks, 50,000 simulated users, 2.5M plays; 10% test songs = 1,000 (rendering
    ~45 CPU-minutes the first time; the CNN is MEDIUM_MODEL on a CPU, the blog model on a GPU).
    """
    if size == "quick":
        return (DemoConfig(n_tracks=300, n_users=1500, n_plays=60_000, seed=seed),
                TrainConfig(epochs=20, patience=4, batch_size=16, **_ADAM, seed=seed), DEMO_MODEL)
    if size == "default":
        return (DemoConfig(seed=seed),
                TrainConfig(epochs=60, patience=5, batch_size=32, **_ADAM, seed=seed), DEMO_MODEL)
    if size == "large":
        import torch

        model = ModelConfig() if torch.cuda.is_available() else MEDIUM_MODEL
        return (DemoConfig(n_tracks=10_000, n_users=50_000, n_plays=2_500_000, seed=seed),
                TrainConfig(epochs=40, patience=5, batch_size=64, **_ADAM, seed=seed), model)
    raise ConfigError(f"demo size {size!r}: one of {', '.join(SIZES)}")


@dataclass(frozen=True)
class DemoOptions:
    config: Config
    cache_dir: Path | None = None
    workers: int = 2
    show_progress: bool = True
    cnn_losses: tuple[str, ...] = ("mse", "wpe")

    @classmethod
    def preset(
        cls,
        *,
        size: str = "default",
        n_tracks: int | None = None,
        n_users: int | None = None,
        n_plays: int | None = None,
        seed: int = 0,
        cache_dir: Path | None = None,
        show_progress: bool = True,
    ) -> DemoOptions:
        """The world of one of :data:`SIZES` (see :func:`_world`), its counts overridable."""
        demo, train, model = _world(size, seed)
        demo = dataclasses.replace(
            demo,
            n_tracks=n_tracks or demo.n_tracks,
            n_users=n_users or demo.n_users,
            n_plays=n_plays or max(demo.n_plays, n_users or 0),
        )
        base = Config()
        config = base.replace(
            demo=demo,
            model=model,
            train=train,
            cf=dataclasses.replace(base.cf, seed=seed),
        )
        return cls(config=config, cache_dir=cache_dir, show_progress=show_progress)


class _Stages:
    """Times and logs each stage of the demo."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        log.info("demo: %s ...", name)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        log.info("demo: %s done in %.1f s", name, self.seconds[name])
        return result


def run_demo(out: Path, options: DemoOptions) -> str:
    """Build the demo world in ``out`` and run every stage; return a printable summary."""
    from sonicrec.catalog import Catalog
    from sonicrec.train import default_model_name

    run = RunDir.prepare(out)
    cfg = options.config
    cfg.save(run.config)
    stages = _Stages()

    tracks = stages.run(
        "render audio", _render, run, cfg.demo, options.cache_dir, options.workers, options.show_progress
    )
    with Catalog(run.catalog) as catalog:
        known = set(catalog.ids())
        catalog.upsert(t for t in tracks if t.track_id not in known)
    stages.run("extract features", _ingest, run, cfg, options)
    with Catalog(run.catalog) as catalog:
        frame = catalog.to_frame()
    usable = frame[frame.status == "ok"]
    listening = stages.run("simulate listeners (SIMULATED)", _simulate, usable, cfg.demo)
    listening.save(run.root)
    stages.run("factorize plays (WMF)", _factorize, run, cfg, options.show_progress)
    for loss in options.cnn_losses:
        name = default_model_name(loss)
        loss_cfg = cfg.replace(train=dataclasses.replace(cfg.train, loss=loss))
        stages.run(f"train {name}", _train, run, loss_cfg, name, options.show_progress)
        stages.run(f"predict {name}", _predict, run, name, options.show_progress)
    stages.run("baselines (MFCC bag-of-words)", _baselines, run, cfg.demo.seed, options.show_progress)
    stages.run("evaluate (cold start)", _evaluate, run, options.show_progress)
    stages.run("analysis report", _analyse, run, cfg.demo.seed, options.show_progress)
    return _summary(run, stages)


def _render(run, demo_cfg, cache_dir, workers, show_progress):
    from sonicrec.render import render_world

    return render_world(
        run.audio,
        n_tracks=demo_cfg.n_tracks,
        seed=demo_cfg.seed,
        cache_dir=cache_dir,
        workers=workers,
        show_progress=show_progress,
    )


def _ingest(run, cfg, options):
    from sonicrec.features import ingest_run

    return ingest_run(run, cfg.audio, workers=options.workers, show_progress=options.show_progress)


def _simulate(tracks, demo_cfg):
    from sonicrec.simulate import simulate_listening

    return simulate_listening(
        tracks, n_users=demo_cfg.n_users, n_plays=demo_cfg.n_plays, seed=demo_cfg.seed
    )


def _factorize(run, cfg, show_progress):
    from sonicrec.cf import factorize_run

    return factorize_run(run, cfg.cf, show_progress=show_progress)


def _train(run, cfg, name, show_progress):
    from sonicrec.train import train_run

    return train_run(run, cfg, name=name, show_progress=show_progress)


def _predict(run, name, show_progress):
    from sonicrec.predict import predict_run

    return predict_run(run, name, show_progress=show_progress)


def _baselines(run, seed, show_progress):
    from sonicrec.baselines import fit_baselines_run

    return fit_baselines_run(run, seed=seed, show_progress=show_progress)


def _evaluate(run, show_progress):
    from sonicrec.evaluate import evaluate_run

    return evaluate_run(run, show_progress=show_progress)


def _analyse(run, seed, show_progress):
    from sonicrec.analysis import build_report
    from sonicrec.factors import Factors

    # Playlists come from the never-played test songs, unless a small world has too few of them.
    tracks = "test" if len(Factors.load(run.factors).songs("test")) >= 30 else "all"
    return build_report(run, model="cnn-mse", tracks=tracks, seed=seed, show_progress=show_progress)


def _summary(run: RunDir, stages: _Stages) -> str:
    lines = ["", "sonicrec demo finished (listeners and their plays are SIMULATED; the music is real)."]
    lines += [f"  {name:<34} {sec:7.1f} s" for name, sec in stages.seconds.items()]
    lines.append(f"  {'total':<34} {sum(stages.seconds.values()):7.1f} s")
    table = run.evaluation / "results.md"
    if table.is_file():
        lines += ["", table.read_text(encoding="utf-8").strip()]
    lines += [
        "",
        f"Run directory: {run.root.resolve()}",
        f"  catalog      {run.catalog}",
        f"  factors      {run.factors}",
        f"  models       {run.model}",
        f"  evaluation   {run.evaluation}",
        f"  report       {run.analysis / 'index.html'}",
        "",
        f"Explore it in the browser: sonicrec serve {run.root}",
    ]
    return "\n".join(lines)
