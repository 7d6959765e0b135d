"""Pools of connections, each lent to one thread at a time, under one shared size budget.

The client keeps two kinds of connection: single-connection httpx.Clients, and plain sockets
for ranged reads and small GETs (`_rangeconn`). Each kind has its own `Pool` (its own way to
create, close and check one, its own idle stack: the most recently returned, warmest one goes
out first), and both count against one `Budget` of `max_connections`, so a client never holds
more sockets than that. A caller finding the budget spent takes the place of the coldest idle
connection of either kind (closing it), or, when every one is lent, waits up to `wait_timeout`
seconds, then gets httpx.PoolTimeout (translated like any other timeout).

Why lend each thread a whole httpx.Client rather than share one with `max_connections`
connections: httpcore 1.0.x's connection pool can close a connection another thread has just
started a request on. Its clean-up pass decides a connection "expired" by reading the
connection's state and polling its socket without the connection's lock; when another thread
starts a request in between, the pass closes a busy socket (see encode/httpcore#1110 for a
sibling race). The caller then gets `ReadError: [Errno 9] Bad file descriptor`; had the close
landed while it was blocked reading, it could instead hang until its read timeout. This
project's tests hit it within a few thousand ranged reads from 8 threads over 4 connections.
Lending each thread a whole httpx.Client (with one connection) for the length of a call keeps
every httpcore pool single-threaded, so that race cannot happen, while connections are still
kept alive and reused.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, Literal, TypeVar

import httpx

T = TypeVar("T")
Spare = Literal["if-new", "if-last", "no"]


class Budget:
    """At most `size` connections over all the pools sharing this budget, lent or idle."""

    def __init__(self, *, size: int, wait_timeout: float) -> None:
        self.size = size
        self.wait_timeout = wait_timeout
        self.changed = threading.Condition()  # guards everything below and the pools' stacks
        self.count = 0  # connections open or being opened
        self.closed = False
        self.pools: list[Pool[Any]] = []
        self.returns = itertools.count()  # orders returns to every pool: lower is colder

    def close(self) -> None:
        """Close every pool's idle connections now and lent ones as they come back; refuse
        further loans."""
        with self.changed:
            self.closed = True
            pools = list(self.pools)
        for pool in pools:
            pool.close_idle()

    def abort(self) -> None:
        """`close()`, and cut the lent connections of every pool that can cut them: the calls
        using them fail at once instead of running to their end."""
        self.close()
        with self.changed:
            pools = list(self.pools)
        for pool in pools:
            pool.interrupt_lent()

    def evict_coldest(self) -> None:
        """With `changed` held: close the idle connection returned longest ago, of any pool."""
        pools = [pool for pool in self.pools if pool.idle]
        if pools:
            min(pools, key=lambda pool: pool.idle[0][0]).evict_coldest()


class Pool(Generic[T]):
    """Connections of one kind: made by `create`, closed by `close`, reused only while
    `usable` says so (checked as one leaves the idle stack), counted against `budget`."""

    def __init__(self, create: Callable[[], T], *, close: Callable[[T], None],
                 usable: Callable[[T], bool] | None = None, budget: Budget,
                 spare: bool = False, interrupt: Callable[[T], None] | None = None) -> None:
        """`spare`: whenever a caller finds no idle connection and has to wait for a new one,
        open one more in the background (within the budget, one at a time), so that the
        next concurrent caller finds it ready instead of paying a connection set-up too.
        `interrupt`: cuts a connection another thread is using (`Budget.abort`); it must be
        safe to call from any thread, and the connection is still closed by its user."""
        self._create = create
        self._close = close
        self._usable = usable
        self._interrupt = interrupt
        self._lent: set[T] = set()  # guarded by the budget's lock
        self._budget = budget
        self._spare = spare
        self._making_spare = False  # guarded by the budget's lock
        self.idle: list[tuple[int, T]] = []  # a stack of (return order, connection)
        with budget.changed:
            budget.pools.append(self)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[T]:
        """Lend a connection to the calling thread for the length of the block."""
        connection = self.acquire()
        try:
            yield connection
        finally:
            self.release(connection)

    def acquire(self, *, fresh: bool = False, spare: Spare = "if-new") -> T:
        """A connection: the warmest idle one that is still usable, or (also when `fresh`) a
        new one, for which the coldest idle connection of any pool is closed if the budget is
        spent. In a pool made with `spare`, `spare` says when this call opens one: "if-new"
        when it has to open a connection, "if-last" also when it takes the last idle one
        (a caller that will soon want a second connection), "no" never."""
        budget = self._budget
        deadline = time.monotonic() + budget.wait_timeout
        with budget.changed:
            while True:
                if budget.closed:
                    raise RuntimeError("the VidCacheClient has been closed")
                while self.idle and not fresh:
                    _, connection = self.idle.pop()
                    if self._usable is None or self._usable(connection):
                        if spare == "if-last" and not self.idle and self._claim_spare():
                            self._start_spare()
                        self._lent.add(connection)
                        return connection
                    self._close(connection)
                    budget.count -= 1
                if budget.count >= budget.size:
                    budget.evict_coldest()
                if budget.count < budget.size:
                    budget.count += 1
                    open_spare = spare != "no" and not fresh and self._claim_spare()
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise httpx.PoolTimeout(
                        f"all {budget.size} connections stayed busy for {budget.wait_timeout} s")
                budget.changed.wait(remaining)
        if open_spare:
            self._start_spare()
        try:
            connection = self._create()
        except BaseException:
            self._forget()
            raise
        with budget.changed:
            closed = budget.closed
            if not closed:
                self._lent.add(connection)
        if closed:  # closed while it was being opened: too late to lend it
            self._close(connection)
            self._forget()
            raise RuntimeError("the VidCacheClient has been closed")
        return connection

    def _claim_spare(self) -> bool:
        """Whether to open a spare now (counted from here on); with the budget's lock held."""
        budget = self._budget
        if not self._spare or self._making_spare or budget.count >= budget.size:
            return False
        self._making_spare = True
        budget.count += 1
        return True

    def _start_spare(self) -> None:
        try:
            threading.Thread(target=self._open_spare, name="vidcache-spare", daemon=True).start()
        except RuntimeError:  # no thread to be had (ulimit -u, pids.max): no spare, none counted
            with self._budget.changed:
                self._making_spare = False
            self._forget()

    def _open_spare(self) -> None:
        try:
            connection = self._create()
        except BaseException:  # a spare is a bonus: a caller that needs one makes its own
            self._forget()
            connection = None
        with self._budget.changed:
            self._making_spare = False
        if connection is not None:
            self.release(connection)

    def release(self, connection: T, *, reusable: bool = True) -> None:
        """Take a lent connection back: onto the idle stack if `reusable`, else closed."""
        budget = self._budget
        with budget.changed:
            self._lent.discard(connection)
            if reusable and not budget.closed:
                self.idle.append((next(budget.returns), connection))
                budget.changed.notify()
                return
        self._close(connection)
        self._forget()

    def close_idle(self) -> None:
        """Close this pool's idle connections (e.g. when one turned out closed by the server,
        the others likely are too: a restart, an idle timeout)."""
        budget = self._budget
        with budget.changed:
            idle, self.idle = self.idle, []
            budget.count -= len(idle)
            budget.changed.notify_all()
        for _, connection in idle:
            self._close(connection)

    def interrupt_lent(self) -> None:
        """Cut every connection of this pool that is lent right now (if it can be cut)."""
        if self._interrupt is None:
            return
        with self._budget.changed:
            lent = list(self._lent)
        for connection in lent:
            self._interrupt(connection)

    def evict_coldest(self) -> None:
        """With the budget's lock held: close this pool's coldest idle connection."""
        _, connection = self.idle.pop(0)
        self._close(connection)
        self._budget.count -= 1

    def _forget(self) -> None:
        """A connection that was counted is gone (or was never made)."""
        with self._budget.changed:
            self._budget.count -= 1
            self._budget.changed.notify()
