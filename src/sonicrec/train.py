"""Training the CNN: a plain PyTorch loop from the feature store to song factors.

Minibatch SGD with Nesterov momentum (or Adam) on one of two regression objectives, or on a
learning-to-rank one (``bpr``, ``softmax``, ``mse+bpr``, ``mse+softmax``: :mod:`sonicrec.losses`):

* ``mse``: squared error to the song's unit-normalised WMF factors, averaged over the k factors.
* ``wpe``: the paper's weighted prediction error, the WMF objective with the user factors fixed.
  For song i with predicted factors y (raw scale, not normalised)::

      WPE_i(y) = sum_u c_ui (p_ui - x_u . y)^2 + lambda |y|^2          (sum over ALL users u)
               = y' A_i y - 2 b_i' y + d_i,
      A_i = X'X + sum_{u plays i} (c_ui - 1) x_u x_u' + lambda I,  b_i = sum_{u plays i} c_ui x_u,
      d_i = sum_{u plays i} c_ui,

  with p_ui = 1 if u played i else 0, c_ui = 1 + alpha log(1 + count / epsilon) (0 plays: c = 1)
  and alpha, epsilon, lambda from ``CFConfig``. Its minimum is the ALS fold-in of song i. The loss
  is ``WPE_i / s`` with one constant s = mean_i tr(A_i) over the training songs, so that its
  curvature matches the MSE loss and the same learning rates work.

Each epoch visits the training songs in a seeded random order, each cropped at a seeded random
time shift (the crops are drawn by the sampler in the main process, so DataLoader workers only
read the memory-mapped store). Validation runs on whole excerpts after every epoch; training
stops early when it has not improved for ``patience`` epochs, or, while ``train.lr_decays`` are
left, goes back to its best epoch and goes on with the learning rate cut by ``lr_decay_factor``
(step decay on a plateau, restarting from the best weights). After every epoch one checkpoint
dict (:mod:`sonicrec.checkpoint`) is written atomically to RUN/model/NAME/checkpoint.pt, and the
per-epoch metrics to RUN/model/NAME/metrics.csv; ``resume=True`` continues from it bit for bit.

Data-parallel training (``train_run(..., ddp=True)``, ``sonicrec train --ddp`` under ``torchrun``):
every process holds a replica wrapped in ``DistributedDataParallel`` (gloo on CPU, NCCL on GPUs:
one per process, ``cuda:LOCAL_RANK``). ``train.batch_size`` stays the global batch: each of the W
processes takes batch_size / W songs of it, strided out of the same seeded order and crops as a
single process (:class:`CropSampler`), so with no dropout and no BatchNorm (or SyncBatchNorm, used
on GPUs) it follows the single-process run up to floating-point summation order. Rank 0 alone
writes the checkpoint, which loads without DDP.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from sonicrec.augment import Augmenter
from sonicrec.cf import confidence
from sonicrec.checkpoint import resume_checkpoint, save_checkpoint
from sonicrec.config import CFConfig, Config
from sonicrec.errors import ConfigError, DataError, TrainingError
from sonicrec.factors import Factors
from sonicrec.interactions import PlayMatrix, read_play_matrix
from sonicrec.io import atomic_path
from sonicrec.losses import RankingObjective, SumObjective, known_user_plays
from sonicrec.model import AudioCNN, select_device
from sonicrec.rundir import CHECKPOINT_FILE, METRICS_FILE, RunDir

if TYPE_CHECKING:
    from sonicrec.features import LogMelStore

log = logging.getLogger(__name__)

MIN_TRAIN_SONGS = 8


# --- objectives ---------------------------------------------------------------------------------


class MSEObjective:
    """Squared error to unit-normalised factors, mean over factors.

    Parameters
    ----------
    targets : (N, k) unit-normalised song factors; songs are addressed by row.
    """

    name = "mse"
    target = "unit"

    def __init__(self, targets: np.ndarray) -> None:
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device) -> MSEObjective:
        self.targets = self.targets.to(device)
        return self

    def per_song(self, pred: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Loss of each song: pred (B, k), rows (B,) -> (B,)."""
        return ((pred - self.targets[rows]) ** 2).mean(dim=1)

    def best_constant(self) -> torch.Tensor:
        """(k,) the single prediction with the least total loss: the mean target."""
        return self.targets.mean(dim=0)


