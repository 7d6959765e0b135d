"""The two places where failures become client exceptions.

`transport_errors` wraps every use of httpx (sending, reading a body, iterating a stream) and
turns httpx's exceptions into TransportError / RequestTimeout / ProtocolError. `raise_for_status`
turns every non-2xx answer into the StatusError subclass for its status, carrying the server's
`detail`. `what` is a short description of the call naming its hash or URL ("bytes 0-99 of
video 3fa9..."); every message starts with it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator

import httpx

from vidcache_client._credentials import without_credentials
from vidcache_client._exceptions import (
    AuthError,
    InvalidRequestError,
    NotFoundError,
    ProtocolError,
    RangeNotSatisfiableError,
    RequestTimeout,
    ServerError,
    StatusError,
    TransportError,
)

# Enough of a non-JSON error body (an HTML page from a proxy, a traceback) to recognise it.
_MAX_DETAIL_CHARS = 300
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


@contextlib.contextmanager
def transport_errors(what: str) -> Iterator[None]:
    """Translate httpx exceptions raised inside the block; anything else passes through."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise RequestTimeout(f"{what}: timed out{_request_suffix(exc)} ({_describe(exc)})") from exc
    except (httpx.DecodingError, httpx.TooManyRedirects) as exc:
        raise ProtocolError(
            f"{what}: bad response{_request_suffix(exc)} ({_describe(exc)})"
        ) from exc
    except httpx.HTTPError as exc:
        raise TransportError(
            f"{what}: request failed{_request_suffix(exc)} ({_describe(exc)})"
        ) from exc


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Raise the StatusError subclass for a non-2xx `response`; return quietly on 2xx.

    Reads the body of a streamed error response (for its `detail`), so call it inside
    `transport_errors`.
    """
    if response.is_success:
        return
    response.read()
    status = response.status_code
    detail, json_detail = error_detail(response)
    message = f"{what}: HTTP {status} {response.reason_phrase}: {detail}{_shown(response.request)}"
    if status == 401:
        message += f"; {_credentials_advice(response)}"
    if status == 416:
        raise RangeNotSatisfiableError(status, detail, message=message, json_detail=json_detail,
                                       size=_size_from_unsatisfied_range(response))
    error_class: type[StatusError]
    if status == 404:
        error_class = NotFoundError
    elif status in (401, 403):
        error_class = AuthError
    elif 400 <= status < 500:
        error_class = InvalidRequestError
    elif status >= 500:
        error_class = ServerError
    else:  # 1xx/3xx: redirects are not followed, so these are unexpected answers too
        error_class = StatusError
    raise error_class(status, detail, message=message, json_detail=json_detail)


def _credentials_advice(response: httpx.Response) -> str:
    """What a caller refused with 401 can do about it: a challenge for Basic auth comes from
    something in front of the service (vidcache asks for a bearer token)."""
    request = response.request
    if response.headers.get("www-authenticate", "").lower().startswith("basic"):
        if request.headers.get("authorization", "").lower().startswith("basic"):
            return "the server refused the user:password@ of the client's base URL"
        return ("the server (a reverse proxy in front of the service?) asks for HTTP Basic "
                "auth: give user:password@ in the client's base URL")
    if "authorization" in request.headers:
        return ("the server refused the client's token: pass VidCacheClient(..., token=...) "
                "with the token of the server's --token-file")
    return ("the server requires a bearer token: pass VidCacheClient(..., token=...) with the "
            "token of the server's --token-file")


def error_detail(response: httpx.Response) -> tuple[str, bool]:
    """The server's explanation: JSON `detail` if there is one, else the start of the body;
    and whether it was the JSON `detail`."""
    text = response.text.strip()
    if not text:
        return f"(empty body) {response.reason_phrase}".strip(), False
    try:
        body = json.loads(text)
    except ValueError:
        return _truncate(" ".join(text.split())), False
    if isinstance(body, dict) and "detail" in body:
        return _truncate(_format_detail(body["detail"])), True
    return _truncate(text), False


def _format_detail(detail: object) -> str:
    """FastAPI validation errors are a list of {"loc": [...], "msg": ...}; flatten them."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = ".".join(str(part) for part in item.get("loc", []))
                parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return json.dumps(detail)


def _size_from_unsatisfied_range(response: httpx.Response) -> int | None:
    match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL_CHARS else text[:_MAX_DETAIL_CHARS] + "..."


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _request_suffix(exc: httpx.HTTPError) -> str:
    try:
        request = exc.request
    except RuntimeError:  # httpx raises this when the error has no request attached
        return ""
    return _shown(request)


def _shown(request: httpx.Request) -> str:
    """` [METHOD URL]`, the URL without credentials (the server's, or an ingest's in the
    query of `/resolve?url=`)."""
    return f" [{request.method} {without_credentials(str(request.url))}]"
