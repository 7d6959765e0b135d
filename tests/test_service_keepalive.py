"""Client connections, checked on raw sockets against real servers: the service keeps an idle
one open `--keep-alive` seconds (75 by default, where uvicorn's own default closes it after
5), so a player that paused seeks over the connection it has; a client that leaves with
pipelined requests unanswered is not an error in the service's log; and a request refused
before it reaches the application (malformed, or without exactly one Host) is answered in
its turn."""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_support import Api, blob_files, read_until_closed, store_many
from tests.support import VidcacheServer, open_descriptors, wait_until

UVICORN_DEFAULT = 5.0  # seconds: what the service would keep a connection without the option


def health_over(sock: socket.socket) -> bytes:
    """One keep-alive `GET /health` on `sock`; the response head and body."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: vidcache\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        piece = sock.recv(65536)
        assert piece, f"connection closed mid-answer: {answer!r}"
        answer += piece
    return answer


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (readable, and at EOF)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""


@pytest.fixture
def connected(vidcache_server: VidcacheServer) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", vidcache_server.port), timeout=10) as sock:
        yield sock


def test_an_idle_connection_outlives_uvicorns_default(connected: socket.socket) -> None:
    assert health_over(connected).startswith(b"HTTP/1.1 200")
    # Time passing is what is tested: longer idle than uvicorn's default keep-alive.
    time.sleep(UVICORN_DEFAULT + 1.5)
    assert not closed_by_server(connected)
    assert health_over(connected).startswith(b"HTTP/1.1 200")


def test_the_keep_alive_option_sets_how_long(tmp_path: Path) -> None:
    with VidcacheServer(tmp_path / "data", "--keep-alive", "1") as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert health_over(sock).startswith(b"HTTP/1.1 200")
        # closed by its own setting, well before uvicorn's default would
        wait_until(lambda: closed_by_server(sock), timeout=UVICORN_DEFAULT - 1,
                   what="the server closing the idle connection")


def _pipeline_then_leave(port: int, requests: list[bytes], *, read_first: bool) -> None:
    """Send `requests` at once on a new connection, then close it: right away, or once the
    first answer's head is in (vidcache_client leaves so after a `/meta` 404)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(requests))
        answer = b""
        while read_first and b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            assert piece, "closed before the first answer"
            answer += piece


def test_a_client_leaving_with_pipelined_requests_is_not_an_error(
        tmp_path: Path, media_url: str) -> None:
    """uvicorn marked only the newest request of a connection as disconnected; the one being
    answered when the client left wrote to the closed socket and was logged as "Exception in
    ASGI application" with a traceback, for about half of vcfs's lookups of an unknown hash
    (`/meta`, `/chunks` and the first range pipelined; the client leaves on the 404)."""
    unknown = "ab" * 32
    lookup = [f"GET /meta/{unknown} HTTP/1.1\r\nHost: v\r\n\r\n".encode(),
              f"GET /video/{unknown}/chunks?start=0 HTTP/1.1\r\nHost: v\r\n\r\n".encode(),
              f"GET /video/{unknown} HTTP/1.1\r\nHost: v\r\nRange: bytes=0-1048575\r\n"
              "\r\n".encode()]
    with VidcacheServer(tmp_path / "data") as server:
        api = Api(server.url)
        stored = api.ingest_ok(f"{media_url}/big.mp4", "pipelined")["hash"]
        api.close()
        # several 4 MiB answers of the hot path, the second one cut off by the client leaving
        ranges = [f"GET /video/{stored} HTTP/1.1\r\nHost: v\r\nRange: bytes={start}-"
                  f"{start + 4 * 1024 * 1024 - 1}\r\n\r\n".encode()
                  for start in range(0, 12 * 1024 * 1024, 4 * 1024 * 1024)]
        for _ in range(20):
            _pipeline_then_leave(server.port, lookup, read_first=True)
            _pipeline_then_leave(server.port, lookup, read_first=False)
            _pipeline_then_leave(server.port, ranges, read_first=True)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            assert health_over(sock).startswith(b"HTTP/1.1 200")
    # stopped: every request it took has been handled (or cancelled) by now
    log = server.log()
    assert log.count(f"GET /meta/{unknown} HTTP/1.1\" 404") >= 20, log
    assert "ERROR" not in log and "Traceback" not in log, log


