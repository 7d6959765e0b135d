"""VidCacheClient.open_video_into: a video's metadata, digests and first bytes pipelined on one
connection; and the small GETs that share the range sockets.

Against the real service through the benchmark's proxy (its log tells which connection carried
each request); against tiny socket servers for what vidcache never does (close the connection
after an answer, drop a kept-alive one, chunked framing); through httpx with a custom
transport for the one-after-another fallback.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.client_rangeconn_support import SocketServer, StoredVideo, ingest_big
from tests.support import VidcacheServer, wait_until
from tests.vcfs_fault_support import FaultyLink, link_fixture
from vidcache_client import NotFoundError, RequestTimeout, TransportError, VidCacheClient

KIB = 1024
MIB = 1024 * KIB
PAGE = (0, 4 * MIB)  # the digest page asked for with the first bytes


@pytest.fixture(scope="module")
def video(vidcache_server: VidcacheServer, videos: dict[str, Path], media_url: str) -> StoredVideo:
    return ingest_big(vidcache_server.url, videos, media_url, "open-video")


link = link_fixture("module")


class Answers:
    """What `open_video_into` handed to its callbacks, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def meta(self, doc: dict[str, Any] | None) -> None:
        self.calls.append(("meta", doc))

    def digests(self, doc: dict[str, Any] | None) -> None:
        self.calls.append(("digests", doc))

    def progress(self, received: int) -> None:
        if not self.calls or self.calls[-1][0] != "bytes":
            self.calls.append(("bytes", None))  # the first receive of the bytes


def open_video(client: VidCacheClient, content_hash: str, size: int,
               answers: Answers) -> tuple[int, bytearray]:
    buffer = bytearray(size)
    received = client.open_video_into(content_hash, [buffer], on_meta=answers.meta,
                                      digests=PAGE, on_digests=answers.digests,
                                      on_progress=answers.progress)
    return received, buffer


def test_meta_digests_and_bytes_come_in_order_on_the_warm_connection(
    link: FaultyLink, video: StoredVideo,
) -> None:
    link.reset()
    with VidCacheClient(link.url, timeout=5) as client:
        client.health()  # leaves a warm connection, as a mount's start-up check does
        answers = Answers()
        received, buffer = open_video(client, video.hash, MIB, answers)
        assert received == MIB and buffer == video.data[:MIB]
        assert [kind for kind, _ in answers.calls] == ["meta", "digests", "bytes"]
        assert answers.calls[0][1] == client.get_meta(video.hash)
        assert answers.calls[1][1] == client.get_chunk_digests(video.hash, start=PAGE[0],
                                                               end=PAGE[1])
        log = link.range_connections()
    assert [conn for conn, _ in log[:4]] == [log[0][0]] * 4  # health, meta, digests, bytes
    assert log[3][1] == f"bytes=0-{MIB - 1}"


def test_taking_the_last_idle_connection_opens_a_spare(
    link: FaultyLink, video: StoredVideo,
) -> None:
    """The kernel reads ahead while a player reads the first bytes: the next range of the
    video finds a connection ready instead of paying a handshake."""
    link.reset()
    with VidCacheClient(link.url, timeout=5, spare_connection=True) as client:
        client.health()
        assert link.connections() == 1  # a small GET opens no spare
        open_video(client, video.hash, 100 * KIB, Answers())
        wait_until(lambda: link.connections() == 2, timeout=10, what="the spare connection")


def test_an_unknown_hash_reports_no_metadata_and_raises(
    link: FaultyLink, video: StoredVideo,
) -> None:
    link.reset()
    with VidCacheClient(link.url, timeout=5) as client:
        answers = Answers()
        with pytest.raises(NotFoundError):
            open_video(client, "0" * 64, 1000, answers)
        assert answers.calls == [("meta", None)]
        # on the same connection: the answers queued behind the 404 were read and dropped
        received, buffer = open_video(client, video.hash, 1000, Answers())
        assert received == 1000 and buffer == video.data[:1000]
    assert link.connections() == 1


