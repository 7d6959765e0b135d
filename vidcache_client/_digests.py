"""Checks on an answer from `GET /video/{hash}/chunks`: the chunk digests of a video, whole or
a page of them (`?start=&end=`, the chunks overlapping bytes [start, end)).

A server from before pages (vidcache 1.0) ignores `start`/`end` and answers the whole list
without `first_chunk`/`chunk_count`; the answer then gets `first_chunk` 0 and `chunk_count`
len(digests), so every caller reads one shape and must index by `first_chunk`. A server that
sends the fields must have answered exactly the asked page: the page follows from start, end,
chunk_size and chunk_count alone (a range's end past the file ends at the last chunk), except
that a start past the end of the file inside the short last chunk's span gets an empty page,
which the client, not knowing the size, accepts there as well as the last chunk's digest.
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

from vidcache_client._exceptions import ProtocolError
from vidcache_client._validate import is_int

_DIGEST = re.compile(r"[0-9a-f]{64}")  # lowercase hex BLAKE3, as the service writes it


def checked_digests(result: dict[str, Any], what: str, *, start: int,
                    end: int | None) -> dict[str, Any]:
    """`result` with `first_chunk` and `chunk_count` filled in for an old server; ProtocolError
    unless it is a well-formed list and, when the server paged, the page of [start, end)."""
    chunk_size = result.get("chunk_size")
    if not is_count(chunk_size) or chunk_size < 1:
        raise ProtocolError(f"{what}: bad 'chunk_size' {chunk_size!r}")
    digests = result.get("digests")
    if not isinstance(digests, list) or not all(
            isinstance(d, str) and _DIGEST.fullmatch(d) for d in digests):
        raise ProtocolError(f"{what}: 'digests' is not a list of 64-hex BLAKE3 digests")
    if "first_chunk" not in result and "chunk_count" not in result:
        return {**result, "first_chunk": 0, "chunk_count": len(digests)}
    first, count = result.get("first_chunk"), result.get("chunk_count")
    if not is_count(first) or not is_count(count):
        raise ProtocolError(f"{what}: bad 'first_chunk' {first!r} or 'chunk_count' {count!r}")
    if first + len(digests) > count:
        raise ProtocolError(f"{what}: {len(digests)} digests from chunk {first} run past the "
                            f"video's {count} chunks")
    expected_first, lengths = expected_page(start, end, chunk_size, count)
    if first != expected_first or len(digests) not in lengths:
        raise ProtocolError(
            f"{what}: answer lists {len(digests)} digests from chunk {first} of {count}, not "
            f"the asked page: {' or '.join(map(str, lengths))} from chunk {expected_first} "
            f"in {chunk_size}-byte chunks")
    return result


def expected_page(start: int, end: int | None, chunk_size: int,
                  chunk_count: int) -> tuple[int, tuple[int, ...]]:
    """(first chunk, possible digest counts) of the page of bytes [start, end) of a video of
    `chunk_count` chunks whose size the client does not know: somewhere in the last chunk."""
    first = min(start // chunk_size, chunk_count)
    if end is not None and end <= start:
        return first, (0,)
    last = chunk_count if end is None else min(-(-end // chunk_size), chunk_count)
    full = max(0, last - first)
    # start may lie past the end of the file inside the short last chunk's span: no byte
    # of the range in the file, so no chunk (only there: chunk_count bounds the size below).
    if first == chunk_count - 1 and start > first * chunk_size:
        return first, (full, 0)
    return first, (full,)


def is_count(value: object) -> TypeGuard[int]:
    """A non-negative int (True is none: a broken server)."""
    return is_int(value) and value >= 0