def test_a_malformed_request_is_refused_after_the_answers_to_those_before_it(
        connected: socket.socket) -> None:
    """uvicorn wrote its 400 for an unparseable request at once and closed the connection:
    the client read it as the answer to its first request, and the answers to the requests
    sent before the bad one never came (RFC 9112 9.3.2: answers go in the requests' order)."""
    unknown = "ab" * 32
    connected.sendall(b"GET /health HTTP/1.1\r\nHost: v\r\n\r\n"
                      + f"GET /meta/{unknown} HTTP/1.1\r\nHost: v\r\n\r\n".encode()
                      + b"GET /he alth HTTP/1.1\r\nHost: v\r\n\r\n"
                      + b"GET /health HTTP/1.1\r\nHost: v\r\n\r\n")
    answers = re.split(rb"(?=HTTP/1\.1 \d{3} )", read_until_closed(connected))[1:]
    assert [answer[:12] for answer in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 404",
                                                   b"HTTP/1.1 400"], answers
    head, _, body = answers[2].partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["detail"].startswith("malformed HTTP request")


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n", b"400"),
    (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n", b"400"),
    (b"GET /health HTTP/1.0\r\n\r\n", b"200"),  # HTTP/1.0 has no Host requirement
])
def test_an_http11_request_needs_exactly_one_host(connected: socket.socket, head: bytes,
                                                  status: bytes) -> None:
    """RFC 9112 3.2: 400 for an HTTP/1.1 request with no Host, or more than one (which of them
    a proxy in front routed by is anyone's guess); they were answered 200."""
    connected.sendall(head)
    answer = read_until_closed(connected)
    assert answer.startswith(b"HTTP/1.1 " + status), answer
    if status == b"400":
        assert "exactly one Host" in json.loads(answer.partition(b"\r\n\r\n")[2])["detail"]


@pytest.mark.parametrize(("head", "why"), [
    (b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
     "(400): an HTTP/1.1 request needs exactly one Host header field; this one has 0"),
    (b"GET /he alth HTTP/1.1\r\nHost: v\r\n\r\n", "(400): malformed HTTP request"),
], ids=["no-host", "malformed"])
def test_a_refused_request_is_one_log_line_naming_the_client_and_why(
        vidcache_server: VidcacheServer, head: bytes, why: str) -> None:
    """Was: no line at all for a request without Host, and uvicorn's `Invalid HTTP request
    received.` (neither who nor why) for one it cannot parse."""
    with socket.create_connection(("127.0.0.1", vidcache_server.port), timeout=10) as sock:
        host, port = sock.getsockname()
        client = f"{host}:{port}"
        sock.sendall(head)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400")
    line = f"WARNING uvicorn.error: refused a request from {client} {why}"
    wait_until(lambda: line in vidcache_server.log(), timeout=10, what=f"{line!r} logged")
    assert "Invalid HTTP request received." not in vidcache_server.log()


def _open_sockets(pid: int) -> int:
    """How many sockets the process `pid` has open."""
    return sum(target.startswith("socket:") for target in open_descriptors(pid))


def _closed_after_its_answers(sock: socket.socket) -> bool:
    """Whether the server has closed the connection, the answers it sent before read."""
    while select.select([sock], [], [], 0)[0]:
        if not sock.recv(65536):
            return True
    return False


def test_a_client_silent_before_its_request_is_done_is_let_go(tmp_path: Path) -> None:
    """A client gone without a word (switched off, its network cut) before its request was
    whole: the service kept its connection open for good, a descriptor and a protocol each,
    as it closes only one idle between requests (uvicorn arms its keep-alive only once an
    answer is sent). Now one that waits for the client is closed after `--keep-alive` of
    silence too: with nothing sent (vcfs's spare connections), a head begun, a body begun,
    or a next head begun after an answer."""
    silent = [b"", b"GET /health HTTP/1.1\r\nHost: v\r\n",
              b"POST /ingest HTTP/1.1\r\nHost: v\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"url\": ",
              b"GET /health HTTP/1.1\r\nHost: v\r\n\r\nGET /health HTTP/1.1\r\n"]
    with VidcacheServer(tmp_path / "data", "--keep-alive", "1") as server, \
            contextlib.ExitStack() as stack:
        assert server.process is not None
        pid = server.process.pid
        before = _open_sockets(pid)
        sockets = []
        for start in silent * 10:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port),
                                                                timeout=10))
            sock.sendall(start)
            sockets.append(sock)
        wait_until(lambda: all(_closed_after_its_answers(sock) for sock in sockets), timeout=20,
                   what="the server closing the connections of silent clients")
        wait_until(lambda: _open_sockets(pid) <= before, timeout=10,
                   what="the server's sockets back to those it had")


def test_an_answer_longer_than_the_keep_alive_is_not_cut(tmp_path: Path) -> None:
    """The keep-alive counts silence while the service waits for the client only: an answer
    that a slow reader takes longer than it to read goes on to its end."""
    data_dir = tmp_path / "data"
    [content_hash] = store_many(data_dir, 1)
    size = 64 << 20
    [blob] = blob_files(data_dir)
    blob.write_bytes(bytes(size))
    db = sqlite3.connect(data_dir / ".vidcache" / "index.sqlite3")
    with db:
        db.execute("UPDATE videos SET size_bytes = ?", (size,))
    db.close()
    with VidcacheServer(data_dir, "--keep-alive", "1") as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET /video/{content_hash} HTTP/1.1\r\nHost: v\r\n\r\n".encode())
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        # Time passing is what is tested: the answer waits on the reader past the keep-alive.
        time.sleep(3)
        received = len(answer.partition(b"\r\n\r\n")[2])
        while received < size:
            piece = sock.recv(1 << 20)
            assert piece, f"cut after {received} of {size} bytes"
            received += len(piece)
