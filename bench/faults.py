"""Faults for the latency proxy (bench/proxy.py), chosen per test and switched on and off at
run time from any thread.

    faults = FaultInjector()
    with ProxyThread(ProxyConfig(upstream_port=port), hooks=faults) as proxy:
        faults.enable(Reset(after_bytes=1000), times=1)   # the next matching response only
        faults.enable(Refuse(status=503), times=3)         # a burst of three 503s
        faults.enable(Stall(seconds=10))                   # every matching response, until...
        faults.disable(Stall(seconds=10))                  # ...switched off (or faults.clear())
        faults.injected()                                  # {"reset": 1, "refuse": 3, ...}

The faults (small frozen dataclasses; `kind` names each one in `injected()`):

| fault | what the client sees |
|---|---|
| `Latency(seconds)` | the response starts `seconds` later |
| `Bandwidth(bytes_per_s)` | matching bodies share one link of that rate |
| `Stall(seconds, after_bytes)` | no bytes for `seconds` after about `after_bytes` of the body |
| `Reset(after_bytes)` | a TCP RST after `after_bytes` of the body (at most all but one byte) |
| `Truncate(after_bytes)` | a FIN after `after_bytes` of the body (idem): a short body |
| `Refuse(status)` | the proxy answers `status` (503 by default) itself, in turn; server not asked |
| `Status200()` | a 206 relabelled 200 without Content-Range (the ranged body, unchanged) |
| `FullBody200(content)` | a ranged GET answered 200 + the WHOLE video (Range ignored) |
| `WrongContentRange(shift)` | Content-Range moved by `shift` bytes, body and length unchanged |
| `FlipByte(at)` | one body byte inverted (the middle one by default) |
| `Trickle(seconds_per_byte)` | the answer from its head on, a byte at a time (slow-loris) |
| `Overlong(extra)` | `extra` bytes sent after the body, beyond its Content-Length |

`Bandwidth` here can be switched at run time, unlike the proxy's `LinkProfile` rate cap, which
is fixed when the proxy starts (use that for a whole run at one rate).

Matching: a fault damages only video byte requests (`GET /video/<hash>` with a Range header)
unless given another `match` (`any_request`, `path_prefix("/meta/")`, any predicate on
`bench.proxy.Request`). With `times=N` a fault applies to the next N matching responses and
then switches itself off; without, until disabled. What applies to a response is decided when
its head passes (for `Refuse` and `FullBody200`, when the request does), so switching faults
never damages half a response.

`Trickle` also trickles whatever follows on that connection (and what came before the answer's
head in the same chunk of the server's stream): meant for small answers (`/meta`, `/chunks`, a
listing page), whose every receive then gets a byte in time while the whole takes minutes.

Granularity: the proxy hands hooks the server's bytes in chunks (up to 256 KiB) and a hook can
only delay a whole chunk, so `Stall` and `Bandwidth` act at chunk boundaries (the stall starts
before the chunk holding byte `after_bytes`); `Reset`, `Truncate` and `FlipByte` are exact.

Hooks run on the proxy's event loop; the table of active faults and the counters are guarded
by one lock, so tests may switch faults from their own threads while requests flow.
"""

from __future__ import annotations

import functools
import http
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.proxy import Connection, Ending, Request, ResponseHeadHook, Verdict

Match = Callable[[Request], bool]

