"""A pool of single-connection httpx.Clients, each lent to one thread at a time.

Why not one httpx.Client with `max_connections` connections shared by all threads: httpcore
1.0.x's connection pool can close a connection another thread has just started a request on.
Its clean-up pass decides a connection "expired" by reading the connection's state and polling
its socket without the connection's lock; when another thread starts a request in between, the
pass closes a busy socket (see encode/httpcore#1110 for a sibling race). The caller then gets
`ReadError: [Errno 9] Bad file descriptor`; had the close landed while it was blocked reading,
it could instead hang until its read timeout. This project's tests hit it within a few
thousand ranged reads from 8 threads over 4 connections.

Lending each thread a whole httpx.Client (with one connection) for the length of a call keeps
every httpcore pool single-threaded, so that race cannot happen, while connections are still
kept alive and reused: the most recently returned client, whose connection is warm, goes out
first. At most `size` clients exist; a caller finding all of them lent waits up to
`wait_timeout` seconds, then gets httpx.PoolTimeout (translated like any other timeout).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import httpx


class ClientPool:
    def __init__(self, factory: Callable[[], httpx.Client], *, size: int,
                 wait_timeout: float) -> None:
        self._factory = factory
        self._size = size
        self._wait_timeout = wait_timeout
        self._idle: list[httpx.Client] = []  # a stack: the warmest client on top
        self._created = 0
        self._closed = False
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[httpx.Client]:
        """Lend a client to the calling thread for the length of the block."""
        client = self._acquire()
        try:
            yield client
        finally:
            self._release(client)

    def close(self) -> None:
        """Close idle clients now and lent ones as they come back; refuse further loans."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._changed.notify_all()
        for client in idle:
            client.close()

    def _acquire(self) -> httpx.Client:
        deadline = time.monotonic() + self._wait_timeout
        with self._changed:
            while True:
                if self._closed:
                    raise RuntimeError("the VidCacheClient has been closed")
                if self._idle:
                    return self._idle.pop()
                if self._created < self._size:
                    self._created += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise httpx.PoolTimeout(
                        f"all {self._size} connections stayed busy for {self._wait_timeout} s"
                    )
                self._changed.wait(remaining)
        try:
            return self._factory()
        except BaseException:
            with self._changed:
                self._created -= 1
                self._changed.notify()
            raise

    def _release(self, client: httpx.Client) -> None:
        with self._changed:
            if not self._closed:
                self._idle.append(client)
                self._changed.notify()
                return
            self._created -= 1
        client.close()
