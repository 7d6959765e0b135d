"""A loopback TCP proxy that makes a local link behave like a WAN one, and counts the traffic.

The kernel here has no netem, so the benchmark puts every contender's traffic through this
proxy. A new connection first waits one round trip (the TCP handshake). Then each direction of
every connection is a *delay line*: a chunk read at time t is written at t + one_way_delay and
then pays for its bytes in a token bucket shared by all connections (one link, one bandwidth
cap). Chunks queue in order, so the latency applies to every request and every response chunk,
not only to connection set-up, and the bounded queue gives the sender back-pressure the way a
TCP window does.

The proxy forwards raw TCP but follows the HTTP/1.x requests in the client->server stream
(pipelined ones too, as vcfs sends; a hook's own answer takes its request's turn, after the
server's answers to the requests before it, as a real server's would): it counts them,
logs method, path and Range, and lets a `Hooks` object answer a request itself or change, delay
or cut the response bytes. `ResponseHeadHook` frames the responses once for every hook that
works per response (head, then body pieces). These are the extension points for fault
injection (bench/faults.py: stall, reset after N bytes, truncation, 503 bursts, 200 instead of
206, wrong Content-Range, flipped byte); the benchmark itself uses them only for two
compatibility shims for the peers (bench/shims.py). The benchmark's loopback profile, which
needs neither timing nor faults, runs bench/splice_relay.py instead, built on the same
`RequestRouter` and `TrafficCounters`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")

MAX_HEADER_BYTES = 64 * 1024
"""A request head larger than this is not HTTP we understand: the stream is passed on opaque."""


@dataclass(frozen=True, kw_only=True)
class LinkProfile:
    """What the proxy does to the bytes it carries."""

    name: str
    one_way_delay_s: float = 0.0  # added to every chunk, in each direction (RTT = 2x)
    rate_bytes_per_s: float | None = None  # per direction, shared by all connections; None: no cap

    @property
    def shapes_traffic(self) -> bool:
        """Whether it delays or caps anything (else bytes may pass straight through)."""
        return bool(self.one_way_delay_s) or self.rate_bytes_per_s is not None

    def describe(self) -> str:
        rtt_ms = 2000 * self.one_way_delay_s
        rate = "uncapped" if self.rate_bytes_per_s is None else (
            f"{self.rate_bytes_per_s * 8 / 1e6:.0f} Mbit/s")
        return f"{self.name}: +{rtt_ms:.0f} ms RTT, {rate}"


LOOPBACK = LinkProfile(name="loopback")
WAN = LinkProfile(name="wan", one_way_delay_s=0.010, rate_bytes_per_s=200e6 / 8)


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    listen_host: str = "127.0.0.1"  # loopback only, by the machine's rules
    listen_port: int = 0  # 0 = pick a free port
    profile: LinkProfile = LOOPBACK
    chunk_size: int = 256 * 1024  # large reads keep the proxy's CPU cost per byte low
    queue_chunks: int = 8  # chunks in flight per direction, about a TCP window
    log_limit: int = 20_000  # request records kept for diagnostics; older ones are dropped


@dataclass(frozen=True)
class Request:
    """One HTTP request head seen in the client->server stream."""

    method: str
    target: str
    headers: dict[str, str]  # lower-cased names

    @property
    def path(self) -> str:
        """The target's path; also of an absolute-form target ("http://host:port/path"), as
        a client sends when told to use this proxy as its HTTP proxy."""
        path = self.target.split("?", 1)[0]
        scheme, separator, rest = path.partition("://")
        if separator and scheme.lower() in ("http", "https"):
            return "/" + rest.partition("/")[2]
        return path

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class Connection:
    """What a hook knows about one client connection."""

    id: int
    requests: list[Request] = field(default_factory=list)  # seen so far, in order
    forwarded: list[Request] = field(default_factory=list)  # those sent on to the server
    bytes_down: int = 0  # response bytes delivered to the client so far

    def request_answered(self, response: int) -> Request | None:
        """The request the server's `response`-th answer (from 0) is for, if one was seen."""
        return self.forwarded[response] if response < len(self.forwarded) else None


