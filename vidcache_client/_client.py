"""VidCacheClient: the vidcache 1.x REST API over a pool of keep-alive connections.

One instance is meant to be shared by many threads: each call borrows a single-connection
httpx.Client (see `_pool` for why not one shared httpx.Client), or for `read_range_into`,
`open_video_into` and the GETs of small answers a plain socket (`_rangeconn`), at most
`max_connections` of both together, so many small ranged reads (what vcfs does) reuse warm
connections instead of paying a TCP handshake each.
Every call validates its arguments first (nothing malformed is sent), goes through `_translate`
for errors, and every byte read goes through `_verify`, so bytes are only returned when the
answer says they are exactly the asked range of the asked hash.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import httpx

from vidcache_client._credentials import basic_authorization, without_credentials
from vidcache_client._deadline import with_deadlines, within
from vidcache_client._digests import checked_digests, is_count
from vidcache_client._exceptions import InvalidRequestError, NotFoundError, ProtocolError
from vidcache_client._files import write_whole
from vidcache_client._pool import Budget, Pool
from vidcache_client._rangeconn import RangeReader, Unhandled, proxied_by_environment
from vidcache_client._translate import raise_for_status, transport_errors
from vidcache_client._validate import (
    ByteRange,
    is_int,
    parse_base_url,
    validate_byte_range,
    validate_callback,
    validate_dest,
    validate_digest_range,
    validate_digests,
    validate_hash,
    validate_meta,
    validate_page_size,
    validate_str,
    validate_url,
)
from vidcache_client._verify import body_length_error, expected_video_length, range_header

_USER_AGENT = "vidcache-client"

# The longest wait poll(2) takes, INT_MAX ms (~24.8 days): a socket timeout of 2**31 s or more
# times out at once in CPython, and one past ~9.2e9 s (inf) overflows. A longer `timeout` is
# taken as this one, which no call can tell from waiting for ever.
_LONGEST_TIMEOUT = (2**31 - 1) / 1000

# The largest `chunk_size`: httpx holds each chunk whole in memory, so a larger one (2**70 was
# taken) makes `stream_video` buffer the whole answer, which streaming is meant to avoid.
_MAX_CHUNK_SIZE = 64 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class VideoPage:
    """One page of the listing of videos (`VidCacheClient.list_videos_page`)."""

    items: list[dict[str, Any]]
    """The metadata records of the page, ordered by hash (as `list_videos` yields them)."""
    next: str | None
    """The cursor to pass as `after` for the next page; None: this page is the last."""


@dataclass(frozen=True)
class IngestUnderWay:
    """One ingest the service is running (`VidCacheClient.ingests`)."""

    url: str
    """The URL being ingested as the service shows it: as given, but without any
    `user:password@` and with the values of secret query parameters REDACTED."""
    bucket: str
    prefix: str
    phase: str
    """"queued", "downloading", "validating", "phash", "frames", "audio" or "storing" (a later
    service may add phases)."""
    bytes_received: int
    """Bytes of the origin's answer received so far (0 before the download)."""
    bytes_expected: int | None
    """The origin's Content-Length (a local file's size); None if unknown."""
    started: str
    """ISO-8601 UTC time the service got the ingest request."""


