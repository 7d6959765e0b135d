"""Ranged GETs of video bytes over plain keep-alive sockets, received straight into the
caller's buffers; and the small GETs (metadata, digests, listings) over the same sockets.

Why not httpx for these: httpx (h11 underneath) hands a body over as one `bytes` object per
64 KiB read, which the caller then copies into its blocks; at a few hundred MB/s those objects
and the Python calls around each one were most of a vcfs daemon's CPU, all under the GIL.
Here the body of `GET /video/{hash}` with a `Range` is read with `socket.recv_into` directly
into buffers the caller provides (one kernel copy, no Python object per piece), and the caller
is told as each buffer fills, so it can use a block before the rest of the range arrives.

Scope: this is not a general HTTP client. It sends GETs and reads answers framed by
`Content-Length`: a range into the caller's buffers, a small answer (`get`) whole into an
httpx.Response. A small answer may also come in chunks (`Transfer-Encoding: chunked`): a
reverse proxy compressing it on the fly, as nginx does with `gzip on`, cannot know its length.
Anything else (a range in chunks, another transfer coding, no length, an interim 1xx, a small
answer over 16 MiB) raises `Unhandled`, with nothing of it handed to the caller; the client
then makes the request through httpx. Small answers share the range connections so that a
lookup leaves a warm one for the bytes that follow it; `read_into_after` goes further and sends
a video's metadata and digest requests ahead of its first range on one connection, all at once.
The client does not use this path at all with a custom httpx transport, or when the
environment names a proxy that httpx would use.

Same guarantees as the httpx path: the status and headers go through the same checks
(`_translate.raise_for_status`, `_verify.expected_video_length`, both given an `httpx.Response`
built from the parsed head), the body is counted against the checked length, and socket
failures become the httpx exceptions httpx itself raises for them (`ConnectError`,
`ReadTimeout`, `RemoteProtocolError` for a body cut short...) in `_socket_error`, so the
client's `_translate.transport_errors` turns them into its exceptions as for any other call.
Every connect, send and `recv` waits at most the client's timeout, and an answer's head (and a
small answer's body) comes whole within it.

Connections: a `_pool.Pool` of keep-alive connections, each lent to one thread at a time, the
warmest first, counted with the client's httpx connections against `max_connections`. A
connection goes back to the pool only after every answer asked for on it was read exactly to
its end and the server did not ask to close. That includes an error answer, whose body is read
for its detail (unless over 64 KiB), and the answers pipelined behind a refusal (a `/meta` 404
for an unknown hash), which are read and dropped if small (up to 64 KiB each, within the
client's timeout): a lookup of an unknown hash costs no new connection. Any other outcome (a
failure, a callback that raised, an unread body, a large answer owed) closes it. A pooled
connection the server has closed meanwhile is noticed before reuse (its idle socket polls
readable) or, in a race, by the request failing before any byte of an answer: GET is
idempotent, so that request is sent once more on a new connection.

Pipelining: a range of a video that begins where another thread's range of it ends, while that
answer is still arriving (the kernel's next readahead read behind the one a player waits for),
is sent at once on that connection rather than on another one. Its answer then follows the one
before on the link, in order and without a round trip between them, where two connections would
share the link and finish both late (on a 20 ms, 200 Mbit/s link: the first MiB after 53 ms
instead of 80). Over a link whose round trip is 10 ms or more, ranges chain: a pipelined
range's own end is open to the next range as soon as its request is sent, so a stream's ranges
(vcfs's readahead tasks one after another) queue on one connection in the order they were sent,
which is the order their answers come in (a vcfs sequential read on the 20 ms link: 24.6 MB/s,
the link's speed, against 22.7 when a third range took a connection of its own). Over a faster
one, a range follows only an answer already arriving, and the next takes a connection of its
own: there the CPU bounds a stream, and two connections are received in parallel. The link's
round trip is the shortest measured on any connection, from sending a request to the first
byte of its answer: a busy server lengthens some of them, so the last one measured would take
a loaded loopback for a remote link, but none is shorter than the link's own. The
connection is handed from each reader to the next in the queue when its answer is read to its
end; bytes of the next answer that came in with the end of one are read first. If an answer
fails or the server closes the connection after it, every range queued behind it is asked for
again the usual way. Plain TCP only: a TLS socket cannot send on one thread while another
receives on it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import httpx

from vidcache_client._exceptions import StatusError
from vidcache_client._pool import Budget, Pool, Spare
from vidcache_client._translate import raise_for_status
from vidcache_client._validate import ByteRange, is_decimal
from vidcache_client._verify import expected_video_length

# Longer heads are refused (h11's own limit is 16 KiB). Also the size of each connection's
# head buffer: body bytes that arrive with the head are copied out of it.
_MAX_HEAD_BYTES = 64 * 1024
# An error answer's body is read for its `detail` up to this size.
_MAX_ERROR_BODY = 64 * 1024
# Larger answers to `get` are left to httpx (a listing page of 1000 records is ~0.5 MB).
_MAX_SMALL_BODY = 16 * 1024 * 1024
# Ranges chain (a range follows one whose answer has not begun) only over a link with at least
# this round trip: a remote link's bandwidth bounds a stream (see the module docstring).
_CHAIN_ROUND_TRIP = 0.010
# The length `_parse_head` gives an answer framed by `Transfer-Encoding: chunked`.
_CHUNKED = -1
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_STATUS_LINE = re.compile(r"HTTP/(1\.[01]) (\d{3})(?: (.*))?")

T = TypeVar("T")
OnFilled = Callable[[int], None]
OnProgress = Callable[[int], None]


class Unhandled(Exception):
    """An answer this reader does not read (a range not framed by Content-Length, an interim
    1xx, a small answer over 16 MiB); nothing of its body was handed to the caller, so the
    request can be made another way."""


class _Stale(Exception):
    """A reused connection failed before any byte of the answer: the server had closed it."""


def proxied_by_environment(url: httpx.URL) -> bool:
    """Whether httpx (which trusts the environment) may send requests for `url` through a proxy
    named by HTTP_PROXY / HTTPS_PROXY / ALL_PROXY. Errs on the side of yes: only a NO_PROXY
    entry that is `*` or names this host or a domain of it counts as a bypass."""
    proxies = urllib.request.getproxies()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    host = url.host.lower()
    for entry in proxies.get("no", "").split(","):
        domain = entry.strip().lower().lstrip(".")
        if domain == "*" or (domain and (host == domain or host.endswith("." + domain))):
            return False
    return True


def _socket_error(exc: OSError, phase: str, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception httpx raises for a socket failure while connecting, writing or
    reading."""
    error_class: type[httpx.TransportError]
    if isinstance(exc, TimeoutError):
        error_class = {"connect": httpx.ConnectTimeout, "write": httpx.WriteTimeout,
                       "read": httpx.ReadTimeout}[phase]
    else:
        error_class = {"connect": httpx.ConnectError, "write": httpx.WriteError,
                       "read": httpx.ReadError}[phase]
    return error_class(str(exc) or type(exc).__name__, request=request)


