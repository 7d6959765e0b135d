"""vcfs asks for a video's chunk digests a page at a time (vcfs.digests), on a real service
recording 64 KiB chunks, behind the loopback proxy that logs every request. Pages of 2 MiB here
(256 MiB in use) so that a 20 MB video has ten: a cold open asks for the first page only, a jump
into another page asks for it along with its range (and the page's other blocks then need no
digest request), a read across the whole video asks for each page once and verifies every
chunk, and a corrupt chunk in a page fetched during a jump is caught.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.faults import FlipByte, Latency, Refuse, path_prefix
from bench.proxy import Request
from tests.support import VidcacheServer, wait_until
from tests.vcfs_fault_support import FaultyLink, Source, ingest, link_fixture
from vcfs.errors import RemoteUnavailable
from vcfs.remote import Remote, RemoteConfig
from vidcache_client import VidCacheClient

KIB = 1 << 10
MIB = 1 << 20
CHUNK = 64 * KIB
PAGE = 2 * MIB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    with VidcacheServer(tmp_path_factory.mktemp("vcfs-pages") / "data",
                        "--chunk-size", "64K") as running:
        yield running


@pytest.fixture(scope="module")
def source(server: VidcacheServer, media_url: str, videos: dict[str, Path]) -> Source:
    return ingest(server.url, media_url, videos, ("big.mp4",), bucket="pages")["big.mp4"]


link = link_fixture(upstream="server")


@pytest.fixture
def remote(link: FaultyLink) -> Iterator[Remote]:
    made = Remote.connect(link.url, config=RemoteConfig(digest_page_bytes=PAGE, timeout=10))
    yield made
    made.close()


def digest_pages_asked(link: FaultyLink, source: Source) -> list[tuple[int, int]]:
    """(start, end) of every `/chunks` request for the video, in order (end -1: none)."""
    asked = []
    for target in link.request_targets():
        url = urllib.parse.urlsplit(target)
        if url.path == f"/video/{source.content_hash}/chunks":
            query = urllib.parse.parse_qs(url.query)
            asked.append((int(query.get("start", ["0"])[0]), int(query.get("end", ["-1"])[0])))
    return asked


def ranges_asked(link: FaultyLink, source: Source) -> list[str]:
    return [r for p, r in link.request_log() if p == f"/video/{source.content_hash}" and r]


def test_a_cold_open_asks_for_the_first_page_only(remote: Remote, link: FaultyLink,
                                                   source: Source) -> None:
    assert remote.meta(source.content_hash, first_block=MIB) is not None
    assert remote.fetch_blocks(source.content_hash, 0, MIB, MIB) == [source.data[:MIB]]
    assert remote.fetch_blocks(source.content_hash, MIB, 2 * MIB, MIB) == [
        source.data[MIB : 2 * MIB]]
    assert digest_pages_asked(link, source) == [(0, PAGE)]
    assert remote.counters.get("verified_chunks") == 2 * MIB // CHUNK
    assert remote.counters.get("first_blocks_used") == 1


def test_a_jump_asks_for_its_page_along_with_its_range(remote: Remote, link: FaultyLink,
                                                       source: Source) -> None:
    remote.fetch_blocks(source.content_hash, 0, MIB, MIB)  # the chunk size known from here on
    offset = 9 * MIB + 300 * KIB  # page 4 (8-10 MiB), chunk 4 of block 9
    pieces = remote.fetch_blocks(source.content_hash, 9 * MIB, 10 * MIB, MIB, skip=300 * KIB)
    tail = 9 * MIB + 256 * KIB
    assert pieces == [source.data[tail : 10 * MIB]]
    assert source.data[offset : offset + KIB] in pieces[0]
    assert ranges_asked(link, source)[-1] == f"bytes={tail}-{10 * MIB - 1}"
    assert digest_pages_asked(link, source)[-1] == (8 * MIB, 10 * MIB)
    requests = link.requests()
    assert remote.fetch_blocks(source.content_hash, 8 * MIB, 9 * MIB, MIB) == [
        source.data[8 * MIB : 9 * MIB]]
    assert link.requests() == requests + 1  # the range only: its digests came with the page
    assert remote.counters.get("verify_failures") == 0


def test_a_scattered_reads_fetch_stops_at_the_chunk_holding_its_end(
    remote: Remote, link: FaultyLink, source: Source,
) -> None:
    """`until`: a scattered 100 KiB read in the middle of a block brings the three 64 KiB
    chunks that hold it (verified), not the rest of the block, and says where they lie."""
    remote.fetch_blocks(source.content_hash, 0, MIB, MIB)  # the chunk size known from here on
    spans: list[tuple[int, int]] = []

    def spanned(start: int, end: int) -> None:
        spans.append((start, end))

    pieces = remote.fetch_blocks(source.content_hash, 9 * MIB, 10 * MIB, MIB,
                                 skip=100 * KIB, until=200 * KIB, on_span=spanned)
    low, high = 9 * MIB + CHUNK, 9 * MIB + 4 * CHUNK  # chunks 1-3 of block 9 hold 100-200 KiB
    assert pieces == [source.data[low:high]]
    assert spans == [(low, high)]
    assert ranges_asked(link, source)[-1] == f"bytes={low}-{high - 1}"
    assert remote.counters.get("verify_failures") == 0
    # A run of two blocks: the last one cut, the first whole.
    pieces = remote.fetch_blocks(source.content_hash, 12 * MIB, 14 * MIB, MIB,
                                 until=CHUNK, on_span=spanned)
    assert pieces == [source.data[12 * MIB : 13 * MIB], source.data[13 * MIB : 13 * MIB + CHUNK]]
    assert spans[-1] == (12 * MIB, 13 * MIB + CHUNK)


def test_concurrent_jumps_into_one_unknown_page_ask_for_it_once(
    remote: Remote, link: FaultyLink, source: Source,
) -> None:
    """The second jump waits for the page the first one asked for (held back a while at the
    proxy, so both are under way at once) instead of asking again."""
    remote.fetch_blocks(source.content_hash, 0, MIB, MIB)  # the chunk size known from here on
    link.faults.enable(Latency(seconds=0.5,
                               match=path_prefix(f"/video/{source.content_hash}/chunks")))
    start = threading.Barrier(2)
    got: dict[int, list[bytes]] = {}

    def jump(block: int) -> None:
        start.wait(timeout=10)
        got[block] = remote.fetch_blocks(source.content_hash, block * MIB, (block + 1) * MIB,
                                         MIB)

    readers = [threading.Thread(target=jump, args=(block,)) for block in (6, 7)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=30)
    assert got == {block: [source.data[block * MIB : (block + 1) * MIB]] for block in (6, 7)}
    assert digest_pages_asked(link, source)[1:] == [(6 * MIB, 8 * MIB)]
    assert remote.counters.get("verify_failures") == 0


def test_a_read_of_the_whole_video_asks_for_each_page_once(remote: Remote, link: FaultyLink,
                                                          source: Source) -> None:
    run = 3 * MIB  # runs cross the pages' borders
    data = b"".join(
        b"".join(remote.fetch_blocks(source.content_hash, start,
                                     min(start + run, source.size), MIB))
        for start in range(0, source.size, run))
    assert data == source.data
    pages = digest_pages_asked(link, source)
    assert len(pages) == len(set(pages))
    assert sorted({page for start, end in pages for page in range(start // PAGE, end // PAGE)}
                  ) == list(range(-(-source.size // PAGE)))
    assert remote.counters.get("verified_chunks") == -(-source.size // CHUNK)
    assert remote.counters.get("verify_failures") == 0


def test_a_corrupt_chunk_in_a_page_fetched_during_a_jump_is_caught(
    remote: Remote, link: FaultyLink, source: Source,
) -> None:
    remote.fetch_blocks(source.content_hash, 0, MIB, MIB)
    header = f"bytes={14 * MIB}-{15 * MIB - 1}"

    def the_block(request: Request) -> bool:
        return request.headers.get("range") == header

    link.faults.enable(FlipByte(match=the_block), times=1)
    assert remote.fetch_blocks(source.content_hash, 14 * MIB, 15 * MIB, MIB) == [
        source.data[14 * MIB : 15 * MIB]]
    assert link.faults.injected().get("flip_byte") == 1
    assert remote.counters.get("verify_failures") == 1
    assert ranges_asked(link, source)[-2:] == [header, header]  # caught, then fetched again


def test_a_first_block_larger_than_a_page_is_verified_with_the_pages_it_spans(
    remote: Remote, link: FaultyLink, source: Source,
) -> None:
    """The lookup asks for the first page of digests along with the first block; a block of
    4 MiB spans two 2 MiB pages. Both pages are asked for before the block is handed on, and
    a byte flipped in its second half is caught (it was handed on unverified, with a warning
    that the digests lacked those bytes)."""
    block = 2 * PAGE
    header = f"bytes=0-{block - 1}"

    def the_block(request: Request) -> bool:
        return request.headers.get("range") == header

    link.faults.enable(FlipByte(match=the_block, at=PAGE + 100 * KIB), times=1)
    assert remote.meta(source.content_hash, first_block=block) is not None
    assert remote.fetch_blocks(source.content_hash, 0, block, block) == [source.data[:block]]
    assert link.faults.injected().get("flip_byte") == 1
    assert remote.counters.get("verify_failures") == 1
    assert remote.counters.get("first_blocks_dropped") == 1  # caught, then fetched again
    assert ranges_asked(link, source) == [header, header]
    assert digest_pages_asked(link, source) == [(0, PAGE), (0, block)]


def test_a_page_the_service_will_not_send_fails_the_jump_in_time_then_heals(
    link: FaultyLink, source: Source,
) -> None:
    """The range arrives but its page of digests does not (503 until the deadline): the fetch
    fails as unavailable by its deadline, handing on no unverified byte; once the service
    answers again, the same fetch works."""
    remote = Remote.connect(link.url, config=RemoteConfig(
        digest_page_bytes=PAGE, timeout=2, request_timeout=1, failure_memory=0.1))
    try:
        remote.fetch_blocks(source.content_hash, 0, MIB, MIB)  # chunk size known, page 0 too

        def page_requests(request: Request) -> bool:
            return request.path == f"/video/{source.content_hash}/chunks"

        refusal = Refuse(match=page_requests)
        link.faults.enable(refusal)
        handed_on: list[int] = []
        with pytest.raises(RemoteUnavailable, match="chunk digests"):
            remote.fetch_blocks(source.content_hash, 12 * MIB, 13 * MIB, MIB,
                                on_block=lambda i, _: handed_on.append(i),
                                on_partial=lambda i, _piece, _ready: handed_on.append(i))
        assert handed_on == []
        assert ranges_asked(link, source)[-1] == f"bytes={12 * MIB}-{13 * MIB - 1}"
        link.faults.disable(refusal)
        assert remote.fetch_blocks(source.content_hash, 12 * MIB, 13 * MIB, MIB) == [
            source.data[12 * MIB : 13 * MIB]]
    finally:
        remote.close()


JUMP_THREAD = "the jump"


def remote_on_clock(link: FaultyLink, config: RemoteConfig, clock: Callable[[], float]
                    ) -> Remote:
    """A remote on `link` whose deadlines are read off `clock` (Remote.connect takes none)."""
    client = VidCacheClient(link.url, timeout=config.per_request_timeout,
                            max_connections=config.workers)
    return Remote(client, config=config, clock=clock)


def start_jump(remote: Remote, source: Source) -> tuple[threading.Thread, list[BaseException]]:
    """Start a jump to block 12 (its page of digests not asked for yet) on a thread of its own,
    named JUMP_THREAD; the list gets what the fetch raised."""
    outcome: list[BaseException] = []

    def jump() -> None:
        try:
            remote.fetch_blocks(source.content_hash, 12 * MIB, 13 * MIB, MIB)
        except BaseException as exc:  # asserted by the test
            outcome.append(exc)

    thread = threading.Thread(target=jump, name=JUMP_THREAD, daemon=True)
    thread.start()
    return thread, outcome


def test_a_page_of_digests_late_past_the_cutoff_fails_the_jump_naming_the_video_once(
    link: FaultyLink, source: Source, caplog: pytest.LogCaptureFixture,
) -> None:
    """A jump whose range has come but whose page of digests has not by the attempt's cutoff
    (its request still waiting for the answer) fails, and its error and log lines name the
    video once: they were '<hash> bytes A-B: gave up after 1 attempt(s) ...; last error:
    chunk digests of <hash>: no answer by the cutoff', the outage line likewise. The remote's
    clock is moved on once the page's request is out, to 16 s before the cutoff: the range
    (held 2 s) comes before it, the digests (held a minute; their request times out after
    40 s) do not, each with seconds to spare on a loaded machine (with 8 s, and 20 s for the
    request, the range once came too late under a full suite and two more test runs: the
    reason was the jump's, as below). The jump's wait for its
    attempt, the attempt's for the page and the page's request may each have taken its length
    from the clock before or after it moved, so any of them may be the first to end at the
    cutoff: the reason is the same (the jump's said 'no complete answer by the deadline')."""
    skew = [0.0]
    config = RemoteConfig(digest_page_bytes=PAGE, timeout=120, request_timeout=40)
    remote = remote_on_clock(link, config, lambda: time.monotonic() + skew[0])
    try:
        remote.fetch_blocks(source.content_hash, 0, MIB, MIB)  # chunk size known, page 0 too
        link.faults.enable(Latency(seconds=60, match=path_prefix(
            f"/video/{source.content_hash}/chunks")))
        link.faults.enable(Latency(seconds=2, match=lambda request: request.range == (
            f"bytes={12 * MIB}-{13 * MIB - 1}")))
        pages = len(digest_pages_asked(link, source))
        began = time.monotonic()
        with caplog.at_level(logging.INFO, logger="vcfs"):
            reader, outcome = start_jump(remote, source)
            wait_until(lambda: len(digest_pages_asked(link, source)) > pages, timeout=10,
                       what="the page's request")
            skew[0] = began + config.timeout + config.per_request_timeout - 16 - time.monotonic()
            reader.join(timeout=60)
            assert not reader.is_alive(), "the jump did not end"
    finally:
        remote.close()
    assert len(outcome) == 1 and isinstance(outcome[0], RemoteUnavailable), outcome
    assert str(outcome[0]).count(source.content_hash) == 1, outcome[0]
    assert "; last error: its chunk digests had not come by the cutoff" in str(outcome[0])
    said = [record.getMessage() for record in caplog.records]
    assert any("failed an operation" in line and source.content_hash in line for line in said)
    assert [line for line in said if line.count(source.content_hash) > 1] == []


def test_the_jumps_own_wait_ending_first_at_the_cutoff_names_the_late_digests(
    link: FaultyLink, source: Source,
) -> None:
    """The same jump, the cutoff noticed first by the jump's wait for its attempt rather than
    by the attempt's wait for the page: the same reason, the digests late (it was 'no complete
    answer by the deadline'). Every other thread's clock lags a minute behind the jump's, so
    the attempt's wait for the page and the page's own request would end a minute after the
    jump's cutoff (8 s after it starts; the range, held 1 s, has come long before); closing
    the remote ends them."""
    lag = [0.0]

    def clock() -> float:
        mine = threading.current_thread().name == JUMP_THREAD
        return time.monotonic() - (0.0 if mine else lag[0])

    config = RemoteConfig(digest_page_bytes=PAGE, timeout=6, request_timeout=2)
    remote = remote_on_clock(link, config, clock)
    try:
        remote.fetch_blocks(source.content_hash, 0, MIB, MIB)  # chunk size known, page 0 too
        link.faults.enable(Latency(seconds=60, match=path_prefix(
            f"/video/{source.content_hash}/chunks")))
        link.faults.enable(Latency(seconds=1, match=lambda request: request.range == (
            f"bytes={12 * MIB}-{13 * MIB - 1}")))
        lag[0] = 60.0
        jumper, outcome = start_jump(remote, source)
        jumper.join(timeout=40)
        assert not jumper.is_alive(), "the jump did not end"
    finally:
        remote.close()
    assert len(outcome) == 1 and isinstance(outcome[0], RemoteUnavailable), outcome
    assert str(outcome[0]).endswith(
        "; last error: its chunk digests had not come by the cutoff"), outcome[0]
    assert remote.counters.get("overdue") == 1  # the jump's wait ended it
