"""Drop-behind: the blocks a sequential stream has passed go to the cache's bounded passed tier.

Unit tests drive `Readahead` over a real `BlockCache` with a fake fetcher (the bytes and every
fetched range are checked); a real mount checks that a long sequential read keeps the daemon's
cached bytes bounded and still returns the right bytes.
"""

from __future__ import annotations

import os
import subprocess
import threading
from concurrent.futures import Future
from itertools import pairwise
from pathlib import Path

import pytest

from tests.support import ManualExecutor, VidcacheServer
from tests.vcfs_support import VcfsMount, requires_fuse
from vcfs.blocks import BlockCache
from vcfs.readahead import Readahead, SequentialDetector, SequentialPolicy
from vidcache_client import VidCacheClient

KIB = 1 << 10
MIB = 1 << 20
H = "d" * 64
OTHER = "e" * 64
DEADLINE = 10.0
# Runs established after two 128 KiB reads; the drop margin and tolerance are the defaults.
EAGER = SequentialPolicy(min_run_bytes=256 * KIB, back_tolerance=MIB)
BEHIND = EAGER.back_tolerance + EAGER.drop_margin  # 3 MiB


class Source:
    """A fake fetcher over random bytes that records every range it serves."""

    def __init__(self, size: int) -> None:
        self.data = os.urandom(size)
        self.ranges: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, content_hash: str, start: int, end: int) -> bytes:
        with self._lock:
            self.ranges.append((start, end))
        return self.data[start:end]

    def fetched(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def fetched_once(self) -> bool:
        """No byte was fetched twice."""
        ranges = sorted(self.ranges)
        return all(end <= next_start for (_, end), (next_start, _) in pairwise(ranges))


class Handle:
    """One open file: readahead over a real cache, prefetches run as soon as they are queued.
    The passed tier holds nothing by default, so what the stream passes is freed at once."""

    def __init__(self, size: int, *, capacity: int = 256 * MIB, drop_behind: bool = True,
                 passed_capacity: int = 0) -> None:
        self.source = Source(size)
        self.cache = BlockCache(self.source, capacity=capacity, passed_capacity=passed_capacity)
        self.executor = ManualExecutor()
        self.readahead = Readahead(self.cache, H, size, executor=self.executor, block_size=MIB,
                                   max_window=16 * MIB, policy=EAGER, drop_behind=drop_behind)

    def scan(self, start: int, end: int, size: int) -> bytes:
        """Read `[start, end)` the way fs.read does: tell readahead, then read the cache."""
        out = bytearray()
        for offset in range(start, end, size):
            self.readahead.on_read(offset, size)
            self.executor.run_all()
            out += self.cache.read(H, len(self.source.data), offset, size)
        return bytes(out)

    def cached(self, blocks: range) -> list[int]:
        return cached(self.cache, blocks)


def cached(cache: BlockCache, blocks: range) -> list[int]:
    return [b for b in blocks if cache.is_cached(H, b)]


# -- BlockCache.discard -------------------------------------------------------------------------

def test_discard_without_a_passed_tier_frees_cached_blocks_of_one_video_only() -> None:
    source = Source(8 * MIB)
    cache = BlockCache(source, passed_capacity=0)
    assert cache.read(H, 8 * MIB, 0, 8 * MIB) == source.data
    assert cache.read(OTHER, 8 * MIB, 0, MIB) == source.data[:MIB]
    assert cache.discard(H, 2, 4) == 3
    assert cache.discard(H, 2, 4) == 0  # gone already
    assert cache.discard(H, -5, -1) == 0
    assert cached(cache, range(8)) == [0, 1, 5, 6, 7]
    assert cache.is_cached(OTHER, 0)
    stats = cache.stats()
    assert stats["passed_blocks"] == stats["dropped_blocks"] == 3 and stats["evictions"] == 0
    assert stats["cached_bytes"] == 6 * MIB  # 5 of H, 1 of OTHER
    source.ranges.clear()
    assert cache.read(H, 8 * MIB, 2 * MIB, 3 * MIB) == source.data[2 * MIB : 5 * MIB]
    assert source.ranges == [(2 * MIB, 5 * MIB)]  # a discarded block is fetched again


def test_discard_leaves_a_block_in_flight_to_its_fetch() -> None:
    source = Source(2 * MIB)
    entered, release = threading.Event(), threading.Event()

    def slow(content_hash: str, start: int, end: int) -> bytes:
        entered.set()
        assert release.wait(DEADLINE)
        return source(content_hash, start, end)

    cache = BlockCache(slow, passed_capacity=0)
    result: Future[bytes] = Future()
    reader = threading.Thread(target=lambda: result.set_result(cache.read(H, 2 * MIB, 0, MIB)))
    reader.start()
    assert entered.wait(DEADLINE)
    assert cache.discard(H, 0, 1) == 0
    release.set()
    reader.join(DEADLINE)
    assert result.result(DEADLINE) == source.data[:MIB]
    assert cache.is_cached(H, 0)


def test_passed_blocks_stay_readable_within_the_tier_and_rejoin_the_lru() -> None:
    source = Source(8 * MIB)
    cache = BlockCache(source, capacity=8 * MIB, passed_capacity=3 * MIB)
    assert cache.read(H, 8 * MIB, 0, 8 * MIB) == source.data
    assert cache.discard(H, 0, 4) == 5
    # The tier keeps the 3 most recently passed blocks; the 2 oldest are freed.
    assert cached(cache, range(8)) == [2, 3, 4, 5, 6, 7]
    stats = cache.stats()
    assert (stats["passed_blocks"], stats["dropped_blocks"]) == (5, 2)
    assert (stats["passed_bytes"], stats["cached_bytes"]) == (3 * MIB, 6 * MIB)
    source.ranges.clear()
    assert cache.read(H, 8 * MIB, 2 * MIB, 2 * MIB) == source.data[2 * MIB : 4 * MIB]
    assert source.ranges == []  # served from the passed tier
    assert cache.stats()["passed_bytes"] == MIB  # blocks 2 and 3 are back in the LRU
    assert cache.discard(H, 2, 3) == 2  # so they can be passed again
    assert cache.read(H, 8 * MIB, 0, MIB) == source.data[:MIB]
    assert source.ranges == [(0, MIB)]  # a freed passed block is fetched again


def test_passed_blocks_are_evicted_before_any_other_block() -> None:
    source = Source(8 * MIB)
    cache = BlockCache(source, capacity=6 * MIB, passed_capacity=6 * MIB)
    assert cache.read(H, 8 * MIB, 0, 6 * MIB) == source.data[: 6 * MIB]
    assert cache.read(OTHER, 8 * MIB, 0, MIB) == source.data[:MIB]  # evicts H's block 0
    assert cache.discard(H, 1, 3) == 3
    assert cache.read(OTHER, 8 * MIB, MIB, 2 * MIB) == source.data[MIB : 3 * MIB]
    # Room for OTHER's two blocks came from the oldest passed ones, not from the LRU.
    assert cached(cache, range(8)) == [3, 4, 5]
    assert cache.is_cached(OTHER, 0)
    stats = cache.stats()
    assert (stats["evictions"], stats["dropped_blocks"]) == (1, 2)
    assert stats["cached_bytes"] <= 6 * MIB


# -- Readahead's drop-behind --------------------------------------------------------------------

def test_detector_reports_the_passed_bytes_of_a_run_only() -> None:
    detector = SequentialDetector(EAGER)
    detector.feed(5 * MIB + 100, 128 * KIB)
    assert detector.passed() is None
    detector.feed(5 * MIB + 100 + 128 * KIB, 128 * KIB)  # established: 256 KiB at 5 MiB + 100
    high = 5 * MIB + 100 + 256 * KIB
    assert detector.passed() == (5 * MIB + 100, 5 * MIB + 100)  # nothing left behind yet
    detector.feed(high, 8 * MIB)
    assert detector.passed() == (5 * MIB + 100, high + 8 * MIB - BEHIND)
    detector.feed(60 * MIB, 128 * KIB)  # a seek ends the run
    assert detector.passed() is None


def test_a_scan_keeps_only_the_blocks_near_and_ahead_of_the_reader() -> None:
    handle = Handle(40 * MIB)
    assert handle.scan(0, 30 * MIB, 128 * KIB) == handle.source.data[: 30 * MIB]
    # Behind the reader (at 30 MiB): blocks 0..26 end by 27 MiB = 30 - 3 MiB and are dropped.
    assert handle.cached(range(27)) == []
    assert handle.cached(range(27, 40)) == list(range(27, 40))  # the tail and the prefetched
    assert handle.readahead.stats()["blocks_dropped"] == 27
    assert handle.cache.stats()["dropped_blocks"] == 27
    # Every byte was fetched exactly once: nothing dropped was needed again.
    assert handle.source.fetched() == 40 * MIB and handle.source.fetched_once()


def test_a_long_scan_stays_within_a_small_cache_without_refetching() -> None:
    # A 24 MiB budget and a 64 MiB file: without drop-behind the LRU would evict passed
    # blocks only when full; with it, nothing is evicted and every block is fetched once.
    handle = Handle(64 * MIB, capacity=24 * MIB)
    assert handle.scan(0, 64 * MIB, MIB) == handle.source.data
    assert handle.source.fetched() == 64 * MIB and handle.source.fetched_once()
    stats = handle.cache.stats()
    assert stats["evictions"] == 0
    assert stats["cached_bytes"] == BEHIND  # blocks 61-63, which the reader passed by < 3 MiB


def test_a_run_that_began_inside_a_block_keeps_that_block() -> None:
    handle = Handle(32 * MIB)
    data = handle.source.data
    # Another reader's header read caches block 2; a stream then starts inside it.
    assert handle.cache.read(H, 32 * MIB, 2 * MIB, 4 * KIB) == data[2 * MIB : 2 * MIB + 4 * KIB]
    start = 2 * MIB + 512 * KIB
    assert handle.scan(start, 20 * MIB, 128 * KIB) == data[start : 20 * MIB]
    assert handle.cached(range(2, 17)) == [2]  # 3..16 passed by 3 MiB, 2 holds earlier bytes


def test_non_sequential_readers_and_a_disabled_drop_keep_everything() -> None:
    handle = Handle(40 * MIB)
    for offset in (0, 30 * MIB, 10 * MIB, 35 * MIB, 20 * MIB):  # a probe's scattered reads
        handle.readahead.on_read(offset, 64 * KIB)
        handle.cache.read(H, 40 * MIB, offset, 64 * KIB)
    assert handle.cached(range(40)) == [0, 10, 20, 30, 35]
    kept = Handle(40 * MIB, drop_behind=False)
    assert kept.scan(0, 30 * MIB, MIB) == kept.source.data[: 30 * MIB]
    assert kept.cached(range(30)) == list(range(30))
    assert kept.cache.stats()["dropped_blocks"] == 0


def test_after_a_seek_the_new_run_drops_from_its_own_start() -> None:
    handle = Handle(64 * MIB)
    data = handle.source.data
    assert handle.scan(0, 10 * MIB, MIB) == data[: 10 * MIB]
    assert handle.cached(range(10)) == [7, 8, 9]  # passed: up to 10 - 3 MiB
    assert handle.scan(40 * MIB, 50 * MIB, MIB) == data[40 * MIB : 50 * MIB]
    assert handle.cached(range(10)) == [7, 8, 9]  # the old run's tail stays: its reader left
    assert handle.cached(range(40, 50)) == [47, 48, 49]
    assert handle.source.fetched_once()


# -- A real mount -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path],
               media_url: str, vidcache_server: VidcacheServer) -> tuple[Path, str]:
    """big.mp4 (~22 MB): long enough for a run (8 MiB) and a lot of passed blocks."""
    with VidCacheClient(vidcache_server.url) as client:
        result = client.ingest(f"{media_url}/big.mp4", bucket="vcfs-dropbehind")
        meta = client.get_meta(result["hash"])
    assert meta is not None
    return videos["big.mp4"], f"{result['hash']}.mp4"


