"""The ingests under way, as `GET /ingests` shows them: each one's URL (shown without its
credentials), bucket, prefix, phase, bytes received and expected, and start.

An ingest is tracked from its request's arrival (phase `queued` while it waits for an ingest
slot, or for an earlier ingest of the same URL) until it ends, however it ends. Its own thread
moves it through the pipeline's phases (ingest.py) and counts the bytes as the download
receives them (download.py); a reader takes a snapshot. One lock guards the board and every
entry's fields, held only to read or assign them, never across I/O: counting a received
piece costs a lock round trip, and a reader never waits for a download.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from vidcache_client._credentials import without_credentials

Phase = Literal["queued", "downloading", "validating", "phash", "frames", "audio", "storing"]

@dataclass(frozen=True)
class IngestState:
    """A snapshot of one ingest under way."""

    url: str  # without credentials
    bucket: str
    prefix: str
    phase: Phase
    bytes_received: int  # of the origin's answer (its body as sent, before any decoding)
    bytes_expected: int | None  # its Content-Length (a local file's size); None if unknown
    started: str  # ISO-8601 UTC, like a video's first_seen


class IngestProgress:
    """One ingest under way, moved on by the thread running it."""

    def __init__(self, lock: threading.Lock, url: str, bucket: str, prefix: str) -> None:
        self._lock = lock
        self._url = without_credentials(url)
        self._bucket = bucket
        self._prefix = prefix
        self._started = datetime.now(UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")
        self._phase: Phase = "queued"
        self._received = 0
        self._expected: int | None = None

    def enter(self, phase: Phase) -> None:
        with self._lock:
            self._phase = phase

    def expect(self, size: int | None) -> None:
        """The origin's answer is coming: `size` bytes, or as many as it sends."""
        with self._lock:
            self._received, self._expected = 0, size

    def received(self, count: int) -> None:
        with self._lock:
            self._received += count

    def state(self) -> IngestState:
        """With the board's lock held."""
        return IngestState(self._url, self._bucket, self._prefix, self._phase, self._received,
                           self._expected, self._started)


class IngestBoard:
    """The ingests under way, oldest first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ingests: dict[IngestProgress, None] = {}  # in insertion order: oldest first

    @contextmanager
    def track(self, url: str, bucket: str, prefix: str) -> Iterator[IngestProgress]:
        """Show an ingest for the length of the block."""
        progress = IngestProgress(self._lock, url, bucket, prefix)
        with self._lock:
            self._ingests[progress] = None
        try:
            yield progress
        finally:
            with self._lock:
                del self._ingests[progress]

    def snapshot(self) -> list[IngestState]:
        with self._lock:
            return [progress.state() for progress in self._ingests]