_VIDEO_PATH = re.compile(r"/video/[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(rb"(?im)^content-range:[ \t]*bytes[ \t]+(\d+)-(\d+)/(\d+)[ \t]*\r\n")


def video_range_requests(request: Request) -> bool:
    """`GET /video/<hash>` with a Range header: the requests that carry video bytes."""
    return (request.method == "GET" and request.range is not None
            and _VIDEO_PATH.fullmatch(request.path) is not None)


def any_request(request: Request) -> bool:
    del request
    return True


def path_prefix(prefix: str) -> Match:
    """Requests whose path starts with `prefix` (e.g. "/meta/", "/videos")."""
    def match(request: Request) -> bool:
        return request.path.startswith(prefix)
    return match


# ---------------------------------------------------------------------------------------------
# The faults


@dataclass(frozen=True, kw_only=True)
class Fault:
    match: Match = field(default=video_range_requests, compare=False)

    @property
    def kind(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()


@dataclass(frozen=True, kw_only=True)
class Latency(Fault):
    seconds: float


@dataclass(frozen=True, kw_only=True)
class Bandwidth(Fault):
    bytes_per_s: float


@dataclass(frozen=True, kw_only=True)
class Stall(Fault):
    seconds: float
    after_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class Reset(Fault):
    after_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class Truncate(Fault):
    after_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class Refuse(Fault):
    status: int = 503
    detail: str = "injected by the fault proxy"


@dataclass(frozen=True, kw_only=True)
class Status200(Fault):
    pass


@dataclass(frozen=True, kw_only=True)
class FullBody200(Fault):
    # The whole video of a hash (None: leave the request alone), e.g. from the source files.
    content: Callable[[str], bytes | None] = field(compare=False)


@dataclass(frozen=True, kw_only=True)
class WrongContentRange(Fault):
    shift: int = 1


@dataclass(frozen=True, kw_only=True)
class FlipByte(Fault):
    at: int | None = None  # offset in the body; None: the middle byte


@dataclass(frozen=True, kw_only=True)
class Trickle(Fault):
    seconds_per_byte: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Overlong(Fault):
    extra: bytes = b"overlong body"


_ANSWERING = (Refuse, FullBody200)


# ---------------------------------------------------------------------------------------------
# The hook


@dataclass
class _Active:
    fault: Fault
    remaining: int | None  # responses still to damage; None: until disabled


@dataclass
class _Plan:
    """The faults applied to one response, and its progress through them."""

    faults: list[Fault]
    body_length: int = 0
    body_offset: int = 0
    stalled: bool = False

    def of(self, kind: type[Fault]) -> list[Fault]:
        return [fault for fault in self.faults if isinstance(fault, kind)]


class FaultInjector(ResponseHeadHook):
    """Proxy hooks applying the faults enabled at the moment (see module docstring). The
    framing into responses is `ResponseHeadHook`'s; this picks each response's faults when its
    head passes and applies them to the head and the body."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._active: list[_Active] = []
        self._injected: dict[str, int] = {}
        self._plans: dict[int, _Plan] = {}  # event loop only: each connection's current response
        self._link_free_at = 0.0  # event loop only: when the Bandwidth link is idle again
        self._trickling: dict[int, float] = {}  # event loop only: Trickle's pace, by connection

    # -- control, from any thread --------------------------------------------------------------

    def enable(self, fault: Fault, *, times: int | None = None) -> None:
        """Apply `fault` to the next `times` matching responses (None: until disabled)."""
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, not {times}")
        with self._lock:
            self._active.append(_Active(fault, times))

    def disable(self, fault: Fault) -> None:
        """Switch off every active fault equal to `fault`."""
        with self._lock:
            self._active = [active for active in self._active if active.fault != fault]

    def clear(self) -> None:
        with self._lock:
            self._active.clear()

    def active(self) -> list[Fault]:
        with self._lock:
            return [active.fault for active in self._active]

    def injected(self) -> dict[str, int]:
        """How many requests or responses each kind of fault has damaged so far."""
        with self._lock:
            return dict(self._injected)

    def _take(self, request: Request | None, kinds: tuple[type[Fault], ...]) -> list[Fault]:
        """The active faults of `kinds` matching `request`, counted as applied once."""
        if request is None:
            return []
        taken = []
        with self._lock:
            for active in self._active:
                if isinstance(active.fault, kinds) and active.fault.match(request):
                    taken.append(active.fault)
                    self._injected[active.fault.kind] = self._injected.get(active.fault.kind,
                                                                           0) + 1
                    if active.remaining is not None:
                        active.remaining -= 1
            self._active = [a for a in self._active if a.remaining is None or a.remaining > 0]
        return taken

    # -- hooks, on the proxy's event loop ------------------------------------------------------

    def on_request(self, conn: Connection, request: Request) -> bytes | None:
        del conn
        for fault in self._take(request, _ANSWERING)[:1]:
            if isinstance(fault, Refuse):
                return _json_response(fault.status, fault.detail)
            if isinstance(fault, FullBody200):
                content = fault.content(request.path.rsplit("/", 1)[-1])
                if content is not None:
                    return _full_body(request.path.rsplit("/", 1)[-1], content)
        return None

    def on_close(self, conn: Connection) -> None:
        super().on_close(conn)
        self._plans.pop(conn.id, None)
        self._trickling.pop(conn.id, None)

    def on_response_data(self, conn: Connection, data: bytes) -> Verdict:
        verdict = super().on_response_data(conn, data)
        pace = self._trickling.get(conn.id)
        if pace is None:
            return verdict
        pieces = verdict.pieces()
        trickled = [(piece.data[at : at + 1], (piece.delay_s if at == 0 else 0.0) + pace)
                    for piece in pieces for at in range(len(piece.data))]
        return Verdict.of(trickled or [(b"", 0.0)], pieces[-1].end)

    def on_head(self, conn: Connection, request: Request | None, head: bytes,
                body_length: int) -> Verdict:
        plan = _Plan(self._take(request, _RESPONSE_FAULTS), body_length=body_length)
        self._plans[conn.id] = plan
        for fault in plan.of(Trickle):
            assert isinstance(fault, Trickle)
            self._trickling[conn.id] = fault.seconds_per_byte
        delay = sum(fault.seconds for fault in plan.of(Latency) if isinstance(fault, Latency))
        # e.g. Reset(after_bytes=0) of a body-less answer ends the connection after its head
        ending = self._ending(plan) if body_length == 0 else None
        return Verdict(_rewrite_head(plan, head), delay, ending)

    def on_body(self, conn: Connection, piece: bytes) -> Verdict:
        plan = self._plans[conn.id]
        offset, plan.body_offset = plan.body_offset, plan.body_offset + len(piece)
        delay = 0.0
        for fault in plan.of(FlipByte):
            assert isinstance(fault, FlipByte)
            target = plan.body_length // 2 if fault.at is None else fault.at
            if offset <= target < offset + len(piece):
                flipped = bytearray(piece)
                flipped[target - offset] ^= 0xFF
                piece = bytes(flipped)
        for fault in plan.of(Stall):
            assert isinstance(fault, Stall)
            if not plan.stalled and offset + len(piece) > fault.after_bytes:
                plan.stalled = True
                delay += fault.seconds
        for fault in plan.of(Bandwidth):
            assert isinstance(fault, Bandwidth)
            now = time.monotonic()
            self._link_free_at = max(now, self._link_free_at) + len(piece) / fault.bytes_per_s
            delay += self._link_free_at - now
        if offset + len(piece) == plan.body_length:
            piece += b"".join(fault.extra for fault in plan.of(Overlong)
                              if isinstance(fault, Overlong))
        for fault in plan.of(Reset) + plan.of(Truncate):
            assert isinstance(fault, Reset | Truncate)
            cut = min(fault.after_bytes, plan.body_length - 1)  # always short of the whole body
            if offset + len(piece) > cut:
                kept = max(cut - offset, 0)
                return Verdict(piece[:kept], delay,
                               "reset" if isinstance(fault, Reset) else "close")
        return Verdict(piece, delay)

    @staticmethod
    def _ending(plan: _Plan) -> Ending | None:
        if plan.of(Reset):
            return "reset"
        if plan.of(Truncate):
            return "close"
        return None


_RESPONSE_FAULTS: tuple[type[Fault], ...] = (
    Latency, Bandwidth, Stall, Reset, Truncate, Status200, WrongContentRange, FlipByte, Trickle,
    Overlong)


def _rewrite_head(plan: _Plan, head: bytes) -> bytes:
    """Status200 and WrongContentRange act on a 206 head; anything else passes unchanged."""
    if not head.startswith((b"HTTP/1.1 206", b"HTTP/1.0 206")):
        return head
    for fault in plan.faults:
        if isinstance(fault, Status200):
            head = b"HTTP/1.1 200 OK" + head[head.index(b"\r\n"):]
            head = _CONTENT_RANGE.sub(b"", head)
        elif isinstance(fault, WrongContentRange):
            head = _CONTENT_RANGE.sub(functools.partial(_shifted_range, shift=fault.shift), head)
    return head


def _shifted_range(match: re.Match[bytes], shift: int) -> bytes:
    start, end, total = (int(group) for group in match.groups())
    if not (start + shift >= 0 and end + shift < total):
        shift = -shift  # stay a satisfiable range of the same length, just not the asked one
    return f"content-range: bytes {start + shift}-{end + shift}/{total}\r\n".encode()


def _json_response(status: int, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    reason = http.HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def _full_body(content_hash: str, content: bytes) -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            f"content-length: {len(content)}\r\naccept-ranges: bytes\r\n"
            f'etag: "{content_hash}"\r\n\r\n').encode() + content
