"""Unit tests of vcfs.blocks: block arithmetic and the BlockCache, with a fake fetcher that
serves bytes from memory and records every call. No FUSE, no network."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import wait_until
from vcfs.blocks import (
    BlockCache,
    BlockFetcher,
    BlockFetchError,
    FetchStopped,
    OnBlock,
    OnPartial,
    OnSpan,
    adjacent_runs,
    block_bounds,
    block_count,
    blocks_for,
    clamp_range,
    join_pieces,
    run_bounds,
    unfilled_block,
)

H1 = "1" * 64
H2 = "2" * 64
BS = 16  # tiny blocks keep the arithmetic visible
DEADLINE = 10.0


class FakeFetcher:
    """Serves `files[hash][start:end]` and records every call as (hash, start, end)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.calls: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, content_hash: str, start: int, end: int) -> bytes:
        with self._lock:
            self.calls.append((content_hash, start, end))
        return self.files[content_hash][start:end]

    @property
    def bytes_requested(self) -> int:
        return sum(end - start for _, start, end in self.calls)


class GatedFetcher(FakeFetcher):
    """A FakeFetcher whose calls block until `gate` is set, then return or raise `error`."""

    def __init__(self, files: dict[str, bytes], error: Exception | None = None) -> None:
        super().__init__(files)
        self.gate = threading.Event()
        self.error = error

    def __call__(self, content_hash: str, start: int, end: int) -> bytes:
        data = super().__call__(content_hash, start, end)
        if not self.gate.wait(DEADLINE):
            raise AssertionError("gate never opened")
        if self.error is not None:
            raise self.error
        return data


