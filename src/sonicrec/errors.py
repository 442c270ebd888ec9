"""The one exception root of sonicrec and its specific subclasses.

Library code raises these with a message that names the file, row or id at fault and says what
to do; the CLI prints the message on one line and exits with status 2.
"""


class SonicrecError(Exception):
    """Root of every error sonicrec raises on purpose."""


class ConfigError(SonicrecError, ValueError):
    """A configuration value or file is invalid."""


class AudioError(SonicrecError):
    """An audio file cannot be decoded or is unusable (empty, silent, too short...)."""


class DataError(SonicrecError, ValueError):
    """Input data (play counts, manifests, tables) is malformed."""


class UnknownIdError(SonicrecError, KeyError):
    """A user or track id is not known to the catalog, factors or index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


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
