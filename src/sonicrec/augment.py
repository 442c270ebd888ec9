"""Training-time augmentation of log-mel excerpts: what recording and production change in a spectrum.

The demo's audio is rendered from scores with one soundfont: no bass-heavy mixes, no loudness war,
no EQ, no noise, no band-limited sources. Each augmentation below mimics one of those in the
log-mel domain (dB, ``10 log10(max(power, floor))``), on a batch (B, n_mels, T) in the training
loop, with its own seeded ``torch.Generator`` (so dropout's random stream is untouched):

* ``gain``: level offset, uniform in [-20, +10] dB per excerpt (power below the floor stays there).
* ``eq``: spectral tilt, uniform in [-3, +3] dB per octave around 1 kHz, plus a low shelf (bass
  boost) of 0-24 dB below a corner frequency drawn in [80, 300] Hz.
* ``bandlimit``: half the excerpts are low-passed (corner 3-11 kHz, 24 dB per octave above it).
* ``noise``: half the excerpts get stationary noise with a random colour (-6 to 0 dB per octave)
  at a random signal-to-noise ratio in [5, 30] dB, added in the power domain.
* ``mask``: SpecAugment (Park et al., Interspeech 2019): two frequency masks of up to 16 bands and
  two time masks of up to 10% of the frames, set to the excerpt's mean level.

>>> aug = Augmenter(("gain", "eq", "mask"), AudioConfig(), seed=0)
>>> aug(torch.zeros(2, 128, 50), epoch=0).shape
torch.Size([2, 128, 50])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from sonicrec.audio import band_centres
from sonicrec.config import AUGMENTATIONS, AudioConfig
from sonicrec.errors import ConfigError


class Augmenter:
    """Random production changes applied to log-mel batches; the same seed and epoch give the same draws.

    Parameters
    ----------
    names : which of :data:`AUGMENTATIONS` to apply, in that order whatever the order given
    audio : the front end the log-mels were computed with (band centres, the log floor)
    seed : seeds the draws, with the epoch and ``rank`` (one stream per training process)
    """

    def __init__(self, names: Sequence[str], audio: AudioConfig, *, seed: int, rank: int = 0) -> None:
        unknown = sorted(set(names) - set(AUGMENTATIONS))
        if unknown:
            raise ConfigError(f"unknown augmentation(s) {unknown}: choose from {', '.join(AUGMENTATIONS)}")
        self.names = tuple(a for a in AUGMENTATIONS if a in names)
        self.seed, self.rank = seed, rank
        self.octaves = torch.from_numpy(np.log2(band_centres(audio) / 1000.0)).float()  # (M,)
        self.floor_db = 10.0 * math.log10(audio.log_floor)
        self._generator: torch.Generator | None = None
        self._epoch: int | None = None

    def __call__(self, x: torch.Tensor, *, epoch: int) -> torch.Tensor:
        """Augmented copy of ``x`` (B, n_mels, T) dB; a new epoch restarts the seeded stream."""
        if epoch != self._epoch:
            state = np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0]
            self._generator, self._epoch = torch.Generator().manual_seed(int(state)), epoch
        x = x.float()
        for name in self.names:
            x = getattr(self, f"_{name}")(x)
        return x

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self._generator)

    def _chosen(self, n: int, p: float = 0.5) -> torch.Tensor:
        return torch.rand(n, generator=self._generator) < p

    def _per_band(self, x: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        """Add ``db`` (B, M) to every frame, keeping the floor."""
        return (x + db.to(x.device)[:, :, None]).clamp_min(self.floor_db)

    def _gain(self, x: torch.Tensor) -> torch.Tensor:
        gain = self._uniform(len(x), -20.0, 10.0)
        return self._per_band(x, gain[:, None].expand(-1, len(self.octaves)))

    def _eq(self, x: torch.Tensor) -> torch.Tensor:
        b = len(x)
        tilt = self._uniform(b, -3.0, 3.0)[:, None] * self.octaves[None]  # (B, M)
        corner = torch.log2(self._uniform(b, 80.0, 300.0) / 1000.0)[:, None]  # octaves from 1 kHz
        shelf = self._uniform(b, 0.0, 24.0)[:, None] / (1.0 + 4.0 ** (self.octaves[None] - corner))
        return self._per_band(x, tilt + shelf)

    def _bandlimit(self, x: torch.Tensor) -> torch.Tensor:
        corner = torch.log2(self._uniform(len(x), 3000.0, 11000.0) / 1000.0)[:, None]
        cut = -24.0 * (self.octaves[None] - corner).clamp_min(0.0)  # (B, M)
        return self._per_band(x, cut * self._chosen(len(x))[:, None])

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        b, m, t = x.shape
        power = 10.0 ** (x / 10.0)  # (B, M, T)
        colour = 10.0 ** (self._uniform(b, -6.0, 0.0)[:, None] * self.octaves[None] / 10.0)  # (B, M)
        colour = colour / colour.mean(dim=1, keepdim=True)
        snr = 10.0 ** (self._uniform(b, 5.0, 30.0) / 10.0)
        level = power.mean(dim=(1, 2)).cpu() / snr * self._chosen(b)  # (B,) mean noise power per band
        fluctuation = 0.75 + 0.5 * torch.rand((b, m, t), generator=self._generator)  # +-1.2 dB
        noise = (level[:, None] * colour)[:, :, None] * fluctuation  # (B, M, T)
        return 10.0 * torch.log10((power + noise.to(x.device)).clamp_min(10.0 ** (self.floor_db / 10.0)))

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        b, m, t = x.shape
        x = x.clone()
        fill = x.mean(dim=(1, 2))  # (B,)
        for size, axis in ((m, 1), (m, 1), (t, 2), (t, 2)):
            width = min(16, size) if axis == 1 else max(1, size // 10)
            widths = torch.randint(0, width + 1, (b,), generator=self._generator)
            starts = (torch.rand(b, generator=self._generator) * (size - widths + 1)).long()
            position = torch.arange(size)
            hidden = (position[None] >= starts[:, None]) & (position[None] < (starts + widths)[:, None])
            hidden = hidden.to(x.device)  # (B, size)
            mask = hidden[:, :, None] if axis == 1 else hidden[:, None, :]
            x = torch.where(mask, fill[:, None, None], x)
        return x