def data_of(size: int, seed: int = 0) -> bytes:
    """Distinct, position-dependent bytes, so a misplaced slice cannot go unnoticed."""
    return bytes((i * 7 + i // 251 + seed) % 256 for i in range(size))


@contextmanager
def threads(*targets: Callable[[], object]) -> Iterator[None]:
    """Run the targets in threads; on exit join them with a deadline and re-raise failures."""
    errors: list[BaseException] = []

    def run(target: Callable[[], object]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    started = [threading.Thread(target=run, args=(t,), daemon=True) for t in targets]
    for thread in started:
        thread.start()
    try:
        yield
    finally:
        for thread in started:
            thread.join(DEADLINE)
        assert not any(t.is_alive() for t in started), "reader threads hung"
    if errors:
        raise errors[0]


# -- arithmetic ---------------------------------------------------------------------------------


def test_clamp_range() -> None:
    assert clamp_range(0, 10, 100) == (0, 10)
    assert clamp_range(95, 10, 100) == (95, 100)
    assert clamp_range(100, 10, 100) == (100, 100)
    assert clamp_range(150, 10, 100) == (100, 100)
    assert clamp_range(5, 0, 100) == (5, 5)
    with pytest.raises(ValueError):
        clamp_range(-1, 10, 100)
    with pytest.raises(ValueError):
        clamp_range(0, -1, 100)


def test_block_count() -> None:
    assert block_count(0, BS) == 0
    assert block_count(1, BS) == 1
    assert block_count(BS, BS) == 1
    assert block_count(BS + 1, BS) == 2


def test_blocks_for() -> None:
    assert blocks_for(0, BS, 100, BS) == range(0, 1)
    assert blocks_for(0, BS + 1, 100, BS) == range(0, 2)
    assert blocks_for(BS - 1, 2, 100, BS) == range(0, 2)
    assert blocks_for(BS, BS, 100, BS) == range(1, 2)
    assert blocks_for(90, 1000, 100, BS) == range(5, 7)  # clamped at EOF: last block is 6
    assert blocks_for(100, 10, 100, BS) == range(0)
    assert blocks_for(10, 0, 100, BS) == range(0)


def test_run_and_block_bounds() -> None:
    assert run_bounds(range(0, 1), 100, BS) == (0, BS)
    assert run_bounds(range(1, 4), 100, BS) == (BS, 4 * BS)
    assert run_bounds(range(5, 7), 100, BS) == (5 * BS, 100)  # the last block is short
    assert block_bounds(6, 100, BS) == (96, 100)
    for bad in (range(0), range(0, 4, 2), range(7, 8)):
        with pytest.raises(ValueError):
            run_bounds(bad, 100, BS)


def test_adjacent_runs() -> None:
    assert adjacent_runs([]) == []
    assert adjacent_runs([3]) == [range(3, 4)]
    assert adjacent_runs([1, 2, 3, 5, 7, 8]) == [range(1, 4), range(5, 6), range(7, 9)]
    with pytest.raises(ValueError):
        adjacent_runs([2, 1])


@given(
    offset=st.integers(0, 300),
    size=st.integers(0, 300),
    file_size=st.integers(0, 250),
    block_size=st.integers(1, 40),
)
def test_blocks_for_covers_exactly_the_clamped_range(
    offset: int, size: int, file_size: int, block_size: int
) -> None:
    start, end = clamp_range(offset, size, file_size)
    blocks = blocks_for(offset, size, file_size, block_size)
    if start == end:
        assert not blocks
        return
    low, high = run_bounds(blocks, file_size, block_size)
    assert low <= start < low + block_size  # the first block holds the first byte
    assert high - block_size < end <= high  # the last block holds the last byte
    assert high <= file_size
    assert adjacent_runs(blocks) == [blocks]


# -- reads ----------------------------------------------------------------------------------


def test_cold_read_inside_one_block_fetches_that_block_once() -> None:
    data = data_of(100)
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    assert cache.read(H1, 100, 20, 5) == data[20:25]
    assert fetcher.calls == [(H1, 16, 32)]
    assert cache.read(H1, 100, 17, 10) == data[17:27]
    assert fetcher.calls == [(H1, 16, 32)]  # warm: no new call
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["fetches"]) == (1, 1, 1)
    assert stats["bytes_fetched"] == BS
    assert stats["cached_bytes"] == BS


def test_cold_read_spanning_blocks_is_one_fetch() -> None:
    data = data_of(100)
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    assert cache.read(H1, 100, 10, 30) == data[10:40]  # blocks 0, 1, 2
    assert fetcher.calls == [(H1, 0, 48)]
    stats = cache.stats()
    assert (stats["misses"], stats["fetches"], stats["bytes_fetched"]) == (3, 1, 48)
    assert cache.read(H1, 100, 0, 48) == data[:48]
    assert len(fetcher.calls) == 1
    assert cache.stats()["hits"] == 3


def test_default_sizes_cold_mib_read_across_two_blocks_is_one_request() -> None:
    mib = 1 << 20
    data = os.urandom(3 * mib)
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher)
    assert cache.block_size == mib
    assert cache.read(H1, len(data), mib // 2, mib) == data[mib // 2 : mib // 2 + mib]
    assert fetcher.calls == [(H1, 0, 2 * mib)]


def test_only_missing_blocks_are_fetched_in_adjacent_runs() -> None:
    data = data_of(200)
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    cache.read(H1, 200, 0, 1)  # block 0
    cache.read(H1, 200, 2 * BS, 1)  # block 2
    cache.read(H1, 200, 5 * BS, 1)  # block 5
    fetcher.calls.clear()
    assert cache.read(H1, 200, 0, 7 * BS) == data[: 7 * BS]
    # missing: 1, 3-4, 6 -> three runs, three calls, no byte fetched twice
    assert fetcher.calls == [(H1, 16, 32), (H1, 48, 80), (H1, 96, 112)]


def test_reads_at_and_past_eof() -> None:
    data = data_of(100)  # 7 blocks, the last 4 bytes long
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    assert cache.read(H1, 100, 100, 10) == b""
    assert cache.read(H1, 100, 5000, 10) == b""
    assert cache.read(H1, 100, 0, 0) == b""
    assert fetcher.calls == []
    assert cache.read(H1, 100, 90, 4096) == data[90:]
    assert fetcher.calls == [(H1, 80, 100)]  # blocks 5 and 6, the last one short
    assert cache.read(H1, 100, 99, 1) == data[99:]


def test_empty_file() -> None:
    fetcher = FakeFetcher({H1: b""})
    cache = BlockCache(fetcher, block_size=BS)
    assert cache.read(H1, 0, 0, 100) == b""
    cache.prefetch(H1, 0, 0, 10)
    assert fetcher.calls == []


def test_hashes_do_not_share_blocks() -> None:
    one, two = data_of(50, seed=1), data_of(50, seed=2)
    fetcher = FakeFetcher({H1: one, H2: two})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    assert cache.read(H1, 50, 0, 50) == one
    assert cache.read(H2, 50, 0, 50) == two
    assert cache.read(H1, 50, 3, 30) == one[3:33]
    assert len(fetcher.calls) == 2


def test_whole_cached_block_is_returned_without_copy() -> None:
    block = data_of(BS)
    cache = BlockCache(lambda h, start, end: block[start:end], block_size=BS, capacity=1000)
    first = cache.read(H1, BS, 0, BS)
    assert cache.read(H1, BS, 0, BS) is first


def test_pieces_are_the_cached_blocks_and_the_bounds_of_what_a_read_takes() -> None:
    data = data_of(100)  # 7 blocks, the last 4 bytes long
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    cold = cache.pieces(H1, 100, 10, 30)  # across blocks 0, 1, 2
    assert [(block, low, high) for block, low, high in cold] == [
        (data[:16], 10, 16), (data[16:32], 0, 16), (data[32:48], 0, 8)]
    assert fetcher.calls == [(H1, 0, 48)]
    assert join_pieces(cold) == data[10:40]
    [(whole, low, high)] = cache.pieces(H1, 100, BS, BS)  # one whole block, cached
    assert (whole, low, high) == (data[16:32], 0, BS)
    assert whole is cold[1][0]  # the cached block itself, not a copy
    assert join_pieces([(whole, low, high)]) is whole
    [(inside, low, high)] = cache.pieces(H1, 100, 35, 5)  # inside one block
    assert inside is cold[2][0] and (low, high) == (3, 8)
    assert len(fetcher.calls) == 1
    stats = cache.stats()
    assert (stats["misses"], stats["hits"], stats["fetches"]) == (3, 2, 1)
    # At EOF: the last block is short, and nothing lies past it.
    assert [(len(block), low, high) for block, low, high in cache.pieces(H1, 100, 90, 4096)] == [
        (BS, 10, 16), (4, 0, 4)]
    assert fetcher.calls[1:] == [(H1, 80, 100)]
    assert cache.pieces(H1, 100, 100, 10) == []
    assert cache.pieces(H1, 100, 5000, 10) == []
    assert cache.pieces(H1, 100, 0, 0) == []
    assert join_pieces([]) == b""
    assert len(fetcher.calls) == 2


def test_pieces_keep_their_bytes_once_their_blocks_are_evicted() -> None:
    """A caller copying pieces elsewhere holds their `bytes`: the cache may evict the blocks
    meanwhile (another reader's fetch) without taking the memory being copied."""
    data = data_of(6 * BS)
    cache = BlockCache(FakeFetcher({H1: data}), block_size=BS, capacity=2 * BS)
    pieces = cache.pieces(H1, len(data), 10, BS)
    assert cache.read(H1, len(data), 3 * BS, 2 * BS) == data[3 * BS : 5 * BS]
    assert cache.stats()["evictions"] == 2
    assert not cache.is_cached(H1, 0) and not cache.is_cached(H1, 1)
    assert join_pieces(pieces) == data[10 : 10 + BS]


def test_a_piece_of_a_block_still_arriving_is_the_block_being_filled() -> None:
    data = data_of(2 * BS)
    fetcher = TricklingBlockFetcher(data, step=4)
    cache = cache_with(data, fetcher)
    [(arriving, low, high)] = cache.pieces(H1, len(data), 1, 3)  # only 4 bytes are in
    assert (len(arriving), low, high) == (BS, 1, 4) and arriving[low:high] == data[1:4]
    for _ in range(BS // 4 - 1):
        fetcher.proceed.release()
    wait_until(lambda: cache.is_cached(H1, 0), timeout=DEADLINE)
    [(whole, low, high)] = cache.pieces(H1, len(data), 0, BS)
    assert whole is arriving and whole == data[:BS]


@settings(max_examples=150, deadline=None)
@given(
    file_size=st.integers(0, 400),
    unit=st.integers(1, BS),
    capacity=st.integers(0, 300),
    reads=st.lists(st.tuples(st.integers(0, 450), st.integers(0, 200), st.booleans()),
                   min_size=1, max_size=25),
)
def test_pieces_cover_exactly_the_clamped_range_one_block_each(
    file_size: int, unit: int, capacity: int, reads: list[tuple[int, int, bool]]
) -> None:
    """Whole blocks, tails and the parts scattered reads leave: each piece lies within its
    `bytes`, takes something, and belongs to the next block of the read (or continues a part
    of the same block, read on), and together they are the source's bytes."""
    data = data_of(file_size)
    cache = BlockCache(FakeFetcher({H1: data}), block_size=BS, capacity=capacity,
                       block_fetcher=TailFetcher(data, unit=unit))
    for offset, size, scattered in reads:
        pieces = cache.pieces(H1, file_size, offset, size, scattered=scattered)
        start, end = clamp_range(offset, size, file_size)
        assert sum(high - low for _, low, high in pieces) == max(end - start, 0)
        assert all(0 <= low < high <= len(block) for block, low, high in pieces)
        assert len(blocks_for(offset, size, file_size, BS)) <= len(pieces) <= len(
            blocks_for(offset, size, file_size, BS)) + 1
        assert join_pieces(pieces) == data[offset : offset + size]


@settings(max_examples=150, deadline=None)
@given(
    file_size=st.integers(0, 400),
    block_size=st.integers(1, 64),
    capacity=st.integers(0, 300),
    reads=st.lists(st.tuples(st.integers(0, 450), st.integers(0, 200)), min_size=1, max_size=25),
)
def test_random_reads_equal_source_slices(
    file_size: int, block_size: int, capacity: int, reads: list[tuple[int, int]]
) -> None:
    data = data_of(file_size)
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=block_size, capacity=capacity)
    for offset, size in reads:
        assert cache.read(H1, file_size, offset, size) == data[offset : offset + size]
        stats = cache.stats()
        assert stats["cached_bytes"] <= capacity
    for _, start, end in fetcher.calls:
        assert start % block_size == 0
        assert end == file_size or end % block_size == 0
    stats = cache.stats()
    assert stats["fetches"] == len(fetcher.calls)
    assert stats["bytes_fetched"] == fetcher.bytes_requested


# -- budget and eviction ------------------------------------------------------------------------


def test_eviction_keeps_the_byte_budget_and_evicts_least_recent() -> None:
    data = data_of(10 * BS)
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=3 * BS)
    for index in range(3):
        cache.read(H1, len(data), index * BS, 1)
    cache.read(H1, len(data), 0, 1)  # block 0 is now the most recent
    cache.read(H1, len(data), 3 * BS, 1)  # evicts block 1, the least recent
    assert [cache.is_cached(H1, i) for i in range(4)] == [True, False, True, True]
    for index in range(4, 10):
        cache.read(H1, len(data), index * BS, 1)
        assert cache.stats()["cached_bytes"] <= 3 * BS
    stats = cache.stats()
    assert stats["evictions"] == 7
    assert stats["cached_blocks"] == 3
    assert stats["cached_bytes"] == 3 * BS
    fetcher.calls.clear()
    assert cache.read(H1, len(data), 0, BS) == data[:BS]
    assert fetcher.calls == [(H1, 0, BS)]  # evicted, so fetched again


def test_blocks_in_flight_count_against_the_budget() -> None:
    """Room for fetched blocks is made before they arrive: cached plus in-flight bytes never
    exceed the capacity, so a deep prefetch pipeline does not add to the memory used."""
    data = data_of(10 * BS)
    cached_during_fetch: list[int] = []

    def fetcher(content_hash: str, start: int, end: int) -> bytes:
        cached_during_fetch.append(cache.stats()["cached_bytes"] + (end - start))
        return data[start:end]

    cache = BlockCache(fetcher, block_size=BS, capacity=4 * BS)
    cache.read(H1, len(data), 0, 3 * BS)
    cache.prefetch(H1, len(data), 3, 5)  # three more blocks: two old ones make room first
    assert [cache.is_cached(H1, i) for i in range(6)] == [False, False, True, True, True, True]
    cache.read(H1, len(data), 9 * BS, BS)
    assert max(cached_during_fetch) <= 4 * BS
    assert cache.stats()["cached_bytes"] == 4 * BS
    assert cache.stats()["evictions"] == 3
    assert cache.read(H1, len(data), 3 * BS, 3 * BS) == data[3 * BS : 6 * BS]


def test_prefetches_of_several_streams_stay_within_the_budget_together() -> None:
    """Two streams' readahead at once on a small cache (`--cache-size 4M`: a 2-block window
    each, and 4 readahead threads): a prefetch takes no more than the room its fellows in
    flight leave, so in-flight plus cached bytes stay within the capacity; what it leaves
    out is fetched by the read that needs it."""
    data = data_of(8 * BS)
    fetcher = GatedFetcher({H1: data, H2: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=4 * BS)
    fetcher.gate.set()
    cache.read(H1, len(data), 0, BS)
    cache.read(H2, len(data), 0, BS)
    fetcher.gate.clear()  # the prefetches wait
    with threads(lambda: cache.prefetch(H1, len(data), 1, 3),
                 lambda: cache.prefetch(H2, len(data), 1, 3)):
        wait_until(lambda: len(fetcher.calls) == 4, timeout=DEADLINE, what="the prefetches")
        in_flight = cache.stats()["fetching_blocks"] * BS + cache.stats()["cached_bytes"]
        fetcher.gate.set()
    assert in_flight <= 4 * BS
    assert cache.stats()["cached_bytes"] <= 4 * BS
    assert cache.read(H1, len(data), 0, 4 * BS) == data[: 4 * BS]
    assert cache.read(H2, len(data), 0, 4 * BS) == data[: 4 * BS]


def test_fetching_blocks_counts_the_blocks_in_flight_until_they_are_resolved() -> None:
    data = data_of(4 * BS)
    fetcher = GatedFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=8 * BS)
    got: list[bytes] = []
    with threads(lambda: got.append(cache.read(H1, len(data), BS, 2 * BS))):
        wait_until(lambda: len(fetcher.calls) == 1, timeout=DEADLINE, what="the fetch")
        assert cache.stats()["fetching_blocks"] == 2
        fetcher.gate.set()
    assert got == [data[BS : 3 * BS]]
    assert cache.stats()["fetching_blocks"] == 0


def cache_with(data: bytes, block_fetcher: BlockFetcher) -> BlockCache:
    """A cache of video H1 (`data`) whose runs come from `block_fetcher`."""
    return BlockCache(FakeFetcher({H1: data}), block_size=BS, capacity=1000,
                      block_fetcher=block_fetcher)


def test_runs_of_blocks_come_from_the_block_fetcher_as_separate_blocks() -> None:
    data = data_of(5 * BS + 3)
    fetcher = FakeFetcher({H1: data})
    pieces: list[list[bytes]] = []

    def block_fetcher(content_hash: str, start: int, end: int, block_size: int, *,
                      on_block: OnBlock, on_partial: OnPartial | None = None,
                      skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                      stop: threading.Event | None = None) -> list[bytes]:
        blocks = [data[low : min(low + block_size, end)] for low in range(start, end, block_size)]
        pieces.append(blocks)
        for position, block in enumerate(blocks):
            on_block(position, block)
        return blocks

    cache = BlockCache(fetcher, block_size=BS, capacity=1000, block_fetcher=block_fetcher)
    assert cache.read(H1, len(data), 0, 1) == data[:1]
    assert cache.read(H1, len(data), BS, len(data)) == data[BS:]
    assert fetcher.calls == []  # with a block fetcher, every run goes through it
    assert [len(b) for b in pieces[0]] == [BS]
    assert [len(b) for b in pieces[1]] == [BS, BS, BS, BS, 3]
    assert cache.stats()["bytes_fetched"] == len(data)
    assert all(cache.is_cached(H1, i) for i in range(6))


def test_a_reported_block_reaches_its_readers_before_the_run_is_over() -> None:
    data = data_of(4 * BS)
    first_reported = threading.Event()
    release_rest = threading.Event()

    def block_fetcher(content_hash: str, start: int, end: int, block_size: int, *,
                      on_block: OnBlock, on_partial: OnPartial | None = None,
                      skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                      stop: threading.Event | None = None) -> list[bytes]:
        blocks = [data[low : low + block_size] for low in range(start, end, block_size)]
        on_block(0, blocks[0])
        first_reported.set()
        if not release_rest.wait(DEADLINE):
            raise AssertionError("the rest of the run was never released")
        for position in range(1, len(blocks)):
            on_block(position, blocks[position])
        return blocks

    cache = cache_with(data, block_fetcher)
    got: list[bytes] = []
    with threads(lambda: cache.prefetch(H1, len(data), 0, 3)):
        assert first_reported.wait(DEADLINE)
        got.append(cache.read(H1, len(data), 0, BS))  # served while blocks 1..3 are pending
        assert cache.is_cached(H1, 0) and not cache.is_cached(H1, 1)
        release_rest.set()
    assert got == [data[:BS]]
    assert cache.read(H1, len(data), 0, 4 * BS) == data
    assert cache.stats()["fetches"] == 1


def test_a_run_failing_midway_keeps_the_blocks_already_reported() -> None:
    data = data_of(4 * BS)

    def block_fetcher(content_hash: str, start: int, end: int, block_size: int, *,
                      on_block: OnBlock, on_partial: OnPartial | None = None,
                      skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                      stop: threading.Event | None = None) -> list[bytes]:
        on_block(0, data[start : start + block_size])
        on_block(0, data[start : start + block_size])  # a repeated report changes nothing
        raise OSError("connection reset")

    cache = cache_with(data, block_fetcher)
    with pytest.raises(OSError, match="reset"):
        cache.prefetch(H1, len(data), 0, 3)
    assert [cache.is_cached(H1, i) for i in range(4)] == [True, False, False, False]
    assert cache.stats()["fetch_errors"] == 1
    assert cache.stats()["bytes_fetched"] == BS
    assert cache.read(H1, len(data), 0, BS) == data[:BS]


def test_a_stopped_prefetch_keeps_what_arrived_and_its_waiting_reader_fetches_the_rest() -> None:
    """Stopping is not an error: the reader waiting for a block the prefetch gave up fetches
    that block itself and gets the right bytes; nothing counts as a fetch error."""
    data = data_of(4 * BS)
    first_reported = threading.Event()
    calls: list[tuple[int, int, bool]] = []  # (start, end, given a stop event)

    def block_fetcher(content_hash: str, start: int, end: int, block_size: int, *,
                      on_block: OnBlock, on_partial: OnPartial | None = None, skip: int = 0,
                      until: int | None = None, on_span: OnSpan | None = None,
                      stop: threading.Event | None = None) -> list[bytes]:
        calls.append((start, end, stop is not None))
        blocks = [data[low : low + block_size] for low in range(start, end, block_size)]
        if stop is None:  # a reader's own fetch
            for position, block in enumerate(blocks):
                on_block(position, block)
            return blocks
        on_block(0, blocks[0])
        first_reported.set()
        if not stop.wait(DEADLINE):
            raise AssertionError("never stopped")
        raise FetchStopped("stopped")

    cache = cache_with(data, block_fetcher)
    stop = threading.Event()
    stopped: list[BaseException] = []

    def prefetch() -> None:
        try:
            cache.prefetch(H1, len(data), 0, 3, stop=stop)
        except FetchStopped as exc:
            stopped.append(exc)

    got: list[bytes] = []

    def read_block_2() -> None:
        first_reported.wait(DEADLINE)
        got.append(cache.read(H1, len(data), 2 * BS, BS))

    with threads(prefetch, read_block_2):
        assert first_reported.wait(DEADLINE)
        wait_until(lambda: cache.stats()["inflight_waits"] == 1, timeout=DEADLINE,
                   what="the reader waiting for block 2")
        stop.set()
    assert len(stopped) == 1 and got == [data[2 * BS : 3 * BS]]
    assert calls == [(0, 4 * BS, True), (2 * BS, 3 * BS, False)]
    assert [cache.is_cached(H1, i) for i in range(4)] == [True, False, True, False]
    assert cache.stats()["fetch_errors"] == 0


def test_blocks_a_fetcher_returns_without_reporting_still_resolve() -> None:
    data = data_of(3 * BS)

    def silent(content_hash: str, start: int, end: int, block_size: int, *,
               on_block: OnBlock, on_partial: OnPartial | None = None,
               skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
               stop: threading.Event | None = None) -> list[bytes]:
        return [data[low : low + block_size] for low in range(start, end, block_size)]

    cache = cache_with(data, silent)
    assert cache.read(H1, len(data), 0, 3 * BS) == data
    assert all(cache.is_cached(H1, i) for i in range(3))


class TricklingBlockFetcher:
    """A block fetcher that fills one `bytes` per block the way vcfs.remote does, reporting
    its first `step` bytes, then each further `step`, as verified; it waits for `proceed`
    before each report after the first, and fails at `fail_at` bytes if set."""

    def __init__(self, data: bytes, step: int, *, fail_at: int | None = None) -> None:
        self.data = data
        self.step = step
        self.fail_at = fail_at
        self.proceed = threading.Semaphore(0)
        self.reported: list[int] = []
        self.calls = 0

    def __call__(self, content_hash: str, start: int, end: int, block_size: int, *,
                 on_block: OnBlock, on_partial: OnPartial | None = None,
                      skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                      stop: threading.Event | None = None) -> list[bytes]:
        self.calls += 1
        blocks = []
        for position, low in enumerate(range(start, end, block_size)):
            high = min(low + block_size, end)
            block, view = unfilled_block(high - low)
            for ready in range(self.step, high - low + self.step, self.step):
                ready = min(ready, high - low)
                if self.reported and not self.proceed.acquire(timeout=DEADLINE):
                    raise AssertionError("never told to proceed")
                if self.fail_at is not None and low - start + ready > self.fail_at:
                    raise OSError("connection reset mid-block")
                view[ready - min(self.step, ready) : ready] = self.data[
                    low + ready - min(self.step, ready) : low + ready]
                self.reported.append(low - start + ready)
                if ready < high - low and on_partial is not None:
                    on_partial(position, block, ready)
            on_block(position, block)
            blocks.append(block)
        return blocks


def test_a_read_of_a_blocks_start_returns_before_the_rest_of_the_block_arrives() -> None:
    data = data_of(2 * BS)
    fetcher = TricklingBlockFetcher(data, step=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), 1, 3) == data[1:4]  # only the first 4 bytes are in
    assert fetcher.reported == [4] and not cache.is_cached(H1, 0)
    got: list[bytes] = []
    with threads(lambda: got.append(cache.read(H1, len(data), 6, 4))):  # needs 10 bytes
        wait_until(lambda: cache.stats()["inflight_waits"] == 1, timeout=DEADLINE)
        fetcher.proceed.release()  # 8 bytes in: still waiting
        fetcher.proceed.release()  # 12 bytes in: served
        wait_until(lambda: got, timeout=DEADLINE)
        assert not cache.is_cached(H1, 0)
        fetcher.proceed.release()  # the rest of the block
    assert got == [data[6:10]]
    wait_until(lambda: cache.is_cached(H1, 0), timeout=DEADLINE)  # its fetch ends on its own
    assert cache.read(H1, len(data), 0, BS) == data[:BS]
    assert fetcher.calls == 1 and cache.stats()["fetches"] == 1


