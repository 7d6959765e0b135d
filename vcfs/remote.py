"""vcfs's only door to the vidcache service: byte ranges, metadata and the listing, with the
retry policy and the caches that make lookups cheap; its failures are vcfs.errors'.

Deadlines. Every operation (one fetch, one metadata lookup, one page of the listing) has ONE
deadline, `RemoteConfig.timeout` after it started, shared by everything it needs (a fetch that
first needs the video's metadata and chunk digests spends them from the same budget). A
listing is its pages one after the other, each with its own deadline, a retry asking again for
that page only (after the last one answered): a large store's listing under load goes on as
long as each page is answered in time (one deadline for them all failed at 100k videos, and
its retry began again at page 1), and fails once one is not, so it ends within one deadline
(plus one request timeout) per page. Errors the client marks `transient` (connection
resets, timeouts, 5xx, an answer that is not exactly the asked range), data failing its digest
and attempts that ran out of time are retried with jittered exponential backoff until the
deadline; then `RemoteUnavailable`, naming the hash and range (or the page). A 404 is
`NotFound` at once, a 401/403 `AccessDenied` at once (the token is missing or wrong), any
other refusal (4xx) `RemoteError` at once.

Bounds. Each HTTP request has its own per-read timeout (`per_request_timeout`, at most a third
of the deadline, so one stalled request leaves time to retry), but a response trickling in
slowly never times out that way. So every attempt runs on a worker thread and the caller waits
for it only until the operation's *cutoff* (deadline + one request timeout): whatever the
service does, the caller has its answer or an error by then. An attempt given up that way
(`overdue`) also stops itself: a range checks the cutoff after every network read, a listing
page once it is in.

After a failure. The kernel asks again at once, page by page, for a read that failed; a fetch
overlapping a range that failed for good less than `failure_memory` ago therefore gets one
attempt (its deadline is "now"), not a second deadline of retries: the reader has its EIO
after one deadline, and a service that is back answers that attempt. Should that attempt fail
too, the next one at the range waits until `failure_pause` after it: a kernel asking for a page
of a populated mapping for as long as it fails sends a few requests a second, not hundreds.

Integrity. `fetch` returns exactly `end - start` bytes or raises: the client already refuses an
answer whose status, Content-Range or length is not the asked range, and the length is checked
again here. When the service publishes per-chunk BLAKE3 digests (`GET /video/{hash}/chunks`,
fetched a page at a time and cached, see vcfs.digests), every chunk a fetch touches is hashed
and compared before any of its bytes are returned. The chunk size is the video's, as the
service recorded it at ingest (1 MiB for the oldest videos, 256 KiB by default since): a block
made of whole chunks (any chunk size that divides the block size) is verified chunk by chunk as
it is. A fetch whose ends cut a chunk (blocks smaller than the chunks, or not aligned to them)
is widened to whole chunks; the partly used edge chunks are kept, verified, in a small LRU, so
the neighbouring blocks cost no second request. Not chunks bigger than half that LRU (a service
recording 8 or 16 MiB chunks): a 1 MiB block would cost 8 or 16 MiB, so the chunks it cuts are
read range-checked only, which the log says once per chunk size (`_say_unverified`). A
mismatch is retried like a transient error (a flaky proxy or disk), so corrupt bytes never
reach the block cache. The first fetch of a hash asks for the range and the digests at once (a
round trip saved when a player opens a file) and returns the bytes only once the digests have
arrived and match; if the range cuts a chunk, or does not match, it falls back to the path
above. So does the first fetch in a page of digests not yet known; `fetch_blocks`, once the
video's chunk size is known, sends such a page's request and the range's together and verifies
the first chunk when both are in.

First block with the metadata. A player stats a path right before reading its first bytes, so a
lookup of a video whose metadata is not cached (`meta(..., first_block=B)`, which the filesystem
passes for a single path's lookup) sends `/meta`, the first page of its chunk digests and one
attempt at its first block (`Range: bytes=0-(B-1)`) at once, pipelined on one connection, the
warmest the client has (`VidCacheClient.open_video_into`): the lookup gets its answer one round
trip later, and the first read finds the block arriving right behind it, with no TCP handshake
when a connection is warm. The block waits in a small holding place (`first_blocks_held` blocks,
unusable after `first_block_ttl`: their memory goes at the next cold lookup, as cachetools'
TTLCache expires entries when written to) until `fetch` or `fetch_blocks` asks for exactly that
block; only then is it verified against the digests (and taken out: one use) and returned, so
the block cache's single in-flight fetch of block 0 is this request. `fetch_blocks` follows it
as it arrives, verifying and handing on each chunk as it comes in. A file shorter than the block
is answered up to its end, which is that block. If the metadata does not come that way (an
error, or late), the lookup asks for it again the usual way, with retries; any failure of the
block (an error, a wrong length, a digest mismatch, chunks coarser than the block, an exchange
silent for `first_block_patience`, as behind a proxy that does not pass pipelined requests on)
drops it quietly and the normal path fetches the block. A scattered read elsewhere in the file
meanwhile waits for those digests, within the same bounds, so that its fetch can stop at the
chunk it needs (`fetch_blocks` cannot cut a block without the chunk size). Lookups answered from
the last listing or the cache send nothing more: that is a player's lookup after an `ls by-hash`
(and every lookup of `ls -l`, `du`, `find` sweeping the folder, which would otherwise each fetch
a block they never read). Such a player loses nothing: the `/meta` round trip the pipelining
hides is not needed at all, and its first read asks for the block and its digests at once
(`_fetch_with_digests`), one round trip as well. For a hash the service does not have, `/meta`'s
404 ends the exchange.

Bytes. Ranges are received with the client's `read_range_into`, straight from the socket into
the `bytes` objects that are returned and cached (`vcfs.blocks.unfilled_block`): no pieces to
join, no receive buffer to copy out of. `fetch_blocks` receives a run block by block, verifies
each chunk as soon as it is in, hands on each block's verified start as it grows
(`on_partial`) and each block once complete (`on_block`) while the rest of the run is still
arriving, so a reader waiting for the run's first bytes does not wait for its last. A
retried run asks only for the blocks not handed on.

Caches (content never changes for a hash, but videos come and go):
- the `by-hash/` listing: fresh for a few seconds, then returned as it is while a new one is
  fetched in the background (players list the folder at every open); its videos answer
  lookups by name until the next listing replaces it, however many there are (an LRU
  filled by the listing thrashed beyond its size: `ls -l` stats in the listing's order);
  one a 404 (a lookup's, a read's) says is gone answers none (`ls` shows it until the next
  listing), and is left out of a listing under way begun before that 404, whose page may
  have come before the delete, unless a lookup sent after the 404 finds it (ingested again;
  if not looked up, it is in the next listing begun after the 404); one listing is fetched
  at a time (the first is fetched once for all who wait for it), so none replaces a newer;
- metadata of other videos looked up by name (ingested since the listing, or no `ls` yet):
  an LRU of bounded size, kept until evicted, or until a listing begun after the lookup
  lacks the video (deleted since: a `stat` of it is then ENOENT, not a file whose reads
  fail);
- "no such video": a few seconds only, so a newly ingested video shows up quickly;
- chunk digests per video, by page, and the verified edge chunks described above.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import logging
import random
import re
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from blake3 import blake3
from cachetools import LRUCache, TTLCache

from vcfs import paths
from vcfs.blocks import FetchStopped, unfilled_block
from vcfs.digests import (
    MIN_SERVICE_CHUNK_SIZE,
    PAGE_BYTES,
    Digests,
    covering,
    pages_bytes,
    pages_of,
)
from vcfs.digests import parse as parse_digests
from vcfs.errors import (
    AccessDenied,
    CorruptData,
    NotFound,
    Overdue,
    RemoteError,
    RemoteUnavailable,
    Stopping,
    VcfsError,
)
from vcfs.faillog import Outage
from vcfs.limits import FUSE_THREADS
from vcfs.stats import Counters
from vcfs.threads import NoThread, start_thread, submit
from vidcache_client import (
    AuthError,
    NotFoundError,
    ProtocolError,
    ServerError,
    StatusError,
    TransportError,
    VidCacheClient,
    VidCacheError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

KIB = 1 << 10
MIB = 1 << 20

_STOPPING = "vcfs is stopping: giving up"
_NOT_VIDCACHE = "something answers there, but not a vidcache service (check the URL and port)"
_NOTHING_LISTENS = ("nothing listens there (start the service, vidcache serve, or check the URL "
                    "and port)")
# A video no service has (a BLAKE3 digest of all zeros): asked for where the answer for it
# shows whether the service has the route, and lets reads through (`check_health`).
_NO_VIDEO = "0" * 64
# How this project's service answers a route it does not have (see `check_health`).
_NO_SUCH_ENDPOINT = "no such endpoint: "
_WRONG_PATH = ("a vidcache service answers there, but its API is not at this path (check the "
               "URL's path)")
# The request a client error names (` [GET http://host/video/HASH]`), see `_reason`.
_CLIENT_REQUEST = re.compile(r" \[[A-Z]+ \S+\]")

# Failures of one attempt that another attempt may not have.
_RETRIED = (CorruptData, Overdue)
# A verified fetch's attempt at its cutoff, its range in but not its page of chunk digests. Not
# naming the video: the attempt's error follows its range's words, which do.
_DIGESTS_LATE = "its chunk digests had not come by the cutoff"


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteConfig:
    # Rides out a service restart or a network blip; then the read fails with EIO.
    timeout: float = 30.0
    # A request silent this long is stalled (also capped at a third of `timeout`, see below).
    request_timeout: float = 10.0
    # First retry soon (a reset connection usually works at once), then back off to 2 s.
    backoff_initial: float = 0.1
    backoff_max: float = 2.0
    # `ls by-hash` twice in a row is one request; a new video is listed by the `ls` after the
    # refresh this age starts (in the background: see `Remote.list_videos`).
    listing_ttl: float = 5.0
    # A lookup of a not-yet-ingested hash is retried by the kernel after this long anyway.
    negative_ttl: float = 3.0
    # The service's largest listing page: the fewest requests (each with its own deadline)
    # for `ls by-hash`.
    listing_page: int = 1000
    # Videos looked up by name that the last listing lacks (it answers for its own):
    # ~300 bytes each, 64k in ~20 MB.
    meta_entries: int = 65_536
    # Digests take 32 bytes per chunk, kept by page of the video (vcfs.digests): 128 KiB per
    # GiB read in 256 KiB chunks, so the pages of ~250 GiB of video.
    digest_bytes: int = 32 * MIB
    # Video bytes whose digests come in one request (vcfs.digests says why); a power of two,
    # rounded to whole chunks of each video.
    digest_page_bytes: int = PAGE_BYTES
    # Verified edge chunks of widened fetches: 8 chunks of 1 MiB, enough for a few streams.
    verified_chunk_bytes: int = 8 * MIB
    # One worker per connection of the client, one per FUSE thread (vcfs.limits): attempts
    # never queue behind each other, even with every read the kernel lets wait on vcfs stalled.
    workers: int = FUSE_THREADS
    # The kernel re-asks a failed read at once, page by page: within this time a range that
    # failed gets one attempt, not a second deadline of retries.
    failure_memory: float = 1.0
    # A range whose one attempt failed too is asked again at most this often: the kernel
    # asks for a page of a populated or locked mapping for as long as it fails, which was
    # ~500 requests a second to a service refusing at once.
    failure_pause: float = 0.25
    # A player stats a path right before reading it: a cold lookup also fetches the first
    # block and the digests, so that read waits one round trip less.
    first_block_with_meta: bool = True
    # First blocks fetched that way and not read yet: a few streams being opened at once.
    first_blocks_held: int = 8
    # A `stat` alone never reads its block: let it go soon.
    first_block_ttl: float = 10.0
    # The lookup's pipelined answers silent this long (or 8 round trips of its `/meta`, if
    # longer): something on the way dropped them; the read asks for the block the usual way.
    first_block_patience: float = 1.0

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.request_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.listing_page < 1:
            raise ValueError(f"listing_page must be positive, got {self.listing_page}")
        page = self.digest_page_bytes
        if page < MIN_SERVICE_CHUNK_SIZE or page & (page - 1):
            raise ValueError(f"digest_page_bytes must be a power of two of at least "
                             f"{MIN_SERVICE_CHUNK_SIZE} bytes, got {page}")

    @property
    def per_request_timeout(self) -> float:
        """Per-read timeout of one HTTP request: a third of the deadline at most, so a stalled
        request leaves time for two more attempts."""
        return min(self.request_timeout, self.timeout / 3)


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
class _Failure:
    """A range that failed for good at `at` (for `failure_memory` after, it gets one attempt
    at a time); `again`: that failure was already such an attempt."""

    start: int
    end: int
    at: float
    again: bool


class _Arrival:
    """How far a block being received has got, for a reader that follows it while it comes;
    and when its exchange last answered anything (on the monotonic clock: silence is real
    time, whatever clock the deadlines use)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._block: bytes | None = None
        self._received = 0
        self._over = False
        self._sent = self._heard = time.monotonic()
        self.round_trip: float | None = None  # of the exchange's first answer

    def begin(self, block: bytes) -> None:
        with self._changed:
            self._block = block

    def heard(self) -> None:
        """An answer of the exchange (its metadata, its digests) came in."""
        with self._changed:
            self._heard = time.monotonic()
            if self.round_trip is None:
                self.round_trip = self._heard - self._sent

    def silent_for(self) -> float:
        with self._changed:
            return time.monotonic() - self._heard

    def update(self, received: int) -> None:
        with self._changed:
            self._received = received
            self._heard = time.monotonic()
            self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self._over = True
            self._changed.notify_all()

    def wait_beyond(self, seen: int, timeout: float) -> tuple[bytes | None, int]:
        """The block and how many of its bytes are in, once more than `seen` are, the
        receiving is over, or `timeout` has passed."""
        with self._changed:
            self._changed.wait_for(lambda: self._over or self._received > seen, timeout)
            return self._block, self._received


