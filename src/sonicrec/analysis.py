"""What the network learned: first-layer filters, activation playlists and a map of the latent space.

After Dieleman's blog post (2014): the first layer's filters drawn as an image; for each
selective filter, the tracks whose excerpt activates it most (by the maximum over time, with the
time of the peak, and by the mean over time); the tracks that most activate units of the last
hidden layer; a t-SNE map of the predicted factors; similar-song playlists. :func:`build_report`
writes them as a self-contained folder (``index.html`` + PNGs + ``report.json``) whose playlists
play in the browser (``<audio>`` elements linking to the catalog's audio files). This module
computes; the figures are drawn by :mod:`sonicrec.plotting` and the page by
:mod:`sonicrec.report_page`.

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

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from sonicrec.audio import track_excerpt_start
from sonicrec.config import AudioConfig
from sonicrec.errors import DataError, SetOption, SonicrecError
from sonicrec.factors import unit_rows
from sonicrec.index import VectorIndex
from sonicrec.interactions import marked_simulated
from sonicrec.io import atomic_write_text
from sonicrec.model import AudioCNN
from sonicrec.plotting import plot_filters, plot_latent_map
from sonicrec.report_page import render_report_page
from sonicrec.rundir import RunDir, check_model_name

log = logging.getLogger(__name__)

COLOR_FIELDS = ("style", "collection", "composer", "instrument_family")
CONCENTRATION_FIELDS = ("instrument_family", "style")
TRACK_SETS = ("test", "valid", "train", "all")


# --- the first layer ----------------------------------------------------------------------------


def first_layer_filters(model: AudioCNN) -> np.ndarray:
    """Weights of the first convolution, float32 (n_filters, n_mels, kernel_size); band 0 lowest."""
    return model.conv[0].weight.detach().float().cpu().numpy()



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


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ReportInputs:
    """What a report is drawn from, checked: the model, the catalog and the tracks."""

    net: AudioCNN
    audio: AudioConfig
    catalog: pd.DataFrame  # indexed by track id, a column per meta field too
    store: Any  # FeatureStore
    pool_ids: list[str]  # the tracks the playlists are drawn from
    map_ids: list[str]  # the tracks on the map, the pool's first


@dataclass(frozen=True)
class _PoolActivations:
    """Activations of the N tracks the playlists are drawn from.

    Attributes
    ----------
    track_ids : (N,) str
    filter_max, filter_mean : (N, F) first-layer maximum and mean over time
    units : (N, U) last hidden layer
    peaks : (N, F) seconds into each track of each filter's maximum
    """

    track_ids: np.ndarray
    filter_max: np.ndarray
    filter_mean: np.ndarray
    units: np.ndarray
    peaks: np.ndarray


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
    started = time.perf_counter()
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    inputs = _report_inputs(run, model, tracks=tracks, filters=filters, length=length, color_by=color_by,
                            max_map_tracks=max_map_tracks, seed=seed)
    out = Path(out) if out is not None else run.analysis
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with _timed(seconds, "activations"):
        acts = track_activations(inputs.net, inputs.store, inputs.map_ids, batch_size=batch_size,
                                 show_progress=show_progress)
    pool = _pool_activations(acts, inputs)
    weights = first_layer_filters(inputs.net)
    with _timed(seconds, "filter images"):
        chosen = _selected_filters(pool.filter_max, n=n_filters, extra=filters, top=length)
        _filter_images(weights, chosen, out)
    playlists = _activation_playlists(pool, chosen, n_units=n_units, length=length)
    with _timed(seconds, "similar songs"):
        playlists["similar"] = _similar_playlists(
            run, model, acts, pool.track_ids, inputs.catalog[color_by], n_queries=n_queries, length=length,
            seed=seed,
        )
    with _timed(seconds, "concentration"):
        _add_concentration(playlists, inputs.catalog, pool.track_ids, seed=seed)
    with _timed(seconds, "t-SNE map"):
        xy = latent_map(acts.factors, seed=seed)
        map_labels = inputs.catalog[color_by].reindex(acts.track_ids)
        plot_latent_map(xy, map_labels, out / "latent-map.png",
                        title=f"t-SNE of factors predicted by {model}, coloured by {color_by}")
    report = {
        "model": model, "run": str(run.root.resolve()), "tracks": tracks,
        "n_tracks": int(len(pool.track_ids)),
        "n_map_tracks": int(len(inputs.map_ids)), "simulated_plays": marked_simulated(run.plays),
        "color_by": color_by,
        "seed": seed,
        "filters": {"image": "filters.png", "shape": list(weights.shape), "selected": chosen,
                    "selectivity": np.round(selectivity(pool.filter_max, top=length), 3).tolist()},
        "playlists": {k: [_playlist_json(p) for p in v] for k, v in playlists.items()},
        "non_randomness": {kind: non_randomness(lists) for kind, lists in playlists.items()},
        "map": _map_json(acts.track_ids, xy, map_labels),
    }
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return _write_report(report, inputs.catalog, out)


@contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    """Record the wall-clock seconds of the block as ``seconds[step]``."""
    tick = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - tick


def _report_inputs(
    run: RunDir, model: str, *, tracks: str, filters: Sequence[int], length: int, color_by: str,
    max_map_tracks: int, seed: int,
) -> _ReportInputs:
    """Load the model, the catalog and the feature store of a report, with errors saying what is wrong."""
    from sonicrec.catalog import Catalog
    from sonicrec.features import FeatureStore
    from sonicrec.predict import Predictor

    check_model_name(model)
    if tracks not in TRACK_SETS:
        raise DataError(f"tracks={tracks!r}: choose one of {', '.join(TRACK_SETS)}")
    predictor = Predictor.load(run.checkpoint(model))
    n_filters_total = predictor.model.conv[0].out_channels
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
            f"only {len(pool_ids)} {tracks} track(s) have features, fewer than a playlist of {length}",
            remedy=SetOption("tracks", "all"),
        )
    map_ids = _map_tracks(store.track_ids, pool_ids, max_map_tracks, seed)
    return _ReportInputs(predictor.model, predictor.config.audio, frame, store, pool_ids, map_ids)


def excerpt_offsets(catalog: pd.DataFrame, track_ids: Sequence[str], cfg: AudioConfig) -> np.ndarray:
    """Where each track's excerpt starts in the track, seconds (N,), as ingest recorded it.

    ``catalog`` is indexed by track id, with ``duration`` and (from the tracks' meta)
    ``excerpt_offset``; :func:`sonicrec.audio.track_excerpt_start` decides; 0 where neither is known.
    """
    rows = catalog.reindex(list(track_ids))
    durations = pd.to_numeric(rows["duration"], errors="coerce").to_numpy(np.float64)
    recorded = (pd.to_numeric(rows["excerpt_offset"], errors="coerce").to_numpy(np.float64)
                if "excerpt_offset" in rows.columns else np.full(len(rows), np.nan))
    starts = [track_excerpt_start(d, cfg, recorded=r) for d, r in zip(durations, recorded, strict=True)]
    return np.array([0.0 if s is None else s for s in starts], dtype=np.float64)


def _pool_activations(acts: TrackActivations, inputs: _ReportInputs) -> _PoolActivations:
    """The rows of the tracks the playlists are drawn from, with the time of each filter's peak."""
    pool = np.isin(acts.track_ids, inputs.pool_ids)
    track_ids = acts.track_ids[pool]
    offsets = excerpt_offsets(inputs.catalog, track_ids, inputs.audio)  # (N,)
    peaks = peak_seconds(
        acts.filters.argmax[pool], kernel_size=inputs.net.cfg.kernel_size, hop_length=inputs.audio.hop_length,
        sample_rate=inputs.audio.sample_rate, offset=offsets[:, None],
    )
    return _PoolActivations(
        track_ids, acts.filters.max[pool], acts.filters.mean[pool], acts.units[pool], peaks
    )


def _selected_filters(filter_max: np.ndarray, *, n: int, extra: Sequence[int], top: int) -> list[int]:
    """The ``n`` filters most selective by maximum activation (N, F) over ``top`` tracks, then ``extra``."""
    chosen = [int(c) for c in np.argsort(-selectivity(filter_max, top=top), kind="stable")[:n]]
    return chosen + [int(f) for f in extra if f not in chosen]


def _filter_images(weights: np.ndarray, chosen: Sequence[int], out: Path) -> None:
    """filters.png of every filter (F, n_mels, K) and filter-NNN.png of each chosen one; a previous
    report's images of other filters are removed."""
    plot_filters(weights, out / "filters.png")
    for stale in out.glob("filter-[0-9][0-9][0-9].png"):
        stale.unlink()
    for c in chosen:
        plot_filters(weights[c : c + 1], out / f"filter-{c:03d}.png")


def _activation_playlists(
    pool: _PoolActivations, chosen: Sequence[int], *, n_units: int, length: int
) -> dict[str, list[Playlist]]:
    """Playlists of the chosen filters by max and by mean activation, and of the most selective units."""
    best_units = np.argsort(-selectivity(pool.units, top=length), kind="stable")[:n_units]
    return {
        "filter_max": activation_playlists(
            pool.filter_max, pool.track_ids, chosen, n=length, kind="filter-max", peaks=pool.peaks
        ),
        "filter_mean": activation_playlists(
            pool.filter_mean, pool.track_ids, chosen, n=length, kind="filter-mean"
        ),
        "units": activation_playlists(pool.units, pool.track_ids, best_units, n=length, kind="unit"),
    }


def _add_concentration(
    playlists: dict[str, list[Playlist]], catalog: pd.DataFrame, pool_ids: np.ndarray, *, seed: int
) -> None:
    """Fill each playlist's ``concentration`` for every catalog field of ``CONCENTRATION_FIELDS``:
    activation playlists against the pool, similar songs (less the query) against the catalog."""
    fields = [f for f in CONCENTRATION_FIELDS if f in catalog.columns]
    for kind, lists in playlists.items():
        population = catalog.index if kind == "similar" else pool_ids
        for i, p in enumerate(lists):
            tracks = p.track_ids[1:] if kind == "similar" else p.track_ids
            for f in fields:
                stats = concentration(tracks, catalog[f].reindex(population), seed=seed + i)
                if stats is not None:
                    p.concentration[f] = stats


def _write_report(report: dict[str, Any], catalog: pd.DataFrame, out: Path) -> Path:
    """Write ``report.json`` and the page made of it, ``index.html``; returns the page's path."""
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    page = out / "index.html"
    atomic_write_text(page, render_report_page(report, catalog, out=out))
    log.info("analysis report of %s written to %s in %.1f s",
             report["model"], page, report["seconds"]["total"])
    return page


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
    index = VectorIndex.build(acts.track_ids, acts.factors, metric="cosine", backend="exact")
    row = {t: i for i, t in enumerate(acts.track_ids.tolist())}
    out = []
    for q in queries:  # the query first (score 1), then its nearest songs
        ids, scores = index.query(acts.factors[row[q]], length, exclude=[q])
        out.append(Playlist("similar", q, [q, *ids[: length - 1].tolist()],
                            [1.0, *scores[: length - 1].astype(float).tolist()]))
    return out


def _label(value: Any) -> str:
    return "unknown" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _playlist_json(p: Playlist) -> dict[str, Any]:
    entries = [{"track_id": t, "score": float(f"{s:.6g}")}  # 6 digits: the page shows 3
               for t, s in zip(p.track_ids, p.scores, strict=True)]
    for e, peak in zip(entries, p.peaks or [], strict=False):
        e["peak_seconds"] = peak
    out = {"kind": p.kind, "key": p.key, "entries": entries, "concentration": p.concentration}
    if p.selectivity is not None:
        out["selectivity"] = round(p.selectivity, 3)
    return out


def _map_json(track_ids: np.ndarray, xy: np.ndarray, labels: pd.Series) -> dict[str, Any]:
    """The map's image and its points: track ids (n,), coordinates (n, 2) and labels (n,)."""
    return {"image": "latent-map.png", "points": [
        {"track_id": t, "x": round(float(a), 3), "y": round(float(b), 3), "label": _label(lab)}
        for t, (a, b), lab in zip(track_ids.tolist(), xy, labels.tolist(), strict=True)
    ]}