def test_a_block_failing_after_part_of_it_was_read_is_not_cached_and_fails_the_rest() -> None:
    data = data_of(BS)
    fetcher = TricklingBlockFetcher(data, step=4, fail_at=8)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), 0, 4) == data[:4]
    errors: list[BaseException] = []

    def read_beyond() -> None:
        try:
            cache.read(H1, len(data), 4, 8)
        except OSError as exc:
            errors.append(exc)

    with threads(read_beyond):
        wait_until(lambda: cache.stats()["inflight_waits"] == 1, timeout=DEADLINE)
        fetcher.proceed.release()  # 8 bytes: not enough for [4, 12)
        fetcher.proceed.release()  # the fetch fails
    assert [str(e) for e in errors] == ["connection reset mid-block"]
    assert not cache.is_cached(H1, 0)
    assert cache.stats()["cached_bytes"] == 0 and cache.stats()["fetch_errors"] == 1
    fetcher.fail_at = None
    for _ in range(4):  # each of the second fetch's 4 reports
        fetcher.proceed.release()
    assert cache.read(H1, len(data), 0, BS) == data  # fetched again, from scratch


def test_partial_reports_that_cannot_be_handed_out_are_ignored() -> None:
    data = data_of(BS)
    release = threading.Event()

    def odd_reports(content_hash: str, start: int, end: int, block_size: int, *,
                    on_block: OnBlock, on_partial: OnPartial | None = None,
                      skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                      stop: threading.Event | None = None) -> list[bytes]:
        assert on_partial is not None
        on_partial(0, bytearray(data), BS - 1)  # type: ignore[arg-type]  # not bytes
        on_partial(0, data, 0)  # nothing verified
        on_partial(5, data, 4)  # not a block of the run
        if not release.wait(DEADLINE):
            raise AssertionError("never released")
        return [data]

    cache = cache_with(data, odd_reports)
    got: list[bytes] = []
    with threads(lambda: got.append(cache.read(H1, len(data), 0, 2))):
        wait_until(lambda: cache.stats()["misses"] == 1, timeout=DEADLINE)
        assert not got  # none of the reports served the read
        release.set()
    assert got == [data[:2]]


