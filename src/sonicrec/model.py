"""The CNN that maps a log-mel spectrogram to a song's latent factors (Dieleman's blog post).

Convolutions run over time only: each filter spans every mel band, so the spectrogram is a
sequence of ``n_mels``-dimensional frames (``Conv1d`` with the bands as input channels). After the
convolutions, a global temporal pooling layer concatenates the mean, the maximum and the L2 norm of
every feature map over time, so any input length >= ``ModelConfig.min_frames`` works; dense ReLU
layers with dropout and a linear output of ``n_factors`` follow. Default sizes (``ModelConfig()``):

    (B, 128, 599) -conv4 256-> 596 -pool4-> 149 -conv4 256-> 146 -pool2-> 73 -conv4 512-> 70
    -pool2-> 35 -conv4 512-> 32 -global pool-> (B, 1536) -dense-> 2048 -dense-> 2048 -linear-> 40

``architecture="paper"`` is the paper's variant: the same network applied to windows of
``window_frames`` frames (about 3 s) taken every ``window_hop`` frames, its outputs averaged.
The input is standardised per mel band with statistics of the training set
(:meth:`AudioCNN.set_input_norm`; the training checkpoint stores them). The input bands and the
output size come from the run's ``[audio] n_mels`` and ``[cf] factors`` (:meth:`AudioCNN.for_config`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sonicrec.config import Config, ModelConfig
from sonicrec.errors import ConfigError, DataError


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the named torch device ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available: use device = \"auto\"")
    return device


#: PCEN's smoother: a time constant of 8 frames, 0.4 s at the default hop (librosa's default).
PCEN_TIME_FRAMES = 8.0


def pcen(logmel_db: torch.Tensor, *, gain: float = 0.98, bias: float = 2.0, power: float = 0.5,
         time_frames: float = PCEN_TIME_FRAMES, eps: float = 1e-6) -> torch.Tensor:
    """Per-channel energy normalisation of log-mels in dB (B, M, T) -> (B, M, T).

    Wang, Getreuer, Hughes, Lyon & Saurous, *Trainable frontend for robust and far-field keyword
    spotting* (ICASSP 2017): each band's energy E is divided by a causal moving average M of itself
    (first-order IIR, smoothing ``s``), ``(E / (eps + M)**gain + bias)**power - bias**power``: an
    automatic gain control per band, so a track's level and static EQ tilt largely cancel. The IIR
    is applied as a causal convolution with its exponential impulse response (truncated at 1e-3),
    the first frame held before the start; defaults are librosa's ``pcen``.
    """
    energy = torch.pow(10.0, logmel_db.float() / 10.0)
    t2 = time_frames**2
    s = ((1 + 4 * t2) ** 0.5 - 1) / (2 * t2)
    taps = max(1, int(math.log(1e-3) / math.log(1 - s)) + 1)
    kernel = s * (1 - s) ** torch.arange(taps - 1, -1, -1, dtype=energy.dtype, device=energy.device)
    kernel = (kernel / kernel.sum()).view(1, 1, taps)
    batch, bands, frames = energy.shape
    flat = energy.reshape(batch * bands, 1, frames)
    padded = torch.cat([flat[..., :1].expand(-1, -1, taps - 1), flat], dim=-1)
    smooth = nn.functional.conv1d(padded, kernel).view(batch, bands, frames)
    return (energy / (eps + smooth) ** gain + bias) ** power - bias**power


class GlobalTemporalPooling(nn.Module):
    """Mean, max and L2 norm over time, concatenated: (B, C, T) -> (B, 3C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=-1), x.amax(dim=-1), torch.linalg.vector_norm(x, dim=-1)], dim=1)


class AudioCNN(nn.Module):
    """Log-mel spectrogram (B, n_mels, T) -> predicted factors (B, n_factors), raw outputs."""

    def __init__(self, cfg: ModelConfig, *, n_mels: int, n_factors: int) -> None:
        super().__init__()
        if n_mels <= 0 or n_factors <= 0:
            raise ConfigError(f"n_mels={n_mels}, n_factors={n_factors}: both must be > 0")
        self.cfg, self.n_mels, self.n_factors = cfg, n_mels, n_factors
        # Not in state_dict: the checkpoint stores the normalisation on its own ("input_norm").
        self.register_buffer("band_mean", torch.zeros(n_mels), persistent=False)
        self.register_buffer("band_std", torch.ones(n_mels), persistent=False)

        layers: list[nn.Module] = []
        channels = n_mels
        for i, out_channels in enumerate(cfg.conv_channels):
            layers.append(nn.Conv1d(channels, out_channels, cfg.kernel_size, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm1d(out_channels))
            layers.append(nn.ReLU())
            if i < len(cfg.pool_sizes):
                layers.append(nn.MaxPool1d(cfg.pool_sizes[i]))
            channels = out_channels
        self.conv = nn.Sequential(*layers)
        self.pool = GlobalTemporalPooling()

        dense: list[nn.Module] = []
        width = 3 * channels
        for units in cfg.dense_units:
            dense += [nn.Linear(width, units), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = units
        self.dense = nn.Sequential(*dense)
        self.output = nn.Linear(width, n_factors)

    @classmethod
    def for_config(cls, config: Config) -> AudioCNN:
        """The network of a run's config: ``model`` on ``audio.n_mels`` bands, ``cf.factors`` outputs."""
        return cls(config.model, n_mels=config.audio.n_mels, n_factors=config.cf.factors)

    def set_input_norm(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-band input statistics, each (n_mels,); inputs become (x - mean) / std."""
        self.band_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.band_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, n_mels, T) log-mel, any float dtype
        return self.output(self.embed(x))  # (B, k)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations (B, dense_units[-1]) of log-mels (B, n_mels, T); the output
        layer is linear, so ``forward(x) == output(embed(x))`` (the paper variant averages windows)."""
        n_mels, frames = x.shape[1], x.shape[2]
        if n_mels != self.n_mels:
            raise DataError(f"input has {n_mels} mel bands, the model expects {self.n_mels}")
        if frames < self.cfg.min_frames:
            raise DataError(f"input has {frames} frames, the model needs at least {self.cfg.min_frames}")
        x = (self._excerpt_norm(x.float()) - self.band_mean[:, None]) / self.band_std[:, None]  # (B, M, T)
        if self.cfg.architecture == "blog" or frames <= self.cfg.window_frames:
            return self._excerpt(x)  # (B, D)
        windows = x.unfold(2, self.cfg.window_frames, self.cfg.window_hop)  # (B, M, W, window)
        batch, n_windows = windows.shape[0], windows.shape[2]
        windows = windows.permute(0, 2, 1, 3).reshape(batch * n_windows, n_mels, -1)  # (B*W, M, window)
        return self._excerpt(windows).view(batch, n_windows, -1).mean(dim=1)  # (B, D)

    def _excerpt_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Per-excerpt normalisation of ``model.input_norm`` "excerpt" / "excerpt-band" / "pcen" (else x)."""
        if self.cfg.input_norm == "pcen":
            return pcen(x)
        if self.cfg.input_norm == "excerpt":
            centre = x.mean(dim=(1, 2), keepdim=True)
        elif self.cfg.input_norm == "excerpt-band":
            centre = x.mean(dim=2, keepdim=True)
        else:
            return x
        x = x - centre
        return x / x.square().mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-2)

    def _excerpt(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # (B, C, T'), T' = 32 for the default model on 599 frames
        h = self.pool(h)  # (B, 3C)
        return self.dense(h)  # (B, dense_units[-1])
