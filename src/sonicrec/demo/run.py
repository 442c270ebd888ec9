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

from sonicrec.config import Config
from sonicrec.demo.world import DemoConfig, world_preset
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    """What the demo builds: the ``world`` (RUN/demo.toml) and the pipeline's ``config`` (RUN/config.toml)."""

    config: Config
    world: DemoConfig
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
        production: str = "clean",
        cache_dir: Path | None = None,
        show_progress: bool = True,
    ) -> DemoOptions:
        """The world of one of :data:`SIZES` (see :func:`world_preset`), its counts overridable."""
        world, train, model = world_preset(size, seed)
        world = dataclasses.replace(
            world,
            n_tracks=n_tracks or world.n_tracks,
            n_users=n_users or world.n_users,
            n_plays=n_plays or max(world.n_plays, n_users or 0),
            production=production,
        )
        base = Config()
        config = base.replace(model=model, train=train, cf=dataclasses.replace(base.cf, seed=seed))
        return cls(config=config, world=world, cache_dir=cache_dir, show_progress=show_progress)


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
    """Build the demo world in ``out`` and run every stage; return a printable summary.

    Raises MissingExtraError ("pip install 'sonicrec[demo]'") before any work when the extra is missing.
    """
    from sonicrec.catalog import Catalog
    from sonicrec.demo.render import require_demo_packages
    from sonicrec.train import default_model_name

    require_demo_packages()
    run = RunDir.prepare(out)
    cfg, world = options.config, options.world
    cfg.save(run.config)
    world.save(run.demo_config)
    stages = _Stages()

    tracks = stages.run(
        "render audio", _render, run, world, options.cache_dir, options.workers, options.show_progress
    )
    with Catalog(run.catalog) as catalog:
        known = set(catalog.ids())
        catalog.upsert(t for t in tracks if t.track_id not in known)
    stages.run("extract features", _ingest, run, cfg, options)
    with Catalog(run.catalog) as catalog:
        frame = catalog.to_frame()
    usable = frame[frame.status == "ok"]
    listening = stages.run("simulate listeners (SIMULATED)", _simulate, usable, world)
    listening.save(run.root)
    stages.run("factorize plays (WMF)", _factorize, run, cfg, options.show_progress)
    for loss in options.cnn_losses:
        name = default_model_name(loss)
        loss_cfg = cfg.replace(train=dataclasses.replace(cfg.train, loss=loss))
        stages.run(f"train {name}", _train, run, loss_cfg, name, options.show_progress)
        stages.run(f"predict {name}", _predict, run, name, options.show_progress)
    stages.run("baselines (MFCC bag-of-words)", _baselines, run, world.seed, options.show_progress)
    stages.run("evaluate (cold start)", _evaluate, run, options.show_progress)
    stages.run("analysis report", _analyse, run, world.seed, options.show_progress)
    return _summary(run, stages)


def _render(run, world, cache_dir, workers, show_progress):
    from sonicrec.demo.render import render_world

    return render_world(
        run.audio,
        n_tracks=world.n_tracks,
        seed=world.seed,
        cache_dir=cache_dir,
        workers=workers,
        show_progress=show_progress,
        production=world.production,
    )


def _ingest(run, cfg, options):
    from sonicrec.features import ingest_run

    return ingest_run(run, cfg.audio, workers=options.workers, show_progress=options.show_progress)


def _simulate(tracks, world):
    from sonicrec.demo.listeners import simulate_listening

    return simulate_listening(tracks, n_users=world.n_users, n_plays=world.n_plays, seed=world.seed)


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
