"""The HTTP API (vidcache 1.x wire protocol) on FastAPI; OpenAPI at /openapi.json and /docs.

Routes that touch SQLite or the file system are plain `def`s, which FastAPI runs in its thread
pool; ingest (download + ffmpeg, possibly minutes) runs in threads under its own capacity
limit so a burst of ingests cannot take every thread from readers. Bytes are served by
Starlette's FileResponse (Range, If-Range, multipart ranges, 416, HEAD). Every error, ours or
the framework's, leaves as JSON `{"detail": message}`; the translation happens only here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from vidcache import __version__
from vidcache.config import ServiceConfig
from vidcache.download import Downloader
from vidcache.errors import InvalidRequest, NotFound, VidcacheError
from vidcache.hostguard import HostGuard
from vidcache.ingest import Ingestor
from vidcache.store import (
    Store,
    VideoRecord,
    check_segment,
    is_content_hash,
)

log = logging.getLogger(__name__)

# Content never changes under its hash, so any cache may keep it forever.
CACHE_CONTROL = "public, max-age=31536000, immutable"
MAX_PAGE = 1000


class ErrorResponse(BaseModel):
    detail: str


class IngestRequest(BaseModel):
    url: str = Field(description="http(s) URL of the video (file:// if the server allows it)")
    bucket: str = Field(description="one path segment: letters, digits, '.', '_', '-'")
    prefix: str = Field("", description="empty, or one path segment like bucket")
    meta: dict[str, Any] = Field(default_factory=dict, description="stored with a new video")


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
    aliases: list[str] = Field(description="every URL this video was ingested from")
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
    chunk_size: int
    digests: list[str]


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    videos: int


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 422)}
_INGEST_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (403, 413, 422, 502, 504, 507)}


def _meta(record: VideoRecord) -> VideoMeta:
    return VideoMeta(hash=record.content_hash, size_bytes=record.size_bytes,
                     duration_s=record.duration_s, first_seen=record.first_seen,
                     aliases=list(record.aliases), meta=record.meta, bucket=record.bucket,
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
    """FileResponse whose own error answers (400 malformed Range, 416 unsatisfiable Range)
    carry a JSON `{"detail"}` body like every other error, keeping Starlette's range logic."""

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
            body = json.dumps({"detail": detail}).encode()
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


def create_app(config: ServiceConfig) -> FastAPI:
    """The API over the data directory in `config`, which is opened (and repaired) right away:
    raises DataDirInUse if another server holds it. The store closes at app shutdown."""
    store = Store(config.data_dir)
    store.open()
    downloader = Downloader(tmp_dir=store.tmp_dir, max_size=config.max_size,
                            timeout=config.download_timeout,
                            guard=HostGuard(config.ingest_allow),
                            allow_file_dirs=config.allow_file_dirs)
    ingestor = Ingestor(store=store, downloader=downloader,
                        phash_threshold=config.phash_threshold,
                        media_timeout=config.media_timeout)
    ingest_slots: anyio.CapacityLimiter | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal ingest_slots
        # made here: an anyio primitive belongs to the running event loop
        ingest_slots = anyio.CapacityLimiter(config.max_concurrent_ingests)
        try:
            yield
        finally:
            downloader.close()
            store.close()

    app = FastAPI(title="vidcache", version=__version__, lifespan=lifespan,
                  description="Content-addressed video cache: ingest by URL, BLAKE3 exact "
                              "dedup, perceptual-hash near-duplicate matching, byte ranges.")

    @app.exception_handler(VidcacheError)
    async def _our_error(_request: Request, exc: VidcacheError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"),
                           "")
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _describe_validation(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this handler has answered.
        return JSONResponse({"detail": "internal server error; the server log has details"},
                            status_code=500)

    def lookup(content_hash: str) -> VideoRecord:
        record = store.get(_checked_hash(content_hash))
        if record is None:
            raise NotFound(f"no video with hash {content_hash}")
        return record

    @app.get("/health")
    def health() -> Health:
        return Health(status="ok", version=__version__, videos=store.count())

    @app.post("/ingest", response_model_exclude_none=True, responses=_INGEST_ERRORS)
    async def ingest(request: IngestRequest) -> IngestResponse:
        """Ingest a video by URL (see docs/service.md for the dedup pipeline)."""
        run = partial(ingestor.ingest, url=request.url, bucket=request.bucket,
                      prefix=request.prefix, meta=request.meta)
        result = await anyio.to_thread.run_sync(run, limiter=ingest_slots)
        return IngestResponse(hash=result.content_hash, status=result.status,
                              file_path=result.file_path, phash_distance=result.phash_distance)

    @app.get("/resolve", responses=_ERRORS)
    def resolve(url: str) -> ResolveResponse:
        record = store.lookup_url(url)
        if record is None:
            raise NotFound(f"URL not ingested: {url}")
        return ResolveResponse(hash=record.content_hash, url=url)

    @app.get("/meta/{content_hash}", responses=_ERRORS)
    def meta(content_hash: str) -> VideoMeta:
        return _meta(lookup(content_hash))

    @app.api_route("/video/{content_hash}", methods=["GET", "HEAD"], response_class=FileResponse,
                   responses={**_ERRORS, 206: {"description": "the requested byte range"},
                              416: {"model": ErrorResponse}})
    def video(content_hash: str) -> Response:
        """The video's bytes; honours `Range: bytes=s-e`, `s-`, `-n` and `If-Range`."""
        record = lookup(content_hash)
        path = store.blob_path(record)
        try:
            stat_result = os.stat(path)
        except FileNotFoundError as exc:  # deleted between lookup and stat
            raise NotFound(f"no video with hash {content_hash}") from exc
        return VideoFileResponse(
            path, stat_result=stat_result, media_type=record.mime_type,
            headers={"ETag": f'"{record.content_hash}"', "Cache-Control": CACHE_CONTROL})

    @app.delete("/video/{content_hash}", status_code=204, responses=_ERRORS)
    def delete(content_hash: str) -> Response:
        """Remove the blob, the record and every URL alias."""
        if not store.delete(_checked_hash(content_hash)):
            raise NotFound(f"no video with hash {content_hash}")
        log.info("deleted %s", content_hash)
        return Response(status_code=204)

    @app.get("/video/{content_hash}/chunks", responses=_ERRORS)
    def chunks(content_hash: str) -> ChunkDigests:
        """BLAKE3 of each chunk_size chunk of the file (the last one short), in order."""
        record = lookup(content_hash)
        return ChunkDigests(hash=record.content_hash, chunk_size=record.chunk_size,
                            digests=record.digests_hex())

    @app.get("/videos", responses=_ERRORS)
    def videos(bucket: str | None = None, prefix: str | None = None, after: str | None = None,
               limit: int = Query(100, ge=1, le=MAX_PAGE)) -> VideoList:
        """Stored videos ordered by hash; `bucket`/`prefix` match exactly when given."""
        if bucket is not None:
            check_segment("bucket", bucket)
        if prefix is not None:
            check_segment("prefix", prefix, allow_empty=True)
        if after is not None:
            _checked_hash(after)
        # one more than asked tells whether a next page exists
        records = store.list_videos(bucket=bucket, prefix=prefix, after=after, limit=limit + 1)
        page = records[:limit]
        cursor = page[-1].content_hash if len(records) > limit else None
        return VideoList(items=[_meta(r) for r in page], next=cursor)

    return app
