"""Checks that an answer from `GET /video/{hash}` is exactly the bytes that were asked for.

Before the body: the status must be 200 for a whole video and 206 for a range (a 200 to a range
request is refused, never sliced: the client does not return bytes it has not seen labelled
as the asked range); `Content-Range: bytes s-e/total` must name the asked start and the asked
end, or `total - 1` when the asked end lies past the end of the video (the one clamp HTTP
allows); `Content-Length`, if sent, must agree; an `ETag`, if sent, must name the asked hash;
a range must not be content-encoded.
The result is the number of body bytes to expect, which the reader then counts: a body that
ends short or runs long raises too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

from vidcache_client._exceptions import ProtocolError, RangeError
from vidcache_client._validate import ByteRange, is_decimal

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


@dataclass(frozen=True)
class ContentRange:
    """A parsed `Content-Range: bytes start-end/total` (end inclusive; total None for `*`)."""

    start: int
    end: int
    total: int | None


def parse_content_range(value: str | None) -> ContentRange | None:
    """Parse a satisfied `Content-Range` header; None if absent or malformed."""
    match = _CONTENT_RANGE.fullmatch(value.strip()) if value else None
    if match is None:
        return None
    start, end = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if start > end or (total is not None and end >= total):
        return None
    return ContentRange(start, end, total)


def range_header(byte_range: ByteRange) -> str:
    return f"bytes={byte_range[0]}-{byte_range[1]}"


def expected_video_length(
    response: httpx.Response, content_hash: str, asked: ByteRange | None, what: str
) -> int | None:
    """Check a 2xx answer's status and headers; return the body length to expect.

    None means the length is unknown (a whole video sent without Content-Length).
    """
    _check_etag(response, content_hash, what)
    status = f"{response.status_code} {response.reason_phrase}".strip()
    if asked is None:
        if response.status_code != 200:
            raise ProtocolError(f"{what}: expected 200 with the whole video, got {status}")
        return _content_length(response, what, ProtocolError)
    if response.status_code != 206:
        ignored = (" (the server ignored the Range header and sent the whole video)"
                   if response.status_code == 200 else "")
        raise RangeError(f"{what}: expected 206 Partial Content, got {status}{ignored}")
    coding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        # Ranges are of the encoded representation: its Content-Range counts compressed bytes,
        # which read_range_into's buffers would receive as they are.
        raise RangeError(f"{what}: 206 answer with Content-Encoding {coding!r} although "
                         "'identity' was asked: its bytes are not the video's")
    header = response.headers.get("Content-Range")
    answered = parse_content_range(header)
    if answered is None:
        raise RangeError(f"{what}: 206 answer with a missing or malformed Content-Range "
                         f"({header!r})")
    start, end = asked
    clamped_at_eof = (answered.total is not None and answered.end == answered.total - 1
                      and answered.end < end)
    if answered.start != start or not (answered.end == end or clamped_at_eof):
        raise RangeError(f"{what}: server answered with Content-Range {header!r}, "
                         f"not the asked bytes {start}-{end}")
    length = answered.end - answered.start + 1
    content_length = _content_length(response, what, RangeError)
    if content_length is not None and content_length != length:
        raise RangeError(f"{what}: Content-Length {content_length} disagrees with "
                         f"Content-Range {header!r}")
    return length


def body_length_error(what: str, asked: ByteRange | None, expected: int,
                      received: int) -> ProtocolError:
    """The error for a body that ended short of, or ran past, its announced length."""
    error_class = ProtocolError if asked is None else RangeError
    how = "ended short" if received < expected else "ran long"
    return error_class(f"{what}: response body {how}: got {received} bytes, "
                       f"expected {expected}")


def _content_length(response: httpx.Response, what: str,
                    error_class: type[ProtocolError]) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    if not is_decimal(value.strip()):
        raise error_class(f"{what}: malformed Content-Length {value!r}")
    return int(value)


def _check_etag(response: httpx.Response, content_hash: str, what: str) -> None:
    etag = response.headers.get("ETag")
    if etag is not None and etag.removeprefix("W/") != f'"{content_hash}"':
        raise ProtocolError(f"{what}: answer carries ETag {etag!r}, which names other content")
