"""VidCacheClient.read_range_into: ranged reads received straight into the caller's buffers.

Against the real service on loopback (directly, and through the benchmark's proxy with
`bench.faults` for resets, truncation, stalls and wrong answers); against tiny socket servers
written here for what vidcache never does (close a kept-alive connection under a request,
chunked framing, TLS with a self-signed certificate); against httpx.MockTransport for the
httpx fallback a custom transport selects.
"""

from __future__ import annotations

import base64
import functools
import gzip
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.faults import (
    Fault,
    FullBody200,
    Latency,
    Refuse,
    Reset,
    Stall,
    Status200,
    Truncate,
    WrongContentRange,
    path_prefix,
)
from tests.client_rangeconn_support import SocketServer, StoredVideo, ingest_big
from tests.support import VidcacheServer, self_signed_certificate, wait_until
from tests.vcfs_fault_support import FaultyLink, link_fixture
from vidcache_client import (
    InvalidRequestError,
    NotFoundError,
    RangeError,
    RangeNotSatisfiableError,
    RequestTimeout,
    ServerError,
    TransportError,
    VidCacheClient,
    VidCacheError,
)
from vidcache_client._rangeconn import _CHAIN_ROUND_TRIP, proxied_by_environment

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture(scope="module")
def video(vidcache_server: VidcacheServer, videos: dict[str, Path], media_url: str) -> StoredVideo:
    return ingest_big(vidcache_server.url, videos, media_url, "rangeconn")


@pytest.fixture(scope="module")
def client(vidcache_server: VidcacheServer) -> Iterator[VidCacheClient]:
    with VidCacheClient(vidcache_server.url, timeout=10) as direct:
        yield direct


link = link_fixture("module")


@pytest.fixture
def linked_client(link: FaultyLink) -> Iterator[VidCacheClient]:
    link.reset()
    with VidCacheClient(link.url, timeout=2) as through_proxy:
        yield through_proxy
    link.faults.clear()


def buffers_of(*sizes: int, fill: int = 0xEE) -> list[bytearray]:
    return [bytearray([fill]) * size for size in sizes]


# -- reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "sizes"), [
    (0, (MIB, MIB, MIB)),
    (12_345, (1000, 70_000, 1, 333_333)),
    (3 * MIB + 17, (64 * KIB,)),
])
def test_the_buffers_receive_exactly_the_range_in_order(
    client: VidCacheClient, video: StoredVideo, offset: int, sizes: tuple[int, ...],
) -> None:
    buffers = buffers_of(*sizes)
    filled: list[int] = []
    progress: list[int] = []

    def on_filled(index: int) -> None:  # each buffer is complete when it is reported
        assert bytes(buffers[index]) == video.data[offset + sum(sizes[:index]):][:sizes[index]]
        filled.append(index)

    received = client.read_range_into(video.hash, offset, buffers, on_filled=on_filled,
                                      on_progress=progress.append)
    assert received == sum(sizes)
    assert b"".join(buffers) == video.data[offset : offset + sum(sizes)]
    assert filled == list(range(len(sizes)))
    assert progress == sorted(progress) and progress[-1] == sum(sizes)


def test_buffers_reaching_past_the_end_get_the_bytes_up_to_it(
    client: VidCacheClient, video: StoredVideo,
) -> None:
    size = len(video.data)
    buffers = buffers_of(1000, 1000, 1000)
    filled: list[int] = []
    assert client.read_range_into(video.hash, size - 1500, buffers,
                                  on_filled=filled.append) == 1500
    assert filled == [0, 1]
    assert bytes(buffers[0]) + bytes(buffers[1][:500]) == video.data[-1500:]
    assert buffers[1][500:] == bytearray([0xEE]) * 500 and buffers[2] == buffers_of(1000)[0]


def test_one_buffer_passed_many_times_is_refilled_after_each_report(
    client: VidCacheClient, video: StoredVideo,
) -> None:
    buffer = bytearray(256 * KIB)
    copies: list[bytes] = []
    client.read_range_into(video.hash, 5000, [buffer] * 6,
                           on_filled=lambda index: copies.append(bytes(buffer)))
    assert b"".join(copies) == video.data[5000 : 5000 + 6 * 256 * KIB]


def test_memoryviews_of_one_big_buffer_work_too(client: VidCacheClient, video: StoredVideo) -> None:
    whole = bytearray(3 * MIB)
    views = [memoryview(whole)[i : i + MIB] for i in range(0, 3 * MIB, MIB)]
    assert client.read_range_into(video.hash, MIB, views) == 3 * MIB
    assert whole == video.data[MIB : 4 * MIB]


