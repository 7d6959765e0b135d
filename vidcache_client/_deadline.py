"""A deadline for a whole answer read through httpx, as `_rangeconn` has one for its own.

httpx bounds each receive by the client's timeout, never an answer: a server trickling a byte
now and then, each in time, holds the calling thread for as long as it likes. So the sockets
httpx makes for the client go through a network backend (httpcore's own, wrapped) whose every
receive ends by the calling thread's deadline, if one is set (`within`), as `_rangeconn`'s do;
one past it raises httpcore.ReadTimeout, which httpx turns into httpx.ReadTimeout and
`_translate.transport_errors` into RequestTimeout, like any other timeout. The connection it
happened on is closed by httpcore (its answer was not read to its end), never reused.

Not a watchdog closing the connection from another thread at the deadline: a close does not
wake a receive already waiting (a shutdown would, but httpx shows no socket before the answer's
head), and over TLS that receive could then read from a descriptor the kernel has given to
another connection meanwhile.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

_local = threading.local()  # .deadline: time.monotonic() by which receives end, or None


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Every receive this thread makes in the block, on sockets of a client passed through
    `with_deadlines`, ends `seconds` from now at the latest."""
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = None


def with_deadlines(client: httpx.Client) -> httpx.Client:
    """`client`, its connections (direct, or through a proxy from the environment) made by the
    backend below. httpx has no option for a network backend: it is set on the connection pool
    of each transport httpx made for `client`, before any connection exists. Only for a client
    made without a `transport` of the caller's (that one is theirs to leave alone). Private
    attributes (httpx 0.27-0.28, httpcore 1.x): where a later httpx lays them out otherwise,
    the client is left as httpx made it (each receive bounded, not the answer), never broken."""
    transports = [getattr(client, "_transport", None),
                  *getattr(client, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if isinstance(transport, httpx.HTTPTransport) and isinstance(pool, httpcore.ConnectionPool):
            pool._network_backend = _BACKEND
    return client


class _Backend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                    ) -> httpcore.NetworkStream:
        return _Stream(self._sockets.connect_tcp(host, port, timeout, local_address,
                                                 socket_options))


class _Stream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        deadline = getattr(_local, "deadline", None)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise httpcore.ReadTimeout("the answer did not come within the timeout")
            timeout = remaining if timeout is None else min(timeout, remaining)
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _Stream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


_BACKEND = _Backend()
