"""The downloads' host-name lookups, which the shutdown can cut.

socket.getaddrinfo cannot be interrupted: with a slow or unreachable DNS server it returns only
when the system resolver gives up (timeout x attempts x nameservers, easily 10-30 s). So each
lookup runs in a thread of its own, and the download waits for its answer, for `stop` or for
its timeout, whichever comes first; a lookup given up on runs on alone and its answer is
dropped. Daemon threads, not a ThreadPoolExecutor: Python's exit joins an executor's workers,
so one inside getaddrinfo would hold up the very exit that `stop` is for. A thread per lookup
costs far less than the download it precedes and leaves no idle threads; their number is capped
(MAX_LOOKUPS) because a lookup given up on keeps its thread until the resolver ends it, and a
dead DNS server must not make every new ingest add one: beyond the cap a download waits for a
lookup to end (within its timeout). A lookup whose thread cannot be started (a limit on
threads) fails with OutOfThreads (503).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from vidcache.errors import OutOfThreads, ShuttingDown
from vidcache_client._threads import thread_refused

AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]
Lookup = Callable[[str, int], Sequence[AddrInfo]]

# twice the default --max-concurrent-ingests: lookups of a working DNS take milliseconds, so
# only lookups held by a failing one ever fill it
MAX_LOOKUPS = 16


def system_lookup(host: str, port: int) -> Sequence[AddrInfo]:
    """The system resolver's addresses of `host` for a TCP connection to `port`."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


class _Pending:
    def __init__(self) -> None:
        self.done = False
        self.answer: Sequence[AddrInfo] = ()
        self.error: Exception | None = None


class StoppableResolver:
    def __init__(self, lookup: Lookup = system_lookup, max_lookups: int = MAX_LOOKUPS) -> None:
        self._lookup = lookup
        self._max_lookups = max_lookups
        self._changed = threading.Condition()
        self._running = 0  # lookup threads, given up on or not
        self._stopped = False

    def stop(self) -> None:
        """End the resolutions waiting with ShuttingDown, and refuse new ones."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def resolve(self, host: str, port: int, *, timeout: float) -> Sequence[AddrInfo]:
        """`lookup(host, port)`, its own errors as they are; ShuttingDown once stopped,
        TimeoutError if it has not answered within `timeout` seconds, OutOfThreads if no
        thread could be started for it."""
        deadline = time.monotonic() + timeout
        pending = _Pending()
        with self._changed:
            self._wait(lambda: self._running < self._max_lookups, deadline)
            self._running += 1
        try:
            threading.Thread(target=self._run, args=(pending, host, port), daemon=True,
                             name=f"resolve {host}").start()
        except BaseException as exc:
            self._finished(pending)
            if thread_refused(exc):
                raise OutOfThreads() from exc
            raise
        with self._changed:
            self._wait(lambda: pending.done, deadline)
        if pending.error is not None:
            raise pending.error
        return pending.answer

    def _wait(self, ready: Callable[[], bool], deadline: float) -> None:
        """Wait, holding the lock, until `ready()` or the stop, which raises ShuttingDown;
        TimeoutError at `deadline`."""
        if not self._changed.wait_for(lambda: self._stopped or ready(),
                                      timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("no answer from the resolver")
        if self._stopped:
            raise ShuttingDown()

    def _run(self, pending: _Pending, host: str, port: int) -> None:
        try:
            pending.answer = self._lookup(host, port)
        except Exception as exc:  # handed to the caller, if it still waits
            pending.error = exc
        finally:
            self._finished(pending)

    def _finished(self, pending: _Pending) -> None:
        with self._changed:
            pending.done = True
            self._running -= 1
            self._changed.notify_all()
