"""The web service: JSON endpoints over a run's Recommender, catalog audio, live uploads, one web page.

``create_app(run_dir)`` returns a FastAPI app; ``serve(run_dir)`` runs it with uvicorn on
127.0.0.1. Endpoints (schema and a try-it page at ``/docs``, served without a CDN):

    GET  /api/info                      the run: model, song and user counts, upload limits, links
    GET  /api/search?q=                 catalog search over id, title, artist and collection
    GET  /api/track?id=                 one track's metadata, split and excerpt position
    GET  /api/audio?id=                 the track's audio file (HTTP range requests)
    GET  /api/similar?id=&n=            a similar-songs playlist (cosine in the latent space)
    GET  /api/audience?id=&n=           the users most likely to enjoy a song
    GET  /api/users?q=                  user ids
    GET  /api/recommend?user=&n=        songs for a user, never-played (cold) songs marked
    GET  /api/map                       a 2-D map of the songs' audio-predicted factors
    POST /api/upload                    an audio file -> its predicted factors, similar songs, audience
    GET  /                              the web page (sonicrec/web/); /analysis/ the analysis report

Safety: track and user ids are looked up, never used as paths, and only the catalog's own audio
files are served. An upload is limited in size (request body counted as it arrives), must start
like an audio file (WAV, AIFF, FLAC, Ogg, MP3 or M4A), is written under a server-managed directory
with a generated name, decoded in a separate worker process with a timeout, and deleted once
placed. Problems with a request answer 4xx with a ``detail`` message.

Modules: :mod:`~sonicrec.serve.app` (the endpoints' wiring), :mod:`~sonicrec.serve.schemas`
(response models), :mod:`~sonicrec.serve.context` (the loaded run the endpoints ask),
:mod:`~sonicrec.serve.uploads` (admission, size limit, the worker process) and
:mod:`~sonicrec.serve.server` (uvicorn). The song map is :mod:`sonicrec.songmap`.
"""

from sonicrec.errors import MissingExtraError

try:
    import fastapi  # noqa: F401
    import orjson  # noqa: F401
    import pydantic  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("the web service needs FastAPI: pip install 'sonicrec[serve]'") from exc

from sonicrec.serve.app import create_app  # noqa: E402
from sonicrec.serve.server import serve  # noqa: E402
from sonicrec.serve.uploads import sniff_audio_format  # noqa: E402

__all__ = ["create_app", "serve", "sniff_audio_format"]
