"""Repeated experiments on the world of one run: several seeds, and a learning curve.

Both start from a *base* run that holds audio features and plays (``sonicrec demo`` makes one; so
does ``ingest`` + ``factorize``) and never modify it. Each experiment is a run directory of its
own under ``OUT`` that links to the base's catalog, audio, features and plays and writes its own
factors, models, predictions and evaluation, so ``sonicrec evaluate``, ``recommend`` etc. work on it.

- :func:`run_seeds`: per seed, the song split + factorisation (``cf.seed``), CNN training
  (``train.seed``), the baselines and the evaluation (the bootstrap too), then the mean and standard
  deviation of every cell across seeds and the paired differences pooled over seeds.
- :func:`run_learning_curve`: the content models trained on nested, seeded subsets of the base's
  training songs, with the base's factors (so the same users, test songs and targets), evaluated
  on the same test songs.

Each experiment is resumable: a stage whose output exists (factors, a model's predictions, the
evaluation) is not run again, and a CNN interrupted mid-training continues from its checkpoint.
The links make an experiment depend on the base run staying where it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sonicrec.baselines import BagOfWordsConfig
from sonicrec.config import Config
from sonicrec.errors import ConfigError, DataError
from sonicrec.evaluate import DEFAULT_RESAMPLES
from sonicrec.factors import Factors
from sonicrec.io import atomic_path, atomic_write_json, atomic_write_text
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)

LEVEL = 0.95
CURVE_MODELS = ("mfcc-linear", "cnn-mse")  # what the learning curve plots
_BAGS = BagOfWordsConfig()


def _shared_inputs(run: RunDir) -> list[Path]:
    """What an experiment reads from its base run and never writes."""
    return [run.catalog, run.audio, run.plays, run.users, run.features]


def derive_run(base: RunDir, root: Path, cfg: Config) -> RunDir:
    """A run directory at ``root`` linked to the base's inputs, with its own config."""
    if not base.features.is_dir() or not base.plays.is_file():
        raise DataError(f"{base.root} has no features or no plays: it cannot be the base of an experiment")
    run = RunDir.prepare(root)
    for source, target in zip(_shared_inputs(base), _shared_inputs(run), strict=True):
        if source.exists() and not target.is_symlink():
            target.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    cfg.save(run.config)
    return run


def fit_and_evaluate(
    run: RunDir,
    cfg: Config,
    *,
    losses: Sequence[str],
    seed: int,
    n_resamples: int = DEFAULT_RESAMPLES,
    baselines: BagOfWordsConfig = _BAGS,
    show_progress: bool = False,
) -> dict:
    """Factorise (unless factors exist), train and predict each CNN, fit the baselines, evaluate.

    Each stage whose output exists is skipped; the evaluation's results.json marks a finished run.
    Returns the evaluation results (``sonicrec.evaluate.evaluate_models``).
    """
    from sonicrec.baselines import fit_baselines_run
    from sonicrec.cf import factorize_run
    from sonicrec.evaluate import evaluate_run
    from sonicrec.predict import predict_run
    from sonicrec.train import train_run

    finished = run.evaluation / "results.json"
    if finished.is_file():
        log.info("%s is evaluated already: kept", run.root)
        return json.loads(finished.read_text(encoding="utf-8"))
    if not run.factors.is_file():
        factorize_run(run, cfg.cf, show_progress=show_progress)
    for loss in losses:
        name = f"cnn-{loss}"
        if not run.prediction(name).is_file():
            loss_cfg = cfg.replace(train=dataclasses.replace(cfg.train, loss=loss))
            interrupted = run.checkpoint(name).is_file()
            train_run(run, loss_cfg, name=name, resume=interrupted, show_progress=show_progress)
            predict_run(run, name, show_progress=show_progress)
    if not run.prediction("mfcc-linear").is_file():
        fit_baselines_run(run, seed=seed, show_progress=show_progress, cfg=baselines)
    return evaluate_run(run, seed=seed, n_resamples=n_resamples, show_progress=show_progress)