def test_reads_keep_one_connection_alive(linked_client: VidCacheClient, link: FaultyLink,
                                         video: StoredVideo) -> None:
    buffer = bytearray(100 * KIB)
    for offset in range(0, 20 * 100 * KIB, 100 * KIB):
        linked_client.read_range_into(video.hash, offset, [buffer])
        assert buffer == video.data[offset : offset + 100 * KIB]
    assert link.connections() == 1
    assert link.ranges()[:2] == ["bytes=0-102399", "bytes=102400-204799"]


def test_a_spare_connection_is_opened_alongside_a_new_one_and_then_used(
    link: FaultyLink, video: StoredVideo,
) -> None:
    link.reset()
    with VidCacheClient(link.url, timeout=2, spare_connection=True) as client:
        buffer = bytearray(100 * KIB)
        client.read_range_into(video.hash, 0, [buffer])
        wait_until(lambda: link.connections() == 2, timeout=10, what="the spare connection")
        started = threading.Barrier(2)
        errors: list[BaseException] = []

        def read(offset: int) -> None:
            try:
                own = bytearray(100 * KIB)
                started.wait(timeout=10)
                client.read_range_into(video.hash, offset, [own])
                assert own == video.data[offset : offset + 100 * KIB]
            except BaseException as exc:
                errors.append(exc)

        readers = [threading.Thread(target=read, args=(o,)) for o in (0, 300 * KIB)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=30)
        assert errors == []
        assert link.connections() == 2  # the two concurrent reads found both ready
    link.reset()
    with VidCacheClient(link.url, timeout=2, spare_connection=True, max_connections=1) as one:
        one.read_range_into(video.hash, 0, [buffer])
        assert link.connections() == 1  # no room for a spare


def test_concurrent_reads_each_get_their_own_bytes(client: VidCacheClient,
                                                   video: StoredVideo) -> None:
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            for step in range(20):
                offset = (seed * 7919 + step * 104_729) % (len(video.data) - MIB)
                buffers = buffers_of(300 * KIB, 200 * KIB)
                client.read_range_into(video.hash, offset, buffers)
                assert b"".join(buffers) == video.data[offset : offset + 500 * KIB]
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


# -- pipelining ----------------------------------------------------------------------------


def read_behind(linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo, *,
                leader_fails: bool, followers: int = 1, chained: bool = False,
                ) -> tuple[list[bytearray], BaseException | None]:
    """Read 256 KiB from 1 MiB; while its answer arrives, read the `followers` 256 KiB ranges
    after it, each on its own thread, started once the request before it has reached the
    proxy and the client has opened that request's end to a range following it (the first
    read's always; with `chained`, every pipelined one's too: the client opens an end just
    after sending its request, a moment after the proxy may have seen it). The first read
    holds its receiving until every request has reached the proxy (or 5 s each). Returns the
    followers' bytes, in order, and the first read's error."""
    class LeaderGaveUp(Exception):
        pass

    all_sent = threading.Event()
    data = [bytearray(256 * KIB) for _ in range(followers)]
    errors: list[BaseException] = []

    def follow(position: int) -> None:
        try:
            linked_client.read_range_into(video.hash, start_of(position + 1),
                                          [data[position]])
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=follow, args=(position,))
               for position in range(followers)]

    def ranges_reached(count: int) -> bool:
        return len(link.ranges()) == count

    reader = linked_client._ranges  # white box: which ends the client has opened
    assert reader is not None

    def end_open(request: int) -> bool:  # the end of request `request` (1: the first read's)
        with reader._lock:
            return (video.hash, start_of(request)) in reader._open_ends

    def lead_progress(received: int) -> None:
        if not all_sent.is_set():
            for sent, thread in enumerate(threads, start=2):
                if sent == 2 or chained:
                    wait_until(functools.partial(end_open, sent - 1), timeout=5,
                               what=f"the end of request {sent - 1} open to a follower")
                thread.start()
                wait_until(functools.partial(ranges_reached, sent), timeout=5,
                           what=f"request {sent}")
            all_sent.set()
            if leader_fails:
                raise LeaderGaveUp

    leader_error: BaseException | None = None
    try:
        linked_client.read_range_into(video.hash, start_of(0), [bytearray(256 * KIB)],
                                      on_progress=lead_progress)
    except LeaderGaveUp as exc:
        leader_error = exc
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads) and errors == []
    return data, leader_error


def start_of(position: int) -> int:
    """Where `read_behind`'s read number `position` (0: the first) begins: 256 KiB reads from
    1 MiB on, one after another."""
    return MIB + position * 256 * KIB


def asked(position: int) -> str:
    """The Range header of `read_behind`'s read number `position`."""
    low = start_of(position)
    return f"bytes={low}-{low + 256 * KIB - 1}"