Ending = Literal["close", "reset"]


@dataclass(frozen=True)
class Verdict:
    """What to do with a piece of response data: send `data` (maybe changed) after `delay_s`
    more seconds, then optionally end the connection with a FIN ("close") or an RST ("reset").
    `then`: more data, sent after this, its own `delay_s` later still (a chunk of the server's
    stream may end one response and begin another that a fault delays: the first is not held
    back with it)."""

    data: bytes
    delay_s: float = 0.0
    end: Ending | None = None
    then: Verdict | None = None

    def pieces(self) -> list[Verdict]:
        """This verdict and those after it, in order (their `then` left as it is)."""
        pieces = [self]
        while pieces[-1].then is not None:
            pieces.append(pieces[-1].then)
        return pieces

    @staticmethod
    def of(pieces: Sequence[tuple[bytes, float]], end: Ending | None = None) -> Verdict:
        """The verdict sending each (data, delay) in order; `end` after the last."""
        verdict: Verdict | None = None
        for number, (data, delay) in enumerate(reversed(pieces)):
            verdict = Verdict(data, delay, end if number == 0 else None, verdict)
        assert verdict is not None, "no pieces"
        return verdict


class Hooks:
    """Extension point: subclass and override to answer requests or damage responses.

    The defaults forward everything unchanged. Hooks run on the proxy's event loop and must
    not block. A fault keeps its own state (e.g. bytes sent so far on `conn`, or a counter of
    requests to fail) and can use `conn.requests[-1]` to know which request the bytes answer.
    """

    def on_request(self, conn: Connection, request: Request) -> bytes | None:
        """Return raw response bytes to answer `request` here instead of forwarding it (sent
        after the server's answers to the requests before it)."""
        del conn, request
        return None

    def on_response_data(self, conn: Connection, data: bytes) -> Verdict:
        """Called for each chunk the server sends, before it enters the delay line."""
        del conn
        return Verdict(data)

    def on_close(self, conn: Connection) -> None:
        """The connection is gone: drop any state kept for it."""
        del conn


class HookChain(Hooks):
    """Several hooks in order: the first answer to a request wins; response data passes
    through each in turn (delays add up, the first ending stops the chain)."""

    def __init__(self, *hooks: Hooks) -> None:
        self.hooks = hooks

    def on_request(self, conn: Connection, request: Request) -> bytes | None:
        for hook in self.hooks:
            answer = hook.on_request(conn, request)
            if answer is not None:
                return answer
        return None

    def on_response_data(self, conn: Connection, data: bytes) -> Verdict:
        pieces = [(data, 0.0)]
        for hook in self.hooks:
            passed: list[tuple[bytes, float]] = []
            for data, delay in pieces:
                verdict = hook.on_response_data(conn, data)
                for number, piece in enumerate(verdict.pieces()):
                    passed.append((piece.data, piece.delay_s + (delay if number == 0 else 0)))
                    if piece.end is not None:
                        return Verdict.of(passed, piece.end)
            pieces = passed
        return Verdict.of(pieces)

    def on_close(self, conn: Connection) -> None:
        for hook in self.hooks:
            hook.on_close(conn)


@dataclass
class _ResponseFraming:
    buffer: bytearray = field(default_factory=bytearray)
    body_left: int = 0
    responses: int = 0
    opaque: bool = False


