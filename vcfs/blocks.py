"""Block arithmetic and the byte-budget LRU block cache behind every vcfs `read()`.

A file is cut into fixed-size blocks (default 1 MiB); block `i` is the byte range
`[i * block_size, min((i + 1) * block_size, file_size))`. Content is addressed by hash, so a
block never changes and may be cached for as long as the budget allows. The arithmetic is a
handful of pure functions (`clamp_range`, `blocks_for`, `run_bounds`, `adjacent_runs`, ...)
that the cache and the readahead share.

`BlockCache` keeps blocks in a cachetools `LRUCache` keyed by `(hash, block_index)` whose size
is counted in bytes (a block's length, a part's own length), so `capacity` is a real memory
budget. cachetools is not thread-safe; one lock guards both the LRU and the table of in-flight
fetches, and is never held while fetching, verifying or copying data.

Reading, for the blocks a read touches:

1. Under the lock, each block is either cached (a hit), already being fetched by another
   thread (we will wait for it), or missing: then we register a new in-flight entry for it
   and *own* its fetch. So each block has at most one fetch in flight and concurrent readers
   of a cold block cause exactly one request.
2. The owned blocks are grouped into runs of adjacent indices and each run is fetched with ONE
   fetcher (or block fetcher) call (a cold 1 MiB read straddling two blocks is one range
   request, not two). With a block fetcher, a reader that needs only the start of the last
   block it fetches runs its fetch on a background thread and waits for its part like any
   other reader (see below), so it can return before the fetch is over (on its own thread if
   no thread can be started, under a limit on threads: vcfs.threads).
3. The owner checks the answer is exactly the run's length (`BlockFetchError` otherwise), cuts
   it into blocks, and then, in a single critical section, inserts the good blocks into the LRU
   and removes the in-flight entries, so no reader can see a block as neither cached nor in
   flight. Only then are the futures resolved.
   A run fetched through the `block_fetcher` goes through the same steps block by block, as
   the fetcher reports each block (`on_block`): a reader waiting for the first block of a
   16 MiB readahead run gets it when it has arrived, not when the whole run has. Finer
   still, the fetcher may report a block's verified start while the block is arriving
   (`on_partial`, chunk by chunk: vcfs.remote verifies each digest chunk as soon as it is
   in): a reader needing only the first bytes of a block in flight is answered from them,
   so a player's first read of a cold 1 MiB block returns after its first 256 KiB chunk
   (10 ms at 200 Mbit/s), not after the whole block (42 ms). Those bytes are final: the
   fetcher writes past them only. The fetch of a read's first block may also leave out the
   block's start that the read does not need (`skip`): the block's *tail* is then cached
   (a `_Part`); reads within it are served from it, and a read needing the start fetches
   only what lies before the tail (the block fetcher's `until`), joined with the tail into
   the whole block, which takes the tail's place. A *scattered* read (its reader's second jump
   in a row: neither it nor the read before it continued an earlier one, as a media
   scanner's or a random-access benchmark's small reads) may likewise leave out the end of
   its last block (`until`): the fetcher stops at the digest chunk holding the read's end,
   so a scattered 128 KiB read brings one or two chunks instead of up to a whole block. A
   read that then continues it takes what the part holds and fetches the rest of the block
   from where the part ends, joined with the part (the whole block, if the part began it).
4. On any failure the futures get the exception (every waiter sees the error) and the
   in-flight entries are gone, so a later read retries from scratch. A prefetch whose
   `stop` was set (its reader went elsewhere) ends with `FetchStopped`, which is no error:
   a reader that was waiting for one of its blocks fetches that block itself. Nothing
   unverified, and nothing of the wrong length, is ever cached or returned. A read's runs
   (split by cached blocks) are fetched at once with a block fetcher, each on its own thread,
   so the read waits out one remote deadline, not one per run. Otherwise, and in a prefetch,
   they go in turn, and after the first failed run the rest fail fast with the same error.

Waiting is `Future.result()`, never polling: a reader of a block in flight registers a future
for the part of the block it needs, resolved by the partial report that covers it, or with the
block (or its error) when the fetch is over. Liveness relies on the fetcher ending every call
with data or an exception within its own deadline (vcfs.remote retries under a total deadline).

Copies and memory: `pieces` answers a read with the blocks (or parts) that hold its bytes and
the bounds of what it takes from each, copying nothing; `read` joins them: a read inside one
cached block is a single slice of it (no copy at all when it is the whole block), a read across
blocks one `b"".join` of memoryview slices, the only copy. vcfs's FUSE reads copy the pieces
straight into the buffer libfuse sends (`vcfs.fuselib.reply_buffer`). Given a
`block_fetcher` (vcfs always gives one), every run is fetched through it, and it hands over
each block as its own `bytes` (vcfs.remote receives each one in place, see `unfilled_block`,
and verifies it); without one, the single answer is copied into one `bytes` per block: cached
blocks must not be views of the run's buffer, because one live view pins the whole buffer and
the byte budget would lie.
Uniform block-sized `bytes` suit glibc malloc: evicted blocks free exactly the size the next
block needs, so the heap is reused instead of fragmenting (multi-MiB temporaries cut into 1 MiB
blocks left ~35 MB of holes behind). A block larger than the whole capacity (or any block when
capacity is 0) is returned but not cached. Blocks being fetched count against the budget from
the moment a thread owns their fetch (least recent blocks are evicted to make room), and a
prefetch takes only the blocks that fit beside those in flight, so cached plus in-flight bytes
stay within `capacity` however deep readahead's pipeline is and however many streams it serves
(only reads, which must be answered, can go beyond it).

Passed blocks (readahead's drop-behind, `discard`): blocks a sequential stream has read past
leave the LRU for a *passed* tier, oldest first, of at most `passed_capacity` bytes (a quarter
of the budget by default). Passed blocks are evicted before any other block when room is
needed, and the oldest are freed once the tier is full. So a long scan neither flushes other
files' blocks out of the LRU nor holds more than the tier of its past, and its freed memory is
reused for the blocks ahead (no fresh pages to fault in); yet a reader seeking back a little
(or the kernel re-reading pages it reclaimed) still finds the recent past in memory. A passed
block that is read again goes back to the LRU.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import Cache, LRUCache

from vcfs.limits import FUSE_THREADS
from vcfs.threads import NoThread, submit

Fetcher = Callable[[str, int, int], bytes]
"""`(hash, start, end_exclusive) -> bytes`: exactly the bytes `[start, end)` of the video."""

OnBlock = Callable[[int, bytes], None]
"""`(position, piece)`: piece number `position` of a block fetcher's run has arrived."""