class _LinkRoundTrip:
    """The shortest round trip measured on a reader's connections (None: none yet)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: float | None = None

    def measured(self, seconds: float) -> None:
        with self._lock:
            if self.seconds is None or seconds < self.seconds:
                self.seconds = seconds


class _Connection:
    """One HTTP/1.1 connection: its socket, and the body bytes that came in with the last
    head and are not handed over yet. Raises httpx exceptions naming the current request."""

    def __init__(self, sock: socket.socket, describe: Callable[[], httpx.Request],
                 link: _LinkRoundTrip | None = None) -> None:
        self.sock = sock
        self.answers = 0  # answers read to their end: > 0 means a kept-alive connection
        # Told the seconds from sending a request on it while idle to the first byte of the
        # answer's head (by default, a link of its own).
        self._link = link or _LinkRoundTrip()
        self._sent_at: float | None = None
        # The current request as httpx would show it, built only for an error message.
        self.describe = describe
        self._head_buffer = bytearray(_MAX_HEAD_BYTES)
        self._extra = memoryview(self._head_buffer)[:0]
        # Set while answers nobody waits for are skipped: every receive ends by then too.
        self.deadline: float | None = None

    def send(self, data: bytes, *, pipelined: bool = False) -> None:
        """Send `data`; unless `pipelined` (sent while an answer is arriving), the next head
        read times the round trip."""
        if not pipelined:
            self._sent_at = time.monotonic()
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise _socket_error(exc, "write", self.describe()) from exc
        except OSError as exc:
            if self.answers:
                raise _Stale from exc
            raise _socket_error(exc, "write", self.describe()) from exc

    def read_head(self) -> bytes:
        """The next answer's head, without its blank line. Bytes already received past the
        previous answer (the start of a pipelined one) come first."""
        buffer = self._head_buffer
        view = memoryview(buffer)
        filled = len(self._extra)
        if filled:
            buffer[:filled] = bytes(self._extra)  # overlapping: copy out first
            self._extra = view[:0]
            end = buffer.find(b"\r\n\r\n", 0, filled)
            if end >= 0:
                self._extra = view[end + 4 : filled]
                return bytes(view[:end])
        while True:
            try:
                self._before_receive()
                received = self.sock.recv_into(view[filled:])
            except TimeoutError as exc:
                raise _socket_error(exc, "read", self.describe()) from exc
            except OSError as exc:
                if self.answers and not filled:
                    raise _Stale from exc
                raise _socket_error(exc, "read", self.describe()) from exc
            if not received:
                if self.answers and not filled:
                    raise _Stale
                raise httpx.RemoteProtocolError(
                    "server disconnected without sending a response", request=self.describe())
            if self._sent_at is not None:
                self._link.measured(time.monotonic() - self._sent_at)
                self._sent_at = None
            filled += received
            end = buffer.find(b"\r\n\r\n", max(filled - received - 3, 0), filled)
            if end >= 0:
                self._extra = view[end + 4 : filled]
                return bytes(view[:end])
            if filled == len(buffer):
                raise httpx.RemoteProtocolError(
                    f"answer head longer than {_MAX_HEAD_BYTES} bytes", request=self.describe())

    def fill(self, target: memoryview, received_before: int, expected: int,
             on_progress: OnProgress | None) -> None:
        """Fill `target` from the body: first the bytes that came with the head, then straight
        from the socket. `on_progress(total)` after every receive, total counting the body
        bytes received so far (from `received_before`), of `expected`."""
        filled = 0
        extra = self._extra
        if extra:
            filled = min(len(extra), len(target))
            target[:filled] = extra[:filled]
            self._extra = extra[filled:]
            if on_progress is not None:
                on_progress(received_before + filled)
        recv_into = self.sock.recv_into
        wanted = len(target)
        while filled < wanted:
            try:
                self._before_receive()
                received = recv_into(target[filled:])
            except OSError as exc:
                raise _socket_error(exc, "read", self.describe()) from exc
            if not received:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body: received "
                    f"{received_before + filled} of {expected} bytes", request=self.describe())
            filled += received
            if on_progress is not None:
                on_progress(received_before + filled)

    def read_chunked(self, limit: int) -> tuple[bytes, bool]:
        """The body of an answer framed by `Transfer-Encoding: chunked`, its trailer dropped,
        and whether it was read to its end: one over `limit` bytes is cut there, the rest left
        unread (the connection is then out of step). Bytes past its end (the start of a
        pipelined answer) are kept for the next head."""
        data = bytearray(self._extra)
        self._extra = memoryview(b"")
        body = bytearray()
        position = 0  # of the next chunk's size line in `data`
        while True:
            line_end = data.find(b"\r\n", position)
            if line_end < 0:
                data += self._receive_line(data, position)
                continue
            size_text = bytes(data[position:line_end]).split(b";")[0].strip(b" \t")
            if _CHUNK_SIZE.fullmatch(size_text) is None:
                raise httpx.RemoteProtocolError(f"malformed chunk size {size_text[:20]!r}",
                                                request=self.describe())
            size = int(size_text, 16)
            if size == 0:
                break
            start = line_end + 2
            if len(body) + size > limit:  # what came of it so far, up to the limit
                body += data[start:start + min(size, limit - len(body))]
                return bytes(body), False
            while len(data) < start + size + 2:
                data += self._receive()
            if data[start + size:start + size + 2] != b"\r\n":
                raise httpx.RemoteProtocolError("malformed chunk end",
                                                request=self.describe())
            body += data[start:start + size]
            position = start + size + 2
        # The trailer: header lines up to an empty one (nginx sends none).
        position = line_end + 2
        while (line_end := data.find(b"\r\n", position)) != position:
            if line_end < 0:
                data += self._receive_line(data, position)
            else:
                position = line_end + 2
        self._extra = memoryview(bytes(data[position + 2:]))
        return bytes(body), True

    def _receive_line(self, data: bytearray, position: int) -> bytes:
        """More of the line (a chunk's size, a trailer field) that starts at `position` of
        `data`; a RemoteProtocolError once it is longer than a whole answer head may be, so
        an endless line neither fills the memory nor costs a search of all of it per receive."""
        if len(data) - position > _MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("endless chunk size or trailer line (over "
                                            f"{_MAX_HEAD_BYTES} bytes)", request=self.describe())
        return self._receive()

    def _receive(self) -> bytes:
        """The next bytes of the body, up to 64 KiB (so what is left past an answer fits the
        head buffer)."""
        try:
            self._before_receive()
            received = self.sock.recv(_MAX_HEAD_BYTES)
        except OSError as exc:
            raise _socket_error(exc, "read", self.describe()) from exc
        if not received:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body",
                request=self.describe())
        return received

    def _before_receive(self) -> None:
        """With a deadline set, the next receive waits at most until it."""
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("past the deadline")
            self.sock.settimeout(remaining)

    def drained(self) -> bool:
        """Whether nothing beyond the answer arrived (else the connection is out of step)."""
        return not self._extra

    def still_open(self) -> bool:
        """For an idle connection: whether it may carry another request. Readable means the
        server closed it (or sent something unasked); either way it may not."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)

    def interrupt(self) -> None:
        """From another thread: end the exchange in progress (its next receive gets nothing,
        its next send fails); the user still closes the connection."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Follower:
    """A request pipelined behind an answer in progress, waiting for the connection."""

    def __init__(self) -> None:
        self._handed = threading.Event()
        self._connection: _Connection | None = None

    def hand_over(self, connection: _Connection | None) -> None:
        """The answer before it has been read; `connection` None: it failed, or the server
        closes the connection after it, so the pipelined request will not be answered."""
        self._connection = connection
        self._handed.set()

    def wait(self) -> _Connection | None:
        # Bounded: the answer before it is read under the client's timeout per receive,
        # and its reader hands over (or fails) when it is done.
        self._handed.wait()
        return self._connection


class RangeReader:
    """Sends `GET <base path>/video/<hash>` with a Range; reads the answer into buffers."""

    def __init__(self, base_url: httpx.URL, *, headers: dict[str, str], timeout: float,
                 ssl_context: ssl.SSLContext, budget: Budget,
                 spare: bool = False) -> None:
        self._url = base_url
        self._tls = ssl_context if base_url.scheme == "https" else None
        self._timeout = timeout
        # As sent on the request line: percent-encoded, without a query.
        self._base_path = base_url.raw_path.split(b"?")[0].decode("ascii").rstrip("/")
        self._headers = {"Host": base_url.netloc.decode("ascii"), **headers,
                         "Accept-Encoding": "identity"}
        self._head_lines = _header_lines(self._headers)
        self._head_lines_small = _header_lines({**self._headers, "Accept-Encoding": "gzip"})
        self._pool = Pool(self._connect, close=_Connection.close,
                          usable=_Connection.still_open, budget=budget, spare=spare,
                          interrupt=_Connection.interrupt)
        # Pipelining (plain TCP only: a TLS socket cannot send on one thread while another
        # receives): connections by (hash, offset) where an answer in progress or queued on
        # them ends, each end taking one follower; and each connection's queue of followers,
        # in the order their requests were sent.
        self._lock = threading.Lock()
        self._link = _LinkRoundTrip()
        self._open_ends: dict[tuple[str, int], _Connection] = {}
        self._followers: dict[_Connection, deque[_Follower]] = {}

    def read_into(self, content_hash: str, asked: ByteRange, views: Sequence[memoryview], *,
                  what: str, on_filled: OnFilled | None, on_progress: OnProgress | None) -> int:
        """Bytes `asked` (inclusive) of the video into `views`, in order; returns how many
        arrived (fewer than the views hold only when the video ends first).

        A range beginning where another thread's range of the same video ends, while that
        one's answer is still arriving, is asked for at once on the same connection
        (pipelined): its answer follows on the link without a round trip between them, and
        in order, instead of sharing the link with the answer before it. If that connection
        fails or may not carry it, the range is asked for again the usual way.

        Raises the client's StatusError subclasses and ProtocolError (mostly RangeError) for a
        wrong answer, httpx exceptions for transport failures, `Unhandled`, or whatever the
        callbacks raise."""
        path, request = self._range_request(content_hash, asked)
        describe = functools.partial(self._describe, path, asked)
        answer = functools.partial(self._answer, content_hash, asked, views, describe,
                                   what=what, on_filled=on_filled, on_progress=on_progress)
        connection = self._follow(content_hash, asked, request)
        if connection is not None:
            try:
                return answer(connection, None)
            except (_Stale, httpx.TransportError):
                pass  # the connection before it failed, or closed after it: ask again
        return self._on_connection(lambda connection: answer(connection, request),
                                   spare="if-new", describe=describe)

    def get(self, target: str) -> httpx.Response:
        """The answer to `GET <base path><target>` (`target`: a path and query, encoded as
        sent), read whole: a small JSON answer (metadata, digests, a listing page). Over the
        same pooled connections as the ranges, so a lookup leaves a warm one for the bytes.

        Raises httpx exceptions for transport failures and `Unhandled` (before any body byte
        is read) for an answer not framed by Content-Length or longer than 16 MiB; the caller
        checks the status."""
        request = self._request(target)
        describe = functools.partial(self._describe, f"{self._base_path}{target}", None)

        def exchange(connection: _Connection) -> httpx.Response:
            connection.describe = describe
            reusable = False
            try:
                connection.send(request)
                response, keep_alive = self._whole_answer(connection, first=True)
                reusable = keep_alive and connection.drained()
                return response
            finally:
                self._pool.release(connection, reusable=reusable)

        # No spare: a lookup or a listing does not foretell a second concurrent request.
        return self._on_connection(exchange, spare="no", describe=describe)

    def read_into_after(self, targets: Sequence[tuple[str, Callable[[httpx.Response], None]]],
                        content_hash: str, asked: ByteRange, views: Sequence[memoryview], *,
                        what: str, on_filled: OnFilled | None,
                        on_progress: OnProgress | None) -> int:
        """`read_into`, with small GETs sent ahead of the range on the same connection, all at
        once (pipelined): for each (target, take) in `targets`, in order, that GET's answer is
        read whole and handed to `take` (which checks its status; whatever it raises ends the
        read; after a StatusError, a refusal, the answers still owed are skipped to keep the
        connection), then the range's is read like `read_into`'s. So a video's metadata,
        digests and first bytes cost one round trip, on a warm connection if the pool has one;
        taking the pool's last idle one opens a spare for the next concurrent range. If the
        server closes the connection after an answer, the rest is asked for again the usual
        way."""
        path, request = self._range_request(content_hash, asked)
        describe = functools.partial(self._describe, path, asked)
        requests = b"".join(self._request(target) for target, _ in targets) + request
        answered = 0  # of `targets`

        def send_all(connection: _Connection) -> tuple[_Connection, bool]:
            """Send the requests, take the small answers; the connection, and whether it
            carries the range's answer too (False: the server closes it after an answer)."""
            nonlocal answered
            connection.describe = describe  # not a pooled connection's last request
            # Answers come in the order the requests were sent: the targets', then the
            # range's. Each one read is counted off, so `owed` are still to come, in order.
            owed = len(targets) + 1
            reusable = False
            try:
                connection.send(requests)
                for target, take in targets:
                    connection.describe = functools.partial(
                        self._describe, f"{self._base_path}{target}", None)
                    response, keep_alive = self._whole_answer(connection, first=not answered)
                    owed -= 1
                    try:
                        take(response)
                    except StatusError:
                        # A refusal (a 404 for an unknown hash): the call ends with it, but
                        # the connection is kept if the answers still owed are skipped.
                        reusable = keep_alive and self._skip_answers(connection, owed)
                        raise
                    answered += 1
                    if not keep_alive:
                        return connection, False
            except BaseException:
                self._pool.release(connection, reusable=reusable)
                raise
            return connection, True

        connection, carries_range = self._on_connection(send_all, spare="if-last",
                                                        describe=describe)
        if carries_range:
            try:  # `_answer` gives the connection back (or hands it on) whatever happens
                return self._answer(content_hash, asked, views, describe, connection, None,
                                    what=what, on_filled=on_filled, on_progress=on_progress)
            except _Stale:
                pass  # closed after the small answers, which were taken: the range alone again
        else:  # the server closes the connection after an answer
            self._pool.release(connection, reusable=False)
        for target, take in targets[answered:]:
            take(self.get(target))
        return self.read_into(content_hash, asked, views, what=what,
                              on_filled=on_filled, on_progress=on_progress)

    # -- internals -----------------------------------------------------------------------

    def _on_connection(self, exchange: Callable[[_Connection], T], *, spare: Spare,
                       describe: Callable[[], httpx.Request]) -> T:
        """`exchange(connection)` on a pooled connection, which `exchange` gives back (or hands
        on) itself; asked again on a new connection (which cannot be stale) if the pooled one
        turns out closed by the server before anything was answered. A failure to connect
        names the request (`describe`) the connection was for."""
        stale = False
        while True:
            try:
                connection = self._pool.acquire(fresh=stale, spare=spare)
            except httpx.TransportError as exc:
                exc.request = describe()
                raise
            try:
                return exchange(connection)
            except _Stale:
                stale = True
                self._pool.close_idle()

    def _range_request(self, content_hash: str, asked: ByteRange) -> tuple[str, bytes]:
        """The path of `GET /video/<hash>` and the request asking it for `asked`."""
        path = f"{self._base_path}/video/{content_hash}"
        return path, (f"GET {path} HTTP/1.1\r\n{self._head_lines}"
                      f"Range: bytes={asked[0]}-{asked[1]}\r\n\r\n").encode("ascii")

    def _request(self, target: str) -> bytes:
        # gzip: httpx decodes it (`_response`), and a digest list shrinks to about half.
        return (f"GET {self._base_path}{target} HTTP/1.1\r\n{self._head_lines_small}"
                "\r\n").encode("ascii")

    def _whole_answer(self, connection: _Connection, *, first: bool
                      ) -> tuple[httpx.Response, bool]:
        """The next answer, read whole, and whether the connection may carry another request.
        `_Stale` (a kept-alive connection the server had closed) only for a `first` answer:
        after one was taken, the requests cannot simply be sent again. The answer comes whole
        within the client's timeout (`_within_timeout`)."""
        try:
            with self._within_timeout(connection):
                head = connection.read_head()
                response, _, keep_alive = self._response(head, connection, whole=True)
        except _Stale as exc:
            if first:
                raise
            raise httpx.RemoteProtocolError("server disconnected without sending a response",
                                            request=connection.describe()) from exc
        connection.answers += 1
        return response, keep_alive

    @contextlib.contextmanager
    def _within_timeout(self, connection: _Connection) -> Iterator[None]:
        """Every receive in the block ends by one client timeout from now: a head or a small
        answer trickling in a byte at a time (each receive in time) would otherwise hold its
        connection and its caller's thread for as long as it lasts (minutes)."""
        connection.deadline = time.monotonic() + self._timeout
        try:
            yield
        finally:
            connection.deadline = None
            connection.sock.settimeout(self._timeout)

    def _answer(self, content_hash: str, asked: ByteRange, views: Sequence[memoryview],
                describe: Callable[[], httpx.Request], connection: _Connection,
                request: bytes | None, *, what: str, on_filled: OnFilled | None,
                on_progress: OnProgress | None) -> int:
        """Send `request` on `connection` (lent to this thread; None: it was pipelined there
        already) and read its answer, then hand the connection to the request pipelined
        behind it, if any, or give it back."""
        connection.describe = describe
        end = (content_hash, asked[1] + 1)
        reusable = False
        try:
            if request is not None:
                connection.send(request)
            if self._tls is None:  # open to a follower only once this request is out
                with self._lock:
                    self._open_ends.setdefault(end, connection)
            with self._within_timeout(connection):  # the body: as the caller's on_progress says
                head = connection.read_head()
                response, length, keep_alive = self._response(head, connection)
            if not response.is_success:  # a refusal, its body read: whole if `keep_alive`
                connection.answers += 1
                reusable = keep_alive
            raise_for_status(response, what)
            # Checks Content-Range against `asked` and Content-Length against it.
            expected_video_length(response, content_hash, asked, what)
            received = self._read_body(connection, views, length, on_filled, on_progress)
            connection.answers += 1
            reusable = keep_alive
            return received
        finally:
            if reusable:
                with self._lock:
                    if self._open_ends.get(end) is connection:
                        del self._open_ends[end]
                    queue = self._followers.get(connection)
                    follower = queue.popleft() if queue else None
                    if queue is not None and not queue:
                        del self._followers[connection]
                if follower is not None:
                    follower.hand_over(connection)
                else:
                    self._pool.release(connection, reusable=connection.drained())
            else:
                self._give_up(connection)

    def _give_up(self, connection: _Connection) -> None:
        """Close `connection` (lent to this thread): every request queued on it is left
        unanswered, so its reader is told to ask again, and nothing more may follow on it."""
        with self._lock:
            for end in [end for end, open_on in self._open_ends.items() if open_on is connection]:
                del self._open_ends[end]
            queue = self._followers.pop(connection, ())
        for follower in queue:
            follower.hand_over(None)
        self._pool.release(connection, reusable=False)

    def _follow(self, content_hash: str, asked: ByteRange, request: bytes
                ) -> _Connection | None:
        """Pipeline `request` behind an answer in progress or queued that ends where `asked`
        begins, if any; the connection once the answers before it are read (None: one failed,
        or the connection may carry no more)."""
        with self._lock:
            leader = self._open_ends.pop((content_hash, asked[0]), None)
            if leader is None:
                return None
            follower = _Follower()
            self._followers.setdefault(leader, deque()).append(follower)
        try:
            leader.send(request, pipelined=True)
            sent = True
        except (_Stale, httpx.TransportError):
            sent = False  # the reader before it fails too, or the connection is unusable
        if sent and (self._link.seconds or 0) >= _CHAIN_ROUND_TRIP:
            with self._lock:  # open to the next range, unless the queue was given up meanwhile
                if follower in self._followers.get(leader, ()):
                    self._open_ends.setdefault((content_hash, asked[1] + 1), leader)
        connection = follower.wait()
        if connection is not None and not sent:
            self._give_up(connection)
            return None
        return connection

    def _connect(self) -> _Connection:
        url = self._url
        port = url.port or (443 if url.scheme == "https" else 80)
        describe = functools.partial(self._describe, f"{self._base_path}/", None)
        try:
            sock = socket.create_connection((url.host, port), timeout=self._timeout)
        except OSError as exc:
            raise _socket_error(exc, "connect", describe()) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=url.host)
        except OSError as exc:
            sock.close()
            raise _socket_error(exc, "connect", describe()) from exc
        except BaseException:
            sock.close()
            raise
        return _Connection(sock, describe, self._link)

    def _response(self, head: bytes, connection: _Connection, *, whole: bool = False
                  ) -> tuple[httpx.Response, int, bool]:
        """The answer as an httpx.Response (an error answer with its body read, a 2xx without
        unless `whole`), its Content-Length, and whether the connection may carry another
        request after it."""
        status, reason, version, headers, length, keep_alive = _parse_head(
            head, connection.describe)
        extensions = {"http_version": f"HTTP/{version}".encode("ascii"),
                      "reason_phrase": reason.encode("latin-1")}
        success = 200 <= status < 300
        if success and not whole:
            if length == _CHUNKED:  # a range is read into buffers sized by its length
                raise Unhandled(f"HTTP {status} range answer not framed by Content-Length")
            response = httpx.Response(status, headers=headers, extensions=extensions)
            return response, length, keep_alive
        # A small answer is read whole. So is an error answer, for the detail in its body, up
        # to _MAX_ERROR_BODY (a refusal's is ~100 bytes): that leaves the connection in step
        # for the next answer; of a longer one only the start is read, and the connection is
        # closed after it.
        limit = _MAX_SMALL_BODY if success else _MAX_ERROR_BODY
        if length == _CHUNKED:
            content, complete = connection.read_chunked(limit)
        elif success and length > limit:
            raise Unhandled(f"HTTP {status} answer of {length} bytes")
        else:
            body = memoryview(bytearray(min(length, limit)))
            connection.fill(body, 0, len(body), None)
            content, complete = body.tobytes(), len(body) == length
        if success and not complete:
            raise Unhandled(f"HTTP {status} answer of more than {limit} bytes")
        # httpx decodes a gzip body here, as it would one it received itself.
        response = httpx.Response(status, headers=headers, content=content,
                                  extensions=extensions, request=connection.describe())
        return response, length, keep_alive and complete

    def _skip_answers(self, connection: _Connection, count: int) -> bool:
        """Read and drop the next `count` answers on `connection` (lent to this thread), those
        of requests sent before the caller stopped wanting them: whether it is then in step,
        with nothing more owed on it, and may carry another request. Only small answers are
        skipped (bodies up to _MAX_ERROR_BODY, kept alive), all within the client's timeout;
        otherwise, or on any failure, False: close it."""
        connection.deadline = time.monotonic() + self._timeout
        try:
            for _ in range(count):
                *_, length, keep_alive = _parse_head(connection.read_head(),
                                                     connection.describe)
                if length == _CHUNKED:
                    if not connection.read_chunked(_MAX_ERROR_BODY)[1]:
                        return False
                elif length > _MAX_ERROR_BODY:
                    return False
                else:
                    connection.fill(memoryview(bytearray(length)), 0, length, None)
                if not keep_alive:
                    return False
                connection.answers += 1
        except (_Stale, Unhandled, httpx.TransportError):
            return False
        finally:
            connection.deadline = None
            connection.sock.settimeout(self._timeout)
        return connection.drained()

    @staticmethod
    def _read_body(connection: _Connection, views: Sequence[memoryview], expected: int,
                   on_filled: OnFilled | None, on_progress: OnProgress | None) -> int:
        received = 0
        for index, view in enumerate(views):
            if received == expected:
                break
            target = view if received + len(view) <= expected else view[: expected - received]
            connection.fill(target, received, expected, on_progress)
            received += len(target)
            if on_filled is not None:
                on_filled(index)
        return received

    def _describe(self, path: str, asked: ByteRange | None) -> httpx.Request:
        """The request as httpx would show it in an error message."""
        headers = dict(self._headers)
        if asked is not None:
            headers["Range"] = f"bytes={asked[0]}-{asked[1]}"
        return httpx.Request("GET", self._url.copy_with(raw_path=path.encode("ascii")),
                             headers=headers)