class ResponseHeadHook(Hooks):
    """Base for hooks that act per response: it frames the server's stream into responses
    (heads delimited by a blank line, bodies by Content-Length) and calls `on_head` once per
    response with the request it answers, then `on_body` for each piece of its body. The
    defaults pass the head through `rewrite_head` and bodies unchanged; a body it cannot
    delimit (chunked, or read to close) ends the framing for that connection. Rewriting a head
    (header case, "200 instead of 206", a wrong Content-Range) is a `rewrite_head` away;
    delaying, damaging or cutting a body (bench/faults.py) overrides `on_head` and `on_body`.
    The first verdict that ends the connection ends the framing too."""

    def __init__(self) -> None:
        self._framing: dict[int, _ResponseFraming] = {}

    def rewrite_head(self, conn: Connection, request: Request | None, head: bytes) -> bytes:
        del conn, request
        return head

    def on_head(self, conn: Connection, request: Request | None, head: bytes,
                body_length: int) -> Verdict:
        """A response head; `body_length` is 0 for a body-less response or one that cannot be
        delimited."""
        del body_length
        return Verdict(self.rewrite_head(conn, request, head))

    def on_body(self, conn: Connection, piece: bytes) -> Verdict:
        """The next piece of the body of the response whose head `on_head` saw last."""
        del conn
        return Verdict(piece)

    def on_close(self, conn: Connection) -> None:
        self._framing.pop(conn.id, None)

    def on_response_data(self, conn: Connection, data: bytes) -> Verdict:
        state = self._framing.setdefault(conn.id, _ResponseFraming())
        if state.opaque:
            return Verdict(data)
        if not state.buffer and len(data) <= state.body_left:  # mid-body: no copies
            state.body_left -= len(data)
            verdict = self.on_body(conn, data)
            state.opaque = verdict.end is not None
            return verdict
        state.buffer += data
        # Pieces sent one after the other: a response a hook delays starts a piece of its own,
        # so the ones before it in this chunk go out without that delay.
        pieces: list[tuple[bytes, float]] = []
        out = bytearray()
        delay = 0.0
        while state.buffer and not state.opaque:
            if state.body_left:
                take = min(state.body_left, len(state.buffer))
                verdict = self.on_body(conn, bytes(state.buffer[:take]))
                del state.buffer[:take]
                state.body_left -= take
            else:
                end = state.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(state.buffer) > MAX_HEADER_BYTES:
                        state.opaque = True
                    break
                head = bytes(state.buffer[: end + 4])
                del state.buffer[: end + 4]
                request = conn.request_answered(state.responses)
                state.responses += 1
                state.body_left, state.opaque = body_length(request, head)
                verdict = self.on_head(conn, request, head, state.body_left)
            if verdict.delay_s and out:
                pieces.append((bytes(out), delay))
                out, delay = bytearray(), 0.0
            out += verdict.data
            delay += verdict.delay_s
            if verdict.end is not None:
                state.opaque = True  # the connection ends: whatever else is buffered is moot
                return Verdict.of([*pieces, (bytes(out), delay)], verdict.end)
        if state.opaque:
            out += state.buffer
            state.buffer.clear()
        return Verdict.of([*pieces, (bytes(out), delay)])


def body_length(request: Request | None, head: bytes) -> tuple[int, bool]:
    """(body bytes to pass, whether the body cannot be delimited) for one response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    # isascii: latin-1 gives '²', which isdigit() takes and int() refuses
    status = int(parts[1]) if len(parts) > 1 and parts[1].isascii() and parts[1].isdigit() else 0
    if (request is not None and request.method == "HEAD") or status in (204, 304) or (
            100 <= status < 200):
        return 0, False
    headers = {name.strip().lower(): value.strip() for name, sep, value in
               (line.partition(":") for line in lines[1:] if line) if sep}
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return 0, True
    length = headers.get("content-length", "")
    return (int(length), False) if length.isascii() and length.isdigit() else (0, True)


class ResponseCounter:
    """Counts the responses in one connection's server->client stream as it passes, framed as
    `ResponseHeadHook` frames them, without copying bodies. A body it cannot delimit ends the
    count: the stream is then opaque until the server closes."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._head = bytearray()  # a head begun in an earlier read
        self._body_left = 0
        self._responses = 0
        self._lost = False

    def ends(self, data: bytes) -> list[int]:
        """The offsets in `data` just past each response that ends in it."""
        ends: list[int] = []
        at = 0
        while at < len(data) and not self._lost:
            if self._body_left:
                take = min(self._body_left, len(data) - at)
                at += take
                self._body_left -= take
                if not self._body_left:
                    self._responses += 1
                    ends.append(at)
                continue
            window = bytes(self._head) + data[at : at + MAX_HEADER_BYTES + 4 - len(self._head)]
            end = window.find(b"\r\n\r\n")
            if end < 0:  # the head goes on in the next read, or is not HTTP we understand
                self._lost = len(window) > MAX_HEADER_BYTES
                self._head[:] = window
                break
            at += end + 4 - len(self._head)
            self._head.clear()
            self._body_left, self._lost = body_length(
                self._conn.request_answered(self._responses), window[: end + 4])
            if not self._body_left and not self._lost:
                self._responses += 1
                ends.append(at)
        return ends