OnPartial = Callable[[int, bytes, int], None]
"""`(position, piece, ready)`: the first `ready` bytes of piece `position`, a `bytes` object
still being filled, have arrived and are verified: they will not change."""

OnSpan = Callable[[int, int], None]
"""`(start, end_exclusive)`: the bytes of the video a block fetcher's run will bring."""


class BlockFetcher(Protocol):
    """`(hash, start, end_exclusive, block_size, *, on_block, on_partial) -> pieces`: the same
    bytes as a `Fetcher`, as consecutive pieces of `block_size` bytes (the last one may be
    short). It calls `on_block(position, piece)` for each piece as soon as that piece is ready,
    in order and before returning, so the cache can hand a block to its readers before the run
    is over; and it may call `on_partial` while a piece arrives, so that a reader of the
    piece's first bytes need not wait for its last. It may leave out up to `skip` bytes at
    the start of the first piece, which then is the *tail* of its block (shorter by that
    much): no reader of this run needs them. Given `until` (a scattered read's end in the
    run's last block, or where that block's cached tail begins), it may also leave out the
    last piece's bytes from `until` on; then it calls `on_span(start, end)` with the bytes
    the run brings before reporting any piece, so the cache knows where a piece cut at both
    ends starts. Once `stop` is set it may end early by raising `FetchStopped` (the pieces
    reported so far are kept). `until`, `on_span` and `stop` are passed only when used:
    fetchers that never cut or stop need not know of them."""

    def __call__(
        self, content_hash: str, start: int, end: int, block_size: int, /, *,
        on_block: OnBlock, on_partial: OnPartial | None = None, skip: int = 0,
        until: int | None = None, on_span: OnSpan | None = None,
        stop: threading.Event | None = None,
    ) -> Sequence[bytes]: ...

MIB = 1 << 20
# libfuse3's largest read, so one full read is one block; whole chunks of the service's digests
# (256 KiB by default, 1 MiB for its oldest videos).
DEFAULT_BLOCK_SIZE = MIB
# Room for several videos' working sets (and 16 MiB readahead windows) on a desktop machine.
DEFAULT_CAPACITY = 256 * MIB


# CPython's C idiom for building a bytes object: allocate it with undefined content, then write
# it before anyone else sees it (see `unfilled_block`).
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object
# Where a `bytes` object's bytes are (they never move); TypeError for any other object. Also
# what vcfs.fuselib copies pieces of cached blocks from.
bytes_address = ctypes.pythonapi.PyBytes_AsString
bytes_address.argtypes = (ctypes.py_object,)
bytes_address.restype = ctypes.c_void_p


def unfilled_block(size: int) -> tuple[bytes, memoryview]:
    """A new `bytes` of `size` bytes whose content is undefined, and a writable view of its
    memory through which its producer fills it, e.g. with `socket.recv_into`.

    A block is then received straight into the object the cache keeps: no receive buffer to
    copy out of (and none to fragment the heap), and the first touch of new memory (page
    faults: ~0.7 ms per MiB on the 2-core benchmark VM) happens in the kernel's copy, without
    the GIL. This is what C code does with `PyBytes_FromStringAndSize(NULL, size)`; the same
    rule applies: the view must not be written once the bytes object has been handed to
    anyone, and a block whose filling failed is dropped, never used. The view keeps the block
    alive."""
    if size < 1:
        raise ValueError(f"a block has at least one byte, not {size}")
    block = _new_bytes(None, size)
    memory = (ctypes.c_char * size).from_address(bytes_address(block))
    memory.__dict__["owner"] = block  # the memory is `block`'s: keep it while the view lives
    return block, memoryview(memory).cast("B")


class BlockCacheError(Exception):
    """Root of the errors the block cache raises itself (fetcher errors pass through as is)."""


