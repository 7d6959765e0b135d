"""The hot path of `GET`/`HEAD /video/{hash}`: whole files and single byte ranges.

vcfs reads a video as many 1-16 MiB Range requests, so what the service spends per request,
beyond copying the bytes, is paid hundreds of times per file. Through FastAPI and Starlette's
FileResponse a 1 MiB range cost ~1.2 ms of CPU: the SQLite lookup of the record and five hops
to a worker thread (endpoint, open, seek, read, close), each with anyio's cancel scopes and
capacity limiter, plus routing, dependency solving and a task group watching for disconnects.
This ASGI middleware answers the common case before all that (~0.4 ms, docs/service.md):

- the blob's path, size and headers come from an in-memory `BlobIndex` (content under a hash
  never changes, so an entry stays right until DELETE, which calls `forget`; a blob found
  missing is looked up again);
- the bytes are read on the event loop with `preadv(RWF_NOWAIT)`, which succeeds only when
  they are in the page cache; whatever it could not read comes from a worker thread, so a
  cold disk never stalls the loop. Each chunk is read into a fresh bytearray that goes out
  as the body message as it is (uvicorn and granian take any bytes-like body), no copy; the
  first is read before the answer begins;
- chunks of VideoFileResponse's size (1 MiB), from heap memory glibc reuses
  (`keep_buffers_in_heap`); a body of several chunks watches for the client leaving and
  lets other requests run between chunks.

Everything else goes on to the FastAPI route unchanged, which answers it as before: a hash not
well-formed or unknown, a blob that has just disappeared, several ranges, a malformed or
unsatisfiable Range, If-Range and the other conditional headers, a request with a body, and
one whose lookup or first read could not have a thread (a limit on threads: the route may
find one of its own idle, or answer 503, thread_refusals.py). So every error, the OpenAPI
document and the headers stay those of the route; this path only answers what it would have
answered.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import formatdate

from starlette.types import ASGIApp, Receive, Scope, Send

from vidcache.conditional import FIELDS as CONDITIONAL_FIELDS
from vidcache.errors import VidcacheError
from vidcache.ranges import MalformedRange, UnsatisfiableRange, parse_range
from vidcache.store import Store, is_content_hash
from vidcache_client._malloc import set_malloc_options
from vidcache_client._threads import thread_refused

# One response body message per MiB, like VideoFileResponse: bounded memory per connection,
# few enough messages that their cost is small next to the copy.
CHUNK_SIZE = 1024 * 1024
# Entries are ~0.5 KiB; this many covers any working set vcfs produces.
INDEX_CAPACITY = 16_384
# Content never changes under its hash, so any cache may keep it forever.
CACHE_CONTROL = "public, max-age=31536000, immutable"

# Requests with these are answered by the route: conditional ones, and those with a body.
_ROUTES_HEADERS = frozenset({b"if-range", *CONDITIONAL_FIELDS, b"content-length",
                             b"transfer-encoding"})
_PREFIX = "/video/"
_PATH_LENGTH = len(_PREFIX) + 64
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14; elsewhere every read is threaded
# The malloc options keep_buffers_in_heap sets.
_MMAP_THRESHOLD = 16 * 1024 * 1024  # above any chunk buffer
_TRIM_THRESHOLD = 64 * 1024 * 1024  # free heap kept for reuse: a few dozen chunks in flight


def keep_buffers_in_heap() -> None:
    """Make glibc serve the 1 MiB chunk buffers from its heap, reusing freed ones. By default
    it maps each fresh (its threshold adapts only while one buffer at a time is live, not the
    several of a multi-chunk response waiting in the socket's queue), and first-touch page
    faults on a fresh mapping cost ~0.5 ms per MiB on a VM: more than reading and sending the
    MiB. A no-op where the C library has no mallopt (not glibc)."""
    set_malloc_options({"M_MMAP_THRESHOLD": _MMAP_THRESHOLD, "M_TRIM_THRESHOLD": _TRIM_THRESHOLD})


@dataclass(frozen=True, slots=True)
class Blob:
    """What serving a video needs, taken from its record and its file once."""

    path: str
    size: int
    # the headers the route's FileResponse sends, in its order: these, then content-length,
    # last-modified and (for a range) content-range
    headers: tuple[tuple[bytes, bytes], ...]
    last_modified: tuple[bytes, bytes]


class BlobIndex:
    """hash -> Blob, filled from the store on first use and bounded (oldest entry goes).

    `forget` is called after a DELETE commits; a lookup that began before it does not store
    its (stale) answer, so a deleted video is never served from here once DELETE answered."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._blobs: OrderedDict[str, Blob] = OrderedDict()
        self._forgotten = 0  # counts forget() calls: a lookup seeing it move drops its answer
        self._lock = threading.Lock()  # lookups run in worker threads, forget in the endpoint

    def cached(self, content_hash: str) -> Blob | None:
        return self._blobs.get(content_hash)

    def load(self, content_hash: str) -> Blob | None:
        """The blob from the store (blocking: call it from a worker thread); None if there is
        no such video or its file is gone."""
        with self._lock:
            generation = self._forgotten
        record = self._store.get(content_hash)
        if record is None:
            return None
        path = str(self._store.blob_path(record))
        try:
            stat_result = os.stat(path)
        except FileNotFoundError:
            return None
        headers = (
            (b"etag", f'"{content_hash}"'.encode()),
            (b"cache-control", CACHE_CONTROL.encode()),
            (b"content-type", record.mime_type.encode("latin-1")),
            (b"accept-ranges", b"bytes"),
        )
        last_modified = formatdate(stat_result.st_mtime, usegmt=True).encode()
        blob = Blob(path=path, size=stat_result.st_size, headers=headers,
                    last_modified=(b"last-modified", last_modified))
        with self._lock:
            if self._forgotten == generation:
                self._blobs[content_hash] = blob
                while len(self._blobs) > INDEX_CAPACITY:
                    self._blobs.popitem(last=False)
        return blob

    def forget(self, content_hash: str) -> None:
        with self._lock:
            self._forgotten += 1
            self._blobs.pop(content_hash, None)


class _Fallback(Exception):
    """This request is the route's to answer (nothing has been sent yet)."""


class VideoFastPath:
    """ASGI middleware serving GET/HEAD /video/{hash} from a BlobIndex (see module doc)."""

    def __init__(self, app: ASGIApp, *, index: BlobIndex, chunk_size: int = CHUNK_SIZE) -> None:
        self._app = app
        self._index = index
        self._chunk_size = chunk_size
        self._nowait = _NOWAIT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (scope["type"] != "http" or len(path) != _PATH_LENGTH
                or not path.startswith(_PREFIX) or scope["method"] not in ("GET", "HEAD")):
            await self._app(scope, receive, send)
            return
        try:
            await self._serve(scope, receive, send, path[len(_PREFIX):])
        except _Fallback:
            await self._app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send,
                     content_hash: str) -> None:
        range_header: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"range":
                if range_header is not None:
                    raise _Fallback
                range_header = value
            elif name in _ROUTES_HEADERS:
                raise _Fallback  # the route's business: If-Range, and a body BodyLimit reads
        if not is_content_hash(content_hash):
            raise _Fallback
        loop = asyncio.get_running_loop()
        blob = self._index.cached(content_hash)
        if blob is None:
            try:
                blob = await loop.run_in_executor(None, self._index.load, content_hash)
            except VidcacheError as exc:  # an unreadable index: the route answers its error
                raise _Fallback from exc
            except RuntimeError as exc:
                if not thread_refused(exc):
                    raise
                raise _Fallback from exc
            if blob is None:
                raise _Fallback  # the route says 404
        if range_header is None:
            start, end, status = 0, blob.size, 200
        else:
            try:
                ranges = parse_range(range_header.decode("latin-1"), blob.size)
            except (MalformedRange, UnsatisfiableRange) as exc:
                raise _Fallback from exc  # the route answers 400 / 416 with its details
            if len(ranges) != 1:
                raise _Fallback  # multipart/byteranges
            (start, end), status = ranges[0], 206
        try:
            fd = os.open(blob.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:  # deleted (DELETE forgets it) or moved meanwhile
            self._index.forget(content_hash)
            raise _Fallback from exc
        try:
            headers = [*blob.headers, (b"content-length", str(end - start).encode()),
                       blob.last_modified]
            if status == 206:
                headers.append((b"content-range",
                                f"bytes {start}-{end - 1}/{blob.size}".encode()))
            head = {"type": "http.response.start", "status": status, "headers": headers}
            if scope["method"] == "HEAD" or start == end:
                await send(head)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            try:
                chunk = await self._read(fd, start, min(self._chunk_size, end - start), loop)
            except RuntimeError as exc:
                if not thread_refused(exc):
                    raise
                raise _Fallback from exc
            await send(head)
            await self._send_bytes(fd, start, end, chunk, receive, send, loop)
        finally:
            os.close(fd)

    async def _send_bytes(self, fd: int, start: int, end: int, chunk: bytearray,
                          receive: Receive, send: Send,
                          loop: asyncio.AbstractEventLoop) -> None:
        """Send bytes [start, end), the first of them `chunk`."""
        # Over ASGI 2.3 a send after the client left is silently dropped: a long body watches
        # for the disconnect so it stops reading the file. A single chunk just goes.
        watcher = (asyncio.ensure_future(_disconnected(receive))
                   if end - start > self._chunk_size else None)
        try:
            while True:
                start += len(chunk)
                await send({"type": "http.response.body", "body": chunk,
                            "more_body": start < end})
                if start == end:
                    return
                if watcher is not None:
                    if watcher.done():
                        return
                    await asyncio.sleep(0)  # let other connections in between chunks
                chunk = await self._read(fd, start, min(self._chunk_size, end - start), loop)
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _read(self, fd: int, offset: int, length: int,
                    loop: asyncio.AbstractEventLoop) -> bytearray:
        """Exactly `length` bytes at `offset`: from the page cache right here when they are
        there, the rest from a worker thread."""
        buffer = bytearray(length)
        got = 0
        if self._nowait:
            try:
                got = os.preadv(fd, [buffer], offset, self._nowait)
            except BlockingIOError:  # not in the page cache
                got = 0
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = 0  # this file system does not offer RWF_NOWAIT: always thread
                got = 0
        if got < length:
            # its own descriptor: closing ours (say, on cancellation) cannot hit the thread's
            lent = _LentDescriptor(fd)
            try:
                await loop.run_in_executor(None, _read_into, lent, memoryview(buffer)[got:],
                                           offset + got)
            finally:
                lent.close_unless_taken()
        return buffer


class _LentDescriptor:
    """A duplicate of a descriptor for a read in a worker thread, closed by whoever takes it:
    the thread once it starts, or the request if the read never started. A read still waiting
    for a thread when its request is cancelled (uvicorn's shutdown cancels the requests left
    when its grace period is over) never runs, nor does one an executor that has shut down
    refuses; the thread cannot close what it never got."""

    __slots__ = ("_fd", "_lock")

    def __init__(self, fd: int) -> None:
        self._fd: int | None = os.dup(fd)
        self._lock = threading.Lock()  # the thread and the request may take it at once

    def take(self) -> int | None:
        """The descriptor, now the caller's to close; None if it was taken already."""
        with self._lock:
            fd, self._fd = self._fd, None
        return fd

    def close_unless_taken(self) -> None:
        fd = self.take()
        if fd is not None:
            os.close(fd)


def _read_into(lent: _LentDescriptor, view: memoryview, offset: int) -> None:
    """Fill `view` at `offset` from the descriptor `lent` and close it (runs in a worker
    thread); nothing if the request gave up on this read and took the descriptor back."""
    fd = lent.take()
    if fd is None:
        return
    try:
        while view:
            got = os.preadv(fd, [view], offset)
            if got == 0:
                raise OSError(f"blob shorter than its recorded size (at byte {offset})")
            view = view[got:]
            offset += got
    finally:
        os.close(fd)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