def _header_lines(headers: dict[str, str]) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items())


def _parse_head(head: bytes, describe: Callable[[], httpx.Request]
                ) -> tuple[int, str, str, list[tuple[str, str]], int, bool]:
    """(status, reason phrase, HTTP version, headers in order, Content-Length or _CHUNKED,
    whether the connection may carry another request after the answer) of an answer's head;
    `Unhandled` for an answer framed otherwise."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise httpx.RemoteProtocolError(f"malformed status line {status_line[:100]!r}",
                                        request=describe())
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"malformed header line {line[:100]!r}",
                                            request=describe())
        headers.append((name, value.strip(" \t")))
    status, version = int(match.group(2)), match.group(1)
    names = [name.lower() for name, _ in headers]
    codings = [value.lower() for name, value in headers if name.lower() == "transfer-encoding"]
    chunked = codings == ["chunked"] and version == "1.1" and "content-length" not in names
    if status < 200 or (not chunked and (codings or "content-length" not in names)):
        raise Unhandled(f"HTTP {status} answer not framed by Content-Length or chunks")
    closing = any(name.lower() == "connection" and "close" in value.lower()
                  for name, value in headers)
    keep_alive = version == "1.1" and not closing
    if chunked:
        return status, match.group(3) or "", version, headers, _CHUNKED, keep_alive
    lengths = {value for name, value in headers if name.lower() == "content-length"}
    length = lengths.pop() if len(lengths) == 1 else ""
    if not is_decimal(length):
        raise httpx.RemoteProtocolError(f"HTTP {status} answer with a malformed "
                                        "Content-Length", request=describe())
    return status, match.group(3) or "", version, headers, int(length), keep_alive