class WPEObjective:
    """Weighted prediction error (module docstring), as quadratic forms of the prediction.

    Parameters
    ----------
    quad : (N, k, k) A_i;  lin : (N, k) b_i;  const : (N,) d_i;  scale : the constant s.
    """

    name = "wpe"
    target = "raw"

    def __init__(self, quad: np.ndarray, lin: np.ndarray, const: np.ndarray, scale: float) -> None:
        self.quad = torch.as_tensor(np.asarray(quad, dtype=np.float32))
        self.lin = torch.as_tensor(np.asarray(lin, dtype=np.float32))
        self.const = torch.as_tensor(np.asarray(const, dtype=np.float32))
        self.scale = float(scale)

    def __len__(self) -> int:
        return len(self.const)

    def to(self, device: torch.device) -> WPEObjective:
        self.quad, self.lin, self.const = (t.to(device) for t in (self.quad, self.lin, self.const))
        return self

    def per_song(self, pred: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Loss of each song: pred (B, k), rows (B,) -> (B,)."""
        quadratic = torch.einsum("bi,bij,bj->b", pred, self.quad[rows], pred)
        return (quadratic - 2 * (self.lin[rows] * pred).sum(dim=1) + self.const[rows]) / self.scale

    def best_constant(self) -> torch.Tensor:
        """(k,) the single prediction with the least total loss: (sum A_i)^-1 sum b_i."""
        a, b = self.quad.double().sum(dim=0), self.lin.double().sum(dim=0)
        return torch.linalg.solve(a, b).float()

    @classmethod
    def from_plays(
        cls,
        plays: PlayMatrix,
        factors: Factors,
        song_ids: Sequence[str],
        cf: CFConfig,
        *,
        scale: float | None = None,
    ) -> tuple[list[str], WPEObjective]:
        """Build the objective of ``song_ids`` from their play counts and the fixed user factors.

        Songs without plays by a user with factors are skipped (logged). ``scale`` defaults to the
        mean trace of A_i over these songs; pass the training set's to validation.

        Returns
        -------
        kept : the song ids kept, in the order of the objective's rows
        objective : WPEObjective
        """
        user_factors = factors.user_factors.astype(np.float64)  # (U, k)
        wanted = list(song_ids)
        counts = known_user_plays(plays, factors, wanted, kind="WPE")  # (U, S) by song
        conf = confidence(counts.data.astype(np.float64), alpha=cf.alpha, epsilon=cf.epsilon)

        k = user_factors.shape[1]
        gram = user_factors.T @ user_factors + cf.regularization * np.eye(k)  # (k, k)
        played = np.diff(counts.indptr) > 0
        columns = np.flatnonzero(played)
        kept = [wanted[j] for j in columns]
        missing = len(wanted) - len(kept)
        if missing:
            shown = ", ".join(wanted[j] for j in np.flatnonzero(~played))[:200]
            log.warning("WPE: %d song(s) have no usable plays and are skipped: %s", missing, shown)
        quad = np.empty((len(kept), k, k))
        lin = np.empty((len(kept), k))
        const = np.empty(len(kept))
        for i, j in enumerate(columns):
            plays_of_song = slice(counts.indptr[j], counts.indptr[j + 1])
            x = user_factors[counts.indices[plays_of_song]]  # (n_i, k)
            c = conf[plays_of_song]  # (n_i,)
            quad[i] = gram + (x * (c - 1)[:, None]).T @ x
            lin[i] = c @ x
            const[i] = c.sum()
        if scale is None:
            scale = float(np.trace(quad, axis1=1, axis2=2).mean()) if len(kept) else 1.0
        return kept, cls(quad, lin, const, scale)


Objective = MSEObjective | WPEObjective | RankingObjective | SumObjective


# --- data ---------------------------------------------------------------------------------------


class CropSampler(Sampler):
    """Yields ``(row, first_frame)`` keys: a seeded order and seeded time shifts, new each epoch.

    With ``shuffle=False`` and ``crop_frames >= n_frames`` it yields every row once, uncropped.
    Distributed (``num_replicas`` > 1), process ``rank`` takes every ``num_replicas``-th key of that
    same sequence, so consecutive batches of the processes make up the single-process batches. As
    torch's ``DistributedSampler``, a shuffled sequence is padded with its first keys to a multiple of
    ``num_replicas`` (every process takes the same number of steps); an unshuffled one is not.
    """

    def __init__(
        self, n_songs: int, *, shuffle: bool, max_offset: int, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.n_songs, self.shuffle, self.max_offset, self.seed = n_songs, shuffle, max_offset, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.shuffle:
            return -(-self.n_songs // self.num_replicas)
        return len(range(self.rank, self.n_songs, self.num_replicas))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n_songs) if self.shuffle else np.arange(self.n_songs)
        offsets = rng.integers(0, self.max_offset + 1, size=self.n_songs)
        keys = list(zip(order.tolist(), offsets.tolist(), strict=True))
        if self.num_replicas == 1:
            return iter(keys)
        if self.shuffle:
            padding = len(self) * self.num_replicas - len(keys)
            keys += (keys * self.num_replicas)[:padding]
        return iter(keys[self.rank :: self.num_replicas])


class LogMelDataset(Dataset):
    """Reads ``(features (n_mels, frames), row)`` for a ``(row, first_frame)`` key; no state."""

    def __init__(self, store: LogMelStore, track_ids: Sequence[str], frames: int) -> None:
        self.store, self.track_ids, self.frames = store, list(track_ids), frames

    def __len__(self) -> int:
        return len(self.track_ids)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        row, first = key
        x = self.store.get(self.track_ids[row])[:, first : first + self.frames]  # memory-mapped
        return torch.tensor(x), row  # a copy


def _loader(
    store: LogMelStore, track_ids: Sequence[str], *, frames: int, shuffle: bool, cfg: Config,
    device: torch.device,
) -> DataLoader:
    rank, world = _world()
    sampler = CropSampler(
        len(track_ids), shuffle=shuffle, max_offset=store.n_frames - frames, seed=cfg.train.seed,
        num_replicas=world, rank=rank,
    )
    workers = cfg.train.num_workers
    return DataLoader(
        LogMelDataset(store, track_ids, frames),
        batch_size=cfg.train.batch_size // world,  # the global batch, split between the processes
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        # Its own generator, so that loading never draws from the global RNG (dropout's).
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def band_statistics(
    store: LogMelStore, track_ids: Sequence[str], *, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Per-mel-band mean and standard deviation over the given tracks' frames, each (n_mels,).

    Raises :class:`DataError` naming the first track whose features are not finite.
    """
    total = np.zeros(store.n_mels)
    total_sq = np.zeros(store.n_mels)
    count = 0
    for start in range(0, len(track_ids), chunk):
        ids = list(track_ids[start : start + chunk])
        x = store.get_many(ids).astype(np.float64)  # (b, n_mels, n_frames)
        finite = np.isfinite(x).all(axis=(1, 2))
        if not finite.all():
            bad = ids[int(np.argmin(finite))]
            raise DataError(f"features of track {bad!r} hold NaN or inf: re-extract them (ingest_run)")
        total += x.sum(axis=(0, 2))
        total_sq += (x**2).sum(axis=(0, 2))
        count += x.shape[0] * x.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-2).astype(np.float32)


