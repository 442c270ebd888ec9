"""Adapting a trained CNN to the audio of another domain, from unlabelled recordings of it.

A model trained on one kind of audio (the demo's rendered scores) maps another (real mixes, with
the bass, tilt, loudness and noise the renderings never show) into one crowded region of the latent
space, whose few nearby songs and users then turn up in every list. Given recordings of the new
domain, and no plays, three standard steps move the network's statistics to it:

1. **input**: the per-band mean and standard deviation of the log-mel, which standardise the
   network's input (:meth:`AudioCNN.set_input_norm`), are re-estimated on the new recordings;
2. **AdaBN** (Li, Wang, Shi, Liu & Hou, *Revisiting batch normalization for practical domain
   adaptation*, 2016): the BatchNorm layers' running statistics are recomputed on them;
3. **CORAL** at the output (Sun, Feng & Saenko, *Return of frustratingly easy domain adaptation*,
   AAAI 2016): the affine map ``y -> (y - m_t) C_t^-1/2 C_s^1/2 + m_s`` gives their predicted
   factors the mean m_s and covariance C_s of the source model's predictions for its own training
   songs (covariances shrunk as in :func:`sonicrec.familiarity.shrunk_covariance`); it is folded
   into the linear output layer.

The result is an ordinary checkpoint of the same architecture (``RUN/model/NAME``, marked
``adapted_from``), for queries of the new domain: ``sonicrec similar RUN song.ogg --model NAME``.
The run's own songs are of the source's domain, so the catalogue stays placed by the source model
(:func:`sonicrec.predict.predict_run` predicts them with it). Its familiarity score is with the new
domain: an input unlike the recordings it was adapted to is flagged, a song like the source's
training songs included.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sonicrec.checkpoint import INFERENCE_KEYS, load_checkpoint, save_checkpoint
from sonicrec.errors import AudioError, DataError, RunStage
from sonicrec.factors import Factors, Predictions
from sonicrec.familiarity import Familiarity, shrunk_covariance
from sonicrec.features import MemoryStore
from sonicrec.predict import FAMILIARITY_FILE, Predictor, audio_inputs, logmel_or_reason, predict_run
from sonicrec.rundir import RunDir, check_model_name
from sonicrec.train import band_statistics

log = logging.getLogger(__name__)

MIN_TRACKS = 32  # fewer recordings estimate neither the band statistics nor a covariance of the factors
STEPS = ("input", "batchnorm", "coral")  # the module docstring's three steps, in order


def adapt_predictor(
    predictor: Predictor, logmels: np.ndarray, reference: np.ndarray, *, steps: Sequence[str] = STEPS,
    batch_size: int = 64,
) -> Predictor:
    """A copy of ``predictor`` adapted to log-mels (n, n_mels, T) of the new domain (module docstring).

    ``reference``: (m, n_factors) the source model's predictions of its training songs, whose mean and
    covariance the adapted predictions of ``logmels`` take. ``steps``: which of :data:`STEPS` to
    take (all by default). The copy's familiarity is with the new domain: how far an input lies
    from ``logmels`` (:func:`_domain_familiarity`).
    """
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise DataError(f"unknown adaptation steps {unknown}: choose from {', '.join(STEPS)}")
    if len(logmels) < MIN_TRACKS:
        raise DataError(f"adapting a model needs at least {MIN_TRACKS} recordings of the new domain, "
                        f"not {len(logmels)}")
    model = copy.deepcopy(predictor.model).cpu()
    logmels = np.asarray(logmels, np.float16)  # the precision of the feature store and of prediction
    if "input" in steps:
        store = MemoryStore({str(i): x for i, x in enumerate(logmels)})
        model.set_input_norm(*map(torch.from_numpy, band_statistics(store, store.track_ids)))
    if "batchnorm" in steps:
        _recompute_batch_norm(model, logmels, batch_size)
    adapted = Predictor(model, predictor.config, target=predictor.target, device=torch.device("cpu"))
    factors, embeddings = adapted.embed_logmel(logmels, batch_size=batch_size)
    if "coral" in steps:  # the output layer only: the embeddings stay as they are
        _fold_coral(model.output, factors, reference)
    adapted.familiarity = _domain_familiarity(embeddings)
    return adapted


def _domain_familiarity(embeddings: np.ndarray) -> Familiarity:
    """Familiarity with the new domain: fitted on a seeded 80% of its recordings, calibrated on the rest."""
    order = np.random.default_rng(0).permutation(len(embeddings))
    held_out = max(1, len(order) // 5)
    return Familiarity.fit(embeddings[order[held_out:]], embeddings[order[:held_out]])


@torch.no_grad()
def _recompute_batch_norm(model: torch.nn.Module, logmels: np.ndarray, batch_size: int) -> None:
    """AdaBN: every BatchNorm layer's running mean and variance, averaged over batches of ``logmels``."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    try:
        for start in range(0, len(logmels), batch_size):
            model(torch.from_numpy(np.ascontiguousarray(logmels[start : start + batch_size], np.float32)))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()


