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
from sonicrec.io import atomic_save_npz
from sonicrec.model import AudioCNN, select_device
from sonicrec.rundir import RunDir
from sonicrec.train import LogMelStore, check_model_name, load_checkpoint

log = logging.getLogger(__name__)


class Predictor:
    """A trained CNN in evaluation mode, with the configuration (front end included) it was trained with.

    Attributes
    ----------
    model : AudioCNN
    config : Config — ``config.audio`` is the front end :meth:`predict_files` uses.
    target : "unit" (trained on unit-normalised factors, loss mse) or "raw" (loss wpe).
    """

    def __init__(self, model: AudioCNN, config: Config, *, target: str, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.config, self.target, self.device = config, target, device

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> Predictor:
        """The best-validation model of a training checkpoint (``RUN/model/NAME/checkpoint.pt``)."""
        state = load_checkpoint(path)
        config = Config.from_dict(state["config"])
        model = AudioCNN(config.model)
        model.load_state_dict(state["best_model"])
        model.set_input_norm(state["input_norm"]["mean"], state["input_norm"]["std"])
        return cls(model, config, target=state["target"], device=select_device(device))

    @property
    def n_factors(self) -> int:
        return self.config.model.n_factors

    @torch.no_grad()
    def predict_logmel(self, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Factors of log-mel spectrograms: (B, n_mels, T) -> (B, n_factors) float32."""
        x = np.asarray(x)
        if x.ndim != 3:
            raise DataError(f"expected log-mel spectrograms (batch, n_mels, frames), got shape {x.shape}")
        out = np.empty((len(x), self.n_factors), np.float32)
        for start in range(0, len(x), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], np.float16))
            out[start : start + len(chunk)] = self.model(chunk.to(self.device)).float().cpu().numpy()
        return out

    def predict_files(
        self, paths: Sequence[str | Path], *, batch_size: int = 64, workers: int = 2,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Factors of audio files, front end on the fly: (len(paths), n_factors) float32.

        ``workers`` threads decode and compute log-mels while the network runs. Raises
        :class:`~sonicrec.errors.AudioError` naming the first file that cannot be used.
        """
        from sonicrec.audio import file_to_logmel

        paths = [Path(p) for p in paths]
        out = np.empty((len(paths), self.n_factors), np.float32)
        front_end = partial(file_to_logmel, cfg=self.config.audio)
        with (
            ThreadPoolExecutor(max(1, workers)) as pool,
            tqdm(total=len(paths), unit="file", disable=not show_progress) as bar,
        ):
            logmels = _ahead(pool, front_end, paths, 2 * batch_size)
            for start, batch in _batches(logmels, batch_size):
                out[start : start + len(batch)] = self.predict_logmel(np.stack(batch), batch_size=batch_size)
                bar.update(len(batch))
        return out

    def predict_store(
        self, store: LogMelStore, track_ids: Sequence[str] | None = None, *, batch_size: int = 64,
        show_progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Factors of tracks of a feature store (all by default) -> (ids (S,) str, (S, k) float32)."""
        ids = list(store.track_ids if track_ids is None else track_ids)
        out = np.empty((len(ids), self.n_factors), np.float32)
        with tqdm(total=len(ids), unit="track", disable=not show_progress) as bar:
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                out[start : start + len(chunk)] = self.predict_logmel(store.get_many(chunk))
                bar.update(len(chunk))
        return np.asarray(ids, dtype=str), out


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
    (``song_ids`` (S,) str, ``factors`` (S, k) float32)."""
    from sonicrec.features import FeatureStore

    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    check_model_name(name)
    predictor = Predictor.load(run.model / name / "checkpoint.pt")
    store = FeatureStore(run.features)
    if len(store) == 0:
        raise DataError(f"the feature store {run.features} is empty: run sonicrec ingest first")
    song_ids, factors = predictor.predict_store(store, show_progress=show_progress)
    path = run.prediction(name)
    atomic_save_npz(path, song_ids=song_ids, factors=factors)
    log.info("predicted %d tracks with %s -> %s", len(song_ids), name, path)
    return path