def part(video: StoredVideo, position: int) -> bytes:
    """The bytes of `read_behind`'s read number `position`."""
    low = start_of(position)
    return video.data[low : low + 256 * KIB]


def test_a_range_right_after_one_in_progress_is_pipelined_on_its_connection(
    linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo,
) -> None:
    (data,), error = read_behind(linked_client, link, video, leader_fails=False)
    assert error is None
    assert data == part(video, 1)
    (first_conn, first), (second_conn, second) = link.range_connections()
    assert (first, second) == (asked(0), asked(1))
    assert first_conn == second_conn  # sent while the first answer was arriving
    assert link.connections() == 1
    buffer = bytearray(1000)
    linked_client.read_range_into(video.hash, 0, [buffer])  # and kept alive after both
    assert buffer == video.data[:1000] and link.connections() == 1


def test_ranges_chain_behind_a_pipelined_range_over_a_slow_link(
    linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo,
) -> None:
    """Over a link with a round trip of 10 ms or more, a range that begins where a pipelined
    one ends follows it on the same connection before that one's answer has begun (a
    readahead's next task), and so on: the answers come in the order asked, each to its own
    reader."""
    link.faults.enable(Latency(seconds=0.02))
    data, error = read_behind(linked_client, link, video, leader_fails=False, followers=3,
                              chained=True)
    assert error is None
    assert data == [part(video, n) for n in range(1, len(data) + 1)]
    requests = link.range_connections()
    assert [range_ for _, range_ in requests] == [asked(n) for n in range(4)]
    assert len({connection for connection, _ in requests}) == 1
    assert link.connections() == 1
    buffer = bytearray(1000)
    linked_client.read_range_into(video.hash, 0, [buffer])  # kept alive after all four
    assert buffer == video.data[:1000] and link.connections() == 1


def test_a_pipelined_range_whose_connection_fails_is_asked_again(
    linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo,
) -> None:
    (data,), error = read_behind(linked_client, link, video, leader_fails=True)
    assert error is not None  # the first read's own error, raised to its caller
    assert data == part(video, 1)
    connections = link.range_connections()
    assert len(connections) == 3 and connections[0][0] == connections[1][0]
    assert connections[2] == (connections[2][0], connections[1][1])  # the same range again
    assert connections[2][0] != connections[0][0]  # on a new connection


def test_ranges_do_not_chain_over_a_fast_link(
    linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo,
) -> None:
    """On loopback a range follows only an answer that is arriving: the one after it takes
    a connection of its own, so the two are received in parallel. The link's round trip is
    the shortest the client measured: once a lookup, as vcfs makes them, measured it under
    10 ms, an answer slow to start (a busy server; here the first range's) is not taken for a
    remote link. (On a busy machine several lookups in a row can take 10 ms or more: the client
    then takes loopback for a remote link, and chains, until one is quicker.)"""
    reader = linked_client._ranges  # white box: the round trip the client measured
    assert reader is not None
    wait_until(lambda: linked_client.health() and (reader._link.seconds or 1) < _CHAIN_ROUND_TRIP,
               timeout=30, interval=0.01, what="a lookup's round trip under 10 ms")
    link.reset()
    link.faults.enable(Latency(seconds=0.03), times=1)
    data, error = read_behind(linked_client, link, video, leader_fails=False, followers=2)
    assert error is None
    assert data == [part(video, n) for n in range(1, len(data) + 1)]
    requests = link.range_connections()
    assert [range_ for _, range_ in requests] == [asked(n) for n in range(3)]
    assert requests[0][0] == requests[1][0] != requests[2][0]


def test_every_range_chained_on_a_failed_connection_is_asked_again(
    linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo,
) -> None:
    link.faults.enable(Latency(seconds=0.02))
    data, error = read_behind(linked_client, link, video, leader_fails=True, followers=3,
                              chained=True)
    assert error is not None
    assert data == [part(video, n) for n in range(1, len(data) + 1)]
    requests = link.range_connections()
    assert [range_ for _, range_ in requests[:4]] == [asked(n) for n in range(4)]
    assert len({connection for connection, _ in requests[:4]}) == 1
    # Each follower asked once more, none of them on the failed connection.
    assert sorted(range_ for _, range_ in requests[4:]) == [asked(n) for n in range(1, 4)]
    assert requests[0][0] not in {connection for connection, _ in requests[4:]}


