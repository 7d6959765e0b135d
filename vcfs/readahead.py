"""Per-open-file readahead: prefetch ahead of a reader only once it is clearly streaming.

Two parts:

`SequentialDetector` is a pure state machine fed the `(offset, size)` of every read of one open
file.

- Until a run is established it remembers a few candidate *stretches*: each read is merged
  with the stretches it overlaps or touches. A run is established when one stretch is at least
  `min_run_bytes` long and was built by at least `min_run_reads` reads that added bytes to it.
  So reads must continue one another; reads that jump around stay separate stretches. The
  probe pattern of players and ffprobe (read the header at 0, jump to the end for a moov atom,
  sample the middle) never establishes a run, while a scan whose reads the kernel delivers
  out of order (256K..384K before 128K..256K) still does once the gap is filled. The default
  `min_run_bytes` (8 MiB) is deliberately long: ffprobe's header reads, which the kernel's
  readahead ramp stretches to about 2 MiB, and the few MB ffmpeg decodes after a seek are
  short continuing stretches too, and prefetching behind them only multiplies their bytes
  (an ffmpeg seek on a 20 Mb/s file fetched 15 MB instead of 5); a real stream loses little,
  the kernel's own readahead keeps 1-2 MiB in flight until vcfs's takes over. Even a
  one-block window from 2 MiB on (past ffprobe's ramp, so probes stayed unchanged) made
  ffmpeg seeks over the benchmark's WAN link (20 ms RTT, 200 Mbit/s) slower, 0.52 s against
  0.47 s, and 1 MB bigger, and did not speed up 8 concurrent readers on loopback: once its
  ramp is done the kernel has two 1 MiB reads in flight, which keeps such a link busy, so a
  third request only shares the link with the block the reader is waiting for, and the CPU
  on loopback.
- Once established, the run has a high-water mark (the furthest byte read), and the kernel's
  out-of-order delivery is tolerated: a read up to `back_tolerance` behind or
  `forward_tolerance` ahead of the high-water mark keeps the run (multithreaded FUSE hands the
  kernel's async readahead requests over in any order).
- The window starts at `initial_window` (one block) and doubles for every `growth_step` bytes
  (one block) the run advances, up to `max_window`: a wrong guess costs one block, a long
  stream soon has a deep pipeline.
- A read outside the tolerances is a real seek: the run ends (`run` changes) and the reader
  has to establish a new one.
- A read that continues nothing (it touches no stretch, or it ends the run) right after
  another such read is *scattered*: its reader reads scattered pieces (a media scanner, a
  random-access benchmark), so vcfs fetches only the digest chunks it needs, not the rest of
  its block (vcfs.blocks). One such read alone is not: a player's seek, or `ffprobe` going to
  a `moov` box at the end, is a single jump after reads that went on from each other, and is
  itself read on from; cutting its block would cost a round trip when the next read comes.

`Readahead` wires a detector to a block cache for one open file handle. On every read it asks
the detector for the window `[high-water mark, + window)` and submits `cache.prefetch` tasks
to a shared executor for the blocks of that window it has not requested yet in this run (never
the same range twice; the block the last read ended in is left to that read). Tasks cover at
most `task_blocks` blocks, so the first blocks land before a whole 16 MiB window does, and at
most `max_outstanding` tasks per handle are queued or running, so another stream's tasks wait
behind no more than that many of this one's (by default 4, as many as the pool has threads:
vcfs.fs.FsConfig.readahead_threads). The window moves on by a block per 1 MiB read; while the
blocks already requested reach at least half the window ahead of the reader, new blocks wait
until they make a whole task (or the file ends), so a stream costs one request per 4 MiB, not
one per read. The pipeline is topped up on each read and whenever a task succeeds (not after a
failure: a down service would only be asked again). A new run cancels the previous run's
queued tasks and stops its running ones (`stop`, watched by the block fetcher at every receive:
their blocks arrived so far stay cached, the connection is closed); `close()` (on FUSE release)
does the same and issues no new ones. So a player that seeks elsewhere, or closes the file to
open the next one, does not share the link with up to a whole window (16 MiB) of bytes it no
longer wants; a reader that still waits for one of those blocks fetches it itself.

Prefetched blocks live in the block cache, so readahead memory is bounded by the cache budget.

Drop-behind: once the run's high-water mark is `back_tolerance + drop_margin` past a block
(6 MiB by default), `Readahead` hands that block to the cache's passed tier (`cache.discard`),
each block of the run once. vcfs mounts with `kernel_cache`, so the kernel's page cache usually
holds every byte the reader got; the passed tier (bounded, evicted first, see vcfs.blocks) keeps
the recent past for a seek back and recycles the memory of the older past for the blocks ahead
(a fresh daemon would otherwise fault in new pages for its whole budget: ~2.7 us per 4 KiB page
on the benchmark VM, a third of the daemon's CPU on a cold scan), and a long scan no longer
flushes other files' probe and seek blocks out of the LRU. Blocks not read yet (prefetched
ahead) and everything read by handles without an established run stay in the LRU.
A prefetch error is logged at debug level and dropped: the foreground read of that block will
fetch it again and report the error to the reader.
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Protocol

from vcfs.blocks import MIB, FetchStopped, blocks_for
from vcfs.threads import NoThread, submit

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SequentialPolicy:
    """Tuning of `SequentialDetector`; all sizes in bytes."""

    # One block: a mistaken readahead costs a single request.
    initial_window: int = MIB
    # Deep enough to hide request latency at HD bitrates, small next to the 256 MiB cache.
    max_window: int = 16 * MIB
    # Multithreaded FUSE delivers the kernel's reads out of order: a `dd` of 315 MB on the
    # 2-core VM had a 1 MiB read arrive more than 1 MiB behind the furthest one 9 times, each
    # of which ended the run with a 1 MiB tolerance. A seek back by less is harmless here.
    back_tolerance: int = 4 * MIB
    # The kernel's own async readahead can run this far ahead of the reads it already issued.
    forward_tolerance: int = 16 * MIB
    # A single read proves nothing: probes read the header once and jump away.
    min_run_reads: int = 2
    # Longer than what players read in one go without streaming: ffprobe's header reads grown
    # by the kernel's own readahead ramp (128K, 256K, 512K, 1M: ~2 MiB) and the decode of one
    # GOP after a seek (2-5 MB at 20 Mb/s); the kernel's readahead covers a stream until then.
    min_run_bytes: int = 8 * MIB
    # Double the window per block of progress, not per read, whatever the kernel's read size.
    growth_step: int = MIB
    # Drop-behind keeps this much beyond `back_tolerance` behind the high-water mark: a read
    # the kernel issued before the mark moved on may still be on its way to its block.
    drop_margin: int = 2 * MIB

    def __post_init__(self) -> None:
        if not 0 <= self.initial_window <= self.max_window:
            raise ValueError("need 0 <= initial_window <= max_window")
        if min(self.back_tolerance, self.forward_tolerance, self.min_run_bytes,
               self.drop_margin) < 0:
            raise ValueError("tolerances, min_run_bytes and drop_margin must be >= 0")
        if self.min_run_reads < 1 or self.growth_step <= 0:
            raise ValueError("need min_run_reads >= 1 and growth_step > 0")

    @classmethod
    def for_blocks(cls, block_size: int, max_window: int) -> SequentialPolicy:
        """The default policy for a cache of `block_size` blocks: start at one block, grow one
        doubling per block, up to `max_window` (0 disables readahead)."""
        max_window = max(max_window, 0)
        return cls(
            initial_window=min(block_size, max_window),
            max_window=max_window,
            growth_step=block_size,
        )


@dataclass(frozen=True, slots=True)
class Window:
    """Bytes worth prefetching now: `[start, end)`, `start` being the run's high-water mark."""

    start: int
    end: int
    run: int  # which run this belongs to; a new number means the reader moved elsewhere

    def blocks(self, file_size: int, block_size: int) -> range:
        """The blocks to prefetch: those of the window, clamped to the file, except a block
        holding `start - 1`, which the read that ended there has fetched already."""
        ahead = blocks_for(self.start, self.end - self.start, file_size, block_size)
        first_untouched = -(-self.start // block_size)
        return range(max(ahead.start, first_untouched), max(ahead.stop, first_untouched))


@dataclass(slots=True)
class _Piece:
    """A contiguous stretch covered by reads while no run is established yet."""

    start: int
    end: int
    reads: int  # reads that added bytes to the stretch


class SequentialDetector:
    """Decides, read by read, whether one reader is streaming and how far ahead to fetch.

    Not thread-safe (pure state); `Readahead` serialises calls.
    """

    def __init__(self, policy: SequentialPolicy | None = None, *, max_pieces: int = 8) -> None:
        """`max_pieces`: candidate stretches remembered before a run is established (8: a
        probe's scattered reads plus the kernel's reordering at the start of a stream)."""
        if max_pieces < 1:
            raise ValueError("max_pieces must be >= 1")
        self.policy = policy if policy is not None else SequentialPolicy()
        self._max_pieces = max_pieces
        self._pieces: list[_Piece] = []  # most recently touched last
        self._run = 0
        self._high: int | None = None  # high-water mark of the established run, else None
        self._start = 0  # first byte of the established run
        self._window = 0
        self._progress = 0  # bytes advanced since the window last grew
        self._isolated = False  # the last read continued no earlier read
        self._scattered = False

    @property
    def established(self) -> bool:
        return self._high is not None

    @property
    def scattered(self) -> bool:
        """Whether the last read, and the one before it, each continued no earlier read (it
        touched none of the candidate stretches, or it ended the run): a reader of scattered
        pieces, whose next read will likely not continue this one either. A player's jump
        (a seek, `ffprobe` going to a `moov` box at the end) follows reads that went on from
        each other, and is itself read on from: the rest of its block is wanted."""
        return self._scattered

    @property
    def run(self) -> int:
        """Changes whenever a run is established or abandoned."""
        return self._run

    @property
    def window(self) -> int:
        """Current window in bytes; 0 while no run is established."""
        return self._window if self._high is not None else 0

    def passed(self) -> tuple[int, int] | None:
        """`[start, end)`: the bytes the established run has left behind for good, from its
        first byte to `back_tolerance + drop_margin` behind its high-water mark (a read
        further back would end the run); None while no run is established."""
        if self._high is None:
            return None
        policy = self.policy
        end = self._high - policy.back_tolerance - policy.drop_margin
        return self._start, max(end, self._start)

    def feed(self, offset: int, size: int) -> Window | None:
        """Account for a read of `size` bytes at `offset`; the window to prefetch, or None
        while no sequential run is established."""
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset/size: {offset}, {size}")
        if size == 0:
            return self._current()
        end = offset + size
        high = self._high
        if high is None:
            self._note_isolated(not self._add_piece(offset, end))
            return self._current()
        policy = self.policy
        if offset < high - policy.back_tolerance or offset > high + policy.forward_tolerance:
            self.reset()  # a real seek: the reader must prove itself again
            self._note_isolated(not self._add_piece(offset, end))
            return None
        self._note_isolated(False)
        if end > high:
            self._high = end
            self._progress += end - high
            steps, self._progress = divmod(self._progress, policy.growth_step)
            if steps:
                # Shift no further than needed to pass any cap: a huge skip builds no huge int.
                self._window = min(self._window << min(steps, 64), policy.max_window)
        return self._current()

    def reset(self) -> None:
        """Forget the current run and all candidate stretches."""
        if self._high is not None:
            self._run += 1
        self._high = None
        self._window = 0
        self._progress = 0
        self._pieces.clear()

    def _note_isolated(self, isolated: bool) -> None:
        self._scattered = isolated and self._isolated
        self._isolated = isolated

    def _add_piece(self, offset: int, end: int) -> bool:
        """Merge the read into the candidate stretches it touches; establish a run when the
        merged stretch is long enough and was built by enough reads. Returns whether it
        touched any."""
        touching = [p for p in self._pieces if p.start <= end and offset <= p.end]
        adds_bytes = not any(p.start <= offset and end <= p.end for p in touching)
        merged = _Piece(
            start=min([offset, *(p.start for p in touching)]),
            end=max([end, *(p.end for p in touching)]),
            reads=sum(p.reads for p in touching) + adds_bytes,
        )
        rest = [p for p in self._pieces if all(p is not t for t in touching)]
        self._pieces = [*rest, merged][-self._max_pieces :]
        policy = self.policy
        long_enough = merged.end - merged.start >= policy.min_run_bytes
        if merged.reads >= policy.min_run_reads and long_enough:
            self._pieces.clear()
            self._run += 1
            self._start = merged.start
            self._high = merged.end
            self._window = policy.initial_window
            self._progress = 0
        return bool(touching)

    def _current(self) -> Window | None:
        if self._high is None:
            return None
        return Window(self._high, self._high + self._window, self._run)


class PrefetchTarget(Protocol):
    """What `Readahead` needs of the cache (`vcfs.blocks.BlockCache` fits)."""

    def prefetch(
        self, content_hash: str, file_size: int, first_block: int, last_block: int, *,
        stop: threading.Event | None = None,
    ) -> None: ...

    def discard(self, content_hash: str, first_block: int, last_block: int) -> int: ...


@dataclass(slots=True)
class _RunState:
    """Bookkeeping for the detector run being served."""

    run: int = -1
    target: range = range(0)  # blocks of the latest window
    next_block: int = 0  # first block not yet requested in this run
    next_drop: int | None = None  # first block drop-behind has not dropped yet in this run
    tasks: set[Future[bool]] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)  # set: the run is over