# --- the loop -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced (best_valid / baseline_valid are in the loss's units)."""

    checkpoint: Path
    metrics: Path
    loss: str
    epochs: int  # epochs completed
    best_epoch: int
    best_valid: float  # best validation loss (training loss when there is no validation set)
    baseline_valid: float  # validation loss of the best constant prediction (the mean target)
    train_songs: int
    valid_songs: int
    samples_per_s: float  # training samples per second, last epoch
    data_wait: float  # fraction of the last epoch's training time spent waiting for data


def fit(
    store: LogMelStore,
    train_ids: Sequence[str],
    train_objective: Objective,
    valid_ids: Sequence[str],
    valid_objective: Objective | None,
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train a CNN on songs addressed by id in ``store``; objectives hold their targets by row.

    Writes ``out_dir/checkpoint.pt`` and ``out_dir/metrics.csv`` after every epoch.
    """
    out_dir = Path(out_dir)
    _check_inputs(store, train_ids, train_objective, valid_ids, valid_objective, cfg)
    device = select_device(cfg.train.device)
    rank, world = _world()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # set from LOCAL_RANK
    checkpoint_path = out_dir / CHECKPOINT_FILE
    state = resume_checkpoint(checkpoint_path, cfg, loss=train_objective.name) if resume else None
    if state is None and checkpoint_path.exists():
        log.warning("replacing the checkpoint at %s (pass resume to continue it)", checkpoint_path)

    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.train.seed)
        model = AudioCNN.for_config(cfg)
        if state is None:
            mean, std = _input_norm(store, train_ids, cfg)
        else:
            mean, std = state["input_norm"]["mean"], state["input_norm"]["std"]
            model.load_state_dict(state["model"])
        model.set_input_norm(mean, std)
        if world > 1 and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # CUDA only
        model.to(device)
        optimizer = _optimizer(model, cfg)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            if cuda and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        if world > 1:
            torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, rank]).generate_state(1)[0]))
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=cuda or None)
        loop = _Loop(
            model, optimizer, store, train_ids, train_objective, valid_ids, valid_objective, cfg,
            device, out_dir, state, show_progress,
        )
        return loop.run(mean, std)


def _check_inputs(store, train_ids, train_objective, valid_ids, valid_objective, cfg: Config) -> None:
    if len(train_ids) < MIN_TRAIN_SONGS:
        raise TrainingError(
            f"only {len(train_ids)} training song(s) have both features and target factors; "
            f"need at least {MIN_TRAIN_SONGS}: ingest more audio or check the CF split"
        )
    if len(train_objective) != len(train_ids) or (
        valid_objective is not None and len(valid_objective) != len(valid_ids)
    ):
        raise DataError("each song needs one row of targets: ids and objective rows differ in number")
    if store.n_mels != cfg.audio.n_mels:
        raise ConfigError(
            f"the feature store has {store.n_mels} mel bands but audio.n_mels = {cfg.audio.n_mels}"
        )
    world = _world()[1]
    if cfg.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size = {cfg.train.batch_size} (the global batch) must be a multiple of the "
            f"{world} training processes"
        )
    frames = _crop_frames(store, cfg)
    if frames < cfg.model.min_frames:
        raise ConfigError(
            f"training crops of {frames} frames are shorter than the network's receptive field "
            f"({cfg.model.min_frames} frames): raise train.crop_frames or shrink the model"
        )


def _crop_frames(store: LogMelStore, cfg: Config) -> int:
    crop = cfg.train.crop_frames
    if crop is None:
        crop = cfg.model.window_frames if cfg.model.architecture == "paper" else store.n_frames
    return min(crop, store.n_frames)


def _input_norm(store: LogMelStore, train_ids: Sequence[str], cfg: Config) -> tuple[np.ndarray, ...]:
    if cfg.model.input_norm != "band":  # "none", or the excerpt's own statistics (AudioCNN)
        return np.zeros(cfg.audio.n_mels, np.float32), np.ones(cfg.audio.n_mels, np.float32)
    return band_statistics(store, train_ids)


def _optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=t.learning_rate, momentum=t.momentum, nesterov=t.momentum > 0,
        weight_decay=t.weight_decay,
    )


class _Loop:
    """One training run's mutable state; ``run`` trains until done and returns the result."""

    def __init__(
        self, model, optimizer, store, train_ids, train_objective, valid_ids, valid_objective, cfg,
        device, out_dir, state, show_progress,
    ) -> None:
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device
        self.net = getattr(model, "module", model)  # without the DistributedDataParallel wrapper
        self.rank = _world()[0]
        self.out_dir, self.show_progress = out_dir, show_progress
        self.train_ids, self.valid_ids = list(train_ids), list(valid_ids)
        self.train_objective = train_objective.to(device)
        self.valid_objective = valid_objective.to(device) if valid_objective is not None else None
        crop = _crop_frames(store, cfg)
        self.train_loader = _loader(store, train_ids, frames=crop, shuffle=True, cfg=cfg, device=device)
        self.valid_loader = (
            _loader(store, valid_ids, frames=store.n_frames, shuffle=False, cfg=cfg, device=device)
            if self.valid_ids else None
        )
        if self.valid_loader is None:
            log.warning("no validation songs: early stopping and the best model follow the training loss")
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        )
        s = state or {}
        self.epoch = s.get("epoch", 0)
        self.step = s.get("step", 0)
        self.best_valid = s.get("best_valid", math.inf)
        self.best_epoch = s.get("best_epoch", 0)
        self.best_model = s.get("best_model")
        self.decays, self.decayed_at = s.get("lr_decays_done", 0), s.get("decayed_at", 0)
        self.history: list[dict[str, float]] = s.get("history", [])
        self.writer = _tensorboard(out_dir) if self.rank == 0 else None
        self.augment = (
            Augmenter(cfg.train.augment, cfg.audio, seed=cfg.train.seed, rank=self.rank) if cfg.train.augment
            else None
        )

    def run(self, mean: np.ndarray, std: np.ndarray) -> TrainResult:
        cfg = self.cfg.train
        baseline = self._baseline()
        log.info(
            "training %s on %d songs (%d validation), %s, device %s",
            self.train_objective.name, len(self.train_ids), len(self.valid_ids), cfg.optimizer, self.device,
        )
        speed = wait = 0.0
        while self.epoch < cfg.epochs and not self._plateau_ends_training():
            started = time.perf_counter()
            train_loss, speed, wait = self._train_epoch()
            valid_loss = self._evaluate() if self.valid_loader is not None else train_loss
            if not math.isfinite(valid_loss):
                raise TrainingError(
                    f"the validation loss became {valid_loss} at epoch {self.epoch + 1}: lower "
                    "train.learning_rate; a checkpoint written before holds the last good epoch"
                )
            self.epoch += 1
            if valid_loss < self.best_valid:
                self.best_valid, self.best_epoch = valid_loss, self.epoch
                self.best_model = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
            row = dict(
                epoch=self.epoch, step=self.step, train_loss=train_loss, valid_loss=valid_loss,
                baseline_valid=baseline, samples_per_s=speed, data_wait=wait,
                lr=self.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - started,
            )
            self.history.append(row)
            if self.rank == 0:
                self._save(mean, std)
            log.info(
                "epoch %d/%d: train %.5f, valid %.5f (mean-target baseline %.5f), %.0f samples/s, "
                "data wait %.1f%%", self.epoch, cfg.epochs, train_loss, valid_loss, baseline, speed,
                100 * wait,
            )
            if self.writer is not None:
                for key in ("train_loss", "valid_loss", "baseline_valid", "samples_per_s", "data_wait"):
                    self.writer.add_scalar(key, row[key], self.epoch)
        if self._on_plateau():
            log.info("stopped early: no improvement for %d epochs", cfg.patience)
        if self.writer is not None:
            self.writer.close()
        return TrainResult(
            checkpoint=self.out_dir / CHECKPOINT_FILE, metrics=self.out_dir / METRICS_FILE,
            loss=self.train_objective.name, epochs=self.epoch, best_epoch=self.best_epoch,
            best_valid=self.best_valid, baseline_valid=baseline, train_songs=len(self.train_ids),
            valid_songs=len(self.valid_ids), samples_per_s=speed, data_wait=wait,
        )

    def _on_plateau(self) -> bool:
        """No progress for ``patience`` epochs, counted from the best epoch or the last decay."""
        return self.epoch - max(self.best_epoch, self.decayed_at) >= self.cfg.train.patience

    def _plateau_ends_training(self) -> bool:
        """On a plateau: cut the learning rate and restart from the best epoch while decays are
        left (``train.lr_decays``); True when training should stop."""
        if not self._on_plateau():
            return False
        if self.decays >= self.cfg.train.lr_decays or self.best_model is None:
            return True
        self.net.load_state_dict(self.best_model)
        for group in self.optimizer.param_groups:
            group["lr"] *= self.cfg.train.lr_decay_factor
        self.decays, self.decayed_at = self.decays + 1, self.epoch
        log.info("no improvement for %d epochs: back to epoch %d, learning rate %.3g",
                 self.cfg.train.patience, self.best_epoch, self.optimizer.param_groups[0]["lr"])
        return False

    def _train_epoch(self) -> tuple[float, float, float]:
        """One pass over the training songs -> (mean loss, samples/s, fraction waiting for data)."""
        self.model.train()
        self.train_loader.sampler.set_epoch(self.epoch)
        if hasattr(self.train_objective, "set_epoch"):  # the ranking losses draw listeners
            self.train_objective.set_epoch(self.epoch, self.rank)
        total = count = 0
        waiting = 0.0
        bar = tqdm(
            total=len(self.train_ids), desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}",
            unit="song", disable=not self.show_progress or self.rank != 0, leave=False,
        )
        start = ready = time.perf_counter()
        for x, rows in self.train_loader:
            waiting += time.perf_counter() - ready
            x = x.to(self.device, non_blocking=True)  # (B, n_mels, crop) float16
            if self.augment is not None:
                x = self.augment(x, epoch=self.epoch)  # float32
            rows = rows.to(self.device, non_blocking=True)
            with self.autocast():
                pred = self.model(x)  # (B, k)
            loss = self.train_objective.per_song(pred.float(), rows).mean()
            loss_sum, n = _all_sum(self.device, loss.item() * len(rows), len(rows))  # the global batch
            value = loss_sum / n
            if not math.isfinite(value):
                raise TrainingError(
                    f"the loss became {value} at epoch {self.epoch + 1}, step {self.step + 1}: lower "
                    f"train.learning_rate (now {self.cfg.train.learning_rate}); a checkpoint written "
                    "before holds the last good epoch"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            total += loss_sum
            count += n
            elapsed = time.perf_counter() - start
            bar.update(len(rows))
            bar.set_postfix(loss=f"{total / count:.4f}", samples_s=f"{count / elapsed:.0f}")
            ready = time.perf_counter()
        bar.close()
        elapsed = time.perf_counter() - start
        return total / count, count / elapsed, waiting / elapsed

    @torch.no_grad()
    def _evaluate(self) -> float:
        self.model.eval()
        total = 0.0
        for x, rows in self.valid_loader:  # distributed: this process's share of the songs
            with self.autocast():
                pred = self.net(x.to(self.device))
            total += self.valid_objective.per_song(pred.float(), rows.to(self.device)).sum().item()
        return _all_sum(self.device, total)[0] / len(self.valid_ids)

    def _baseline(self) -> float:
        objective, n = (
            (self.valid_objective, len(self.valid_ids)) if self.valid_objective is not None and self.valid_ids
            else (self.train_objective, len(self.train_ids))
        )
        constant = self.train_objective.best_constant().expand(n, -1)
        return objective.per_song(constant, torch.arange(n, device=self.device)).mean().item()

    def _save(self, mean: np.ndarray, std: np.ndarray) -> None:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "config": self.cfg.to_dict(),
            "loss": self.train_objective.name,
            "target": self.train_objective.target,
            "model": self.net.state_dict(),
            "best_model": self.best_model,
            "optimizer": self.optimizer.state_dict(),
            "input_norm": {"mean": torch.as_tensor(mean), "std": torch.as_tensor(std)},
            "epoch": self.epoch,
            "step": self.step,
            "best_valid": self.best_valid,
            "best_epoch": self.best_epoch,
            "lr_decays_done": self.decays,
            "decayed_at": self.decayed_at,
            "history": self.history,
            "rng": rng,
        }
        save_checkpoint(state, self.out_dir / CHECKPOINT_FILE)
        with atomic_path(self.out_dir / METRICS_FILE) as tmp:
            pd.DataFrame(self.history).to_csv(tmp, index=False, float_format="%.6g")