def test_an_answer_arriving_with_the_end_of_the_one_before_is_read_from_there() -> None:
    """Pipelined answers may come in one receive: the bytes after the first answer's body are
    the start of the next answer, read before anything more from the socket."""
    from vidcache_client._rangeconn import _Connection

    ours, theirs = socket.socketpair()
    ours.settimeout(5)  # a reader that ignored those bytes would wait for more
    with ours, theirs:
        connection = _Connection(ours, lambda: httpx.Request("GET", "http://vidcache.test/"))
        theirs.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n\r\nfirst"
                       b"HTTP/1.1 206 Partial Content\r\nContent-Length: 6\r\n\r\nsec")
        assert connection.read_head().endswith(b"Content-Length: 5")
        body = bytearray(5)
        connection.fill(memoryview(body), 0, 5, None)
        assert body == b"first" and not connection.drained()
        assert connection.read_head().endswith(b"Content-Length: 6")
        theirs.sendall(b"ond")
        body = bytearray(6)
        connection.fill(memoryview(body), 0, 6, None)
        assert body == b"second" and connection.drained()


def test_max_connections_counts_these_connections_with_the_others(
    vidcache_server: VidcacheServer, video: StoredVideo,
) -> None:
    """With both connections held by open streams, a ranged read waits, then times out."""
    with VidCacheClient(vidcache_server.url, timeout=1, max_connections=2) as small, \
            small.stream_video(video.hash, (0, MIB - 1)), \
            small.stream_video(video.hash, (0, MIB - 1)), \
            pytest.raises(RequestTimeout, match="all 2 connections stayed busy"):
        small.read_range_into(video.hash, 0, [bytearray(10)])


def test_one_connection_is_handed_between_the_kinds_of_request(link: FaultyLink,
                                                               video: StoredVideo) -> None:
    """With `max_connections=1`, each call of the other kind closes the idle connection of the
    first and opens its own (no waiting for a connection that nobody uses)."""
    link.reset()
    buffer = bytearray(1000)
    with VidCacheClient(link.url, timeout=2, max_connections=1) as single:
        for _ in range(2):
            assert single.read_range_into(video.hash, 0, [buffer]) == 1000
            assert buffer == video.data[:1000]
            assert single.get_bytes(video.hash, (0, 999)) == video.data[:1000]  # httpx
    assert link.connections() == 4


def test_small_gets_share_the_range_connections(link: FaultyLink, video: StoredVideo) -> None:
    """Metadata, digests and listings go over the range sockets: one warm connection serves
    them all, and their answers are the ones httpx gets."""
    link.reset()
    buffer = bytearray(1000)
    with VidCacheClient(link.url, timeout=2) as client:
        for _ in range(2):
            meta = client.get_meta(video.hash)
            assert meta is not None and meta["size_bytes"] == len(video.data)
            assert client.read_range_into(video.hash, 0, [buffer]) == 1000
            digests = client.get_chunk_digests(video.hash)
            assert digests is not None and digests["chunk_count"] == len(digests["digests"])
            assert video.hash in [doc["hash"] for doc in client.list_videos()]
            assert client.get_meta("0" * 64) is None
    assert link.connections() == 1  # a 404, read whole, leaves it open
    with VidCacheClient(link.url, timeout=2, transport=httpx.HTTPTransport()) as plain:
        assert plain.get_chunk_digests(video.hash) == digests
        assert plain.get_meta(video.hash) == meta


# -- errors -----------------------------------------------------------------------------------


def test_refusals_are_the_clients_status_errors(linked_client: VidCacheClient, link: FaultyLink,
                                                video: StoredVideo) -> None:
    unknown = "0" * 64
    with pytest.raises(NotFoundError, match=f"bytes 0-9 of video {unknown}: HTTP 404") as missing:
        linked_client.read_range_into(unknown, 0, buffers_of(10))
    assert "no video" in missing.value.detail and not NotFoundError.transient
    with pytest.raises(RangeNotSatisfiableError) as past_end:
        linked_client.read_range_into(video.hash, len(video.data), buffers_of(10))
    assert past_end.value.size == len(video.data)
    buffer = bytearray(10)
    assert linked_client.read_range_into(video.hash, 0, [buffer]) == 10  # the client still works
    assert buffer == video.data[:10]
    assert link.connections() == 1  # a refusal, read whole, leaves the connection open


