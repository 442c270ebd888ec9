"""Choosing where a track's excerpt lies: the configured window, or the most active one when that is silent.

Decoder-agnostic: the functions here see mono float32 samples only. :func:`mostly_silent` judges a
decoded excerpt; :func:`most_active_start` scans the loudness of the whole track (block by block,
so a long track costs only its block loudness in memory) and returns the start of the 30-s window
holding the most sound. Loudness is the RMS level of one-second blocks in dBFS; a block below
:data:`SILENT_BLOCK_DB` counts as silence.

>>> rate = 100
>>> track = np.concatenate([np.zeros(5 * rate), np.ones(3 * rate), np.zeros(4 * rate)]).astype(np.float32)
>>> most_active_start(block_levels([track], rate), window_seconds=3.0)
5.0
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

SILENT_BLOCK_DB = -60.0  # a one-second block whose RMS level is below this is silent
MOSTLY_SILENT = 0.5  # an excerpt with more than this share of silent blocks is moved
BLOCK_SECONDS = 1.0


def block_levels(
    blocks: Iterable[np.ndarray], rate: float, *, block_seconds: float = BLOCK_SECONDS
) -> np.ndarray:
    """RMS level in dBFS of consecutive ``block_seconds`` blocks of a stream of mono sample arrays.

    Parameters
    ----------
    blocks : mono float arrays of any length, in stream order (e.g. a decoder's reads)
    rate : sample rate of the stream, Hz

    Returns
    -------
    float64 (n_blocks,): one level per started block (the last may be shorter); -inf for digital silence
    """
    size = max(1, round(block_seconds * rate))
    energies: list[float] = []
    carry = np.zeros(0, np.float64)
    for block in blocks:
        x = np.concatenate([carry, np.asarray(block, np.float64)])
        whole = len(x) // size * size
        if whole:
            energies.extend(np.mean(x[:whole].reshape(-1, size) ** 2, axis=1).tolist())
        carry = x[whole:]
    if len(carry):
        energies.append(float(np.mean(carry**2)))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(np.asarray(energies, np.float64))


def mostly_silent(samples: np.ndarray, rate: float, *, share: float = MOSTLY_SILENT) -> bool:
    """Whether more than ``share`` of the one-second blocks of ``samples`` (float (n,)) are silent."""
    levels = block_levels([samples], rate)
    return bool(len(levels) == 0 or np.mean(levels < SILENT_BLOCK_DB) > share)


def most_active_start(
    levels: np.ndarray, window_seconds: float, *, block_seconds: float = BLOCK_SECONDS
) -> float | None:
    """Start (seconds) of the ``window_seconds`` window holding the most sound, or None if all is silent.

    A block's activity is how far its level stands above :data:`SILENT_BLOCK_DB` (0 for silent
    blocks); the window with the largest total activity wins, the earliest on ties. Windows start on
    block boundaries; a track shorter than the window gives 0.0.

    Parameters
    ----------
    levels : float (n_blocks,) block levels in dB (:func:`block_levels`)
    """
    levels = np.nan_to_num(np.asarray(levels, np.float64), neginf=SILENT_BLOCK_DB)
    activity = np.clip(levels - SILENT_BLOCK_DB, 0, None)
    if not activity.any():
        return None
    width = max(1, int(np.ceil(window_seconds / block_seconds - 1e-9)))
    if len(activity) <= width:
        return 0.0
    totals = np.convolve(activity, np.ones(width), mode="valid")  # (n_blocks - width + 1,)
    return float(np.argmax(totals) * block_seconds)
