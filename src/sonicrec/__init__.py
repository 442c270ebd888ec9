"""sonicrec: recommend music by how it sounds.

A convolutional network maps a song's log-mel spectrogram to its collaborative-filtering latent
factors, so songs nobody has played yet can be recommended (van den Oord, Dieleman & Schrauwen,
"Deep content-based music recommendation", NIPS 2013).
"""

from sonicrec.errors import SonicrecError

__version__ = "0.1.0"
__all__ = ["SonicrecError", "__version__"]