class TailFetcher:
    """A block fetcher that leaves out the first `skip` bytes it is allowed to, rounded down
    to `unit` (as vcfs.remote does with digest chunks), or `extra` more than allowed; and,
    given `until`, the last block's bytes from `until` rounded up to `unit` on (or `short`
    more), telling `on_span` unless `silent`."""

    def __init__(self, data: bytes, unit: int, extra: int = 0, short: int = 0,
                 silent: bool = False) -> None:
        self.data = data
        self.unit = unit
        self.extra = extra
        self.short = short
        self.silent = silent
        self.calls: list[tuple[int, int, int]] = []  # (start, end, skip)
        self.untils: list[int | None] = []

    def __call__(self, content_hash: str, start: int, end: int, block_size: int, *,
                 on_block: OnBlock, on_partial: OnPartial | None = None,
                 skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                 stop: threading.Event | None = None) -> list[bytes]:
        self.calls.append((start, end, skip))
        self.untils.append(until)
        lead = skip // self.unit * self.unit + self.extra
        if until is not None:
            last = (end - 1) // block_size * block_size
            end = min(end, last + -(-until // self.unit) * self.unit) - self.short
            if on_span is not None and not self.silent:
                on_span(start + lead, end)
        blocks = [self.data[low : min(low - low % block_size + block_size, end)]
                  for low in [start + lead, *range(start + block_size, end, block_size)]]
        for position, block in enumerate(blocks):
            on_block(position, block)
        return blocks


def test_a_read_into_the_middle_of_a_cold_block_fetches_only_its_tail() -> None:
    data = data_of(3 * BS)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), BS + 10, 9) == data[BS + 10 : BS + 19]  # into block 2
    assert fetcher.calls == [(BS, 3 * BS, 10)]  # block 1 with its first 10 bytes not needed
    assert cache.stats()["bytes_fetched"] == 2 * BS - 8  # its tail from byte 8 on, block 2
    assert cache.read(H1, len(data), BS + 8, 4) == data[BS + 8 : BS + 12]  # from the tail
    assert len(fetcher.calls) == 1
    # the block's start: what lies before the tail is fetched, joined with it into the block
    assert cache.read(H1, len(data), BS, 8) == data[BS : BS + 8]
    assert fetcher.calls[1] == (BS, 2 * BS, 0)
    assert cache.read(H1, len(data), 0, 3 * BS) == data  # block 0 fetched, 1 and 2 cached
    assert len(fetcher.calls) == 3
    assert cache.stats()["cached_bytes"] == 3 * BS


