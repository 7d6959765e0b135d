"""The log of the requests the server itself fails (an index that cannot be read, a disk that
cannot take a delete): a line per kind of failure at most every REPEAT_INTERVAL seconds.

Each such failure was a line, and a client retrying or a player reading on over a damaged
index made thousands of the same line. Now the first failure of a kind (its status and
message; the request's path aside) is logged at once, whole, and its repeats are counted: the
first after REPEAT_INTERVAL is logged whole with their count and the paths they failed on,
`... (and N more failed like it in the S s before it, on P)`, as vcfs words its own
(vcfs/faillog.py); P is the one path, or `K paths, FIRST first, LAST last` (K counted up to
PATHS_COUNTED, so a kind holds no more paths than that): the line names one request's path
only, and an operator could not tell one path failing from many. A count that no later
failure of its kind closes is logged so (the last of them, with the others' count) once the
interval has passed and a failure of any kind comes, or at shutdown. A failure of another kind
never waits behind one that repeats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

REPEAT_INTERVAL = 60.0  # seconds
PATHS_COUNTED = 100  # distinct paths of a count; more are "more than PATHS_COUNTED paths"


@dataclass
class _Paths:
    """The paths a count of failures was on: how many distinct ones, the first, the last."""

    first: str = ""
    last: str = ""
    distinct: set[str] = field(default_factory=set)  # at most PATHS_COUNTED
    more: bool = False  # and others past those

    def add(self, path: str) -> None:
        self.first = self.first or path
        self.last = path
        if path not in self.distinct:
            if len(self.distinct) < PATHS_COUNTED:
                self.distinct.add(path)
            else:
                self.more = True

    def said(self) -> str:
        if len(self.distinct) == 1:
            return self.first
        count = f"more than {PATHS_COUNTED}" if self.more else str(len(self.distinct))
        return f"{count} paths, {self.first} first, {self.last} last"


@dataclass
class _Kind:
    logged_at: float  # when its last line was logged
    repeats: int = 0  # failures since, not logged
    last: tuple[int, str, float] = (0, "", 0.0)  # the last of those: level, line, when
    last_path: str = ""  # and its request's path
    paths: _Paths = field(default_factory=_Paths)  # the paths of those before the last


class FailureLog:
    """Not thread-safe: the app's exception handlers and its lifespan run on its event loop."""

    def __init__(self, logger: logging.Logger, *, interval: float = REPEAT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._kinds: dict[Hashable, _Kind] = {}

    def failed(self, kind: Hashable, level: int, line: str, *, path: str) -> None:
        """A failure of `kind` on the request's `path`, whose line is `line` at `level`:
        logged, or counted."""
        now = self._clock()
        for other, quiet in list(self._kinds.items()):  # past their interval: forgotten
            if other != kind and now - quiet.logged_at >= self._interval:
                self._close(self._kinds.pop(other))
        seen = self._kinds.get(kind)
        if seen is None:
            self._log.log(level, "%s", line)
            self._kinds[kind] = _Kind(logged_at=now)
        elif now - seen.logged_at >= self._interval:
            if seen.repeats:  # the last is among those counted: the line is this failure's
                seen.paths.add(seen.last_path)
            self._log.log(level, "%s%s", line,
                          _more(seen.repeats, now - seen.logged_at, seen.paths))
            self._kinds[kind] = _Kind(logged_at=now)
        else:
            if seen.repeats:
                seen.paths.add(seen.last_path)
            seen.repeats += 1
            seen.last, seen.last_path = (level, line, now), path

    def flush(self) -> None:
        """Log the counts still open (at shutdown)."""
        for seen in self._kinds.values():
            self._close(seen)
        self._kinds.clear()

    def _close(self, seen: _Kind) -> None:
        if seen.repeats:
            level, line, at = seen.last
            self._log.log(level, "%s%s", line,
                          _more(seen.repeats - 1, at - seen.logged_at, seen.paths))


def _more(count: int, seconds: float, paths: _Paths) -> str:
    return (f" (and {count} more failed like it in the {seconds:.1f} s before it, "
            f"on {paths.said()})" if count else "")
