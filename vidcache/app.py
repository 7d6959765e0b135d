"""The HTTP API (vidcache 1.x wire protocol) on FastAPI; OpenAPI at /openapi.json and /docs.

Routes that touch SQLite or the file system are plain `def`s, which FastAPI runs in its thread
pool; ingest (download + ffmpeg, possibly minutes) runs in threads under its own capacity
limit so a burst of ingests cannot take every thread from readers. Bytes are served by
Starlette's FileResponse (If-Range, multipart ranges, HEAD) with our strict Range parser
(ranges.py). In front of routing sit the optional bearer-token check (auth.py), the hot path
for whole files and single ranges (serving.py; it hands everything else to the route) and the
request body cap (body_limit.py), and in front of them all the answer to a thread that could
not be started (thread_refusals.py). Every GET route answers HEAD too (GetAnswersHead). Every
error, ours or the framework's, leaves as JSON `{"detail": message}`; the translation happens
only here, in the token, body-cap and thread-refusal middlewares, and for a request uvicorn
cannot parse in http_protocol.py.
`GET /ingests` shows the ingests under way, as their threads move them on (progress.py).

Shutdown: `app.state.stop_ingests` ends the ingests still running (503 "the server is shutting
down"); the server (cli.py) calls it when their grace period is over, the lifespan's end at the
latest, which then waits for them (bounded) before it closes the store.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from pydantic.config import JsonDict
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from vidcache import __version__
from vidcache.auth import BearerAuth, needs_token
from vidcache.body_limit import BodyLimit
from vidcache.chunks import accepts_gzip, hex_digests
from vidcache.conditional import FIELDS as CONDITIONAL_FIELDS
from vidcache.conditional import not_modified
from vidcache.config import ServiceConfig
from vidcache.download import MAX_URL_LENGTH, Downloader, origin_tls
from vidcache.errors import (
    InvalidRequest,
    NotFound,
    ShuttingDown,
    VidcacheError,
    error_body,
)
from vidcache.failure_log import FailureLog
from vidcache.hostguard import HostGuard
from vidcache.ingest import STOP_TIMEOUT, Ingestor
from vidcache.progress import IngestBoard, Phase
from vidcache.ranges import MalformedRange, UnsatisfiableRange, parse_range
from vidcache.serving import CACHE_CONTROL, BlobIndex, VideoFastPath, keep_buffers_in_heap
from vidcache.store import (
    HASH_PATTERN,
    SEGMENT_PATTERN,
    Store,
    VideoRecord,
    check_segment,
    is_content_hash,
)
from vidcache.thread_refusals import ThreadRefusals
from vidcache.tools import Tools
from vidcache_client._credentials import has_secrets, without_credentials
from vidcache_client._threads import thread_refused

log = logging.getLogger(__name__)

MAX_PAGE = 1000
# A listing page ends early once its items' `meta` passes this: 1000 records of 64 KiB each
# were one 64 MB answer, held in memory several times over while it was built.
PAGE_META_BYTES = 4 << 20


# Constraints stated in the OpenAPI document only: the routes check them themselves, to answer
# with a message a person can act on rather than pydantic's "should match pattern".
_HASH_DOC: JsonDict = {"pattern": f"^{HASH_PATTERN}$",
             "description": "BLAKE3 of the video's bytes: 64 lowercase hex digits"}
_BUCKET_DOC: JsonDict = {"pattern": f"^{SEGMENT_PATTERN}$"}
_PREFIX_DOC: JsonDict = {"pattern": f"^({SEGMENT_PATTERN})?$"}
ContentHash = Annotated[str, Path(json_schema_extra=_HASH_DOC)]
_START_DOC = "first byte of the range whose chunk digests to list (default 0)"
_END_DOC = "byte just past the range (exclusive; default: the end of the video)"


class ErrorResponse(BaseModel):
    detail: str


class IngestRequest(BaseModel):
    url: str = Field(description="http(s) URL of the video (file:// if the server allows it)",
                     json_schema_extra={"format": "uri", "pattern": "^(https?|file)://",
                                        "maxLength": MAX_URL_LENGTH})
    bucket: str = Field(description="one path segment: letters, digits, '.', '_', '-'",
                        json_schema_extra=_BUCKET_DOC)
    prefix: str = Field("", description="empty, or one path segment like bucket",
                        json_schema_extra=_PREFIX_DOC)
    meta: dict[str, Any] = Field(
        default_factory=dict, description="stored with a new video: standard JSON, at most "
                                          "64 KiB encoded and 32 levels deep")


class IngestResponse(BaseModel):
    hash: str
    status: Literal["new", "duplicate", "url_alias"]
    file_path: str
    phash_distance: int | None = None


class ResolveResponse(BaseModel):
    hash: str
    url: str


class VideoMeta(BaseModel):
    hash: str
    size_bytes: int
    duration_s: float
    first_seen: str = Field(description="ISO-8601 UTC time of the first ingest")
    aliases: list[str] = Field(description="every URL this video was ingested from, as "
                                           "shown: secrets in a query REDACTED")
    meta: dict[str, Any]
    bucket: str
    prefix: str
    file_path: str = Field(description="blob path relative to the data directory")
    mime_type: str


class VideoList(BaseModel):
    items: list[VideoMeta]
    next: str | None = Field(description="pass as `after` for the next page; null at the end")


class ChunkDigests(BaseModel):
    hash: str
    chunk_size: int = Field(description="bytes per chunk, recorded at ingest: a power of two, "
                                        "not the same for every video")
    first_chunk: int = Field(description="index of the chunk digests[0] belongs to: byte "
                                         "first_chunk * chunk_size of the video")
    chunk_count: int = Field(description="chunks in the whole video, however many are listed")
    digests: list[str] = Field(description="64-hex BLAKE3 of each listed chunk, in order; the "
                                           "video's last chunk is short")


class IngestUnderWay(BaseModel):
    url: str = Field(description="the URL as given, without any user:password@, secrets in "
                                 "its query REDACTED")
    bucket: str
    prefix: str
    phase: Phase = Field(description="queued (for an ingest slot, or behind an ingest of the "
                                     "same URL), downloading, validating (ffprobe), phash "
                                     "(ffmpeg samples frames for the perceptual hash), frames "
                                     "(its frame hashes match a stored video's: ffmpeg samples "
                                     "both videos' frames at full size), audio (and both "
                                     "videos' audio), storing; a later server may add phases")
    bytes_received: int = Field(description="bytes of the origin's answer received so far "
                                            "(as sent, before any gzip decoding); 0 until the "
                                            "download starts")
    bytes_expected: int | None = Field(description="the answer's Content-Length (a local "
                                                   "file's size); null if not announced or "
                                                   "not yet known")
    started: str = Field(description="ISO-8601 UTC time the request arrived")


class IngestList(BaseModel):
    items: list[IngestUnderWay] = Field(description="oldest first")


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    videos: int


# every route that reads the index: damaged, or its disk fails to read it (IndexUnreadable)
_INDEX_UNREADABLE: dict[int | str, dict[str, Any]] = {
    500: {"model": ErrorResponse, "description": "the index cannot be read"}}
_INVALID: dict[int | str, dict[str, Any]] = {422: {"model": ErrorResponse}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse}, **_INVALID, **_INDEX_UNREADABLE}
# 500: the index cannot be read or updated, or ffprobe/ffmpeg is not installed
_INGEST_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (403, 413, 422, 500, 502, 503, 504, 507)}
# the index or the data directory cannot take the change (damaged, read-only, disk full)
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (500, 507)}
_PRECONDITION_FAILED: dict[int | str, dict[str, Any]] = {
    412: {"model": ErrorResponse, "description": "If-Match or If-Unmodified-Since is false"}}
_RANGE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "malformed Range header"},
    416: {"model": ErrorResponse, "description": "no byte of the range lies in the video"}}


def _meta(record: VideoRecord) -> VideoMeta:
    return VideoMeta(hash=record.content_hash, size_bytes=record.size_bytes,
                     duration_s=record.duration_s, first_seen=record.first_seen,
                     # each once: two that differ only in a secret show alike
                     aliases=list(dict.fromkeys(map(without_credentials, record.aliases))),
                     meta=record.meta, bucket=record.bucket,
                     prefix=record.prefix, file_path=record.file_path,
                     mime_type=record.mime_type)


def _checked_hash(value: str) -> str:
    """The hash if well-formed; checked before any lookup so a path never reaches the disk."""
    if not is_content_hash(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidRequest(f"malformed hash {shown!r}: expected 64 lowercase hex digits "
                             "(the BLAKE3 digest of the video)")
    return value


class VideoFileResponse(FileResponse):
    """FileResponse with the strict Range parser, whose own error answers (400 malformed Range,
    416 unsatisfiable Range) carry a JSON `{"detail"}` body like every other error."""

    # Starlette reads 64 KiB per hop to a worker thread; 1 MiB chunks make that cost 16x
    # rarer, which measured 2.7x faster whole-file and 2x faster 1 MiB-range serving
    # (docs/benchmarks.md).
    chunk_size = 1024 * 1024

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return parse_range(http_range, file_size)
        except MalformedRange as exc:
            raise MalformedRangeHeader(str(exc)) from exc
        except UnsatisfiableRange as exc:
            raise RangeNotSatisfiable(file_size) from exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        held_start: Message | None = None
        range_header = next((v.decode("latin-1") for k, v in scope["headers"]
                             if k == b"range"), "")

        async def send_json_errors(message: Message) -> None:
            nonlocal held_start
            if message["type"] == "http.response.start" and message["status"] in (400, 416):
                held_start = message
                return
            if held_start is None or message["type"] != "http.response.body":
                await send(message)
                return
            if held_start["status"] == 416:
                size = self.stat_result.st_size if self.stat_result else "?"
                detail = f"range {range_header!r} is not satisfiable: the video has {size} bytes"
            else:
                reason = bytes(message.get("body", b"")).decode(errors="replace")
                detail = f"malformed Range header {range_header!r}: {reason}"
            body = error_body(detail)
            headers = MutableHeaders(raw=list(held_start["headers"]))
            headers["content-type"] = "application/json"
            headers["content-length"] = str(len(body))
            headers["accept-ranges"] = "bytes"
            await send({**held_start, "headers": headers.raw})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await super().__call__(scope, receive, send_json_errors)


def _describe_validation(errors: Any) -> str:
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query")]
        where = "request body" if not loc or loc[0].isdigit() else ".".join(loc)
        reason = error.get("ctx", {}).get("error") if error.get("type") == "json_invalid" else None
        message = error.get("msg", "invalid") + (f" ({reason})" if reason else "")
        parts.append(f"{where}: {message}")
    return "; ".join(parts) or "invalid request"


def _body_error(exc: StarletteHTTPException) -> str | None:
    """FastAPI's vague 400 for a JSON body its parser gave up on (not UTF-8, too deep, an
    integer of more than 4300 digits), said precisely."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, RecursionError):
        return "request body: JSON nested too deeply to parse"
    if isinstance(cause, ValueError):
        return f"request body: JSON the server cannot parse ({cause})"
    return None


