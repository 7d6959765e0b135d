"""Arguments checked before any request: a malformed hash or range never reaches the wire.

Such arguments can never succeed, so they raise InvalidRequestError (a VidCacheError and a
ValueError) with `status_code` None.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NoReturn, TypeGuard

import httpx

from vidcache_client._credentials import without_credentials
from vidcache_client._exceptions import InvalidRequestError

ByteRange = tuple[int, int]
"""(start, end) byte offsets, both INCLUSIVE, as in HTTP's `Range: bytes=start-end`."""

MAX_PAGE_SIZE = 1000
"""The service's largest listing page (`GET /videos?limit=`)."""

_HASH = re.compile(r"[0-9a-f]{64}")
_MAX_REPR = 80


def parse_base_url(base_url: str) -> httpx.URL:
    """The service's base URL, if it is http(s)://host[:port][/path]; ValueError otherwise (a
    plain one: the client is not built, so there is no request to refuse), showing the URL
    without its credentials."""
    shown = without_credentials(base_url) if isinstance(base_url, str) else base_url
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"invalid base_url {shown!r}: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"invalid base_url {shown!r}: expected http(s)://host[:port]")
    if url.port is not None and not 0 < url.port < 65536:  # else only "Connection refused"
        raise ValueError(f"invalid base_url {shown!r}: port {url.port} is not in 1-65535")
    return url


def validate_hash(content_hash: object) -> str:
    """Return `content_hash` if it is 64 lowercase hex characters (a BLAKE3 digest)."""
    if isinstance(content_hash, str) and _HASH.fullmatch(content_hash):
        return content_hash
    _refuse(f"invalid content hash {_short_repr(content_hash)}: expected 64 lowercase hex "
            "characters (a BLAKE3 digest)")


def validate_byte_range(byte_range: object) -> ByteRange | None:
    """Return `byte_range` as a (start, end) tuple if it is None or 0 <= start <= end."""
    if byte_range is None:
        return None
    if isinstance(byte_range, tuple | list) and len(byte_range) == 2:
        start, end = byte_range
        if is_int(start) and is_int(end) and 0 <= start <= end:
            return (start, end)
    _refuse(f"invalid byte_range {_short_repr(byte_range)}: expected (start, end) with "
            "0 <= start <= end, both inclusive")


def validate_digest_range(start: object, end: object) -> tuple[int | None, int | None]:
    """(start, end) of a digest page, each None or an int >= 0, end >= start if both given."""
    if ((start is None or (is_int(start) and start >= 0))
            and (end is None or (is_int(end) and end >= 0))
            and (start is None or end is None or start <= end)):
        return start, end
    _refuse(f"invalid digest range start={_short_repr(start)}, end={_short_repr(end)}: "
            "expected byte offsets >= 0 (or None), end exclusive and not before start")


def validate_digests(digests: object) -> tuple[int | None, int | None] | None:
    """`open_video_into`'s `digests`: None, or (start, end) as `validate_digest_range` takes
    them (anything else failed with a bare TypeError from unpacking it)."""
    if digests is None:
        return None
    if isinstance(digests, tuple | list) and len(digests) == 2:
        return validate_digest_range(*digests)
    _refuse(f"invalid digests {_short_repr(digests)}: expected (start, end) byte offsets, "
            "or None")


def validate_callback(name: str, callback: object, *, required: bool = False) -> None:
    """`callback` callable, or None unless `required`: another value failed with a bare
    "object is not callable" only once the answer arrived, the request made for nothing."""
    if callable(callback) or (callback is None and not required):
        return
    _refuse(f"invalid {name} {_short_repr(callback)}: expected a callable"
            + ("" if required else " (or None)"))


def validate_url(url: object) -> str:
    """Return `url` if it is a str: the service takes any string (and says what is wrong with
    it), but anything else failed in the client with a bare TypeError naming no argument."""
    return validate_str("url", url)


def validate_str(name: str, value: object) -> str:
    """Return `value` if it is a str (a url; a bucket or prefix, of an ingest or a listing):
    an ingest's None or 123 was sent for the service to refuse with a 422 after the round trip,
    a listing's int was sent as its digits."""
    if isinstance(value, str):
        return value
    _refuse(f"invalid {name} {_short_repr(value)}: expected a str")


def validate_meta(meta: object) -> Mapping[str, Any] | None:
    """Return `meta` if it is None or a mapping (the service's `meta` is a JSON object): a
    list of pairs was taken as a dict, and a str failed with a bare ValueError."""
    if meta is None or isinstance(meta, Mapping):
        return meta
    _refuse(f"invalid meta {_short_repr(meta)}: expected a dict (or None)")


def validate_dest(dest: object) -> str:
    """`dest` as a str if it is a non-empty str or os.PathLike[str] without a NUL. None, a
    bytes path or an int failed with a bare TypeError naming no argument (an int naming a
    FIFO was even taken as a file descriptor, written into and closed), and "" (the working
    directory to realpath) failed only after the whole download."""
    path = os.fspath(dest) if isinstance(dest, str | os.PathLike) else None
    if isinstance(path, str) and path and "\0" not in path:
        return path
    _refuse(f"invalid dest {_short_repr(dest)}: expected a file path, a non-empty str or "
            "os.PathLike[str] without NUL")


def validate_page_size(page_size: object) -> int:
    if is_int(page_size) and 1 <= page_size <= MAX_PAGE_SIZE:
        return page_size
    _refuse(f"invalid page_size {_short_repr(page_size)}: expected an int from 1 to "
            f"{MAX_PAGE_SIZE}")


def is_int(value: object) -> TypeGuard[int]:
    """bool is an int subclass, but True as an offset is certainly a mistake."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_decimal(text: str) -> bool:
    """Whether int(text) takes it as ASCII digits: str.isdigit() also takes '²', which int()
    refuses (a header decoded as latin-1 can hold it)."""
    return text.isascii() and text.isdigit()


def _refuse(detail: str) -> NoReturn:
    raise InvalidRequestError(None, detail, message=f"{detail} (no request sent)")


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR] + "..."
