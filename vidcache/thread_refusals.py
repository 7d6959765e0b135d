"""Requests whose thread could not be started (a limit on threads: vidcache_client._threads).

The service starts threads as requests come: anyio's worker threads (up to 40, started when
none is idle) run the plain-`def` routes, the ingests and FileResponse's file reads; the event
loop's executor (up to min(32, cores + 4)) the fast path's lookups and reads of cold bytes
(serving.py); an ingest starts a thread for its host-name lookup (resolver.py), ffprobe and
ffmpeg (tools.py) and a timer closing idle origin connections (origin_sockets.py). Where a start
is refused, the service's own code raises OutOfThreads (503) or does without the thread (the
timer, the fast path); anyio's refusals, a RuntimeError, reached uvicorn: a 500 and a
traceback per request.

This middleware, outermost but for Starlette's error handler, is where those become an answer:
a request refused before its answer began is answered 503 with OutOfThreads' message; one whose
answer was under way (a read after the headers went) is cut short, the connection closed, so
its client sees fewer bytes than announced. Either makes a log line naming the request, its
repeats counted (failure_log.py). The threads running go on, and the next request that finds
one idle or can start one is served.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vidcache.errors import OutOfThreads, error_body
from vidcache.failure_log import FailureLog
from vidcache_client._threads import thread_refused


class ThreadRefusals:
    def __init__(self, app: ASGIApp, *, failures: FailureLog) -> None:
        self._app = app
        self._failures = failures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        answering = False

        async def send_noting_start(message: Message) -> None:
            nonlocal answering
            answering = answering or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, send_noting_start)
        except RuntimeError as exc:
            if not thread_refused(exc):
                raise
            refusal = OutOfThreads()
            outcome = "cut short" if answering else f"failed ({refusal.status_code})"
            self._failures.failed((refusal.status_code, outcome), logging.WARNING,
                                  f"{scope['method']} {scope['path']} {outcome}: {refusal}",
                                  path=scope["path"])
            if answering:
                return  # uvicorn closes the connection
            body = error_body(str(refusal))
            await send({"type": "http.response.start", "status": refusal.status_code,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
