"""The one exception root of sonicrec, its specific subclasses, and the remedies they carry.

Library code raises these with a message that names the file, row or id at fault and, where one
applies, a :data:`Remedy`: what would fix it, in the library's own terms (a stage to run, an output
directory to change, an option to set, a file to check). ``str(exc)`` phrases the remedy for a
Python caller; each front end phrases it in its own words: the CLI names its commands and flags
(``cli.error_line``), the web app speaks to someone with a browser (``web_errors.error_detail``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Each stage: what it does, as advice ("<work> first"), and the library function that does it.
STAGES = {
    "ingest": ("ingest the audio", "features.ingest_run"),
    "plays": ("import play counts", "interactions.import_plays_run"),
    "factorize": ("factorize the play counts", "cf.factorize_run"),
    "train": ("train the model", "train.train_run"),
    "predict": ("predict the songs' factors", "predict.predict_run"),
    "analyse": ("analyse the model", "analysis.build_report"),
}


@dataclass(frozen=True)
class RunStage:
    """Remedy: an earlier stage (a key of :data:`STAGES`) has not made what is needed."""

    stage: str
    run: Path | None = None
    model: str | None = None


@dataclass(frozen=True)
class ChooseOutput:
    """Remedy: the output directory cannot be used; use another (or empty it, or replace its plays)."""

    or_empty: bool = False
    or_replace: bool = False


@dataclass(frozen=True)
class SetOption:
    """Remedy: set the option ``key`` (a config key such as ``cf.engine``, or a keyword argument such
    as ``on_bad``), to ``value`` when one value fixes it."""

    key: str
    value: str | None = None


@dataclass(frozen=True)
class CheckFile:
    """Remedy: the input file itself is at fault; check it, or leave it out."""


Remedy = RunStage | ChooseOutput | SetOption | CheckFile


def remedy_text(remedy: Remedy) -> str:
    """The remedy in the library's terms (stages, config keys, keyword arguments)."""
    if isinstance(remedy, RunStage):
        work, function = STAGES[remedy.stage]
        return f"{work} first ({function})"
    if isinstance(remedy, ChooseOutput):
        extra = ", or empty it" if remedy.or_empty else ""
        extra += ", or replace them (replace=True)" if remedy.or_replace else ""
        return f"use another directory{extra}"
    if isinstance(remedy, SetOption):
        return f"set {remedy.key}" + (f"={remedy.value!r}" if remedy.value is not None else "")
    return "check the file or leave it out"


class SonicrecError(Exception):
    """Root of every error sonicrec raises on purpose.

    ``message`` says what is wrong; ``remedy`` (optional) what would fix it, which ``str(exc)``
    appends in the library's terms and the front ends phrase in theirs.
    """

    def __init__(self, message: str = "", *args: object, remedy: Remedy | None = None) -> None:
        super().__init__(message, *args)
        self.message = message
        self.remedy = remedy

    def __str__(self) -> str:
        if self.remedy is None:
            return super().__str__()
        return f"{self.message}; {remedy_text(self.remedy)}"


class ConfigError(SonicrecError, ValueError):
    """A configuration value or file is invalid."""


class AudioError(SonicrecError):
    """An audio file cannot be decoded or is unusable (empty, silent, too short...)."""


class DataError(SonicrecError, ValueError):
    """Input data (play counts, manifests, tables) is malformed."""


class UnknownIdError(SonicrecError, KeyError):
    """A user or track id is not known to the catalog, factors or index."""

    def __str__(self) -> str:  # KeyError would quote the message
        if self.remedy is None:
            return str(self.args[0]) if self.args else ""
        return SonicrecError.__str__(self)


class OutputDirError(SonicrecError):
    """An output directory cannot be used (unwritable, or holds files sonicrec did not write)."""


class MissingExtraError(SonicrecError, ImportError):
    """An optional dependency is missing."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a clear 'install sonicrec[extra]' error."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module} is needed for this feature: pip install 'sonicrec[{extra}]'"
        ) from exc


class TrainingError(SonicrecError):
    """Training cannot go on (non-finite loss, too few usable songs)."""