class GetAnswersHead(APIRoute):
    """A FastAPI route whose GET answers HEAD too, as Starlette's Route does and FastAPI's does
    not (RFC 9110 9.1: a server MUST support HEAD wherever it supports GET). The answer is the
    GET's, status and headers (Content-Length, Content-Encoding) included; the server sends no
    body for a HEAD (uvicorn drops it). HEAD stays out of `methods`, of which FastAPI makes one
    OpenAPI operation each: implied by GET there, as in most APIs, not a second operation with
    the same operationId per route."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match == Match.PARTIAL and self._head_of_get(scope):
            return Match.FULL, child_scope
        return match, child_scope

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._head_of_get(scope):
            await self.app(scope, receive, send)  # past the check against `methods` (405)
        else:
            await super().handle(scope, receive, send)

    def _head_of_get(self, scope: Scope) -> bool:
        return scope["method"] == "HEAD" and "GET" in (self.methods or ())


def _allowed_methods(request: Request) -> str:
    """The methods of every route at the request's path. Starlette's 405 names those of the
    first route whose path matched, but a path can have several (/video/{hash}: GET, HEAD and
    DELETE), and Allow must list them all (RFC 9110 15.5.6), HEAD wherever GET is."""
    methods: list[str] = []
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
            served = set(route.methods or ())
            if "GET" in served:  # GetAnswersHead (Starlette's Route lists HEAD itself)
                served.add("HEAD")
            methods += [method for method in sorted(served) if method not in methods]
    return ", ".join(methods)


def _document_auth(schema: dict[str, Any], *, protect_reads: bool) -> None:
    """Declare the bearer token in the OpenAPI document, on the operations that need it."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearerToken"] = {
        "type": "http", "scheme": "bearer",
        "description": "the token in the file the server was started with (--token-file)"}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if needs_token(method, path, protect_reads=protect_reads):
                operation["security"] = [{"bearerToken": []}]
                operation.setdefault("responses", {})["401"] = {
                    "description": "token missing or wrong",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


async def _wait_stopped(ingestor: Ingestor) -> int:
    """`ingestor.wait_stopped()` in a worker thread; on the event loop if none can be started
    (a limit on threads): it waits STOP_TIMEOUT at most, and only the shutdown waits for it."""
    try:
        return await anyio.to_thread.run_sync(ingestor.wait_stopped)
    except RuntimeError as exc:
        if not thread_refused(exc):
            raise
        return ingestor.wait_stopped()


def create_app(config: ServiceConfig) -> FastAPI:
    """The API over the data directory in `config`, which is opened (and repaired) right away:
    raises DataDirInUse if another server holds it, and BadSetting, before the directory is
    made or touched, for a setting this machine cannot honour. The store closes at app
    shutdown, at once if the app cannot be made (a stop signal during the start), or by
    `app.state.close_unstarted()` if the app never starts."""
    tools = Tools(timeout=config.media_timeout, memory_cap=config.media_memory)
    tls = origin_tls()
    store = Store(config.data_dir)
    store.open()
    try:
        return _app_over(store, config, tools, tls)
    except BaseException:
        store.close()
        raise


def _app_over(store: Store, config: ServiceConfig, tools: Tools, tls: ssl.SSLContext
              ) -> FastAPI:
    downloader = Downloader(tmp_dir=store.tmp_dir, max_size=config.max_size,
                            timeout=config.download_timeout,
                            max_time=config.max_download_time,
                            guard=HostGuard(config.ingest_allow),
                            chunk_size=config.chunk_size,
                            allow_file_dirs=config.allow_file_dirs, tls=tls)
    ingestor = Ingestor(store=store, downloader=downloader,
                        phash_threshold=config.phash_threshold, tools=tools,
                        max_meta_bytes=config.max_meta_bytes,
                        max_meta_depth=config.max_meta_depth)
    ingest_slots: anyio.CapacityLimiter | None = None
    under_way = IngestBoard()
    failures = FailureLog(log)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal ingest_slots
        # made here: an anyio primitive belongs to the running event loop
        ingest_slots = anyio.CapacityLimiter(config.max_concurrent_ingests)
        try:
            yield
        finally:
            failures.flush()  # the requests have been answered
            ingestor.stop()  # if the server has not yet
            if running := await _wait_stopped(ingestor):
                log.warning("%d ingests still running %g s after they were stopped; closing "
                            "the store under them (they cannot store anything now)", running,
                            STOP_TIMEOUT)
            close()

    def close() -> None:
        downloader.close()
        store.close()

    # redirect_slashes off: the redirect's Location came from the Host header (http:// even
    # behind a TLS proxy); a path with a trailing slash is no such endpoint (404)
    app = FastAPI(title="vidcache", version=__version__, lifespan=lifespan,
                  redirect_slashes=False,
                  description="Content-addressed video cache: ingest by URL, BLAKE3 exact "
                              "dedup, perceptual-hash near-duplicate matching, byte ranges.")
    app.state.stop_ingests = ingestor.stop
    app.state.close_unstarted = close
    app.router.route_class = GetAnswersHead  # for the routes declared below

    # the last added is the outermost: the token is checked before any body is read
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    blobs = BlobIndex(store)
    keep_buffers_in_heap()
    app.add_middleware(VideoFastPath, index=blobs, chunk_size=VideoFileResponse.chunk_size)
    if config.token is not None:
        app.add_middleware(BearerAuth, token=config.token, protect_reads=config.token_reads)
        plain_openapi = app.openapi

        def openapi_with_auth() -> dict[str, Any]:
            if app.openapi_schema is None:
                _document_auth(plain_openapi(), protect_reads=config.token_reads)
            return app.openapi_schema or {}

        app.openapi = openapi_with_auth  # type: ignore[method-assign]
    # outermost: it answers for the middlewares above and the routes alike
    app.add_middleware(ThreadRefusals, failures=failures)

    @app.exception_handler(VidcacheError)
    async def _our_error(request: Request, exc: VidcacheError) -> JSONResponse:
        # The server's own failures (an unreadable index, a disk that cannot take a delete)
        # are the operator's to see: a line each, no traceback, their repeats counted. An
        # ingest logs its outcome.
        if exc.status_code >= 500 and request.url.path != "/ingest":
            failures.failed((exc.status_code, str(exc)),
                            logging.ERROR if exc.status_code == 500 else logging.WARNING,
                            f"{request.method} {request.url.path} failed ({exc.status_code}): "
                            f"{exc}", path=request.url.path)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if body_error := _body_error(exc):  # a bad JSON body is 422, like malformed JSON
            return JSONResponse({"detail": body_error}, status_code=422)
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = _allowed_methods(request)
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
            return JSONResponse({"detail": detail}, status_code=405, headers={"Allow": allowed})
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe_validation(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this handler has answered.
        return JSONResponse({"detail": "internal server error; the server log has details"},
                            status_code=500)

    def lookup(content_hash: ContentHash) -> VideoRecord:
        record = store.get(_checked_hash(content_hash))
        if record is None:
            raise NotFound(f"no video with hash {content_hash}")
        return record

    def stat_blob(record: VideoRecord) -> os.stat_result:
        try:
            return os.stat(store.blob_path(record))
        except FileNotFoundError as exc:  # deleted since the lookup
            raise NotFound(f"no video with hash {record.content_hash}") from exc

    @app.get("/health", responses=_INDEX_UNREADABLE)
    def health() -> Health:
        return Health(status="ok", version=__version__, videos=store.count())

    @app.post("/ingest", response_model_exclude_none=True, responses=_INGEST_ERRORS)
    async def ingest(request: IngestRequest) -> IngestResponse:
        """Ingest a video by URL (see docs/service.md for the dedup pipeline)."""
        try:
            with under_way.track(request.url, request.bucket, request.prefix) as progress:
                run = partial(ingestor.ingest, url=request.url, bucket=request.bucket,
                              prefix=request.prefix, meta=request.meta, progress=progress)
                result = await anyio.to_thread.run_sync(run, limiter=ingest_slots)
        except asyncio.CancelledError:
            # uvicorn's shutdown cancels the requests still running STOP_TIMEOUT after the
            # ingests were stopped (else a plain-text 500 and a traceback): this one's thread
            # has not ended (say, it flushes a large download to a slow disk) and may log its
            # end later
            log.warning("ingest %s failed (503): %s (still running %g s after it was "
                        "stopped)", without_credentials(request.url), ShuttingDown(),
                        STOP_TIMEOUT)
            raise ShuttingDown() from None
        return IngestResponse(hash=result.content_hash, status=result.status,
                              file_path=result.file_path, phash_distance=result.phash_distance)

    @app.get("/ingests")
    async def ingests() -> IngestList:
        """The ingests under way (queued included), oldest first; an ingest leaves the list
        as it is answered. Credentials in a URL are never shown."""
        return IngestList(items=[IngestUnderWay(**asdict(state))
                                 for state in under_way.snapshot()])

    @app.get("/resolve", responses=_ERRORS)
    def resolve(url: str) -> ResolveResponse:
        record = store.lookup_url(url)
        shown = without_credentials(url)
        if record is None:
            # Shown with its secrets REDACTED, it reads as the alias /meta shows of an ingested
            # URL: say that they count (that alias, copied, or a URL signed anew is unknown).
            raise NotFound(f"URL not ingested: {shown}" + (
                "; the secrets of its query, REDACTED here, are compared as given: resolve "
                "the URL itself, not an alias shown by /meta or /videos"
                if has_secrets(url) else ""))
        return ResolveResponse(hash=record.content_hash, url=shown)

    @app.get("/meta/{content_hash}", responses=_ERRORS)
    def meta(content_hash: ContentHash) -> VideoMeta:
        return _meta(lookup(content_hash))

    video_responses: dict[int | str, dict[str, Any]] = {
        **_ERRORS, **_RANGE_ERRORS, **_PRECONDITION_FAILED,
        206: {"description": "the requested byte range"},
        304: {"description": "not modified (If-None-Match, If-Modified-Since)"}}

    # HEAD declared first, so that it is the route answering HEAD (the GET one would, too)
    @app.get("/video/{content_hash}", response_class=FileResponse, responses=video_responses)
    @app.head("/video/{content_hash}", response_class=FileResponse, responses=video_responses,
              operation_id="video_headers", summary="Video headers")
    def video(content_hash: ContentHash, request: Request) -> Response:
        """The video's bytes; honours `Range: bytes=s-e`, `s-`, `-n`, `If-Range` and the
        conditional headers (`If-None-Match` and `If-Modified-Since` answer 304, `If-Match`
        and `If-Unmodified-Since` 412)."""
        record = lookup(content_hash)
        path = store.blob_path(record)
        stat_result = stat_blob(record)
        headers = {"ETag": f'"{record.content_hash}"', "Cache-Control": CACHE_CONTROL}
        if not_modified(request.headers.getlist, method=request.method, etag=headers["ETag"],
                        last_modified=stat_result.st_mtime):
            return Response(status_code=304, headers=headers)
        return VideoFileResponse(path, stat_result=stat_result, media_type=record.mime_type,
                                 headers=headers)

    @app.delete("/video/{content_hash}", status_code=204,
                responses={**_ERRORS, **_PRECONDITION_FAILED, **_WRITE_ERRORS})
    def delete(content_hash: ContentHash, request: Request) -> Response:
        """Remove the blob, the record and every URL alias; `If-Match` and the other
        conditional headers are honoured (412)."""
        if any(field.encode() in CONDITIONAL_FIELDS for field in request.headers):
            record = lookup(content_hash)
            not_modified(request.headers.getlist, method="DELETE",
                         etag=f'"{record.content_hash}"',
                         last_modified=stat_blob(record).st_mtime)
        deleted = ingestor.delete(_checked_hash(content_hash))
        blobs.forget(content_hash)
        if not deleted:
            raise NotFound(f"no video with hash {content_hash}")
        log.info("deleted %s", content_hash)
        return Response(status_code=204)

    @app.get("/video/{content_hash}/chunks", responses=_ERRORS, response_model=ChunkDigests)
    def chunks(content_hash: ContentHash, request: Request,
               start: Annotated[int, Query(ge=0, description=_START_DOC)] = 0,
               end: Annotated[int | None, Query(ge=0, description=_END_DOC)] = None) -> Response:
        """BLAKE3 of each chunk_size chunk of the file (the last one short), in order: of every
        chunk, or with `start`/`end` of the chunks overlapping bytes [start, end).

        chunk_size is the one recorded when the video was ingested (the server's --chunk-size
        then): read it from the answer, it differs between videos. digests[i] is the digest of
        chunk first_chunk + i, where first_chunk = min(start // chunk_size, chunk_count); the
        last one listed holds byte min(end, size) - 1. A range holding no byte of the file
        (start >= size, or end <= start) lists none. Without parameters first_chunk is 0 and
        every chunk is listed. Servers before this extension ignore start/end and send neither
        first_chunk nor chunk_count. Sent gzip-compressed to clients that accept it (hex
        digests halve: a reader opening a video on a slow link waits for this list)."""
        page = store.chunk_digests(_checked_hash(content_hash), start=start, end=end)
        if page is None:
            raise NotFound(f"no video with hash {content_hash}")
        document = ChunkDigests(hash=content_hash, chunk_size=page.chunk_size,
                                first_chunk=page.first_chunk, chunk_count=page.chunk_count,
                                digests=hex_digests(page.digests))
        body = document.model_dump_json().encode()
        headers = {"Vary": "Accept-Encoding"}
        if accepts_gzip(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=6, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return Response(body, media_type="application/json", headers=headers)

    @app.get("/videos", responses={**_INVALID, **_INDEX_UNREADABLE})
    def videos(bucket: Annotated[str | None, Query(json_schema_extra=_BUCKET_DOC)] = None,
               prefix: Annotated[str | None, Query(json_schema_extra=_PREFIX_DOC)] = None,
               after: Annotated[str | None, Query(json_schema_extra=_HASH_DOC)] = None,
               limit: int = Query(100, ge=1, le=MAX_PAGE)) -> VideoList:
        """Stored videos ordered by hash; `bucket`/`prefix` match exactly when given."""
        if bucket is not None:
            check_segment("bucket", bucket)
        if prefix is not None:
            check_segment("prefix", prefix, allow_empty=True)
        if after is not None:
            _checked_hash(after)
        page, more = store.list_videos(bucket=bucket, prefix=prefix, after=after, limit=limit,
                                       max_meta_bytes=PAGE_META_BYTES)
        return VideoList(items=[_meta(r) for r in page],
                         next=page[-1].content_hash if more else None)

    return app
