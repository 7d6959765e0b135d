"""Optional bearer-token authentication (`vidcache serve --token-file FILE`).

With a token, every request that changes the cache (any method but GET/HEAD/OPTIONS: ingest,
delete) must carry `Authorization: Bearer <token>`; with `--token-reads` every other request
does too, except the liveness check and the API description (OPEN_PATHS), which reveal no
stored data. The check is an ASGI middleware in front of routing, so it runs before any body
is read and covers routes added later without each one opting in.

A refusal is 401 with `WWW-Authenticate: Bearer ...` (RFC 6750) and a JSON `detail` saying
what was missing or wrong; the presented token is never echoed. Tokens are compared in
constant time (by their SHA-256, so not even the length leaks).
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from vidcache.errors import error_body

# open even with --token-reads: liveness probes and the API description carry no data
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REALM = 'Bearer realm="vidcache"'


def needs_token(method: str, path: str, *, protect_reads: bool) -> bool:
    """Whether a request needs the token: every write; with `protect_reads` every request
    outside OPEN_PATHS."""
    if method.upper() not in READ_METHODS:
        return True
    return protect_reads and path not in OPEN_PATHS


def _fingerprint(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class BearerAuth:
    """ASGI middleware refusing requests that lack the token where the policy needs one."""

    def __init__(self, app: ASGIApp, *, token: str, protect_reads: bool) -> None:
        self._app = app
        self._expected = _fingerprint(token.encode("ascii"))
        self._protect_reads = protect_reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not needs_token(scope["method"], scope["path"],
                                                      protect_reads=self._protect_reads):
            await self._app(scope, receive, send)
            return
        problem = self._problem(scope)
        if problem is None:
            await self._app(scope, receive, send)
            return
        error, detail = problem
        challenge = _REALM + (f', error="{error}"' if error else "")
        body = error_body(detail)
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge.encode())]})
        await send({"type": "http.response.body", "body": body})

    def _problem(self, scope: Scope) -> tuple[str, str] | None:
        """(RFC 6750 error code or "", detail) when the request may not pass; None if it may."""
        what = f"{scope['method']} {scope['path']}"
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if not values:
            return "", (f"{what} needs a bearer token: send 'Authorization: Bearer <token>' "
                        "with the token of the server's --token-file")
        scheme, _, credentials = values[0].strip().partition(b" ")
        if len(values) > 1 or scheme.lower() != b"bearer":
            return "invalid_request", (f"{what}: the Authorization header must be exactly one "
                                       "'Bearer <token>' (other schemes are not accepted)")
        presented = credentials.strip()
        if not presented:
            return "invalid_request", f"{what}: the Authorization header has an empty token"
        if not hmac.compare_digest(_fingerprint(presented), self._expected):
            return "invalid_token", (f"{what}: wrong bearer token (it does not match the "
                                     "server's --token-file)")
        return None
