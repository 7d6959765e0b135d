"""The loopback profile's proxy: the same counting proxy, with bodies moved by splice(2).

The asyncio proxy (bench/proxy.py) copies every byte twice through Python and turns its event
loop for every 256 KiB: ~1 CPU-s per GB relayed, a quarter to a third of this two-core
machine while a contender reads at full speed, taken from every contender alike. With no delay
and no bandwidth cap there is nothing to time, so this relay gives each connection two threads
and leaves the bytes in the kernel:

- the request thread follows the client's requests with the asyncio proxy's `RequestRouter`:
  each is counted and logged the same way, a hook may answer it (`answer`), the rest go on to
  the server;
- the response thread frames the server's answers (a head, then a body delimited by
  Content-Length, as `ResponseHeadHook` does), passes each head through `rewrite_head`, and
  moves each body from socket to socket through a pipe with splice(2), which passes page
  references instead of copying. A body it cannot delimit is spliced until the server closes.

Counters and the request log are the asyncio proxy's `TrafficCounters`. Fault injection needs
the asyncio proxy: this relay never delays, changes or cuts a body.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from bench.proxy import (
    MAX_HEADER_BYTES,
    Connection,
    ProxyConfig,
    Request,
    RequestRouter,
    TrafficCounters,
    body_length,
)

Answer = Callable[[Connection, Request], "bytes | None"]
HeadRewrite = Callable[[Connection, "Request | None", bytes], bytes]

_RECV_BYTES = 64 * 1024  # request streams and response heads are small
_PIPE_BYTES = 1 << 20  # one splice moves up to this much (the pipe is grown to hold it)
_SPLICE_FLAGS = os.SPLICE_F_MOVE  # not F_MORE: it would hold back the tail of each body


class _Eof(Exception):
    """The server closed its side."""


class SpliceRelay:
    """Start with `start()` (or `with`), read `snapshot()`, `reset_counters()`, `close()`."""

    def __init__(self, config: ProxyConfig, *, answer: Answer | None = None,
                 rewrite_head: HeadRewrite | None = None) -> None:
        if config.profile.shapes_traffic:
            raise ValueError(f"{config.profile.describe()}: the splice relay neither delays "
                             "nor caps; use bench.proxy.LatencyProxy")
        self.config = config
        self.port = 0
        self._answer: Answer = answer or (lambda conn, request: None)
        self._rewrite_head: HeadRewrite = rewrite_head or (lambda conn, request, head: head)
        self._lock = threading.Lock()  # counters, links
        self._counters = TrafficCounters()
        self._ids = itertools.count(1)
        self._links: set[_Link] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.listen_host}:{self.port}"

    def start(self) -> SpliceRelay:
        listener = socket.create_server((self.config.listen_host, self.config.listen_port))
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._acceptor.start()
        return self

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._counters.snapshot()

    def reset_counters(self) -> None:
        with self._lock:
            self._counters = TrafficCounters()

    def close(self) -> None:
        """Stop accepting and cut every connection (idempotent)."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=10)
        with self._lock:
            links = list(self._links)
        for link in links:
            link.abort()

    def __enter__(self) -> SpliceRelay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection((self.config.upstream_host,
                                                   self.config.upstream_port))
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._counters.connections += 1
                link = _Link(Connection(id=next(self._ids)), client, server, self._forget)
                self._links.add(link)
            for name, target in (("requests", self._requests), ("responses", self._responses)):
                threading.Thread(target=target, args=(link,), name=f"relay-{link.conn.id}-{name}",
                                 daemon=True).start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _count(self, conn: Connection, *, up: int = 0, down: int = 0,
               request: Request | None = None, answered: bool = False) -> None:
        with self._lock:
            counters = self._counters
            counters.bytes_up += up
            counters.bytes_down += down
            conn.bytes_down += down
            if request is not None:
                counters.record(conn, request, self.config.log_limit)
            counters.answered_by_hooks += answered

    def _requests(self, link: _Link) -> None:
        router = RequestRouter(link.conn, self._answer)
        try:
            while data := link.client.recv(_RECV_BYTES):
                for request, to_server, piece in router.route(data):
                    # Logged before it goes on, as the proxy does: its answer can reach the
                    # client (which may then read the log) before this thread runs again.
                    self._count(link.conn, request=request, answered=not to_server)
                    if to_server:
                        link.server.sendall(piece)
                        self._count(link.conn, up=len(piece))
                    else:
                        with link.client_lock:
                            link.client.sendall(piece)
                        self._count(link.conn, down=len(piece))
            link.server.shutdown(socket.SHUT_WR)
        except OSError:
            link.abort()
        finally:
            link.finished()

    def _responses(self, link: _Link) -> None:
        pipe = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        buffer = bytearray()
        responses = 0
        try:
            while True:
                end = self._read_head(link, buffer)
                if end < 0:  # not HTTP we can frame: pass everything on as it comes
                    with link.client_lock:
                        self._send(link, bytes(buffer))
                        self._splice(link, pipe, None)
                    break
                head = bytes(buffer[:end])
                del buffer[:end]
                request = link.conn.request_answered(responses)
                responses += 1
                length, undelimited = body_length(request, head)
                taken = len(buffer) if undelimited else min(length, len(buffer))
                with link.client_lock:
                    self._send(link, self._rewrite_head(link.conn, request, head)
                               + bytes(buffer[:taken]))
                    del buffer[:taken]
                    self._splice(link, pipe, None if undelimited else length - taken)
                if undelimited:
                    break
        except _Eof:
            pass
        except OSError:
            link.abort()
        finally:
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_WR)
            for fd in pipe:
                os.close(fd)
            link.finished()

    @staticmethod
    def _read_head(link: _Link, buffer: bytearray) -> int:
        """Receive until `buffer` holds a whole head; the index just past it, or -1 when no
        head ends within MAX_HEADER_BYTES. Raises _Eof when the server closes between
        responses (or mid-head)."""
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                return -1
            data = link.server.recv(_RECV_BYTES)
            if not data:
                raise _Eof
            buffer += data
        return end + 4

    def _send(self, link: _Link, data: bytes) -> None:
        link.client.sendall(data)
        self._count(link.conn, down=len(data))

    def _splice(self, link: _Link, pipe: tuple[int, int], length: int | None) -> None:
        """Move `length` bytes (None: until the server closes) from the server to the client
        through `pipe`; raises _Eof when the server closes first."""
        source, sink = link.server.fileno(), link.client.fileno()
        left = length
        while left is None or left > 0:
            moved = os.splice(source, pipe[1], _PIPE_BYTES if left is None else
                              min(left, _PIPE_BYTES), flags=_SPLICE_FLAGS)
            if moved == 0:
                raise _Eof
            pending = moved
            while pending:
                pending -= os.splice(pipe[0], sink, pending, flags=_SPLICE_FLAGS)
            self._count(link.conn, down=moved)
            if left is not None:
                left -= moved


class _Link:
    """One client connection and its upstream one; closed when both threads are done."""

    def __init__(self, conn: Connection, client: socket.socket, server: socket.socket,
                 forget: Callable[[_Link], None]) -> None:
        self.conn = conn
        self.client = client
        self.server = server
        self.client_lock = threading.Lock()  # one response (or hook answer) at a time
        self._forget = forget
        self._lock = threading.Lock()
        self._running = 2

    def abort(self) -> None:
        """Cut both connections: each thread's blocked call returns and the thread ends."""
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def finished(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.client.close()
            self.server.close()
            self._forget(self)