class Readahead:
    """Readahead for one open file handle (see module docstring). Thread-safe."""

    def __init__(
        self,
        cache: PrefetchTarget,
        content_hash: str,
        file_size: int,
        *,
        executor: Executor,
        block_size: int,
        max_window: int,
        policy: SequentialPolicy | None = None,
        max_outstanding: int = 4,
        task_blocks: int = 4,
        drop_behind: bool = True,
    ) -> None:
        """`policy` replaces the default `SequentialPolicy.for_blocks(block_size, max_window)`
        entirely when given. `max_outstanding`: prefetch tasks queued or running for this
        handle at once (4: two streams sharing the 4 threads of vcfs's pool each keep two busy
        with two more in the queue).
        `task_blocks`: blocks per prefetch task (4: a 16 MiB window is four requests, whose
        first lands well before the whole window; a cache with a block fetcher receives the
        blocks of a task as separate objects, so a bigger task costs no extra copy).
        `drop_behind`: discard the blocks the established run has passed (see module
        docstring)."""
        if block_size <= 0 or max_outstanding < 1 or task_blocks < 1:
            raise ValueError("need block_size > 0, max_outstanding >= 1, task_blocks >= 1")
        self._cache = cache
        self._hash = content_hash
        self._file_size = file_size
        self._executor = executor
        self._block_size = block_size
        self._max_outstanding = max_outstanding
        self._task_blocks = task_blocks
        self._drop_behind = drop_behind
        self._detector = SequentialDetector(
            policy if policy is not None else SequentialPolicy.for_blocks(block_size, max_window)
        )
        # Reentrant: a task finishing quickly may run its done-callback inside submit's caller.
        self._lock = threading.RLock()
        self._state = _RunState()
        self._closed = False
        self._tasks_submitted = 0
        self._blocks_requested = 0
        self._blocks_dropped = 0
        self._errors = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def window(self) -> int:
        """The detector's current window in bytes (0: not streaming)."""
        with self._lock:
            return self._detector.window

    def on_read(self, offset: int, size: int) -> bool:
        """Account for a foreground read and top up the prefetch pipeline if streaming.
        Returns whether the read is scattered: neither it nor the one before it continued an
        earlier read of the handle (see `SequentialDetector.scattered`)."""
        with self._lock:
            if self._closed:
                return False
            window = self._detector.feed(offset, size)
            scattered = self._detector.scattered
            if self._detector.run != self._state.run:
                # The reader moved: prefetches for the old position are waste.
                old, self._state = self._state, _RunState(run=self._detector.run)
                old.stop.set()
                for task in list(old.tasks):
                    task.cancel()
            if window is None:
                return scattered
            state = self._state
            state.target = window.blocks(self._file_size, self._block_size)
            state.next_block = max(state.next_block, state.target.start)
            self._top_up(state)
            if self._drop_behind:
                self._drop_passed(state)
            return scattered

    def close(self) -> None:
        """Cancel queued prefetches, stop running ones and issue no more. Does not wait."""
        with self._lock:
            self._closed = True
            self._state.stop.set()
            tasks = list(self._state.tasks)
        for task in tasks:
            task.cancel()

    def stats(self) -> dict[str, int]:
        """Counters of this handle: prefetch tasks submitted, blocks they covered, blocks
        dropped behind the stream, errors."""
        with self._lock:
            return {
                "tasks_submitted": self._tasks_submitted,
                "blocks_requested": self._blocks_requested,
                "blocks_dropped": self._blocks_dropped,
                "prefetch_errors": self._errors,
            }

    def _top_up(self, state: _RunState) -> None:
        """Submit tasks for the not yet requested blocks of the window, within the task bound.
        Called with the lock held, on reads and whenever a task of the run succeeds."""
        last_block = (self._file_size - 1) // self._block_size
        while (
            not self._closed
            and state is self._state
            and state.next_block < state.target.stop
            and len(state.tasks) < self._max_outstanding
        ):
            first = state.next_block
            if (state.target.stop - first < self._task_blocks
                    and 2 * (first - state.target.start) >= len(state.target)
                    and state.target.stop <= last_block):
                # The window moves on a block per read. While the blocks requested reach half
                # the window ahead of the reader, wait for a whole task's worth: fewer, larger
                # requests (a 315 MB read: 87 instead of 145-156), the reader never waiting.
                break
            last = min(first + self._task_blocks, state.target.stop) - 1
            try:
                task = submit(self._executor, "a prefetch", self._prefetch, first, last,
                              state.stop)
            except NoThread:  # the reads fetch what they need: readahead waits for a thread
                log.debug("readahead of %s paused: no thread could be started", self._hash)
                return
            except RuntimeError:  # the executor is shutting down with the mount
                log.debug("readahead of %s stopped: executor shut down", self._hash)
                return
            # Book the task before its callback can run (it may run right here if it is done).
            state.next_block = last + 1
            state.tasks.add(task)
            self._tasks_submitted += 1
            self._blocks_requested += last - first + 1
            task.add_done_callback(functools.partial(self._finished, state))

    def _drop_passed(self, state: _RunState) -> None:
        """Discard the blocks lying wholly in the bytes the run has passed, each once per run
        (lock held)."""
        passed = self._detector.passed()
        if passed is None:
            return
        start, end = passed
        if state.next_drop is None:  # a block the run began inside holds bytes it never read
            state.next_drop = -(-start // self._block_size)
        stop = end // self._block_size  # blocks before it end at or before `end`
        if stop > state.next_drop:
            self._blocks_dropped += self._cache.discard(self._hash, state.next_drop, stop - 1)
            state.next_drop = stop

    def _prefetch(self, first: int, last: int, stop: threading.Event) -> bool:
        """The task body: True if the blocks are now cached (or on their way)."""
        if stop.is_set():
            return False
        try:
            self._cache.prefetch(self._hash, self._file_size, first, last, stop=stop)
        except FetchStopped:
            return False
        except Exception as exc:  # the foreground read retries and reports
            with self._lock:
                self._errors += 1
            log.debug("prefetch of %s blocks %d-%d failed: %s", self._hash, first, last, exc)
            return False
        return True

    def _finished(self, state: _RunState, task: Future[bool]) -> None:
        with self._lock:
            state.tasks.discard(task)
            # Keep the pipeline full between reads, but not after a failure: a down service
            # would only be asked the same questions again.
            if not task.cancelled() and task.exception() is None and task.result():
                self._top_up(state)