def test_a_block_held_as_a_part_is_not_cached_until_it_is_whole() -> None:
    """vcfs.fs asks whether block 0 is cached to decide if a lookup brings it along with the
    metadata: a tail or a scattered read's part of it is not the block."""
    data = data_of(3 * BS)
    cache = cache_with(data, TailFetcher(data, unit=4))
    cache.read(H1, len(data), 10, 4)  # a tail of block 0
    cache.read(H1, len(data), BS + 5, 2, scattered=True)  # a part of block 1
    assert [cache.is_cached(H1, i) for i in range(3)] == [False, False, False]
    cache.read(H1, len(data), 0, 2 * BS)
    assert [cache.is_cached(H1, i) for i in range(3)] == [True, True, False]


def test_only_the_first_block_of_a_read_may_be_a_tail_and_only_what_the_read_skips() -> None:
    data = data_of(3 * BS)
    greedy = TailFetcher(data, unit=4, extra=4)  # leaves out 4 bytes the reader needs
    cache = cache_with(data, greedy)
    with pytest.raises(BlockFetchError, match="instead of 16"):
        cache.read(H1, len(data), 10, 4)
    assert cache.stats()["cached_bytes"] == 0
    aligned = TailFetcher(data, unit=4)
    cache = cache_with(data, aligned)
    assert cache.read(H1, len(data), 0, 2 * BS) == data[: 2 * BS]
    assert aligned.calls == [(0, 2 * BS, 0)]  # a read from a block's start skips nothing


def test_a_scattered_read_fetches_its_last_block_only_to_the_chunk_holding_its_end() -> None:
    data = data_of(3 * BS)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), BS + 5, 2, scattered=True) == data[BS + 5 : BS + 7]
    assert fetcher.calls == [(BS, 2 * BS, 5)] and fetcher.untils == [7]
    assert cache.stats()["bytes_fetched"] == 4  # bytes 4..8 of block 1, its only chunk needed
    assert cache.read(H1, len(data), BS + 4, 4) == data[BS + 4 : BS + 8]  # from the part
    assert len(fetcher.calls) == 1
    # A read continuing it takes the part's bytes and fetches the rest from where it ends.
    assert cache.read(H1, len(data), BS + 6, BS) == data[BS + 6 : 2 * BS + 6]
    assert fetcher.calls[1] == (BS, 3 * BS, 8) and fetcher.untils[1] is None
    assert cache.stats()["bytes_fetched"] == 4 + (BS - 8) + BS  # no byte twice
    # The rest joined with the part, a tail from byte 4: the block's start is fetched alone.
    assert cache.read(H1, len(data), BS, BS) == data[BS : 2 * BS]
    assert fetcher.calls[2] == (BS, 2 * BS, 0) and fetcher.untils[2] == 4
    assert cache.stats()["bytes_fetched"] == 2 * BS
    assert cache.stats()["cached_bytes"] == 2 * BS


def test_a_read_continuing_a_part_from_its_blocks_start_joins_them_into_the_block() -> None:
    # A scan's small read at a block's start caches the block's first chunk only; a read
    # continuing it fetches the rest, and the two are the whole block: its start is not
    # fetched again.
    data = data_of(2 * BS)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), 2, 3, scattered=True) == data[2:5]
    assert cache.stats()["bytes_fetched"] == 8  # bytes 0..8 of block 0
    assert cache.read(H1, len(data), 6, BS) == data[6 : BS + 6]
    assert fetcher.calls[1] == (0, 2 * BS, 8)
    assert cache.read(H1, len(data), 0, BS) == data[:BS]
    assert len(fetcher.calls) == 2
    stats = cache.stats()
    assert (stats["bytes_fetched"], stats["cached_blocks"], stats["cached_bytes"]) == (
        2 * BS, 2, 2 * BS)


def test_a_read_that_is_not_scattered_fetches_whole_blocks_to_its_end() -> None:
    data = data_of(2 * BS)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), BS + 5, 2) == data[BS + 5 : BS + 7]
    assert fetcher.untils == [None]
    assert cache.stats()["bytes_fetched"] == BS - 4
    # Scattered, but up to its block's end: nothing to leave out.
    assert cache.read(H1, len(data), 2, BS - 2, scattered=True) == data[2:BS]
    assert fetcher.untils == [None, None]


def test_a_scattered_read_across_blocks_leaves_out_the_ends_it_does_not_need() -> None:
    data = data_of(3 * BS)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), 6, BS, scattered=True) == data[6 : BS + 6]
    assert fetcher.calls == [(0, 2 * BS, 6)] and fetcher.untils == [6]
    assert cache.stats()["bytes_fetched"] == (BS - 4) + 8  # block 0 from 4, block 1 to 8


def test_a_fetcher_may_not_cut_a_block_short_of_what_a_scattered_read_needs() -> None:
    data = data_of(2 * BS)
    for fetcher in (TailFetcher(data, unit=4, short=2),  # stops a byte before the read's end
                    TailFetcher(data, unit=4, silent=True)):  # cut at both ends, unplaced
        cache = cache_with(data, fetcher)
        with pytest.raises(BlockFetchError, match=r"piece 0 of [24] bytes instead of 16"):
            cache.read(H1, len(data), BS + 5, 2, scattered=True)
        assert cache.stats()["cached_bytes"] == 0


@settings(max_examples=150, deadline=None)
@given(
    file_size=st.integers(1, 400),
    unit=st.sampled_from([1, 2, 4, 8, BS]),
    capacity=st.integers(0, 300),
    reads=st.lists(st.tuples(st.integers(0, 450), st.integers(0, 200), st.booleans(),
                             st.booleans()),
                   min_size=1, max_size=25),
)
def test_random_reads_through_tails_and_parts_equal_source_slices(
    file_size: int, unit: int, capacity: int, reads: list[tuple[int, int, bool, bool]]
) -> None:
    """Reads, scattered or not, some after a prefetch of their blocks (which fetches the
    blocks held as parts too), return the source's bytes within the budget."""
    data = data_of(file_size)
    cache = BlockCache(FakeFetcher({H1: data}), block_size=BS, capacity=capacity,
                       block_fetcher=TailFetcher(data, unit=unit))
    for offset, size, scattered, prefetched in reads:
        if prefetched:
            cache.prefetch(H1, file_size, offset // BS, (offset + size) // BS)
        got = cache.read(H1, file_size, offset, size, scattered=scattered)
        assert got == data[offset : offset + size]
        assert cache.stats()["cached_bytes"] <= capacity


def test_a_reader_of_a_blocks_start_waiting_on_a_tail_fetch_gets_the_whole_block() -> None:
    data = data_of(BS)
    release = threading.Event()
    calls: list[int] = []

    def slow_tail(content_hash: str, start: int, end: int, block_size: int, *,
                  on_block: OnBlock, on_partial: OnPartial | None = None,
                  skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                  stop: threading.Event | None = None) -> list[bytes]:
        calls.append(skip)
        if skip and not release.wait(DEADLINE):
            raise AssertionError("never released")
        return [data[start + skip : end]]

    cache = cache_with(data, slow_tail)
    got: list[bytes] = []
    with threads(lambda: got.append(cache.read(H1, len(data), 12, 4))):
        wait_until(lambda: calls == [12], timeout=DEADLINE)
        with threads(lambda: got.append(cache.read(H1, len(data), 0, 4))):
            wait_until(lambda: cache.stats()["inflight_waits"] == 1, timeout=DEADLINE)
            release.set()
    assert sorted(got) == sorted([data[12:16], data[0:4]])
    assert calls == [12, 0]  # the tail, then the whole block for the second reader
    assert cache.read(H1, len(data), 0, BS) == data and calls == [12, 0]


def test_a_read_reaching_a_cached_tail_fetches_only_what_lies_before_it() -> None:
    # A player's first read of the file's last page caches the last block's tail; reading
    # the file through then fetches that block's head only, joined with the tail.
    data = data_of(2 * BS + 12)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), 2 * BS + 9, 3) == data[-3:]
    assert cache.stats()["bytes_fetched"] == 4  # the tail: bytes 8..12 of the last block
    assert cache.read(H1, len(data), 0, len(data)) == data
    assert fetcher.calls[1] == (0, len(data), 0) and fetcher.untils[1] == 8
    assert cache.stats()["bytes_fetched"] == len(data)  # no byte twice
    assert cache.stats()["cached_blocks"] == 3
    assert cache.stats()["cached_bytes"] == len(data)
    # The joined block is whole: its head alone, or all of it, is served from memory.
    assert cache.read(H1, len(data), 2 * BS, 4) == data[2 * BS : 2 * BS + 4]
    assert cache.read(H1, len(data), 2 * BS, 12) == data[2 * BS :]
    assert len(fetcher.calls) == 2


