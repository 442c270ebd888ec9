"""Adaptation under a production shift with listeners: the clean world's models on the varied world's audio.

    python benchmarks/adapt_production_shift.py CLEAN_RUN VARIED_COPY

The clean and the varied demo worlds of one seed share their (SIMULATED) plays, factors and split;
only the audio differs. This writes, into ``VARIED_COPY`` (a copy of the varied run: its
predictions folder gains files), the clean models' predictions of the varied audio as they are
(``clean-NAME``) and adapted (``clean-NAME-adapted``: adapted on the varied world's training songs'
audio only, so the test songs stay unseen), then evaluates every model of the copy on its test songs
(``VARIED_COPY/evaluation/results.md``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from sonicrec.adapt import adapt_predictor, training_predictions
from sonicrec.evaluate import evaluate_run
from sonicrec.factors import Factors, Predictions
from sonicrec.features import FeatureStore
from sonicrec.predict import Predictor
from sonicrec.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clean", type=Path)
    parser.add_argument("varied_copy", type=Path)
    parser.add_argument("--models", nargs="*", default=["cnn-mse", "cnn-wpe"])
    args = parser.parse_args()
    clean, target = RunDir(args.clean), RunDir(args.varied_copy)
    store = FeatureStore(target.features)
    ids = store.track_ids
    stored = set(ids)
    train = [s for s in Factors.load(target.factors).songs("train") if s in stored]
    for name in args.models:
        predictor = Predictor.load(clean.checkpoint(name))
        adapted = adapt_predictor(predictor, store.get_many(train), training_predictions(clean, name))
        for label, model in ((f"clean-{name}", predictor), (f"clean-{name}-adapted", adapted)):
            Predictions(np.array(ids), model.predict_store(store, ids)[1]).save(target.prediction(label))
        print(f"{name}: adapted on {len(train)} training songs of the varied world")
    print(f"load {os.getloadavg()[0]:.1f}")
    evaluate_run(target, seed=0, show_progress=False)
    print((target.evaluation / "results.md").read_text())


if __name__ == "__main__":
    main()