def _seeded(cfg: Config, seed: int) -> Config:
    return cfg.replace(
        cf=dataclasses.replace(cfg.cf, seed=seed), train=dataclasses.replace(cfg.train, seed=seed)
    )


# --- several seeds --------------------------------------------------------------------------------


def run_seeds(
    base: RunDir | str | Path,
    out: str | Path,
    seeds: Sequence[int],
    *,
    losses: Sequence[str] = ("mse", "wpe"),
    n_resamples: int = DEFAULT_RESAMPLES,
    baselines: BagOfWordsConfig = _BAGS,
    show_progress: bool = False,
) -> dict:
    """Split, factorise, train and evaluate once per seed; write OUT/study.json and OUT/study.md.

    OUT/seed-N is the run of seed N (its own results.md is the per-seed table). Seeds already
    evaluated are kept, so an interrupted study continues where it stopped.
    """
    base = base if isinstance(base, RunDir) else RunDir(Path(base))
    if not seeds or len(set(seeds)) < len(seeds):
        raise ConfigError(f"seeds must be distinct and at least one, got {list(seeds)}")
    out = Path(out)
    cfg = base.read_config()
    per_seed = {}
    for seed in seeds:
        log.info("study: seed %d", seed)
        seed_cfg = _seeded(cfg, seed)
        run = derive_run(base, out / f"seed-{seed}", seed_cfg)
        per_seed[seed] = fit_and_evaluate(
            run, seed_cfg, losses=losses, seed=seed, n_resamples=n_resamples, baselines=baselines,
            show_progress=show_progress,
        )
    study = summarise_seeds(per_seed)
    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", study_markdown(study))
    return study


def summarise_seeds(per_seed: dict[int, dict], level: float = LEVEL) -> dict:
    """Mean and standard deviation of every cell across seeds; paired differences pooled over seeds.

    A pooled difference is the mean of the per-seed differences with a Student-t interval and a
    two-sided t-test across seeds (so it carries the variation of split, factors and training, not
    only of users); ``seeds_above`` / ``seeds_below`` count the seeds whose own bootstrap interval
    lies wholly above / below 0.
    """
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    keys = [f"map@{first['ap_cutoff']}", "auc", f"ndcg@{first['k']}", f"recall@{first['k']}"]
    names = [row["model"] for row in first["models"]
             if all(any(r["model"] == row["model"] for r in per_seed[s]["models"]) for s in seeds)]

    def cell(seed: int, name: str) -> dict:
        return next(r for r in per_seed[seed]["models"] if r["model"] == name)

    models = [
        {"model": name, **{key: _spread([cell(s, name)[key] for s in seeds]) for key in keys}}
        for name in names
    ]
    paired = []
    for pair in first.get("paired", []):
        found = [_find_pair(per_seed[s], pair["model"], pair["baseline"]) for s in seeds]
        if any(f is None for f in found):
            continue
        entry = {"model": pair["model"], "baseline": pair["baseline"]}
        for key in keys[:3]:
            diffs = [f[key]["diff"] for f in found]
            above = sum(f[key]["interval"][0] > 0 for f in found)
            below = sum(f[key]["interval"][1] < 0 for f in found)
            entry[key] = {**_spread(diffs), **_t_test(diffs, level),
                          "seeds_above": above, "seeds_below": below}
        paired.append(entry)
    data = {str(s): per_seed[s]["data"] for s in seeds}
    return {"seeds": seeds, "level": level, "keys": keys, "data": data, "models": models, "paired": paired}


def _find_pair(results: dict, model: str, baseline: str) -> dict | None:
    return next((p for p in results.get("paired", []) if (p["model"], p["baseline"]) == (model, baseline)),
                None)


def _spread(values: list[float]) -> dict:
    x = np.asarray(values, dtype=np.float64)
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else float("nan"),
            "values": [float(v) for v in x]}