@pytest.mark.parametrize(("first_bytes", "connections"), [(1000, 1), (MIB, 2)])
def test_the_answers_behind_a_refusal_are_skipped_only_when_small(
    linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo, first_bytes: int,
    connections: int,
) -> None:
    """A `/meta` 404 (the proxy's, for a video the server has) ends `open_video_into`; the
    digests and first bytes asked for behind it are read and dropped if small, keeping the
    connection, and a large answer owed closes it. Either way the next call gets its own
    answer, not one of those."""
    link.faults.enable(Refuse(status=404, detail="no video", match=path_prefix("/meta/")),
                       times=1)
    calls: list[str] = []
    with pytest.raises(NotFoundError, match=f"metadata of video {video.hash}: HTTP 404"):
        linked_client.open_video_into(video.hash, [bytearray(first_bytes)],
                                      on_meta=lambda doc: calls.append(f"meta {doc}"),
                                      digests=(0, 4 * MIB),
                                      on_digests=lambda doc: calls.append("digests"))
    assert calls == ["meta None"]
    buffer = bytearray(1000)
    assert linked_client.read_range_into(video.hash, 5000, [buffer]) == 1000
    assert buffer == video.data[5000:6000]
    assert link.connections() == connections


@pytest.mark.parametrize(("framing", "connections"), [
    ("small", 1),
    ("long", 2),  # its body read only in part, for the detail
    ("chunked", 1),  # in chunks (a reverse proxy's gzip of it): read whole all the same
])
def test_only_a_small_refusal_read_whole_leaves_the_connection_open(
    framing: str, connections: int,
) -> None:
    detail = b'{"detail": "no video"}'
    body = detail + b" " * 100_000 if framing == "long" else detail
    refusal = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n" + (
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        if framing == "chunked" else b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def refuse(connection: socket.socket) -> None:
        while read_request(connection) is not None:
            connection.sendall(refusal)

    with SocketServer(refuse) as server, VidCacheClient(server.url, timeout=5) as client:
        for _ in range(2):
            with pytest.raises(NotFoundError, match="HTTP 404 Not Found: no video"):
                client.read_range_into(DATA_HASH, 0, [bytearray(10)])
        assert server.connections == connections


FAULTS: list[tuple[Fault, type[VidCacheError], str]] = [
    (Reset(after_bytes=100_000), TransportError, "ReadError"),
    (Truncate(after_bytes=100_000), TransportError, "complete message body"),
    (Status200(), RangeError, "expected 206 Partial Content, got 200"),
    (WrongContentRange(shift=4096), RangeError, "not the asked bytes"),
    (Refuse(status=503), ServerError, "HTTP 503.*injected by the fault proxy"),
    (Stall(seconds=30, after_bytes=100_000), RequestTimeout, "timed out"),
]


@pytest.mark.parametrize(("fault", "error_class", "message"), FAULTS,
                         ids=[fault.kind for fault, _, _ in FAULTS])
def test_a_damaged_answer_is_an_error_and_the_next_read_is_right(
    linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo, fault: Fault,
    error_class: type[VidCacheError], message: str,
) -> None:
    link.faults.enable(fault, times=1)
    buffers = buffers_of(*[64 * KIB] * 4)
    filled: list[int] = []
    with pytest.raises(error_class, match=message) as caught:
        linked_client.read_range_into(video.hash, 0, buffers, on_filled=filled.append)
    assert type(caught.value).transient
    for index in filled:  # what was reported before the damage is right
        assert buffers[index] == video.data[index * 64 * KIB : (index + 1) * 64 * KIB]
    assert len(filled) <= 1
    buffers = buffers_of(*[64 * KIB] * 4)
    assert linked_client.read_range_into(video.hash, 0, buffers) == 256 * KIB
    assert b"".join(buffers) == video.data[: 256 * KIB]


def test_a_whole_video_instead_of_the_range_is_never_data(
    linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo,
) -> None:
    link.faults.enable(FullBody200(content=lambda _: video.data), times=1)
    buffer = bytearray(1000)
    filled: list[int] = []
    with pytest.raises(RangeError, match="ignored the Range header"):
        linked_client.read_range_into(video.hash, 5000, [buffer], on_filled=filled.append)
    assert buffer == bytearray(1000) and filled == []


def test_a_callback_error_ends_the_read_and_its_connection(
    linked_client: VidCacheClient, link: FaultyLink, video: StoredVideo,
) -> None:
    class Refused(Exception):
        pass

    def refuse_second(index: int) -> None:
        if index == 1:
            raise Refused

    def refuse_past_100k(received: int) -> None:
        if received > 100_000:
            raise Refused

    with pytest.raises(Refused):
        linked_client.read_range_into(video.hash, 0, buffers_of(*[256 * KIB] * 4),
                                      on_filled=refuse_second)
    with pytest.raises(Refused):
        linked_client.read_range_into(video.hash, 0, buffers_of(*[256 * KIB] * 4),
                                      on_progress=refuse_past_100k)
    buffer = bytearray(1000)
    linked_client.read_range_into(video.hash, MIB, [buffer])
    assert buffer == video.data[MIB : MIB + 1000]
    assert link.connections() == 3  # no half-read answer's connection was reused


