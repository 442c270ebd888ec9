"""sonicrec: recommend music by how it sounds.

A convolutional network maps a song's log-mel spectrogram to its collaborative-filtering latent
factors, so songs nobody has played yet can be recommended (van den Oord, Dieleman & Schrauwen,
"Deep content-based music recommendation", NIPS 2013).
"""

from importlib.metadata import PackageNotFoundError, version

from sonicrec.errors import SonicrecError

try:
    __version__ = version("sonicrec")  # pyproject.toml is the one place that states it
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
__all__ = ["SonicrecError", "__version__"]
