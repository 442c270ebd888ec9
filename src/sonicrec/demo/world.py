"""The demo world's size and seed (`DemoConfig`, saved as RUN/demo.toml) and its preset sizes.

The world is the demo's own setting, not the pipeline's: a run's ``config.toml`` holds the stages'
configuration (sonicrec.config), and the demo writes the world it built beside it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from sonicrec.config import ModelConfig, TrainConfig, check_seed, section_from_dict, section_to_dict
from sonicrec.demo.production import PRODUCTIONS
from sonicrec.errors import ConfigError

SECTION = "demo"  # the TOML table of RUN/demo.toml

# A CNN small enough to train on a 2-core CPU in minutes; the blog-size model is ModelConfig().
DEMO_MODEL = ModelConfig.small()
# The large world's CNN on a CPU: twice as wide (~0.6M parameters); on a GPU it is the blog model.
MEDIUM_MODEL = ModelConfig.small(conv_channels=(64, 128, 128, 128), dense_units=(512, 512))
# On the demo world Adam beat Nesterov SGD (lr 0.05): validation MSE 0.0173 vs 0.0204; on a plateau,
# going back to the best epoch with the learning rate cut tenfold (at most twice) lowered it further,
# 0.0172 -> 0.0163 and 0.0167 -> 0.0162 for two training seeds (docs/results.md).
_SCHEDULE = {"optimizer": "adam", "learning_rate": 0.001, "lr_decays": 2}
SIZES = ("quick", "default", "large")


@dataclass(frozen=True)
class DemoConfig:
    """The demo world: real scores rendered to audio, with simulated listeners."""

    n_tracks: int = 1200
    n_users: int = 5000
    n_plays: int = 250_000  # play events (a user playing a track once)
    seed: int = 0
    production: str = "clean"  # or "varied": per-track soundfont, drums and mix (demo.production)

    def __post_init__(self) -> None:
        for name in ("n_tracks", "n_users"):
            if getattr(self, name) < 10:
                raise ConfigError(f"demo.{name}={getattr(self, name)}: need at least 10")
        if self.n_plays < self.n_users:
            raise ConfigError("demo.n_plays must be at least demo.n_users")
        check_seed(self.seed, name="demo.seed")
        if self.production not in PRODUCTIONS:
            raise ConfigError(f"demo.production={self.production!r}: one of {', '.join(PRODUCTIONS)}")

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps({SECTION: section_to_dict(self)})

    @classmethod
    def from_toml(cls, text: str) -> DemoConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}") from exc
        unknown = sorted(set(data) - {SECTION})
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(unknown)}: a demo file holds [{SECTION}]")
        return section_from_dict(cls, data.get(SECTION, {}), SECTION)

    def save(self, path: str | Path) -> None:
        from sonicrec.io import atomic_write_text

        atomic_write_text(Path(path), self.to_toml())

    @classmethod
    def load(cls, path: str | Path) -> DemoConfig:
        path = Path(path)
        try:
            return cls.from_toml(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read the demo world {path}: {exc.strerror}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def world_preset(size: str, seed: int) -> tuple[DemoConfig, TrainConfig, ModelConfig]:
    """The world, training and model of each size.

    quick: 300 tracks, 1,500 simulated users (same code paths, under a minute cached).
    default: 1,200 tracks, 5,000 simulated users, 250,000 plays (~7 min, ~2 min cached).
    large: 10,000 tracks, 50,000 simulated users, 2.5M plays; 10% test songs = 1,000 (rendering
    ~45 CPU-minutes the first time; the CNN is MEDIUM_MODEL on a CPU, the blog model on a GPU).
    """
    if size == "quick":
        return (DemoConfig(n_tracks=300, n_users=1500, n_plays=60_000, seed=seed),
                TrainConfig(epochs=20, patience=4, batch_size=16, **_SCHEDULE, seed=seed), DEMO_MODEL)
    if size == "default":
        return (DemoConfig(seed=seed),
                TrainConfig(epochs=60, patience=5, batch_size=32, **_SCHEDULE, seed=seed), DEMO_MODEL)
    if size == "large":
        import torch

        model = ModelConfig() if torch.cuda.is_available() else MEDIUM_MODEL
        return (DemoConfig(n_tracks=10_000, n_users=50_000, n_plays=2_500_000, seed=seed),
                TrainConfig(epochs=40, patience=5, batch_size=64, **_SCHEDULE, seed=seed), model)
    raise ConfigError(f"demo size {size!r}: one of {', '.join(SIZES)}")

