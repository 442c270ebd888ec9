"""Predicting song factors with a trained CNN: from log-mel arrays, audio files or the feature store.

Inputs are rounded to float16 (the feature store's precision) before the network, so a track
predicted from its audio file gets exactly the factors it gets from its stored features.

>>> predictor = Predictor.load("RUN/model/cnn-mse/checkpoint.pt")  # doctest: +SKIP
>>> predictor.predict_files(["new_song.ogg"]).shape  # doctest: +SKIP
(1, 40)
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from sonicrec.checkpoint import checkpoint_config, load_checkpoint
from sonicrec.config import AudioConfig, Config
from sonicrec.errors import AudioError, DataError, RunStage
from sonicrec.factors import Factors, Predictions
from sonicrec.familiarity import Familiarity, FamiliarityScores
from sonicrec.model import AudioCNN, select_device
from sonicrec.rundir import RunDir, check_model_name

if TYPE_CHECKING:
    from sonicrec.features import FeatureStore, LogMelStore

log = logging.getLogger(__name__)

FAMILIARITY_FILE = "familiarity.npz"


class Predictor:
    """A trained CNN in evaluation mode, with the configuration (front end included) it was trained with.

    Attributes
    ----------
    model : AudioCNN
    config : Config — ``config.audio`` is the front end :meth:`predict_files` uses.
    target : "unit" (trained on unit-normalised factors, loss mse) or "raw" (loss wpe).
    familiarity : how far inputs lie from the training songs (:mod:`sonicrec.familiarity`), or None
        for a model without one (``familiarity.npz`` beside the checkpoint, written by
        :func:`predict_run`).
    adapted_from : for a model adapted to another domain (:mod:`sonicrec.adapt`), its source's name
    """

    def __init__(
        self, model: AudioCNN, config: Config, *, target: str, device: torch.device,
        familiarity: Familiarity | None = None, adapted_from: str | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.config, self.target, self.device = config, target, device
        self.familiarity, self.adapted_from = familiarity, adapted_from

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> Predictor:
        """The best-validation model of a training checkpoint (``RUN/model/NAME/checkpoint.pt``)."""
        return cls.from_checkpoint(load_checkpoint(path), path, device=device)

    @classmethod
    def from_checkpoint(cls, state: dict, path: str | Path, *, device: str = "auto") -> Predictor:
        """:meth:`load` of a checkpoint already read from ``path`` (its familiarity lies beside it)."""
        config = checkpoint_config(state)
        model = AudioCNN.for_config(config)
        model.load_state_dict(state["best_model"])
        model.set_input_norm(state["input_norm"]["mean"], state["input_norm"]["std"])
        fam_path = Path(path).parent / FAMILIARITY_FILE
        familiarity = Familiarity.load(fam_path) if fam_path.is_file() else None
        return cls(
            model, config, target=state["target"], device=select_device(device), familiarity=familiarity,
            adapted_from=state.get("adapted_from"),
        )

    @property
    def n_factors(self) -> int:
        return self.model.n_factors

    def predict_logmel(self, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Factors of log-mel spectrograms: (B, n_mels, T) -> (B, n_factors) float32, always finite."""
        return self.embed_logmel(x, batch_size=batch_size)[0]

    @torch.no_grad()
    def embed_logmel(self, x: np.ndarray, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Factors (B, n_factors) and penultimate activations (B, D), float32, of log-mels (B, n_mels, T).

        Raises :class:`DataError` if an input is not finite (:func:`finite_rows` finds which) or
        the network's output is not (a corrupt or diverged model): neither is ever returned.
        """
        x = np.asarray(x)
        if x.ndim != 3:
            raise DataError(f"expected log-mel spectrograms (batch, n_mels, frames), got shape {x.shape}")
        bad = np.flatnonzero(~finite_rows(x))
        if len(bad):
            raise DataError(f"log-mel spectrogram(s) {bad[:5].tolist()} of the batch are not finite")
        factors, embeddings = [], []
        for start in range(0, len(x), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], np.float16))
            h = self.model.embed(chunk.to(self.device))
            factors.append(self.model.output(h).float().cpu().numpy())
            embeddings.append(h.float().cpu().numpy())
        if not factors:
            return np.empty((0, self.n_factors), np.float32), np.empty((0, 0), np.float32)
        factors, embeddings = np.concatenate(factors), np.concatenate(embeddings)
        if not (np.isfinite(factors).all() and np.isfinite(embeddings).all()):
            raise DataError("the model predicts non-finite factors (NaN/inf): its checkpoint is corrupt or "
                            "its training diverged")
        return factors, embeddings

    def assess_logmel(self, x: np.ndarray) -> tuple[np.ndarray, FamiliarityScores | None]:
        """Factors (B, n_factors) of log-mels (B, n_mels, T) and their familiarity (None without a model)."""
        factors, embeddings = self.embed_logmel(x)
        return factors, self.familiarity_of(embeddings)

    def predict_files(
        self, paths: Sequence[str | Path], *, batch_size: int = 64, workers: int = 2,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Factors of audio files, front end on the fly: (len(paths), n_factors) float32.

        Raises :class:`~sonicrec.errors.AudioError` naming the first file that cannot be used
        (:meth:`predict_each` records them instead).
        """
        options = dict(batch_size=batch_size, workers=workers, show_progress=show_progress)
        return self.assess_files(paths, **options)[0]

    def assess_files(
        self, paths: Sequence[str | Path], *, batch_size: int = 64, workers: int = 2,
        show_progress: bool = False,
    ) -> tuple[np.ndarray, FamiliarityScores | None]:
        """Factors of audio files (as :meth:`predict_files`) and their familiarity (None without a model)."""
        result = self.predict_each(
            paths, batch_size=batch_size, workers=workers, strict=True, show_progress=show_progress
        )
        return result.factors, self.familiarity_of(result.embeddings) if len(result.index) else None

    def predict_each(
        self, paths: Sequence[str | Path], *, batch_size: int = 64, workers: int = 2, strict: bool = False,
        show_progress: bool = False,
    ) -> BatchPredictions:
        """Factors of the audio files that can be used, and why the others cannot.

        ``workers`` threads (at most one per file) decode and compute log-mels while the network
        runs. ``strict``: raise the first :class:`~sonicrec.errors.AudioError` instead.
        """
        paths = [Path(p) for p in paths]
        front_end = partial(logmel_or_reason, cfg=self.config.audio, strict=strict)
        with ThreadPoolExecutor(max(1, min(workers, len(paths)))) as pool:
            inputs = _ahead(pool, front_end, paths, 2 * batch_size)
            return self._predict_inputs(inputs, len(paths), batch_size=batch_size, progress=show_progress)

    def predict_stored(
        self, store: LogMelStore, track_ids: Sequence[str], *, batch_size: int = 64,
        show_progress: bool = False,
    ) -> BatchPredictions:
        """Factors of tracks of a feature store, and which cannot be used (stored features that are
        not finite: a store written before they were refused)."""
        inputs = (_stored_or_reason(store, track_id) for track_id in track_ids)
        return self._predict_inputs(inputs, len(track_ids), batch_size=batch_size, progress=show_progress)

    def _predict_inputs(
        self, inputs: Iterator[tuple[np.ndarray | None, str | None]], n: int, *, batch_size: int,
        progress: bool,
    ) -> BatchPredictions:
        """Factors of ``n`` inputs, each a log-mel (n_mels, T) or the reason there is none."""
        done, factors, embeddings, failures = [], [], [], []
        with tqdm(total=n, unit="track", disable=not progress) as bar:
            for batch in _batches(enumerate(inputs), batch_size):
                failures += [(i, reason) for i, (_, reason) in batch if reason is not None]
                usable = [(i, x) for i, (x, _) in batch if x is not None]
                if usable:
                    done += [i for i, _ in usable]
                    f, h = self.embed_logmel(np.stack([x for _, x in usable]), batch_size=batch_size)
                    factors.append(f)
                    embeddings.append(h)
                bar.update(len(batch))
        if not factors:
            return BatchPredictions(np.zeros(0, np.int64), np.empty((0, self.n_factors), np.float32),
                                    np.empty((0, 0), np.float32), failures)
        return BatchPredictions(np.asarray(done, dtype=np.int64), np.concatenate(factors),
                                np.concatenate(embeddings), failures)

    def predict_store(
        self, store: LogMelStore, track_ids: Sequence[str] | None = None, *, batch_size: int = 64,
        show_progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Factors of tracks of a feature store (all by default) -> (ids (S,) str, (S, k) float32)."""
        ids, factors, _ = self.embed_store(
            store, track_ids, batch_size=batch_size, show_progress=show_progress
        )
        return ids, factors

    def embed_store(
        self, store: LogMelStore, track_ids: Sequence[str] | None = None, *, batch_size: int = 64,
        show_progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids (S,) str, factors (S, k) and penultimate activations (S, D) of a feature store's tracks.

        Tracks whose stored features are not finite are left out (:meth:`predict_stored`), with a
        warning naming them.
        """
        ids = np.asarray(list(store.track_ids if track_ids is None else track_ids), dtype=str)
        result = self.predict_stored(store, ids, batch_size=batch_size, show_progress=show_progress)
        skipped = [repr(ids[i]) for i, _ in result.failures]
        if skipped:
            log.warning("%d track(s) with non-finite stored features not predicted: %s", len(skipped),
                        ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
        return ids[result.index], result.factors, result.embeddings

    def familiarity_of(self, embeddings: np.ndarray) -> FamiliarityScores | None:
        """Familiarity scores of penultimate activations (B, D); None for a model without one."""
        return None if self.familiarity is None else self.familiarity.score(embeddings)


@dataclass(frozen=True)
class BatchPredictions:
    """What :meth:`Predictor.predict_each` (audio files) or :meth:`Predictor.predict_stored` (stored
    tracks) made of a list of inputs.

    Attributes
    ----------
    index : (m,) int64, positions in the given list of the inputs predicted, in order
    factors : (m, n_factors) float32, finite, their factors
    embeddings : (m, D) float32, their penultimate activations (for familiarity)
    failures : (position, reason) of each input that could not be used
    """

    index: np.ndarray
    factors: np.ndarray
    embeddings: np.ndarray
    failures: list[tuple[int, str]]

    def per_input(self, n: int) -> tuple[list[np.ndarray | None], list[str | None]]:
        """For each of the ``n`` inputs, its factors (k,) or None, and the reason it failed or None."""
        factors: list[np.ndarray | None] = [None] * n
        errors: list[str | None] = [None] * n
        for i, f in zip(self.index, self.factors, strict=True):
            factors[i] = f
        for i, reason in self.failures:
            errors[i] = reason
        return factors, errors


def finite_rows(x: np.ndarray) -> np.ndarray:
    """(B,) bool: which of a batch of arrays (B, ...) hold only finite numbers."""
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def logmel_or_reason(path: Path, cfg: AudioConfig, strict: bool) -> tuple[np.ndarray | None, str | None]:
    """The log-mel of an audio file, or why there is none (``strict``: raise the AudioError instead)."""
    from sonicrec.audio import file_to_logmel

    try:
        return file_to_logmel(path, cfg), None
    except AudioError as exc:
        if strict:
            raise
        return None, str(exc)


def _stored_or_reason(store: LogMelStore, track_id: str) -> tuple[np.ndarray | None, str | None]:
    x = store.get(track_id)
    if np.isfinite(x).all():
        return x, None
    return None, f"track {track_id}: its stored features are not finite"


def _ahead(pool: ThreadPoolExecutor, fn, items: Sequence, depth: int) -> Iterator:
    """``fn(item)`` for each item, in order, computed by ``pool`` at most ``depth`` items ahead."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(items: Iterator, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_run(
    run: RunDir | str | Path, name: str, *, checkpoint: str | Path | None = None, batch_size: int = 64,
    show_progress: bool = True,
) -> Path:
    """Predict every track of RUN/features with model ``name``; writes and returns RUN/predictions/NAME.npz
    (``song_ids`` (S,) str, ``factors`` (S, k) float32), and fits the model's familiarity on the
    way (familiarity.npz beside the checkpoint: the train split's activations, calibrated on the
    valid split's). For a model adapted to another domain (:mod:`sonicrec.adapt`) the run's songs, of
    the source's domain, are placed by its source model, and its familiarity (with the new domain,
    written by :func:`sonicrec.adapt.adapt_run`) is kept.

    ``checkpoint``: the model file (default RUN/model/NAME/checkpoint.pt).
    """
    run, checkpoint = run_checkpoint(run, name, checkpoint)
    predictor = Predictor.load(checkpoint)
    store = stored_tracks(run)
    if predictor.adapted_from is not None:
        source = Predictor.load(run.checkpoint(predictor.adapted_from))
        song_ids, factors = source.predict_store(store, batch_size=batch_size, show_progress=show_progress)
        return save_run_predictions(run, name, song_ids, factors)
    song_ids, factors, embeddings = predictor.embed_store(
        store, batch_size=batch_size, show_progress=show_progress
    )
    familiarity = _fit_familiarity(run, song_ids, embeddings)
    if familiarity is not None:
        familiarity.save(checkpoint.parent / FAMILIARITY_FILE)
    return save_run_predictions(run, name, song_ids, factors)


def run_checkpoint(
    run: RunDir | str | Path, name: str, checkpoint: str | Path | None = None
) -> tuple[RunDir, Path]:
    """The run directory and the model file of its model ``name`` (default RUN/model/NAME/checkpoint.pt)."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    check_model_name(name)
    return run, Path(checkpoint or run.checkpoint(name))


def stored_tracks(run: RunDir) -> FeatureStore:
    """The run's feature store, which must hold at least one track."""
    from sonicrec.features import FeatureStore

    store = FeatureStore(run.features)
    if len(store) == 0:
        raise DataError(f"the feature store {run.features} is empty", remedy=RunStage("ingest", run.root))
    return store


def save_run_predictions(run: RunDir, name: str, song_ids: np.ndarray, factors: np.ndarray) -> Path:
    """Write RUN/predictions/NAME.npz (song ids (S,) str, factors (S, k) float32) and return its path."""
    path = run.prediction(name)
    Predictions(song_ids, factors).save(path)
    log.info("predicted %d tracks with %s -> %s", len(song_ids), name, path)
    return path


def _fit_familiarity(run: RunDir, song_ids: np.ndarray, embeddings: np.ndarray) -> Familiarity | None:
    """Familiarity fitted on the train split's activations, calibrated on the valid split's (None,
    logged, without CF factors or with fewer than two train songs)."""
    if not run.factors.is_file():
        log.warning("no CF factors at %s: no familiarity model (its training songs are unknown)", run.factors)
        return None
    factors = Factors.load(run.factors)
    train = np.isin(song_ids, factors.songs("train"))
    if train.sum() < 2:
        log.warning("only %d train songs have features: no familiarity model", int(train.sum()))
        return None
    return Familiarity.fit(embeddings[train], embeddings[np.isin(song_ids, factors.songs("valid"))])


# --- audio files given by the user ----------------------------------------------------------------


@dataclass(frozen=True)
class AudioPredictions:
    """What :func:`predict_audio` wrote: ``path`` (the .npz), the number of tracks predicted and
    of factors, (track id, file, reason) of each file that could not be used, and the ids of those
    predicted that are unfamiliar to the model (empty for a model without familiarity)."""

    path: Path
    n_predicted: int
    n_factors: int
    failures: list[tuple[str, Path, str]]
    unfamiliar: list[str]


def audio_inputs(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(track id, file) for audio files and ``track_id,path`` manifests (``.csv``/``.tsv``).

    A manifest's ids are kept as given (they must be unique). A file's id is its name without
    suffix; files whose names clash get as many of their folders as tell them apart
    (``a/snow``, ``b/snow``), and the same file given twice a ``#2``.
    """
    from sonicrec.features import read_manifest

    fixed: list[tuple[int, str, Path]] = []
    files: list[tuple[int, Path]] = []
    for position, item in enumerate(map(Path, paths)):
        if item.suffix.lower() in (".csv", ".tsv"):
            fixed += [(position, t.track_id, Path(t.path)) for t in read_manifest(item)]
        else:
            files.append((position, item))
    ids = [track_id for _, track_id, _ in fixed]
    if len(set(ids)) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"track id {twice!r} is given twice in the manifests: give unique ids")
    named = [(p, i, f) for (p, f), i in zip(files, _file_ids([f for _, f in files], set(ids)), strict=True)]
    return [(track_id, file) for _, track_id, file in sorted(fixed + named, key=lambda e: e[0])]


def _file_ids(files: list[Path], taken: set[str]) -> list[str]:
    """Ids for files: the name without suffix, lengthened by parent folders where names clash."""
    parts = [f.absolute().with_suffix("").parts for f in files]
    depth = [1] * len(files)
    while True:
        ids = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        files_named: dict[str, set] = defaultdict(set)
        for name, p in zip(ids, parts, strict=True):
            files_named[name].add(p)
        clash = [
            i for i, name in enumerate(ids)
            if (len(files_named[name]) > 1 or name in taken) and depth[i] < len(parts[i])
        ]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    seen: dict[str, int] = {}
    unique = []
    for name in ids:  # what folders cannot tell apart (the same file twice) gets a number
        n = seen[name] = seen.get(name, int(name in taken)) + 1
        unique.append(name if n == 1 else f"{name}#{n}")
    return unique


def predict_audio(
    checkpoint: str | Path, paths: Sequence[str | Path], out: str | Path, *, batch_size: int = 64,
    workers: int = 2, strict: bool = False, show_progress: bool = False,
) -> AudioPredictions:
    """Predict audio files and manifests (:func:`audio_inputs`) and write ``out`` (.npz: ``song_ids``,
    ``factors`` (n, k) float32, ``paths``; ``familiarity_distance``, ``familiar`` when the model has
    a familiarity), leaving out and returning the files that cannot be used.

    ``strict``: raise the first :class:`~sonicrec.errors.AudioError` instead; nothing is written.
    """
    inputs = audio_inputs(paths)
    predictor = Predictor.load(checkpoint)
    result = predictor.predict_each(
        [file for _, file in inputs], batch_size=batch_size, workers=workers, strict=strict,
        show_progress=show_progress,
    )
    failures = [(inputs[i][0], inputs[i][1], reason) for i, reason in result.failures]
    if len(result.index) == 0:
        raise AudioError(f"none of the {len(inputs)} file(s) could be used; the first: {failures[0][2]}")
    chosen = [inputs[i] for i in result.index]
    ids = [track_id for track_id, _ in chosen]
    familiarity = predictor.familiarity_of(result.embeddings)
    extra = {"paths": np.array([str(f) for _, f in chosen])}
    if familiarity is not None:
        extra |= {"familiarity_distance": familiarity.distance, "familiar": familiarity.familiar}
    Predictions(ids, result.factors, extra).save(out)
    log.info("predicted %d of %d files -> %s", len(chosen), len(inputs), out)
    familiar = np.ones(len(ids), bool) if familiarity is None else familiarity.familiar
    unfamiliar = [track_id for track_id, ok in zip(ids, familiar, strict=True) if not ok]
    return AudioPredictions(Path(out), len(chosen), predictor.n_factors, failures, unfamiliar)
