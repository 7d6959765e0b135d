"""uvicorn's HTTP/1.1 protocol (httptools) with one fix: when a client leaves, every request of
its connection is told, not only the newest.

A client may send several requests at once (HTTP/1.1 pipelining: vidcache_client asks for a
video's metadata, digest page and first bytes in one go, vcfs's readahead queues ranges).
uvicorn answers them one after another, but on connection loss it marks only the last request
it read as disconnected. The one being answered then (say the second of three, after the
client read the first answer, a 404, and closed) goes on, and its answer is written to the
closed socket, which uvloop refuses with RuntimeError: logged as "Exception in ASGI
application" with a 50-line traceback, for what is just a client leaving. Here every request
not yet answered is marked, as uvicorn marks a lone one: its sends are dropped, `receive()`
says `http.disconnect` (so a long body stops being read), and nothing is logged.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


class PipelinedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unanswered: list[RequestResponseCycle] = []

    def on_headers_complete(self) -> None:
        super().on_headers_complete()  # makes self.cycle the new request's
        self._unanswered = [cycle for cycle in self._unanswered if not cycle.response_complete]
        if self.cycle is not None and self.cycle not in self._unanswered:
            self._unanswered.append(self.cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for cycle in self._unanswered:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._unanswered.clear()