@requires_fuse[0]
@requires_fuse[1]
@pytest.mark.parametrize(("keep_passed", "tier"), [((), 6 * MIB), (("--keep-passed", "0"), 0)],
                         ids=["default tier", "keep-passed 0"])
def test_a_long_read_through_the_mount_keeps_the_cache_small(
    tmp_path: Path, vidcache_server: VidcacheServer, long_video: tuple[Path, str],
    keep_passed: tuple[str, ...], tier: int,
) -> None:
    source, name = long_video
    size = source.stat().st_size
    # A 24 MiB budget: its passed tier holds 6 MiB by default; room for the 8 MiB a stream
    # reads before it counts as one (no LRU eviction before its blocks can be passed),
    # readahead 4 MiB.
    with VcfsMount(vidcache_server.url, tmp_path / "mnt", "--cache-size", "24M",
                   "--readahead-max", "4M", *keep_passed) as mount:
        path = mount.video(name)
        copy = tmp_path / "copy"
        subprocess.run(["dd", f"if={path}", f"of={copy}", "bs=1M", "status=none"], check=True,
                       timeout=60)
        subprocess.run(["cmp", str(source), str(copy)], check=True, timeout=60)
        stats = mount.stats()["cache"]
        # Every block the reader passed by 3 MiB went to the passed tier, whose oldest were
        # freed: of the file (~22 MB) all but the freed blocks stays cached, nothing evicted.
        # The stream counts as one after 8 MiB; whether the blocks before are passed too
        # depends on the order in which the kernel's readahead delivers its reads, and a
        # kernel read reaching past EOF can pass one block more.
        passable = (size - BEHIND) // MIB
        assert passable - 8 <= stats["passed_blocks"] <= passable + 1
        assert stats["dropped_blocks"] >= stats["passed_blocks"] - tier // MIB
        assert stats["passed_bytes"] <= tier
        assert stats["evictions"] == 0
        assert stats["dropped_blocks"] > 0
        assert stats["cached_bytes"] == size - stats["dropped_blocks"] * MIB
