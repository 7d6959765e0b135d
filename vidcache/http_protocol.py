"""uvicorn's HTTP/1.1 protocol (httptools) with fixes: when a client leaves, every request of its
connection is told, not only the newest; a request that cannot be parsed is refused after the
answers owed to the requests before it, not ahead of them; a Host is required; a request's
head is capped.

A client may send several requests at once (HTTP/1.1 pipelining: vidcache_client asks for a
video's metadata, digest page and first bytes in one go, vcfs's readahead queues ranges).
uvicorn answers them one after another, but on connection loss it marks only the last request
it read as disconnected. The one being answered then (say the second of three, after the
client read the first answer, a 404, and closed) goes on, and its answer is written to the
closed socket, which uvloop refuses with RuntimeError: logged as "Exception in ASGI
application" with a 50-line traceback, for what is just a client leaving. Here every request
not yet answered is marked, as uvicorn marks a lone one: its sends are dropped, `receive()`
says `http.disconnect` (so a long body stops being read), and nothing is logged.

A request llhttp cannot parse, uvicorn answers 400 at once and closes the connection: that
400 went out before (and so in place of) the answers to the well-formed requests sent ahead
of it, which were then dropped. RFC 9112 (9.3.2) wants answers in the order of the requests,
so here the refusal waits until those are sent. It is JSON `{"detail"}`, like every other
error of the service.

An HTTP/1.1 request without exactly one Host header field is refused 400 (RFC 9112 3.2).

Every refusal is logged once, with the client and the reason: `refused a request from
HOST:PORT (400): malformed HTTP request: ...`. uvicorn's own line for a request it cannot parse
(`Invalid HTTP request received.`, with neither) is dropped by `without_uvicorns_parse_warning`;
a request without Host, or with too long a head, was refused without any line naming whom.

A connection is closed once its client has been silent for the keep-alive timeout while the
service waits for it: uvicorn arms that timeout only once an answer is sent, so a connection on
which the client had sent no request yet, or part of one, stayed open for good when the client
went away without a word (a machine switched off, a network cut): a descriptor each, for as
long as the service ran. A connection with an answer under way is never closed for that.

A request's head is capped (MAX_HEAD_BYTES): httptools gathers a header field by concatenating
bytes objects, which is quadratic in its length and runs on the event loop, so one client
sending a 64 MiB header stalled every other request for 4 s (and the server kept its 400 MB
of a longer one). Past the cap the request is refused 431, or 414 when its target alone is
longer than httptools can parse, and nothing more of the connection is read. The cap counts
the head's bytes after the read it began in (a read is up to 256 KiB): what one read brings is
parsed in one go, at no quadratic cost, so a head of up to 384 KiB may pass.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from vidcache.errors import error_body

# More than any client of the service sends (a /resolve of an 8192-character URL, encoded, is
# under 25 KiB), and small enough that gathering it costs little.
MAX_HEAD_BYTES = 128 * 1024
# httptools.parse_url cannot parse a longer request target (its offsets are 16-bit).
MAX_TARGET_BYTES = 65_535
# How long a refused connection is still read (and dropped) once its refusal is sent: closed
# with the client's bytes unread, the kernel would reset it, and the client could lose the
# refusal before reading it (RFC 9112 9.6).
LINGER_SECONDS = 2.0


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a refused request (httptools then raises an
    HttpParserError, which uvicorn answers with send_400_response)."""


class PipelinedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unanswered: list[RequestResponseCycle] = []
        # The refusal that ends this connection, once the requests before it are answered
        # (b"" once sent).
        self._refusal: bytes | None = None
        # Bytes fed to the parser since the current request's head began (not counting the
        # piece it began in); None outside a head.
        self._head_bytes: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_client()

    def data_received(self, data: bytes) -> None:
        self._feed(data)
        self._await_client()

    def _await_client(self) -> None:
        """While the connection waits for the client with no answer under way (no request
        yet, a head or a body begun), close it once the client has said nothing for the
        keep-alive timeout, as uvicorn closes one idle between requests (only then: a client
        gone without a word, a machine switched off or a network cut, left its connection
        open for good if it had sent no request yet, or part of one)."""
        if (self.timeout_keep_alive_task is not None or self._refusal is not None
                or self.transport.is_closing()):
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # its body still to come, the application waiting for it (not for the previous
            # answers to be sent, or for it to read what is in)
            waiting = cycle.more_body and not cycle.response_started and not (
                self.flow.read_paused)
        else:
            waiting = True
        if waiting:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _feed(self, data: bytes) -> None:
        # Within a head, the parser gets no more than the head may still take: what follows
        # it in the same piece (the next pipelined requests, a body) is not the head's.
        while self._refusal is None:  # refused: nothing more is read
            if self._head_bytes is None:
                super().data_received(data)
                return
            room = MAX_HEAD_BYTES - self._head_bytes
            if room <= 0:
                if len(self.url) > MAX_TARGET_BYTES:
                    self._refuse(414, f"request target longer than {MAX_TARGET_BYTES} bytes")
                else:
                    self._refuse(431, f"request head (request line and header fields) longer "
                                      f"than {MAX_HEAD_BYTES} bytes")
                return
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if not data:
                return

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        hosts = sum(1 for name, _ in self.headers if name == b"host")
        if hosts != 1 and self.parser.get_http_version() == "1.1":
            # RFC 9112 3.2: which one would a proxy in front have used?
            self._refuse(400, f"an HTTP/1.1 request needs exactly one Host header field; "
                              f"this one has {hosts}")
            raise _Refused  # stops the parser: nothing more of the connection is read
        super().on_headers_complete()  # makes self.cycle the new request's
        self._unanswered = [cycle for cycle in self._unanswered if not cycle.response_complete]
        if self.cycle is not None and self.cycle not in self._unanswered:
            self._unanswered.append(self.cycle)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._send_refusal_when_due()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser refused (`msg` is its generic text); a
        no-op after _Refused, whose refusal is already decided."""
        if len(getattr(self, "url", b"")) > MAX_TARGET_BYTES:  # parse_url gave up on it
            self._refuse(414, f"request target longer than {MAX_TARGET_BYTES} bytes")
        else:
            self._refuse(400, "malformed HTTP request: it does not follow HTTP/1.1's syntax "
                              "(RFC 9112)")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for cycle in self._unanswered:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._unanswered.clear()

    def _refuse(self, status: int, detail: str) -> None:
        """Answer `status` with `detail` after the requests before it; then the connection
        ends."""
        if self._refusal is not None:
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        self.logger.warning("refused a request from %s (%d): %s", client, status, detail)
        body = error_body(detail)
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in
                 self.server_state.default_headers]
        head += [b"content-type: application/json\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self._refusal = b"".join(head) + body
        self._send_refusal_when_due()

    def _send_refusal_when_due(self) -> None:
        if not self._refusal or self.transport.is_closing():
            return  # none, or sent
        if any(not cycle.response_complete for cycle in self._unanswered):
            return  # the answer being sent, or one queued, goes first
        self.transport.write(self._refusal)
        self._refusal = b""
        self.transport.write_eof()  # closed when the client closes too, or after the linger
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


def without_uvicorns_parse_warning(record: logging.LogRecord) -> bool:
    """A filter for uvicorn's error log: its line for a request it cannot parse says neither
    who sent it nor why; `_refuse` logs the refusal with both."""
    return record.msg != _UVICORNS_PARSE_WARNING


_UVICORNS_PARSE_WARNING = "Invalid HTTP request received."