def test_a_head_fetched_past_where_the_tail_begins_is_joined_without_the_overlap() -> None:
    data = data_of(BS)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, BS, 5, 2) == data[5:7]  # the tail from byte 4
    fetcher.unit = 8  # the head then comes to byte 8: 4 of its bytes are the tail's
    assert cache.read(H1, BS, 2, 3) == data[2:5]
    assert fetcher.calls[1] == (0, BS, 2) and fetcher.untils[1] == 4
    assert cache.stats()["bytes_fetched"] == (BS - 4) + 8
    assert cache.read(H1, BS, 0, BS) == data and len(fetcher.calls) == 2
    assert cache.stats()["cached_bytes"] == BS


def with_a_tail_of_block_1(capacity: int) -> tuple[bytes, TailFetcher, BlockCache]:
    """Two blocks of data, a cache of `capacity` bytes holding the tail of the second from
    byte 8 (a read of its bytes 9-12), and its fetcher."""
    data = data_of(2 * BS)
    fetcher = TailFetcher(data, unit=4)
    cache = BlockCache(FakeFetcher({H1: data}), block_size=BS, capacity=capacity,
                       block_fetcher=fetcher)
    assert cache.read(H1, len(data), BS + 9, 3) == data[BS + 9 : BS + 12]
    return data, fetcher, cache


@pytest.mark.parametrize("capacity", [BS, 1000])
def test_the_joined_block_takes_its_tails_place_in_the_budget(capacity: int) -> None:
    data, fetcher, cache = with_a_tail_of_block_1(capacity)
    assert cache.stats()["cached_bytes"] == BS - 8
    # With room for one block, the block's reservation evicts its own tail: the fetch keeps
    # it to join all the same.
    assert cache.read(H1, len(data), BS, BS) == data[BS:]
    assert fetcher.untils[1] == 8
    stats = cache.stats()
    assert (stats["cached_blocks"], stats["cached_bytes"], stats["bytes_fetched"]) == (1, BS, BS)
    assert cache.read(H1, len(data), BS, BS) == data[BS:] and len(fetcher.calls) == 2


def test_a_part_short_of_its_blocks_end_is_not_joined_as_a_tail() -> None:
    data = data_of(BS)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, BS, 5, 2, scattered=True) == data[5:7]  # bytes 4..8 of the block
    # Bytes 0..8 joined would not be the block: it is fetched whole, as before tails were
    # joined (its part holds the read's end, but the block's end lies beyond).
    assert cache.read(H1, BS, 0, 8) == data[:8]
    assert fetcher.untils == [7, None]
    assert cache.read(H1, BS, 0, BS) == data and len(fetcher.calls) == 2


class GatedTailFetcher(TailFetcher):
    """A TailFetcher whose calls given `until` wait for `gate`, then raise `error` if set."""

    def __init__(self, data: bytes, unit: int) -> None:
        super().__init__(data, unit)
        self.gate = threading.Event()
        self.error: Exception | None = None

    def __call__(self, content_hash: str, start: int, end: int, block_size: int, *,
                 on_block: OnBlock, on_partial: OnPartial | None = None,
                 skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                 stop: threading.Event | None = None) -> list[bytes]:
        if until is not None:
            if not self.gate.wait(DEADLINE):
                raise AssertionError("gate never opened")
            if self.error is not None:
                self.calls.append((start, end, skip))
                self.untils.append(until)
                raise self.error
        return super().__call__(content_hash, start, end, block_size, on_block=on_block,
                                on_partial=on_partial, skip=skip, until=until,
                                on_span=on_span, stop=stop)


def failing_after_a_tail() -> tuple[bytes, GatedTailFetcher, BlockCache]:
    """A block of data, a cache holding its tail from byte 8, and a gated fetcher whose next
    calls given `until` (the head's) fail with 'connection reset'."""
    data = data_of(BS)
    fetcher = GatedTailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, BS, 9, 3) == data[9:12]
    fetcher.error = OSError("connection reset")
    return data, fetcher, cache


def test_a_head_in_flight_is_one_fetch_its_tail_still_serves_and_a_failure_keeps_it() -> None:
    data, fetcher, cache = failing_after_a_tail()
    failed: list[BaseException] = []

    def read_failing(offset: int, size: int) -> None:
        with pytest.raises(OSError, match="connection reset") as caught:
            cache.read(H1, BS, offset, size)
        failed.append(caught.value)

    with threads(lambda: read_failing(0, BS), lambda: read_failing(0, 4)):
        wait_until(lambda: cache.stats()["inflight_waits"] == 1, timeout=DEADLINE)
        assert cache.read(H1, BS, 10, 6) == data[10:]  # from the tail, not waiting
        fetcher.gate.set()
    assert len(failed) == 2 and fetcher.untils[1:] == [8]  # both readers, one fetch
    assert cache.stats()["cached_bytes"] == BS - 8  # the tail is kept
    fetcher.error = None  # a later read tries again, for the head alone
    assert cache.read(H1, BS, 0, BS) == data
    assert fetcher.untils[1:] == [8, 8] and cache.stats()["cached_bytes"] == BS


@pytest.mark.parametrize("passed", [False, True], ids=["lru", "passed-tier"])
def test_a_prefetch_reaching_a_cached_tail_fetches_only_what_lies_before_it(
        passed: bool) -> None:
    # A player read the file's last page first, then streams: readahead reaching the last
    # block fetches its head, joined with the tail, so the reader does not fetch it there.
    data = data_of(3 * BS + 12)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), 3 * BS + 9, 3) == data[-3:]  # the tail from byte 8
    assert cache.read(H1, len(data), 0, BS) == data[:BS]
    if passed:  # another stream passed it: the tier gives the part up
        assert cache.discard(H1, 3, 3) == 1 and cache.stats()["passed_bytes"] == 4
    cache.prefetch(H1, len(data), 1, 3)
    assert fetcher.calls[2] == (BS, len(data), 0) and fetcher.untils[2] == 8
    stats = cache.stats()
    assert stats["bytes_fetched"] == len(data)  # no byte twice
    assert (stats["prefetched_blocks"], stats["fetching_blocks"]) == (3, 0)
    assert (stats["cached_blocks"], stats["cached_bytes"], stats["passed_bytes"]) == (
        4, len(data), 0)
    assert cache.read(H1, len(data), 0, len(data)) == data
    assert len(fetcher.calls) == 3 and cache.stats()["misses"] == stats["misses"]


def test_a_prefetch_reaching_a_part_short_of_its_blocks_end_fetches_the_whole_block() -> None:
    data = data_of(3 * BS)
    fetcher = TailFetcher(data, unit=4)
    cache = cache_with(data, fetcher)
    assert cache.read(H1, len(data), BS + 5, 2, scattered=True) == data[BS + 5 : BS + 7]
    assert fetcher.calls == [(BS, 2 * BS, 5)] and fetcher.untils == [7]  # bytes 4..8
    cache.prefetch(H1, len(data), 1, 2)
    assert fetcher.calls[1] == (BS, 3 * BS, 0) and fetcher.untils[1] is None
    stats = cache.stats()
    assert stats["bytes_fetched"] == 4 + 2 * BS
    assert (stats["cached_blocks"], stats["cached_bytes"]) == (2, 2 * BS)  # it took its place
    assert cache.read(H1, len(data), BS, 2 * BS) == data[BS:] and len(fetcher.calls) == 2


@pytest.mark.parametrize("capacity", [BS, 1000])
def test_a_prefetch_joining_a_tail_keeps_the_budget(capacity: int) -> None:
    data, fetcher, cache = with_a_tail_of_block_1(capacity)
    # With room for one block, the block's reservation evicts its own tail: the fetch keeps
    # it to join all the same.
    cache.prefetch(H1, len(data), 1, 1)
    assert fetcher.untils[1] == 8
    stats = cache.stats()
    assert (stats["cached_blocks"], stats["cached_bytes"], stats["bytes_fetched"]) == (1, BS, BS)
    # Its reservation is given back: the next prefetch has the whole budget.
    cache.prefetch(H1, len(data), 0, 0)
    assert fetcher.calls[2] == (0, BS, 0)
    assert cache.stats()["cached_bytes"] == min(2 * BS, capacity)
    assert cache.read(H1, len(data), 0, BS) == data[:BS] and len(fetcher.calls) == 3


