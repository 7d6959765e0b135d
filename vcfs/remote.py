"""vcfs's only door to the vidcache service: byte ranges, metadata and the listing, with the
retry policy, the caches that make lookups cheap, and the vcfs error hierarchy.

Retries. Every call goes through `Remote._with_retries`: errors the client marks `transient`
(connection resets, timeouts, 5xx, a response that is not exactly the asked range) and data
that fails its digest are retried with jittered exponential backoff until a total deadline
(`RemoteConfig.timeout`) has passed; then `RemoteUnavailable`, naming the hash and range. A
404 is `NotFound` at once; any other refusal (4xx) is `RemoteError` at once. Each HTTP request
also has its own timeout (`request_timeout`, at most the deadline), so a stalled connection
costs one attempt, not the whole deadline; an operation ends within deadline + one request.

Integrity. `fetch` returns exactly `end - start` bytes or raises: the client already refuses a
response whose status, Content-Range or length is not the asked range, and the length is
checked again here. When the service publishes per-chunk BLAKE3 digests
(`GET /video/{hash}/chunks`, fetched once per hash and cached), every chunk that a fetched
range covers wholly is hashed and compared before the bytes are returned; with the default
1 MiB blocks (= the service's chunk size) that is every byte. A mismatch is retried like a
transient error (a flaky proxy or disk), so corrupt bytes never reach the block cache.

Caches (content never changes for a hash, but videos come and go):
- metadata of existing videos: an LRU of bounded size, kept until evicted;
- "no such video": a few seconds only, so a newly ingested video shows up quickly;
- the `by-hash/` listing: a few seconds; it also fills the metadata cache.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from blake3 import blake3
from cachetools import LRUCache, TTLCache

from vcfs import paths
from vcfs.stats import Counters
from vidcache_client import NotFoundError, VidCacheClient, VidCacheError

log = logging.getLogger(__name__)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Errors: the filesystem maps NotFound to ENOENT and every other VcfsError to EIO.


class VcfsError(Exception):
    """Root of the errors vcfs raises."""


class NotFound(VcfsError):
    """The service has no video with this hash (HTTP 404)."""


class RemoteError(VcfsError):
    """The service gave no usable answer, and retrying will not help (e.g. a 4xx)."""


class RemoteUnavailable(RemoteError):
    """Transient failures (network, timeouts, 5xx, bad data) outlasted the deadline."""


class CorruptData(RemoteError):
    """Bytes that are not the asked range or do not match the recorded digest (retried)."""


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteConfig:
    # Rides out a service restart or a network blip; then the read fails with EIO.
    timeout: float = 30.0
    # One stalled request must not eat the whole deadline.
    request_timeout: float = 10.0
    # First retry soon (a reset connection usually works at once), then back off to 2 s.
    backoff_initial: float = 0.1
    backoff_max: float = 2.0
    # `ls by-hash` twice in a row is one request, a new video is listed within seconds.
    listing_ttl: float = 5.0
    # A lookup of a not-yet-ingested hash is retried by the kernel after this long anyway.
    negative_ttl: float = 3.0
    # ~300 bytes each: 64k videos' metadata in ~20 MB.
    meta_entries: int = 65_536
    # Digest lists are 65 bytes per MiB of video: 1024 videos of 1 GiB in ~65 MB.
    digest_entries: int = 1024

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.request_timeout <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def per_request_timeout(self) -> float:
        return min(self.request_timeout, self.timeout)


@dataclass(frozen=True, slots=True)
class VideoMeta:
    """What the filesystem needs to know about one stored video."""

    content_hash: str
    size: int
    mtime_ns: int
    name: str  # the file name under by-hash/: <hash>.<ext>

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, content_hash: str | None = None) -> VideoMeta:
        """Build from a `/meta` (or `/videos` item) document; RemoteError if it is unusable."""
        found = doc.get("hash")
        size = doc.get("size_bytes")
        if not isinstance(found, str) or not paths.is_content_hash(found):
            raise RemoteError(f"metadata without a valid hash: {dict(doc)!r}")
        if content_hash is not None and found != content_hash:
            raise RemoteError(f"asked for metadata of {content_hash}, got {found}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RemoteError(f"metadata of {found} has no valid size_bytes: {size!r}")
        file_path = doc.get("file_path")
        name = paths.video_name(found, file_path if isinstance(file_path, str) else None)
        return cls(found, size, _parse_time_ns(doc.get("first_seen")), name)


def _parse_time_ns(value: object) -> int:
    """ISO-8601 `first_seen` as ns since the epoch; 0 (1970) when absent or malformed."""
    if not isinstance(value, str):
        return 0
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        log.warning("unparseable first_seen %r; showing 1970", value)
        return 0
    return int(moment.timestamp() * 1_000_000) * 1000


@dataclass(frozen=True, slots=True)
class _Digests:
    chunk_size: int
    digests: list[str]  # 64-hex BLAKE3 of each chunk, the last one short
    file_size: int


# The service's largest listing page: fewest requests for `ls by-hash`.
_PAGE_SIZE = 1000

REMOTE_COUNTERS = (
    "http_requests",  # requests sent, retries included (a whole listing counts as one)
    "range_requests",  # attempts to fetch a byte range
    "bytes_fetched",  # bytes of ranges returned to the cache
    "retries",  # attempts repeated after a transient error
    "errors",  # operations that failed for good (became ENOENT/EIO)
    "verified_chunks",  # chunks whose BLAKE3 matched the service's digest
    "verify_failures",  # chunks that did not (each one retried)
)


class Remote:
    """Fetcher, metadata source and listing over one `VidCacheClient` (thread-safe)."""

    def __init__(
        self,
        client: VidCacheClient,
        *,
        config: RemoteConfig | None = None,
        counters: Counters | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.config = config or RemoteConfig()
        self.counters = counters or Counters(*REMOTE_COUNTERS)
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._known: LRUCache[str, VideoMeta] = LRUCache(maxsize=self.config.meta_entries)
        self._missing: TTLCache[str, bool] = TTLCache(
            maxsize=self.config.meta_entries, ttl=self.config.negative_ttl, timer=clock
        )
        self._digests: LRUCache[str, _Digests | None] = LRUCache(
            maxsize=self.config.digest_entries
        )
        self._listing: list[VideoMeta] = []
        self._listing_at: float | None = None

    @classmethod
    def connect(cls, base_url: str, *, config: RemoteConfig | None = None) -> Remote:
        """A Remote with its own client."""
        config = config or RemoteConfig()
        # 32 connections: the FUSE threads plus the readahead workers, with room to spare.
        client = VidCacheClient(
            base_url, timeout=config.per_request_timeout, max_connections=32
        )
        return cls(client, config=config)

    def close(self) -> None:
        self._client.close()

    # -- service ---------------------------------------------------------------------------

    def check_health(self) -> None:
        """One request to /health; RemoteUnavailable with the reason if it is not ok."""
        self.counters.add("http_requests")
        try:
            status = self._client.health()
        except VidCacheError as exc:
            raise RemoteUnavailable(str(exc)) from exc
        if status.get("status") != "ok":
            raise RemoteUnavailable(f"service reports {status!r}")

    # -- metadata --------------------------------------------------------------------------

    def meta(self, content_hash: str) -> VideoMeta | None:
        """The video's metadata, None if the service has no such hash (both cached)."""
        with self._lock:
            known = self._known.get(content_hash)
            if known is not None:
                return known
            if content_hash in self._missing:
                return None
        doc = self._with_retries(
            f"metadata of {content_hash}", lambda: self._client.get_meta(content_hash)
        )
        if doc is None:
            with self._lock:
                self._missing[content_hash] = True
            return None
        meta = VideoMeta.from_json(doc, content_hash=content_hash)
        with self._lock:
            self._known[content_hash] = meta
        return meta

    def list_videos(self) -> list[VideoMeta]:
        """Every stored video, ordered by hash; cached for `listing_ttl` seconds."""
        with self._lock:
            if self._listing_at is not None and (
                self._clock() - self._listing_at < self.config.listing_ttl
            ):
                return self._listing
        docs = self._with_retries(
            "the video listing", lambda: list(self._client.list_videos(page_size=_PAGE_SIZE))
        )
        listing = []
        for doc in docs:
            try:
                listing.append(VideoMeta.from_json(doc))
            except RemoteError as exc:
                log.warning("skipping a listing entry: %s", exc)
        with self._lock:
            for meta in listing:
                self._known[meta.content_hash] = meta
                self._missing.pop(meta.content_hash, None)
            self._listing = listing
            self._listing_at = self._clock()
        return listing

    def last_listing(self) -> list[VideoMeta]:
        """The most recent listing, however old, without asking the service (for statfs)."""
        with self._lock:
            return self._listing

    def _forget(self, content_hash: str) -> None:
        """The service says the video is gone: stop believing the cached metadata."""
        with self._lock:
            self._known.pop(content_hash, None)
            self._missing[content_hash] = True

    # -- bytes -----------------------------------------------------------------------------

    def fetch(self, content_hash: str, start: int, end: int) -> bytes:
        """Exactly the bytes `[start, end)` of the video (a `vcfs.blocks.Fetcher`)."""
        if end <= start:
            return b""
        what = f"{content_hash} bytes {start}-{end - 1}"

        def attempt() -> bytes:
            self.counters.add("range_requests")
            data = self._client.get_bytes(content_hash, byte_range=(start, end - 1))
            if len(data) != end - start:
                raise CorruptData(f"got {len(data)} bytes instead of {end - start}")
            self._verify(content_hash, start, end, data)
            return data

        try:
            data = self._with_retries(what, attempt)
        except NotFound:
            self._forget(content_hash)
            raise
        self.counters.add("bytes_fetched", len(data))
        return data

    def _verify(self, content_hash: str, start: int, end: int, data: bytes) -> None:
        """Compare every chunk lying wholly inside `[start, end)` with its recorded digest."""
        digests = self._chunk_digests(content_hash)
        if digests is None:
            return
        chunk_size = digests.chunk_size
        view = memoryview(data)
        index = -(-start // chunk_size)
        while index < len(digests.digests):
            chunk_start = index * chunk_size
            chunk_end = min(chunk_start + chunk_size, digests.file_size)
            if chunk_end > end:
                break
            digest = blake3(view[chunk_start - start : chunk_end - start]).hexdigest()
            if digest != digests.digests[index]:
                self.counters.add("verify_failures")
                raise CorruptData(
                    f"chunk {index} (bytes {chunk_start}-{chunk_end - 1}) has BLAKE3 {digest}, "
                    f"the service recorded {digests.digests[index]}"
                )
            self.counters.add("verified_chunks")
            index += 1

    def _chunk_digests(self, content_hash: str) -> _Digests | None:
        """The service's chunk digests for the hash (cached); None when there are none to use."""
        with self._lock:
            if content_hash in self._digests:
                return self._digests[content_hash]
        meta = self.meta(content_hash)
        if meta is None:
            raise NotFound(f"{content_hash}: no such video on the service")
        try:
            doc = self._with_retries(
                f"chunk digests of {content_hash}",
                lambda: self._client.get_chunk_digests(content_hash),
            )
        except NotFound:
            doc = None
        except RemoteUnavailable:
            raise
        except RemoteError as exc:  # e.g. a service without the endpoint: read unverified
            log.warning("no chunk digests for %s, reading it unverified: %s", content_hash, exc)
            doc = None
        digests = _parse_digests(meta, doc)
        with self._lock:
            self._digests[content_hash] = digests
        return digests

    # -- retry policy ----------------------------------------------------------------------

    def _with_retries(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried on transient errors with jittered backoff until the deadline."""
        deadline = self._clock() + self.config.timeout
        attempt = 0
        while True:
            self.counters.add("http_requests")
            try:
                return call()
            except NotFoundError as exc:
                raise NotFound(f"{what}: no such video on the service") from exc
            except (VidCacheError, CorruptData) as exc:
                transient = isinstance(exc, CorruptData) or exc.transient
                if not transient:
                    self.counters.add("errors")
                    raise RemoteError(f"{what}: {exc}") from exc
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self.counters.add("errors")
                    raise RemoteUnavailable(
                        f"{what}: gave up after {attempt + 1} attempts in "
                        f"{self.config.timeout:g} s; last error: {exc}"
                    ) from exc
                delay = min(self._backoff(attempt), remaining)
                # One warning per failing operation; its further retries only at debug level.
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                log.log(level, "%s: %s; retry %d in %.2f s", what, exc, attempt + 1, delay)
                self.counters.add("retries")
                self._sleep(delay)
                attempt += 1

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so concurrent
        readers that failed together do not retry in lockstep."""
        base = min(self.config.backoff_max, self.config.backoff_initial * (1 << min(attempt, 32)))
        return base / 2 + random.uniform(0, base / 2)


def _parse_digests(meta: VideoMeta, doc: Mapping[str, Any] | None) -> _Digests | None:
    """Validate a `/video/{hash}/chunks` document; None (read unverified) if it is unusable."""
    if doc is None:
        return None
    chunk_size = doc.get("chunk_size")
    digests = doc.get("digests")
    if (
        doc.get("hash") != meta.content_hash
        or not isinstance(chunk_size, int)
        or chunk_size <= 0
        or not isinstance(digests, list)
        or not all(isinstance(d, str) and paths.is_content_hash(d) for d in digests)
    ):
        log.warning("malformed chunk digests for %s; reading it unverified", meta.content_hash)
        return None
    if len(digests) != -(-meta.size // chunk_size):
        log.warning(
            "%s: %d chunk digests for %d bytes in %d-byte chunks; reading it unverified",
            meta.content_hash, len(digests), meta.size, chunk_size,
        )
        return None
    return _Digests(chunk_size, digests, meta.size)
