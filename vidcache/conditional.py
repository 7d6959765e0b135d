"""Conditional requests on a video (RFC 9110 section 13), pure.

A video's ETag is `"<hash>"`, a strong validator (its bytes never change), and its
Last-Modified is the blob's mtime. An origin server must evaluate the preconditions it
receives (13.2.1): this does so in the RFC's order (13.2.2), If-Match, then If-Unmodified-Since
(without If-Match), If-None-Match, then If-Modified-Since (without If-None-Match, GET and HEAD
only). If-Range stays FileResponse's, as it comes after these.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime

from vidcache.errors import PreconditionFailed

# Request header fields (lowercase, as ASGI gives them) that make a request conditional here.
FIELDS = frozenset({b"if-match", b"if-none-match", b"if-modified-since",
                    b"if-unmodified-since"})

_ENTITY_TAG = re.compile(r'(W/)?("[^"]*")')
_SAFE = ("GET", "HEAD")


def not_modified(values: Callable[[str], list[str]], *, method: str, etag: str,
                 last_modified: float) -> bool:
    """Whether the request's preconditions call for 304 Not Modified (GET and HEAD only);
    raises PreconditionFailed (412) when one is false otherwise. `values(name)` gives the
    request's values of a header field, `etag` is the representation's (strong, quoted) and
    `last_modified` its modification time (seconds since the epoch)."""
    modified = int(last_modified)  # Last-Modified has whole seconds
    if if_match := values("if-match"):
        if not _matches(if_match, etag, weak=False):
            raise PreconditionFailed(f"If-Match {', '.join(if_match)} does not match the "
                                     f"video's ETag {etag}")
    elif (date := _http_date(values("if-unmodified-since"))) is not None and modified > date:
        raise PreconditionFailed("the video was modified after If-Unmodified-Since")
    if if_none_match := values("if-none-match"):
        if not _matches(if_none_match, etag, weak=True):
            return False
        if method in _SAFE:
            return True
        raise PreconditionFailed(f"If-None-Match {', '.join(if_none_match)} matches the "
                                 f"video's ETag {etag}")
    date = _http_date(values("if-modified-since"))
    return method in _SAFE and date is not None and modified <= date


def _matches(values: list[str], etag: str, *, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match list names the representation: `*`, or one of its
    entity tags equal to `etag` (a weak one only with the weak comparison)."""
    joined = ", ".join(values)
    if joined.strip() == "*":
        return True
    return any(tag == etag and (weak or not is_weak)
               for is_weak, tag in _ENTITY_TAG.findall(joined))


def _http_date(values: list[str]) -> int | None:
    """The one HTTP-date of a field, in seconds since the epoch; None if absent, invalid or
    listed more than once, which the RFC says to ignore."""
    if len(values) != 1:
        return None
    try:
        date = parsedate_to_datetime(values[0])
    except (TypeError, ValueError):
        return None
    if date.tzinfo is None:  # asctime's format has no zone: it is GMT
        date = date.replace(tzinfo=UTC)
    return int(date.timestamp())