def test_a_prefetched_head_is_one_fetch_for_its_reader_and_a_failure_keeps_the_tail() -> None:
    data, fetcher, cache = failing_after_a_tail()
    fetcher.gate.set()
    with pytest.raises(OSError, match="connection reset"):
        cache.prefetch(H1, BS, 0, 0)
    stats = cache.stats()
    assert (stats["cached_bytes"], stats["fetching_blocks"]) == (BS - 8, 0)  # the tail kept
    assert cache.read(H1, BS, 10, 6) == data[10:] and len(fetcher.calls) == 2
    fetcher.error = None  # the next prefetch tries again; a reader of the head waits for it
    fetcher.gate.clear()
    got: list[bytes] = []
    with threads(lambda: cache.prefetch(H1, BS, 0, 0)):
        wait_until(lambda: cache.stats()["fetching_blocks"] == 1, timeout=DEADLINE,
                   what="the prefetch")
        with threads(lambda: got.append(cache.read(H1, BS, 0, 4))):
            wait_until(lambda: cache.stats()["inflight_waits"] == 1, timeout=DEADLINE,
                       what="the reader waiting for it")
            fetcher.gate.set()
    assert got == [data[:4]] and fetcher.untils[1:] == [8, 8]
    assert cache.stats()["cached_bytes"] == BS
    assert cache.read(H1, BS, 0, BS) == data and len(fetcher.calls) == 3


def test_block_fetcher_pieces_of_the_wrong_sizes_are_refused() -> None:
    data = data_of(4 * BS)

    def joined_pieces(content_hash: str, start: int, end: int, block_size: int, *,
                      on_block: OnBlock, on_partial: OnPartial | None = None,
                      skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                      stop: threading.Event | None = None) -> list[bytes]:
        return [data[start:end]]  # one piece for the whole run

    cache = cache_with(data, joined_pieces)
    with pytest.raises(BlockFetchError):
        cache.read(H1, len(data), 0, 2 * BS)
    assert cache.stats()["cached_bytes"] == 0


def test_zero_capacity_still_serves_reads() -> None:
    data = data_of(100)
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=0)
    assert cache.read(H1, 100, 10, 30) == data[10:40]
    assert cache.read(H1, 100, 10, 30) == data[10:40]
    assert len(fetcher.calls) == 2
    assert cache.stats()["cached_bytes"] == 0


def test_block_larger_than_capacity_is_served_not_cached() -> None:
    data = data_of(100)
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=64, capacity=50)
    assert cache.read(H1, 100, 0, 100) == data
    assert not cache.is_cached(H1, 0)
    assert cache.is_cached(H1, 1)  # the short last block (36 bytes) fits
    assert cache.stats()["cached_bytes"] == 36


def test_invalid_configuration() -> None:
    fetcher = FakeFetcher({})
    with pytest.raises(ValueError):
        BlockCache(fetcher, block_size=0)
    with pytest.raises(ValueError):
        BlockCache(fetcher, capacity=-1)


# -- a video past 4 GiB -------------------------------------------------------------------------

MIB = 1 << 20
BIG = 5 * (1 << 30) + 12345  # a virtual video: 5 GiB and a short last block


