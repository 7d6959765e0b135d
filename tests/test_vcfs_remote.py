"""vcfs.remote edge cases a real service cannot produce on demand: flaky answers, wrong ranges,
bad digests, and the retry deadline, over httpx.MockTransport with a fake clock (no sleeping);
then runs of blocks from the real service through the fault proxy (resets, flipped bytes, a
trickling answer) on the client's socket path.

The real service and real failures (an outage, bytes corrupted on disk) are also exercised
through a mount in test_vcfs_mount.py and test_vcfs_faults.py.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.faults import Bandwidth, FlipByte, Latency, Stall, Truncate
from bench.proxy import Request
from tests.client_rangeconn_support import StoredVideo, ingest_big
from tests.support import VidcacheServer, wait_until
from tests.vcfs_fault_support import (
    CHUNK,
    DATA,
    HASH,
    FakeClock,
    FakeService,
    FaultyLink,
    link_fixture,
)
from vcfs.blocks import FetchStopped
from vcfs.errors import AccessDenied, NotFound, RemoteError, RemoteUnavailable, Stopping
from vcfs.remote import Remote, RemoteConfig, VideoMeta
from vidcache_client import VidCacheClient

MIB = 1 << 20
OTHER = "e" * 64


def listed(remote: Remote) -> list[str]:
    """The hashes `ls by-hash` would show now (a stale listing starts a refresh)."""
    return [meta.content_hash for meta in remote.list_videos()]


def _hold_a_refresh_past_hash(remote: Remote, service: FakeService, clock: FakeClock
                              ) -> tuple[threading.Event, list[VideoMeta]]:
    """Start a refresh of the listing (one video per page) and hold it once HASH's page has
    come, on the page after it: the event that releases it, and the listing before it."""
    released = threading.Event()
    service.block_listing = lambda: service.cursors[-1] != HASH or released.wait(timeout=10)
    asked, before = len(service.cursors), remote.last_listing()
    clock.now += 6  # past listing_ttl
    listed(remote)  # starts the refresh
    wait_until(lambda: service.cursors[asked:] == [None, HASH], timeout=10,
               what="the refresh past HASH's page")
    return released, before


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_remote(service: FakeService, clock: FakeClock) -> Callable[..., Remote]:
    def make(**config: Any) -> Remote:
        client = VidCacheClient("http://vidcache.test",
                                transport=httpx.MockTransport(service.handle))
        return Remote(client, config=RemoteConfig(**config), sleep=clock.sleep, clock=clock)

    return make


def test_fetch_returns_exactly_the_range_and_verifies_whole_chunks(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    assert remote.fetch(HASH, 0, 2000) == DATA[:2000]  # chunks 0 and 1, aligned
    assert remote.fetch(HASH, 2000, len(DATA)) == DATA[2000:]  # the short last chunk
    assert service.ranges == ["bytes=0-1999", "bytes=2000-2559"]
    assert remote.counters.get("verified_chunks") == 3
    assert remote.counters.get("verify_extra_bytes") == 0
    assert remote.fetch(HASH, 5, 5) == b""
    assert remote.counters.get("bytes_fetched") == len(DATA)


def test_first_fetch_asks_for_range_and_digests_at_once_and_verifies(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    remote.meta(HASH)  # as after the lookup that precedes every open
    assert remote.fetch(HASH, 0, len(DATA)) == DATA  # whole chunks: no waiting for digests
    assert service.requests.count(f"/video/{HASH}/chunks") == 1
    assert service.ranges == [f"bytes=0-{len(DATA) - 1}"]
    assert remote.counters.get("verified_chunks") == 3


def test_first_fetch_with_a_bad_chunk_is_fetched_again_and_never_returned(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote(timeout=1.0)
    remote.meta(HASH)
    service.digests[2] = "0" * 64
    with pytest.raises(RemoteUnavailable, match="chunk 2"):
        remote.fetch(HASH, 0, len(DATA))
    assert len(service.ranges) > 1  # the overlapped attempt, then the verified path's
    assert remote.counters.get("verify_failures") == len(service.ranges)


def test_fetch_blocks_builds_and_verifies_each_chunk_as_its_own_block(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    remote.fetch(HASH, 0, CHUNK)  # the digests are known from now on
    blocks = remote.fetch_blocks(HASH, CHUNK, len(DATA), CHUNK)
    assert blocks == [DATA[CHUNK : 2 * CHUNK], DATA[2 * CHUNK :]]
    assert all(type(block) is bytes for block in blocks)
    assert service.ranges[-1] == f"bytes={CHUNK}-{len(DATA) - 1}"
    assert remote.counters.get("verified_chunks") == 3
    # blocks that are not the service's chunks: fetched whole, verified, then cut
    halves = remote.fetch_blocks(HASH, 0, 2000, 500)
    assert halves == [DATA[i : i + 500] for i in range(0, 2000, 500)]


def test_fetch_blocks_never_returns_a_chunk_with_a_bad_digest(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote(timeout=1.0)
    service.digests[2] = "0" * 64
    remote.fetch(HASH, 0, CHUNK)  # chunk 0 is fine; the digests are known from now on
    with pytest.raises(RemoteUnavailable, match="chunk 2"):
        remote.fetch_blocks(HASH, CHUNK, len(DATA), CHUNK)
    assert remote.counters.get("verify_failures") > 1


def test_a_range_cutting_chunks_is_widened_and_its_edge_chunks_kept(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    assert remote.fetch(HASH, 0, 1500) == DATA[:1500]  # cuts chunk 1: fetched whole
    assert service.ranges == ["bytes=0-1999"]
    assert remote.counters.get("verified_chunks") == 2
    assert remote.counters.get("verify_extra_bytes") == 500
    assert remote.fetch(HASH, 1500, 1800) == DATA[1500:1800]  # inside the kept chunk 1
    assert remote.fetch(HASH, 1800, 2100) == DATA[1800:2100]  # kept chunk 1 + fetched chunk 2
    assert service.ranges == ["bytes=0-1999", "bytes=2000-2559"]
    assert remote.fetch(HASH, 2100, 2200) == DATA[2100:2200]
    assert len(service.ranges) == 2
    assert remote.counters.get("bytes_fetched") == 1500 + 300 + 300 + 100


def test_a_bad_digest_of_a_partly_read_chunk_is_caught(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote(timeout=1.0)
    service.digests[0] = "0" * 64
    with pytest.raises(RemoteUnavailable, match="chunk 0"):
        remote.fetch(HASH, 10, 20)  # ten bytes of a chunk whose digest does not match
    assert remote.counters.get("verify_failures") > 1


def test_transient_errors_are_retried_with_growing_jittered_backoff(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    remote = make_remote(backoff_initial=0.1, backoff_max=2.0)
    remote.meta(HASH)  # the digests need the size; keep that out of the counts
    service.failures = [503, 502, 500]
    assert remote.fetch(HASH, 0, 10) == DATA[:10]
    assert remote.counters.get("retries") == 3
    assert remote.counters.get("errors") == 0
    for attempt, delay in enumerate(clock.sleeps):
        base = 0.1 * 2**attempt
        assert base / 2 <= delay <= base


def test_persistent_failure_gives_up_at_the_deadline_naming_hash_and_range(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    remote = make_remote(timeout=5.0)
    remote.fetch(HASH, 0, 1000)  # metadata and digests cached: the failures hit the range
    service.failures = [503] * 1000
    start = clock.now
    with pytest.raises(RemoteUnavailable, match=f"{HASH} bytes 100-199"):
        remote.fetch(HASH, 100, 200)
    assert 5.0 <= clock.now - start <= 5.0 + 2.0
    assert remote.counters.get("errors") == 1
    assert 3 <= remote.counters.get("retries") < 100


def test_a_range_failing_again_and_again_is_asked_once_per_try_at_a_paced_rate(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    """As the kernel re-asks a failed read: the first re-ask of a range that just failed gets
    one attempt at once; once that failed too, each further re-ask waits until
    `failure_pause` after the last attempt (a service refusing at once got ~500 requests a
    second); a range that failed long ago gets its retries again, and an answer ends it."""
    remote = make_remote(timeout=5.0, failure_memory=1.0, failure_pause=0.25)
    remote.fetch(HASH, 0, 1000)  # metadata and digests cached: the failures hit the range
    service.failures = [503] * 1000
    with pytest.raises(RemoteUnavailable):
        remote.fetch(HASH, 100, 200)  # a whole deadline of retries
    asked, failed_at = len(service.ranges), clock.now
    with pytest.raises(RemoteUnavailable, match=r"\(failed 0\.0 s ago: one attempt\)"):
        remote.fetch(HASH, 150, 250)
    assert (len(service.ranges), clock.now) == (asked + 1, failed_at)  # at once
    for tries, early in ((2, 0), (3, 0), (4, 0.1)):
        clock.now += early
        before = clock.now
        with pytest.raises(RemoteUnavailable, match=r"\(failed 0\.[23] s ago: one attempt\)"):
            remote.fetch(HASH, 100, 200)  # when it is asked: after the pause
        assert len(service.ranges) == asked + tries
        assert clock.now - before == pytest.approx(0.25 - early)  # the rest of the pause
    assert (remote.counters.get("second_tries"), remote.counters.get("paced_tries")) == (4, 3)
    clock.now += 2.0  # past failure_memory: a deadline of retries again
    with pytest.raises(RemoteUnavailable) as failed:
        remote.fetch(HASH, 100, 200)
    assert "one attempt" not in str(failed.value)
    assert len(service.ranges) > asked + 5
    service.failures = []
    before = clock.now
    assert remote.fetch(HASH, 100, 200) == DATA[100:200]  # one attempt, at once
    assert clock.now == before
    assert (remote.counters.get("second_tries"), remote.counters.get("paced_tries")) == (5, 3)


def test_a_cold_lookup_spends_one_deadline_on_its_pipelined_try_and_its_retries(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    """The metadata asked for with the first block fails after 4 s of a 5 s deadline: the
    retries get the 1 s left, not a deadline of their own."""
    remote = make_remote(timeout=5.0)
    took = iter([4.0])

    def answer_slowly() -> None:
        clock.now += next(took, 0.1)

    service.on_request, service.failures = answer_slowly, [503] * 1000
    start = clock.now
    with pytest.raises(RemoteUnavailable, match=f"metadata of {HASH}"):
        remote.meta(HASH, first_block=CHUNK)
    assert 5.0 <= clock.now - start <= 5.0 + remote.config.per_request_timeout


def test_not_found_and_refusals_are_not_retried(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    with pytest.raises(NotFound):
        remote.fetch(OTHER, 0, 10)
    service.failures = [400]
    with pytest.raises(RemoteError, match="injected 400"):
        remote.fetch(HASH, 0, 10)
    assert remote.counters.get("retries") == 0


def test_an_answer_that_is_not_the_range_is_never_data(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote(timeout=1.0)
    service.ignore_range = True  # 200 with the whole video instead of 206
    with pytest.raises(RemoteUnavailable, match="206"):
        remote.fetch(HASH, 0, 10)
    assert remote.counters.get("retries") > 0


def test_digest_mismatch_is_retried_then_fails(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote(timeout=1.0)
    service.digests[1] = "0" * 64
    assert remote.fetch(HASH, 0, 1000) == DATA[:1000]  # chunk 0 is fine
    with pytest.raises(RemoteUnavailable, match="chunk 1"):
        remote.fetch(HASH, 1000, 2000)
    assert remote.counters.get("verify_failures") > 1  # every attempt checked, none passed


def test_unusable_digests_fail_the_read_and_are_not_kept(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    """Digests that do not cover the file: the read fails, it is not read unverified (as it
    was, for as long as the video stayed cached); the next read asks for them again."""
    digests = service.digests
    service.digests = digests[:2]
    remote = make_remote()
    with pytest.raises(RemoteError, match="unusable"):
        remote.fetch(HASH, 0, len(DATA))
    service.digests = digests
    assert remote.fetch(HASH, 0, len(DATA)) == DATA
    assert remote.counters.get("verified_chunks") == -(-len(DATA) // CHUNK)


def test_metadata_is_cached_and_misses_expire(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    remote = make_remote(negative_ttl=3.0)
    meta = remote.meta(HASH)
    assert meta is not None
    assert (meta.size, meta.name) == (len(DATA), f"{HASH}.mp4")
    assert meta.mtime_ns == 1714979289 * 10**9
    assert remote.meta(HASH) == meta
    assert remote.meta(OTHER) is None
    assert remote.meta(OTHER) is None
    assert service.requests.count(f"/meta/{HASH}") == 1
    assert service.requests.count(f"/meta/{OTHER}") == 1
    clock.now += 3.5
    assert remote.meta(OTHER) is None
    assert service.requests.count(f"/meta/{OTHER}") == 2


def test_listing_is_cached_briefly_and_fills_the_metadata_cache(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    remote = make_remote(listing_ttl=5.0)
    assert [m.content_hash for m in remote.list_videos()] == [HASH]
    assert remote.meta(HASH) is not None
    remote.list_videos()
    assert service.requests == ["/videos"]
    assert json.dumps(remote.counters.snapshot())  # JSON-ready


def test_the_listing_answers_lookups_of_its_videos_however_many(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    """`ls -l`, `du`, `find` look the listed names up in the listing's order: with more videos
    than the metadata cache holds, each lookup found its entry evicted by the ones before and
    asked the service, first block included."""
    service.listed = [HASH, *(f"{digit:x}" * 64 for digit in range(10, 13))]
    remote = make_remote(meta_entries=2)
    listing = remote.list_videos()
    for _ in range(2):
        for meta in listing:
            assert remote.meta(meta.content_hash, first_block=CHUNK) == meta
    assert service.requests == ["/videos"]
    assert remote.counters.get("first_blocks") == 0


def test_an_old_listing_is_returned_at_once_while_a_new_one_is_fetched(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    """A player lists the folder of each file it opens: past its freshness the last listing
    answers at once, and the next `ls` has the one fetched in the background."""
    remote = make_remote(listing_ttl=5.0)
    assert [m.content_hash for m in remote.list_videos()] == [HASH]
    service.listed.append(OTHER)
    released = threading.Event()
    service.block_listing = lambda: released.wait(timeout=10)  # bounded, if a caller waits
    clock.now += 6
    assert [m.content_hash for m in remote.list_videos()] == [HASH]  # not waiting for it
    assert [m.content_hash for m in remote.list_videos()] == [HASH]  # one refresh at a time
    released.set()
    wait_until(lambda: len(remote.list_videos()) == 2, timeout=10, what="the new listing")
    assert [m.content_hash for m in remote.list_videos()] == [HASH, OTHER]
    assert service.requests == ["/videos", "/videos"]
    assert remote.meta(OTHER) is not None  # from the listing: nothing asked
    assert service.requests == ["/videos", "/videos"]


def test_a_listing_forgets_the_videos_it_no_longer_has(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    """A video deleted from the service: once a listing begun after its metadata was cached
    lacks it, a first `stat` of it is ENOENT, not a file whose reads then fail. Whether the
    metadata came from a listing or from a lookup by name."""
    remote = make_remote(listing_ttl=5.0)
    for looked_up in (False, True):
        service.listed = [] if looked_up else [HASH]
        clock.now += 6
        wait_until(lambda: listed(remote) == service.listed, timeout=10, what="the listing")
        assert remote.meta(HASH) is not None
        service.listed, service.gone = [OTHER], {HASH}
        clock.now += 6
        wait_until(lambda: listed(remote) == [OTHER], timeout=10, what="the new listing")
        assert remote.meta(HASH) is None, f"looked up: {looked_up}"
        service.gone = set()
        clock.now += remote.config.negative_ttl


def test_a_video_looked_up_during_a_listing_outlives_it(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    """A video ingested while a listing runs is found by name, and its page may have gone by:
    the listing lacking it does not make vcfs forget it."""
    service.listed = []
    remote = make_remote(listing_ttl=5.0)
    remote.list_videos()
    released = threading.Event()
    service.block_listing = lambda: released.wait(timeout=10)
    clock.now += 6
    remote.list_videos()  # the refresh begins, and waits for its answer
    wait_until(lambda: service.requests.count("/videos") == 2, timeout=10,
               what="the refresh under way")
    clock.now += 1
    assert remote.meta(HASH) is not None
    service.listed = [OTHER]
    released.set()
    wait_until(lambda: listed(remote) == [OTHER], timeout=10, what="the new listing")
    assert remote.meta(HASH) is not None
    assert service.requests.count(f"/meta/{HASH}") == 1


@pytest.mark.parametrize("found_gone_by", ["a lookup", "a read"])
def test_a_video_found_gone_during_a_listing_stays_gone_until_ingested_again(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
    found_gone_by: str,
) -> None:
    """A video deleted while a listing runs, after the page holding it came: a lookup by name or
    a read then gets a 404, and the listing, begun before, brought the video back when it ended
    (`ls` listed it, a `stat` found it, until the next listing). Ingested again, it is in the
    next listing begun after the 404."""
    service.listed = [OTHER] if found_gone_by == "a lookup" else [HASH, OTHER]
    remote = make_remote(listing_ttl=5.0, listing_page=1)
    assert listed(remote) == service.listed
    service.listed = [HASH, OTHER]
    released, before = _hold_a_refresh_past_hash(remote, service, clock)
    service.gone = {HASH}
    if found_gone_by == "a lookup":
        assert remote.meta(HASH) is None
        assert f"/meta/{HASH}" in service.requests
    else:
        with pytest.raises(NotFound):
            remote.fetch(HASH, 0, CHUNK)
    released.set()
    wait_until(lambda: remote.last_listing() is not before, timeout=10, what="the refresh")
    assert listed(remote) == [OTHER]
    assert remote.meta(HASH) is None
    service.gone = set()  # ingested again
    clock.now += 6
    listed(remote)
    wait_until(lambda: listed(remote) == [HASH, OTHER], timeout=10,
               what="the listing begun after the 404")
    assert remote.meta(HASH) is not None


def test_a_video_found_again_during_a_listing_is_in_it(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    """A video deleted while a listing runs, after the page holding it came, then ingested
    again and found by a lookup before the listing ends: the listing left it out all the same
    (`ls` lacked it until the listing after the next one), though the lookup proved it back."""
    service.listed = [HASH, OTHER]
    remote = make_remote(listing_ttl=5.0, listing_page=1)
    assert listed(remote) == service.listed
    released, before = _hold_a_refresh_past_hash(remote, service, clock)
    service.gone = {HASH}
    with pytest.raises(NotFound):
        remote.fetch(HASH, 0, CHUNK)
    service.gone = set()  # ingested again
    clock.now += remote.config.negative_ttl  # past the memory of the 404
    assert remote.meta(HASH) is not None
    released.set()
    wait_until(lambda: remote.last_listing() is not before, timeout=10, what="the refresh")
    assert listed(remote) == [HASH, OTHER]


def test_callers_of_the_first_listing_share_its_fetch(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    """Two `ls` of a fresh mount at once each fetched every page of the listing (two 100k
    videos' listings), and the one begun first, ending last, replaced the newer listing."""
    service.listed = [HASH, OTHER]
    remote = make_remote(listing_page=1)
    released = threading.Event()
    service.block_listing = lambda: released.wait(timeout=10)
    results: list[list[VideoMeta]] = []
    callers = [threading.Thread(target=lambda: results.append(remote.list_videos()))
               for _ in range(2)]
    callers[0].start()
    wait_until(lambda: service.cursors == [None], timeout=10, what="the first listing")
    callers[1].start()
    wait_until(lambda: remote.counters.get("listing_waits") == 1 or len(service.cursors) > 1,
               timeout=10, what="the second caller waiting")
    released.set()
    for caller in callers:
        caller.join(timeout=10)
    assert service.cursors == [None, HASH]  # the two pages, once
    assert len(results) == 2 and results[0] is results[1] is remote.last_listing()
    assert remote.counters.get("listing_waits") == 1


def test_a_failed_first_listing_fails_its_waiters_and_the_next_asks_again(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    holding, released = threading.Event(), threading.Event()
    calls = itertools.count()

    def refuse_the_first_request_once_released() -> None:
        if next(calls) == 0:
            holding.set()
            released.wait(timeout=10)
            service.failures.append(400)  # refused for good: no retries

    service.on_request = refuse_the_first_request_once_released
    errors: list[Exception] = []

    def list_videos() -> None:
        try:
            remote.list_videos()
        except RemoteError as exc:
            errors.append(exc)

    callers = [threading.Thread(target=list_videos) for _ in range(2)]
    callers[0].start()
    assert holding.wait(timeout=10)
    callers[1].start()
    wait_until(lambda: remote.counters.get("listing_waits") == 1 or service.cursors,
               timeout=10, what="the second caller waiting")
    released.set()
    for caller in callers:
        caller.join(timeout=10)
    assert len(errors) == 2 and errors[0] is errors[1]
    assert listed(remote) == [HASH]
    assert service.cursors == [None, None]


def test_a_video_ingested_again_after_a_404_is_read_verified(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    """A read of a deleted video gets a 404 for its digests too, which was kept as "this
    video has no digests": the same content ingested again (the same hash) was then read
    unverified for as long as that entry stayed cached."""
    remote = make_remote()
    assert remote.meta(HASH) is not None
    service.gone = {HASH}
    with pytest.raises(NotFound):
        remote.fetch(HASH, 0, CHUNK)
    assert f"/video/{HASH}/chunks" in service.requests
    service.gone = set()  # ingested again
    clock.now += 60  # past the memory of the 404
    assert remote.meta(HASH) is not None
    assert remote.fetch(HASH, 0, CHUNK) == DATA[:CHUNK]
    assert remote.counters.get("verified_chunks") == 1


def test_a_listed_video_whose_digests_are_404_is_read_after_an_earlier_404_of_it(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    """A video looked up before it was ingested (its 404 kept for negative_ttl), then listed:
    a 404 for its digests is asked again with its metadata, which the kept 404 answered
    without asking (NotFound: the existing video was ENOENT, and dropped from the listing's
    lookups until that 404 expired)."""
    remote = make_remote(negative_ttl=3.0)
    service.gone = {HASH}
    assert remote.meta(HASH) is None
    service.gone = set()  # ingested
    assert listed(remote) == [HASH]
    service.no_chunks = True
    asked = service.requests.count(f"/meta/{HASH}")
    assert remote.fetch(HASH, 0, CHUNK) == DATA[:CHUNK]  # range-checked only: no digests
    assert service.requests.count(f"/meta/{HASH}") == asked + 1
    assert remote.meta(HASH) is not None


def test_a_listing_holds_no_page_longer_than_it_takes_to_read_it(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    """Each page of the listing is made VideoMeta as it arrives: the raw records of every page,
    held until the last one came, took 99 MB more at the peak of a 100k videos' listing."""
    service.listed = [f"{number:064x}" for number in range(20_000)]
    remote = make_remote()
    tracemalloc.start()
    try:
        assert len(remote.list_videos()) == 20_000
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - kept < kept / 4, f"kept {kept}, peak {peak}"


def test_each_page_of_a_listing_has_its_own_deadline_and_is_retried_alone(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    """A large store's listing under load: one deadline for all its pages ran out (`ls` failed
    with EIO), and the retry began again at the first page."""
    service.listed = [f"{number:064x}" for number in range(1, 6)]  # 3 pages of 2
    remote = make_remote(timeout=5.0, listing_page=2)

    def answer_in_2_s() -> None:  # 3 pages and a retry: longer than one deadline
        clock.now += 2
        if service.cursors == [None]:  # the second page's first attempt fails
            service.failures = [503]

    service.on_request = answer_in_2_s
    assert listed(remote) == service.listed
    second, third = service.listed[1], service.listed[3]
    assert service.cursors == [None, second, second, third]
    assert remote.counters.get("retries") == 1


def test_a_listing_fails_at_a_page_unanswered_for_a_deadline(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    service.listed = [f"{number:064x}" for number in range(1, 6)]
    remote = make_remote(timeout=5.0, listing_page=2)

    def fail_from_the_second_page() -> None:
        if service.cursors == [None]:
            service.failures = [503] * 1000
            started.append(clock.now)

    started: list[float] = []
    service.on_request = fail_from_the_second_page
    with pytest.raises(RemoteUnavailable, match=f"page 2 \\(after {service.listed[1]}\\)"):
        remote.list_videos()
    assert 5.0 <= clock.now - started[0] <= 5.0 + 2.0
    assert service.cursors.count(None) == 1  # never from the first page again
    assert remote.counters.get("errors") == 1


def test_a_failed_refresh_keeps_the_last_listing(
    make_remote: Callable[..., Remote], service: FakeService, clock: FakeClock,
) -> None:
    remote = make_remote(listing_ttl=5.0, timeout=1.0)
    assert [m.content_hash for m in remote.list_videos()] == [HASH]
    service.failures = [400]  # refused for good: no retries
    clock.now += 6
    assert [m.content_hash for m in remote.list_videos()] == [HASH]
    wait_until(lambda: service.requests.count("/videos") == 2 and remote.list_videos(),
               timeout=10, what="the refresh tried")
    assert [m.content_hash for m in remote.list_videos()] == [HASH]


def test_a_refused_token_is_access_denied_at_once(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    service.failures = [401]
    with pytest.raises(AccessDenied, match="requires a token: mount with --token-file"):
        remote.meta(HASH)
    assert remote.counters.get("retries") == 0
    assert remote.counters.get("errors") == 1


def test_an_answer_that_never_completes_is_given_up_at_the_cutoff(
    service: FakeService,
) -> None:
    """A response stuck in the transport (what a trickling body looks like to the caller)
    ends the operation at deadline + one request timeout, not when the transport returns."""
    release = threading.Event()
    service.block = lambda: release.wait(30)
    client = VidCacheClient("http://vidcache.test", transport=httpx.MockTransport(service.handle))
    remote = Remote(client, config=RemoteConfig(timeout=0.6))  # real clock: 0.2 s per request
    remote.meta(HASH)
    started = time.monotonic()
    try:
        with pytest.raises(RemoteUnavailable, match="no complete answer"):
            remote.fetch(HASH, 0, 1000)
        assert time.monotonic() - started < 10  # far before the transport would have returned
        assert remote.counters.get("overdue") >= 1
    finally:
        release.set()
        remote.close()


def test_close_ends_a_fetch_waiting_for_a_stuck_answer_at_once(service: FakeService) -> None:
    """vcfs stopping (unmounted or signalled) must not wait for a request's cutoff: `close()`
    ends the wait even where the client cannot cut the request (here httpx's transport)."""
    release = threading.Event()
    client = VidCacheClient("http://vidcache.test", transport=httpx.MockTransport(service.handle))
    remote = Remote(client, config=RemoteConfig(timeout=60.0))  # cutoff: 60 + 10 s
    remote.meta(HASH)
    service.block = lambda: release.wait(30)
    fetching, outcome = _fetch_in_background(remote)
    try:
        wait_until(lambda: remote.counters.get("range_requests") >= 1, timeout=10,
                   what="the fetch under way")
        remote.close()
        fetching.join(10)
        assert not fetching.is_alive(), "close() left the fetch waiting"
        assert len(outcome) == 1 and isinstance(outcome[0], Stopping), outcome
        assert "vcfs is stopping" in str(outcome[0])
        with pytest.raises(Stopping):
            remote.fetch(HASH, 1000, 2000)
    finally:
        release.set()


def _fetch_in_background(remote: Remote) -> tuple[threading.Thread, list[BaseException]]:
    """`remote.fetch` of the video's first 1000 bytes on a thread of its own, and the list
    that gets what it raises."""
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            remote.fetch(HASH, 0, 1000)
        except BaseException as exc:
            outcome.append(exc)

    fetching = threading.Thread(target=fetch, daemon=True)
    fetching.start()
    return fetching, outcome


def test_close_ends_a_fetch_backing_off_between_attempts_at_once(service: FakeService) -> None:
    """The same for a fetch retrying a service that is down (here: 503 after 503) while it
    waits between two attempts: the wait was a time.sleep, so a stopping daemon waited up to
    `backoff_max` for its reads (2 s by default; 30 s here)."""
    client = VidCacheClient("http://vidcache.test", transport=httpx.MockTransport(service.handle))
    remote = Remote(client, config=RemoteConfig(timeout=60.0, backoff_initial=30.0,
                                                backoff_max=30.0))
    remote.meta(HASH)
    service.failures = [503] * 100
    fetching, outcome = _fetch_in_background(remote)
    wait_until(lambda: remote.counters.get("retries") >= 1, timeout=10,
               what="the fetch waiting to retry")
    remote.close()
    fetching.join(10)  # the wait is 15-30 s
    assert not fetching.is_alive(), "close() left the fetch waiting to retry"
    assert len(outcome) == 1 and isinstance(outcome[0], Stopping), outcome


def test_close_ends_a_cold_lookup_whose_exchange_is_still_queued_at_once(
    service: FakeService,
) -> None:
    """A cold lookup's pipelined exchange waits for a worker while every worker is busy (here
    the only one, on a stuck listing). `close()` cancels it unsent: the lookup must not wait
    for an answer that nothing will give until its cutoff (60 + 10 s here)."""
    release = threading.Event()
    service.block_listing = lambda: release.wait(30)
    client = VidCacheClient("http://vidcache.test", transport=httpx.MockTransport(service.handle))
    remote = Remote(client, config=RemoteConfig(timeout=60.0, workers=1))
    outcome: list[object] = []

    def run(call: Callable[[], object]) -> threading.Thread:
        def target() -> None:
            try:
                outcome.append(call())
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    listing = run(remote.list_videos)
    try:
        wait_until(lambda: service.requests == ["/videos"], timeout=10,
                   what="the listing holding the worker")
        lookup = run(lambda: remote.meta(HASH, first_block=1000))
        wait_until(lambda: remote.counters.get("first_blocks") == 1, timeout=10,
                   what="the lookup's exchange queued")
        remote.close()
        for thread in (listing, lookup):
            thread.join(10)
            assert not thread.is_alive(), "close() left a caller waiting"
        assert len(outcome) == 2 and all(isinstance(o, Stopping) for o in outcome), outcome
        assert service.requests == ["/videos"]  # the exchange was never sent
    finally:
        release.set()


# ---------------------------------------------------------------------------------------------
# The same fetches against the real service on loopback, through the benchmark's proxy with
# faults: the client's socket path, not httpx.


@pytest.fixture(scope="module")
def big(vidcache_server: VidcacheServer, videos: dict[str, Path], media_url: str) -> StoredVideo:
    return ingest_big(vidcache_server.url, videos, media_url, "vcfs-remote")


link = link_fixture("module")


@pytest.fixture
def real_remote(link: FaultyLink, big: StoredVideo) -> Iterator[Remote]:
    remote = Remote.connect(link.url, config=RemoteConfig(timeout=3.0, backoff_initial=0.01))
    try:
        remote.fetch(big.hash, 0, MIB)  # metadata and digests known from now on
        link.reset()
        yield remote
    finally:
        remote.close()
        link.faults.clear()


def test_fetch_blocks_reports_each_verified_block_before_the_run_ends(
    real_remote: Remote, link: FaultyLink, big: StoredVideo,
) -> None:
    reported: list[tuple[int, bytes]] = []
    blocks = real_remote.fetch_blocks(big.hash, MIB, 9 * MIB, MIB,
                                      on_block=lambda i, block: reported.append((i, block)))
    assert [i for i, _ in reported] == list(range(8))
    assert [block for _, block in reported] == blocks
    assert b"".join(blocks) == big.data[MIB : 9 * MIB]
    assert all(type(block) is bytes for block in blocks)
    assert link.ranges() == [f"bytes={MIB}-{9 * MIB - 1}"]
    assert real_remote.counters.get("verified_chunks") >= 1 + 8


def test_each_block_is_counted_fetched_before_it_is_handed_on(
    real_remote: Remote, link: FaultyLink, big: StoredVideo,
) -> None:
    """A read may return before the rest of its block is in (vcfs.blocks), so a snapshot of
    the counters with no block in flight must count every block already handed on, not wait
    for the run's end: under CPU load, a test taking one after a read found the read's
    block uncounted. Here a tail, whole blocks, and a block cut at a scattered read's end."""
    chunk = 256 * 1024
    counters = real_remote.counters
    before = counters.get("bytes_fetched")
    counted: list[int] = []

    def on_block(_position: int, _block: bytes) -> None:
        counted.append(counters.get("bytes_fetched") - before)

    real_remote.fetch_blocks(big.hash, MIB, 4 * MIB, MIB, skip=chunk + 10, on_block=on_block)
    assert counted == [MIB - chunk, 2 * MIB - chunk, 3 * MIB - chunk]
    counted.clear()
    before = counters.get("bytes_fetched")
    real_remote.fetch_blocks(big.hash, 5 * MIB, 6 * MIB, MIB, until=100, on_span=lambda *_: None,
                             on_block=on_block)
    assert counted == [chunk]
    assert link.ranges() == [f"bytes={MIB + chunk}-{4 * MIB - 1}",
                             f"bytes={5 * MIB}-{5 * MIB + chunk - 1}"]


def test_a_stopped_run_ends_keeping_its_reported_blocks_and_is_not_asked_again(
    real_remote: Remote, link: FaultyLink, big: StoredVideo,
) -> None:
    stop = threading.Event()
    reported: list[int] = []

    def on_block(position: int, block: bytes) -> None:
        assert block == big.data[(1 + position) * MIB : (2 + position) * MIB]
        reported.append(position)
        if position == 1:
            stop.set()  # the reader closed the file

    with pytest.raises(FetchStopped):
        real_remote.fetch_blocks(big.hash, MIB, 9 * MIB, MIB, on_block=on_block, stop=stop)
    assert reported == [0, 1]
    assert link.ranges() == [f"bytes={MIB}-{9 * MIB - 1}"]  # no retry
    counters = real_remote.counters
    assert (counters.get("stopped"), counters.get("retries"), counters.get("errors")) == (1, 0, 0)
    after = real_remote.fetch(big.hash, 5 * MIB, 5 * MIB + 1000)  # on a new connection
    assert after == big.data[5 * MIB : 5 * MIB + 1000]
    with pytest.raises(FetchStopped):  # already set: nothing is sent
        real_remote.fetch_blocks(big.hash, 2 * MIB, 4 * MIB, MIB, stop=stop)
    assert len(link.ranges()) == 2


def test_a_stopped_run_of_blocks_smaller_than_the_chunks_ends_too(
    real_remote: Remote, link: FaultyLink, big: StoredVideo,
) -> None:
    """Blocks smaller than the video's chunks (`--block-size 128K`, 256 KiB chunks) are
    fetched as one verified range and cut into blocks afterwards: a stop (the reader closed
    the file) must end that range too, not let the rest of it come."""
    link.faults.enable(Bandwidth(bytes_per_s=2 * MIB))  # the 4 MiB would take 2 s
    stop = threading.Event()

    def stop_once_asked() -> None:
        wait_until(lambda: link.ranges(), timeout=10, what="the range asked for")
        stop.set()

    stopper = threading.Thread(target=stop_once_asked, daemon=True)
    stopper.start()
    try:
        with pytest.raises(FetchStopped):
            real_remote.fetch_blocks(big.hash, MIB, 5 * MIB, 128 << 10, stop=stop)
    finally:
        stopper.join(10)
    assert link.ranges() == [f"bytes={MIB}-{5 * MIB - 1}"]  # no retry
    counters = real_remote.counters
    assert (counters.get("stopped"), counters.get("retries"), counters.get("errors")) == (1, 0, 0)


def test_a_run_cut_midway_is_resumed_after_its_last_reported_block(
    real_remote: Remote, link: FaultyLink, big: StoredVideo,
) -> None:
    # A FIN, not a reset: a reset may discard bytes already received but not read yet
    link.faults.enable(Truncate(after_bytes=2 * MIB + 5000), times=1)
    reported: list[int] = []
    blocks = real_remote.fetch_blocks(big.hash, 0, 6 * MIB, MIB,
                                      on_block=lambda i, _: reported.append(i))
    assert b"".join(blocks) == big.data[: 6 * MIB]
    assert reported == list(range(6))  # each block once, in order
    assert link.ranges() == [f"bytes=0-{6 * MIB - 1}", f"bytes={2 * MIB}-{6 * MIB - 1}"]
    assert real_remote.counters.get("retries") == 1


def test_a_flipped_byte_fails_its_block_and_only_the_rest_is_asked_again(
    real_remote: Remote, link: FaultyLink, big: StoredVideo,
) -> None:
    link.faults.enable(FlipByte(at=MIB + 10), times=1)
    blocks = real_remote.fetch_blocks(big.hash, 0, 3 * MIB, MIB)
    assert b"".join(blocks) == big.data[: 3 * MIB]
    assert link.ranges() == [f"bytes=0-{3 * MIB - 1}", f"bytes={MIB}-{3 * MIB - 1}"]
    assert real_remote.counters.get("verify_failures") == 1


@pytest.mark.parametrize("fetch", ["fetch", "fetch_blocks"])
def test_a_trickling_answer_ends_by_the_cutoff(
    real_remote: Remote, link: FaultyLink, big: StoredVideo, fetch: str,
) -> None:
    """Bytes keep coming (no request times out), just far too slowly (4 MiB at 400 kB/s take
    10 s): the operation fails once its cutoff (deadline 3 s + one request timeout of 1 s) has
    passed, not when the body ends."""
    link.faults.enable(Bandwidth(bytes_per_s=400_000))
    started = time.monotonic()
    with pytest.raises(RemoteUnavailable):
        if fetch == "fetch":
            real_remote.fetch(big.hash, 4 * MIB, 8 * MIB)
        else:
            real_remote.fetch_blocks(big.hash, 4 * MIB, 8 * MIB, MIB)
    assert time.monotonic() - started < 3.0 + 1.0 + 2.0  # the cutoff, and slack for the machine


def digest_page(content_hash: str, page: int) -> Callable[[Request], bool]:
    """Matches the `/chunks` request of the lookup of a remote whose digest pages are `page`
    bytes: a size of its own, so that the fault does not hit a request for the same video's
    default page still on its way from an earlier test's remote."""

    def match(request: Request) -> bool:
        return (request.path == f"/video/{content_hash}/chunks"
                and urllib.parse.parse_qs(urllib.parse.urlsplit(request.target).query)
                .get("end") == [str(page)])

    return match


@pytest.mark.parametrize("scattered", [False, True], ids=["first-read", "scattered-read"])
def test_a_read_gives_up_a_lookup_whose_pipelined_answers_stop(
    link: FaultyLink, big: StoredVideo, scattered: bool,
) -> None:
    """On the way to the service, something passes the lookup's `/meta` answer and then
    nothing more on that connection (as a proxy that does not pass pipelined requests on).
    The first read gives the held block up once the exchange has been silent for its patience
    (1 s here) and fetches it the usual way; a scattered read's fetch, which waits for the
    lookup's digests, gives them up the same way and fetches its whole block. Neither waits
    out the request timeout."""
    request_timeout = 30.0
    # A digest page of its own: the stall must hit this remote's lookup, not a request for
    # the same video's default page still on its way from an earlier test's remote.
    page = 16 * MIB if scattered else 64 * MIB
    remote = Remote.connect(link.url, config=RemoteConfig(
        timeout=3 * request_timeout, request_timeout=request_timeout, digest_page_bytes=page))
    try:
        link.reset()
        stalls = link.faults.injected().get("stall", 0)
        link.faults.enable(Stall(seconds=request_timeout, match=digest_page(big.hash, page)),
                           times=1)
        assert remote.meta(big.hash, first_block=MIB) is not None
        started = time.monotonic()
        if scattered:
            blocks = remote.fetch_blocks(big.hash, 3 * MIB, 4 * MIB, MIB, skip=10_000,
                                         until=110_000, on_span=lambda *_: None)
            assert blocks == [big.data[3 * MIB : 4 * MIB]]
        else:
            assert remote.fetch(big.hash, 0, MIB) == big.data[:MIB]
            assert remote.counters.get("first_blocks_dropped") == 1
        assert time.monotonic() - started < request_timeout / 3
        assert link.faults.injected()["stall"] == stalls + 1
    finally:
        remote.close()
        link.faults.clear()


@pytest.mark.parametrize("scattered", [True, False], ids=["scattered", "whole-block"])
def test_a_fetch_racing_the_lookups_digests_takes_them_and_asks_nothing_again(
    link: FaultyLink, big: StoredVideo, scattered: bool,
) -> None:
    """A read right after a cold lookup whose digests are still on their way (held back 2 s
    here). A scattered one: its fetch waits for them and brings the one chunk the read needs,
    not its whole block (it cannot cut a block without the chunk size). One that is not
    (ffprobe's jump to a moov box at the end): its range is fetched at once and verified with
    the lookup's digests. Neither asks for the digests again."""
    chunk = 256 * 1024
    page = 32 * MIB if scattered else 128 * MIB  # a page of its own: no other test's request
    remote = Remote.connect(link.url, config=RemoteConfig(
        timeout=30.0, first_block_patience=10.0, digest_page_bytes=page))
    try:
        link.reset()
        delayed = link.faults.injected().get("latency", 0)
        link.faults.enable(Latency(seconds=2.0, match=digest_page(big.hash, page)), times=1)
        assert remote.meta(big.hash, first_block=MIB) is not None
        if scattered:
            blocks = remote.fetch_blocks(big.hash, 3 * MIB, 4 * MIB, MIB, skip=10_000,
                                         until=110_000, on_span=lambda *_: None)
        else:
            blocks = remote.fetch_blocks(big.hash, 3 * MIB, 4 * MIB, MIB)
        end = 3 * MIB + (chunk if scattered else MIB)
        assert link.faults.injected()["latency"] == delayed + 1
        assert [asked for asked in link.ranges() if asked != "None"] == [
            f"bytes=0-{MIB - 1}", f"bytes={3 * MIB}-{end - 1}"]
        assert remote.counters.get("http_requests") == 3 + 1  # the lookup's, and the range
        assert blocks == [big.data[3 * MIB : end]]
        assert remote.counters.get("verified_chunks") == (end - 3 * MIB) // chunk
    finally:
        remote.close()
        link.faults.clear()


# ---------------------------------------------------------------------------------------------
# The first block fetched along with a cold lookup's metadata


def test_cold_meta_fetches_the_first_block_and_digests_and_a_fetch_takes_them(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    assert remote.meta(HASH, first_block=2000) is not None
    assert remote.fetch(HASH, 0, 2000) == DATA[:2000]
    assert sorted(service.requests) == sorted([f"/meta/{HASH}", f"/video/{HASH}/chunks",
                                               f"/video/{HASH}"])
    assert service.ranges == ["bytes=0-1999"]
    assert remote.counters.get("first_blocks_used") == 1
    assert remote.counters.get("verified_chunks") == 2
    assert remote.fetch(HASH, 0, 2000) == DATA[:2000]  # handed over once: now fetched
    assert service.ranges == ["bytes=0-1999", "bytes=0-1999"]
    assert remote.meta(HASH, first_block=2000) is not None  # cached: nothing sent
    assert len(service.requests) == 4


def test_first_block_of_a_file_shorter_than_the_block_is_the_whole_file(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    remote.meta(HASH, first_block=4096)
    assert remote.fetch(HASH, 0, len(DATA)) == DATA
    assert service.ranges == ["bytes=0-4095"]
    assert remote.counters.get("first_blocks_used") == 1


def test_first_block_starts_a_run_of_blocks(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    remote.meta(HASH, first_block=1000)
    reported: list[tuple[int, bytes]] = []
    pieces = remote.fetch_blocks(HASH, 0, len(DATA), 1000,
                                 on_block=lambda i, piece: reported.append((i, piece)))
    assert b"".join(pieces) == DATA
    assert [i for i, _ in reported] == [0, 1, 2]
    assert service.ranges == ["bytes=0-999", "bytes=1000-2559"]


def test_first_block_failing_its_digest_is_never_returned(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    service.digests[0] = "0" * 64
    remote = make_remote(timeout=1.0)
    remote.meta(HASH, first_block=1000)
    with pytest.raises(RemoteUnavailable):
        remote.fetch(HASH, 0, 1000)
    assert remote.counters.get("first_blocks_dropped") == 1
    assert len(service.ranges) > 1  # fetched again the normal way, failing the same check


def test_unknown_hash_drops_its_first_block(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote()
    assert remote.meta(OTHER, first_block=1000) is None
    assert remote.meta(OTHER, first_block=1000) is None  # remembered: nothing sent
    # Through httpx the three requests go one after another: the 404 stops the other two.
    assert service.requests == [f"/meta/{OTHER}"]
    assert remote.counters.get("first_blocks") == 1
    with pytest.raises(NotFound):
        remote.fetch(OTHER, 0, 1000)


def test_first_block_with_meta_can_be_turned_off(
    make_remote: Callable[..., Remote], service: FakeService,
) -> None:
    remote = make_remote(first_block_with_meta=False)
    remote.meta(HASH, first_block=1000)
    assert service.requests == [f"/meta/{HASH}"]