@dataclass(frozen=True)
class _Piece:
    """A slice of the client->server stream; `request` is the request it belongs to (None when
    the stream is opaque) and `head` marks the slice holding that request's head."""

    request: Request | None
    data: bytes
    head: bool


class RequestParser:
    """Splits a client->server byte stream into HTTP/1.x request heads and bodies.

    Bodies are delimited by Content-Length; anything else (chunked bodies, garbage, a huge
    head) switches the parser to opaque mode, where bytes pass on without being counted.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._body_left = 0
        self._current: Request | None = None
        self._opaque = False

    def feed(self, data: bytes) -> list[_Piece]:
        if self._opaque:
            return [_Piece(None, data, head=False)]
        self._buffer += data
        pieces: list[_Piece] = []
        while self._buffer:
            if self._body_left:
                take = bytes(self._buffer[: self._body_left])
                del self._buffer[: len(take)]
                self._body_left -= len(take)
                pieces.append(_Piece(self._current, take, head=False))
                continue
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    pieces.append(self._go_opaque())
                break
            head = bytes(self._buffer[: end + 4])
            request = _parse_head(head)
            if request is None:
                pieces.append(self._go_opaque())
                break
            del self._buffer[: end + 4]
            self._current = request
            pieces.append(_Piece(request, head, head=True))
            if "chunked" in request.headers.get("transfer-encoding", "").lower():
                if self._buffer:
                    pieces.append(self._go_opaque())
                else:
                    self._opaque = True
                break
            try:
                self._body_left = int(request.headers.get("content-length", "0"))
            except ValueError:
                self._opaque = True
        return pieces

    def _go_opaque(self) -> _Piece:
        self._opaque = True
        rest = bytes(self._buffer)
        self._buffer.clear()
        return _Piece(None, rest, head=False)


class RequestRouter:
    """The client->server stream of one connection, request by request: each request head is
    offered to `answer` (a hook); `route` says, per piece, which request began in it (to count
    and log), and whether the piece goes on to the server or is the hook's answer for the
    client. A request is appended to `conn.forwarded` before its head is returned, so the
    response side can pair each response with its request."""

    def __init__(self, conn: Connection,
                 answer: Callable[[Connection, Request], bytes | None]) -> None:
        self._conn = conn
        self._answer = answer
        self._parser = RequestParser()
        self._answered: Request | None = None

    def route(self, data: bytes) -> list[tuple[Request | None, bool, bytes]]:
        """(request whose head this is or None, to the server?, bytes) for each piece."""
        routed: list[tuple[Request | None, bool, bytes]] = []
        for piece in self._parser.feed(data):
            if piece.head and piece.request is not None:
                response = self._answer(self._conn, piece.request)
                if response is not None:
                    self._answered = piece.request
                    routed.append((piece.request, False, response))
                    continue
                self._answered = None
                self._conn.forwarded.append(piece.request)
                routed.append((piece.request, True, piece.data))
            elif piece.request is None or piece.request is not self._answered:
                routed.append((None, True, piece.data))
            # else: the body of a request a hook answered goes nowhere
        return routed


def _parse_head(head: bytes) -> Request | None:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    return Request(method=parts[0], target=parts[1], headers=headers)


class _InTurn:
    """The client's side of one connection, answers in request order: a hook's answer to a
    request goes after the server's answers to the requests forwarded before it, whatever
    faults delay those, and before the answers to the requests after it. The request itself is
    not forwarded: a refused request must not act on the server (an ingest), nor cost it a
    body read only to be dropped. The lock orders the two pumps' puts on the delay line."""

    def __init__(self, conn: Connection) -> None:
        self.counter = ResponseCounter(conn)
        self.lock = asyncio.Lock()
        self.sent = 0  # the server's answers wholly on the delay line
        self.owed: deque[tuple[int, bytes]] = deque()  # (server answers to wait for, answer)