def offset_words(start: int, end: int) -> bytes:
    """Bytes `[start, end)` of a virtual video made of 8-byte big-endian words, each holding
    its own offset: bytes taken from a wrong offset (one cut to 32 bits) cannot match."""
    first = start // 8
    words = np.arange(first, -(-end // 8), dtype=">u8") * 8
    return words.tobytes()[start - first * 8 : end - first * 8]


class VirtualFetcher:
    """Serves the `BIG`-byte video of `offset_words` as a fetcher and as a block fetcher,
    recording every (start, end) asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, content_hash: str, start: int, end: int) -> bytes:
        assert 0 <= start < end <= BIG
        self.calls.append((start, end))
        return offset_words(start, end)

    def blocks(self, content_hash: str, start: int, end: int, block_size: int, *,
               on_block: OnBlock, on_partial: OnPartial | None = None, skip: int = 0,
               until: int | None = None, on_span: OnSpan | None = None,
               stop: threading.Event | None = None) -> list[bytes]:
        data = self(content_hash, start, end)
        pieces = [data[low : low + block_size] for low in range(0, end - start, block_size)]
        for position, piece in enumerate(pieces):
            on_block(position, piece)
        return pieces


def test_block_arithmetic_past_2_and_4_gib() -> None:
    assert block_count(BIG, MIB) == 5 * 1024 + 1
    assert blocks_for(2**31 - 1, 2, BIG, MIB) == range(2047, 2049)
    assert blocks_for(2**32 - 1, 2, BIG, MIB) == range(4095, 4097)
    assert blocks_for(2**32, 1, BIG, MIB) == range(4096, 4097)
    assert run_bounds(range(4095, 4098), BIG, MIB) == (2**32 - MIB, 2**32 + 2 * MIB)
    assert block_bounds(5 * 1024, BIG, MIB) == (5 * 1024 * MIB, BIG)  # the short last one
    assert blocks_for(BIG - 1, 10, BIG, MIB) == range(5 * 1024, 5 * 1024 + 1)
    assert blocks_for(BIG, 10, BIG, MIB) == range(0)
    # 12 KiB blocks: 2**32 is no block boundary, one block holds the bytes either side of it
    twelve = 12 * 1024
    straddling = 2**32 // twelve
    assert blocks_for(2**32 - 1, 2, BIG, twelve) == range(straddling, straddling + 1)
    low, high = block_bounds(straddling, BIG, twelve)
    assert low < 2**32 - 1 < 2**32 < high and high - low == twelve


@pytest.mark.parametrize("block_size", [MIB, 12 * 1024], ids=["1M", "12K"])
@pytest.mark.parametrize("by_block", [False, True], ids=["fetcher", "block_fetcher"])
def test_reads_of_a_5_gib_video_past_2_and_4_gib(block_size: int, by_block: bool) -> None:
    fetcher = VirtualFetcher()
    cache = BlockCache(fetcher, block_size=block_size, capacity=64 * MIB,
                       block_fetcher=fetcher.blocks if by_block else None)
    for offset, size in [(2**31 - 5, 10), (2**31, 1), (2**32 - MIB - 3, 2 * MIB + 6),
                         (2**32, 1), (2**32 + 7, 128 * 1024), (BIG - 100, 1000),
                         (2**32 - 1, 2)]:  # the last one from the cache
        assert cache.read(H1, BIG, offset, size) == offset_words(offset, min(offset + size,
                                                                             BIG)), offset
    assert cache.read(H1, BIG, BIG, 10) == b""
    assert all(start % block_size == 0 for start, _ in fetcher.calls)
    assert fetcher.calls[-1][1] == BIG  # the last block, short
    assert cache.stats()["hits"] >= 1


# -- wrong answers, verification, errors --------------------------------------------------------


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_length_answer_is_an_error_and_never_cached(delta: int) -> None:
    data = data_of(100)

    def fetcher(content_hash: str, start: int, end: int) -> bytes:
        return data[start : end + delta] if delta > 0 else data[start : end - 1]

    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    with pytest.raises(BlockFetchError, match="instead of"):
        cache.read(H1, 100, 0, 40)
    assert cache.stats()["cached_bytes"] == 0
    assert cache.stats()["fetch_errors"] == 1
    assert not any(cache.is_cached(H1, i) for i in range(7))


def test_file_size_larger_than_the_data_is_an_error() -> None:
    fetcher = FakeFetcher({H1: data_of(100)})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    with pytest.raises(BlockFetchError):
        cache.read(H1, 120, 90, 30)  # the fetcher can only return 10 of the 24 asked bytes


def test_fetch_error_propagates_and_a_later_read_retries() -> None:
    data = data_of(100)
    fetcher = FakeFetcher({H1: data})
    broken = True

    def flaky(content_hash: str, start: int, end: int) -> bytes:
        if broken:
            raise ConnectionError("service down")
        return fetcher(content_hash, start, end)

    cache = BlockCache(flaky, block_size=BS, capacity=1000)
    with pytest.raises(ConnectionError):
        cache.read(H1, 100, 0, 40)
    broken = False
    assert cache.read(H1, 100, 0, 40) == data[:40]
    assert fetcher.calls == [(H1, 0, 48)]
    assert cache.stats()["fetch_errors"] == 1


def test_after_a_failed_run_the_other_runs_of_the_read_fail_fast() -> None:
    data = data_of(100)
    fetcher = FakeFetcher({H1: data})
    failing = False

    def switchable(content_hash: str, start: int, end: int) -> bytes:
        if failing:
            raise ConnectionError("down")
        return fetcher(content_hash, start, end)

    cache = BlockCache(switchable, block_size=BS, capacity=1000)
    cache.read(H1, 100, BS, 1)  # block 1 cached: a read of 0-2 has two runs, 0 and 2
    failing = True
    with pytest.raises(ConnectionError):
        cache.read(H1, 100, 0, 3 * BS)
    assert cache.stats()["fetches"] == 2  # the setup read and run 0; run 2 was not tried
    failing = False
    assert cache.read(H1, 100, 0, 3 * BS) == data[: 3 * BS]
    assert fetcher.calls == [(H1, BS, 2 * BS), (H1, 0, BS), (H1, 2 * BS, 3 * BS)]


def test_with_a_block_fetcher_the_runs_of_a_read_are_fetched_at_once() -> None:
    """Each run has its own remote deadline: fetched in turn, a read split by cached blocks
    could take one deadline per run. Every call here waits until the other run's call has
    started, which fetches made one after the other never get to."""
    data = data_of(5 * BS)
    both_started = threading.Barrier(2, timeout=DEADLINE)
    gating = False
    calls: list[tuple[int, int]] = []

    def block_fetcher(content_hash: str, start: int, end: int, block_size: int, *,
                      on_block: OnBlock, on_partial: OnPartial | None = None,
                      skip: int = 0, until: int | None = None, on_span: OnSpan | None = None,
                      stop: threading.Event | None = None) -> list[bytes]:
        calls.append((start, end))
        if gating:
            both_started.wait()
        return [data[low : min(low + block_size, end)] for low in range(start, end, block_size)]

    cache = cache_with(data, block_fetcher)
    cache.read(H1, len(data), 2 * BS, 1)  # block 2 cached: a read of 0-4 has runs 0-1 and 3-4
    gating = True
    assert cache.read(H1, len(data), 0, 5 * BS) == data
    assert sorted(calls[1:]) == [(0, 2 * BS), (3 * BS, 5 * BS)]


# -- concurrency --------------------------------------------------------------------------------


def test_concurrent_readers_of_a_cold_block_share_one_fetch() -> None:
    data = data_of(100)
    fetcher = GatedFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    results: list[bytes] = []
    readers = 8

    def read() -> None:
        results.append(cache.read(H1, 100, 20, 8))

    with threads(*[read] * readers):
        wait_until(lambda: cache.stats()["inflight_waits"] == readers - 1, timeout=DEADLINE,
                   what="all readers waiting on the one fetch")
        assert len(fetcher.calls) == 1
        fetcher.gate.set()
    assert results == [data[20:28]] * readers
    assert fetcher.calls == [(H1, 16, 32)]
    assert cache.stats()["misses"] == readers


def test_overlapping_concurrent_reads_fetch_each_block_once() -> None:
    data = data_of(100)
    fetcher = GatedFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    results: dict[str, bytes] = {}

    def read_first() -> None:
        results["first"] = cache.read(H1, 100, 0, 2 * BS)  # blocks 0-1

    def read_second() -> None:
        results["second"] = cache.read(H1, 100, BS, 2 * BS)  # blocks 1-2

    with threads(read_first):
        wait_until(lambda: len(fetcher.calls) == 1, timeout=DEADLINE, what="first fetch")
        with threads(read_second):
            wait_until(lambda: len(fetcher.calls) == 2, timeout=DEADLINE, what="second fetch")
            fetcher.gate.set()
    assert results == {"first": data[: 2 * BS], "second": data[BS : 3 * BS]}
    assert sorted(fetcher.calls) == [(H1, 0, 2 * BS), (H1, 2 * BS, 3 * BS)]
    assert cache.stats()["inflight_waits"] == 1


def test_failed_fetch_reaches_every_waiter_and_a_later_read_retries() -> None:
    data = data_of(100)
    fetcher = GatedFetcher({H1: data}, error=ConnectionError("reset by peer"))
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    errors: list[BaseException] = []
    readers = 5

    def read() -> None:
        try:
            cache.read(H1, 100, 0, 10)
        except ConnectionError as exc:
            errors.append(exc)

    with threads(*[read] * readers):
        wait_until(lambda: cache.stats()["inflight_waits"] == readers - 1, timeout=DEADLINE,
                   what="all readers waiting on the one fetch")
        fetcher.gate.set()
    assert len(errors) == readers
    assert len(fetcher.calls) == 1
    assert cache.stats()["cached_bytes"] == 0
    fetcher.error = None
    assert cache.read(H1, 100, 0, 10) == data[:10]
    assert len(fetcher.calls) == 2


# -- prefetch ---------------------------------------------------------------------------------


def test_prefetch_fetches_only_missing_blocks_and_counts_no_reads() -> None:
    data = data_of(200)  # 13 blocks
    fetcher = FakeFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    cache.read(H1, 200, 3 * BS, 1)
    fetcher.calls.clear()
    cache.prefetch(H1, 200, 1, 5)
    assert fetcher.calls == [(H1, BS, 3 * BS), (H1, 4 * BS, 6 * BS)]
    cache.prefetch(H1, 200, 1, 5)
    assert len(fetcher.calls) == 2  # all there now
    cache.prefetch(H1, 200, 11, 40)  # clamped to the last block, 12
    assert fetcher.calls[-1] == (H1, 11 * BS, 200)
    cache.prefetch(H1, 200, 13, 20)  # entirely past EOF
    assert len(fetcher.calls) == 3
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["prefetched_blocks"]) == (0, 1, 6)
    assert cache.read(H1, 200, BS, 5 * BS) == data[BS : 6 * BS]
    assert len(fetcher.calls) == 3
    assert cache.stats()["hits"] == 5


def test_prefetch_skips_in_flight_blocks_without_waiting() -> None:
    data = data_of(100)
    fetcher = GatedFetcher({H1: data})
    cache = BlockCache(fetcher, block_size=BS, capacity=1000)
    with threads(lambda: cache.read(H1, 100, 0, 1)):
        wait_until(lambda: len(fetcher.calls) == 1, timeout=DEADLINE, what="foreground fetch")
        # Block 0 is in flight and block 1 gated too: run prefetch in a thread, it must only
        # ask for block 1.
        with threads(lambda: cache.prefetch(H1, 100, 0, 1)):
            wait_until(lambda: len(fetcher.calls) == 2, timeout=DEADLINE, what="prefetch")
            fetcher.gate.set()
    assert fetcher.calls == [(H1, 0, BS), (H1, BS, 2 * BS)]


def test_prefetch_raises_fetch_errors_and_leaves_nothing_in_flight() -> None:
    data = data_of(100)
    fetcher = FakeFetcher({H1: data})
    broken = True

    def flaky(content_hash: str, start: int, end: int) -> bytes:
        if broken:
            raise ConnectionError("down")
        return fetcher(content_hash, start, end)

    cache = BlockCache(flaky, block_size=BS, capacity=1000)
    with pytest.raises(ConnectionError):
        cache.prefetch(H1, 100, 0, 6)
    broken = False
    assert cache.read(H1, 100, 0, 100) == data  # nothing was left stuck in flight
    assert fetcher.calls == [(H1, 0, 100)]


def test_an_unfilled_block_is_filled_through_its_view_and_kept_alive_by_it() -> None:
    block, view = unfilled_block(5)
    assert type(block) is bytes and len(block) == 5 and not view.readonly and len(view) == 5
    view[:] = b"hello"
    assert block == b"hello"
    del block
    gc.collect()
    assert bytes(view) == b"hello"  # the view still owns the memory
    with pytest.raises(ValueError):
        unfilled_block(0)