class BlockFetchError(BlockCacheError):
    """The fetcher returned a different number of bytes than the range asked for."""


class FetchStopped(BlockCacheError):
    """A prefetch was stopped (its `stop` event set) before these blocks arrived: not an
    error. A reader waiting for one of them fetches it itself."""


# ---------------------------------------------------------------------------------------------
# Block arithmetic


def clamp_range(offset: int, size: int, file_size: int) -> tuple[int, int]:
    """`[offset, offset + size)` clamped to the file: `(start, end_exclusive)`, maybe empty."""
    if offset < 0 or size < 0 or file_size < 0:
        raise ValueError(f"negative offset/size/file_size: {offset}, {size}, {file_size}")
    return min(offset, file_size), min(offset + size, file_size)


def block_count(file_size: int, block_size: int) -> int:
    """How many blocks a file of `file_size` bytes has (the last one may be short)."""
    return -(-file_size // block_size)


def blocks_for(offset: int, size: int, file_size: int, block_size: int) -> range:
    """Indices of the blocks holding `[offset, offset + size)` after clamping at EOF.

    Empty for a zero-size read or one starting at or past EOF.
    """
    start, end = clamp_range(offset, size, file_size)
    if start >= end:
        return range(0)
    return range(start // block_size, (end - 1) // block_size + 1)


def run_bounds(blocks: range, file_size: int, block_size: int) -> tuple[int, int]:
    """Byte range `(start, end_exclusive)` of a run of adjacent blocks, the last clamped at EOF."""
    if blocks.step != 1 or not blocks or blocks.start < 0:
        raise ValueError(f"not a non-empty run of adjacent blocks: {blocks!r}")
    start = blocks.start * block_size
    end = min(blocks.stop * block_size, file_size)
    if start >= end:
        raise ValueError(f"blocks {blocks!r} lie past the end of a {file_size}-byte file")
    return start, end


def block_bounds(index: int, file_size: int, block_size: int) -> tuple[int, int]:
    """Byte range `(start, end_exclusive)` of one block."""
    return run_bounds(range(index, index + 1), file_size, block_size)


def adjacent_runs(indices: Iterable[int]) -> list[range]:
    """Group ascending block indices into runs of adjacent ones: 1,2,3,5 -> [1..3], [5]."""
    runs: list[range] = []
    for index in indices:
        if runs and index == runs[-1].stop:
            runs[-1] = range(runs[-1].start, index + 1)
        elif runs and index < runs[-1].stop:
            raise ValueError("block indices must be strictly ascending")
        else:
            runs.append(range(index, index + 1))
    return runs


# ---------------------------------------------------------------------------------------------
# The cache

_Key = tuple[str, int]
# Readers' own fetches run in the background (see `_get_pieces`); each one waits on the network.
# One per FUSE thread (vcfs.limits): a fetch queued here behind reads stalled on the service
# would wait out their deadlines.
_BACKGROUND_FETCHES = FUSE_THREADS


@dataclass(frozen=True, slots=True)
class _Part:
    """Bytes `[lo, lo + len(piece))` of a block: fetched for a reader that needed neither the
    block's start (the block fetcher's `skip`: a *tail*) nor, for a scattered read, its end
    (`until`). A later read that needs more fetches what it lacks, which takes the part's
    place (see `BlockCache._get_pieces`)."""

    piece: bytes
    lo: int

    @property
    def hi(self) -> int:
        return self.lo + len(self.piece)


_Entry = bytes | _Part  # a cached block: whole, or a part of it
_Outcome = _Entry | BaseException
_Got = tuple[bytes, int]  # a `bytes` holding part of a block, and where in the block it starts
Piece = tuple[bytes, int, int]
"""A `bytes` holding bytes of a block, and the bounds `[start, stop)` of those a read takes."""


def _entry_size(entry: _Entry) -> int:
    return len(entry) if isinstance(entry, bytes) else len(entry.piece)


def _joined(entry: _Entry, cached: _Part | None, length: int) -> _Entry:
    """A fetched part joined with the part of its block of `length` bytes that was cached,
    where the two meet or overlap (a tail it was fetched up to, a part it continues): the
    whole block, or a longer part. Both are verified; anything else is returned as it is."""
    if (cached is None or isinstance(entry, bytes)
            or max(entry.lo, cached.lo) > min(entry.hi, cached.hi)):
        return entry
    first, second = sorted((entry, cached), key=lambda part: part.lo)
    piece = b"".join((first.piece, memoryview(second.piece)[first.hi - second.lo :]))
    return piece if first.lo == 0 and len(piece) == length else _Part(piece, first.lo)


def _holding(entry: _Entry, low: int, high: int) -> _Got | None:
    """The entry's bytes and their offset in the block, if they hold its bytes `[low, high)`."""
    if isinstance(entry, bytes):
        return entry, 0
    return (entry.piece, entry.lo) if entry.lo <= low and high <= entry.hi else None


def join_pieces(pieces: Sequence[Piece]) -> bytes:
    """The bytes the pieces take, in one `bytes`: the only copy (none for one whole block)."""
    if len(pieces) == 1:
        block, low, high = pieces[0]
        return block[low:high]  # the block itself when it is all of it
    return b"".join(memoryview(block)[low:high] for block, low, high in pieces)


class _Pending:
    """A block being fetched: its outcome once the fetch is over and, while it arrives, the
    part of it that is in and verified, which readers needing only that part take already."""

    __slots__ = ("cached", "lo", "outcome", "piece", "ready", "skip", "until", "waiters")

    def __init__(self, skip: int = 0, until: int | None = None,
                 cached: _Part | None = None) -> None:
        self.skip = skip  # bytes at the block's start its fetch may leave out (a tail)
        self.until = until  # where in the block its fetch may stop; None: at the block's end
        # the block's cached part, joined with what the fetch brings where they meet
        self.cached = cached
        self.outcome: _Outcome | None = None  # set, under the lock, when the fetch is over
        self.piece = b""  # the block (or a part) being filled, once the fetcher reported it
        self.lo = 0  # where in the block `piece` starts
        self.ready = 0  # how many of `piece`'s first bytes are in and verified
        # (the part [low, high) of the block a reader needs, its future: resolved with a
        # `bytes` holding that part, or None when the fetch ended with a part that does not)
        self.waiters: list[tuple[int, int, Future[_Got | None]]] = []

    @classmethod
    def beside(cls, cached: _Entry | None, length: int, low: int = 0, skip: int = 0,
               until: int | None = None) -> _Pending:
        """The fetch of a block of `length` bytes that must bring its bytes from `low` on,
        `cached` being what the cache holds of it: a tail beginning after `low` (a part
        ending at the block's end) is not fetched again (`until` where it begins, honoured
        if the block ends its run); a part the fetch meets (that tail, or a part a read
        continues from its end) is joined with what the fetch brings (`_joined`)."""
        if not isinstance(cached, _Part):
            return cls(skip, until)
        if low < cached.lo and cached.hi == length:
            until = cached.lo if until is None else min(until, cached.lo)
        return cls(skip, until, cached)

    def holds(self, low: int, high: int) -> bool:
        """Whether the part arrived so far holds bytes `[low, high)` of the block."""
        return self.lo <= low and high - self.lo <= self.ready


class _CountingLRU(LRUCache[_Key, _Entry]):
    """A byte-budget LRU that counts evictions (cachetools evicts through `popitem`)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(maxsize=capacity, getsizeof=_entry_size)
        self.evictions = 0

    def peek(self, key: _Key) -> _Entry | None:
        """The entry, left where it is in the LRU order."""
        return Cache.__getitem__(self, key) if key in self else None

    def popitem(self) -> tuple[_Key, _Entry]:
        item = super().popitem()
        self.evictions += 1
        return item


class BlockCache:
    """Thread-safe LRU of file blocks in front of a byte-range fetcher (see module docstring)."""

    def __init__(
        self,
        fetcher: Fetcher,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        capacity: int = DEFAULT_CAPACITY,
        block_fetcher: BlockFetcher | None = None,
        passed_capacity: int | None = None,
    ) -> None:
        """`block_fetcher`, if given, fetches runs of several blocks instead of `fetcher`:
        the blocks then arrive as separate objects and are cached as they are, instead of
        being cut (copied) out of one answer for the whole run. `passed_capacity`: bytes of
        passed blocks kept (default a quarter of `capacity`: a seek back over the last tens of
        seconds of an HD stream, while most of a long scan's memory is recycled)."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self._fetcher = fetcher
        self._block_fetcher = block_fetcher
        self._block_size = block_size
        self._capacity = capacity
        self._lock = threading.Lock()
        self._lru = _CountingLRU(capacity)
        self._passed: OrderedDict[_Key, _Entry] = OrderedDict()  # oldest passed first
        self._passed_bytes = 0
        self._passed_capacity = capacity // 4 if passed_capacity is None else passed_capacity
        if self._passed_capacity < 0:
            raise ValueError(f"passed_capacity must be >= 0, got {passed_capacity}")
        self._inflight: dict[_Key, _Pending] = {}
        # Where a reader's own fetch runs when blocks can be handed over part by part.
        self._background = None if block_fetcher is None else ThreadPoolExecutor(
            max_workers=_BACKGROUND_FETCHES, thread_name_prefix="vcfs-fetch")
        # Bytes of the in-flight blocks that will be cached: they count against the budget.
        self._reserved = 0
        # Counters, guarded by _lock.
        self._hits = 0
        self._misses = 0
        self._inflight_waits = 0
        self._fetches = 0
        self._fetch_errors = 0
        self._bytes_fetched = 0
        self._prefetched_blocks = 0
        self._passed_blocks = 0
        self._dropped_blocks = 0

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def capacity(self) -> int:
        return self._capacity

    def read(self, content_hash: str, file_size: int, offset: int, size: int, *,
             scattered: bool = False) -> bytes:
        """Bytes `[offset, offset + size)` of the video, clamped at EOF (b"" past it): its
        `pieces`, joined.

        `scattered`: neither the read nor the one before it continued an earlier read of the
        file, so the next one likely will not either, and a fetch of its last block may stop
        at the chunk holding the read's end instead of bringing the rest of the block (with a
        block fetcher that can cut blocks). A player's seek is read on from: not scattered.

        Raises whatever the fetcher raised, or `BlockFetchError` for a wrong-length answer.
        """
        return join_pieces(self.pieces(content_hash, file_size, offset, size,
                                       scattered=scattered))

    def pieces(self, content_hash: str, file_size: int, offset: int, size: int, *,
               scattered: bool = False) -> list[Piece]:
        """What `read` returns, as the pieces of blocks that make it up, in order, none of them
        copied: for each block the read touches, a `bytes` holding verified bytes of it (the
        block, a part of it, or a block still arriving, whose bytes the piece takes are in
        and final) and the bounds of the bytes the read takes from it; no piece past EOF.
        Raises what `read` raises. A caller copying them elsewhere (vcfs.fuselib's reply
        buffer) holds the `bytes` objects, so their memory stays while it copies, whatever the
        cache evicts meanwhile."""
        start, end = clamp_range(offset, size, file_size)
        if start >= end:
            return []
        block_size = self._block_size
        first, last = start // block_size, (end - 1) // block_size
        if first == last:  # the hot path: one block, usually cached
            with self._lock:
                entry = self._cached((content_hash, first))
                base = first * block_size
                got = None if entry is None else _holding(entry, start - base, end - base)
                if got is not None:
                    self._hits += 1
            if got is not None:
                piece, lo = got
                return [(piece, start - base - lo, end - base - lo)]
        return self._get_pieces(content_hash, file_size, start, end, scattered=scattered)

    def prefetch(
        self, content_hash: str, file_size: int, first_block: int, last_block: int, *,
        stop: threading.Event | None = None,
    ) -> None:
        """Fetch the blocks `first_block..last_block` (inclusive) that are neither cached nor
        in flight, clamped to the file; adjacent ones in one fetcher call each. A block held
        as a part is fetched as a read would: what lies before a tail, joined with it;
        the whole block, replacing any other part.

        Meant for readahead threads: it never waits for other threads' fetches, and leaves
        out the blocks beyond the room the blocks in flight leave in the budget. Raises the
        first fetch error (after failing the affected blocks' futures like `read` does).
        Setting `stop` ends the fetch early (through a block fetcher, which watches it): the
        blocks arrived by then are cached, readers of the others fetch them themselves, and
        `FetchStopped` is raised.
        """
        first = max(first_block, 0)
        last = min(last_block, block_count(file_size, self._block_size) - 1)
        owned: dict[int, _Pending] = {}
        with self._lock:
            # Only what fits beside the blocks in flight (other streams' prefetches too): a
            # read takes what this leaves out itself.
            room = self._capacity - self._reserved
            for index in range(first, last + 1):
                key = (content_hash, index)
                # A part is not the block: the stream reaching it would wait for its fetch.
                entry = self._passed.get(key, self._lru.peek(key))
                if isinstance(entry, bytes) or key in self._inflight:
                    continue
                room -= self._cacheable_size(file_size, index)
                if room < 0:
                    break
                low, high = block_bounds(index, file_size, self._block_size)
                owned[index] = self._inflight[key] = _Pending.beside(entry, high - low)
            self._prefetched_blocks += len(owned)
            self._reserve(file_size, owned)
        error = self._fetch_owned(content_hash, file_size, owned, stop)
        if error is not None:
            raise error

    def discard(self, content_hash: str, first_block: int, last_block: int) -> int:
        """Move the cached blocks `first_block..last_block` (inclusive) of the video from the
        LRU to the passed tier (readahead's drop-behind: a stream has read past them), freeing
        the oldest passed blocks beyond `passed_capacity`. Blocks in flight are left to their
        fetch. Returns how many blocks were moved."""
        moved = 0
        with self._lock:
            for index in range(max(first_block, 0), last_block + 1):
                key = (content_hash, index)
                entry = self._lru.pop(key, None)
                if entry is not None:
                    self._passed[key] = entry
                    self._passed_bytes += _entry_size(entry)
                    moved += 1
            self._passed_blocks += moved
            while self._passed and self._passed_bytes > self._passed_capacity:
                self._drop_oldest_passed()
        return moved

    def is_cached(self, content_hash: str, block_index: int) -> bool:
        """Whether the whole block is in the cache now (a part of it is not: a read of the
        rest still fetches); does not touch its LRU position."""
        with self._lock:
            key = (content_hash, block_index)
            entry = self._lru.peek(key) if key in self._lru else self._passed.get(key)
            return isinstance(entry, bytes)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters. hits/misses count blocks asked for by `read` (a miss
        that waited on another thread's fetch also counts in inflight_waits); fetches counts
        fetcher calls, bytes_fetched the bytes they returned; prefetched_blocks the blocks
        `prefetch` fetched; passed_blocks those `discard` moved to the passed tier,
        dropped_blocks the passed blocks freed since (not counted as evictions); cached_* count
        both tiers, passed_bytes the passed tier alone; fetching_blocks is a gauge, the blocks
        whose fetch is under way now (retries included: a block stays in it until resolved)."""
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "inflight_waits": self._inflight_waits,
                "fetches": self._fetches,
                "fetch_errors": self._fetch_errors,
                "fetching_blocks": len(self._inflight),
                "bytes_fetched": self._bytes_fetched,
                "prefetched_blocks": self._prefetched_blocks,
                "evictions": self._lru.evictions,
                "passed_blocks": self._passed_blocks,
                "dropped_blocks": self._dropped_blocks,
                "cached_blocks": len(self._lru) + len(self._passed),
                "cached_bytes": int(self._lru.currsize) + self._passed_bytes,
                "passed_bytes": self._passed_bytes,
            }

    # -- internals ------------------------------------------------------------------------------

    def _get_pieces(
        self, content_hash: str, file_size: int, start: int, end: int, *, whole: bool = False,
        scattered: bool = False,
    ) -> list[Piece]:
        """For each block of `[start, end)`: a `bytes` holding the part of it the read needs,
        and that part's bounds in it. A block in flight, whether another thread's fetch or one
        this call starts, is waited for only until the part needed has arrived: with a block
        fetcher, this call's own fetch runs in the background, so the read can return while
        the rest of its block is still on the way. Unless `whole`, the fetch of the read's
        first block may leave out the block's start the read does not need (a tail), and, for
        a `scattered` read, the fetch of its last block the end the read does not need (see
        `_Part`). A first block whose cached part holds the start of what the read needs but
        not the rest (a read continuing a scattered one) gives two pieces: that part's, and
        the rest, fetched from where the part ends. A block whose cached tail holds the end
        of what the read needs but not its start is fetched only up to the tail (`until`),
        and the two are joined."""
        block_size = self._block_size
        blocks = range(start // block_size, (end - 1) // block_size + 1)
        found: dict[int, _Got] = {}
        head: _Part | None = None  # the first block's cached part the read begins in
        pending: dict[int, _Pending] = {}
        owned: dict[int, _Pending] = {}
        with self._lock:
            for index in blocks:
                key = (content_hash, index)
                base = index * block_size
                low, high = max(start - base, 0), min(end - base, block_size)
                entry = self._cached(key)
                got = None if entry is None else _holding(entry, low, high)
                if got is not None:
                    self._hits += 1
                    found[index] = got
                    continue
                self._misses += 1
                first = index == blocks.start and not whole
                if first and isinstance(entry, _Part) and entry.lo <= low < entry.hi:
                    head, low = entry, entry.hi
                fetching = self._inflight.get(key)
                if fetching is None:
                    cut = scattered and not whole and index == blocks[-1]
                    until = high if cut and high < min(block_size, file_size - base) else None
                    fetching = self._inflight[key] = _Pending.beside(
                        entry, min(block_size, file_size - base), low, low if first else 0,
                        until)
                    owned[index] = fetching
                else:
                    self._inflight_waits += 1
                pending[index] = fetching
            self._reserve(file_size, owned)
        background = self._background
        if owned and background is None:
            self._fetch_owned(content_hash, file_size, owned)
        elif owned and background is not None:
            *earlier, final = ({index: owned[index] for index in run}
                               for run in adjacent_runs(sorted(owned)))
            # Runs split by cached blocks all start now, each under its own deadline: one
            # after the other, a read could wait out one deadline per run.
            for run_owned in earlier:
                self._fetch_in_background(background, content_hash, file_size, run_owned)
            last = max(final)
            # In the background only if the read can return before its fetch is over: when it
            # needs only the start of what the fetch of its last block brings (a thread hop
            # otherwise).
            until = final[last].until
            brings = (block_bounds(last, file_size, block_size)[1] if until is None
                      else last * block_size + until)
            if end >= brings:
                self._fetch_owned(content_hash, file_size, final)
            else:
                self._fetch_in_background(background, content_hash, file_size, final)
        pieces = []
        for index in blocks:
            base = index * block_size
            low, high = max(start - base, 0), min(end - base, block_size)
            got = found.get(index)
            if got is None and head is not None and index == blocks.start:
                pieces.append((head.piece, low - head.lo, len(head.piece)))
                low = head.hi
            if got is None:
                try:
                    got = self._await(pending[index], low, high)  # raises the fetch's error
                except FetchStopped:  # a prefetch gave it up: fetch it (or wait for another)
                    pieces += self._get_pieces(content_hash, file_size, base + low, base + high)
                    continue
            if got is None:  # it brought a part that does not hold `[low, high)`: the whole block
                pieces += self._get_pieces(content_hash, file_size, base + low, base + high,
                                           whole=True)
                continue
            piece, lo = got
            pieces.append((piece, low - lo, high - lo))
        return pieces

    def _fetch_in_background(self, background: ThreadPoolExecutor, content_hash: str,
                             file_size: int, owned: dict[int, _Pending]) -> None:
        """`_fetch_owned` on a background thread, or on this one if none could be started (a
        limit on threads: vcfs.threads): the blocks are this call's to fetch, and their
        readers, this one's and others', wait for them."""
        try:
            submit(background, "a block fetch", self._fetch_owned, content_hash, file_size,
                   owned)
        except NoThread:
            self._fetch_owned(content_hash, file_size, owned)

    def _await(self, entry: _Pending, low: int, high: int) -> _Got | None:
        """A `bytes` holding bytes `[low, high)` of a block in flight, and where in the block
        it starts: the block being filled once they are in and verified, or the fetched
        block; None if the fetch brought a part that does not hold them."""
        with self._lock:
            outcome = entry.outcome
            if outcome is None:
                if entry.holds(low, high):
                    return entry.piece, entry.lo
                waiter: Future[_Got | None] = Future()
                entry.waiters.append((low, high, waiter))
        if outcome is None:
            return waiter.result()
        if isinstance(outcome, BaseException):
            raise outcome
        return _holding(outcome, low, high)

    def _fetch_owned(
        self, content_hash: str, file_size: int, owned: dict[int, _Pending],
        stop: threading.Event | None = None,
    ) -> BaseException | None:
        """Fetch the owned blocks run by run and resolve every one of their futures, whatever
        happens. Returns the first error (also set on the affected futures), else None."""
        first_error: BaseException | None = None
        for run in adjacent_runs(sorted(owned)):
            if first_error is None:
                first_error = self._fetch_run(content_hash, file_size, run, owned, stop)
            else:
                self._resolve(content_hash, file_size, {index: first_error for index in run}, owned)
        return first_error

    def _fetch_run(
        self, content_hash: str, file_size: int, run: range, owned: dict[int, _Pending],
        stop: threading.Event | None,
    ) -> BaseException | None:
        """Fetch one run with one fetcher call; resolve its futures. Returns its first error."""
        with self._lock:
            self._fetches += 1
        if self._block_fetcher is not None:
            return self._fetch_run_by_blocks(self._block_fetcher, content_hash, file_size, run,
                                             owned, stop)
        start, end = run_bounds(run, file_size, self._block_size)
        try:
            blocks = self._fetch_cut(content_hash, run, start, end)
        except BaseException as exc:  # every waiter must hear of it, whatever it is
            with self._lock:
                self._fetch_errors += 1
            self._resolve(content_hash, file_size, {index: exc for index in run}, owned)
            return exc
        with self._lock:
            self._bytes_fetched += end - start
        self._resolve(content_hash, file_size, dict(zip(run, blocks, strict=True)), owned)
        return None

    def _fetch_run_by_blocks(
        self,
        block_fetcher: BlockFetcher,
        content_hash: str,
        file_size: int,
        run: range,
        owned: dict[int, _Pending],
        stop: threading.Event | None,
    ) -> BaseException | None:
        """Fetch a run through the block fetcher, resolving each block's future as soon as the
        fetcher reports that block (readers of the run's first block need not wait for its
        last). Every block of the run is resolved once, whatever the fetcher does: a block it
        never reports gets its error. Returns the run's first error."""
        start, end = run_bounds(run, file_size, self._block_size)
        skip = owned[run.start].skip
        until = owned[run[-1]].until
        span: list[int] = []  # what the fetcher said it brings, if it cuts the last block
        unresolved = set(run)  # guarded by self._lock
        errors: list[BaseException] = []

        def placed(position: int, piece: bytes) -> int | None:
            """Where in its block the piece starts; None if it leaves out bytes it may not."""
            low, high = block_bounds(run.start + position, file_size, self._block_size)
            first, last = position == 0, position == len(run) - 1
            if first and last and until is not None and len(piece) < high - low:
                if not span:  # a tail or a head of the same length: it must say which
                    return None
                lo, hi = span[0] - low, span[1] - low
            elif last and not first:
                lo, hi = 0, len(piece)
            else:
                lo, hi = high - low - len(piece), high - low
            if hi - lo != len(piece) or not 0 <= lo <= (skip if first else 0):
                return None
            if hi > high - low or (hi < high - low and (not last or until is None or hi < until)):
                return None
            return lo

        def spanned(low: int, high: int) -> None:
            span[:] = [low, high]

        def arrived(position: int, block: bytes) -> None:
            index = run.start + position
            if index not in unresolved:  # reported twice, or past the run
                if index not in run:
                    errors.append(BlockFetchError(
                        f"fetch of {content_hash} bytes {start}-{end - 1} reported piece "
                        f"{position} of a run of {len(run)}"))
                return
            lo = placed(position, block)
            low, high = block_bounds(index, file_size, self._block_size)
            outcome: _Outcome
            if lo is None:
                outcome = BlockFetchError(
                    f"fetch of {content_hash} bytes {start}-{end - 1} returned piece {position} "
                    f"of {len(block)} bytes instead of {high - low}")
            elif len(block) < high - low:
                outcome = _Part(block if type(block) is bytes else bytes(block), lo)
            else:
                outcome = block if type(block) is bytes else bytes(block)
            if isinstance(outcome, BaseException):
                errors.append(outcome)
            else:
                with self._lock:
                    self._bytes_fetched += _entry_size(outcome)
                outcome = _joined(outcome, owned[index].cached, high - low)
            self._resolve(content_hash, file_size, {index: outcome}, owned, unresolved)

        def partial(position: int, piece: bytes, ready: int) -> None:
            entry = owned.get(run.start + position)
            if entry is None or type(piece) is not bytes or not 0 < ready <= len(piece):
                return  # only a `bytes` with a verified start can be handed out
            lo = placed(position, piece)
            if lo is None:
                return
            with self._lock:
                if entry.outcome is not None:
                    return
                entry.piece, entry.lo, entry.ready = piece, lo, ready
                due = [waiter for low, high, waiter in entry.waiters if entry.holds(low, high)]
                entry.waiters = [w for w in entry.waiters if not entry.holds(w[0], w[1])]
            for waiter in due:
                waiter.set_result((piece, lo))

        try:
            # `until` and `stop` only when there are: fetchers that never cut or stop need not
            # know of them.
            extra: dict[str, Any] = {} if stop is None else {"stop": stop}
            if until is not None:
                extra.update(until=until, on_span=spanned)
            blocks = block_fetcher(content_hash, start, end, self._block_size, on_block=arrived,
                                   on_partial=partial, skip=skip, **extra)
        except BaseException as exc:  # every waiter must hear of it, whatever it is
            if not isinstance(exc, FetchStopped):
                with self._lock:
                    self._fetch_errors += 1
            errors.append(exc)
        else:
            for position, block in enumerate(blocks):  # those it returned but did not report
                arrived(position, block)
            if len(blocks) != len(run):
                errors.append(BlockFetchError(
                    f"fetch of {content_hash} bytes {start}-{end - 1} returned {len(blocks)} "
                    f"pieces instead of {len(run)}"))
        if unresolved:
            self._resolve(content_hash, file_size, dict.fromkeys(run, errors[0]), owned,
                          unresolved)
        return errors[0] if errors else None

    def _fetch_cut(self, content_hash: str, run: range, start: int, end: int) -> list[bytes]:
        """The run's blocks, each its own immutable `bytes` (a mutable buffer must not become
        a shared cache entry), cut out of one fetcher answer."""
        data = self._fetcher(content_hash, start, end)
        if len(data) != end - start:
            raise BlockFetchError(f"fetch of {content_hash} bytes {start}-{end - 1} returned "
                                  f"{len(data)} bytes instead of {end - start}")
        if type(data) is not bytes:
            data = bytes(data)
        if len(run) == 1:
            return [data]
        view = memoryview(data)
        size = self._block_size
        return [bytes(view[low : low + size]) for low in range(0, end - start, size)]

    def _reserve(self, file_size: int, owned: dict[int, _Pending]) -> None:
        """Count the owned blocks' bytes against the budget before they arrive, evicting the
        least recent blocks to make room (lock held): cached plus in-flight bytes stay
        within `capacity`, so readahead's pipeline does not add its depth to the memory used
        (the LRU alone would only evict once the blocks were inserted)."""
        self._reserved += sum(self._cacheable_size(file_size, index) for index in owned)
        self._evict_to_budget()

    def _cacheable_size(self, file_size: int, index: int) -> int:
        """Bytes block `index` will take in the cache: 0 if it is too big to be cached."""
        start, end = block_bounds(index, file_size, self._block_size)
        return end - start if end - start <= self._capacity else 0

    def _cached(self, key: _Key) -> _Entry | None:
        """The cached block (or a part of it), from either tier (a passed block read again rejoins
        the LRU). Called with the lock held."""
        entry = self._lru.get(key)
        if entry is None and key in self._passed:
            entry = self._passed.pop(key)
            self._passed_bytes -= _entry_size(entry)
            self._lru[key] = entry
        return entry

    def _drop_oldest_passed(self) -> None:
        _, entry = self._passed.popitem(last=False)
        self._passed_bytes -= _entry_size(entry)
        self._dropped_blocks += 1

    def _evict_to_budget(self) -> None:
        """Make cached plus in-flight bytes fit the budget: passed blocks go first."""
        lru = self._lru
        while self._passed and lru.currsize + self._passed_bytes + self._reserved > self._capacity:
            self._drop_oldest_passed()
        while lru and lru.currsize + self._reserved > self._capacity:
            lru.popitem()

    def _resolve(
        self,
        content_hash: str,
        file_size: int,
        outcomes: dict[int, _Outcome],
        owned: dict[int, _Pending],
        unresolved: set[int] | None = None,
    ) -> None:
        """Cache the good blocks and retire the in-flight entries (and their reservations) in
        one critical section, then hand the outcomes to the waiting readers outside the lock.
        With `unresolved`, only the blocks still in it are resolved (and taken out of it)."""
        waiting: list[tuple[list[tuple[int, int, Future[_Got | None]]], _Outcome]] = []
        with self._lock:
            if unresolved is not None:
                outcomes = {i: o for i, o in outcomes.items() if i in unresolved}
                unresolved.difference_update(outcomes)
            for index, outcome in outcomes.items():
                key = (content_hash, index)
                self._reserved -= self._cacheable_size(file_size, index)
                if not isinstance(outcome, BaseException):
                    self._passed_bytes -= _entry_size(self._passed.pop(key, b""))  # a part's
                    if _entry_size(outcome) <= self._capacity:
                        self._lru[key] = outcome
                del self._inflight[key]
                entry = owned[index]
                entry.outcome = outcome
                waiting.append((entry.waiters, outcome))
                entry.waiters = []
            self._evict_to_budget()
        for waiters, outcome in waiting:
            for low, high, waiter in waiters:
                if isinstance(outcome, BaseException):
                    waiter.set_exception(outcome)
                else:
                    waiter.set_result(_holding(outcome, low, high))
