"""Free space of the data directory's file system, promised to the downloads under way.

A download whose size is known before its first byte (the origin's Content-Length, a file://
URL's size) and that would not fit is refused at once (507), rather than after it has filled
the disk, saying how much it needs and how much is free. What a download under way has yet to
write counts as used for those starting meanwhile: two 5 GB downloads onto 8 GB free do not
both start only to fail at the end. A download also needs room for what its ingest writes
next to its bytes: the sampled frames, the blob's folders, the index's update (its chunk
digests, some pages). A download of unknown size (no Content-Length), or whose decoded body
outgrows the Content-Length of its encoded one (gzip), is promised room as it grows, before
each write: it stops with the same 507 when what it has written plus that room no longer fits,
so it never takes the space promised to others, nor that room.

A slow download keeps the rest of its promise until its ingest ends (stored, failed, or
stopped by --download-timeout or --max-download-time): given to another download meanwhile,
the room would be gone when the slow one needs it, and it would fail after all its time. So
does a finished one, validated and hashed next: its margin is for the frames and the index's
update that follow (given back with the download's end, another download took it, and the
frames or the index then found the disk full).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from vidcache.chunks import DIGEST_SIZE, digest_count
from vidcache.errors import StorageError

# For the sampled frames (32 KiB), the blob's folders and the index's pages besides the digests
MARGIN = 1 << 20


def needed(size: int, chunk_size: int) -> int:
    """Bytes the ingest of a `size`-byte download in `chunk_size` chunks may write."""
    return size + MARGIN + digest_count(size, chunk_size) * DIGEST_SIZE


class Claim:
    """One download's share: `promised` bytes (for its size once known, else for what it has
    written so far), `written` of them on disk already (the file system counts those as
    used)."""

    def __init__(self, space: FreeSpace) -> None:
        self._space = space
        self.promised = 0
        self.written = 0

    @property
    def outstanding(self) -> int:
        return max(0, self.promised - self.written)

    def promise(self, size: int, doing: str) -> None:
        """Promise this download room for `size` bytes (and what its ingest writes next to
        them), or StorageError saying what it needs and what is free."""
        self._space.promise(self, size, doing)

    def cover(self, size: int, doing: str) -> None:
        """Before the download's bytes reach `size`: promise room for them if it has not been
        promised already (no size was known, or it is more than was), or StorageError as
        `promise`."""
        if self._space.needed(size) > self.promised:
            self._space.promise(self, size, doing, growing=True)


class FreeSpace:
    """Thread-safe: a download's check and its promise are one step."""

    def __init__(self, directory: Path, chunk_size: int) -> None:
        self._directory = directory
        self._chunk_size = chunk_size
        self._lock = threading.Lock()
        self._claims: set[Claim] = set()

    @contextlib.contextmanager
    def claim(self) -> Iterator[Claim]:
        """A claim for one download, given back at the end of the block (the ingest's)."""
        claim = Claim(self)
        with self._lock:
            self._claims.add(claim)
        try:
            yield claim
        finally:
            with self._lock:
                self._claims.discard(claim)

    def needed(self, size: int) -> int:
        return needed(size, self._chunk_size)

    def promise(self, claim: Claim, size: int, doing: str, *, growing: bool = False) -> None:
        """`growing`: room for a download as it grows (Claim.cover), whose refusal says what
        it has written, 0 too: else its first piece's room reads as the video's size."""
        # what the claim has written takes up disk space already: it needs the rest
        written = claim.written
        need = self.needed(size) - written
        with self._lock:
            try:
                free = free_space(self._directory)
            except OSError as exc:
                raise StorageError.from_os_error(doing, self._directory, exc) from exc
            promised = sum(other.outstanding for other in self._claims if other is not claim)
            if need > free - promised:
                shortage = f"not enough free space: needs {need} bytes ({mib(need)})"
                if written or growing:
                    shortage += f" more after {written} written ({mib(written)})"
                shortage += f", {free} are free ({mib(free)})"
                if promised:
                    shortage += f" but {promised} of them are promised to downloads under way"
                raise StorageError(doing, self._directory, None, shortage)
            claim.promised = need + written


def free_space(directory: Path | str) -> int:
    """Bytes an unprivileged writer may still take in the file system of `directory`."""
    status = os.statvfs(directory)
    return status.f_bavail * status.f_frsize


def mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB"
