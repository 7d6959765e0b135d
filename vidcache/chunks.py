"""Per-chunk BLAKE3 digests: what `GET /video/{hash}/chunks` publishes so that a reader can
verify any byte range it fetches without reading the whole file.

A reader verifies whole chunks only, so the chunk size is the smallest range it can fetch
verified: smaller chunks make a cold open or a random read over a slow link cheaper, but the
digest list (67 bytes of JSON per chunk, about half that sent gzip-compressed; fetched once
per file) grows. The service records digests at its `--chunk-size` for new ingests; every
video keeps the chunk size it was ingested with, because the digest of a chunk cannot be
derived from the digests of its parts (nor of a coarser chunk from finer ones): changing the
setting never invalidates a record.
"""

from __future__ import annotations

import blake3

KIB = 1024
MIB = 1024 * KIB
DIGEST_SIZE = 32

# Below this the digest list passes 0.1 % of the video (4 MB for a 4 GiB file, all fetched
# before the first verified read), and the kernel asks FUSE for 128 KiB at a time anyway.
MIN_CHUNK_SIZE = 64 * KIB
# Above this a reader must fetch that much to verify a small read.
MAX_CHUNK_SIZE = 16 * MIB
# 4x finer than vidcache 1.0's 1 MiB: a reader's smallest verified fetch is 256 KiB (a WAN
# probe or a random read fetches a quarter), while a 2 GiB video's list stays ~0.5 MB.
DEFAULT_CHUNK_SIZE = 256 * KIB


def check_chunk_size(size: int) -> int:
    """`size` if it is a power of two from MIN_CHUNK_SIZE to MAX_CHUNK_SIZE, else ValueError."""
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE or size & (size - 1):
        raise ValueError(f"chunk size must be a power of two from {MIN_CHUNK_SIZE // KIB} KiB "
                         f"to {MAX_CHUNK_SIZE // MIB} MiB, got {size} bytes")
    return size


class ChunkHasher:
    """BLAKE3 of every `chunk_size` chunk of a stream fed in pieces of any size."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        self._chunk = blake3.blake3()
        self._filled = 0
        self._digests = bytearray()

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            piece = view[:self.chunk_size - self._filled]
            self._chunk.update(piece)
            self._filled += len(piece)
            view = view[len(piece):]
            if self._filled == self.chunk_size:
                self._end_chunk()

    def finish(self) -> bytes:
        """The concatenated DIGEST_SIZE-byte digests, one per chunk (the last chunk short)."""
        if self._filled:
            self._end_chunk()
        return bytes(self._digests)

    def _end_chunk(self) -> None:
        self._digests += self._chunk.digest()
        self._chunk = blake3.blake3()
        self._filled = 0


def digest_count(size: int, chunk_size: int) -> int:
    """How many chunks a file of `size` bytes has (the last one short; none when empty)."""
    return -(-size // chunk_size)


def chunk_page(start: int, end: int | None, chunk_size: int, size: int) -> range:
    """Indices of the chunks overlapping bytes [start, min(end, size)) of a file of `size`
    bytes (`end` None: to the end of the file).

    A range holding no byte of the file (start >= size, or end <= start) overlaps no chunk:
    the page is empty, starting at min(start // chunk_size, chunk count), where a page
    starting at `start` would."""
    count = digest_count(size, chunk_size)
    first = min(start // chunk_size, count)
    stop = size if end is None else min(end, size)
    if start >= stop:
        return range(first, first)
    return range(first, -(-stop // chunk_size))


def hex_digests(digests: bytes) -> list[str]:
    """Concatenated digests as the list of 64-hex strings the API publishes."""
    return [digests[i:i + DIGEST_SIZE].hex() for i in range(0, len(digests), DIGEST_SIZE)]


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header value allows gzip (RFC 9110 12.5.3: `gzip`, `x-gzip`
    or `*`, unless its weight is q=0)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        weight = params.strip().lower()
        if weight.startswith("q="):
            try:
                if float(weight[2:]) <= 0:
                    continue
            except ValueError:
                continue
        return True
    return False
