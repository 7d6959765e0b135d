"""The downloads' sockets, which the shutdown can cut at any point.

An httpcore network backend for blocking clients, like httpcore's own, except that it makes each
socket itself and knows it before it connects: `stop` shuts down every socket still open, which
wakes the thread waiting on it wherever it waits (connecting, in the TLS handshake, for the
origin's first answer, for the next piece of the body), and refuses new connections. httpx
offers no hook between a socket's creation and its connect, which is why download.py talks to
httpcore directly.

`IdleClosingPool` holds httpcore's pool of kept-alive connections and closes them once no
download has used it for their keep-alive time: httpcore closes an expired connection only when
a request begins or a response ends, so after the last download of a burst its connections
stayed open (a descriptor here, a connection slot at each origin) until the next download,
however late. When no thread can be started for the timer (a limit on threads), the pool is
closed at once instead: the download that ended has its bytes, and the next one connects anew.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpcore

from vidcache_client._threads import LIMITS, started

log = logging.getLogger(__name__)


class StoppableBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Cut every connection open or being made, and refuse new ones."""
        with self._lock:
            self._stopped = True
            for sock in self._open:
                # socket.socket's own: SSLSocket.shutdown would also drop its TLS state under
                # the thread using it
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                    ) -> httpcore.NetworkStream:
        try:  # host is the address the HostGuard approved: no name to resolve
            family, kind, proto, _name, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = socket.socket(family, kind, proto)
        self._track(sock)
        try:
            if local_address is not None:
                sock.bind((local_address, 0))
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connect(sock, address, timeout)
        except TimeoutError as exc:
            self._close(sock)
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            self._close(sock)
            raise httpcore.ConnectError(str(exc)) from exc
        except BaseException:
            self._close(sock)
            raise
        return _Stream(self, sock)

    def _connect(self, sock: socket.socket, address: Any, timeout: float | None) -> None:
        """`sock.connect(address)`, begun before the stop is looked at again: a stop before
        then is seen here, one after shuts down a socket that is connecting, which wakes the
        wait (a socket not connecting yet ignores a shutdown, and its connect would go on)."""
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS):
            raise OSError(error, os.strerror(error))
        with self._lock:
            if self._stopped:
                raise httpcore.ConnectError("stopped: the server is shutting down")
        if error:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(None if timeout is None else timeout * 1000):
                raise TimeoutError("timed out connecting")
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
        sock.settimeout(timeout)

    def _track(self, sock: socket.socket, *, replacing: socket.socket | None = None) -> None:
        with self._lock:
            if replacing is not None:
                self._open.discard(replacing)
            if self._stopped:
                sock.close()
                raise httpcore.ConnectError("stopped: the server is shutting down")
            self._open.add(sock)

    def _close(self, sock: socket.socket) -> None:
        # forgotten before its descriptor is released, so `stop` never shuts down a number
        # the kernel has given to another file
        with self._lock:
            self._open.discard(sock)
        sock.close()


class _Stream(httpcore.NetworkStream):
    def __init__(self, backend: StoppableBackend, sock: socket.socket) -> None:
        self._backend = backend
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._backend._close(self._sock)

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        try:
            # the handshake comes after the swap, so that `stop` can cut it too
            tls = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname,
                                          do_handshake_on_connect=False)
            self._backend._track(tls, replacing=self._sock)
            self._sock = tls
            tls.settimeout(timeout)
            tls.do_handshake()
        except TimeoutError as exc:
            self.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:  # ssl.SSLError among them
            self.close()
            raise httpcore.ConnectError(str(exc)) from exc
        except BaseException:
            self.close()
            raise
        return self

    def get_extra_info(self, info: str) -> object:
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return self._sock  # asked for its selected_alpn_protocol()
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":  # an idle kept-alive connection the origin has closed
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return bool(poller.poll(0))
        return None


class IdleClosingPool:
    """A connection pool made by `make`, lent to the downloads under way (`lend`); once none has
    used it for `keepalive` seconds, it is closed, connections and all, and a fresh one made.
    While downloads go on, httpcore itself closes the connections past their keep-alive at
    each request and answer. Either way a connection is reused by downloads that come within
    `keepalive` of each other."""

    def __init__(self, make: Callable[[], httpcore.ConnectionPool], keepalive: float) -> None:
        self._make = make
        self._keepalive = keepalive
        self._lock = threading.Lock()
        self._pool = make()
        self._users = 0
        self._idle_timer: threading.Timer | None = None
        self._timer_refused = False  # since the last timer started: logged once
        self._closed = False

    @contextlib.contextmanager
    def lend(self) -> Iterator[httpcore.ConnectionPool]:
        with self._lock:
            self._users += 1
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            pool = self._pool
        try:
            yield pool
        finally:
            idle = None
            with self._lock:
                self._users -= 1
                if self._users == 0 and not self._closed:
                    idle = self._start_idle_timer()
            if idle is not None:
                idle.close()

    def _start_idle_timer(self) -> httpcore.ConnectionPool | None:
        """With the lock held and no download using the pool: start the timer that closes it
        once idle, and return None; if no thread can be started for the timer, put a fresh pool
        in its place and return it, for the caller to close now."""
        timer = threading.Timer(self._keepalive, self._close_idle)
        timer.daemon = True  # the exit never waits for it
        if not started(timer):
            if not self._timer_refused:
                log.warning("no thread could be started to close idle origin connections after "
                            "%g s (%s): closing them at once, until a thread can be started",
                            self._keepalive, LIMITS)
                self._timer_refused = True
            idle, self._pool = self._pool, self._make()
            return idle
        self._idle_timer = timer
        self._timer_refused = False
        return None

    def _close_idle(self) -> None:
        with self._lock:
            # a download since this timer was set (which cancels it or sets another) keeps
            # the pool: its connections have been idle for less than their keep-alive
            if self._idle_timer is not threading.current_thread():
                return
            self._idle_timer = None
            idle, self._pool = self._pool, self._make()
        idle.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        self._pool.close()
