"""The service keeps an idle client connection open `--keep-alive` seconds (75 by default,
where uvicorn's own default closes it after 5): a player that paused seeks over the
connection it has. Checked on raw sockets against real servers."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import VidcacheServer, wait_until

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