def _t_test(values: list[float], level: float) -> dict:
    """Student-t interval of the mean and the two-sided p-value of mean = 0, across seeds."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return {"interval": [float("nan")] * 2, "p": float("nan")}
    se = x.std(ddof=1) / np.sqrt(len(x))
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * se
    p = 2 * stats.t.sf(abs(x.mean()) / se, len(x) - 1) if se > 0 else float(x.mean() == 0)
    return {"interval": [float(x.mean() - half), float(x.mean() + half)], "p": float(p)}


def study_markdown(study: dict) -> str:
    """The study as Markdown: mean ± sd table, pooled paired differences, per-seed mAP."""
    seeds, keys, level = study["seeds"], study["keys"], round(100 * study["level"])
    lines = [
        f"# Cold-start evaluation over {len(seeds)} seeds ({', '.join(map(str, seeds))})",
        "",
        "Each seed draws its own song split, WMF initialisation, CNN initialisation and crops; the "
        "world (audio, listeners) is the base run's. Cells: mean ± standard deviation across seeds.",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for row in study["models"]:
        lines.append(f"| {row['model']} | " + " | ".join(_mean_sd(row[k]) for k in keys) + " |")
    lines += [
        "",
        f"Paired differences pooled over seeds: mean of the per-seed differences, {level}% Student-t "
        f"interval and two-sided p across the {len(seeds)} seeds; 'seeds +/-': how many seeds' own "
        f"{level}% bootstrap interval (over users) lies wholly above / below zero.",
        "",
        "| model - baseline | " + " | ".join(f"diff {k} [{level}%] | p | seeds +/-" for k in keys[:3]) + " |",
        "|---|" + "---:|---:|---:|" * 3,
    ]
    for pair in study["paired"]:
        cells = [f"{_mean_interval(pair[k])} | {pair[k]['p']:.3f} | "
                 f"{pair[k]['seeds_above']}/{pair[k]['seeds_below']}" for k in keys[:3]]
        lines.append(f"| {pair['model']} - {pair['baseline']} | " + " | ".join(cells) + " |")
    lines += ["", f"Per seed, {keys[0]} (each seed's full table: seed-N/evaluation/results.md):", "",
              "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for row in study["models"]:
        lines.append(f"| {row['model']} | " + " | ".join(f"{v:.5f}" for v in row[keys[0]]["values"]) + " |")
    return "\n".join(lines) + "\n"


def _mean_sd(cell: dict) -> str:
    return f"{cell['mean']:.5f} ± {cell['sd']:.5f}"


def _mean_interval(cell: dict) -> str:
    low, high = cell["interval"]
    return f"{cell['mean']:+.5f} [{low:+.4f}, {high:+.4f}]"


# --- learning curve -------------------------------------------------------------------------------


def train_subset(factors: Factors, n_train: int, seed: int) -> Factors:
    """The factors with only ``n_train`` of the training songs (a seeded choice; nested in n_train).

    Users, user factors and the valid and test songs are unchanged.
    """
    train = np.flatnonzero(factors.split == "train")
    if not 1 <= n_train <= len(train):
        raise ConfigError(f"{n_train} training songs asked for; the run has {len(train)}")
    order = np.random.default_rng(seed).permutation(train)
    keep = np.sort(np.concatenate([order[:n_train], np.flatnonzero(factors.split != "train")]))
    return Factors(factors.user_ids, factors.song_ids[keep], factors.user_factors,
                   factors.song_factors[keep], factors.split[keep])


def run_learning_curve(
    base: RunDir | str | Path,
    out: str | Path,
    sizes: Sequence[int],
    *,
    seed: int = 0,
    losses: Sequence[str] = ("mse",),
    n_resamples: int = DEFAULT_RESAMPLES,
    baselines: BagOfWordsConfig = _BAGS,
    show_progress: bool = False,
) -> dict:
    """Train on ``sizes`` training songs each; write OUT/learning_curve.json, .md and .png.

    OUT/train-N is the run with N training songs. Every size uses the base's factors (its user
    factors, split and targets), so each point is evaluated on the same users and test songs.
    """
    base = base if isinstance(base, RunDir) else RunDir(Path(base))
    out = Path(out)
    factors = Factors.load(base.factors)
    cfg = _seeded(base.read_config(), seed)
    points = []
    for n_train in sorted(set(sizes)):
        log.info("learning curve: %d training songs", n_train)
        subset = train_subset(factors, n_train, seed)
        run = derive_run(base, out / f"train-{n_train}", cfg)
        if not run.factors.is_file():
            subset.save(run.factors)
        results = fit_and_evaluate(run, cfg, losses=losses, seed=seed, n_resamples=n_resamples,
                                   baselines=baselines, show_progress=show_progress)
        points.append({"n_train": n_train, "results": results})
    curve = _curve_table(points)
    atomic_write_json(out / "learning_curve.json", curve)
    atomic_write_text(out / "learning_curve.md", curve_markdown(curve))
    plot_learning_curve(curve, out / "learning_curve.png")
    return curve


def _curve_table(points: list[dict]) -> dict:
    """Rows of (n_train, model, metric, value, interval) and the paired differences per size."""
    cut = points[0]["results"]["ap_cutoff"]
    keys = [f"map@{cut}", "auc"]
    rows, paired = [], []
    for point in points:
        results = point["results"]
        for row in results["models"]:
            rows.append({"n_train": point["n_train"], "model": row["model"],
                         **{key: row[key] for key in keys},
                         "interval": {key: row.get("interval", {}).get(key) for key in keys}})
        pair = _find_pair(results, "cnn-mse", "mfcc-linear")
        if pair is not None:
            paired.append({"n_train": point["n_train"], **{key: pair[key] for key in keys}})
    return {"keys": keys, "sizes": [p["n_train"] for p in points], "data": points[0]["results"]["data"],
            "rows": rows, "paired": paired}


def curve_markdown(curve: dict) -> str:
    """The learning curve as Markdown: every model's metrics per size, then CNN minus MFCC."""
    keys = curve["keys"]
    lines = ["| training songs | model | " + " | ".join(keys) + " |", "|---:|---|" + "---:|" * len(keys)]
    for row in curve["rows"]:
        cells = [f"{row[k]:.5f}" + (f" [{row['interval'][k][0]:.4f}, {row['interval'][k][1]:.4f}]"
                                    if row["interval"][k] else "") for k in keys]
        lines.append(f"| {row['n_train']:,} | {row['model']} | " + " | ".join(cells) + " |")
    if curve["paired"]:
        lines += ["", "cnn-mse - mfcc-linear, paired on the same users (95% bootstrap interval, p):", "",
                  "| training songs | " + " | ".join(f"diff {k} | p" for k in keys) + " |",
                  "|---:|" + "---:|---:|" * len(keys)]
        for pair in curve["paired"]:
            cells = [f"{pair[k]['diff']:+.5f} [{pair[k]['interval'][0]:+.4f}, {pair[k]['interval'][1]:+.4f}]"
                     f" | {pair[k]['p']:.3f}" for k in keys]
            lines.append(f"| {pair['n_train']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_learning_curve(curve: dict, path: Path) -> None:
    """mAP and AUC against training songs (log axis) with interval bars; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curve["keys"]), figsize=(10, 4))
    models = [m for m in dict.fromkeys(r["model"] for r in curve["rows"])
              if m in CURVE_MODELS or m == "random"]
    for ax, key in zip(axes, curve["keys"], strict=True):
        for model in models:
            rows = [r for r in curve["rows"] if r["model"] == model]
            x = np.array([r["n_train"] for r in rows])
            y = np.array([r[key] for r in rows])
            bounds = np.array([r["interval"][key] or [r[key]] * 2 for r in rows]).T
            ax.errorbar(x, y, yerr=np.abs(bounds - y), marker="o", capsize=3, label=model,
                        ls=":" if model == "random" else "-")
        ax.set_xscale("log")
        ax.set_xlabel("training songs")
        ax.set_title(key)
    axes[0].legend()
    data = curve["data"]
    fig.suptitle(f"Learning curve: {data['n_users']:,} users x {data['n_songs']:,} test songs "
                 "(bars: 95% bootstrap intervals over users)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