def test_bad_arguments_send_nothing() -> None:
    requests: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(500)

    with VidCacheClient("http://vidcache.test", transport=httpx.MockTransport(record)) as client:
        for hash_, offset, buffers in [
            ("ab" * 32, 0, [b"read-only"]),
            ("ab" * 32, 0, [bytearray()]),
            ("ab" * 32, 0, []),
            ("ab" * 32, -1, [bytearray(1)]),
            ("ab" * 32, True, [bytearray(1)]),
            ("AB" * 32, 0, [bytearray(1)]),
        ]:
            with pytest.raises(InvalidRequestError, match="no request sent"):
                client.read_range_into(hash_, offset, buffers)  # type: ignore[arg-type]
    assert requests == []


# -- servers vidcache is not: closed keep-alive connections, chunked framing, TLS ---------------

DATA = bytes(range(256)) * 4096  # 1 MiB
DATA_HASH = "ab" * 32


def read_request(connection: socket.socket, heads: list[bytes] | None = None
                 ) -> tuple[int, int] | None:
    """The asked range of the next request on `connection` (its head appended to `heads`);
    None once the client closed the connection."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = connection.recv(4096)
        if not piece:
            return None
        head += piece
    if heads is not None:
        heads.append(head)
    match = re.search(rb"(?i)\r\nrange: bytes=(\d+)-(\d+)\r\n", head)
    assert match is not None, head
    return int(match[1]), min(int(match[2]), len(DATA) - 1)


def answer(connection: socket.socket, asked: tuple[int, int], *, chunked: bool = False) -> None:
    start, end = asked
    body = DATA[start : end + 1]
    framing = (b"Transfer-Encoding: chunked\r\n" if chunked
               else b"Content-Length: %d\r\n" % len(body))
    connection.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\n%s\r\n"
                       % (start, end, len(DATA), framing))
    if chunked:
        for low in range(0, len(body), 10_000):
            piece = body[low : low + 10_000]
            connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        connection.sendall(b"0\r\n\r\n")
    else:
        connection.sendall(body)


def test_a_kept_alive_connection_the_server_dropped_is_replaced() -> None:
    """The server answers one request per connection and drops the connection when the next
    one arrives: the client sends that request again on a new connection."""
    asked: list[tuple[int, int]] = []

    def one_answer_per_connection(connection: socket.socket) -> None:
        request = read_request(connection)
        if request is not None:
            asked.append(request)
            answer(connection, request)
            dropped = read_request(connection)
            if dropped is not None:
                asked.append(dropped)

    with SocketServer(one_answer_per_connection) as server, \
            VidCacheClient(server.url, timeout=5) as client:
        for offset in (0, 1000, 2000):
            buffer = bytearray(500)
            assert client.read_range_into(DATA_HASH, offset, [buffer]) == 500
            assert buffer == DATA[offset : offset + 500]
        assert server.connections == 3
    assert asked == [(0, 499), (1000, 1499), (1000, 1499), (2000, 2499), (2000, 2499)]


def test_a_chunked_answer_is_read_through_httpx_from_then_on() -> None:
    asked: list[tuple[int, int]] = []

    def chunked(connection: socket.socket) -> None:
        while (request := read_request(connection)) is not None:
            asked.append(request)
            answer(connection, request, chunked=True)

    with SocketServer(chunked) as server, VidCacheClient(server.url, timeout=5) as client:
        for offset in (100, 300_000):
            buffers = buffers_of(70_000, 30_000)
            filled: list[int] = []
            assert client.read_range_into(DATA_HASH, offset, buffers,
                                          on_filled=filled.append) == 100_000
            assert b"".join(buffers) == DATA[offset : offset + 100_000]
            assert filled == [0, 1]
    # asked once on a socket of its own, once through httpx; then through httpx only
    assert asked == [(100, 100_099), (100, 100_099), (300_000, 399_999)]


def test_a_content_length_of_non_ascii_digits_is_a_protocol_error() -> None:
    """The head is decoded as latin-1, where '\u00b2' passes str.isdigit() and int() refuses
    it: was a bare ValueError out of the read."""
    def superscript(connection: socket.socket) -> None:
        while (request := read_request(connection)) is not None:
            start, _ = request
            connection.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: \xb2\r\n"
                               b"Content-Range: bytes %d-%d/%d\r\n\r\n%s"
                               % (start, start + 1, len(DATA), DATA[start : start + 2]))

    with SocketServer(superscript) as server, \
            VidCacheClient(server.url, timeout=5) as client:
        buffer = bytearray(2)
        with pytest.raises(VidCacheError, match="malformed Content-Length"):
            client.read_range_into(DATA_HASH, 0, [buffer])
        assert buffer == bytearray(2)


def test_a_content_encoded_range_is_never_data() -> None:
    """A server (or a proxy in between) that gzips whatever Accept-Encoding says answers a
    range with bytes of the gzip stream: they were written into the buffers as the video's."""
    encoded = gzip.compress(DATA)

    def gzipping(connection: socket.socket) -> None:
        while (request := read_request(connection)) is not None:
            start, end = request
            body = encoded[start : end + 1]
            connection.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Encoding: gzip\r\n"
                               b"Content-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n\r\n%s"
                               % (start, start + len(body) - 1, len(encoded), len(body), body))

    with SocketServer(gzipping) as server, VidCacheClient(server.url, timeout=5) as client:
        buffer = bytearray(100)
        filled: list[int] = []
        with pytest.raises(RangeError, match="Content-Encoding 'gzip'"):
            client.read_range_into(DATA_HASH, 0, [buffer], on_filled=filled.append)
        assert buffer == bytearray(100) and filled == []
        with pytest.raises(RangeError, match="Content-Encoding 'gzip'"):  # through httpx
            client.get_bytes(DATA_HASH, (1000, 1099))


