"""vidcache_client._pool.ClientPool: lends each thread a whole httpx.Client, at most `size`."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.support import wait_until
from vidcache_client._pool import ClientPool


class Factory:
    """Makes MockTransport clients and remembers them."""

    def __init__(self) -> None:
        self.made: list[httpx.Client] = []
        self.fail_next = False

    def __call__(self) -> httpx.Client:
        if self.fail_next:
            self.fail_next = False
            raise OSError("cannot make a client")
        client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(204)))
        self.made.append(client)
        return client


@pytest.fixture
def factory() -> Iterator[Factory]:
    made = Factory()
    yield made
    for client in made.made:
        client.close()


def test_sequential_calls_reuse_one_client(factory: Factory) -> None:
    pool = ClientPool(factory, size=4, wait_timeout=5)
    for _ in range(3):
        with pool.borrow() as client:
            assert client is factory.made[0]
    assert len(factory.made) == 1


def test_the_warmest_client_goes_out_first(factory: Factory) -> None:
    pool = ClientPool(factory, size=4, wait_timeout=5)
    with pool.borrow() as first, pool.borrow() as second:
        assert first is not second
    # `first` was returned last, so it is lent first
    with pool.borrow() as again:
        assert again is first


def test_a_full_pool_times_out(factory: Factory) -> None:
    pool = ClientPool(factory, size=2, wait_timeout=0.05)
    with pool.borrow(), pool.borrow(), pytest.raises(httpx.PoolTimeout, match="all 2"):
        pool.borrow().__enter__()
    assert len(factory.made) == 2


def test_a_waiting_borrower_gets_the_returned_client(factory: Factory) -> None:
    pool = ClientPool(factory, size=1, wait_timeout=30)
    received: list[httpx.Client] = []

    def borrow_one() -> None:
        with pool.borrow() as client:
            received.append(client)

    waiter = threading.Thread(target=borrow_one)
    with pool.borrow() as held:
        waiter.start()
        wait_until(lambda: pool._changed._waiters, timeout=10,  # type: ignore[attr-defined]
                   what="the second borrower waiting")
        assert received == []
    waiter.join(timeout=10)
    assert received == [held]
    assert len(factory.made) == 1


def test_a_failed_factory_frees_its_slot(factory: Factory) -> None:
    pool = ClientPool(factory, size=1, wait_timeout=0.05)
    factory.fail_next = True
    with pytest.raises(OSError, match="cannot make a client"):
        pool.borrow().__enter__()
    with pool.borrow() as client:
        assert client is factory.made[0]


def test_close_closes_idle_and_returning_clients(factory: Factory) -> None:
    pool = ClientPool(factory, size=2, wait_timeout=5)
    with pool.borrow() as lent:
        with pool.borrow() as idle:
            pass
        pool.close()
        assert idle.is_closed
        assert not lent.is_closed
    assert lent.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        pool.borrow().__enter__()
