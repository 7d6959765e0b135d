"""The service's exception hierarchy. Each class carries the HTTP status it maps to; app.py
turns any of them into a JSON `{"detail": message}` response in one place."""

from __future__ import annotations

import errno
import json
import os

from vidcache_client._threads import LIMITS


def error_body(detail: str) -> bytes:
    """The body `{"detail": detail}` of an error answered below the routes (the HTTP layer, the
    auth and body-size middlewares, a refused Range), byte for byte as the routes' JSONResponse
    renders it: one form, whichever layer refused."""
    return json.dumps({"detail": detail}, ensure_ascii=False, separators=(",", ":")).encode()


class VidcacheError(Exception):
    """Root of every error the service raises on purpose; the message is shown to the caller."""

    status_code = 500


class InvalidRequest(VidcacheError):
    """The request itself is wrong (malformed URL, hash, bucket or prefix)."""

    status_code = 422


class NotAVideo(InvalidRequest):
    """The downloaded bytes are not a video ffprobe can read."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"not a video: {reason}")


class NotFound(VidcacheError):
    status_code = 404


class PreconditionFailed(VidcacheError):
    """A precondition of a conditional request (If-Match, If-None-Match...) is false."""

    status_code = 412


class IngestRefused(VidcacheError):
    """The URL points somewhere the server's settings do not allow it to fetch from."""

    status_code = 403


class TooLarge(VidcacheError):
    status_code = 413


class UpstreamError(VidcacheError):
    """The origin could not be reached or did not deliver the video."""

    status_code = 502


class UpstreamTimeout(UpstreamError):
    status_code = 504


# What the operator has to fix, for the errors a file system gives when it cannot take more
_STORAGE_CAUSES = {errno.ENOSPC: "disk full (no space left on device)",
                   errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}


class StorageError(VidcacheError):
    """The data directory cannot take the file (disk full, read-only, permissions): one line
    saying what could not be done where, and why."""

    status_code = 507

    def __init__(self, doing: str, where: object, error_number: int | None,
                 reason: str) -> None:
        cause = _STORAGE_CAUSES.get(error_number, reason) if error_number else reason
        super().__init__(f"cannot {doing} in {where}: {cause}")

    @classmethod
    def from_os_error(cls, doing: str, where: object, exc: OSError) -> StorageError:
        return cls(doing, where, exc.errno, exc.strerror or str(exc))

    @classmethod
    def from_strerror(cls, doing: str, where: object, text: str) -> StorageError:
        """From an OS error named by its text alone, as ffmpeg names them."""
        number = next((n for n in _STORAGE_CAUSES if os.strerror(n) == text), None)
        return cls(doing, where, number, text)


class IndexUnreadable(VidcacheError):
    """SQLite cannot read the index: the file is damaged (`database disk image is malformed`,
    `file is not a database`) or the disk fails to read it (`disk I/O error`). A fault of the
    server, not of the request; the service leaves the file as it is, for the operator to
    repair or restore."""

    status_code = 500


class MediaToolError(VidcacheError):
    """ffprobe/ffmpeg is missing or failed for a reason that is not the input's fault."""

    status_code = 500


class ToolStopped(MediaToolError):
    """ffprobe/ffmpeg was ended by a signal: nothing is known about the video; try again."""

    status_code = 503


class ShuttingDown(VidcacheError):
    """The server stopped the ingest because it is shutting down: nothing is known about the
    URL or the video; the same request can be sent again once the server is back."""

    status_code = 503

    def __init__(self) -> None:
        super().__init__("the server is shutting down; try again")


class OutOfThreads(VidcacheError):
    """A thread or process the request needs could not be started (vidcache_client._threads):
    nothing was stored or changed for it; the same request can be sent again once the server
    runs fewer (thread_refusals.py)."""

    status_code = 503

    def __init__(self) -> None:
        super().__init__(f"the server is out of threads: {LIMITS}; try again")


class BadSetting(VidcacheError):
    """A setting of the server (its command line or environment) cannot be used: it does not
    start."""


class DataDirInUse(VidcacheError):
    """Another vidcache process already serves this data directory."""
