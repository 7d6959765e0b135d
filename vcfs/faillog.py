"""Failures in the log without a flood: what an operator reads when the service goes away.

A dead or broken service fails every read at once, and players re-read (the kernel re-asks a
failed read page by page): 8 readers of a stopped service wrote 50 000 identical `failed (EIO)`
lines (27 MB) in a minute, one per read. So:

- `FailureLog`: each cause of failed operations (operation, errno, error class) is logged in
  full the first time, then at most once per `interval`, saying how many were left out since;
  those still left out are counted at unmount (`flush`). Failed reads are counted as open
  files, each once, as the outage lines count them: the kernel re-asks a failed read at once,
  and 2 commands reading a stopped service were '1 line and 3 more operation(s) failed'.
  Up to FILES_COUNTED files a line, then 'over FILES_COUNTED': each file counted is kept
  until the line, and an outage of days (a thumbnailer opening file after file of a stopped
  service) kept every one.
- `Outage`: the service failing vcfs for a whole deadline, and answering again, are one line
  each, once per change of state, naming the service, the last error and what happens
  meanwhile; but at most one outage line per `interval`, counting the outages left out
  (a service failing some operations and answering others changes state at every one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Open files a line counts, each once; more are "over FILES_COUNTED" (see the docstring).
FILES_COUNTED = 1000


def _seconds(value: float) -> str:
    """A duration as the lines say it: in whole seconds, but "less than 1 s" where that is 0
    (a re-read of a range that failed a moment ago gives up after one attempt: "failed an
    operation for 0 s" read as nonsense)."""
    return "less than 1 s" if round(value) == 0 else f"{value:.0f} s"


@dataclass(slots=True)
class _Files:
    """Open files (their handles), each counted once, up to FILES_COUNTED of them."""

    counted: set[int] = field(default_factory=set)
    more: bool = False  # and others past those

    def add(self, file: int) -> None:
        if file not in self.counted:
            if len(self.counted) < FILES_COUNTED:
                self.counted.add(file)
            else:
                self.more = True

    def update(self, other: _Files) -> None:
        for file in other.counted:
            self.add(file)
        self.more |= other.more

    def __bool__(self) -> bool:
        return bool(self.counted)

    def __str__(self) -> str:
        return f"over {FILES_COUNTED}" if self.more else str(len(self.counted))


@dataclass(slots=True)
class _Cause:
    logged: float  # when its last line was written
    file: int | None  # the open file whose failed read that line was of (None: not a read)
    files: _Files = field(default_factory=_Files)  # other open files whose reads failed since
    others: int = 0  # other operations failed since

    def left_out(self) -> str:
        """What failed since the line ("" if nothing): the reads of other open files, each
        file once, or the other operations, each (a cause is of one operation)."""
        if self.files:
            return f"reads of {self.files} more open file(s)"
        return f"{self.others} more operation(s)" if self.others else ""


class FailureLog:
    """Writes failed operations to `logger`, at most one line per cause and `interval`."""

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._causes: dict[str, _Cause] = {}  # a few: operations x errors x classes

    def failed(self, cause: str, level: int, message: str, *, file: int | None) -> None:
        """`message` about a failure of `cause` (e.g. "read: EIO, ConnectError"): a read of the
        open file numbered `file`, or (None) another operation."""
        now = self._clock()
        with self._lock:
            known = self._causes.get(cause)
            if known is not None and now - known.logged < self._interval:
                if file is None:
                    known.others += 1
                elif file != known.file:
                    known.files.add(file)
                return
            self._causes[cause] = _Cause(logged=now, file=file)
        if known is not None and (left_out := known.left_out()):
            message += (f" (and {left_out} failed like it in the last "
                        f"{_seconds(now - known.logged)})")
        self._log.log(level, "%s", message)

    def flush(self) -> None:
        """One line per cause whose failures since its last line were left out."""
        now = self._clock()
        with self._lock:
            pending = [(name, cause.logged, cause.left_out())
                       for name, cause in self._causes.items()]
            self._causes.clear()
        for name, logged, left_out in pending:
            if left_out:
                self._log.warning("%s failed (%s) since the last such line, %s ago",
                                  left_out, name, _seconds(now - logged))


@dataclass(slots=True)
class _Failed:
    """What the mount's users saw fail in outages: reads of open files, each file counted
    once, and the other operations that ask the service, each counted: lookups (`stat`),
    opens of a video whose metadata is not at hand, listings. Not the requests vcfs gave up
    on: the kernel re-asks a failed read at once, page by page, each re-ask a read that
    fails too, and a read's digests fail beside its range: 2 commands reading a stopped
    service were '8 operation(s) failed'."""

    files: _Files = field(default_factory=_Files)  # the handles of open files
    others: int = 0

    def add(self, other: _Failed) -> None:
        self.files.update(other.files)
        self.others += other.others

    def said(self) -> str:
        parts = [f"reads of {self.files} open file(s)"] if self.files else []
        if self.others:
            parts.append(f"{self.others} lookup(s), open(s) or listing(s)")
        return (" and ".join(parts) + " failed" if parts
                else "no read, lookup, open or listing failed")


class Outage:
    """Whether the service at `url` is failing vcfs, logged when that changes: a line when an
    operation first gives up on it, one when it answers again, saying what failed meanwhile
    (`failed`).

    A service failing some operations and answering the others (one range of a video failing
    for good while the rest is served) changes state at every failed read: 20 reads of a
    refused range between good ones logged 20 outage and 20 recovery lines. So an outage
    beginning less than `interval` after the last outage line is not logged, nor its end;
    they are counted in the next outage line, or at unmount (`flush`)."""

    def __init__(self, logger: logging.Logger, url: str, timeout: float,
                 clock: Callable[[], float] = time.monotonic, *, interval: float = 60.0) -> None:
        self._log = logger
        self._url = url
        self._timeout = timeout
        self._clock = clock
        self._interval = interval
        self._lock = threading.Lock()
        self._since: float | None = None  # when the first operation to give up began
        self._failed = _Failed()  # what the mount's users saw fail since
        self._logged: float | None = None  # when the last outage line was written
        self._shown = False  # this outage's line was written (so its end will be)
        self._unlogged = 0  # outages since that line that were not logged
        self._unlogged_failed = _Failed()  # what failed in them

    @property
    def down(self) -> bool:
        return self._since is not None

    def gave_up(self, last_error: str, began: float) -> None:
        """An operation begun at `began` outlasted its deadline; `last_error` says its last."""
        now = self._clock()
        with self._lock:
            if self._since is None:
                self._since = began
            if self._shown or (self._logged is not None and now - self._logged < self._interval):
                return
            since, self._shown = self._since, True
            meanwhile = self._meanwhile(now)
            self._logged = now
        self._log.warning(
            "the service at %s failed an operation for %s (last error: %s): what it fails "
            "gets EIO, after up to %g s of retries, until it answers again; check that the "
            "service runs and is reachable%s", self._url, _seconds(now - since), last_error,
            self._timeout, meanwhile and f"; it {meanwhile}")

    def failed(self, file: int | None) -> None:
        """An operation of the mount failed while the service is failing: a read of the open
        file numbered `file`, or (None) a lookup, an open or a listing."""
        with self._lock:
            if self._since is None:  # the service answered since: not this outage's
                return
            if file is None:
                self._failed.others += 1
            else:
                self._failed.files.add(file)

    def answered(self) -> None:
        """The service answered a request (with anything vcfs does not retry)."""
        if self._since is None:  # the usual case, without the lock
            return
        with self._lock:
            if self._since is None:
                return
            since, failed, shown = self._since, self._failed, self._shown
            self._since, self._failed, self._shown = None, _Failed(), False
            if not shown:
                self._unlogged += 1
                self._unlogged_failed.add(failed)
                return
        # at the outage's level: a log kept at warnings must not end on the outage
        self._log.warning("the service at %s answers again, after %s of failures; %s "
                          "meanwhile", self._url, _seconds(self._clock() - since),
                          failed.said())

    def flush(self) -> None:
        """At unmount: the outages not logged since the last outage line, if any."""
        now = self._clock()
        with self._lock:
            if self._since is not None and not self._shown:  # one under way, not logged
                self._unlogged += 1
                self._unlogged_failed.add(self._failed)
                self._since, self._failed = None, _Failed()
            if not self._unlogged:
                return
            meanwhile = self._meanwhile(now)
        self._log.warning("the service at %s %s", self._url, meanwhile)

    def _meanwhile(self, now: float) -> str:
        """The outages not logged since the last outage line ("" if none), then forgotten
        (the caller holds the lock)."""
        if not self._unlogged:
            return ""
        assert self._logged is not None  # an outage goes unlogged only after a logged one
        said = (f"failed {self._unlogged} more time(s) since the last outage line, "
                f"{_seconds(now - self._logged)} ago, answering in between "
                f"({self._unlogged_failed.said()})")
        self._unlogged, self._unlogged_failed = 0, _Failed()
        return said