@torch.no_grad()
def _fold_coral(output: torch.nn.Linear, predicted: np.ndarray, reference: np.ndarray) -> None:
    """Fold ``y -> (y - m_t) A + m_s`` into ``output`` (y = W h + b), with A = C_t^-1/2 C_s^1/2."""
    reference = np.asarray(reference, np.float64)
    predicted = np.asarray(predicted, np.float64)
    if reference.ndim != 2 or reference.shape[1] != predicted.shape[1] or len(reference) < 2:
        raise DataError(f"the reference predictions {reference.shape} do not match the model's "
                        f"{predicted.shape[1]} factors")
    whiten = _matrix_power(shrunk_covariance(predicted), -0.5)
    transform = whiten @ _matrix_power(shrunk_covariance(reference), 0.5)
    weight = output.weight.double()  # (k, D)
    bias = output.bias.double()
    m_t = torch.from_numpy(predicted.mean(axis=0))
    a = torch.from_numpy(transform)
    output.weight.copy_(a.T @ weight)
    output.bias.copy_((bias - m_t) @ a + torch.from_numpy(reference.mean(axis=0)))


def _matrix_power(symmetric: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(symmetric)
    return (vectors * np.maximum(values, 1e-12) ** power) @ vectors.T


@dataclass(frozen=True)
class Adaptation:
    """What :func:`adapt_run` wrote: the adapted model's name and checkpoint, the number of recordings
    it was adapted on, and (file, reason) of each that could not be used."""

    name: str
    checkpoint: Path
    n_tracks: int
    failures: list[tuple[Path, str]]


def adapt_run(
    run: RunDir | str | Path, source: str, audio: Sequence[str | Path], *, name: str | None = None,
    strict: bool = False, workers: int = 2, show_progress: bool = False,
) -> Adaptation:
    """Adapt the run's model ``source`` to audio files and manifests (:func:`sonicrec.predict.audio_inputs`);
    writes model ``name`` (default ``SOURCE-adapted``): its checkpoint, its familiarity and its
    predictions of the run's songs (made by ``source``).

    Files that cannot be decoded are left out and returned (``strict``: the first raises).
    """
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    name = name or f"{source}-adapted"
    check_model_name(name)
    if name == source:
        raise DataError(f"the adapted model needs a name other than its source's ({source!r})")
    state = load_checkpoint(run.checkpoint(source))
    predictor = Predictor.from_checkpoint(state, run.checkpoint(source), device="cpu")
    if predictor.adapted_from is not None:
        raise DataError(f"model {source!r} is itself adapted (from {predictor.adapted_from!r}): adapt the "
                        "model it came from")
    reference = training_predictions(run, source)
    files = [file for _, file in audio_inputs(audio)]
    logmels, failures = _decode(files, predictor, strict=strict, workers=workers, show_progress=show_progress)
    for _, reason in failures:
        log.warning("left out of the adaptation: %s", reason)
    adapted = adapt_predictor(predictor, logmels, reference)
    mean, std = adapted.model.band_mean.clone(), adapted.model.band_std.clone()
    out = run.checkpoint(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        {key: state[key] for key in INFERENCE_KEYS}
        | {"best_model": adapted.model.state_dict(), "input_norm": {"mean": mean, "std": std},
           "adapted_from": source, "adapted_tracks": len(logmels)},
        out,
    )
    adapted.familiarity.save(out.parent / FAMILIARITY_FILE)
    predict_run(run, name, show_progress=show_progress)
    log.info("adapted %s to %d recordings -> %s", source, len(logmels), out)
    return Adaptation(name, out, len(logmels), failures)


def training_predictions(run: RunDir, source: str) -> np.ndarray:
    """The source model's predictions of the run's training songs (n, k)."""
    path = run.prediction(source)
    if not path.is_file():
        raise DataError(f"no predictions of model {source!r} at {path}",
                        remedy=RunStage("predict", run.root, source))
    factors = Factors.load(run.factors)
    predictions = Predictions.load(path, n_factors=factors.n_factors)
    train = np.isin(predictions.song_ids, factors.songs("train"))
    if train.sum() < 2:
        raise DataError(f"{path} holds {int(train.sum())} training songs: at least 2 are needed")
    return predictions.factors[train]


def _decode(
    files: list[Path], predictor: Predictor, *, strict: bool, workers: int, show_progress: bool
) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """Log-mels (n, n_mels, T) float16 of the files that decode, and (file, reason) of those that do not."""
    one = partial(logmel_or_reason, cfg=predictor.config.audio, strict=strict)
    with ThreadPoolExecutor(max(1, min(workers, len(files)))) as pool:
        results = list(tqdm(pool.map(one, files), total=len(files), unit="file", disable=not show_progress))
    failures = [(file, why) for file, (_, why) in zip(files, results, strict=True) if why is not None]
    decoded = [x.astype(np.float16) for x, _ in results if x is not None]
    if not decoded:
        raise AudioError(f"none of the {len(files)} file(s) could be used"
                         + (f"; the first: {failures[0][1]}" if failures else ""))
    return np.stack(decoded), failures
