"""Ablation of what makes the audio model carry to real recordings: input normalisation x augmentation.

    python benchmarks/ablate_real_music.py RUN TRACKS.csv --cache DIR [--variants NAME ...]

Trains each variant (MSE, the run's own [model] and [train] settings otherwise) as model
``abl-NAME`` of RUN (skipped when its checkpoint exists, so an interrupted ablation resumes),
predicts the catalog with it (which fits its familiarity model), and prints for each: the best
validation MSE on the run's valid split (simulated listeners; never the test split) and the
real-music check of ``bench_real_music.py``. Work on a copy of a run: models are added to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path

import pandas as pd
from bench_real_music import decode, markdown, measure, read_tracks

from sonicrec.config import AUGMENTATIONS
from sonicrec.predict import Predictor, predict_run
from sonicrec.rundir import RunDir
from sonicrec.train import train_run

ALL = AUGMENTATIONS
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {  # name: (model.input_norm, train.augment)
    # names become model names (letters, digits, "-", "_", "."): NORM[_aug[-no-AUGMENTATION]]
    "band": ("band", ()),
    "excerpt": ("excerpt", ()),
    "excerpt-band": ("excerpt-band", ()),
    "band_aug": ("band", ALL),
    "excerpt_aug": ("excerpt", ALL),
    "excerpt-band_aug": ("excerpt-band", ALL),
    **{f"excerpt_aug-no-{a}": ("excerpt", tuple(x for x in ALL if x != a)) for a in ALL},
    **{f"band_aug-no-{a}": ("band", tuple(x for x in ALL if x != a)) for a in ALL},
    **{f"band_aug-only-{a}": ("band", (a,)) for a in ALL},
    "pcen": ("pcen", ()),
}


def train_variant(run: RunDir, name: str, norm: str, augment: tuple[str, ...], schedule: dict) -> float:
    """Train and predict ``abl-NAME`` unless it exists (``schedule``: [train] overrides for every
    variant alike); its best validation MSE."""
    model_name = f"abl-{name}"
    checkpoint = run.checkpoint(model_name)
    if not checkpoint.exists():
        cfg = run.read_config()
        cfg = cfg.replace(
            model=dataclasses.replace(cfg.model, input_norm=norm),
            train=dataclasses.replace(cfg.train, loss="mse", augment=augment, **schedule),
        )
        started = time.perf_counter()
        train_run(run, cfg, name=model_name, show_progress=False)
        predict_run(run, model_name, show_progress=False)
        seconds = time.perf_counter() - started
        print(f"trained {model_name} in {seconds:.0f} s (load {os.getloadavg()[0]:.1f})")
    return float(pd.read_csv(run.model / model_name / "metrics.csv").valid_loss.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("tracks", type=Path)
    parser.add_argument("--cache", type=Path, help="folder for the decoded log-mels")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=list(VARIANTS)[:6])
    parser.add_argument("--epochs", type=int, help="a shorter schedule for every variant: at most N epochs")
    parser.add_argument("--patience", type=int, help="... early stopping after N epochs without progress")
    parser.add_argument("--crop-frames", type=int, help="... random crops of N frames")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = RunDir(args.run)
    schedule = {key: value for key, value in (
        ("epochs", args.epochs), ("patience", args.patience), ("crop_frames", args.crop_frames),
    ) if value is not None}
    valid = {name: train_variant(run, name, *VARIANTS[name], schedule) for name in args.variants}
    predictors = {f"abl-{n}": Predictor.load(run.checkpoint(f"abl-{n}")) for n in args.variants}
    audio_cfg = next(iter(predictors.values())).config.audio
    tracks, logmels = decode(read_tracks(args.tracks), audio_cfg, args.cache)
    rows, demo_rows = measure(run, predictors, tracks, logmels)
    for row in rows:
        if row["vectors"].startswith("abl-"):
            row["valid MSE"] = f"{valid[row['vectors'][4:]]:.5f}"
    print(f"\n{len(tracks)} real tracks in {tracks.group.nunique()} groups; load {os.getloadavg()[0]:.1f}\n")
    print(markdown(rows))
    print("\nThe run's own test songs (simulated listeners)\n")
    print(markdown(demo_rows))


if __name__ == "__main__":
    main()
