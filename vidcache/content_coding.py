"""Decoding an origin's Content-Encoding into pieces of bounded size.

The service asks for `identity`, but an origin may encode the body all the same (S3 serves an
object stored with Content-Encoding: gzip so); the video is the decoded bytes. Each piece
received is inflated at most PIECE_SIZE bytes at a time (zlib's max_length), so the download's
--max-size and free-space checks see every such piece before the next is made: deflate's
ratio reaches ~1000:1, and httpx's decoder, used before, turned one 64 KiB piece received into
~64 MiB in memory at once (a gzip bomb). gzip (x-gzip: RFC 9110) and deflate (zlib's format or
raw, as httpx accepted) are decoded, several gzip members one after another as `gzip -d` does;
a body that ends before its compressed stream does is refused, as is data after a deflate
stream (zero bytes after a gzip member are padding, skipped as `gzip -d` does). An empty body
holds no stream to cut short: it decodes to nothing, which the ingest refuses as it refuses an
empty unencoded body (not a video). Any other coding (br, zstd, compress...) is refused
rather than stored encoded as if it were the video.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable, Iterator, Sequence

PIECE_SIZE = 256 * 1024

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class EncodingError(Exception):
    """The body's encoding is not one the service decodes, or its bytes are not in it."""


def decoded(pieces: Iterable[bytes], codings: Sequence[str]) -> Iterator[bytes]:
    """The bytes of `pieces`, undoing `codings` (Content-Encoding's values, in the order they
    were applied), in pieces of at most PIECE_SIZE bytes but for unencoded ones, as received;
    EncodingError when a coding is unknown (before any piece is read) or its data is bad."""
    applied = [name for value in codings
               if (name := value.strip().lower()) not in ("", "identity")]
    for name in applied:
        if name not in _WBITS:
            raise EncodingError(f"Content-Encoding {name!r} is not decoded by the service "
                                "(it asks for identity and decodes gzip and deflate)")
    stream = iter(pieces)
    for name in reversed(applied):
        stream = _inflated(stream, name)
    return stream


def _inflated(pieces: Iterator[bytes], coding: str) -> Iterator[bytes]:
    wbits = _WBITS[coding]
    if coding == "deflate":  # zlib's format, or raw deflate (no header) as some servers send
        head = b""
        for data in pieces:
            head += data
            if len(head) >= 2:
                break
        if not _zlib_header(head):
            wbits = -zlib.MAX_WBITS
        pieces = itertools.chain([head], pieces)
    inflater = zlib.decompressobj(wbits)
    empty = True
    for data in pieces:
        more = bool(data)
        empty = empty and not more
        while more:
            if inflater.eof:  # data after the stream's end: another gzip member, or an error
                if coding == "deflate":
                    raise EncodingError("data after the end of the deflate stream")
                # zero bytes padding the last member, which `gzip -d` and Python skip too
                data = data.lstrip(b"\0")
                if not data:
                    break
                inflater = zlib.decompressobj(wbits)
            try:
                out = inflater.decompress(data, PIECE_SIZE)
            except zlib.error as exc:
                raise EncodingError(f"not valid {coding} data: {exc}") from exc
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
            # an output of PIECE_SIZE may leave more in zlib for the input it has taken
            more = bool(data) or (len(out) == PIECE_SIZE and not inflater.eof)
            if out:
                yield out
    # an empty body holds no stream to cut short (the ingest refuses it as not a video)
    if not inflater.eof and not empty:
        raise EncodingError(f"the {coding} stream ends early: the body is cut short")


def _zlib_header(head: bytes) -> bool:
    """Whether `head` begins as zlib's format does (RFC 1950: method 8, a check multiple of
    31)."""
    return len(head) >= 2 and head[0] & 0x0F == 8 and int.from_bytes(head[:2]) % 31 == 0
