"""The layout of a run directory: where every stage of the pipeline reads and writes.

One place names the files, so stages agree without passing paths around::

    RUN/config.toml            the Config every stage read
    RUN/demo.toml              the demo world's size and seed (sonicrec.demo.DemoConfig)
    RUN/catalog.sqlite         tracks, their metadata and ingest status
    RUN/audio/                 audio files (the demo world renders them here)
    RUN/plays.parquet          play counts: user_id, track_id, count
    RUN/users.parquet          the demo world's simulated users (sonicrec.demo.listeners)
    RUN/features/              log-mel feature store
    RUN/cf/factors.npz         WMF user and song factors + the song split
    RUN/model/NAME/            one CNN: checkpoint.pt, metrics.csv (and familiarity.npz)
    RUN/predictions/NAME.npz   predicted song factors of one model (song_ids, factors)
    RUN/evaluation/            results.json, results.md, results.png
    RUN/analysis/              the analysis report
    RUN/index/                 cached nearest-neighbour indexes of large catalogs
    RUN/export/MODEL/          Parquet tables and voyager indexes for a service (sonicrec.export)
    RUN/neighbours/MODEL/      precomputed similar-song and user lists (sonicrec.neighbours)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sonicrec.errors import ChooseOutput, ConfigError, OutputDirError

if TYPE_CHECKING:
    from sonicrec.config import Config

MARKER = "config.toml"
CHECKPOINT_FILE = "checkpoint.pt"  # in a model's folder (sonicrec.checkpoint)
METRICS_FILE = "metrics.csv"  # per-epoch training metrics, beside the checkpoint


def check_model_name(name: str) -> None:
    """A model name becomes a folder and a file name: letters, digits, '-', '_', '.' only."""
    if not name or name.startswith(".") or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise ConfigError(f"model name {name!r}: use letters, digits, '-', '_' or '.' (e.g. cnn-mse)")


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def prepare(cls, root: str | Path) -> RunDir:
        """Create or reuse ``root`` as a run directory; refuse a directory sonicrec did not make."""
        root = Path(root)
        if root.exists():
            if not root.is_dir():
                raise OutputDirError(f"{root} exists and is not a directory", remedy=ChooseOutput())
            if any(root.iterdir()) and not (root / MARKER).is_file():
                raise OutputDirError(
                    f"{root} is not empty and holds no sonicrec run ({MARKER} missing)",
                    remedy=ChooseOutput(or_empty=True),
                )
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputDirError(f"cannot create {root}: {exc.strerror}") from exc
        if not os.access(root, os.W_OK | os.X_OK):
            raise OutputDirError(f"{root} is not writable", remedy=ChooseOutput())
        return cls(root)

    def read_config(self) -> Config:
        """The run's configuration (RUN/config.toml), or the defaults when it has none."""
        from sonicrec.config import Config

        return Config.load(self.config) if self.config.is_file() else Config()

    @property
    def config(self) -> Path:
        return self.root / MARKER

    @property
    def demo_config(self) -> Path:
        return self.root / "demo.toml"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.sqlite"

    @property
    def audio(self) -> Path:
        return self.root / "audio"

    @property
    def plays(self) -> Path:
        return self.root / "plays.parquet"

    @property
    def users(self) -> Path:
        return self.root / "users.parquet"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def factors(self) -> Path:
        return self.root / "cf" / "factors.npz"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def model_dir(self, name: str) -> Path:
        """RUN/model/NAME/, the folder of one trained model (its name is checked first)."""
        check_model_name(name)
        return self.model / name

    def checkpoint(self, name: str) -> Path:
        """RUN/model/NAME/checkpoint.pt, the training checkpoint of model ``name``."""
        return self.model_dir(name) / CHECKPOINT_FILE

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def prediction(self, name: str) -> Path:
        """RUN/predictions/NAME.npz, the predicted song factors of one model (factors.Predictions)."""
        return self.predictions / f"{name}.npz"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def index(self) -> Path:
        return self.root / "index"

    def export(self, model: str) -> Path:
        return self.root / "export" / model

    @property
    def neighbours(self) -> Path:
        return self.root / "neighbours"