@dataclass(frozen=True, slots=True)
class _FirstBlock:
    """A video's first block and chunk digests, asked for along with its metadata."""

    size: int  # the block size asked for: bytes 0 to size - 1, or fewer in a smaller file
    data: concurrent.futures.Future[tuple[bytes, int]]  # the block and how much of it arrived
    meta: concurrent.futures.Future[dict[str, Any] | None]  # `/meta` document, None: 404
    digests: concurrent.futures.Future[dict[str, Any] | None]  # `/chunks` document, None: 404
    arrival: _Arrival  # the block's bytes as they come in


class _Stalled(Exception):
    """The answers pipelined with a lookup stopped coming: its first block is given up."""


def _stop_check(stop: threading.Event | None, content_hash: str) -> Callable[[int], None]:
    """An `on_progress` raising `FetchStopped` once `stop` is set."""

    def check(received: int) -> None:
        if stop is not None and stop.is_set():
            raise FetchStopped(f"fetch of {content_hash} stopped after {received} bytes")

    return check


def _settle(future: concurrent.futures.Future[T], outcome: T | BaseException) -> None:
    """Give `future` its result (or exception), unless it has one or was cancelled."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _page_size(page: Digests) -> int:
    """What an entry of the digest page cache costs, roughly."""
    return 100 + len(page.packed)


def _clear_frames(error: BaseException) -> None:
    """Drop the locals of the finished frames an attempt's error (and the errors it was raised
    from or while handling) went through: the blocks the attempt made to receive into among
    them. The error holds them and outlives the attempt: through the retry's backoff, as the
    cause of the error a read fails with, and in any reference cycle until the garbage
    collector frees it, late (the future of `vcfs.threads.submit` held each in one until
    session 36): in an outage, failed attempts' blocks piled up by the hundred MiB
    (docs/vcfs.md, "Memory limits"). Frames still running (the caller's) are left alone."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += (current.__cause__, current.__context__)


def _reason(exc: BaseException) -> str:
    """What went wrong, for a line naming the call itself (the hash and range: vcfs's `what`,
    and the service's URL in the outage line): a client error's message without the call
    that begins each one (up to the first ": ") and the request it names (` [GET URL]`),
    which named the hash twice more."""
    if not isinstance(exc, VidCacheError):
        return str(exc)
    return _CLIENT_REQUEST.sub("", str(exc).split(": ", 1)[-1])


REMOTE_COUNTERS = (
    "http_requests",  # attempts sent (one per page of a listing)
    "range_requests",  # attempts to fetch a byte range
    "bytes_fetched",  # bytes of ranges returned to the cache
    "retries",  # attempts repeated after a transient error
    "stopped",  # prefetches ended early: their reader closed the file or moved elsewhere
    "errors",  # operations that failed for good (became EIO/EACCES)
    "second_tries",  # fetches of a range that had just failed: one attempt, no retry loop
    "paced_tries",  # of those, attempts held back: their range's last attempt had failed too
    "overdue",  # attempts still running at their operation's cutoff, given up
    "verified_chunks",  # chunks whose BLAKE3 matched the service's digest
    "verify_failures",  # chunks that did not (each one retried)
    "verify_extra_bytes",  # bytes fetched beyond the asked ranges to verify whole chunks
    "first_blocks",  # first blocks (and digests) asked for along with a cold lookup's metadata
    "first_blocks_used",  # of those, blocks a read then took
    "first_blocks_dropped",  # of those, blocks a read could not use (fetched again)
    "listing_waits",  # calls that waited for the first listing another one was fetching
)


class Remote:
    """Fetcher, metadata source and listing over one `VidCacheClient` (thread-safe)."""

    def __init__(
        self,
        client: VidCacheClient,
        *,
        config: RemoteConfig | None = None,
        counters: Counters | None = None,
        token_sent: bool = False,
        credentials_sent: bool = False,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.config = config or RemoteConfig()
        self.counters = counters or Counters(*REMOTE_COUNTERS)
        self._token_sent = token_sent
        self._credentials_sent = credentials_sent  # the URL's user:password@, as Basic auth
        self._sleep = sleep or self._pause
        self._clock = clock
        self._lock = threading.Lock()
        # Metadata found by `/meta`, and when (a later listing lacking it means it is gone).
        self._known: LRUCache[str, tuple[VideoMeta, float]] = LRUCache(
            maxsize=self.config.meta_entries)
        self._missing: TTLCache[str, bool] = TTLCache(
            maxsize=self.config.meta_entries, ttl=self.config.negative_ttl, timer=clock
        )
        # Per video: the chunk size of its digests, or None when it has none to use.
        self._chunk_sizes: LRUCache[str, int | None] = LRUCache(
            maxsize=self.config.meta_entries)
        self._digest_pages: LRUCache[tuple[str, int], Digests] = LRUCache(
            maxsize=self.config.digest_bytes, getsizeof=_page_size
        )
        # `/chunks` requests under way, by (hash, start, end): one at a time per range.
        self._digest_requests: dict[tuple[str, int, int],
                                    concurrent.futures.Future[dict[str, Any] | None]] = {}
        self._verified: LRUCache[tuple[str, int], bytes] = LRUCache(
            maxsize=self.config.verified_chunk_bytes, getsizeof=len
        )
        # Chunk sizes too big to widen fetches to, said so in the log (`_say_unverified`).
        self._unverified_chunk_sizes: set[int] = set()
        self._first_blocks: TTLCache[str, _FirstBlock] = TTLCache(
            maxsize=self.config.first_blocks_held, ttl=self.config.first_block_ttl, timer=clock
        )
        self._failures: dict[str, list[_Failure]] = {}
        # False for a vidcache 1.x without this project's extensions (`check_health`).
        self._extended = True
        # A vidcache 1.x's refusal of a video's bytes at its health check (`check_access`).
        self._reads_refused: AuthError | None = None
        self._listing: list[VideoMeta] = []
        # The last listing's videos by hash: they answer lookups by name (see `meta`).
        self._listed: dict[str, VideoMeta] = {}
        self._listing_at: float | None = None
        self._listing_refresh: threading.Thread | None = None
        # The first listing while it is fetched: whoever else needs it waits for it.
        self._first_listing: concurrent.futures.Future[list[VideoMeta]] | None = None
        # When each listing under way began, and the videos a 404 said were gone meanwhile,
        # with when: a listing begun before may have had their page already (`_fetch_listing`).
        self._listings_begun: list[float] = []
        self._gone: dict[str, float] = {}
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.workers, thread_name_prefix="vcfs-http"
        )
        # Done once close() begins: what `_bounded` waits on besides its attempt.
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._outage = Outage(log, client.base_url, self.config.timeout, clock)

    @classmethod
    def connect(
        cls, base_url: str, *, config: RemoteConfig | None = None, token: str | None = None
    ) -> Remote:
        """A Remote with its own client (sending `token` as a bearer token if given)."""
        config = config or RemoteConfig()
        client = VidCacheClient(
            base_url,
            timeout=config.per_request_timeout,
            token=token,
            max_connections=config.workers,
            # The kernel keeps two reads in flight for a streaming reader: the second one
            # finds a connection ready instead of paying a handshake (a round trip).
            spare_connection=True,
        )
        return cls(client, config=config, token_sent=token is not None,
                   credentials_sent="@" in urllib.parse.urlsplit(base_url).netloc)

    def close(self) -> None:
        """Stop now (idempotent): the requests in flight are cut and fail, as does any later
        one, with `Stopping`, instead of running to their deadline. A read waiting for a
        stalled service then gets its EIO at once, and the daemon is not kept alive by an
        attempt's thread until its cutoff."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # closed twice
            self._stopped.set_result(None)
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._client.abort()
        self._outage.flush()

    # -- service ---------------------------------------------------------------------------

    def operation_failed(self, file: int | None) -> None:
        """An operation of the mount failed with an error of this remote's: a read of the open
        file numbered `file`, or (None) a lookup, an open or a listing; the outage lines
        count them."""
        self._outage.failed(file)

    def check_health(self) -> None:
        """One `GET /health` (and `_check_wire_protocol`'s request after a JSON 404);
        RemoteUnavailable with the reason if it is not ok, AccessDenied if a proxy in front of
        the service refuses it."""
        self.counters.add("http_requests")
        try:
            status = self._bounded(lambda _: self._client.health(), self._cutoff(self._deadline()))
        except ProtocolError as exc:  # an answer, but no JSON: another kind of server
            raise RemoteUnavailable(f"{exc}: {_NOT_VIDCACHE}") from exc
        except AuthError as exc:  # vidcache's /health is open: a proxy in front asks for more
            raise self._access_denied("health check", exc) from exc
        except StatusError as exc:
            if exc.status_code == 404 and exc.detail.startswith(_NO_SUCH_ENDPOINT):
                # This project's service names the route it lacks (vidcache 1.x says "Not
                # Found"), and has /health at its root: the URL's path is not its API's.
                raise RemoteUnavailable(
                    f"health check: HTTP 404 ({exc.detail}): {_WRONG_PATH}") from exc
            if exc.status_code == 404 and exc.json_detail:
                # vidcache's JSON errors, but no /health: the wire protocol's routes without
                # ours (/health, /videos, /video/<hash>/chunks), if it has those.
                self._reads_refused = self._check_wire_protocol(exc.detail)
                self._extended = False
                if self._reads_refused is not None:
                    return  # the mount stops at check_access, which says why: no advice first
                log.warning("%s: no /health, but errors in vidcache's JSON: taken for a "
                            "vidcache 1.x without the extensions of this project. by-hash "
                            "lists no videos (open them by name, by-hash/<hash>.<ext>), and "
                            "bytes are checked against their ranges, not against chunk "
                            "digests. If this is not a vidcache service, check the URL.",
                            self._client.base_url)
                return
            if exc.status_code is not None and exc.status_code < 500:
                # Not the server's error page (an HTML 404 of some web server) in one line.
                raise RemoteUnavailable(
                    f"health check: HTTP {exc.status_code}: {_NOT_VIDCACHE}") from exc
            raise RemoteUnavailable(str(exc)) from exc
        except (VidCacheError, Overdue) as exc:
            if isinstance(exc, TransportError) and exc.refused:
                raise RemoteUnavailable(f"{exc}: {_NOTHING_LISTENS}") from exc
            raise RemoteUnavailable(str(exc)) from exc
        if status.get("status") != "ok":
            raise RemoteUnavailable(f"service reports {status!r}")

    def _check_wire_protocol(self, no_health: str) -> AuthError | None:
        """One `GET /video/<hash>` (its first byte) of a hash no video has, after a JSON 404
        for /health (`no_health`, its detail): RemoteUnavailable unless the answer is that of a
        vidcache 1.x, which has the route and says in its own JSON 404 that there is no such
        video. Another JSON API without /health answers it so too (FastAPI: `{"detail": "Not
        Found"}`), and the video the same, a route it lacks as well. A read: nothing is stored
        or changed. Returns the refusal if the route is behind a token vcfs lacks (None: reads
        are let through), which `check_access` reports."""
        self.counters.add("http_requests")
        try:
            self._bounded(lambda _: self._client.get_bytes(_NO_VIDEO, (0, 0)),
                          self._cutoff(self._deadline()))
        except NotFoundError as exc:
            if exc.json_detail and exc.detail != no_health:
                return None
        except AuthError as exc:  # the route is there, behind a token
            return exc
        except ServerError as exc:
            raise RemoteUnavailable(str(exc)) from exc
        except (StatusError, ProtocolError):
            pass  # another status, or an answer that is no video's bytes: not vidcache's
        except (VidCacheError, Overdue) as exc:  # no answer
            raise RemoteUnavailable(str(exc)) from exc
        raise RemoteUnavailable(f"health check: HTTP 404 ({no_health}): {_NOT_VIDCACHE}")

    def check_access(self) -> None:
        """AccessDenied if the service wants another token (its health check is open even
        where reading needs the token), after `check_health`. One `GET /videos?limit=1`; none
        on a vidcache 1.x, whose health check already asked for a video's bytes: a 401/403
        there is the refusal, a 404 means reads are let through. Any other failure is only
        logged: the service answered /health, and the reads themselves will retry."""
        if not self._extended:
            if self._reads_refused is not None:
                raise self._access_denied("video data", self._reads_refused) from (
                    self._reads_refused)
            return
        self.counters.add("http_requests")
        what = "the video listing"
        try:
            self._bounded(lambda _: next(iter(self._client.list_videos(page_size=1)), None),
                          self._cutoff(self._deadline()))
        except AuthError as exc:
            raise self._access_denied(what, exc) from exc
        except (VidCacheError, Overdue) as exc:
            log.warning("the service answers /health but not %s: %s", what, exc)

    # -- metadata --------------------------------------------------------------------------

    def meta(
        self, content_hash: str, *, deadline: float | None = None, first_block: int = 0,
        recheck: bool = False,
    ) -> VideoMeta | None:
        """The video's metadata, None if the service has no such hash (both cached).

        With `first_block` (a block size) and the metadata not cached, the video's first block
        and chunk digests are asked for at the same time (see the module docstring). With
        `recheck`, a recent 404 is not taken as the answer: the service is asked again (a read
        of an open file, which a 404 of one range must not fail for `negative_ttl`)."""
        with self._lock:
            known = self._cached_meta(content_hash)
            if known is not None:
                return known
            if content_hash in self._missing and not recheck:
                return None
        asked = self._clock()
        if deadline is None:  # one for the whole lookup: the pipelined try and the retries
            deadline = self._deadline()
        speculation = self._start_first_block(content_hash, first_block) if first_block else None
        try:
            if speculation is not None and self._meta_answered(content_hash, speculation,
                                                               deadline):
                self._outage.answered()
                doc = speculation.meta.result()
            else:
                doc = self._with_retries(f"metadata of {content_hash}",
                                         lambda _: self._client.get_meta(content_hash),
                                         deadline=deadline)
            meta = None if doc is None else VideoMeta.from_json(doc, content_hash=content_hash)
        except BaseException:
            self._drop_first_block(content_hash, speculation)
            raise
        if meta is None:
            self._drop_first_block(content_hash, speculation)
            self._forget(content_hash)
            return None
        with self._lock:
            self._known[content_hash] = meta, self._clock()
            self._missing.pop(content_hash, None)
            gone_at = self._gone.get(content_hash)
            if gone_at is not None and gone_at < asked:
                # Asked for after a 404 said it was gone, and found: ingested again, so the
                # listings under way (whose page may have come after that) need not leave it out.
                del self._gone[content_hash]
        if speculation is not None:  # keep the digests as soon as they are in
            speculation.digests.add_done_callback(
                functools.partial(self._keep_answered_digests, meta)
            )
        return meta

    def _cached_meta(self, content_hash: str) -> VideoMeta | None:
        """The video's metadata from the last listing or an earlier lookup, if either has it
        (the caller holds the lock)."""
        listed = self._listed.get(content_hash)
        if listed is not None:
            return listed
        known = self._known.get(content_hash)
        return None if known is None else known[0]

    def _meta_answered(self, content_hash: str, speculation: _FirstBlock,
                       deadline: float) -> bool:
        """Whether the metadata asked for along with the first block came, waited for until
        the attempt's cutoff. If it failed or is late, the normal path asks again (and
        reports the failure if it persists)."""
        cutoff = self._cutoff(deadline)
        try:
            speculation.meta.result(timeout=max(cutoff - self._clock(), 0))
        except Exception as exc:  # an error, or late
            log.info("%s: the metadata asked for with the first block did not come (%s: %s); "
                     "asking again", content_hash, type(exc).__name__, _reason(exc))
            return False
        return True

    def list_videos(self) -> list[VideoMeta]:
        """Every stored video, ordered by hash; cached for `listing_ttl` seconds. Past that, the
        last listing is returned at once while a new one is fetched in the background (a player
        lists the folder of every file it opens, looking for subtitles: it must not wait for
        every page of a large cache each time); only the first listing is waited for, fetched
        once for all who ask meanwhile. So one listing is fetched at a time, and none can end
        after a newer one to replace it. The same list (never changed) until the next listing
        replaces it: what is derived from it can be kept as long as it is returned."""
        if not self._extended:  # no listing to ask for
            return self._listing
        with self._lock:
            if self._listing_at is not None:
                age = self._clock() - self._listing_at
                if age >= self.config.listing_ttl and self._listing_refresh is None:
                    refresh = threading.Thread(
                        target=self._refresh_listing, name="vcfs-listing", daemon=True)
                    # The last listing meanwhile; the next call tries again.
                    with contextlib.suppress(NoThread):
                        start_thread(refresh, "a listing")
                        self._listing_refresh = refresh
                return self._listing
            first = self._first_listing
            fetching = first is None
            if first is None:
                first = self._first_listing = concurrent.futures.Future()
            else:
                self.counters.add("listing_waits")
        if fetching:
            try:
                first.set_result(self._fetch_listing())
            except BaseException as exc:
                first.set_exception(exc)
            finally:
                with self._lock:
                    self._first_listing = None
        # The fetch ends within its pages' deadlines, and at once on close().
        return first.result()

    def _refresh_listing(self) -> None:
        try:
            self._fetch_listing()
        except VcfsError as exc:  # the last listing stays; the next `ls` tries again
            log.warning("the video listing was not refreshed: %s", exc)
        finally:
            with self._lock:
                self._listing_refresh = None

    def _fetch_listing(self) -> list[VideoMeta]:
        """Every page of the service's listing, each with a deadline of its own (a retry asks
        again for that page only, not from the first), made VideoMeta as it comes in (a whole
        listing's raw records took 99 MB at 100k videos); then it becomes the last listing,
        less the videos a 404 said were gone after it began."""
        with self._lock:
            started = self._clock()
            self._listings_begun.append(started)
        try:
            listing: list[VideoMeta] = []
            after: str | None = None
            for number in itertools.count(1):
                page, after = self._with_retries(
                    f"the video listing, page {number}" + (f" (after {after})" if after else ""),
                    functools.partial(self._listing_page, after))
                listing += page
                if after is None:
                    break
            listed = {meta.content_hash: meta for meta in listing}
            with self._lock:
                # Videos a 404 said were gone after this listing began: their page may have
                # come before the delete. One ingested again is in the next listing begun after
                # the 404 (all its pages come after it), or in this one if a lookup found it
                # since (`meta` drops it from `_gone`).
                gone = {found for found, at in self._gone.items() if at >= started}
                if gone & listed.keys():
                    listing = [meta for meta in listing if meta.content_hash not in gone]
                    for content_hash in gone:
                        listed.pop(content_hash, None)
                # A lookup answered before this listing began that it lacks is of a video
                # deleted since; one answered later may be of a video ingested after its page
                # was listed.
                for content_hash in [known for known in self._known if known not in listed]:
                    if self._known[content_hash][1] < started:
                        del self._known[content_hash]
                self._listing, self._listed = listing, listed
                self._listing_at = self._clock()
            return listing
        finally:
            with self._lock:
                self._listings_begun.remove(started)
                # Only a listing under way begun before a 404 needs to know of it.
                first = min(self._listings_begun, default=None)
                self._gone = ({} if first is None else
                              {found: at for found, at in self._gone.items() if at >= first})

    def _listing_page(self, after: str | None, cutoff: float
                      ) -> tuple[list[VideoMeta], str | None]:
        """One page of the listing (the first, or the one after the hash `after`): its videos,
        and the cursor of the next page (None: it is the last). Not made VideoMeta if it came
        after the cutoff: the caller has given up on it."""
        # Not the client's `list_videos`, which starts at the first page: a retry must not.
        answer = self._client.list_videos_page(after=after, page_size=self.config.listing_page)
        if self._clock() > cutoff:
            raise Overdue(f"listing page after {after!r} came after the deadline")
        page = []
        for doc in answer.items:
            try:
                page.append(VideoMeta.from_json(doc))
            except RemoteError as exc:
                log.warning("skipping a listing entry: %s", exc)
        return page, answer.next

    def last_listing(self) -> list[VideoMeta]:
        """The most recent listing, however old, without asking the service (for statfs)."""
        with self._lock:
            return self._listing

    def _forget(self, content_hash: str) -> None:
        """The service says the video is gone (a 404): stop believing the cached metadata, and
        the listings under way (see `_fetch_listing`)."""
        with self._lock:
            self._known.pop(content_hash, None)
            self._listed.pop(content_hash, None)
            self._missing[content_hash] = True
            if content_hash in self._chunk_sizes and self._chunk_sizes[content_hash] is None:
                del self._chunk_sizes[content_hash]  # perhaps only its `/chunks` 404
            if self._listings_begun:
                self._gone[content_hash] = self._clock()

    # -- bytes -----------------------------------------------------------------------------

    def fetch(self, content_hash: str, start: int, end: int) -> bytes:
        """Exactly the bytes `[start, end)` of the video (a `vcfs.blocks.Fetcher`)."""
        return self._fetch(content_hash, start, end, on_partial=None)

    def _fetch(self, content_hash: str, start: int, end: int, *,
               on_partial: Callable[[bytes, int], None] | None,
               deadline: float | None = None, stop: threading.Event | None = None) -> bytes:
        """`fetch` (by `deadline`, if the operation began earlier); a first block fetched with
        the metadata is handed to `on_partial(block, ready)` chunk by chunk as it is verified,
        before it is complete. `FetchStopped` once `stop` is set."""
        if end <= start:
            return b""
        asked = f"{content_hash} bytes {start}-{end - 1}"
        if deadline is None:
            deadline = self._deadline()
        failure = self._recent_failure(content_hash, start, end)
        if failure is not None:
            self.counters.add("second_tries")
            since = self._clock() - failure.at
            if failure.again and since < self.config.failure_pause:
                self.counters.add("paced_tries")
                self._sleep(self.config.failure_pause - since)
            deadline = self._clock()
            asked += f" (failed {deadline - failure.at:.1f} s ago: one attempt)"
        with self._outcome_noted(content_hash, start, end, again=failure is not None):
            held = self._take_first_block(content_hash, start, end, deadline, on_partial)
            if held is not None:
                data = held
            elif self._first_fetch_overlaps_digests(content_hash, start, end):
                data = self._fetch_with_digests(asked, content_hash, start, end, deadline, stop)
            else:
                digests = self._chunk_digests(content_hash, deadline, start, end)
                data = self._fetch_verified(asked, content_hash, start, end, digests, deadline,
                                            stop)
        self.counters.add("bytes_fetched", len(data))
        return data

    def fetch_blocks(
        self,
        content_hash: str,
        start: int,
        end: int,
        block_size: int,
        *,
        on_block: Callable[[int, bytes], None] | None = None,
        on_partial: Callable[[int, bytes, int], None] | None = None,
        skip: int = 0,
        until: int | None = None,
        on_span: Callable[[int, int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> list[bytes]:
        """`fetch` as consecutive pieces of `block_size` bytes (a `vcfs.blocks.BlockFetcher`),
        each also handed to `on_block(i, piece)` as soon as it is verified, in order, and,
        while it arrives, to `on_partial(i, piece, ready)` each time more of its first bytes
        are verified.

        When the digests are known and each block is made of whole chunks (chunks of the
        block size or finer), the run is ONE request whose body is received block by block
        into a buffer; each chunk is verified as soon as it is in, and each block reported
        as it completes, while the rest is still arriving; a retry asks only for the blocks
        not yet reported. It then also leaves out the whole chunks among the first `skip`
        bytes: the first piece is the tail of its block (a reader jumping into the middle
        of a block waits for, and the link carries, only the chunks from there on). Given
        `until`, it likewise stops at the end of the chunk holding byte `until - 1` of the
        last block, after telling `on_span` the bytes it will bring (a scattered read's fetch:
        a scattered 128 KiB read brings one or two chunks, not the rest of its block; or the
        head of a block whose tail is cached).
        Otherwise (no digests yet, chunks coarser than the blocks) it is `fetch`, cut into
        pieces; but given `until`, digests that a cold lookup asked for and that are still on
        their way are waited for first (`_await_lookup_digests`). A first block fetched
        with the metadata is used as the run's first piece. Once `stop` is set, the one
        request ends at its next receive, the connection is closed, and `FetchStopped` is
        raised (a readahead whose reader has gone: the link is the next request's)."""
        if start == 0 and self._holds_first_block(content_hash, block_size):
            first = self._fetch(
                content_hash, 0, min(block_size, end),
                on_partial=None if on_partial is None else functools.partial(on_partial, 0),
            )
            if on_block is not None:
                on_block(0, first)
            if end <= block_size:
                return [first]
            rest = self.fetch_blocks(
                content_hash, block_size, end, block_size,
                on_block=None if on_block is None else lambda i, piece: on_block(i + 1, piece),
                on_partial=None if on_partial is None else (
                    lambda i, piece, ready: on_partial(i + 1, piece, ready)),
                until=until, on_span=on_span, stop=stop,
            )
            return [first, *rest]
        deadline = self._deadline()
        if until is not None:
            self._await_lookup_digests(content_hash, deadline)
        with self._lock:
            chunk_size = self._chunk_sizes.get(content_hash)  # None: not known, or no digests
            meta = self._cached_meta(content_hash)
        if (
            chunk_size is None
            or meta is None
            or self._recent_failure(content_hash, start, end) is not None  # `fetch`: one try
            or block_size % chunk_size
            or start % block_size
            or (end % block_size and end != meta.size)
        ):
            try:  # one range, cut into blocks once it is all in: a stop must end it too
                data = self._fetch(content_hash, start, end, on_partial=None, deadline=deadline,
                                   stop=stop)
            except FetchStopped:
                self.counters.add("stopped")
                raise
            view = memoryview(data)
            pieces = [data] if len(data) <= block_size else [
                bytes(view[low : low + block_size]) for low in range(0, len(data), block_size)]
            for position, piece in enumerate(pieces):
                if on_block is not None:
                    on_block(position, piece)
            return pieces
        lead = min(skip, block_size - 1) // chunk_size * chunk_size
        if until is not None:
            last_block = (end - 1) // block_size * block_size
            end = min(end, last_block + -(-until // chunk_size) * chunk_size)
            if on_span is not None:
                on_span(start + lead, end)
        # A page of digests not yet known (a jump into a long video) is asked for while the
        # range arrives: the first chunk waits for it, not the request.
        digests = self._digests_soon(content_hash, deadline, start + lead, end)

        def handed_on(position: int, block: bytes) -> None:
            # Counted before the cache has the block, not when the run ends: a read may return
            # while the rest of its block arrives, and a snapshot with no block in flight
            # (the cache's `fetching_blocks`) must count every byte already handed on.
            self.counters.add("bytes_fetched", len(block))
            if on_block is not None:
                on_block(position, block)

        sink = _BlockSink(handed_on, on_partial)
        # Set while the attempt waits for the digests: the cutoff then ends it with that
        # reason, whichever timer at the cutoff fires first (this wait's or the attempt's).
        awaiting_digests = threading.Event()
        try:
            with self._outcome_noted(content_hash, start + lead, end):
                self._with_retries(
                    f"{content_hash} bytes {start + lead}-{end - 1}",
                    lambda cutoff: self._attempt_blocks(
                        content_hash, start + sink.count * block_size if sink.count else
                        start + lead, end, block_size, digests, sink, cutoff, stop,
                        awaiting_digests,
                    ),
                    deadline=deadline,
                    overdue_reason=lambda: _DIGESTS_LATE if awaiting_digests.is_set() else None,
                )
        except FetchStopped:
            self.counters.add("stopped")
            raise
        finally:
            sink.close()
        return sink.blocks

    def _await_lookup_digests(self, content_hash: str, deadline: float) -> None:
        """Before a scattered read's fetch, or a request for digests: if the chunk size is
        unknown because the digests a cold lookup asked for with the metadata are still on
        their way, wait for them and keep them. Without it a scattered fetch cannot stop at
        the read's chunk and brings the whole block, and a fetch asks for the same page
        again; they were sent before anything this fetch could send. Waited for as the
        first read waits for them (until the cutoff, given up once the lookup's exchange has
        been silent for its patience); if they do not come, the fetch goes on without."""
        with self._lock:
            if content_hash in self._chunk_sizes:
                return
            meta = self._cached_meta(content_hash)
            held = self._first_blocks.get(content_hash)
        if meta is None or held is None:
            return
        try:
            doc = self._held_result(held, held.digests, deadline)
        except Exception as exc:  # failed, cancelled, late or stalled: fetched without them
            log.info("%s: the chunk digests asked for with the metadata did not come (%s: %s)",
                     content_hash, type(exc).__name__, _reason(exc))
            return
        if doc is not None:  # a 404: asked again the usual way, where it is an error
            with contextlib.suppress(RemoteError):  # unusable: asked again the usual way too
                self._keep_digests(meta, doc, 0, 0)

    def _attempt_blocks(
        self,
        content_hash: str,
        start: int,
        end: int,
        block_size: int,
        digests_soon: concurrent.futures.Future[Digests | None],
        sink: _BlockSink,
        cutoff: float,
        stop: threading.Event | None,
        awaiting_digests: threading.Event,
    ) -> None:
        """One request for `[start, end)` (whole chunks; from the start of a block or of its
        tail), each block received straight into its own `bytes`; each chunk verified as soon
        as it is in (against `digests_soon`, waited for then, `awaiting_digests` set meanwhile;
        None: the video has none, its bytes pass unverified), the block's verified start
        handed to `sink` as it grows, and the block once it is complete. `FetchStopped` once
        `stop` is set."""
        if start >= end:  # every block arrived before the previous attempt failed
            return
        stopped = _stop_check(stop, content_hash)
        stopped(0)
        self.counters.add("range_requests")
        bounds = []
        low = start
        while low < end:
            high = min(low - low % block_size + block_size, end)
            bounds.append((low, high))
            low = high
        blocks, views = zip(*(unfilled_block(high - low) for low, high in bounds), strict=True)
        first_position = sink.count
        verified = start  # every chunk before this offset has matched its digest
        overdue = self._cutoff_check(end - start, cutoff)

        def verify_below(offset: int) -> None:
            nonlocal verified
            digests = self._digests_by_cutoff(digests_soon, cutoff, awaiting_digests)
            if digests is None:
                verified = max(verified, offset)
                return
            while verified < offset:  # block by block: chunks never straddle two
                position = verified // block_size - start // block_size
                low, high = bounds[position]
                verified = self._verify_chunks(digests, memoryview(blocks[position]), low,
                                               verified, min(offset, high))
                if verified < high:
                    return

        def progress(received: int) -> None:
            overdue(received)
            stopped(received)
            before = verified
            verify_below(start + received)
            position = verified // block_size - start // block_size
            if verified > before and position < len(bounds) and verified > bounds[position][0]:
                sink.partial(first_position + position, blocks[position],
                             verified - bounds[position][0])

        def filled(position: int) -> None:
            verify_below(bounds[position][1])
            sink.add(blocks[position])

        received = self._client.read_range_into(
            content_hash, start, views, on_filled=filled, on_progress=progress,
        )
        if received != end - start:
            raise CorruptData(f"got {received} bytes instead of {end - start}")

    def _digests_by_cutoff(
        self, digests_soon: concurrent.futures.Future[Digests | None], cutoff: float,
        awaiting: threading.Event,
    ) -> Digests | None:
        awaiting.set()
        try:
            return digests_soon.result(timeout=max(cutoff - self._clock(), 0))
        except concurrent.futures.TimeoutError as exc:
            raise Overdue(_DIGESTS_LATE) from exc
        except Exception as exc:
            # The page's request is bounded by the same cutoff: failing at it (given up
            # there), it is as late, and says so in the same words.
            if self._clock() >= cutoff:
                raise Overdue(_DIGESTS_LATE) from exc
            raise
        finally:
            awaiting.clear()

    def _cutoff_check(self, length: int, cutoff: float) -> Callable[[int], None]:
        """An `on_progress` for a read of `length` bytes: Overdue once the cutoff has passed
        before the read is complete (so a trickling answer ends by the cutoff too)."""

        def check(received: int) -> None:
            if received < length and self._clock() > cutoff:
                raise Overdue(f"only {received} of {length} bytes arrived by the deadline")

        return check

    def _fetch_verified(
        self,
        asked: str,
        content_hash: str,
        start: int,
        end: int,
        digests: Digests | None,
        deadline: float,
        stop: threading.Event | None = None,
    ) -> bytes:
        if digests is None:
            return self._fetch_range(asked, content_hash, start, end, None, deadline, stop)
        return self._fetch_chunks(asked, content_hash, start, end, digests, deadline, stop)

    def _first_fetch_overlaps_digests(self, content_hash: str, start: int, end: int) -> bool:
        """Whether to fetch the range while the digests are still on their way: for a known
        hash whose digests are not, and a range that may be whole chunks, whatever their size
        turns out to be: its ends lie on the smallest chunk size the service records (a range
        that cuts a chunk for sure waits for the digests, to be fetched widened at once)."""
        if self._known_digests(content_hash, start, end)[0]:
            return False
        with self._lock:
            meta = self._cached_meta(content_hash)
        return (
            meta is not None
            and start % MIN_SERVICE_CHUNK_SIZE == 0
            and (end % MIN_SERVICE_CHUNK_SIZE == 0 or end == meta.size)
        )

    def _fetch_with_digests(
        self, asked: str, content_hash: str, start: int, end: int, deadline: float,
        stop: threading.Event | None = None,
    ) -> bytes:
        """A fetch whose digests are not known yet (the first of a hash, or the first in a
        page of a long video): its range and its chunk digests at once, one round trip
        instead of two. The bytes are returned only once verified like any other; if they
        fail, or the range cuts a chunk (chunks coarser than the blocks), the verified path
        fetches it again, widened to whole chunks."""
        digests_soon = self._digests_soon(content_hash, deadline, start, end)
        data = self._fetch_range(asked, content_hash, start, end, None, deadline, stop)
        try:
            digests = digests_soon.result(timeout=max(self._cutoff(deadline) - self._clock(), 0))
        except concurrent.futures.TimeoutError as exc:
            raise RemoteUnavailable(f"chunk digests of {content_hash}: no answer in time") from exc
        if digests is None:
            return data
        chunk_start, _ = digests.bounds(start // digests.chunk_size)
        _, chunk_end = digests.bounds((end - 1) // digests.chunk_size)
        if (chunk_start, chunk_end) == (start, end):
            try:
                self._verify(digests, start, end, data)
            except CorruptData as exc:
                log.warning("%s: %s; fetching it again", asked, exc)
            else:
                return data
        return self._fetch_chunks(asked, content_hash, start, end, digests, deadline, stop)

    def _start_first_block(self, content_hash: str, block_size: int) -> _FirstBlock | None:
        """Send one attempt at the video's metadata, digests and first block, now, pipelined on
        one connection, unless that is off, already under way, or the digests are known (so
        was a fetch before)."""
        if not self.config.first_block_with_meta:
            return None
        cutoff = self._clock() + self.config.per_request_timeout
        arrival = _Arrival()
        meta: concurrent.futures.Future[dict[str, Any] | None] = concurrent.futures.Future()
        digests: concurrent.futures.Future[dict[str, Any] | None] = concurrent.futures.Future()
        # A service without the extensions publishes no digests: not asked, as if it said 404
        digest_page = (0, self.config.digest_page_bytes) if self._extended else None
        if digest_page is None:
            digests.set_result(None)

        def receive() -> tuple[bytes, int]:
            block, view = unfilled_block(block_size)
            arrival.begin(block)
            overdue = self._cutoff_check(block_size, cutoff)

            def progress(received: int) -> None:
                overdue(received)
                arrival.update(received)

            def heard(answer: concurrent.futures.Future[T], document: T) -> None:
                arrival.heard()
                _settle(answer, document)

            try:
                # The digests go before the block: the first read needs them too, and the
                # block's bytes would hold them up on a slow link.
                received = self._client.open_video_into(
                    content_hash, [view], on_meta=functools.partial(heard, meta),
                    digests=digest_page,
                    on_digests=functools.partial(heard, digests), on_progress=progress)
            except BaseException as exc:
                for answer in (meta, digests):
                    _settle(answer, exc)
                raise
            finally:
                arrival.end()
            return block, received

        def unsent(data: concurrent.futures.Future[tuple[bytes, int]]) -> None:
            if data.cancelled():  # never ran (close() cancels what is queued): nor will these
                meta.cancel()
                digests.cancel()

        with self._lock:
            if content_hash in self._first_blocks or content_hash in self._chunk_sizes:
                return None
            try:
                data = self._submit(receive)
            except NoThread:  # a bonus: the lookup asks for the metadata alone
                return None
            speculation = _FirstBlock(block_size, data, meta, digests, arrival)
            speculation.data.add_done_callback(unsent)
            self._first_blocks[content_hash] = speculation
        self.counters.add("first_blocks")
        self.counters.add("http_requests", 3 if digest_page else 2)
        self.counters.add("range_requests")
        return speculation

    def _drop_first_block(self, content_hash: str, speculation: _FirstBlock | None) -> None:
        """The lookup failed or found nothing: forget its first block (stop it if queued)."""
        if speculation is None:
            return
        with self._lock:
            if self._first_blocks.get(content_hash) is speculation:
                del self._first_blocks[content_hash]
        speculation.data.cancel()
        speculation.digests.cancel()

    def _holds_first_block(self, content_hash: str, block_size: int) -> bool:
        with self._lock:
            held = self._first_blocks.get(content_hash)
        return held is not None and held.size == block_size

    def _take_first_block(
        self, content_hash: str, start: int, end: int, deadline: float,
        on_partial: Callable[[bytes, int], None] | None,
    ) -> bytes | None:
        """The first block fetched with the metadata, if `[start, end)` is exactly that block:
        waited for, verified like any fetch and handed over once (and, with `on_partial`,
        its chunks as they arrive, see `_follow_first_block`). None (the caller fetches) if
        there is none, or it failed, or it cannot be verified."""
        if start != 0:
            return None
        with self._lock:
            meta = self._cached_meta(content_hash)
            held = self._first_blocks.get(content_hash)
            if held is None or meta is None or end != min(held.size, meta.size):
                return None
            del self._first_blocks[content_hash]
        try:
            digests = self._first_block_digests(meta, held, deadline)
        except _Stalled as exc:
            self._first_block_dropped(content_hash, exc)
            return None
        verified = 0
        try:
            if digests is not None:
                if end % digests.chunk_size and end != meta.size:
                    raise CorruptData(f"it cuts chunk {end // digests.chunk_size}")
                if on_partial is not None:
                    verified = self._follow_first_block(held, digests, end, deadline, on_partial)
            block, received = self._held_result(held, held.data, deadline)
            if received != end:
                raise CorruptData(f"got {received} bytes instead of {end}")
            if digests is not None:
                self._verify(digests, verified, end, memoryview(block)[verified:end])
        except Exception as exc:  # an error, cancelled, late, corrupt: the normal path will do
            self._first_block_dropped(content_hash, exc)
            return None
        self.counters.add("first_blocks_used")
        if received == len(block):
            return block
        return bytes(memoryview(block)[:received])

    def _follow_first_block(
        self, held: _FirstBlock, digests: Digests, end: int, deadline: float,
        on_partial: Callable[[bytes, int], None],
    ) -> int:
        """Verify the held first block's chunks as they arrive and hand its verified start to
        `on_partial`, until all its whole chunks below `end` are in, its receiving is over,
        or the cutoff has passed. Returns how many of its first bytes are verified; raises
        CorruptData for a chunk that does not match."""
        cutoff = self._cutoff(deadline)
        patience = self._patience(held)
        verified = seen = 0
        while True:
            chunk_end = digests.bounds(verified // digests.chunk_size)[1]
            if chunk_end >= end:  # the last chunk waits for the whole block
                return verified
            block, received = held.arrival.wait_beyond(
                seen, min(max(cutoff - self._clock(), 0), patience))
            if block is None or received <= seen:  # over, late or silent: the whole block decides
                return verified
            seen = received
            before = verified
            # `end - 1`: not the last chunk (see above)
            verified = self._verify_chunks(digests, memoryview(block), 0, verified,
                                           min(received, end - 1))
            if verified > before:
                on_partial(block, verified)

    def _patience(self, held: _FirstBlock) -> float:
        return max(self.config.first_block_patience, 8 * (held.arrival.round_trip or 0.0))

    def _held_result(self, held: _FirstBlock, answer: concurrent.futures.Future[T],
                     deadline: float) -> T:
        """`answer` of the lookup's pipelined exchange, waited for until the attempt's cutoff,
        but `_Stalled` once the exchange has said nothing for its patience: a proxy that does
        not pass pipelined requests on would otherwise hold the first read until the request
        timeout (10 s)."""
        patience = self._patience(held)
        end = time.monotonic() + max(self._cutoff(deadline) - self._clock(), 0)
        while True:
            try:
                return answer.result(timeout=max(min(end - time.monotonic(), patience), 0))
            except concurrent.futures.TimeoutError:
                if time.monotonic() >= end:
                    raise
                if held.arrival.silent_for() >= patience:
                    raise _Stalled(f"its pipelined answers stopped for {patience:.1f} s") from None

    def _first_block_dropped(self, content_hash: str, reason: Exception) -> None:
        self.counters.add("first_blocks_dropped")
        log.info("%s: the first block fetched with the metadata is unusable (%s: %s); "
                 "fetching it again", content_hash, type(reason).__name__, _reason(reason))

    def _first_block_digests(
        self, meta: VideoMeta, held: _FirstBlock, deadline: float
    ) -> Digests | None:
        """The first block's digests, asked for with the metadata, or, if that attempt
        failed, the normal way (with retries: it fails as any fetch would)."""
        end = min(held.size, meta.size)
        try:
            doc = self._held_result(held, held.digests, deadline)
        except _Stalled:  # the block is behind them on that connection: give both up
            raise
        except Exception:  # failed, cancelled or late: asked again below
            doc = None
        if doc is not None:  # a 404 is asked again the usual way, where it is an error
            self._keep_digests(meta, doc, 0, 0)
        # Known now, unless the block spans more than the page asked for: the rest then.
        return self._chunk_digests(meta.content_hash, deadline, 0, end)

    def _keep_answered_digests(
        self, meta: VideoMeta, answer: concurrent.futures.Future[dict[str, Any] | None]
    ) -> None:
        if not answer.cancelled() and answer.exception() is None and answer.result() is not None:
            with contextlib.suppress(RemoteError):  # unusable: the read asking for them fails
                self._keep_digests(meta, answer.result(), 0, 0)

    @contextlib.contextmanager
    def _outcome_noted(self, content_hash: str, start: int, end: int, *,
                       again: bool = False) -> Iterator[None]:
        """Around a fetch of `[start, end)` (`again`: the one attempt at a range that had just
        failed): a 404 forgets the video's metadata, a failure for good is remembered (see
        `_recent_failure`); both are re-raised."""
        try:
            yield
        except NotFound:
            self._forget(content_hash)
            raise
        except RemoteUnavailable:
            self._remember_failure(content_hash, start, end, again=again)
            raise

    def _recent_failure(self, content_hash: str, start: int, end: int) -> _Failure | None:
        """The latest failure for good of part of the range, if less than `failure_memory`
        ago (of two at once, a failed one attempt's)."""
        remembered_after = self._clock() - self.config.failure_memory
        with self._lock:
            return max(
                (f for f in self._failures.get(content_hash, ())
                 if f.at > remembered_after and f.start < end and start < f.end),
                key=lambda f: (f.at, f.again),
                default=None,
            )

    def _remember_failure(self, content_hash: str, start: int, end: int, *,
                          again: bool) -> None:
        now = self._clock()
        failure = _Failure(start, end, now, again)
        remembered_after = now - self.config.failure_memory
        with self._lock:
            for known in list(self._failures):  # few entries: failures are brief and rare
                alive = [f for f in self._failures[known] if f.at > remembered_after]
                if alive:
                    self._failures[known] = alive
                else:
                    del self._failures[known]
            self._failures.setdefault(content_hash, []).append(failure)

    def _fetch_chunks(
        self,
        asked: str,
        content_hash: str,
        start: int,
        end: int,
        digests: Digests,
        deadline: float,
        stop: threading.Event | None = None,
    ) -> bytes:
        """`[start, end)` from whole verified chunks: the edge chunks it cuts come from the
        verified-chunk LRU or are fetched whole (and then kept there)."""
        chunk_size = digests.chunk_size
        first, last = start // chunk_size, (end - 1) // chunk_size
        cut_first = start != digests.bounds(first)[0]
        cut_last = end != digests.bounds(last)[1]
        if not cut_first and not cut_last:
            return self._fetch_range(asked, content_hash, start, end, digests, deadline, stop)
        if chunk_size > self.config.verified_chunk_bytes // 2:
            # Widening would fetch huge chunks for small blocks: verify only whole ones.
            self._say_unverified(content_hash, chunk_size)
            return self._fetch_range(asked, content_hash, start, end, digests, deadline, stop)
        cut = {first: cut_first, last: cut_last} if first != last else {first: True}
        with self._lock:
            cached = {
                index: chunk
                for index in cut
                if cut[index] and (chunk := self._verified.get((content_hash, index))) is not None
            }
        low = first + 1 if first in cached else first
        high = last - 1 if last in cached else last
        parts = [cached[first]] if first in cached else []
        if low <= high:
            fetch_start, fetch_end = digests.bounds(low)[0], digests.bounds(high)[1]
            data = self._fetch_range(
                f"{asked} (as whole chunks, bytes {fetch_start}-{fetch_end - 1})",
                content_hash, fetch_start, fetch_end, digests, deadline, stop,
            )
            self.counters.add(
                "verify_extra_bytes",
                (fetch_end - fetch_start) - (min(end, fetch_end) - max(start, fetch_start)),
            )
            parts.append(data)
            keep = {}
            for index in cut:
                if cut[index] and low <= index <= high:
                    chunk_start, chunk_end = digests.bounds(index)
                    keep[index] = data[chunk_start - fetch_start : chunk_end - fetch_start]
            with self._lock:
                for index, chunk in keep.items():
                    self._verified[(content_hash, index)] = chunk
        if last in cached and last != first:
            parts.append(cached[last])
        whole = parts[0] if len(parts) == 1 else b"".join(parts)
        base = first * chunk_size
        return whole[start - base : end - base]

    def _say_unverified(self, content_hash: str, chunk_size: int) -> None:
        """Warn, once per chunk size, that the chunks of this size the mount's blocks cut are
        read range-checked only: nothing else would tell the operator, whom docs/vcfs.md
        promises every byte verified, and who can mount with blocks of whole chunks."""
        with self._lock:
            if chunk_size in self._unverified_chunk_sizes:
                return
            self._unverified_chunk_sizes.add(chunk_size)
        log.warning("%s: its chunk digests are of %g MiB chunks, larger than vcfs widens a fetch "
                    "to (%g MiB): the bytes of blocks that cut such a chunk are checked against "
                    "their range only, not against its digest. To verify every byte, mount with "
                    "a --block-size that is a multiple of %g MiB (said once per chunk size)",
                    content_hash, chunk_size / MIB, self.config.verified_chunk_bytes / 2 / MIB,
                    chunk_size / MIB)

    def _fetch_range(
        self,
        what: str,
        content_hash: str,
        start: int,
        end: int,
        digests: Digests | None,
        deadline: float,
        stop: threading.Event | None = None,
    ) -> bytes:
        """One range with retries, received straight into the `bytes` it returns, its whole
        chunks verified; `FetchStopped` once `stop` is set."""
        stopped = _stop_check(stop, content_hash)

        def attempt(cutoff: float) -> bytes:
            stopped(0)
            self.counters.add("range_requests")
            data, view = unfilled_block(end - start)
            overdue = self._cutoff_check(end - start, cutoff)

            def progress(received: int) -> None:
                overdue(received)
                stopped(received)

            received = self._client.read_range_into(content_hash, start, [view],
                                                    on_progress=progress)
            if received != end - start:
                raise CorruptData(f"got {received} bytes instead of {end - start}")
            if digests is not None:
                self._verify(digests, start, end, data)
            return data

        return self._with_retries(what, attempt, deadline=deadline)

    def _verify(
        self, digests: Digests, start: int, end: int, data: bytes | memoryview
    ) -> None:
        """Compare every chunk lying wholly inside `[start, end)` with its recorded digest."""
        first = -(-start // digests.chunk_size) * digests.chunk_size
        self._verify_chunks(digests, memoryview(data), start, first, end)

    def _verify_chunks(
        self, digests: Digests, data: memoryview, base: int, start: int, limit: int
    ) -> int:
        """Compare the chunks of `data` (the video's bytes from offset `base` on) that begin
        at or after `start`, a chunk boundary, and end at or before `limit` with their
        recorded digests, in order. Returns the end of the last one compared (`start` if
        none): the offset up to which the bytes are verified."""
        verified = start
        try:
            while verified < limit:
                index = verified // digests.chunk_size
                chunk_start, chunk_end = digests.bounds(index)
                if chunk_end > limit:
                    break
                self._verify_chunk(digests, index, data[chunk_start - base : chunk_end - base])
                verified = chunk_end
        finally:
            if verified > start:  # counted once per call, not per chunk: this is the hot path
                self.counters.add("verified_chunks", -(-(verified - start) // digests.chunk_size))
        return verified

    def _verify_chunk(self, digests: Digests, index: int, chunk: memoryview) -> None:
        digest = blake3(chunk).digest()
        if digest != digests.digest(index):
            self.counters.add("verify_failures")
            chunk_start, chunk_end = digests.bounds(index)
            raise CorruptData(
                f"chunk {index} (bytes {chunk_start}-{chunk_end - 1}) has BLAKE3 "
                f"{digest.hex()}, the service recorded {digests.digest(index).hex()}"
            )

    def _known_digests(
        self, content_hash: str, start: int, end: int
    ) -> tuple[bool, Digests | None]:
        """`(known, digests)` of the chunks of `[start, end)` from the cache: `(False, None)`
        when they must be fetched, `(True, None)` when the video has none to use."""
        with self._lock:
            if content_hash not in self._chunk_sizes:
                return False, None
            chunk_size = self._chunk_sizes[content_hash]
            if chunk_size is None:
                return True, None
            pages = [
                self._digest_pages.get((content_hash, page))
                for page in pages_of(start, end, chunk_size, self.config.digest_page_bytes)
            ]
        digests = covering(pages, start, end)
        return digests is not None, digests

    def _chunk_digests(
        self, content_hash: str, deadline: float, start: int, end: int
    ) -> Digests | None:
        """The service's digests of the chunks of `[start, end)` (cached by page, the pages
        missing fetched in one request); None when the video has none to use."""
        known, digests = self._known_digests(content_hash, start, end)
        if known:
            return digests
        self._await_lookup_digests(content_hash, deadline)  # asked for before: not again
        known, digests = self._known_digests(content_hash, start, end)
        if known:
            return digests
        # a read: a 404 of a range, the digests not kept yet, does not make the file vanish
        meta = self.meta(content_hash, deadline=deadline, recheck=True)
        if meta is None:
            raise NotFound(f"{content_hash}: no such video on the service")
        if not self._extended:  # a service that publishes none
            return self._keep_digests(meta, None, start, end)
        with self._lock:
            chunk_size = self._chunk_sizes.get(content_hash)
        # Not known yet: pages of a chunk size dividing the page, what the service records.
        low, high = pages_bytes(
            pages_of(start, end, chunk_size or MIN_SERVICE_CHUNK_SIZE,
                     self.config.digest_page_bytes),
            chunk_size or MIN_SERVICE_CHUNK_SIZE, self.config.digest_page_bytes)
        # Any refusal but a 404 (a proxy's 429 or 400, ...) fails this read and keeps nothing:
        # taken for "no digests", it left the video unverified for as long as that was kept.
        doc = self._digest_answer(content_hash, low, high, deadline)
        if doc is None:
            doc = self._digests_after_404(content_hash, low, high, deadline)
        return self._keep_digests(meta, doc, start, end)

    def _digests_after_404(self, content_hash: str, low: int, high: int, deadline: float
                           ) -> dict[str, Any] | None:
        """Asked again after a 404 for the digests of a video the service had described. One
        404 alone decides nothing: kept as "no digests", a stray one would leave the video
        unverified for as long as that entry stays cached. The video may be gone (its metadata
        is a 404 now too: NotFound), back again (the digests come), or on a service that
        publishes none (vidcache 1.x without this project's extensions: a second 404 with the
        video still there; None, read range-checked only)."""
        with self._lock:  # ask the service, not the caches
            self._known.pop(content_hash, None)
            self._listed.pop(content_hash, None)
            self._missing.pop(content_hash, None)  # a 404 from before it was listed
        if self.meta(content_hash, deadline=deadline) is None:
            raise NotFound(f"{content_hash}: no such video on the service (its chunk digests "
                           "and its metadata: 404)")
        doc = self._digest_answer(content_hash, low, high, deadline)
        if doc is None:
            log.warning("%s: the service has no chunk digests for it (404 twice, its metadata "
                        "found): reading it unverified", content_hash)
        return doc

    def _digest_answer(self, content_hash: str, low: int, high: int, deadline: float
                       ) -> dict[str, Any] | None:
        """The service's `/chunks` answer for bytes `[low, high)`, asked for with retries; one
        request at a time per range: a caller finding it asked already waits for that answer
        (concurrent reads jumping into one unknown page) until its own cutoff."""
        key = (content_hash, low, high)
        with self._lock:
            asked = self._digest_requests.get(key)
            if asked is None:
                answer: concurrent.futures.Future[dict[str, Any] | None] = (
                    concurrent.futures.Future())
                self._digest_requests[key] = answer
        if asked is not None:
            try:
                return asked.result(timeout=max(self._cutoff(deadline) - self._clock(), 0))
            except concurrent.futures.TimeoutError as exc:
                self.counters.add("errors")
                raise RemoteUnavailable(f"chunk digests of {content_hash}: the request "
                                        "under way for them had no answer by the deadline"
                                        ) from exc
        try:
            doc = self._with_retries(
                f"chunk digests of {content_hash}",
                lambda _: self._client.get_chunk_digests(content_hash, start=low, end=high),
                deadline=deadline,
            )
        except BaseException as exc:
            answer.set_exception(exc)
            raise
        else:
            answer.set_result(doc)
            return doc
        finally:
            with self._lock:
                del self._digest_requests[key]

    def _digests_soon(
        self, content_hash: str, deadline: float, start: int, end: int
    ) -> concurrent.futures.Future[Digests | None]:
        """`_chunk_digests`, on its own thread unless cached, so that a range can be fetched
        meanwhile (not on the worker pool: the digests' attempts run there, and the pool
        must not wait on itself)."""
        answer: concurrent.futures.Future[Digests | None] = concurrent.futures.Future()
        known, digests = self._known_digests(content_hash, start, end)
        if known:
            answer.set_result(digests)
            return answer

        def get() -> None:
            try:
                answer.set_result(self._chunk_digests(content_hash, deadline, start, end))
            except BaseException as exc:  # handed to whoever waits for them
                answer.set_exception(exc)

        try:
            start_thread(threading.Thread(target=get, name="vcfs-digests", daemon=True),
                         "digests")
        except NoThread:  # the digests first, then the range
            get()
        return answer

    def _keep_digests(
        self, meta: VideoMeta, doc: Mapping[str, Any] | None, start: int, end: int
    ) -> Digests | None:
        """Cache the pages of a `/chunks` answer (None: the service publishes none, so the
        video has no digests to use); return the digests of `[start, end)` (None: it has
        none). RemoteError, nothing kept, for an answer that is unusable (another video's, or
        counts that disagree with the metadata's size): taken for "no digests", it left the
        video unverified for as long as that was kept. RemoteError too, its pages kept, for
        one that lacks some of `[start, end)`: callers ask for pages that cover them, and a
        read never goes on unverified for want of them."""
        known, digests = self._known_digests(meta.content_hash, start, end)
        if known:  # e.g. the first block's digests, kept as soon as they arrived
            return digests
        page_bytes = self.config.digest_page_bytes
        pages = None if doc is None else parse_digests(meta.content_hash, meta.size, doc,
                                                       page_bytes)
        if doc is not None and pages is None:
            self.counters.add("errors")
            raise RemoteError(f"{meta.content_hash}: the service's chunk digests are unusable")
        with self._lock:
            if pages is None:
                # Not for a video a 404 said is gone meanwhile: the same content ingested
                # again has digests.
                if self._cached_meta(meta.content_hash) is not None:
                    self._chunk_sizes[meta.content_hash] = None
                return None
            for number, page in pages.items():
                key = (meta.content_hash, number)
                kept = self._digest_pages.get(key)
                if kept is None or len(kept.packed) < len(page.packed):  # keep the most
                    self._digest_pages[key] = page
                self._chunk_sizes[meta.content_hash] = page.chunk_size
        chunk_size = next(iter(pages.values())).chunk_size if pages else MIN_SERVICE_CHUNK_SIZE
        digests = covering([pages.get(number) for number in
                            pages_of(start, end, chunk_size, page_bytes)], start, end)
        if digests is None:  # asked for pages that cover them: the answer is wrong
            self.counters.add("errors")
            raise RemoteError(f"{meta.content_hash}: the service's chunk digests lack bytes "
                              f"{start}-{end - 1}")
        return digests

    # -- retry policy and bounds ------------------------------------------------------------

    def _deadline(self) -> float:
        return self._clock() + self.config.timeout

    def _cutoff(self, deadline: float) -> float:
        """When the caller stops waiting: an attempt started at the deadline gets one request
        timeout."""
        return deadline + self.config.per_request_timeout

    def _with_retries(
        self, what: str, call: Callable[[float], T], *, deadline: float | None = None,
        overdue_reason: Callable[[], str | None] | None = None,
    ) -> T:
        """`call(cutoff)`, retried on transient errors with jittered backoff until `deadline`
        (default: `timeout` from now); every attempt bounded by the cutoff (`overdue_reason`:
        see `_bounded`)."""
        started = self._clock()
        if deadline is None:
            deadline = started + self.config.timeout
        cutoff = self._cutoff(deadline)
        attempt = 0
        while True:
            self.counters.add("http_requests")
            try:
                answer = self._bounded(call, cutoff, overdue_reason)
                self._outage.answered()
                return answer
            except (VidCacheError, *_RETRIED) as exc:
                transient = isinstance(exc, _RETRIED) or (
                    isinstance(exc, VidCacheError) and exc.transient
                )
                if not transient and isinstance(exc, StatusError) and exc.status_code:
                    # An answer not retried ends an outage, whatever it says (a token changed
                    # meanwhile: 401); not a 5xx, retried: a proxy's for a service that is
                    # down, or the service failing.
                    self._outage.answered()
                if isinstance(exc, NotFoundError):
                    raise NotFound(f"{what}: no such video on the service") from exc
                if isinstance(exc, AuthError):
                    self.counters.add("errors")
                    raise self._access_denied(what, exc) from exc
                if not transient:
                    self.counters.add("errors")
                    raise RemoteError(f"{what}: {_reason(exc)}") from exc
                if self._stopped.done():  # the attempt was cut by close()
                    raise Stopping(f"{what}: {_STOPPING}") from exc
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self.counters.add("errors")
                    self._outage.gave_up(f"{what}: {_reason(exc)}", started)
                    raise RemoteUnavailable(
                        f"{what}: gave up after {attempt + 1} attempt(s) in "
                        f"{self._clock() - started:.1f} s; last error: {_reason(exc)}"
                    ) from exc
                delay = min(self._backoff(attempt), remaining)
                # One warning per failing operation, none while the service is known to be
                # failing (`Outage` said so); further retries only at debug level.
                first = attempt == 0 and not self._outage.down
                level = logging.WARNING if first else logging.DEBUG
                log.log(level, "%s: %s; retry %d in %.2f s", what, _reason(exc), attempt + 1,
                        delay)
                self.counters.add("retries")
                self._sleep(delay)
                attempt += 1

    def _bounded(self, call: Callable[[float], T], cutoff: float,
                 overdue_reason: Callable[[], str | None] | None = None) -> T:
        """`call(cutoff)` on a worker thread, waited for until `cutoff` at most; then it is
        left to finish (or notice the cutoff) on its own and `Overdue` is raised, with
        `overdue_reason()` if that gives one (what the attempt itself is waiting for until the
        cutoff: the same words whichever notices it first). `close()` ends the wait at once
        (`Stopping`), whatever the attempt is blocked in."""
        future = self._submit(call, cutoff)
        waited: list[concurrent.futures.Future[Any]] = [future, self._stopped]
        done, _ = concurrent.futures.wait(waited, timeout=max(cutoff - self._clock(), 0.0),
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        if future not in done and self._stopped in done:
            future.cancel()
            raise Stopping(_STOPPING)
        if not done:
            future.cancel()
            self.counters.add("overdue")
            raise Overdue(
                (overdue_reason and overdue_reason()) or "no complete answer by the deadline "
                f"(+ {self.config.per_request_timeout:.1f} s for the last attempt)"
            )
        try:
            return future.result()
        except BaseException as exc:
            _clear_frames(exc)
            raise

    def _submit(self, call: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """`call(*args)` on a worker thread; `Stopping` once `close()` has begun."""
        if self._stopped.done():
            raise Stopping(_STOPPING)
        try:
            return submit(self._workers, "a request to the service", call, *args)
        except RuntimeError as exc:  # shut down by close() just now
            raise Stopping(_STOPPING) from exc

    def _access_denied(self, what: str, exc: AuthError) -> AccessDenied:
        if not exc.json_detail:  # not vidcache's refusal (JSON): a proxy's page, not shown
            advice = (
                "a proxy in front of the service refused the user:password@ of the URL"
                if self._credentials_sent
                else "a proxy in front of the service refused access: if it asks for HTTP "
                "Basic auth, give user:password@ in the URL"
            )
            return AccessDenied(f"{what}: HTTP {exc.status_code}: {advice}")
        advice = (
            "the service refused vcfs's token: check that --token-file holds the token of "
            "the service's --token-file"
            if self._token_sent
            else "the service requires a token: mount with --token-file FILE"
        )
        return AccessDenied(f"{what}: HTTP {exc.status_code}: {exc.detail}; {advice}")

    def _pause(self, seconds: float) -> None:
        """The pause between attempts, ended by `close()`: a time.sleep there kept a stopping
        daemon up to `backoff_max` waiting for the reads retrying a service that is down."""
        concurrent.futures.wait([self._stopped], timeout=seconds)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so concurrent
        readers that failed together do not retry in lockstep."""
        base = min(self.config.backoff_max, self.config.backoff_initial * (1 << min(attempt, 32)))
        return base / 2 + random.uniform(0, base / 2)


class _BlockSink:
    """The blocks of one `fetch_blocks` call, collected in order and reported as they come.
    Closed when the call ends: an attempt still running then (given up at the cutoff) can
    report nothing more, so no block is reported after the call has returned or raised."""

    def __init__(self, on_block: Callable[[int, bytes], None] | None,
                 on_partial: Callable[[int, bytes, int], None] | None = None) -> None:
        self.blocks: list[bytes] = []
        self._on_block = on_block
        self._on_partial = on_partial
        self._open = True
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.blocks)

    def add(self, block: bytes) -> None:
        with self._lock:
            if not self._open:
                raise Overdue("the fetch this attempt belongs to has ended")
            self.blocks.append(block)
            if self._on_block is not None:
                self._on_block(len(self.blocks) - 1, block)

    def partial(self, position: int, block: bytes, ready: int) -> None:
        """The first `ready` bytes of the block at `position`, still arriving, are verified."""
        with self._lock:
            if self._open and self._on_partial is not None and position == len(self.blocks):
                self._on_partial(position, block, ready)

    def close(self) -> None:
        with self._lock:
            self._open = False
