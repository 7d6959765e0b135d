"""vidcache_client._pool: pools lending each connection to one thread at a time, the warmest
first, all pools of a client within one `Budget` of connections."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.support import wait_until
from vidcache_client._pool import Budget, Pool


class Connection:
    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.dropped = False  # the server closed it: not usable any more

    def __repr__(self) -> str:
        return f"Connection({self.number})"


class Kind:
    """Makes Connections for one pool and remembers them."""

    def __init__(self, budget: Budget, *, spare: bool = False) -> None:
        self.made: list[Connection] = []
        self.fail_next = False
        self.pool = Pool(self._create, close=self._close, usable=self._usable, budget=budget,
                         spare=spare)

    def open(self) -> list[Connection]:
        return [connection for connection in self.made if not connection.closed]

    def _create(self) -> Connection:
        if self.fail_next:
            self.fail_next = False
            raise OSError("cannot connect")
        connection = Connection(len(self.made))
        self.made.append(connection)
        return connection

    @staticmethod
    def _close(connection: Connection) -> None:
        assert not connection.closed, "closed twice"
        connection.closed = True

    @staticmethod
    def _usable(connection: Connection) -> bool:
        return not connection.dropped


def kind(size: int, wait_timeout: float = 5) -> Kind:
    return Kind(Budget(size=size, wait_timeout=wait_timeout))


def wait_for_a_waiter(budget: Budget) -> None:
    wait_until(lambda: budget.changed._waiters, timeout=10,  # type: ignore[attr-defined]
               what="a borrower waiting")


def test_sequential_calls_reuse_one_connection() -> None:
    made = kind(4)
    for _ in range(3):
        with made.pool.borrow() as connection:
            assert connection is made.made[0]
    assert len(made.made) == 1


def test_the_warmest_connection_goes_out_first() -> None:
    made = kind(4)
    with made.pool.borrow() as first, made.pool.borrow() as second:
        assert first is not second
    # `first` was returned last, so it is lent first
    with made.pool.borrow() as again:
        assert again is first


def test_a_spent_budget_times_out() -> None:
    made = kind(2, wait_timeout=0.05)
    with made.pool.borrow(), made.pool.borrow(), \
            pytest.raises(httpx.PoolTimeout, match=r"all 2 connections stayed busy for 0\.05 s"):
        made.pool.acquire()
    assert len(made.made) == 2


def borrowed_while_waiting(waiting: Kind, holding: Kind) -> tuple[Connection, list[Connection]]:
    """Hold a connection of `holding` while another thread waits to borrow one of `waiting`
    (both pools spent); the held connection, and what the waiter got once it was given back."""
    received: list[Connection] = []

    def borrow() -> None:
        with waiting.pool.borrow() as connection:
            received.append(connection)

    waiter = threading.Thread(target=borrow)
    with holding.pool.borrow() as held:
        waiter.start()
        wait_for_a_waiter(holding.pool._budget)
        assert received == []
    waiter.join(timeout=10)
    return held, received


def test_a_waiting_borrower_gets_the_returned_connection() -> None:
    made = kind(1, wait_timeout=30)
    held, received = borrowed_while_waiting(made, made)
    assert received == [held]
    assert len(made.made) == 1


def test_a_failed_create_frees_its_slot() -> None:
    made = kind(1, wait_timeout=0.05)
    made.fail_next = True
    with pytest.raises(OSError, match="cannot connect"):
        made.pool.acquire()
    with made.pool.borrow() as connection:
        assert connection is made.made[0]


def test_a_spare_no_thread_can_be_started_for_is_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a limit on threads (ulimit -u, pids.max) the spare's thread cannot start: the
    caller still gets its connection, and the spare is not counted. Was: the caller got
    CPython's RuntimeError, and the budget counted its connection and the spare for good (two
    slots of the pool's budget gone at each such call, the spare never tried again)."""
    budget = Budget(size=2, wait_timeout=0.05)
    made = Kind(budget, spare=True)

    def refused(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    with made.pool.borrow() as connection:
        assert connection is made.made[0]
    monkeypatch.undo()
    assert budget.count == 1
    with made.pool.borrow(), made.pool.borrow():  # both slots
        assert len(made.made) == 2


def test_an_idle_connection_no_longer_usable_is_closed_and_replaced() -> None:
    made = kind(2)
    with made.pool.borrow() as first, made.pool.borrow():
        pass
    first.dropped = True  # on top of the stack
    with made.pool.borrow() as connection:
        assert first.closed
        assert connection is made.made[1]
    with made.pool.borrow() as again:  # the dropped one freed its slot: room for a new one
        assert again is made.made[1]
        with made.pool.borrow() as new:
            assert new is made.made[2]


def test_a_fresh_connection_takes_the_place_of_the_coldest_idle_one() -> None:
    made = kind(2)
    with made.pool.borrow() as first, made.pool.borrow() as second:
        pass  # `second` returned first: the colder one
    fresh = made.pool.acquire(fresh=True)
    assert fresh not in (first, second)
    assert second.closed and not first.closed
    made.pool.release(fresh)
    assert made.open() == [first, fresh]


def test_a_connection_released_as_not_reusable_is_closed_and_frees_its_slot() -> None:
    made = kind(1, wait_timeout=0.05)
    connection = made.pool.acquire()
    made.pool.release(connection, reusable=False)
    assert connection.closed
    with made.pool.borrow() as new:
        assert new is made.made[1]


def test_close_idle_closes_only_the_idle_connections() -> None:
    made = kind(2, wait_timeout=0.05)
    lent = made.pool.acquire()
    with made.pool.borrow() as idle:
        pass
    made.pool.close_idle()
    assert idle.closed and not lent.closed
    with made.pool.borrow() as new:  # the idle one's slot is free again
        assert new is made.made[2]
    made.pool.release(lent)
    assert made.open() == [lent, made.made[2]]


def test_close_closes_idle_and_returning_connections() -> None:
    made = kind(2)
    with made.pool.borrow() as lent:
        with made.pool.borrow() as idle:
            pass
        made.pool._budget.close()
        assert idle.closed
        assert not lent.closed
    assert lent.closed
    with pytest.raises(RuntimeError, match="closed"):
        made.pool.acquire()


# -- two pools, one budget ---------------------------------------------------------------------


def test_pools_sharing_a_budget_hold_at_most_its_size_together() -> None:
    budget = Budget(size=2, wait_timeout=0.05)
    clients, sockets = Kind(budget), Kind(budget)
    with clients.pool.borrow(), sockets.pool.borrow(), \
            pytest.raises(httpx.PoolTimeout, match="all 2 connections"):
        sockets.pool.acquire()
    assert len(clients.open()) + len(sockets.open()) == 2


def test_a_spent_budget_makes_room_by_closing_the_coldest_idle_connection_of_any_pool() -> None:
    budget = Budget(size=2, wait_timeout=0.05)
    clients, sockets = Kind(budget), Kind(budget)
    with clients.pool.borrow() as colder:
        pass
    with sockets.pool.borrow() as warmer:
        pass
    with clients.pool.borrow() as again:  # its own idle connection, nothing closed
        assert again is colder
    # now the socket is the coldest: a second client takes its place...
    with clients.pool.borrow() as client, clients.pool.borrow() as other:
        assert warmer.closed
        assert {client, other} == {colder, clients.made[1]}
        # ...and with both lent, a socket has to wait
        with pytest.raises(httpx.PoolTimeout):
            sockets.pool.acquire()
    with sockets.pool.borrow() as socket:
        assert socket is sockets.made[1]
    assert len(clients.open()) + len(sockets.open()) == 2


def test_a_waiter_of_one_pool_gets_the_slot_another_pool_returns() -> None:
    budget = Budget(size=1, wait_timeout=30)
    clients, sockets = Kind(budget), Kind(budget)
    client, received = borrowed_while_waiting(sockets, clients)
    assert received == sockets.made
    assert client.closed  # returned to its pool, then closed to make room


def test_closing_the_budget_closes_every_pool() -> None:
    budget = Budget(size=3, wait_timeout=5)
    clients, sockets = Kind(budget), Kind(budget)
    with clients.pool.borrow(), sockets.pool.borrow():
        pass
    lent = sockets.pool.acquire()
    budget.close()
    assert clients.open() == [] and sockets.open() == [lent]
    sockets.pool.release(lent)
    assert lent.closed
    with pytest.raises(RuntimeError, match="the VidCacheClient has been closed"):
        clients.pool.acquire()