def test_a_callback_error_ends_the_call_and_its_connection(link: FaultyLink,
                                                          video: StoredVideo) -> None:
    class Refused(Exception):
        pass

    def refuse(doc: dict[str, Any] | None) -> None:
        raise Refused

    link.reset()
    with VidCacheClient(link.url, timeout=5) as client:
        with pytest.raises(Refused):
            client.open_video_into(video.hash, [bytearray(1000)], on_meta=lambda doc: None,
                                   digests=PAGE, on_digests=refuse)
        assert client.get_meta(video.hash) is not None
    assert link.connections() == 2  # the one with unread answers was not reused


def test_through_httpx_the_requests_go_one_after_another_alike(
    vidcache_server: VidcacheServer, video: StoredVideo,
) -> None:
    with VidCacheClient(vidcache_server.url, timeout=5) as sockets, \
            VidCacheClient(vidcache_server.url, timeout=5,
                           transport=httpx.HTTPTransport()) as plain:
        expected, through_sockets = Answers(), Answers()
        assert open_video(sockets, video.hash, 300 * KIB, through_sockets)[1] \
            == video.data[: 300 * KIB]
        assert open_video(plain, video.hash, 300 * KIB, expected)[1] == video.data[: 300 * KIB]
        assert expected.calls == through_sockets.calls
        refusals = []
        for client in (sockets, plain):
            unknown = Answers()
            with pytest.raises(NotFoundError) as refused:
                open_video(client, "0" * 64, 1000, unknown)
            assert unknown.calls == [("meta", None)]
            refusals.append(refused.value)
        # the same error: the server's detail and the request named, as by get_bytes
        assert [(str(error), error.detail, error.json_detail) for error in refusals] \
            == [(str(refusals[0]), refusals[0].detail, True)] * 2
        assert f"[GET {vidcache_server.url}/meta/{'0' * 64}]" in str(refusals[1])


# -- servers vidcache is not ------------------------------------------------------------------

HASH = "ab" * 32
DATA = bytes(range(256)) * 16
META = b'{"hash": "%s", "size_bytes": %d}' % (HASH.encode(), len(DATA))
DIGESTS = b'{"hash": "%s", "chunk_size": 4096, "first_chunk": 0, "chunk_count": 1, ' \
          b'"digests": ["%s"]}' % (HASH.encode(), b"cd" * 32)


def read_requests(connection: socket.socket, count: int, requests: list[str]) -> list[str]:
    """The request lines of the next `count` requests (pipelined ones may come in one piece)."""
    data = b""
    while data.count(b"\r\n\r\n") < count:
        piece = connection.recv(65536)
        if not piece:
            break
        data += piece
    lines = [head.split(b"\r\n")[0].decode() for head in data.split(b"\r\n\r\n") if head]
    requests.extend(lines)
    return lines


def reply(connection: socket.socket, line: str, *, close: bool = False,
          framing: str = "length") -> None:
    """`framing`: the body's length is in Content-Length, or it comes in chunks, or it ends
    where the server closes the connection (no length)."""
    target = line.split()[1]
    status, body = b"200 OK", META
    if "/chunks" in target:
        body = DIGESTS
    elif target.startswith(f"/video/{HASH}"):
        status, body = b"206 Partial Content", DATA
    headers = b"Connection: close\r\n" if close else b""
    if status.startswith(b"206"):
        headers += b"Content-Range: bytes 0-%d/%d\r\n" % (len(DATA) - 1, len(DATA))
    if framing == "chunked":
        connection.sendall(b"HTTP/1.1 %s\r\n%sTransfer-Encoding: chunked\r\n\r\n"
                           b"%x\r\n%s\r\n0\r\n\r\n" % (status, headers, len(body), body))
    elif framing == "close":
        connection.sendall(b"HTTP/1.1 %s\r\n%sConnection: close\r\n\r\n%s"
                           % (status, headers, body))
        connection.shutdown(socket.SHUT_WR)
    else:
        connection.sendall(b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s"
                           % (status, headers, len(body), body))