def test_the_request_keeps_the_base_urls_path_and_sends_the_clients_headers() -> None:
    heads: list[bytes] = []

    def serve(connection: socket.socket) -> None:
        while (request := read_request(connection, heads)) is not None:
            answer(connection, request)

    with SocketServer(serve) as server, \
            VidCacheClient(f"{server.url}/cache%20one/", timeout=5, token="s3cret") as client:
        assert client.read_range_into(DATA_HASH, 7, [bytearray(3)]) == 3
    port = server.url.rsplit(":", 1)[1]
    assert heads[0].split(b"\r\n")[0] == (
        f"GET /cache%20one/video/{DATA_HASH} HTTP/1.1".encode())
    assert {line.lower() for line in heads[0].split(b"\r\n")[1:] if line} == {
        f"host: 127.0.0.1:{port}".encode(), b"user-agent: vidcache-client",
        b"authorization: bearer s3cret", b"accept-encoding: identity", b"range: bytes=7-9"}



def test_credentials_in_the_base_url_are_sent_as_basic_auth_and_never_shown() -> None:
    """`http://user:password@host/` (a reverse proxy asking for HTTP Basic auth in front of the
    service): sent by the client's own sockets and by httpx alike, percent-decoded as httpx
    reads them, and left out of base_url; were sent by neither (the proxy's 401 every time)."""
    heads: list[bytes] = []

    def serve(connection: socket.socket) -> None:
        while (request := read_request(connection, heads)) is not None:
            answer(connection, request)

    with SocketServer(serve) as server:
        url = server.url.replace("http://", "http://us%40er:p%3Ass@")
        with VidCacheClient(url, timeout=5) as client:
            assert client.read_range_into(DATA_HASH, 7, [bytearray(3)]) == 3  # own sockets
            assert client.get_bytes(DATA_HASH, (7, 9)) == DATA[7:10]  # httpx
            assert client.base_url == server.url and "p%3Ass" not in repr(client)
        with pytest.raises(ValueError, match="user:password@ and token"):
            VidCacheClient(url, token="s3cret")
    basic = b"authorization: basic " + base64.b64encode(b"us@er:p:ss").lower()
    assert len(heads) == 2
    for head in heads:
        assert basic in {line.lower() for line in head.split(b"\r\n")}, head

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def test_https_goes_through_the_clients_tls_context(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    def serve(connection: socket.socket) -> None:
        while (request := read_request(connection)) is not None:
            answer(connection, request)

    with SocketServer(serve, tls=tls) as server:
        with VidCacheClient(server.url, timeout=5) as untrusting, \
                pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.read_range_into(DATA_HASH, 0, [bytearray(10)])
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx's context trusts it then
        with VidCacheClient(server.url, timeout=5) as trusting:
            buffers = buffers_of(200_000, 200_000)
            assert trusting.read_range_into(DATA_HASH, 4321, buffers) == 400_000
            assert b"".join(buffers) == DATA[4321 : 404_321]


# -- the httpx path -----------------------------------------------------------------------------


class Pieces(httpx.SyncByteStream):
    """A body sent in pieces of odd sizes, as a network would."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        for low in range(0, len(self.body), 7777):
            yield self.body[low : low + 7777]


def serve_data(request: httpx.Request) -> httpx.Response:
    match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers["Range"])
    assert match is not None
    start, end = int(match[1]), min(int(match[2]), len(DATA) - 1)
    return httpx.Response(206, stream=Pieces(DATA[start : end + 1]), headers={
        "Content-Range": f"bytes {start}-{end}/{len(DATA)}",
        "Content-Length": str(end - start + 1)})


def test_with_a_custom_transport_the_read_goes_through_httpx_alike() -> None:
    transport = httpx.MockTransport(serve_data)
    with VidCacheClient("http://vidcache.test", transport=transport) as client:
        buffers = buffers_of(10_000, 1, 50_000)
        filled: list[int] = []
        progress: list[int] = []
        assert client.read_range_into(DATA_HASH, 99, buffers, on_filled=filled.append,
                                      on_progress=progress.append) == 60_001
        assert b"".join(buffers) == DATA[99 : 60_100]
        assert filled == [0, 1, 2] and progress[-1] == 60_001
        past_end = buffers_of(1000, 1000)
        filled.clear()
        assert client.read_range_into(DATA_HASH, len(DATA) - 300, past_end,
                                      on_filled=filled.append) == 300
        assert past_end[0][:300] == DATA[-300:] and filled == [0]


@pytest.mark.parametrize(("environment", "proxied"), [
    ({}, False),
    ({"HTTP_PROXY": "http://proxy.test:3128"}, True),
    ({"ALL_PROXY": "http://proxy.test:3128"}, True),
    ({"HTTPS_PROXY": "http://proxy.test:3128"}, False),  # not for http:// URLs
    ({"HTTP_PROXY": "http://proxy.test:3128", "NO_PROXY": "*"}, False),
    ({"HTTP_PROXY": "http://proxy.test:3128", "NO_PROXY": "example.com,vidcache.test"}, False),
    ({"HTTP_PROXY": "http://proxy.test:3128", "NO_PROXY": ".test"}, False),
    ({"HTTP_PROXY": "http://proxy.test:3128", "NO_PROXY": "cache.test"}, True),
])
def test_a_proxy_from_the_environment_is_left_to_httpx(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], proxied: bool,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert proxied_by_environment(httpx.URL("http://vidcache.test:8020")) is proxied


def _aborted_while_it_waits(
    call: Callable[[VidCacheClient], object], reply: Callable[[socket.socket], None],
) -> tuple[VidCacheClient, BaseException | object]:
    """What `call` ended with when the client was aborted as it waited for a server that has
    received its request and sent the start of a `reply` (part of it, or nothing), stalling
    from then on."""
    asked, release = threading.Event(), threading.Event()

    def stall(connection: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:  # any request: a small GET asks no range
            piece = connection.recv(4096)
            if not piece:
                return
            head += piece
        asked.set()
        reply(connection)
        release.wait(30)  # the rest never comes while the test runs

    outcome: list[BaseException | object] = []

    def ask(client: VidCacheClient) -> None:
        try:
            outcome.append(call(client))
        except BaseException as exc:
            outcome.append(exc)

    with SocketServer(stall) as server, VidCacheClient(server.url, timeout=30) as client:
        asker = threading.Thread(target=ask, args=(client,), daemon=True)
        asker.start()
        assert asked.wait(10), "the request never reached the server"
        client.abort()
        asker.join(10)  # far less than the client's 30 s timeout
        release.set()
        assert not asker.is_alive(), "abort() left the call waiting"
    assert len(outcome) == 1, outcome
    return client, outcome[0]


def test_abort_cuts_a_read_waiting_for_a_stalled_answer_at_once() -> None:
    def part_of_the_range(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 500\r\n"
                           b"Content-Range: bytes 0-499/1048576\r\n\r\n" + DATA[:100])

    client, outcome = _aborted_while_it_waits(
        lambda client: client.read_range_into(DATA_HASH, 0, [bytearray(500)]),
        part_of_the_range)
    assert isinstance(outcome, TransportError), outcome
    with pytest.raises(RuntimeError, match="closed"):
        client.read_range_into(DATA_HASH, 0, [bytearray(10)])


SMALL_GETS: dict[str, Callable[[VidCacheClient], object]] = {
    "get_meta": lambda client: client.get_meta(DATA_HASH),
    "list_videos_page": lambda client: client.list_videos_page(),
    "open_video_into": lambda client: client.open_video_into(DATA_HASH, [bytearray(10)],
                                                             on_meta=lambda meta: None),
}


@pytest.mark.parametrize("call", SMALL_GETS.values(), ids=SMALL_GETS.keys())
def test_abort_cuts_a_small_get_waiting_for_a_stalled_answer_at_once(
    call: Callable[[VidCacheClient], object],
) -> None:
    """docs/client.md: abort() cuts the small GETs on the client's own sockets too."""
    _, outcome = _aborted_while_it_waits(call, lambda connection: None)
    assert isinstance(outcome, TransportError), outcome