def _world() -> tuple[int, int]:
    """(rank, number of processes) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(device: torch.device, *values: float) -> list[float]:
    """The sums of ``values`` over all training processes (the values themselves in one process)."""
    if _world()[1] == 1:
        return list(values)
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def distributed_rank(ddp: bool) -> int:
    """This process's rank as started by ``torchrun`` (0 when not ``ddp``).

    Raises :class:`ConfigError` for ``ddp`` without torchrun's environment, and for several
    processes started without ``ddp`` (each would train and overwrite its own model).
    """
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if not ddp:
        if processes > 1:
            raise ConfigError(f"started as one of {processes} processes (torchrun): add --ddp")
        return 0
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            "--ddp needs the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR): "
            "torchrun --nproc-per-node N --no-python sonicrec train RUN --ddp"
        )
    return int(os.environ["RANK"])


@contextlib.contextmanager
def _process_group(device_name: str) -> Iterator[None]:
    """Join torchrun's process group for the duration: NCCL on CUDA (device LOCAL_RANK), else gloo."""
    import torch.distributed as dist

    distributed_rank(True)
    cuda = select_device(device_name).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
        dist.barrier()  # the checkpoint is written when any process returns
    finally:
        dist.destroy_process_group()


def _tensorboard(out_dir: Path):
    """A TensorBoard writer in out_dir/tensorboard when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


# --- on a run directory -------------------------------------------------------------------------


def train_run(
    run: RunDir | str | Path, cfg: Config, *, name: str, resume: bool = False, show_progress: bool = True,
    ddp: bool = False,
) -> TrainResult:
    """Train model ``name`` on a run directory: features from RUN/features, targets from
    RUN/cf/factors.npz (and RUN/plays.parquet for WPE); writes RUN/model/NAME/.

    Training songs are the factors' "train" split that has features, validation songs the "valid"
    split's; songs with features but no factors, or factors but no features, are left out (logged).
    ``ddp``: this process is one of several started by ``torchrun``; they train one model together
    (module docstring) and rank 0 writes it.
    """
    from sonicrec.features import FeatureStore

    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    out_dir = run.model_dir(name)
    factors = Factors.load(run.factors)
    if factors.n_factors != cfg.cf.factors:
        raise ConfigError(
            f"{run.factors} has n_factors = {factors.n_factors} but [cf] factors = {cfg.cf.factors}, "
            f"the network's output size: set [cf] factors = {factors.n_factors}"
        )
    store = FeatureStore(run.features)
    if store.audio_config != cfg.audio:
        log.warning("%s was extracted with other [audio] settings than the config: the model records the "
                    "store's, so that predicting from audio files uses the same front end", run.features)
        cfg = cfg.replace(audio=store.audio_config)
    train_ids = _usable_songs(factors, store, "train")
    valid_ids = _usable_songs(factors, store, "valid")
    train_objective: Objective
    valid_objective: Objective
    if cfg.train.loss != "mse" and not factors.has_users:
        raise DataError(f"{run.factors} has no user factors (song factors imported alone): "
                        f"train.loss = {cfg.train.loss!r} needs them; use 'mse'")
    if cfg.train.loss == "mse":
        unit = factors.song_factors_unit
        train_objective = MSEObjective(unit[factors.song_index(train_ids)])
        valid_objective = MSEObjective(unit[factors.song_index(valid_ids)])
    elif cfg.train.loss == "wpe":
        plays = _read_plays(run, cfg.train.loss)
        train_ids, train_objective = WPEObjective.from_plays(plays, factors, train_ids, cfg.cf)
        valid_ids, valid_objective = WPEObjective.from_plays(
            plays, factors, valid_ids, cfg.cf, scale=train_objective.scale
        )
    else:
        plays = _read_plays(run, cfg.train.loss)
        train_ids, train_objective, valid_ids, valid_objective = _ranking_objectives(
            plays, factors, train_ids, valid_ids, cfg
        )
    with _process_group(cfg.train.device) if ddp else contextlib.nullcontext():
        return fit(
            store, train_ids, train_objective, valid_ids, valid_objective, cfg, out_dir,
            resume=resume, show_progress=show_progress,
        )


def default_model_name(loss: str) -> str:
    """The name a model trained with ``loss`` gets unless told otherwise: cnn-mse, cnn-mse-bpr, ..."""
    return f"cnn-{loss.replace('+', '-')}"


def _usable_songs(factors: Factors, store: LogMelStore, split: str) -> list[str]:
    in_split = factors.songs(split)
    available = set(store.track_ids)
    usable = [s for s in in_split if s in available]
    if len(usable) < len(in_split):
        missing = [s for s in in_split if s not in available]
        log.warning(
            "%d %s song(s) have factors but no features and are left out (e.g. %s): run sonicrec ingest",
            len(missing), split, ", ".join(missing[:3]),
        )
    return usable


def _ranking_objectives(
    plays: PlayMatrix, factors: Factors, train_ids: Sequence[str], valid_ids: Sequence[str], cfg: Config,
) -> tuple[list[str], Objective, list[str], Objective]:
    """Training and validation objectives of a ranking loss (``bpr``, ``softmax``) or of MSE plus
    one (``mse+bpr``, ...); validation ranks with every listener, weighted as the training songs."""
    with_mse, kind = cfg.train.loss.startswith("mse+"), cfg.train.loss.removeprefix("mse+")
    train_ids, train_rank = RankingObjective.from_plays(
        plays, factors, train_ids, kind=kind, users_per_song=cfg.train.rank_users, seed=cfg.train.seed
    )
    valid_ids, valid_rank = RankingObjective.from_plays(
        plays, factors, valid_ids, kind=kind, users_per_song=None, mean_listeners=train_rank.mean_listeners
    )
    if not with_mse:
        return train_ids, train_rank, valid_ids, valid_rank

    def plus_mse(ids: list[str], ranking: RankingObjective) -> SumObjective:
        mse = MSEObjective(factors.song_factors_unit[factors.song_index(ids)])
        return SumObjective(mse, ranking, weight=cfg.train.rank_weight)

    return train_ids, plus_mse(train_ids, train_rank), valid_ids, plus_mse(valid_ids, valid_rank)


def _read_plays(run: RunDir, loss: str) -> PlayMatrix:
    if not run.plays.is_file():
        raise DataError(f"no play counts at {run.plays}: train.loss = {loss!r} needs them; use 'mse'")
    return read_play_matrix(run.plays, "parquet", show_progress=False)