def test_a_server_closing_after_the_metadata_gets_the_rest_asked_again() -> None:
    requests: list[str] = []

    def close_after_first(connection: socket.socket) -> None:
        if lines := read_requests(connection, 1, requests):
            reply(connection, lines[0], close=True)

    with SocketServer(close_after_first) as server, \
            VidCacheClient(server.url, timeout=5) as client:
        answers = Answers()
        assert open_video(client, HASH, len(DATA), answers) == (len(DATA), bytearray(DATA))
        assert [kind for kind, _ in answers.calls] == ["meta", "digests", "bytes"]
    paths = [line.split()[1] for line in requests]
    assert paths[0] == f"/meta/{HASH}" and paths[-2:] == [
        f"/video/{HASH}/chunks?start=0&end={PAGE[1]}", f"/video/{HASH}"]
    assert server.connections == 3  # the two unanswered requests, each asked again


def test_a_server_closing_before_the_range_gets_the_range_asked_again_alone() -> None:
    """The metadata and digests were taken: only the range is asked for again, each answer is
    handed over once, and the client's connection count stays right."""
    requests: list[str] = []
    batches: list[int] = []

    def close_before_the_range(connection: socket.socket) -> None:
        lines = read_requests(connection, 1, requests)
        if lines and lines[0].split()[1] == f"/video/{HASH}":  # a lone range, asked again
            reply(connection, lines[0])
            return
        lines += read_requests(connection, 3 - len(lines), requests)
        batches.append(1)
        if len(batches) > 2:  # a client sending the three again and again: end it
            return
        for line in lines[:2]:
            reply(connection, line)

    with SocketServer(close_before_the_range) as server, \
            VidCacheClient(server.url, timeout=5, max_connections=1) as client:
        answers = Answers()
        assert open_video(client, HASH, len(DATA), answers)[1] == DATA
        assert [kind for kind, _ in answers.calls] == ["meta", "digests", "bytes"]
        assert client._budget.count == 1  # the range's connection, kept alive
    paths = [line.split()[1] for line in requests]
    assert paths.count(f"/meta/{HASH}") == 1 and paths[-2:] == [f"/video/{HASH}"] * 2
    assert server.connections == 2


def test_a_dropped_warm_connection_gets_all_three_sent_again() -> None:
    requests: list[str] = []

    def one_answer_per_connection(connection: socket.socket) -> None:
        lines = read_requests(connection, 1, requests)
        if len(lines) == 1:  # a lone health check: answered, then the connection dropped
            reply(connection, lines[0])
            read_requests(connection, 1, requests)
            return
        for line in lines:
            reply(connection, line)

    with SocketServer(one_answer_per_connection) as server, \
            VidCacheClient(server.url, timeout=5) as client:
        client.get_meta(HASH)
        answers = Answers()
        assert open_video(client, HASH, len(DATA), answers)[1] == DATA
        assert [kind for kind, _ in answers.calls] == ["meta", "digests", "bytes"]
    assert server.connections == 2


def test_a_small_answer_without_length_is_read_through_httpx_from_then_on() -> None:
    requests: list[str] = []

    def unframed(connection: socket.socket) -> None:
        if lines := read_requests(connection, 1, requests):
            reply(connection, lines[0], framing="close")

    with SocketServer(unframed) as server, VidCacheClient(server.url, timeout=5) as client:
        for _ in range(2):
            meta = client.get_meta(HASH)
            assert meta is not None and meta["size_bytes"] == len(DATA)
    # asked once on a socket of its own, once through httpx; then through httpx only
    assert [line.split()[1] for line in requests] == [f"/meta/{HASH}"] * 3


def test_chunked_small_answers_are_read_on_the_clients_connection() -> None:
    """Small answers in chunks (a reverse proxy's gzip of them, as nginx's `gzip on` sends):
    read whole on the client's own connection, so a lookup's three requests still go out
    pipelined on one connection, the bytes behind them too."""
    requests: list[str] = []

    def chunked(connection: socket.socket) -> None:
        while lines := read_requests(connection, 1, requests):
            for line in lines:
                reply(connection, line, framing="chunked" if "/meta" in line or
                      "/chunks" in line else "length")

    with SocketServer(chunked) as server, VidCacheClient(server.url, timeout=5) as client:
        meta = client.get_meta(HASH)
        assert meta is not None and meta["size_bytes"] == len(DATA)
        answers = Answers()
        assert open_video(client, HASH, len(DATA), answers) == (len(DATA), bytearray(DATA))
        assert [kind for kind, _ in answers.calls] == ["meta", "digests", "bytes"]
    assert [line.split()[1].split("?")[0] for line in requests] == [
        f"/meta/{HASH}", f"/meta/{HASH}", f"/video/{HASH}/chunks", f"/video/{HASH}"]
    assert server.connections == 1


