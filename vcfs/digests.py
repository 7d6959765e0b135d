"""A video's chunk digests, kept a page at a time.

The service records the BLAKE3 of every chunk of a video at ingest (`GET /video/{hash}/chunks`;
the chunk size is the video's, a power of two from 64 KiB to 16 MiB). vcfs verifies every chunk
it fetches against them, so a read needs the digests of the chunks it touches, and no others.
The whole list of a long film is long (0.55 MB sent for 4 GB in 256 KiB chunks, 2.2 MB in 64
KiB ones), and a player opening it over a slow link would wait for all of it. So vcfs asks for
the digests a page at a time (`?start=&end=`, ranged lists): a page is the digests of
`PAGE_BYTES` of video, counted in whole chunks (one chunk where chunks are larger), so pages
are whole chunks and a block (a multiple of a power-of-two chunk) never straddles two. A cold
open asks for the first page along with the metadata; a jump into a page not yet known asks for
it along with its range, and the range's first chunk waits for it, not the request. A service
that predates ranged lists ignores the range and sends the whole list; it is cut into the same
pages, so the rest of vcfs sees one shape.

Pure: parsing and page arithmetic; vcfs.remote fetches and caches the pages.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vcfs import paths

log = logging.getLogger(__name__)

KIB = 1 << 10
MIB = 1 << 20
DIGEST_SIZE = 32
# The service records digests of chunks of a power of two from 64 KiB to 16 MiB.
MIN_SERVICE_CHUNK_SIZE = 64 * KIB
# 1024 digests at the service's default 256 KiB chunks (~36 KB sent gzipped, 1.5 ms at 200
# Mbit/s), so most videos' lists come whole in their first page, while a 4 GB film's first open
# fetches a sixteenth of its list; a multiple of the largest chunk (16 MiB).
PAGE_BYTES = 256 * MIB


@dataclass(frozen=True, slots=True)
class Digests:
    """The digests of consecutive chunks of one video (one page, or pages joined)."""

    chunk_size: int
    file_size: int
    first: int  # index of the chunk whose digest `packed` starts with
    packed: bytes  # the 32-byte BLAKE3 of each chunk (the file's last chunk may be short), joined

    @property
    def end(self) -> int:
        """The index after the last chunk held."""
        return self.first + len(self.packed) // DIGEST_SIZE

    @property
    def count(self) -> int:
        """How many chunks the whole video has."""
        return -(-self.file_size // self.chunk_size)

    def digest(self, index: int) -> bytes:
        offset = (index - self.first) * DIGEST_SIZE
        if not 0 <= offset < len(self.packed):
            raise LookupError(f"chunk {index} is not among chunks {self.first}-{self.end - 1}")
        return self.packed[offset : offset + DIGEST_SIZE]

    def bounds(self, index: int) -> tuple[int, int]:
        """Byte range `(start, end_exclusive)` of chunk `index`."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.file_size)


def chunks_per_page(chunk_size: int, page_bytes: int = PAGE_BYTES) -> int:
    """Pages are counted in chunks, so that any chunk size gives whole-chunk pages."""
    return max(page_bytes // chunk_size, 1)


def pages_of(start: int, end: int, chunk_size: int, page_bytes: int = PAGE_BYTES) -> range:
    """The pages holding the digests of `[start, end)` (page 0 for an empty range at 0)."""
    per_page = chunks_per_page(chunk_size, page_bytes)
    return range(start // chunk_size // per_page,
                 max(end - 1, start) // chunk_size // per_page + 1)


def pages_bytes(pages: range, chunk_size: int, page_bytes: int = PAGE_BYTES) -> tuple[int, int]:
    """The bytes `(start, end_exclusive)` of video whose digests make these pages."""
    per_page = chunks_per_page(chunk_size, page_bytes) * chunk_size
    return pages.start * per_page, pages.stop * per_page


def covering(pages: Iterable[Digests | None], start: int, end: int) -> Digests | None:
    """The digests of the chunks of `[start, end)` out of the cached (parts of) its pages,
    in order, joined; None if any of those chunks is missing."""
    found = [page for page in pages if page is not None]
    if not found:
        return None
    chunk_size = found[0].chunk_size
    wanted = range(start // chunk_size, max(end - 1, start) // chunk_size + 1)
    if found[0].first > wanted.start or found[-1].end < min(wanted.stop, found[-1].count):
        return None
    if any(left.end != right.first for left, right in itertools.pairwise(found)):
        return None
    if len(found) == 1:
        return found[0]
    return Digests(chunk_size, found[0].file_size, found[0].first,
                   b"".join(page.packed for page in found))


def parse(
    content_hash: str, file_size: int, doc: Mapping[str, Any], page_bytes: int = PAGE_BYTES
) -> dict[int, Digests] | None:
    """The pages in a `/chunks` answer (ranged or whole) for a video of `file_size` bytes, by
    page number, the first and last possibly in part; None, with a warning, if the answer is
    unusable (then the read that asked for it fails: no byte is read unverified for it)."""
    chunk_size = doc.get("chunk_size")
    digests = doc.get("digests")
    first = doc.get("first_chunk", 0)  # absent from the whole lists of older services
    if (
        doc.get("hash") != content_hash
        or not isinstance(chunk_size, int)
        or chunk_size <= 0
        or not isinstance(first, int)
        or first < 0
        or not isinstance(digests, list)
        or not all(isinstance(d, str) and paths.is_content_hash(d) for d in digests)
    ):
        log.warning("malformed chunk digests for %s; not used", content_hash)
        return None
    count = -(-file_size // chunk_size)
    if doc.get("chunk_count", count) != count or first + len(digests) > count:
        log.warning(
            "%s: chunks %d-%d of %s for %d bytes in %d-byte chunks; not used",
            content_hash, first, first + len(digests) - 1, doc.get("chunk_count", "?"),
            file_size, chunk_size,
        )
        return None
    packed = bytes.fromhex("".join(digests))
    per_page = chunks_per_page(chunk_size, page_bytes)
    pages = {}
    for page in range(first // per_page, max(first + len(digests) - 1, first) // per_page + 1):
        low = max(page * per_page, first)
        high = min((page + 1) * per_page, first + len(digests))
        pages[page] = Digests(chunk_size, file_size, low,
                              packed[(low - first) * DIGEST_SIZE : (high - first) * DIGEST_SIZE])
    return pages