class VidCacheClient:
    """Client of a vidcache service at `base_url` (e.g. "http://127.0.0.1:8020").

    `timeout` (seconds) bounds connecting and each read/write of a request, not a whole
    download; the 300 s default leaves room for a slow ingest; one over ~24.8 days (inf too)
    waits that long, the most a socket can. `chunk_size` (1 byte to 64 MiB) is the size of the
    chunks `stream_video` yields. `user:password@` in `base_url` is sent as HTTP Basic auth
    (a reverse proxy's), and left out of `base_url` and messages. Keyword-only: `token` is
    sent as `Authorization: Bearer <token>`; `transport` replaces httpx's network transport
    (tests use httpx.MockTransport); `max_connections` bounds the connections open at once,
    shared by all threads using this client (a call finding them all busy waits up to
    `timeout` for one). `spare_connection`: whenever `read_range_into` has to open a
    connection, open one more in the background for the next concurrent ranged read (for
    callers that keep two or more in flight).
    """

    def __init__(
        self,
        base_url: str,
        timeout: float = 300.0,
        chunk_size: int = 1_048_576,
        *,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        max_connections: int = 32,
        spare_connection: bool = False,
    ) -> None:
        url = parse_base_url(base_url)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            # httpx's None (no timeout) included: a bare "'>' not supported" otherwise
            raise TypeError(f"timeout must be a number of seconds, got {timeout!r} (float('inf') "
                            "waits as long as a socket can)")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        timeout = min(timeout, _LONGEST_TIMEOUT)
        _check_positive_int("chunk_size", chunk_size, "a number of bytes",
                            "from 1 byte to 64 MiB", most=_MAX_CHUNK_SIZE)
        _check_positive_int("max_connections", max_connections, "a count", ">= 1")
        # Else taken, and failing only at the first call (AttributeError), or "no" taken as true
        if transport is not None and not isinstance(transport, httpx.BaseTransport):
            raise TypeError(f"transport must be an httpx.BaseTransport (or None), got "
                            f"{transport!r:.80}")
        if not isinstance(spare_connection, bool):
            raise TypeError(f"spare_connection must be a bool, got {spare_connection!r:.80}")
        headers = {"User-Agent": _USER_AGENT}
        if token is not None:
            if not isinstance(token, str):  # its type only: the value is a secret
                raise TypeError(f"token must be a str (or None), got {type(token).__name__}")
            if not token.strip():
                raise ValueError("token must not be empty (pass None for no token)")
            if not all(33 <= ord(ch) <= 126 for ch in token):
                # it travels in an HTTP header; a pasted trailing newline is the usual culprit
                raise ValueError("token must be printable ASCII without spaces or newlines")
            headers["Authorization"] = f"Bearer {token}"
        if url.userinfo:
            # user:password@, for a reverse proxy in front asking for HTTP Basic auth: sent
            # over the client's own sockets as over httpx, and never shown (base_url drops it)
            if token is not None:
                raise ValueError("base_url's user:password@ and token would both be the "
                                 "Authorization header: give only one")
            headers["Authorization"] = basic_authorization(url)
            url = url.copy_with(userinfo=b"")
        self.base_url = str(url).rstrip("/")
        self._timeout = timeout
        self.chunk_size = chunk_size
        # One TLS context for every pooled client: building one loads the CA bundle, about
        # 100 ms of CPU (under the GIL) that each new connection would otherwise pay.
        ssl_context = httpx.create_ssl_context()

        # An idle connection is kept a minute (httpx's default: 5 s), within the 75 s the
        # service keeps it: a lookup after a pause needs no new handshake. One the server
        # closed sooner is seen closed and replaced, not used.
        limits = httpx.Limits(max_connections=1, keepalive_expiry=60.0)

        def one_connection_client() -> httpx.Client:
            client = httpx.Client(base_url=url, timeout=timeout, headers=headers,
                                  verify=ssl_context, transport=transport, limits=limits)
            # Its own sockets (not a caller's transport) end every receive by the deadline of
            # `within`: an answer's head, a small answer whole, come within the timeout.
            return client if transport is not None else with_deadlines(client)

        self._budget = Budget(size=max_connections, wait_timeout=timeout)
        self._pool = Pool(one_connection_client, close=httpx.Client.close, budget=self._budget)
        # Ranged reads into buffers go over plain sockets when nothing in between needs httpx
        # (see `_rangeconn`); `None`: through httpx.
        self._ranges: RangeReader | None = None
        self._small_gets = True  # whether GETs of small answers go over those sockets too
        if transport is None and not proxied_by_environment(url):
            self._ranges = RangeReader(url, headers=headers, timeout=timeout,
                                       ssl_context=ssl_context, budget=self._budget,
                                       spare=spare_connection)

    def __repr__(self) -> str:
        return f"VidCacheClient({self.base_url!r})"

    def __enter__(self) -> VidCacheClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; later calls raise RuntimeError.

        Calls still running finish; their connection is closed when they do.
        """
        self._budget.close()

    def abort(self) -> None:
        """Close the client and cut the calls still running (e.g. when the program stops).

        A call over the client's own sockets (`read_range_into`, `open_video_into`, the GETs
        of small answers) fails at once with a transport error; one going through httpx
        (`ingest`, `delete`, `get_bytes`, `stream_video`, `download_to_file`, and every call
        with a custom `transport` or a proxy from the environment) still runs until it ends
        or times out.
        """
        self._budget.abort()

    # --- ingest and metadata -------------------------------------------------------------

    def ingest(
        self, url: str, bucket: str, prefix: str = "", meta: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Have the service fetch `url` and store it (deduplicated) in `bucket`/`prefix`.

        Returns {"hash", "status": "new"|"duplicate"|"url_alias", "file_path",
        "phash_distance"?}.
        """
        url, meta = validate_url(url), validate_meta(meta)
        bucket, prefix = validate_str("bucket", bucket), validate_str("prefix", prefix)
        what = f"ingest of {without_credentials(url)} into bucket {bucket!r}"
        payload = {"url": url, "bucket": bucket, "prefix": prefix, "meta": dict(meta or {})}
        result = _json_object(self._send("POST", "/ingest", what, payload=payload), what)
        _check_hash_field(result, what)
        return result

    def resolve(self, url: str) -> dict[str, Any] | None:
        """{"hash", "url"} of a URL ingested before, or None if the service does not know it."""
        url = validate_url(url)
        return self._get_record("/resolve", f"resolve of {without_credentials(url)}",
                                params={"url": url})

    def get_meta(self, content_hash: str) -> dict[str, Any] | None:
        """The stored record of a video (size_bytes, duration_s, aliases, meta...), or None."""
        content_hash = validate_hash(content_hash)
        return self._get_record(f"/meta/{content_hash}", f"metadata of video {content_hash}",
                                expected=content_hash)

    def get_chunk_digests(self, content_hash: str, *, start: int | None = None,
                          end: int | None = None) -> dict[str, Any] | None:
        """{"hash", "chunk_size", "first_chunk", "chunk_count", "digests"}, or None.

        `digests[i]` is the BLAKE3 of chunk `first_chunk + i` (chunk k: bytes k * chunk_size
        up to (k + 1) * chunk_size, the video's last chunk short); `chunk_count` counts the
        whole video's chunks. Without `start`/`end` every chunk is listed; with them (bytes,
        `end` exclusive, each optional) the chunks overlapping [start, end), none when no
        byte of it lies in the video. A server from before pages ignores them and lists every
        chunk: `first_chunk` is then 0, so always index by `first_chunk`, never assume the
        asked page came back. The chunk size is the one recorded when the video was ingested
        (1 MiB by vidcache 1.0, the server's `--chunk-size` since), so it can differ between
        videos of one service. A malformed document, or a page other than the asked one,
        raises ProtocolError.
        """
        content_hash = validate_hash(content_hash)
        start, end = validate_digest_range(start, end)
        what, params = _digests_request(content_hash, start, end)
        result = self._get_record(f"/video/{content_hash}/chunks", what, params=params or None,
                                  expected=content_hash)
        if result is None:
            return None
        return checked_digests(result, what, start=start or 0, end=end)

    def delete(self, content_hash: str) -> None:
        """Delete a video, its record and all its URL aliases; NotFoundError if unknown."""
        content_hash = validate_hash(content_hash)
        self._send("DELETE", f"/video/{content_hash}", f"delete of video {content_hash}")

    def list_videos(
        self, *, bucket: str | None = None, prefix: str | None = None, page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        """Iterate the metadata of every stored video (optionally of one bucket/prefix).

        Ordered by hash; fetches `page_size` records per request, following the server's
        `next` cursor, lazily as the iterator is consumed.
        """
        return self._iter_listing(_listing_params(bucket, prefix, page_size))

    def list_videos_page(
        self, *, after: str | None = None, bucket: str | None = None,
        prefix: str | None = None, page_size: int = 100,
    ) -> VideoPage:
        """One page of `list_videos`: the first, or the one after the cursor `after` (the
        `next` of the page before, a hash). Its `items` are up to `page_size` records ordered
        by hash; its `next` is the cursor of the page after it, None if it is the last.

        For a caller that pages by itself, e.g. to retry a failed page without starting over.
        A `next` that is not a string, or not past `after`, raises ProtocolError.
        """
        params = _listing_params(bucket, prefix, page_size)
        if after is not None:
            after = validate_hash(after)
        return self._listing_page(params, after)

    def ingests(self) -> list[IngestUnderWay]:
        """The ingests the service is running, oldest first, each with its phase and bytes so
        far: progress for an `ingest` call, which answers only once the video is stored. A
        service without this extension raises NotFoundError; a malformed answer
        ProtocolError."""
        what = "list of ingests under way"
        items = _json_object(self._send("GET", "/ingests", what), what).get("items")
        if not isinstance(items, list):
            raise ProtocolError(f"{what}: answer has no list of ingests in 'items'")
        return [_ingest_under_way(item, what) for item in items]

    def health(self) -> dict[str, Any]:
        """The service's `GET /health` answer ({"status": "ok", ...})."""
        return _json_object(self._send("GET", "/health", "health check"), "health check")

    # --- video bytes ---------------------------------------------------------------------

    def get_bytes(self, content_hash: str, byte_range: ByteRange | None = None) -> bytes:
        """The whole video, or exactly bytes start..end (INCLUSIVE) of it.

        A range reaching past the end of the video returns up to its last byte; one starting
        at or past the end raises RangeNotSatisfiableError.
        """
        with self._open_video(content_hash, byte_range) as (response, what, asked, expected):
            return b"".join(self._iter_body(response, what, asked, expected, chunk_size=None))

    @contextlib.contextmanager
    def stream_video(
        self, content_hash: str, byte_range: ByteRange | None = None
    ) -> Iterator[Iterator[bytes]]:
        """Context manager yielding an iterator of chunks of about `chunk_size` bytes.

        Status and headers are checked on entering; the iterator raises if the body ends
        short or runs long. Leaving the block closes the response (and returns its connection
        to the pool), whether or not the body was read to the end.
        """
        with self._open_video(content_hash, byte_range) as (response, what, asked, expected):
            yield self._iter_body(response, what, asked, expected, chunk_size=self.chunk_size)

    def download_to_file(
        self,
        content_hash: str,
        dest: str | os.PathLike[str],
        byte_range: ByteRange | None = None,
    ) -> int:
        """Stream a video (or a range of it) into `dest`; return the number of bytes written.

        Writes a temporary file beside `dest`, then renames it over `dest` only once every
        byte arrived and was verified: on any failure `dest` is left as it was (absent or
        with its old content) and the temporary file is removed. As writing to `dest` would,
        a symlink's target is written (the link stays), a replaced file keeps its permission
        bits, and a FIFO or a device (/dev/null) is written into directly. Local file-system
        problems raise OSError. A `dest` that is not a file path (str or os.PathLike[str])
        raises InvalidRequestError before any request.
        """
        validate_hash(content_hash)
        validate_byte_range(byte_range)
        dest = validate_dest(dest)
        return write_whole(dest, lambda out: self._stream_to(out, content_hash, byte_range))

    def read_range_into(
        self,
        content_hash: str,
        offset: int,
        buffers: Sequence[bytearray | memoryview],
        *,
        on_filled: Callable[[int], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Read the video's bytes from `offset` on into `buffers`, in order, with ONE ranged
        request for as many bytes as the buffers hold; return the number of bytes read.

        The answer is checked like `get_bytes`'s: exactly that range, or up to the video's last
        byte when the buffers reach past its end (then the buffer holding the last byte is
        filled only in part and the ones after it are left alone). `on_filled(i)` is called as
        soon as buffer `i` holds its bytes, before later ones are read, so a caller can use each
        buffer while the rest is still arriving; buffer `i` is written only between
        `on_filled(i - 1)` returning and `on_filled(i)`, so a caller that copies each buffer
        out in `on_filled` may pass the same buffer several times. `on_progress(n)` is called
        with the total received so far after each network read. An exception raised by either
        callback ends the read (the connection is closed) and propagates unchanged.

        The body is received straight into the buffers, with no intermediate copies, over
        keep-alive connections of the client's own (see docs/client.md); with a custom
        `transport`, a proxy from the environment, or a server whose answers are not framed
        by Content-Length, the read goes through httpx instead, with the same results.
        """
        content_hash = validate_hash(content_hash)
        views = _writable_views(buffers)
        validate_callback("on_filled", on_filled)
        validate_callback("on_progress", on_progress)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidRequestError(None, f"invalid offset {offset!r}",
                                      message=f"invalid offset {offset!r}: expected an int >= 0 "
                                      "(no request sent)")
        asked = (offset, offset + sum(len(view) for view in views) - 1)
        ranges = self._ranges
        if ranges is not None:
            what = f"bytes {asked[0]}-{asked[1]} of video {content_hash}"
            try:
                with transport_errors(what):
                    return ranges.read_into(content_hash, asked, views, what=what,
                                            on_filled=on_filled, on_progress=on_progress)
            except Unhandled:
                self._ranges = None  # this server's answers need httpx: use it from now on
        return self._read_range_into_streaming(content_hash, asked, views,
                                               on_filled=on_filled, on_progress=on_progress)

    def open_video_into(
        self,
        content_hash: str,
        buffers: Sequence[bytearray | memoryview],
        *,
        on_meta: Callable[[dict[str, Any] | None], None],
        digests: tuple[int | None, int | None] | None = None,
        on_digests: Callable[[dict[str, Any] | None], None] | None = None,
        on_filled: Callable[[int], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """A video's metadata, optionally a page of its chunk digests, and its first bytes, for
        the cost of one round trip: `read_range_into(content_hash, 0, buffers, ...)` with
        `get_meta` and `get_chunk_digests(start=, end=)` (`digests` = (start, end)) asked for
        on the same connection, all at once (HTTP/1.1 pipelining), on a warm connection when
        the client has one.

        `on_meta(doc)` is called with what `get_meta` returns as soon as it arrives, then
        `on_digests(doc)` likewise, then the bytes are read as by `read_range_into`, with the
        same checks and callbacks; returns their number. For a hash the service does not have,
        `on_meta(None)` is called and NotFoundError raised. An exception raised by a callback
        ends the call and propagates. Where the GETs of small answers go through httpx (see
        `read_range_into`), the three requests are made one after another.
        """
        content_hash = validate_hash(content_hash)
        views = _writable_views(buffers)
        digest_range = validate_digests(digests)
        validate_callback("on_meta", on_meta, required=True)
        for name, callback in (("on_digests", on_digests), ("on_filled", on_filled),
                               ("on_progress", on_progress)):
            validate_callback(name, callback)
        asked = (0, sum(len(view) for view in views) - 1)
        what = f"bytes {asked[0]}-{asked[1]} of video {content_hash}"
        meta_what = f"metadata of video {content_hash}"
        taken: list[str] = []  # the answers handed to the callbacks so far

        def take_meta(response: httpx.Response) -> None:
            result = _record_or_none(response, meta_what, expected=content_hash)
            on_meta(result)
            taken.append("meta")
            raise_for_status(response, meta_what)  # NotFoundError for a 404

        targets = [(f"/meta/{content_hash}", take_meta)]
        if digest_range is not None:
            digests_what, params = _digests_request(content_hash, *digest_range)

            def take_digests(response: httpx.Response) -> None:
                result = _record_or_none(response, digests_what, expected=content_hash)
                if result is not None:
                    result = checked_digests(result, digests_what, start=digest_range[0] or 0,
                                             end=digest_range[1])
                if on_digests is not None:
                    on_digests(result)
                taken.append("digests")

            target = httpx.URL(f"/video/{content_hash}/chunks", params=params or None)
            targets.append((target.raw_path.decode("ascii"), take_digests))
        ranges = self._ranges if self._small_gets else None
        if ranges is not None:
            try:
                with transport_errors(what):
                    return ranges.read_into_after(targets, content_hash, asked, views,
                                                  what=what, on_filled=on_filled,
                                                  on_progress=on_progress)
            except Unhandled:
                self._small_gets = False  # this server's answers need httpx: use it from now on
        if "meta" not in taken:
            try:  # the 404 itself, not get_meta's None: its error names the detail and request
                meta = self._fetch_record(f"/meta/{content_hash}", meta_what,
                                          expected=content_hash)
            except NotFoundError:
                on_meta(None)
                raise
            on_meta(meta)
        if digest_range is not None and "digests" not in taken and on_digests is not None:
            on_digests(self.get_chunk_digests(content_hash, start=digest_range[0],
                                              end=digest_range[1]))
        return self.read_range_into(content_hash, 0, views, on_filled=on_filled,
                                    on_progress=on_progress)

    # --- internals -----------------------------------------------------------------------

    def _stream_to(self, out: BinaryIO, content_hash: str, byte_range: ByteRange | None) -> int:
        """Write the video (or the range) into `out`; return the number of bytes written."""
        written = 0
        with self.stream_video(content_hash, byte_range) as chunks:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
        out.flush()
        return written

    def _read_range_into_streaming(
        self,
        content_hash: str,
        asked: ByteRange,
        views: Sequence[memoryview],
        *,
        on_filled: Callable[[int], None] | None,
        on_progress: Callable[[int], None] | None,
    ) -> int:
        """`read_range_into` through httpx: its body's pieces copied into the buffers."""
        with self._open_video(content_hash, asked) as (response, what, _, expected):
            received = index = filled = 0
            for piece in self._iter_body(response, what, asked, expected, chunk_size=None):
                data = memoryview(piece)
                while data:
                    view = views[index]
                    take = min(len(view) - filled, len(data))
                    view[filled : filled + take] = data[:take]
                    data = data[take:]
                    filled += take
                    received += take
                    if filled == len(view):
                        if on_filled is not None:
                            on_filled(index)
                        index, filled = index + 1, 0
                if on_progress is not None:
                    on_progress(received)
            if filled and on_filled is not None:
                on_filled(index)
            return received

    def _get_record(self, path: str, what: str, *,
                    params: Mapping[str, str | int] | None = None,
                    expected: str | None = None) -> dict[str, Any] | None:
        """GET a JSON object that names a video's hash (checked), or None on 404."""
        try:
            return self._fetch_record(path, what, params=params, expected=expected)
        except NotFoundError:
            return None

    def _fetch_record(self, path: str, what: str, *,
                      params: Mapping[str, str | int] | None = None,
                      expected: str | None = None) -> dict[str, Any]:
        """GET a JSON object that names a video's hash (checked); NotFoundError on 404."""
        result = _json_object(self._send("GET", path, what, params=params), what)
        _check_hash_field(result, what, expected=expected)
        return result

    def _send(self, method: str, path: str, what: str, *,
              params: Mapping[str, str | int] | None = None,
              payload: Mapping[str, Any] | None = None) -> httpx.Response:
        """Send a request (with `payload` as its JSON body) whose answer is small; raise for a
        non-2xx status. A GET goes over the range sockets where they are used, leaving a warm
        connection for the bytes."""
        ranges = self._ranges if self._small_gets else None
        if method == "GET" and payload is None and ranges is not None:
            target = _buildable(
                what, lambda: httpx.URL(path, params=params).raw_path.decode("ascii"))
            try:
                with transport_errors(what):
                    response = ranges.get(target)
                raise_for_status(response, what)
                return response
            except Unhandled:
                self._small_gets = False  # this server's answers need httpx: use it from now on
        body = None if payload is None else _buildable(what, lambda: _json_body(payload))
        headers = None if body is None else {"Content-Type": "application/json"}
        with transport_errors(what), self._pool.borrow() as http, within(self._timeout):
            request = _buildable(what, lambda: http.build_request(
                method, path, params=params, content=body, headers=headers))
            response = http.send(request)
        raise_for_status(response, what)
        return response

    @contextlib.contextmanager
    def _open_video(
        self, content_hash: str, byte_range: ByteRange | None
    ) -> Iterator[tuple[httpx.Response, str, ByteRange | None, int | None]]:
        """Open `GET /video/{hash}` as a stream and check its status and headers.

        Yields (response, what, asked range, expected body length) and closes the response on
        leaving.
        """
        content_hash = validate_hash(content_hash)
        asked = validate_byte_range(byte_range)
        what = (f"video {content_hash}" if asked is None
                else f"bytes {asked[0]}-{asked[1]} of video {content_hash}")
        # identity: a compressed answer would make Content-Length/Content-Range describe
        # other bytes than the ones we count.
        headers = {"Accept-Encoding": "identity"}
        if asked is not None:
            headers["Range"] = range_header(asked)
        with contextlib.ExitStack() as cleanup:
            with transport_errors(what):
                http = cleanup.enter_context(self._pool.borrow())
                request = http.build_request("GET", f"/video/{content_hash}", headers=headers)
                # The head (and an error's body) within the timeout. The body is bounded as
                # over `_rangeconn`: each receive by the timeout, and read_range_into's
                # on_progress, called after each, may give up on a trickle.
                with within(self._timeout):
                    response = http.send(request, stream=True)
                    cleanup.callback(response.close)
                    raise_for_status(response, what)
            expected = expected_video_length(response, content_hash, asked, what)
            yield response, what, asked, expected

    @staticmethod
    def _iter_body(response: httpx.Response, what: str, asked: ByteRange | None,
                   expected: int | None, *, chunk_size: int | None) -> Iterator[bytes]:
        """The body's chunks, counted against `expected`; raises if it is short or long."""
        received = 0
        with transport_errors(what):
            for chunk in response.iter_bytes(chunk_size):
                received += len(chunk)
                if expected is not None and received > expected:
                    raise body_length_error(what, asked, expected, received)
                yield chunk
        if expected is not None and received != expected:
            raise body_length_error(what, asked, expected, received)

    def _iter_listing(self, params: Mapping[str, str | int]) -> Iterator[dict[str, Any]]:
        after: str | None = None
        while True:
            page = self._listing_page(params, after)
            yield from page.items
            if page.next is None:
                return
            after = page.next

    def _listing_page(self, params: Mapping[str, str | int], after: str | None) -> VideoPage:
        """One page of `/videos` (the first, or the one after the cursor `after`), checked."""
        what = "listing of videos" + "".join(
            f" {key}={value!r}" for key, value in params.items() if key != "limit")
        page_params = dict(params) if after is None else {**params, "after": after}
        page = _json_object(self._send("GET", "/videos", what, params=page_params), what)
        items, cursor = page.get("items"), page.get("next")
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ProtocolError(f"{what}: page has no list of records in 'items'")
        # Cursors are hashes in increasing order; anything else would page forever.
        if cursor is not None and (not isinstance(cursor, str)
                                   or (after is not None and cursor <= after)):
            raise ProtocolError(f"{what}: bad 'next' cursor {cursor!r} after {after!r}")
        return VideoPage(items, cursor)


def _check_positive_int(name: str, value: object, what: str, bound: str, *,
                        most: int | None = None) -> None:
    """TypeError unless `value` is an int: a float (1.5) would be taken and fail only when
    used (a stream's first chunk), far from the mistake; ValueError if it is below 1 or above
    `most`."""
    if not is_int(value):
        raise TypeError(f"{name} must be {what} (an int), got {value!r}")
    if value < 1 or (most is not None and value > most):
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _listing_params(bucket: str | None, prefix: str | None, page_size: int
                    ) -> dict[str, str | int]:
    """The query of a listing's pages (checked)."""
    params: dict[str, str | int] = {"limit": validate_page_size(page_size)}
    # Else an int was sent as its digits, and bytes as whatever httpx makes of them
    if bucket is not None:
        params["bucket"] = validate_str("bucket", bucket)
    if prefix is not None:
        params["prefix"] = validate_str("prefix", prefix)
    return params


def _ingest_under_way(item: object, what: str) -> IngestUnderWay:
    """An item of `GET /ingests`, checked."""
    if isinstance(item, dict):
        url, bucket, prefix, phase, started = (
            item.get(name) for name in ("url", "bucket", "prefix", "phase", "started"))
        received, expected = item.get("bytes_received"), item.get("bytes_expected")
        if (isinstance(url, str) and isinstance(bucket, str) and isinstance(prefix, str)
                and isinstance(phase, str) and isinstance(started, str)
                and is_count(received) and (expected is None or is_count(expected))):
            return IngestUnderWay(url, bucket, prefix, phase, received, expected, started)
    raise ProtocolError(f"{what}: malformed ingest {item!r:.200}")


def _digests_request(content_hash: str, start: int | None, end: int | None
                     ) -> tuple[str, dict[str, int]]:
    """What a `get_chunk_digests` call is (for messages), and its query parameters."""
    params = {name: value for name, value in (("start", start), ("end", end))
              if value is not None}
    what = f"chunk digests of video {content_hash}"
    if params:
        what += f" for bytes [{start or 0}, {'end' if end is None else end})"
    return what, params


def _buildable(what: str, build: Callable[[], T]) -> T:
    """`build()`: a request, or its target, made of the caller's arguments. Those it cannot be
    made of (a URL or bucket too long for a URL, a string with a lone surrogate, meta that is
    not standard JSON) raise InvalidRequestError like any bad argument, not httpx's
    InvalidURL (neither a VidCacheError nor a ValueError) or a bare encoding error."""
    try:
        return build()
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        detail = f"cannot be sent: {exc}"
        raise InvalidRequestError(None, detail,
                                  message=f"{what}: {detail} (no request sent)") from exc


def _json_body(payload: Mapping[str, Any]) -> bytes:
    """`payload` as standard JSON in UTF-8, as httpx 0.28 encodes `json=`. Not left to httpx:
    0.27 (which the client supports) sends NaN, and lone surrogates escaped, to the service."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def _writable_views(buffers: Sequence[bytearray | memoryview]) -> list[memoryview]:
    """Byte views of the caller's buffers; InvalidRequestError unless each is a writable,
    non-empty buffer."""
    # None: a bare "object is not iterable"; one bytearray: "invalid buffer int", its first byte
    if not isinstance(buffers, Iterable) or isinstance(buffers, bytes | bytearray | memoryview):
        detail = f"invalid buffers {type(buffers).__name__}: expected a list of buffers"
        raise InvalidRequestError(None, detail, message=f"{detail} (no request sent)")
    views = []
    for buffer in buffers:
        try:
            view = memoryview(buffer).cast("B")
        except TypeError:
            view = None
        if view is None or view.readonly or not view.nbytes:
            detail = (f"invalid buffer {type(buffer).__name__}: expected a writable buffer "
                      "(e.g. a bytearray) of at least one byte")
            raise InvalidRequestError(None, detail, message=f"{detail} (no request sent)")
        views.append(view)
    if not views:
        raise InvalidRequestError(None, "no buffers to read into",
                                  message="no buffers to read into (no request sent)")
    return views


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        content_type = response.headers.get("Content-Type")
        raise ProtocolError(
            f"{what}: expected a JSON object, got {content_type} {response.text[:100]!r}"
        ) from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(body).__name__}")
    return body


def _record_or_none(response: httpx.Response, what: str, *,
                    expected: str | None) -> dict[str, Any] | None:
    """The JSON object of an answer naming a video's hash (checked), None for a 404; raises
    for any other non-2xx status."""
    if response.status_code == 404:
        return None
    raise_for_status(response, what)
    result = _json_object(response, what)
    _check_hash_field(result, what, expected=expected)
    return result


def _check_hash_field(result: Mapping[str, Any], what: str, *,
                      expected: str | None = None) -> None:
    """Callers index result["hash"] directly and pass it back to us: make sure it is one."""
    content_hash = result.get("hash")
    if not isinstance(content_hash, str):
        raise ProtocolError(f"{what}: answer has no 'hash'")
    if expected is not None and content_hash != expected:
        raise ProtocolError(f"{what}: answer describes another video ({content_hash})")
