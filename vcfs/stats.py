"""Thread-safe counters for the live `/.vcfs/stats` file and the summary logged at unmount.

Each component owns one `Counters` (the FUSE layer, the remote fetcher); the block cache keeps
its own (`BlockCache.stats()`). `snapshot` sections are gathered into one JSON document by
the filesystem, so this module knows nothing about who counts what.
"""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    """Named integer counters plus size histograms, guarded by one lock."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)
        self._histograms: dict[str, Counter[int]] = {}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def observe_size(self, name: str, size: int) -> None:
        """Count `size` in histogram `name` under its power-of-two bucket (smallest 2**k >= size)
        and keep the largest seen as `largest_<name>`: e.g. the read sizes the kernel sends."""
        bucket = 1 << max(size - 1, 0).bit_length()
        with self._lock:
            self._histograms.setdefault(name, Counter())[bucket] += 1
            largest = f"largest_{name}"
            self._values[largest] = max(self._values.get(largest, 0), size)

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, object]:
        """The counters as a JSON-ready dict; histogram `name` as `<name>_sizes`
        (bucket size as a string -> count, ascending)."""
        with self._lock:
            result: dict[str, object] = dict(self._values)
            for name, histogram in self._histograms.items():
                result[f"{name}_sizes"] = {
                    str(bucket): count for bucket, count in sorted(histogram.items())
                }
            return result