class TokenBucket:
    """Bandwidth cap: each write takes its size in tokens, refilled at `rate` bytes/s.

    Tokens may go negative; the taker then sleeps off the debt, so concurrent writers share
    the rate fairly in arrival order without a lock.
    """

    def __init__(self, rate: float, *, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = 0.0

    async def take(self, size: int) -> None:
        now = asyncio.get_running_loop().time()
        if self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        self._tokens -= size
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self._rate)


@dataclass(frozen=True)
class _Item:
    due: float
    data: bytes
    end: Ending | Literal["eof"] | None


class _ConnectionEnded(Exception):
    """A hook ended the connection: stop both directions."""


class _DelayLine:
    """One direction of one connection: bytes leave `delay` seconds after they arrived, in
    order, at most at the bucket's rate."""

    def __init__(self, writer: asyncio.StreamWriter, *, delay: float,
                 bucket: TokenBucket | None, maxsize: int,
                 on_sent: Callable[[int], None]) -> None:
        self._writer = writer
        self._delay = delay
        self._bucket = bucket
        self._on_sent = on_sent
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize)

    async def put(self, data: bytes, *, extra_delay: float = 0.0,
                  end: Ending | Literal["eof"] | None = None) -> None:
        due = asyncio.get_running_loop().time() + self._delay + extra_delay
        await self._queue.put(_Item(due, data, end))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            wait = item.due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if item.data:
                if self._bucket is not None:
                    await self._bucket.take(len(item.data))
                if self._writer.is_closing():
                    raise _ConnectionEnded  # the peer went away while the data was queued
                self._writer.write(item.data)
                await self._writer.drain()
                self._on_sent(len(item.data))
            if item.end == "eof":
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            if item.end == "reset":
                _abort_with_rst(self._writer)
                raise _ConnectionEnded
            if item.end == "close":
                raise _ConnectionEnded


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class TrafficCounters:
    """Traffic through one proxy since the last reset. `bytes_down` is what the server sent
    and the proxy delivered to clients (response heads included)."""

    connections: int = 0
    requests: int = 0
    answered_by_hooks: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    request_log: list[dict[str, str | int | None]] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        return {
            "connections": self.connections, "requests": self.requests,
            "answered_by_hooks": self.answered_by_hooks, "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down, "request_log": list(self.request_log),
        }

    def record(self, conn: Connection, request: Request, log_limit: int) -> None:
        """A request head seen on `conn`: count it and log it (the last `log_limit` kept)."""
        conn.requests.append(request)
        self.requests += 1
        self.request_log.append({"conn": conn.id, "method": request.method,
                                 "path": request.path, "target": request.target,
                                 "range": request.range})
        if len(self.request_log) > log_limit:
            del self.request_log[: len(self.request_log) - log_limit]