def _trickle(connection: socket.socket, data: bytes, outcome: list[str]) -> None:
    """Send `data` a byte every 50 ms, each in a receive's time; `outcome` says whether the
    client closed the connection under it or let it all come."""
    paced = threading.Event()  # never set: waiting on it paces the bytes
    try:
        for byte in data:
            paced.wait(0.05)
            connection.sendall(bytes([byte]))
    except OSError:
        outcome.append("closed by the client")
    else:
        outcome.append("all sent")


def test_a_small_answer_trickling_in_through_httpx_is_given_up_after_the_timeout() -> None:
    """Once an answer without length has put the small GETs on httpx, one whose body trickles in
    (a byte every 50 ms, 5 s in all, each receive in time) ends with RequestTimeout after the
    client's timeout, its connection closed, as over the client's own sockets; before, httpx
    read it to its end."""
    requests: list[str] = []
    outcome: list[str] = []

    def unframed_then_trickle(connection: socket.socket) -> None:
        while lines := read_requests(connection, 1, requests):
            if len(requests) <= 2:  # the first lookup: on the client's socket, then httpx
                reply(connection, lines[0], framing="close")
                return
            connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            _trickle(connection, b"%x\r\n%s\r\n0\r\n\r\n" % (len(META), META), outcome)
            return

    with SocketServer(unframed_then_trickle) as server, \
            VidCacheClient(server.url, timeout=1) as client:
        assert client.get_meta(HASH) is not None
        with pytest.raises(RequestTimeout, match=f"metadata of video {HASH}: timed out"):
            client.get_meta(HASH)
        wait_until(lambda: outcome, timeout=30, what="the trickle's end")
    assert outcome == ["closed by the client"]


def test_answers_trickling_in_behind_a_refusal_are_given_up_after_the_timeout() -> None:
    """The answers owed behind a 404 are skipped within the client's timeout as a whole, not
    per receive: a server sending them a byte every 50 ms (10 s in all) has the connection
    closed under it, and the caller has its NotFoundError."""
    refusal = b"HTTP/1.1 404 Not Found\r\nContent-Length: 22\r\n\r\n" \
              b'{"detail": "no video"}'
    outcome: list[str] = []

    def refuse_then_trickle(connection: socket.socket) -> None:
        if len(read_requests(connection, 3, [])) < 3:
            return
        connection.sendall(refusal)
        _trickle(connection, refusal * 2, outcome)  # the digests' and the range's

    with SocketServer(refuse_then_trickle) as server, \
            VidCacheClient(server.url, timeout=1) as client:
        answers = Answers()
        with pytest.raises(NotFoundError, match="HTTP 404 Not Found: no video"):
            open_video(client, HASH, 1000, answers)
        assert answers.calls == [("meta", None)]
        wait_until(lambda: outcome, timeout=30, what="the trickle's end")
    assert outcome == ["closed by the client"]


@pytest.mark.parametrize(("body", "outcome"), [
    (b"3;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n"
     % (META[:3], len(META) - 3, META[3:]), "read"),
    (b"zz\r\n%s\r\n0\r\n\r\n" % META, "malformed"),
    (b"%x\r\n%sXX0\r\n\r\n" % (len(META), META), "malformed"),
    (b"1;" + b"x" * (200 * 1024), "endless"),  # no line end: was read until the timeout
], ids=["chunks-extension-trailer", "bad-size", "bad-end", "endless-size-line"])
def test_a_chunked_small_answer_is_checked(body: bytes, outcome: str) -> None:
    def chunked(connection: socket.socket) -> None:
        while read_requests(connection, 1, []):
            connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)

    with SocketServer(chunked) as server, VidCacheClient(server.url, timeout=5) as client:
        if outcome == "read":
            for _ in range(2):  # the connection is kept, in step
                meta = client.get_meta(HASH)
                assert meta is not None and meta["size_bytes"] == len(DATA)
            assert server.connections == 1
        else:
            with pytest.raises(TransportError, match=f"{outcome} chunk"):
                client.get_meta(HASH)
