"""Predicting song factors with a trained CNN: from log-mel arrays, audio files or the feature store.

Inputs are rounded to float16 (the feature store's precision) before the network, so a track
predicted from its audio file gets exactly the factors it gets from its stored features.

>>> predictor = Predictor.load("RUN/model/cnn-mse/checkpoint.pt")  # doctest: +SKIP
>>> predictor.predict_files(["new_song.ogg"]).shape  # doctest: +SKIP
(1, 40)
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sonicrec.config import Config
from sonicrec.errors import DataError
from sonicrec.familiarity import Familiarity, FamiliarityScores
from sonicrec.io import atomic_save_npz
from sonicrec.model import AudioCNN, select_device
from sonicrec.rundir import RunDir
from sonicrec.train import LogMelStore, check_model_name, load_checkpoint

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
    """

    def __init__(
        self, model: AudioCNN, config: Config, *, target: str, device: torch.device,
        familiarity: Familiarity | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.config, self.target, self.device = config, target, device
        self.familiarity = familiarity

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> Predictor:
        """The best-validation model of a training checkpoint (``RUN/model/NAME/checkpoint.pt``)."""
        state = load_checkpoint(path)
        config = Config.from_dict(state["config"])
        model = AudioCNN(config.model)
        model.load_state_dict(state["best_model"])
        model.set_input_norm(state["input_norm"]["mean"], state["input_norm"]["std"])
        fam_path = Path(path).parent / FAMILIARITY_FILE
        familiarity = Familiarity.load(fam_path) if fam_path.is_file() else None
        return cls(
            model, config, target=state["target"], device=select_device(device), familiarity=familiarity
        )

    @property
    def n_factors(self) -> int:
        return self.config.model.n_factors

    def predict_logmel(self, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Factors of log-mel spectrograms: (B, n_mels, T) -> (B, n_factors) float32."""
        return self.embed_logmel(x, batch_size=batch_size)[0]

    @torch.no_grad()
    def embed_logmel(self, x: np.ndarray, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Factors (B, n_factors) and penultimate activations (B, D), float32, of log-mels (B, n_mels, T)."""
        x = np.asarray(x)
        if x.ndim != 3:
            raise DataError(f"expected log-mel spectrograms (batch, n_mels, frames), got shape {x.shape}")
        factors, embeddings = [], []
        for start in range(0, len(x), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], np.float16))
            h = self.model.embed(chunk.to(self.device))
            factors.append(self.model.output(h).float().cpu().numpy())
            embeddings.append(h.float().cpu().numpy())
        if not factors:
            return np.empty((0, self.n_factors), np.float32), np.empty((0, 0), np.float32)
        return np.concatenate(factors), np.concatenate(embeddings)

    def assess_logmel(self, x: np.ndarray) -> tuple[np.ndarray, FamiliarityScores | None]:
        """Factors (B, n_factors) of log-mels (B, n_mels, T) and their familiarity (None without a model)."""
        factors, embeddings = self.embed_logmel(x)
        return factors, None if self.familiarity is None else self.familiarity.score(embeddings)

    def predict_files(
        self, paths: Sequence[str | Path], *, batch_size: int = 64, workers: int = 2,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Factors of audio files, front end on the fly: (len(paths), n_factors) float32.

        ``workers`` threads decode and compute log-mels while the network runs. Raises
        :class:`~sonicrec.errors.AudioError` naming the first file that cannot be used.
        """
        options = dict(batch_size=batch_size, workers=workers, show_progress=show_progress)
        return self.assess_files(paths, **options)[0]

    def assess_files(
        self, paths: Sequence[str | Path], *, batch_size: int = 64, workers: int = 2,
        show_progress: bool = False,
    ) -> tuple[np.ndarray, FamiliarityScores | None]:
        """Factors of audio files (as :meth:`predict_files`) and their familiarity (None without a model)."""
        from sonicrec.audio import file_to_logmel

        paths = [Path(p) for p in paths]
        factors, embeddings = [], []
        front_end = partial(file_to_logmel, cfg=self.config.audio)
        with (
            ThreadPoolExecutor(max(1, workers)) as pool,
            tqdm(total=len(paths), unit="file", disable=not show_progress) as bar,
        ):
            logmels = _ahead(pool, front_end, paths, 2 * batch_size)
            for _, batch in _batches(logmels, batch_size):
                f, h = self.embed_logmel(np.stack(batch), batch_size=batch_size)
                factors.append(f)
                embeddings.append(h)
                bar.update(len(batch))
        if not factors:
            return np.empty((0, self.n_factors), np.float32), None
        scores = None if self.familiarity is None else self.familiarity.score(np.concatenate(embeddings))
        return np.concatenate(factors), scores

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
        """Ids (S,) str, factors (S, k) and penultimate activations (S, D) of a feature store's tracks."""
        ids = list(store.track_ids if track_ids is None else track_ids)
        factors, embeddings = [], []
        with tqdm(total=len(ids), unit="track", disable=not show_progress) as bar:
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                f, h = self.embed_logmel(store.get_many(chunk))
                factors.append(f)
                embeddings.append(h)
                bar.update(len(chunk))
        if not ids:
            return np.asarray(ids, dtype=str), np.empty((0, self.n_factors), np.float32), np.empty((0, 0))
        return np.asarray(ids, dtype=str), np.concatenate(factors), np.concatenate(embeddings)


def _ahead(pool: ThreadPoolExecutor, fn, items: Sequence, depth: int) -> Iterator:
    """``fn(item)`` for each item, in order, computed by ``pool`` at most ``depth`` items ahead."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(items: Iterator[np.ndarray], size: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    start, batch = 0, []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield start, batch
            start, batch = start + size, []
    if batch:
        yield start, batch


def predict_run(run: RunDir | str | Path, name: str, *, show_progress: bool = True) -> Path:
    """Predict every track of RUN/features with model ``name``; writes and returns RUN/predictions/NAME.npz
    (``song_ids`` (S,) str, ``factors`` (S, k) float32), and fits the model's familiarity on the
    way (RUN/model/NAME/familiarity.npz: the train split's activations, calibrated on the valid split's).
    """
    from sonicrec.features import FeatureStore

    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    check_model_name(name)
    predictor = Predictor.load(run.model / name / "checkpoint.pt")
    store = FeatureStore(run.features)
    if len(store) == 0:
        raise DataError(f"the feature store {run.features} is empty: run sonicrec ingest first")
    song_ids, factors, embeddings = predictor.embed_store(store, show_progress=show_progress)
    familiarity = _fit_familiarity(run, song_ids, embeddings)
    if familiarity is not None:
        familiarity.save(run.model / name / FAMILIARITY_FILE)
    path = run.prediction(name)
    atomic_save_npz(path, song_ids=song_ids, factors=factors)
    log.info("predicted %d tracks with %s -> %s", len(song_ids), name, path)
    return path


def _fit_familiarity(run: RunDir, song_ids: np.ndarray, embeddings: np.ndarray) -> Familiarity | None:
    """Familiarity fitted on the train split's activations, calibrated on the valid split's (None,
    logged, without CF factors or with fewer than two train songs)."""
    from sonicrec.factors import Factors

    if not run.factors.is_file():
        log.warning("no CF factors at %s: no familiarity model (its training songs are unknown)", run.factors)
        return None
    factors = Factors.load(run.factors)
    train = np.isin(song_ids, factors.songs("train"))
    if train.sum() < 2:
        log.warning("only %d train songs have features: no familiarity model", int(train.sum()))
        return None
    return Familiarity.fit(embeddings[train], embeddings[np.isin(song_ids, factors.songs("valid"))])
