"""The training checkpoint of a CNN: one dict, written atomically, read back with ``weights_only``.

RUN/model/NAME/checkpoint.pt (:meth:`sonicrec.rundir.RunDir.checkpoint`) holds what inference needs
and what resuming a training run bit for bit needs::

    format        "sonicrec-cnn-1" (:data:`FORMAT`)
    config        Config.to_dict() of the run: the front end and the architecture included
    loss, target  the training objective, and what the outputs are ("unit" or "raw" factors)
    best_model    state_dict of the best-validation epoch (what inference loads)
    input_norm    {"mean", "std"}: (n_mels,) tensors, the per-band input normalisation
    model, optimizer          state_dicts of the last epoch (what resuming loads)
    epoch, step, best_valid, best_epoch, history (one dict of metrics per epoch)
    rng           {"torch": ..., "cuda": ...}: the random states after the last epoch
    adapted_from, adapted_tracks    only in a model adapted to another domain (sonicrec.adapt): its
                  source model's name and the number of recordings; it has no resume keys

Only tensors and plain Python values are stored, so :func:`load_checkpoint` never unpickles code.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from sonicrec.config import Config
from sonicrec.errors import ConfigError, DataError, RunStage
from sonicrec.io import atomic_path

log = logging.getLogger(__name__)

FORMAT = "sonicrec-cnn-1"
INFERENCE_KEYS = ("config", "loss", "target", "best_model", "input_norm")
RESUME_KEYS = ("model", "optimizer", "epoch", "step", "best_valid", "best_epoch", "history", "rng")
# Train settings that may change between a run and its resumption; every other one must match.
RESUMABLE_SETTINGS = ("epochs", "patience", "num_workers", "device")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint dict (the module docstring's keys but ``format``, set here) atomically."""
    state = {"format": FORMAT, **state}
    _check_keys(state, INFERENCE_KEYS, Path(path))
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint (tensors and plain values only: ``weights_only``), on the CPU.

    Raises :class:`DataError` naming the file, on one line, when it is missing, unreadable, of
    another format or lacks what inference needs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no model checkpoint at {path}", remedy=RunStage("train"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises many kinds, over many lines
        log.debug("torch.load(%s) failed: %s", path, exc)
        size = path.stat().st_size
        raise DataError(
            f"{path} ({size} bytes): corrupt or not a sonicrec checkpoint; train the model again"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path}: corrupt or not a sonicrec checkpoint (expected {FORMAT})")
    _check_keys(state, INFERENCE_KEYS, path)
    return state


def checkpoint_config(state: dict[str, Any]) -> Config:
    """The configuration a checkpoint was trained with."""
    return Config.from_dict(state["config"])


def resume_checkpoint(path: Path, cfg: Config, *, loss: str) -> dict[str, Any] | None:
    """The checkpoint to continue training from, or None (logged) when there is none at ``path``.

    Raises :class:`ConfigError` when it was trained with other settings than ``cfg`` and ``loss``
    (but those of :data:`RESUMABLE_SETTINGS`), and :class:`DataError` when it cannot be resumed.
    """
    if not path.exists():
        log.warning("no checkpoint at %s to resume: starting from scratch", path)
        return None
    state = load_checkpoint(path)
    _check_keys(state, RESUME_KEYS, path)
    saved = checkpoint_config(state)
    differ = [f"model.{f}" for f, v in dataclasses.asdict(cfg.model).items() if getattr(saved.model, f) != v]
    differ += [k for k, a, b in (("audio.n_mels", saved.audio.n_mels, cfg.audio.n_mels),
                                 ("cf.factors", saved.cf.factors, cfg.cf.factors)) if a != b]
    differ += [
        f"train.{f}" for f, v in dataclasses.asdict(cfg.train).items()
        if f not in RESUMABLE_SETTINGS and getattr(saved.train, f) != v
    ]
    if differ or state["loss"] != loss:
        raise ConfigError(
            f"cannot resume {path}: it was trained with other settings ({', '.join(differ) or 'loss'}); "
            "train under another name or without resume"
        )
    return state


def _check_keys(state: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise DataError(f"{path}: not a complete sonicrec checkpoint (no {', '.join(missing)}); "
                        "train the model again")