class LatencyProxy:
    """The proxy on the running event loop: `await start()`, read `counters`, `await close()`."""

    def __init__(self, config: ProxyConfig, *, hooks: Hooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self.counters = TrafficCounters()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._up_bucket, self._down_bucket = self._buckets()

    def _buckets(self) -> tuple[TokenBucket | None, TokenBucket | None]:
        rate = self.config.profile.rate_bytes_per_s
        if rate is None:
            return None, None
        return (TokenBucket(rate, burst=self.config.chunk_size),
                TokenBucket(rate, burst=self.config.chunk_size))

    def reset_counters(self) -> None:
        self.counters = TrafficCounters()

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._accept, self.config.listen_host, self.config.listen_port,
            limit=self.config.chunk_size)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # the proxy is closing: this task is the connection's top level, end quietly
        finally:
            self._tasks.discard(task)

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        conn = Connection(id=next(self._ids))
        delay = self.config.profile.one_way_delay_s
        if delay:
            await asyncio.sleep(2 * delay)  # the TCP handshake's round trip
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self.config.upstream_host, self.config.upstream_port,
                limit=self.config.chunk_size)
        except OSError:
            client_writer.close()
            return
        up = _DelayLine(server_writer, delay=delay, bucket=self._up_bucket,
                        maxsize=self.config.queue_chunks, on_sent=self._count_up)
        down = _DelayLine(client_writer, delay=delay, bucket=self._down_bucket,
                          maxsize=self.config.queue_chunks,
                          on_sent=lambda n: self._count_down(conn, n))
        turn = _InTurn(conn)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump_requests(conn, client_reader, up, down, turn))
                group.create_task(self._pump_responses(conn, server_reader, down, turn))
                group.create_task(up.run())
                group.create_task(down.run())
        except* (OSError, _ConnectionEnded):
            pass  # a peer went away or a hook ended the connection: nothing to report
        finally:
            self.hooks.on_close(conn)
            for writer in (client_writer, server_writer):
                writer.close()
            for writer in (client_writer, server_writer):
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    def _count_up(self, size: int) -> None:
        self.counters.bytes_up += size

    def _count_down(self, conn: Connection, size: int) -> None:
        self.counters.bytes_down += size
        conn.bytes_down += size

    async def _pump_requests(self, conn: Connection, reader: asyncio.StreamReader,
                             up: _DelayLine, down: _DelayLine, turn: _InTurn) -> None:
        router = RequestRouter(conn, self.hooks.on_request)
        forwarded = 0
        while data := await reader.read(self.config.chunk_size):
            for request, to_server, piece in router.route(data):
                if request is not None:
                    self.counters.record(conn, request, self.config.log_limit)
                if to_server:
                    forwarded += request is not None
                    await up.put(piece)
                    continue
                self.counters.answered_by_hooks += 1
                async with turn.lock:
                    if turn.owed or turn.sent < forwarded:
                        turn.owed.append((forwarded, piece))
                    else:
                        await down.put(piece)
        await up.put(b"", end="eof")

    async def _pump_responses(self, conn: Connection, reader: asyncio.StreamReader,
                              down: _DelayLine, turn: _InTurn) -> None:
        while data := await reader.read(self.config.chunk_size):
            async with turn.lock:
                # The read goes to the hooks whole, unless a hook's answer falls due within it:
                # then in parts, the answer between them.
                start = 0
                for end in turn.counter.ends(data):
                    turn.sent += 1
                    if turn.owed and turn.owed[0][0] <= turn.sent:
                        if await self._pass_response_data(conn, data[start:end], down):
                            return
                        start = end
                    while turn.owed and turn.owed[0][0] <= turn.sent:
                        await down.put(turn.owed.popleft()[1])
                if start < len(data) and await self._pass_response_data(conn, data[start:],
                                                                        down):
                    return
        await down.put(b"", end="eof")

    async def _pass_response_data(self, conn: Connection, data: bytes,
                                  down: _DelayLine) -> bool:
        """Server data through the hooks onto the delay line; whether a hook ended the
        connection."""
        delay = 0.0
        for piece in self.hooks.on_response_data(conn, data).pieces():
            delay += piece.delay_s  # a piece waits for those before it too
            await down.put(piece.data, extra_delay=delay, end=piece.end)
            if piece.end is not None:
                return True
        return False


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it roughly halves the proxy's CPU per byte), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ProxyThread:
    """A `LatencyProxy` on its own event loop in a daemon thread, for synchronous callers
    (tests, or a harness that wants the proxy in-process with custom `Hooks`)."""

    def __init__(self, config: ProxyConfig, *, hooks: Hooks | None = None) -> None:
        self.proxy = LatencyProxy(config, hooks=hooks)
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="latency-proxy")

    @property
    def url(self) -> str:
        return f"http://{self.proxy.config.listen_host}:{self.proxy.port}"

    def start(self) -> ProxyThread:
        self._thread.start()
        self._call(self.proxy.start())
        return self

    def counters(self) -> dict[str, Any]:
        async def snap() -> dict[str, Any]:
            return self.proxy.counters.snapshot()
        return self._call(snap())

    def reset_counters(self) -> None:
        async def reset() -> None:
            self.proxy.reset_counters()
        self._call(reset())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self.proxy.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
