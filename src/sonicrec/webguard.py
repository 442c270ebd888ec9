"""HTTP hardening of the web app, as one ASGI middleware: what every response and request gets.

- Response headers: ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and a
  Content-Security-Policy (a strict one for the page, ``frame-ancestors 'none'`` for everything),
  ``Referrer-Policy``, and a ``Cache-Control`` when the app set none (API answers are not stored,
  the page and its scripts are revalidated, audio may be cached privately).
- ``Host`` is checked against the names the server answers to, so a page of another site cannot
  reach a loopback server by rebinding its DNS name to 127.0.0.1 (``allowed_hosts``).
- State-changing requests (POST, PUT, PATCH, DELETE) from another origin are refused (``Origin``,
  or ``Sec-Fetch-Site: cross-site``) unless the origin is in ``allowed_origins``.
- Request headers larger than ``max_header_bytes`` are refused (431), and a request body that
  stalls for ``body_timeout_s`` between chunks is cut (408).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
OTHER_CSP = "frame-ancestors 'none'"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
_UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def hosts_for(bind: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to ``bind`` answers to: the loopback names for a loopback
    address, the address itself otherwise, plus ``extra``; None (any) for a wildcard address
    without ``extra``."""
    extra = frozenset(h.lower() for h in extra)
    if bind in ("0.0.0.0", "::", ""):
        return extra or None
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = False
    return frozenset(LOOPBACK_NAMES if loopback else (bind.lower(),)) | extra


def host_name(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the lower-case name or address alone."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class WebGuard:
    """ASGI middleware applying the rules of this module (see its docstring).

    Parameters
    ----------
    app : the ASGI app
    allowed_hosts : Host names accepted (None: any; see :func:`hosts_for`)
    allowed_origins : origins (``scheme://host[:port]``) whose POSTs are accepted besides the server's own
    page_paths : paths that get the strict page CSP
    max_header_bytes : largest total size of a request's headers
    body_timeout_s : longest wait for the next chunk of a request body
    """

    def __init__(
        self, app, *, allowed_hosts: frozenset[str] | None = None, allowed_origins: Iterable[str] = (),
        page_paths: Iterable[str] = ("/",), max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        self.page_paths = frozenset(page_paths)
        self.max_header_bytes = max_header_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await _plain(send, *refusal)
        path = scope["path"]

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _secure_headers(message.get("headers", []), path,
                                                                 path in self.page_paths)}
            await send(message)

        await self.app(scope, self._timed(receive), send_with_headers)

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        if sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
            return 431, f"request headers larger than {self.max_header_bytes} bytes"
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            return 400, f"this server does not answer to the Host {host[:100]!r}"
        if scope["method"] in _UNSAFE_METHODS and self._cross_origin(headers, host):
            return 403, "changes requested by a page of another site are refused"
        return None

    def _cross_origin(self, headers: dict[bytes, bytes], host: str) -> bool:
        origin = headers.get(b"origin")
        if origin is None:
            return headers.get(b"sec-fetch-site", b"") == b"cross-site"
        origin_text = origin.decode("latin-1").rstrip("/").lower()
        if origin_text in self.allowed_origins:
            return False
        return origin_text == "null" or urlsplit(origin_text).netloc != host.lower()

    def _timed(self, receive):
        """``receive`` that answers 408 when the next chunk of the body takes too long."""
        done = False

        async def timed_receive():
            nonlocal done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                from starlette.exceptions import HTTPException

                raise HTTPException(408, f"the request body stalled for {self.body_timeout_s:g} s") from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return timed_receive


def _secure_headers(headers: list, path: str, page: bool) -> list:
    present = {k.lower() for k, _ in headers}
    extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
             (b"referrer-policy", b"same-origin")]
    if b"content-security-policy" not in present:
        extra.append((b"content-security-policy", (PAGE_CSP if page else OTHER_CSP).encode()))
    if b"cache-control" not in present:
        extra.append((b"cache-control", _cache_control(path)))
    return [*headers, *extra]


def _cache_control(path: str) -> bytes:
    if path == "/api/audio":
        return b"private, max-age=3600"
    if path.startswith("/api/"):
        return b"no-store"
    return b"no-cache"  # the page, scripts, report and docs: revalidated (ETag), so updates show


async def _plain(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-content-type-options", b"nosniff"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
