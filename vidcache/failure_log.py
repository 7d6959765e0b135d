"""The log of the requests the server itself fails (an index that cannot be read, a disk that
cannot take a delete): a line per kind of failure at most every REPEAT_INTERVAL seconds.

Each such failure was a line, and a client retrying or a player reading on over a damaged
index made thousands of the same line. Now the first failure of a kind (its status and
message; the request's path aside) is logged at once, whole, and its repeats are counted: the
first after REPEAT_INTERVAL is logged whole with their count, `... (and N more failed like it
in the S s before it)`, as vcfs words its own (vcfs/faillog.py). A count that no later failure
of its kind closes is logged so (the last of them, with the others' count) once the interval
has passed and a failure of any kind comes, or at shutdown. A failure of another kind never
waits behind one that repeats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

REPEAT_INTERVAL = 60.0  # seconds


@dataclass
class _Kind:
    logged_at: float  # when its last line was logged
    repeats: int = 0  # failures since, not logged
    last: tuple[int, str, float] = (0, "", 0.0)  # the last of those: level, line, when


class FailureLog:
    """Not thread-safe: the app's exception handlers and its lifespan run on its event loop."""

    def __init__(self, logger: logging.Logger, *, interval: float = REPEAT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._kinds: dict[Hashable, _Kind] = {}

    def failed(self, kind: Hashable, level: int, line: str) -> None:
        """A failure of `kind`, whose line is `line` at `level`: logged, or counted."""
        now = self._clock()
        for other, quiet in list(self._kinds.items()):  # past their interval: forgotten
            if other != kind and now - quiet.logged_at >= self._interval:
                self._close(self._kinds.pop(other))
        seen = self._kinds.get(kind)
        if seen is None:
            self._log.log(level, "%s", line)
            self._kinds[kind] = _Kind(logged_at=now)
        elif now - seen.logged_at >= self._interval:
            self._log.log(level, "%s%s", line, _more(seen.repeats, now - seen.logged_at))
            self._kinds[kind] = _Kind(logged_at=now)
        else:
            seen.repeats += 1
            seen.last = (level, line, now)

    def flush(self) -> None:
        """Log the counts still open (at shutdown)."""
        for seen in self._kinds.values():
            self._close(seen)
        self._kinds.clear()

    def _close(self, seen: _Kind) -> None:
        if seen.repeats:
            level, line, at = seen.last
            self._log.log(level, "%s%s", line, _more(seen.repeats - 1, at - seen.logged_at))


def _more(count: int, seconds: float) -> str:
    return f" (and {count} more failed like it in the {seconds:.1f} s before it)" if count else ""
