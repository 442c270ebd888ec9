"""Which steps of the adaptation (sonicrec.adapt) do what, on real recordings.

    python benchmarks/ablate_adaptation.py RUN TRACKS.csv [--models cnn-mse ...] [--cache DIR]

For each content model of the run and each subset of ``sonicrec.adapt.STEPS`` (input statistics,
BatchNorm statistics, CORAL at the output), the model is adapted on one half of the groups' tracks
and measured on the other half, both ways, as ``bench_real_music.py --adapt`` does (same columns;
the log-mel baseline within the same halves).
"""

from __future__ import annotations

import os
from itertools import combinations

import numpy as np
from bench_real_music import (
    FileVectors,
    check_arguments,
    decode,
    formatted_stats,
    halves,
    markdown,
    model_names,
    read_tracks,
    recommender_stats,
    same_group_share,
    spread,
)

from sonicrec.adapt import STEPS, adapt_predictor, training_predictions
from sonicrec.predict import Predictor
from sonicrec.recommend import Recommender
from sonicrec.rundir import RunDir


def main() -> None:
    args = check_arguments(__doc__).parse_args()
    run = RunDir(args.run)
    names = model_names(run, args.models)
    predictors = {name: Predictor.load(run.checkpoint(name)) for name in names}
    audio = next(iter(predictors.values())).config.audio
    tracks, logmels = decode(read_tracks(args.tracks), audio, args.cache)
    groups, paths = tracks.group.to_numpy(str), tracks.path.to_numpy(str)
    print(f"{len(tracks)} tracks in {tracks.group.nunique()} groups; run {run.root}; "
          f"load {os.getloadavg()[0]:.1f}\n")
    lm = logmels.astype(np.float32)
    stats = np.concatenate([lm.mean(axis=2), lm.std(axis=2)], axis=1)
    baseline = (stats - stats.mean(0)) / np.maximum(stats.std(0), 1e-6)
    parts = halves(groups)
    base = np.concatenate([same_group_share(baseline[p], groups[p])[0] for p in parts])
    rows = []
    for name, predictor in predictors.items():
        reference = training_predictions(run, name)
        for size in range(len(STEPS) + 1):
            for steps in combinations(STEPS, size):
                share, lists, spreads = [], [], []
                for part, other in zip(parts, parts[::-1], strict=True):
                    model = predictor
                    if steps:
                        model = adapt_predictor(predictor, logmels[other], reference, steps=steps)
                    v = model.predict_logmel(logmels[part])
                    share.append(same_group_share(v, groups[part])[0])
                    spreads.append(spread(v))
                    rec = Recommender.load(run.root, name, predictor=FileVectors(paths[part].tolist(), v))
                    lists.append(recommender_stats(rec, paths[part].tolist(), skip_query=False))
                share = np.concatenate(share)
                diff = share - base
                mean_cos, pr = np.mean(spreads, axis=0)
                row = {
                    "model": name, "steps": "+".join(steps) or "none",
                    "same@10": f"{share.mean():.3f} ± {share.std(ddof=1) / np.sqrt(len(share)):.3f}",
                    "vs log-mel": f"{diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}",
                    "cos": f"{mean_cos:.3f}", "PR": f"{pr:.1f}",
                }
                rows.append(row | formatted_stats({k: float(np.mean([s[k] for s in lists])) for k in lists[0]
                                              if not k.startswith("raw")}))
                print(f"  {name} {row['steps']}: same@10 {row['same@10']}", flush=True)
    print(f"\nAdapted on one half of the groups, measured on the other (log-mel baseline within halves: "
          f"{base.mean():.3f})\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
