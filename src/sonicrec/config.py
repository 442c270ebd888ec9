"""Configuration: one frozen dataclass per component, gathered in `Config`, read and written as TOML.

Every field has a default, so a TOML file only names what it changes; an unknown section or key is
an error (a silently ignored setting is worse than none). Each setting has one home: the CNN's
input bands are ``[audio] n_mels`` and its output size ``[cf] factors``.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from sonicrec.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

AUGMENTATIONS = ("gain", "eq", "bandlimit", "noise", "mask")  # sonicrec.augment
INPUT_NORMS = ("band", "none", "excerpt", "excerpt-band", "pcen")  # sonicrec.model.AudioCNN


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_seed(seed: int, *, name: str = "seed") -> int:
    """``seed`` if it lies in [0, 2**32), the range numpy and torch take; else a ConfigError naming it."""
    _check(0 <= seed < 2**32, f"{name}={seed}: must be in [0, 2**32)")
    return seed


@dataclass(frozen=True)
class AudioConfig:
    """Front end: decoding, the excerpt and the log-mel spectrogram (paper: 128 bands x 599 frames)."""

    sample_rate: int = 22050
    excerpt_seconds: float = 30.0
    excerpt_offset: float | None = None  # seconds from the start; None = centred in the track
    n_mels: int = 128
    n_fft: int = 2048
    hop_length: int = 1105  # centred frames: n_frames = 1 + excerpt samples // hop_length
    n_frames: int = 599
    fmin: float = 0.0
    fmax: float | None = None  # None = sample_rate / 2
    log_floor: float = 1e-5  # log compression in dB: 10 * log10(max(mel power, floor))

    def __post_init__(self) -> None:
        _check(8000 <= self.sample_rate <= 96000, f"audio.sample_rate={self.sample_rate} out of range")
        _check(self.excerpt_seconds > 0, "audio.excerpt_seconds must be positive")
        _check(self.n_mels > 0 and self.n_fft > 0 and self.hop_length > 0, "audio sizes must be > 0")
        _check(self.n_frames > 0, "audio.n_frames must be positive")
        _check(self.log_floor > 0, "audio.log_floor must be positive")
        _check(
            0 <= self.fmin < (self.fmax or self.sample_rate / 2) <= self.sample_rate / 2,
            "audio: need 0 <= fmin < fmax <= sample_rate / 2",
        )
        frames = 1 + round(self.excerpt_seconds * self.sample_rate) // self.hop_length
        _check(
            frames == self.n_frames,
            f"audio.n_frames={self.n_frames}, but excerpt_seconds={self.excerpt_seconds} at "
            f"sample_rate={self.sample_rate} with hop_length={self.hop_length} gives {frames} frames: "
            f"set n_frames = {frames} (or change hop_length)",
        )


@dataclass(frozen=True)
class CFConfig:
    """Weighted matrix factorisation of play counts; confidence = 1 + alpha * log(1 + count / epsilon)."""

    engine: str = "implicit"  # "implicit" (one machine) or "spark"
    factors: int = 40
    alpha: float = 2.0
    epsilon: float = 1.0
    regularization: float = 0.1
    iterations: int = 15
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    spark_master: str = "local[2]"
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.engine in ("implicit", "spark"), f"cf.engine={self.engine!r}: implicit|spark")
        _check(self.factors > 0 and self.iterations > 0, "cf.factors and cf.iterations must be > 0")
        _check(self.alpha > 0 and self.epsilon > 0, "cf.alpha and cf.epsilon must be > 0")
        _check(self.regularization >= 0, f"cf.regularization={self.regularization}: must be >= 0")
        _check(
            0 <= self.valid_fraction and 0 <= self.test_fraction
            and self.valid_fraction + self.test_fraction < 1,
            "cf.valid_fraction + cf.test_fraction must be in [0, 1)",
        )


@dataclass(frozen=True)
class ModelConfig:
    """The CNN: 1-D convolutions over time, global temporal pooling, dense layers, linear output.

    Its input bands and output size are not settings of their own: ``[audio] n_mels`` and
    ``[cf] factors`` (sonicrec.model.AudioCNN.for_config).
    """

    architecture: str = "blog"  # "blog" (whole excerpt) or "paper" (3-s windows, averaged)
    conv_channels: tuple[int, ...] = (256, 256, 512, 512)
    kernel_size: int = 4
    pool_sizes: tuple[int, ...] = (4, 2, 2)
    dense_units: tuple[int, ...] = (2048, 2048)
    dropout: float = 0.5
    window_frames: int = 130  # paper variant: ~3 s at the default hop
    window_hop: int = 65  # paper variant: frames between the starts of consecutive windows
    # "band": per-mel-band mean/std of the training set; "excerpt": each excerpt's own mean/std
    # (level-invariant); "excerpt-band": each band's own mean over time and the excerpt's std
    # (level- and EQ-invariant); "pcen": per-channel energy normalisation (automatic gain control per
    # band, then root compression; sonicrec.model.pcen); "none"
    input_norm: str = "band"
    batch_norm: bool = False  # BatchNorm after each convolution (not in the blog model)

    def __post_init__(self) -> None:
        _check(self.architecture in ("blog", "paper"), f"model.architecture={self.architecture!r}")
        _check(len(self.conv_channels) > 0, "model.conv_channels must not be empty")
        _check(0 <= self.dropout < 1, "model.dropout must be in [0, 1)")
        _check(self.kernel_size > 0, "model.kernel_size must be > 0")
        _check(
            all(c > 0 for c in self.conv_channels + self.dense_units)
            and all(p > 0 for p in self.pool_sizes),
            "model.conv_channels, pool_sizes and dense_units must be positive",
        )
        _check(
            len(self.pool_sizes) <= len(self.conv_channels),
            "model.pool_sizes: at most one pooling size per convolution",
        )
        _check(self.window_hop > 0, "model.window_hop must be > 0")
        _check(
            self.input_norm in INPUT_NORMS, f"model.input_norm={self.input_norm!r}: {'|'.join(INPUT_NORMS)}"
        )
        _check(
            self.architecture != "paper" or self.window_frames >= self.min_frames,
            f"model.window_frames={self.window_frames} is shorter than the network's "
            f"receptive field ({self.min_frames} frames)",
        )

    @property
    def min_frames(self) -> int:
        """The shortest input (frames) that leaves at least one time step after the last layer."""
        frames = 1
        for i in reversed(range(len(self.conv_channels))):
            if i < len(self.pool_sizes):
                frames *= self.pool_sizes[i]
            frames += self.kernel_size - 1
        return frames

    @classmethod
    def small(cls, **overrides: Any) -> ModelConfig:
        """A narrow model of the same shape that trains on a 2-core CPU in minutes (demo size)."""
        values: dict[str, Any] = dict(
            conv_channels=(32, 64, 64, 64), dense_units=(256, 256), dropout=0.3, batch_norm=True
        )
        return cls(**{**values, **overrides})


# Training objectives: regression to factors (sonicrec.train) and learning to rank (sonicrec.losses).
TRAIN_LOSSES = ("mse", "wpe", "bpr", "softmax", "mse+bpr", "mse+softmax")


@dataclass(frozen=True)
class TrainConfig:
    """Minibatch SGD with Nesterov momentum on (weighted) squared error to unit-normalised factors."""

    loss: str = "mse"  # "mse", "wpe" (the paper's weighted prediction error), or a ranking loss:
    # "bpr", "softmax", "mse+bpr", "mse+softmax" (sonicrec.losses)
    rank_weight: float = 1.0  # weight of the ranking term in "mse+bpr" / "mse+softmax"
    rank_users: int = 8  # listeners drawn per song and step by the ranking losses
    optimizer: str = "sgd"  # "sgd" (Nesterov) or "adam"
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 30
    patience: int = 5
    # On a plateau (patience epochs without progress) restart from the best epoch with the learning
    # rate times lr_decay_factor, at most lr_decays times; then stop.
    lr_decays: int = 0
    lr_decay_factor: float = 0.1
    crop_frames: int | None = None  # random time-shift crop length; None = whole excerpt (blog)
    # or model.window_frames (paper)
    num_workers: int = 2
    seed: int = 0
    device: str = "auto"
    augment: tuple[str, ...] = ()  # training-time augmentations, from AUGMENTATIONS (sonicrec.augment)

    def __post_init__(self) -> None:
        _check(self.loss in TRAIN_LOSSES, f"train.loss={self.loss!r}: {'|'.join(TRAIN_LOSSES)}")
        _check(self.rank_weight > 0 and self.rank_users > 0, "train.rank_weight, rank_users must be > 0")
        _check(self.optimizer in ("sgd", "adam"), f"train.optimizer={self.optimizer!r}: sgd|adam")
        _check(self.batch_size > 0 and self.epochs > 0, "train.batch_size and epochs must be > 0")
        _check(self.learning_rate > 0, "train.learning_rate must be positive")
        _check(self.crop_frames is None or self.crop_frames > 0, "train.crop_frames must be > 0")
        _check(self.patience > 0 and self.num_workers >= 0, "train.patience > 0, num_workers >= 0")
        _check(self.lr_decays >= 0 and 0 < self.lr_decay_factor < 1,
               "train.lr_decays must be >= 0 and train.lr_decay_factor in (0, 1)")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        _check(not unknown, f"train.augment: unknown {unknown}; choose from {', '.join(AUGMENTATIONS)}")


@dataclass(frozen=True)
class IndexConfig:
    """Nearest-neighbour search over factors: HNSW (voyager) from ``exact_below`` vectors, exact below."""

    exact_below: int = 20_000  # fewer vectors than this: exact numpy search
    m: int = 16  # HNSW graph degree (voyager's M)
    ef_construction: int = 200
    ef: int = 400  # search depth of a query (raised to k when k is larger); see docs/benchmarks.md
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.exact_below >= 0, "index.exact_below must be >= 0")
        _check(self.m >= 2, f"index.m={self.m}: must be >= 2")
        _check(self.ef_construction > 0 and self.ef > 0, "index.ef_construction and index.ef must be > 0")
        check_seed(self.seed, name="index.seed")


@dataclass(frozen=True)
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    cf: CFConfig = field(default_factory=CFConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def replace(self, **sections: Any) -> Config:
        """A copy with sections replaced, e.g. ``cfg.replace(cf=dataclasses.replace(cfg.cf, factors=50))``."""
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: section_to_dict(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = _moved_settings_upgraded(data)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        _check(not unknown, f"unknown config section(s): {', '.join(unknown)}")
        sections = {}
        for name, value in data.items():
            _check(isinstance(value, dict), f"config section [{name}] must be a table")
            section_type = type(getattr(cls(), name))
            sections[name] = section_from_dict(section_type, value, name)
        return cls(**sections)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> Config:
        try:
            return cls.from_dict(tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}") from exc

    def save(self, path: str | Path) -> None:
        from sonicrec.io import atomic_write_text

        atomic_write_text(Path(path), self.to_toml())

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        try:
            return cls.from_toml(text)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


# Settings older sonicrec kept in [model]: the network's input bands and output size (key -> home).
_MOVED_MODEL_KEYS = {"n_mels": ("audio", "n_mels"), "n_factors": ("cf", "factors")}


def _moved_settings_upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the settings of an older sonicrec moved, so its config files and checkpoints load.

    ``[demo]`` (the demo world, now RUN/demo.toml, sonicrec.demo) is left out with a warning: no stage
    read it. ``[model] n_mels`` and ``n_factors`` move to their one home, ``[audio] n_mels`` and
    ``[cf] factors``; where the two disagree the model's value wins (it is what the network was built
    and trained with), with a warning.
    """
    data = dict(data)
    if data.pop("demo", None) is not None:
        log.warning("ignoring the [demo] section of an older sonicrec: the demo world is saved in "
                    "RUN/demo.toml now")
    model = data.get("model")
    if not isinstance(model, dict) or not set(model) & set(_MOVED_MODEL_KEYS):
        return data
    model = data["model"] = dict(model)
    for key, (section, name) in _MOVED_MODEL_KEYS.items():
        if key not in model:
            continue
        value = model.pop(key)
        home = data.get(section, {})
        _check(isinstance(home, dict), f"config section [{section}] must be a table")
        current = home.get(name, getattr(getattr(Config(), section), name))
        if value != current:
            log.warning("[model] %s = %r of an older sonicrec overrides [%s] %s = %r: the network's "
                        "size is [%s] %s now", key, value, section, name, current, section, name)
        data[section] = {**home, name: value}
    return data


def section_to_dict(section: Any) -> dict[str, Any]:
    """One section (a config dataclass) as a TOML table."""
    # TOML has no null: unset optional values are left out and come back as their default None.
    out = {}
    for f in fields(section):
        value = getattr(section, f.name)
        if value is None:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def section_from_dict(section_type: type[T], data: dict[str, Any], name: str) -> T:
    """The section ``section_type`` of a TOML table ``[name]``; unknown keys and bad types are errors."""
    known = {f.name: f for f in fields(section_type)}
    unknown = sorted(set(data) - set(known))
    _check(not unknown, f"unknown key(s) in [{name}]: {', '.join(unknown)}")
    defaults = section_type()
    values = {}
    for key, value in data.items():
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            _check(isinstance(value, list), f"[{name}] {key} must be a list")
            value = tuple(value)
        elif isinstance(default, bool) or isinstance(value, bool):
            _check(isinstance(value, bool) and isinstance(default, bool), f"[{name}] {key}: bad type")
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        elif default is not None and not isinstance(value, type(default)):
            raise ConfigError(
                f"[{name}] {key} = {value!r}: expected {type(default).__name__}"
            )
        values[key] = value
    return section_type(**values)
