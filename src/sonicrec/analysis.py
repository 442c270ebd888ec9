"""What the network learned: first-layer filters, activation playlists and a map of the latent space.

After Dieleman's blog post (2014): the first layer's filters drawn as an image; for each
selective filter, the tracks whose excerpt activates it most (by the maximum over time, with the
time of the peak, and by the mean over time); the tracks that most activate units of the last
hidden layer; a t-SNE map of the predicted factors; similar-song playlists. :func:`build_report`
writes them as a self-contained folder (``index.html`` + PNGs + ``report.json``) whose playlists
play in the browser (``<audio>`` elements linking to the catalog's audio files).

"Activation" is the output of the first convolution block as the next layer sees it: the model's
input normalisation, the convolution, batch normalisation when the model has it, and the ReLU --
the first layers of ``AudioCNN.conv`` applied to the whole excerpt. Each playlist reports how
concentrated its catalog metadata is (:func:`concentration`): the share of its most common
``instrument_family`` / ``style`` against the rate among the tracks it was drawn from, with a
hypergeometric p-value and one against random playlists of the same length.

>>> report = build_report("RUN", model="cnn-mse")  # doctest: +SKIP
>>> report.name
'index.html'
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from sonicrec.errors import DataError, SonicrecError
from sonicrec.evaluate import marked_simulated
from sonicrec.factors import unit_rows
from sonicrec.io import atomic_path, atomic_write_text
from sonicrec.model import AudioCNN
from sonicrec.rundir import RunDir, check_model_name

log = logging.getLogger(__name__)

COLOR_FIELDS = ("style", "collection", "composer", "instrument_family")
CONCENTRATION_FIELDS = ("instrument_family", "style")
TRACK_SETS = ("test", "valid", "train", "all")
_MAX_COLOURS = 20  # map legend: the most common labels, the rest as "other"


# --- the first layer ----------------------------------------------------------------------------


def first_layer_filters(model: AudioCNN) -> np.ndarray:
    """Weights of the first convolution, float32 (n_filters, n_mels, kernel_size); band 0 lowest."""
    return model.conv[0].weight.detach().float().cpu().numpy()


def filter_mosaic(filters: np.ndarray, *, columns: int | None = None, gap: int = 1) -> np.ndarray:
    """Filters side by side, each scaled to [-1, 1] by its largest |weight|, NaN between them.

    Parameters
    ----------
    filters : (F, n_mels, K)
    columns : filters per row (default: all in one row up to 32)
    gap : NaN columns/rows between neighbouring filters

    Returns
    -------
    (rows * n_mels + (rows - 1) * gap, columns * K + (columns - 1) * gap) float32, highest band on
    top (row 0), filter i at row ``i // columns``, column ``i % columns``.
    """
    n, n_mels, kernel = filters.shape
    columns = min(n, 32) if columns is None else columns
    rows = -(-n // columns)
    out = np.full((rows * (n_mels + gap) - gap, columns * (kernel + gap) - gap), np.nan, np.float32)
    scale = np.abs(filters).reshape(n, -1).max(axis=1)
    for i in range(n):
        r, c = divmod(i, columns)
        w = filters[i] / scale[i] if scale[i] > 0 else filters[i]
        top, left = r * (n_mels + gap), c * (kernel + gap)
        out[top : top + n_mels, left : left + kernel] = w[::-1]
    return out


def plot_filters(filters: np.ndarray, path: str | Path, *, columns: int | None = None) -> Path:
    """Save :func:`filter_mosaic` as a PNG: diverging colours, zero white, grey between filters.

    Filters are numbered when they fit in one row; a single filter is drawn without axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, n_mels, kernel = filters.shape
    columns = min(n, 32) if columns is None else columns
    rows = -(-n // columns)
    mosaic = filter_mosaic(filters, columns=columns)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.55")
    width = 0.32 * columns + 0.6 if n > 1 else 0.5
    fig, ax = plt.subplots(figsize=(width, 2.2 * rows + (0.5 if n > 1 else 0)))
    ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if n > 1:  # a single filter (a playlist's) is drawn bare
        if rows == 1:
            ax.set_xticks(np.arange(n) * (kernel + 1) + (kernel - 1) / 2)
            ax.set_xticklabels([str(i) for i in range(n)], fontsize=6)
        ax.set_yticks([0, n_mels - 1])
        ax.set_yticklabels(["high", "low"], fontsize=7)
        ax.tick_params(length=0)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# --- activations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterActivations:
    """Per-filter statistics of first-layer activations over time, for a batch of excerpts.

    Attributes
    ----------
    max : (B, F) float32, maximum over time
    mean : (B, F) float32, mean over time
    argmax : (B, F) int64, output frame of the maximum; it covers input frames argmax..argmax+K-1
    """

    max: np.ndarray
    mean: np.ndarray
    argmax: np.ndarray


def first_block(model: AudioCNN) -> nn.Sequential:
    """The layers of ``model.conv`` up to and including the first ReLU (conv, [batch norm], ReLU)."""
    layers = list(model.conv)
    end = next(i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU))
    return nn.Sequential(*layers[: end + 1])


def normalised_input(model: AudioCNN, x: torch.Tensor) -> torch.Tensor:
    """The model's input normalisation, as in ``AudioCNN.forward``: (B, M, T) -> (B, M, T) float32."""
    return (x.float() - model.band_mean[:, None]) / model.band_std[:, None]


def _as_tensor(model: nn.Module, x: np.ndarray | torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device)


@torch.no_grad()
def filter_activations(model: AudioCNN, x: np.ndarray | torch.Tensor) -> FilterActivations:
    """First-layer activations of log-mel excerpts ``x`` (B, n_mels, T), summarised over time.

    The model should be in evaluation mode (batch normalisation uses its running statistics).
    """
    h = first_block(model)(normalised_input(model, _as_tensor(model, x)))  # (B, F, T - K + 1)
    peak, where = h.max(dim=2)
    return FilterActivations(peak.cpu().numpy(), h.mean(dim=2).cpu().numpy(), where.cpu().numpy())


@torch.no_grad()
def hidden_units_and_factors(model: AudioCNN, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Activations of the last hidden layer and the model's output for excerpts ``x`` (B, n_mels, T).

    Returns
    -------
    units : (B, U) float32, after the ReLU (for ``architecture="paper"``: averaged over the windows,
        like the output)
    factors : (B, n_factors) float32, the model's prediction
    """
    captured: list[torch.Tensor] = []
    hook = model.dense.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        factors = model(_as_tensor(model, x))  # (B, k)
    finally:
        hook.remove()
    batch = factors.shape[0]
    units = captured[0].reshape(batch, -1, captured[0].shape[-1]).mean(dim=1)  # (B, U)
    return units.cpu().numpy(), factors.float().cpu().numpy()


@dataclass(frozen=True)
class TrackActivations:
    """Everything the report needs from one pass of the model over tracks of a feature store.

    Attributes
    ----------
    track_ids : (N,) str
    filters : FilterActivations with (N, F) arrays
    units : (N, U) last hidden layer
    factors : (N, k) predicted factors
    """

    track_ids: np.ndarray
    filters: FilterActivations
    units: np.ndarray
    factors: np.ndarray


def track_activations(
    model: AudioCNN, store: Any, track_ids: Sequence[str], *, batch_size: int = 32, show_progress: bool = True
) -> TrackActivations:
    """Run the model over ``track_ids`` of a feature store (``FeatureStore`` or same interface)."""
    parts: list[tuple] = []
    with tqdm(total=len(track_ids), unit="track", desc="activations", disable=not show_progress) as bar:
        for start in range(0, len(track_ids), batch_size):
            chunk = list(track_ids[start : start + batch_size])
            x = store.get_many(chunk)  # (b, n_mels, n_frames) float16
            parts.append((filter_activations(model, x), *hidden_units_and_factors(model, x)))
            bar.update(len(chunk))
    return TrackActivations(
        np.asarray(track_ids, dtype=str),
        FilterActivations(
            *(np.concatenate([getattr(p[0], f) for p in parts]) for f in ("max", "mean", "argmax"))
        ),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )


def peak_seconds(argmax: np.ndarray, *, kernel_size: int, hop_length: int, sample_rate: int,
                 offset: np.ndarray | float = 0.0) -> np.ndarray:
    """Time of first-layer peaks in the track, seconds: the centre of the filter's input frames.

    ``argmax`` (...) output frames; ``offset`` where the excerpt starts in the track (broadcast).
    Frame t of a (centred) spectrogram is at ``t * hop_length / sample_rate`` seconds.
    """
    return np.asarray(offset) + (np.asarray(argmax) + (kernel_size - 1) / 2) * hop_length / sample_rate


# --- playlists ----------------------------------------------------------------------------------


@dataclass
class Playlist:
    """Ranked tracks of one filter, unit or query track.

    ``kind``: "filter-max", "filter-mean", "unit" or "similar"; ``key``: the filter/unit number or
    the query track id; ``peaks``: seconds into each track of its peak (filter-max only).
    """

    kind: str
    key: int | str
    track_ids: list[str]
    scores: list[float]
    peaks: list[float] | None = None
    selectivity: float | None = None
    concentration: dict[str, dict[str, Any]] = field(default_factory=dict)


def selectivity(scores: np.ndarray, *, top: int = 10) -> np.ndarray:
    """How far each column's ``top`` highest values stand above the rest: (N, C) -> (C,).

    The z-score of the mean of the top values against the column's mean and standard deviation
    (0 for a constant column, e.g. a dead filter).
    """
    top = min(top, len(scores))
    best = -np.sort(-scores, axis=0)[:top].mean(axis=0)
    std = scores.std(axis=0)
    return np.where(std > 0, (best - scores.mean(axis=0)) / np.where(std > 0, std, 1), 0.0).astype(np.float32)


def activation_playlists(
    scores: np.ndarray,
    track_ids: Sequence[str],
    channels: Sequence[int],
    *,
    n: int = 10,
    kind: str = "filter-max",
    peaks: np.ndarray | None = None,
) -> list[Playlist]:
    """For each channel, the ``n`` tracks with the highest score, best first.

    Parameters
    ----------
    scores : (N, C) e.g. :attr:`FilterActivations.max`, ``.mean`` or hidden-unit activations
    track_ids : (N,) ids of the rows
    channels : the columns to make playlists of
    peaks : (N, C) seconds of each track's peak, or None
    """
    ids = np.asarray(track_ids, dtype=str)
    top = selectivity(scores, top=n)
    out = []
    for c in channels:
        order = np.argsort(-scores[:, c], kind="stable")[:n]
        out.append(Playlist(
            kind=kind, key=int(c), track_ids=ids[order].tolist(),
            scores=scores[order, c].astype(float).tolist(),
            peaks=None if peaks is None else np.round(peaks[order, c], 2).astype(float).tolist(),
            selectivity=float(top[c]),
        ))
    return out


def concentration(
    playlist: Sequence[str], labels: pd.Series, *, n_random: int = 2000, seed: int = 0
) -> dict[str, Any] | None:
    """How much one label dominates a playlist, compared with the tracks it was drawn from.

    Parameters
    ----------
    playlist : track ids
    labels : one label per track of the population, indexed by track id (missing labels dropped)
    n_random : random playlists of the same length for ``p_random``
    seed : seed of the random playlists

    Returns
    -------
    dict with ``value`` (the playlist's most common label), ``count`` of it among ``n`` labelled
    tracks, ``rate`` = count / n, ``catalog_rate`` (its rate in the population), ``lift`` = rate /
    catalog_rate, ``p_hypergeom`` = P(count or more | n drawn at random) for this label, and
    ``p_random`` = the share of random playlists whose most common label (any) is as frequent --
    the p-value that accounts for picking the most common label. None when nothing is labelled.
    """
    labels = labels.dropna().astype(str)
    chosen = labels.reindex([t for t in playlist if t in labels.index])
    if chosen.empty:
        return None
    from scipy.stats import hypergeom

    counts = chosen.value_counts()
    value, count, n = str(counts.index[0]), int(counts.iloc[0]), len(chosen)
    population = len(labels)
    in_population = int((labels == value).sum())
    # label counts of random playlists: n tracks drawn without replacement from the population
    tallies = np.random.default_rng(seed).multivariate_hypergeometric(
        labels.value_counts().to_numpy(), n, size=n_random
    )  # (n_random, n_labels)
    as_frequent = int((tallies.max(axis=1) >= count).sum())
    return {
        "value": value, "count": count, "n": n, "rate": count / n,
        "catalog_rate": in_population / population,
        "lift": (count / n) / (in_population / population),
        "p_hypergeom": float(hypergeom.sf(count - 1, population, in_population, n)),
        "p_random": (as_frequent + 1) / (n_random + 1),
    }


# --- the latent-space map -----------------------------------------------------------------------


def latent_map(factors: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of song factors, unit-normalised first (songs compare by direction): (n, k) -> (n, 2).

    openTSNE (extra ``analysis``) when installed, else scikit-learn's TSNE; deterministic for a seed.
    """
    x = unit_rows(np.asarray(factors, dtype=np.float32)).astype(np.float64)
    if len(x) < 5:
        raise DataError(f"a t-SNE map needs at least 5 songs, got {len(x)}")
    perplexity = float(min(perplexity, (len(x) - 1) / 3))
    try:
        from openTSNE import TSNE
    except ImportError:
        from sklearn.manifold import TSNE as SklearnTSNE

        log.info("openTSNE is not installed (pip install 'sonicrec[analysis]'): using scikit-learn's TSNE")
        tsne = SklearnTSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(x).astype(np.float32)
    embedding = TSNE(n_components=2, perplexity=perplexity, random_state=seed, n_jobs=1).fit(x)
    return np.asarray(embedding, dtype=np.float32)


def _colour_labels(labels: pd.Series) -> tuple[pd.Series, dict[str, str]]:
    """Labels with all but the most common ``_MAX_COLOURS - 1`` as "other", and a colour for each."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    labels = labels.fillna("unknown").astype(str)
    common = labels.value_counts().index.tolist()
    if len(common) > _MAX_COLOURS:
        keep = set(common[: _MAX_COLOURS - 1])
        labels = labels.where(labels.isin(keep), "other")
        common = [*common[: _MAX_COLOURS - 1], "other"]
    palette = colormaps["tab20" if len(common) > 10 else "tab10"]
    return labels, {value: to_hex(palette(i)) for i, value in enumerate(common)}


def plot_latent_map(xy: np.ndarray, labels: pd.Series, path: str | Path, *, title: str) -> Path:
    """Save a t-SNE scatter (n, 2) coloured by ``labels`` (n,) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, colours = _colour_labels(labels.reset_index(drop=True))
    fig, ax = plt.subplots(figsize=(8, 6.5))
    for value, colour in colours.items():
        mask = (labels == value).to_numpy()
        ax.scatter(xy[mask, 0], xy[mask, 1], s=12, c=colour, label=f"{value} ({mask.sum()})", linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


# --- the report ---------------------------------------------------------------------------------


def build_report(
    run: RunDir | str | Path,
    *,
    model: str = "cnn-mse",
    out: str | Path | None = None,
    tracks: str = "test",
    filters: Sequence[int] = (),
    n_filters: int = 8,
    n_units: int = 8,
    n_queries: int = 4,
    length: int = 10,
    color_by: str = "style",
    max_map_tracks: int = 5000,
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = True,
) -> Path:
    """Write the analysis report of model ``model`` of a run; returns the path of its ``index.html``.

    Parameters
    ----------
    run : run directory with RUN/model/MODEL/checkpoint.pt, RUN/features and RUN/catalog.sqlite
        (RUN/cf/factors.npz for the track split; RUN/predictions/MODEL.npz and RUN/plays.parquet
        for similar songs through :class:`sonicrec.recommend.Recommender`)
    out : report folder (default RUN/analysis)
    tracks : tracks the playlists are drawn from: "test" (songs the model never trained on),
        "valid", "train" or "all" tracks of the feature store
    filters : first-layer filters to make playlists of, besides the ``n_filters`` most selective
    n_units : most selective units of the last hidden layer to make playlists of
    n_queries : similar-song playlists, for query tracks of different ``color_by`` labels
    length : tracks per playlist
    color_by : catalog field that colours the map: style, collection, composer, instrument_family
    max_map_tracks : at most this many tracks on the map (the playlists' tracks first, then a
        seeded sample of the others)
    seed : seed of the map, the query tracks and the random playlists of the p-values
    """
    from sonicrec.catalog import Catalog
    from sonicrec.features import FeatureStore
    from sonicrec.predict import Predictor

    started = time.perf_counter()
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    check_model_name(model)
    if tracks not in TRACK_SETS:
        raise DataError(f"tracks={tracks!r}: choose one of {', '.join(TRACK_SETS)}")
    out = Path(out) if out is not None else run.analysis
    predictor = Predictor.load(run.checkpoint(model))
    net, audio_cfg = predictor.model, predictor.config.audio
    n_filters_total = net.conv[0].out_channels
    bad = [f for f in filters if not 0 <= f < n_filters_total]
    if bad:
        raise DataError(f"filter(s) {bad} do not exist: model {model!r} has filters 0..{n_filters_total - 1}")
    if not run.catalog.is_file():
        raise DataError(f"no catalog at {run.catalog}: the report needs track metadata and audio paths")
    with Catalog(run.catalog) as catalog:
        frame = catalog.to_frame().set_index("track_id")
    if color_by not in frame.columns:
        known = ", ".join(c for c in COLOR_FIELDS if c in frame.columns) or "none"
        raise DataError(f"color_by={color_by!r} is not a catalog field of {run.catalog} (available: {known})")
    store = FeatureStore(run.features)
    pool_ids = _track_set(run, store, tracks)
    if len(pool_ids) < length:
        raise DataError(
            f"only {len(pool_ids)} {tracks} track(s) have features, fewer than a playlist of {length}: "
            "choose --tracks all or a shorter --length"
        )
    map_ids = _map_tracks(store.track_ids, pool_ids, max_map_tracks, seed)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    tick = time.perf_counter()
    acts = track_activations(net, store, map_ids, batch_size=batch_size, show_progress=show_progress)
    seconds["activations"] = time.perf_counter() - tick
    pool = np.isin(acts.track_ids, pool_ids)
    pool_track_ids = acts.track_ids[pool]
    fmax, fmean, units = acts.filters.max[pool], acts.filters.mean[pool], acts.units[pool]
    durations = frame["duration"].reindex(pool_track_ids).to_numpy(np.float64)
    from sonicrec.audio import excerpt_start

    offsets = np.array([excerpt_start(d, audio_cfg) if np.isfinite(d) else 0.0 for d in durations])
    peaks = peak_seconds(
        acts.filters.argmax[pool], kernel_size=net.cfg.kernel_size, hop_length=audio_cfg.hop_length,
        sample_rate=audio_cfg.sample_rate, offset=offsets[:, None],
    )

    tick = time.perf_counter()
    weights = first_layer_filters(net)
    plot_filters(weights, out / "filters.png")
    for stale in out.glob("filter-[0-9][0-9][0-9].png"):  # a previous report's selection
        stale.unlink()
    chosen = [int(c) for c in np.argsort(-selectivity(fmax, top=length), kind="stable")[:n_filters]]
    chosen += [int(f) for f in filters if f not in chosen]
    for c in chosen:
        plot_filters(weights[c : c + 1], out / f"filter-{c:03d}.png")
    seconds["filter images"] = time.perf_counter() - tick

    best_units = np.argsort(-selectivity(units, top=length), kind="stable")[:n_units]
    playlists = {
        "filter_max": activation_playlists(
            fmax, pool_track_ids, chosen, n=length, kind="filter-max", peaks=peaks
        ),
        "filter_mean": activation_playlists(fmean, pool_track_ids, chosen, n=length, kind="filter-mean"),
        "units": activation_playlists(units, pool_track_ids, best_units, n=length, kind="unit"),
    }
    tick = time.perf_counter()
    playlists["similar"] = _similar_playlists(
        run, model, acts, pool_track_ids, frame[color_by], n_queries=n_queries, length=length, seed=seed
    )
    seconds["similar songs"] = time.perf_counter() - tick

    tick = time.perf_counter()
    fields = [f for f in CONCENTRATION_FIELDS if f in frame.columns]
    for kind, lists in playlists.items():
        population = frame.index if kind == "similar" else pool_track_ids
        for i, p in enumerate(lists):
            tracks_ = p.track_ids[1:] if kind == "similar" else p.track_ids
            for f in fields:
                stats = concentration(tracks_, frame[f].reindex(population), seed=seed + i)
                if stats is not None:
                    p.concentration[f] = stats
    seconds["concentration"] = time.perf_counter() - tick

    tick = time.perf_counter()
    xy = latent_map(acts.factors, seed=seed)
    map_labels = frame[color_by].reindex(acts.track_ids)
    plot_latent_map(xy, map_labels, out / "latent-map.png",
                    title=f"t-SNE of factors predicted by {model}, coloured by {color_by}")
    seconds["t-SNE map"] = time.perf_counter() - tick

    report = {
        "model": model, "run": str(run.root.resolve()), "tracks": tracks,
        "n_tracks": int(len(pool_track_ids)),
        "n_map_tracks": int(len(map_ids)), "simulated_plays": marked_simulated(run.plays),
        "color_by": color_by,
        "seed": seed,
        "filters": {"image": "filters.png", "shape": list(weights.shape), "selected": chosen,
                    "selectivity": np.round(selectivity(fmax, top=length), 3).tolist()},
        "playlists": {k: [_playlist_json(p) for p in v] for k, v in playlists.items()},
        "non_randomness": {kind: non_randomness(lists) for kind, lists in playlists.items()},
        "map": {"image": "latent-map.png", "points": [
            {"track_id": t, "x": round(float(a), 3), "y": round(float(b), 3), "label": _label(lab)}
            for t, (a, b), lab in zip(acts.track_ids.tolist(), xy, map_labels.tolist(), strict=True)
        ]},
    }
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    page = out / "index.html"
    atomic_write_text(page, _html(report, playlists, frame, out, xy, map_labels))
    log.info("analysis report of %s written to %s in %.1f s", model, page, seconds["total"])
    return page


def non_randomness(playlists: Sequence[Playlist], *, alpha: float = 0.05) -> dict[str, Any]:
    """Summary of the playlists' metadata concentration: the strongest one, and those significant
    after a Bonferroni correction over every (playlist, field) tested, by ``p_random``."""
    tests = [(p, f, s) for p in playlists for f, s in p.concentration.items()]
    if not tests:
        return {"tests": 0, "significant": [], "strongest": None}
    n = len(tests)

    def row(p: Playlist, f: str, s: dict[str, Any]) -> dict[str, Any]:
        return {"kind": p.kind, "key": p.key, "field": f, **s, "p_bonferroni": min(1.0, s["p_random"] * n)}

    significant = [row(p, f, s) for p, f, s in tests if s["p_random"] * n < alpha]
    p, f, s = min(tests, key=lambda t: (t[2]["p_random"], t[2]["p_hypergeom"], -t[2]["lift"]))
    return {"tests": n, "alpha": alpha, "significant": significant, "strongest": row(p, f, s)}


_KIND_NAMES = {"filter-max": "filter {}, max activation", "filter-mean": "filter {}, mean activation",
               "unit": "unit {}", "similar": "songs like {}"}


def summary_line(summary: dict[str, Any]) -> str:
    """One sentence on a :func:`non_randomness` summary: the strongest playlist and the count of
    significant ones."""
    best = summary["strongest"]
    if best is None:
        return "no catalog metadata (instrument_family, style) to compare the playlists with"
    return (
        f"strongest: {_KIND_NAMES[best['kind']].format(best['key'])}: {best['field']} {best['value']!r} "
        f"{best['count']}/{best['n']} vs {100 * best['catalog_rate']:.0f}% of the tracks it was drawn from "
        f"(lift {best['lift']:.1f}, hypergeometric p {best['p_hypergeom']:.2g}, p against random playlists "
        f"{best['p_random']:.2g}, Bonferroni over {summary['tests']} tests {best['p_bonferroni']:.2g}); "
        f"{len(summary['significant'])}/{summary['tests']} (playlist, field) pairs significant at 5% "
        "after the correction"
    )


def _track_set(run: RunDir, store: Any, tracks: str) -> list[str]:
    if tracks == "all":
        return store.track_ids
    from sonicrec.factors import Factors

    split = set(Factors.load(run.factors).songs(tracks).tolist())
    return [t for t in store.track_ids if t in split]


def _map_tracks(all_ids: Sequence[str], pool_ids: Sequence[str], limit: int, seed: int) -> list[str]:
    """The pool's tracks, then a seeded sample of the others, at most ``max(limit, len(pool))``."""
    in_pool = set(pool_ids)
    others = [t for t in all_ids if t not in in_pool]
    room = max(0, limit - len(pool_ids))
    if len(others) > room:
        keep = np.sort(np.random.default_rng(seed).choice(len(others), room, replace=False))
        others = [others[i] for i in keep]
    return list(pool_ids) + others


def _similar_playlists(
    run: RunDir, model: str, acts: TrackActivations, pool_ids: np.ndarray, labels: pd.Series, *,
    n_queries: int, length: int, seed: int,
) -> list[Playlist]:
    """Similar songs of query tracks of different labels: the Recommender's when it loads,
    else cosine similarity of the factors predicted here."""
    rng = np.random.default_rng(seed)
    queries, seen = [], set()
    for t in pool_ids[rng.permutation(len(pool_ids))].tolist():
        label = _label(labels.get(t))
        if label not in seen:
            queries.append(t)
            seen.add(label)
        if len(queries) == n_queries:
            break
    try:
        from sonicrec.recommend import Recommender

        rec = Recommender.load(run.root, model)
        rankings = [rec.similar(q, length) for q in queries]
        return [Playlist("similar", q, r.ids.tolist(), r.scores.astype(float).tolist()) for q, r in
                zip(queries, rankings, strict=True)]
    except SonicrecError as exc:
        log.warning("similar songs by cosine of the factors predicted here (no Recommender: %s)", exc)
    unit = unit_rows(acts.factors)
    row = {t: i for i, t in enumerate(acts.track_ids.tolist())}
    out = []
    for q in queries:
        cos = unit @ unit[row[q]]
        cos[row[q]] = np.inf  # the query first
        order = np.argsort(-cos, kind="stable")[:length]
        scores = np.where(order == row[q], 1.0, cos[order])
        out.append(Playlist("similar", q, acts.track_ids[order].tolist(), scores.astype(float).tolist()))
    return out


def _label(value: Any) -> str:
    return "unknown" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _playlist_json(p: Playlist) -> dict[str, Any]:
    entries = [{"track_id": t, "score": round(s, 4)} for t, s in zip(p.track_ids, p.scores, strict=True)]
    for e, peak in zip(entries, p.peaks or [], strict=False):
        e["peak_seconds"] = peak
    out = {"kind": p.kind, "key": p.key, "entries": entries, "concentration": p.concentration}
    if p.selectivity is not None:
        out["selectivity"] = round(p.selectivity, 3)
    return out


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{margin-top:1.8em;border-bottom:1px solid #ccc}h3{font-size:1em;margin:.2em 0}
.note{color:#555;font-size:.9em}.lists{display:flex;flex-wrap:wrap;gap:1em}
.list{border:1px solid #ddd;border-radius:6px;padding:.6em;width:560px;display:flex;gap:.6em}
.list img.filter{height:150px;width:auto;image-rendering:pixelated}
.list table{font-size:.8em;border-collapse:collapse}
.list td{padding:1px 4px;vertical-align:middle}audio{height:26px;width:180px}
.conc{font-size:.8em;color:#333;margin:.2em 0}.sig{color:#b00;font-weight:bold}
#map-wrap{display:flex;gap:1em;align-items:flex-start}#map-svg{border:1px solid #ccc;background:#fff}
#map-svg circle{cursor:pointer}#map-svg circle:hover{stroke:#000;stroke-width:2}
#map-info{font-size:.9em;min-height:3em}.legend span{display:inline-block;margin:0 .6em .2em 0;font-size:.8em}
.sw{display:inline-block;width:.8em;height:.8em;border-radius:50%;margin-right:.2em;vertical-align:middle}
"""

_MAP_JS = """
const info = document.getElementById('map-info'), player = document.getElementById('map-player');
document.querySelectorAll('#map-svg circle').forEach(c => {
  const t = MAP_TRACKS[+c.dataset.i];
  c.addEventListener('mouseenter', () => {
    info.textContent = t.title + ' \u2014 ' + t.label + ' (' + t.id + ')';
  });
  c.addEventListener('click', () => {
    if (!t.src) { info.textContent = t.title + ': no audio file'; return; }
    player.src = t.src; player.play(); info.textContent = '\u25b6 ' + t.title + ' \u2014 ' + t.label;
  });
});
"""


def _audio_src(path: Any, out: Path, at: float | None = None) -> str | None:
    if not isinstance(path, str) or not path:
        return None
    rel = os.path.relpath(Path(path).resolve(), out.resolve())
    return quote(Path(rel).as_posix()) + (f"#t={at:.1f}" if at is not None else "")


def _describe(track_id: str, frame: pd.DataFrame) -> str:
    if track_id not in frame.index:
        return html.escape(track_id)
    row = frame.loc[track_id]
    title = html.escape(str(row.get("title") or track_id))
    extra = [str(row[c]) for c in ("artist", "style", "instrument_family") if isinstance(row.get(c), str)]
    return f"<b>{title}</b> <span class='note'>{html.escape(' · '.join(extra))}</span>"


def _concentration_html(p: Playlist, tests: int) -> str:
    parts = []
    for f, s in p.concentration.items():
        sig = s["p_random"] * tests < 0.05
        parts.append(
            f"<span class='{'sig' if sig else ''}'>{html.escape(f)}: {html.escape(s['value'])} "
            f"{s['count']}/{s['n']} vs {100 * s['catalog_rate']:.0f}% (lift {s['lift']:.1f}, "
            f"p<sub>hyp</sub>={s['p_hypergeom']:.1g}, p<sub>rand</sub>={s['p_random']:.1g})</span>"
        )
    return f"<div class='conc'>{'<br>'.join(parts)}</div>"


def _playlist_html(p: Playlist, frame: pd.DataFrame, out: Path, *, tests: int) -> str:
    if p.kind == "similar":
        heading = f"Songs like {_describe(str(p.key), frame)}"
    else:
        name = "unit" if p.kind == "unit" else "filter"
        how = {"filter-max": "max activation", "filter-mean": "mean activation", "unit": "activation"}[p.kind]
        heading = f"{name} {p.key} <span class='note'>({how}; selectivity {p.selectivity:.1f})</span>"
    image = (f"<img class='filter' src='filter-{int(p.key):03d}.png' alt='filter {p.key}'>"
             if p.kind.startswith("filter") else "")
    rows = []
    for i, (t, score) in enumerate(zip(p.track_ids, p.scores, strict=True)):
        at = p.peaks[i] if p.peaks else None
        src = _audio_src(frame["path"].get(t) if t in frame.index else None, out, at)
        player = f"<audio controls preload='none' src='{html.escape(src)}'></audio>" if src else "no audio"
        when = f"peak {at:.1f} s" if at is not None else ""
        shown = f"{score:.3f}" if p.kind == "similar" else f"{score:.3g}"  # cosines near 1
        rows.append(f"<tr><td>{i + 1}</td><td>{_describe(t, frame)}</td><td>{shown}</td>"
                    f"<td>{when}</td><td>{player}</td></tr>")
    return (f"<div class='list'>{image}<div><h3>{heading}</h3>{_concentration_html(p, tests)}"
            f"<table>{''.join(rows)}</table></div></div>")


def _map_html(xy: np.ndarray, labels: pd.Series, ids: list[str], frame: pd.DataFrame, out: Path) -> str:
    width, height, pad = 900, 650, 12
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    px = pad + (xy[:, 0] - lo[0]) / span[0] * (width - 2 * pad)
    py = pad + (hi[1] - xy[:, 1]) / span[1] * (height - 2 * pad)
    shown, colours = _colour_labels(labels.reset_index(drop=True))
    tracks, circles = [], []
    for i, t in enumerate(ids):
        title = str(frame["title"].get(t) or t) if t in frame.index else t
        path = frame["path"].get(t) if t in frame.index else None
        label = _label(labels.iloc[i])
        tracks.append({"id": t, "title": title, "label": label, "src": _audio_src(path, out)})
        circles.append(
            f"<circle cx='{px[i]:.1f}' cy='{py[i]:.1f}' r='4' fill='{colours[shown.iloc[i]]}' data-i='{i}'>"
            f"<title>{html.escape(title)} — {html.escape(label)}</title></circle>"
        )
    legend = "".join(f"<span><i class='sw' style='background:{c}'></i>{html.escape(v)}</span>"
                     for v, c in colours.items())
    data = json.dumps(tracks).replace("</", "<\\/")
    return (
        f"<div class='legend'>{legend}</div><div id='map-wrap'>"
        f"<svg id='map-svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}'>"
        f"{''.join(circles)}</svg>"
        "<div><div id='map-info' class='note'>Hover over a point to see the track; click to play it.</div>"
        "<audio id='map-player' controls preload='none'></audio></div></div>"
        f"<script>const MAP_TRACKS = {data};{_MAP_JS}</script>"
    )


def _html(report: dict[str, Any], playlists: dict[str, list[Playlist]], frame: pd.DataFrame, out: Path,
          xy: np.ndarray, map_labels: pd.Series) -> str:
    model = html.escape(report["model"])
    simulated = (
        " The play counts the factors come from are <b>SIMULATED</b> (demo world); the music is real."
        if report["simulated_plays"] else ""
    )

    def section(kind: str) -> str:
        summary = report["non_randomness"][kind]
        verdict = html.escape(summary_line(summary)[0].upper() + summary_line(summary)[1:])
        lists = "".join(_playlist_html(p, frame, out, tests=summary["tests"]) for p in playlists[kind])
        return f"<p class='note'>{verdict} (in red).</p><div class='lists'>{lists}</div>"

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sonicrec: what {model} learned</title>
<style>{_CSS}</style></head><body>
<h1>What the network learned: {model}</h1>
<p class="note">Run {html.escape(report['run'])}; playlists drawn from the {report['n_tracks']}
{report['tracks']} tracks, map of {report['n_map_tracks']} tracks. After S. Dieleman, “Recommending music
on Spotify with deep learning” (2014).{simulated} Built in {report['seconds']['total']:.0f} s.</p>
<h2>First-layer filters</h2>
<p class="note">Each filter spans every mel band (low at the bottom) and {report['filters']['shape'][2]}
frames; red positive, blue negative, white zero; each filter scaled by its own largest weight.</p>
<img src="filters.png" alt="first-layer filters" style="max-width:100%">
<h2>Low-level playlists: maximum activation</h2>
<p class="note">For the most selective filters: the tracks whose excerpt activates the filter most at
any moment; each player starts at the peak.</p>
{section("filter_max")}
<h2>Low-level playlists: mean activation</h2>
<p class="note">The same filters ranked by their mean activation over the excerpt (steady features:
drones, chords, timbre).</p>
{section("filter_mean")}
<h2>High-level playlists: units of the last hidden layer</h2>
{section("units")}
<h2>Latent space map</h2>
<p class="note">t-SNE of the factors {model} predicts from audio, coloured by
{html.escape(report['color_by'])}.</p>
<img src="latent-map.png" alt="t-SNE map" style="max-width:100%">
{_map_html(xy, map_labels, [p['track_id'] for p in report['map']['points']], frame, out)}
<h2>Similar songs</h2>
{section("similar")}
</body></html>
"""
