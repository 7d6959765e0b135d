"""The FUSE side of vcfs: a thin mfusepy `Operations` adapter over `Remote` and `BlockCache`.

Namespace (see vcfs.paths): `/by-hash/<hash>.<ext>` per stored video, listed through the
service's listing and looked up in the last listing, or by metadata if it lacks the name (a
video ingested since); `/.vcfs/stats` is a JSON snapshot of the counters, generated when
opened and served with `direct_io` so its size may differ from what `stat` said (it says 0,
like /proc files).

Caching across the kernel boundary: a hash's bytes never change, so the kernel keeps file
pages across opens (`kernel_cache`) and entries/attributes for a day; failed lookups are
remembered only `negative_timeout` seconds so a newly ingested video shows up quickly.

Errors: every operation is wrapped by `_fuse_operation`, the one place where exceptions become
errno values: `NotFound` -> ENOENT, `AccessDenied` (the service refused the token) -> EACCES,
`MemoryError` (an allocation past `ulimit -d` / `-v`) -> ENOMEM, a thread that could not be
started (`ulimit -u`, `pids.max`, or its stack past `ulimit -d` / `-v`: vcfs.threads) -> ENOMEM
too, any other failure -> EIO (all logged with what was asked and why, the first of each cause
and then one line per 10 s with the count left out: vcfs.faillog; EIO from a bug with its
traceback), `FuseOSError` passes through. ENOMEM, not pthread_create's EAGAIN: readers take
EAGAIN from a read for "no data yet", not for an error (Python's `FileIO.readall` returns what
it has: a file silently cut short). Nothing else escapes (mfusepy would turn it into EINVAL).
Every operation is bounded in time: what reaches the service does so through `Remote`, whose
calls end by their cutoff.

Open files: `open` allocates a handle (`_VideoHandle`: the video's metadata and a per-handle
`Readahead`; `_StatsHandle`: the snapshot's bytes) in a table keyed by the number given to
the kernel; `release` drops it and cancels the handle's readahead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from vcfs import paths
from vcfs.blocks import BlockCache, Piece, clamp_range, join_pieces
from vcfs.errors import AccessDenied, NotFound, VcfsError
from vcfs.faillog import FailureLog
from vcfs.fuselib import FuseOSError, Operations, current_fuse, reply_buffer, session_exited
from vcfs.limits import READS_WAITING
from vcfs.readahead import Readahead
from vcfs.remote import Remote, VideoMeta
from vcfs.stats import Counters
from vcfs.threads import start_thread, thread_refused
from vidcache_client._threads import LIMITS

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_DIR_MODE = stat.S_IFDIR | 0o555
_FILE_MODE = stat.S_IFREG | 0o444
_STATFS_UNIT = 4096
_NAME_MAX = 255  # bytes in a name, as statfs reports it
_CONGESTION_THRESHOLD = 9
_DAY = 86_400.0
# How often the lifecycle thread looks whether libfuse's loop is ending.
_SESSION_CHECK_S = 0.1
# At most one line per this many seconds about libfuse's refused thread starts.
_REFUSALS_LOG_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FsConfig:
    # A name under by-hash always means the same bytes: let the kernel keep it a long time.
    entry_timeout: float = _DAY
    attr_timeout: float = _DAY
    # "No such video" may stop being true at the next ingest.
    negative_timeout: float = 3.0
    # Readahead window limit per open file (0 disables readahead).
    readahead_max: int = 16 << 20
    # Two streams' prefetches in flight while FUSE threads serve the foreground reads.
    readahead_threads: int = 4
    # The kernel then sends 1 MiB reads instead of 128 KiB (set when root; None: leave it).
    kernel_readahead_kb: int | None = 1024
    # `-o max_read=N`: the largest read the kernel sends (None: its own).
    max_read: int | None = None


@dataclass(slots=True)
class _VideoHandle:
    meta: VideoMeta
    readahead: Readahead


@dataclass(slots=True)
class _StatsHandle:
    content: bytes


_Handle = _VideoHandle | _StatsHandle


@dataclass(frozen=True, slots=True)
class _ListingView:
    """What `readdir` of by-hash and `statfs` show of one listing, built once for it: at every
    call, at 100k videos, the entries took 0.2 s of each readdir (a player lists the folder at
    every open) and the sum 5 ms of each statfs."""

    listing: list[VideoMeta]  # the one shown: `Remote` returns the same list until the next
    entries: list[tuple[str, dict[str, int], int]]  # by-hash's, "." and ".." included
    blocks: int  # the videos' sizes in statfs units


FS_COUNTERS = (
    "fuse_reads",  # read() calls on videos
    "bytes_read",  # bytes returned by them
    "lookups",  # getattr of video names
    "opens",
    "errors",  # operations answered with EIO, EACCES or ENOMEM
    "readahead_tasks",  # prefetch tasks of released handles
    "readahead_blocks",
)


def _describe(name: str, args: tuple[Any, ...], reason: str) -> str:
    """`read('/by-hash/ab...mp4', 131072, 0)`: the operation and its plain arguments, but a
    video's path left out when `reason` (why it failed) names the video's hash, as
    vcfs.remote's errors do: `read(131072, 0)`. The line names the hash once."""
    shown = ", ".join(repr(arg) for arg in args
                      if isinstance(arg, str | int) and not _names_video(arg, reason))
    return f"{name}({shown})"


def _names_video(arg: str | int, reason: str) -> bool:
    """Whether `arg` is a video's path and `reason` names its hash."""
    parsed = paths.parse_path(arg) if isinstance(arg, str) else None
    return parsed is not None and parsed.video is not None and (
        parsed.video.content_hash in reason)


def _file_of(name: str, args: tuple[Any, ...]) -> int | None:
    """The handle of the file a failed `read` was of (`fi`, its last argument), None for other
    operations: the log counts an open file's failed reads once (vcfs.faillog)."""
    return int(args[-1].fh) if name == "read" else None


def _cause(operation: str, errno_name: str, exc: BaseException) -> str:
    """The cause of a failure, as `read: EIO, ConnectError`: the operation, its errno and the
    class of the error at the bottom of `exc`'s chain (the same for every read a stopped
    service fails, another for bytes failing their digest)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{operation}: {errno_name}, {type(exc).__name__}"


def _fuse_operation(
    method: Callable[Concatenate[VcfsOperations, P], R],
) -> Callable[Concatenate[VcfsOperations, P], R]:
    """The single place where exceptions become errno values (see module docstring)."""

    @functools.wraps(method)
    def wrapper(self: VcfsOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except FuseOSError:
            raise
        except NotFound as exc:
            log.info("%s: %s", _describe(method.__name__, args, str(exc)), exc)
            raise FuseOSError(errno.ENOENT) from exc
        except AccessDenied as exc:
            self.counters.add("errors")
            self.failures.failed(
                _cause(method.__name__, "EACCES", exc), logging.ERROR,
                f"{_describe(method.__name__, args, str(exc))} failed (EACCES): {exc}",
                file=_file_of(method.__name__, args))
            raise FuseOSError(errno.EACCES) from exc
        except VcfsError as exc:
            self.counters.add("errors")
            file = _file_of(method.__name__, args)
            self.remote.operation_failed(file)
            self.failures.failed(
                _cause(method.__name__, "EIO", exc), logging.ERROR,
                f"{_describe(method.__name__, args, str(exc))} failed (EIO): {exc}", file=file)
            raise FuseOSError(errno.EIO) from exc
        except Exception as exc:
            self.counters.add("errors")
            # A limit the mounting user sets, not the service's fault (EIO would blame it):
            # memory past ulimit -d / -v, or a thread refused (vcfs.threads), ours or a
            # library's, matched by its message too: CPython's RuntimeError is also its other
            # misuses'.
            if isinstance(exc, MemoryError) or thread_refused(exc):
                why = ((str(exc) or "out of memory") if isinstance(exc, MemoryError)
                       else f"no thread could be started: {LIMITS}")
                with contextlib.suppress(MemoryError):  # saying so takes memory too
                    self.failures.failed(
                        _cause(method.__name__, "ENOMEM", exc), logging.ERROR,
                        f"{_describe(method.__name__, args, '')} failed (ENOMEM): {why}",
                        file=_file_of(method.__name__, args))
                raise FuseOSError(errno.ENOMEM) from exc
            # a bug or an error from below: EIO, never EINVAL
            log.exception("%s failed (EIO)", _describe(method.__name__, args, ""))
            raise FuseOSError(errno.EIO) from exc

    return wrapper


def _times_since(times: int, last: float | None, now: float) -> str:
    """", 37 times in the last 4.2 s" for all but a first line (`last` None) of one time."""
    if last is None and times == 1:
        return ""
    return f", {times} times" + ("" if last is None else f" in the last {now - last:.1f} s")


def _read_only(*_: object) -> int:
    raise FuseOSError(errno.EROFS)


class VcfsOperations(Operations):  # type: ignore[misc]  # mfusepy is untyped
    """mfusepy operations (raw_fi mode: open/read/release get the fuse_file_info)."""

    use_ns = True

    def __init__(
        self,
        remote: Remote,
        cache: BlockCache,
        *,
        mountpoint: str,
        config: FsConfig | None = None,
        on_mounted: Callable[[], None] | None = None,
        premounted: bool = False,
    ) -> None:
        """`premounted`: `mountpoint` is /dev/fd/N, a /dev/fuse descriptor whose mount its
        opener made (mount.fuse3 -o drop_privileges): it is there before `init`, at a path
        vcfs is not told."""
        self.remote = remote
        self.cache = cache
        self.mountpoint = mountpoint
        self._premounted = premounted
        self.config = config or FsConfig()
        # The times of the directories and the stats file: they have no history of their own.
        self._mounted_at_ns = time.time_ns()
        # Everything is shown as the mounting user's, as the mount is (libfuse leaves 0, root).
        self._owner = {"st_uid": os.getuid(), "st_gid": os.getgid()}
        self.counters = Counters(*FS_COUNTERS)
        self.failures = FailureLog(log)
        self._on_mounted = on_mounted
        self._started = time.monotonic()
        self._handles: dict[int, _Handle] = {}
        self._listing_view: _ListingView | None = None
        # Not `_lock`: opens and reads must not wait while a view is built.
        self._listing_view_lock = threading.Lock()
        self._handle_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.readahead_threads, thread_name_prefix="vcfs-readahead"
        )
        self._libfuse_refusals = 0  # not logged yet
        self._libfuse_refusal_logged: float | None = None
        self._closed = threading.Event()
        self._initialised = threading.Event()
        self._fuse: int | None = None  # set by `init`
        self._lifecycle: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start_lifecycle(self) -> None:
        """Start the thread that sees the mount come up (raising the kernel readahead, telling
        `on_mounted`) and then watches for the end of libfuse's loop: call it before libfuse's
        loop starts. A refused start raises `NoThread` with nothing mounted yet, where from
        `init` it left a mount serving requests that never reported itself mounted."""
        lifecycle = threading.Thread(target=self._watch, name="vcfs-lifecycle", daemon=True)
        start_thread(lifecycle, "the thread watching the mount")
        self._lifecycle = lifecycle

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:  # libfuse3
            config.kernel_cache = 1
            config.entry_timeout = self.config.entry_timeout
            config.attr_timeout = self.config.attr_timeout
            config.negative_timeout = self.config.negative_timeout
            config.use_ino = 1
            config.readdir_ino = 1
        if conn is not None:
            # Not a setting: vcfs.limits sizes every pool for this many waiting reads.
            conn.max_background = READS_WAITING
            # The kernel's default: with this many reads in flight it starts no more async
            # readahead, so readers' patterns (and what a probe or a seek fetches) stay its own.
            conn.congestion_threshold = _CONGESTION_THRESHOLD
            if self.config.max_read is not None:
                # libfuse3 mounts only if init asks for the max_read of the mount options.
                conn.max_read = self.config.max_read
            log.debug(
                "FUSE connection: protocol %d.%d, max_read %d, max_readahead %d, max_write %d",
                conn.proto_major, conn.proto_minor, getattr(conn, "max_read", 0),
                conn.max_readahead, conn.max_write,
            )
        # The mount answers only after init returns: the lifecycle thread watches for it.
        self._fuse = current_fuse()
        self._initialised.set()

    def libfuse2_options(self) -> dict[str, str | bool]:
        """What `init_with_config` sets on libfuse3, as mount options for libfuse2 (which has
        no config struct)."""
        return {
            "kernel_cache": True,
            "entry_timeout": str(self.config.entry_timeout),
            "attr_timeout": str(self.config.attr_timeout),
            "negative_timeout": str(self.config.negative_timeout),
            "use_ino": True,
            "readdir_ino": True,
        }

    def _watch(self) -> None:
        while not self._initialised.wait(_SESSION_CHECK_S):
            if self._closed.is_set():  # libfuse's loop ended, or never began
                return
        if self._when_mounted() and self._fuse is not None:
            self._when_session_ends(self._fuse)

    def _when_session_ends(self, fuse: int) -> None:
        """Once libfuse's loop is told to end (SIGTERM, SIGINT, SIGHUP, an unmount), stop the
        requests to the service: libfuse waits for every operation in progress before it
        returns, and a read waiting for a stalled service would hold the exit up to its
        deadline (`--timeout` and more). Its reader gets EIO instead. libfuse has no
        callback for this, hence the check every `_SESSION_CHECK_S`; it ends when `close`
        runs (`destroy`), before libfuse frees `fuse`."""
        while not self._closed.wait(_SESSION_CHECK_S):
            if session_exited(fuse):
                log.info("stopping: giving up the requests to the service still in flight")
                self.remote.close()
                return

    def _when_mounted(self) -> bool:
        """Once the mount serves requests: raise the kernel readahead, tell the CLI."""
        if self._premounted:
            # Requests wait for init's reply, which follows at once. The readahead knob is
            # found from the mount point's device, and the mount point is not known.
            log.info("serving the mount made on %s; the kernel readahead stays at its default",
                     self.mountpoint)
            if self._on_mounted is not None:
                self._on_mounted()
            return True
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self._closed.is_set():
                return False
            if time.monotonic() > deadline:
                log.error("%s did not appear as a mount point within 30 s", self.mountpoint)
                return False
            time.sleep(0.02)
        if self.config.kernel_readahead_kb is not None:
            raise_kernel_readahead(self.mountpoint, self.config.kernel_readahead_kb)
        log.info("mounted at %s", self.mountpoint)
        if self._on_mounted is not None:
            self._on_mounted()
        return True

    def libfuse_thread_refused(self, why: str) -> None:
        """libfuse could not start another worker (vcfs.fuselib.libfuse_thread_refusals): a
        line per `_REFUSALS_LOG_S` at most, the times left out counted in the next."""
        now = time.monotonic()
        with self._lock:
            self._libfuse_refusals += 1
            last = self._libfuse_refusal_logged
            if last is not None and now - last < _REFUSALS_LOG_S:
                return
            times, self._libfuse_refusals = self._libfuse_refusals, 0
            self._libfuse_refusal_logged = now
        log.warning("libfuse could not start another FUSE thread (%s%s): %s; requests wait for "
                    "the threads it has", why, _times_since(times, last, now), LIMITS)

    def _log_libfuse_refusals_left(self) -> None:
        with self._lock:
            times, self._libfuse_refusals = self._libfuse_refusals, 0
            last = self._libfuse_refusal_logged
        if times:
            log.warning("libfuse could not start another FUSE thread%s",
                        _times_since(times, last, time.monotonic()))

    @_fuse_operation
    def destroy(self, path: str) -> None:
        self.close()

    def close(self) -> None:
        """Cancel every handle's readahead and stop the readahead threads (idempotent)."""
        self._closed.set()
        lifecycle = self._lifecycle
        if lifecycle is not None and lifecycle is not threading.current_thread():
            lifecycle.join(timeout=5)  # done with `fuse` before libfuse frees it
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            if isinstance(handle, _VideoHandle):
                handle.readahead.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.failures.flush()
        self._log_libfuse_refusals_left()

    def stats(self) -> dict[str, Any]:
        """Everything counted so far, as served by /.vcfs/stats."""
        with self._lock:
            open_files = sum(isinstance(h, _VideoHandle) for h in self._handles.values())
        return {
            "uptime_s": round(time.monotonic() - self._started, 3),
            "open_files": open_files,
            "fuse": self.counters.snapshot(),
            "cache": self.cache.stats(),
            "remote": self.remote.counters.snapshot(),
        }

    # -- namespace -----------------------------------------------------------------------------

    def _parse(self, path: str) -> paths.VcfsPath:
        parsed = paths.parse_path(path)
        if parsed is None:
            # The kernel passes FUSE names of up to 1024 bytes on; a longer one than statfs's
            # f_namemax is ENAMETOOLONG, as on other file systems.
            if any(len(os.fsencode(name)) > _NAME_MAX for name in path.split("/")):
                raise FuseOSError(errno.ENAMETOOLONG)
            raise FuseOSError(errno.ENOENT)
        return parsed

    def _video(self, parsed: paths.VcfsPath, *, lookup: bool = False) -> VideoMeta:
        """The metadata of the video a path names; ENOENT unless it is exactly its name (an
        existing hash with another extension does not exist). A `lookup` of a path whose
        first block is not cached lets the remote fetch that block along with the metadata
        if it has to ask for it: a player stats a path right before reading it."""
        if parsed.video is None:
            raise FuseOSError(errno.ENOENT)
        content_hash = parsed.video.content_hash
        first_block = 0
        if lookup and not self.cache.is_cached(content_hash, 0):
            first_block = self.cache.block_size
        meta = self.remote.meta(content_hash, first_block=first_block)
        if meta is None or str(parsed.video) != meta.name:
            raise FuseOSError(errno.ENOENT)
        return meta

    @_fuse_operation
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        parsed = self._parse(path)
        mounted = self._mounted_at_ns
        if parsed.is_dir:
            # The root's two subdirectories each link back to it with their `..`.
            links = 4 if parsed.kind is paths.PathKind.ROOT else 2
            return {"st_mode": _DIR_MODE, "st_nlink": links, "st_ino": parsed.inode,
                    "st_mtime": mounted, "st_ctime": mounted, "st_atime": mounted,
                    **self._owner}
        if parsed.kind is paths.PathKind.STATS:
            return {"st_mode": _FILE_MODE, "st_nlink": 1, "st_ino": parsed.inode, "st_size": 0,
                    "st_mtime": mounted, "st_ctime": mounted, "st_atime": mounted,
                    **self._owner}
        self.counters.add("lookups")
        meta = self._video(parsed, lookup=True)
        mtime = meta.mtime_ns
        return {
            "st_mode": _FILE_MODE,
            "st_nlink": 1,
            "st_ino": parsed.inode,
            "st_size": meta.size,
            "st_blocks": -(-meta.size // 512),
            "st_blksize": self.cache.block_size,
            "st_mtime": mtime,
            "st_ctime": mtime,
            "st_atime": mtime,
            **self._owner,
        }

    @_fuse_operation
    def readdir(self, path: str, fh: Any) -> list[tuple[str, dict[str, int], int]]:
        parsed = self._parse(path)
        if parsed.kind is paths.PathKind.BY_HASH:
            return self._view_of(self.remote.list_videos()).entries
        entries: list[tuple[str, int, int]] = [
            (".", _DIR_MODE, parsed.inode),
            ("..", _DIR_MODE, _inode_of("/")),
        ]
        if parsed.kind is paths.PathKind.ROOT:
            entries += [
                (paths.BY_HASH_DIR, _DIR_MODE, _inode_of(f"/{paths.BY_HASH_DIR}")),
                (paths.CONTROL_DIR, _DIR_MODE, _inode_of(f"/{paths.CONTROL_DIR}")),
            ]
        elif parsed.kind is paths.PathKind.CONTROL:
            stats_path = f"/{paths.CONTROL_DIR}/{paths.STATS_FILE}"
            entries.append((paths.STATS_FILE, _FILE_MODE, _inode_of(stats_path)))
        else:
            raise FuseOSError(errno.ENOTDIR)
        return [(name, {"st_mode": mode, "st_ino": ino}, 0) for name, mode, ino in entries]

    @_fuse_operation
    def statfs(self, path: str) -> dict[str, int]:
        view = self._view_of(self.remote.last_listing())
        return {
            "f_bsize": self.cache.block_size,  # the I/O size that fetches whole blocks
            # Counted in pages, not blocks, so `df` shows about the videos' own total size.
            "f_frsize": _STATFS_UNIT,
            "f_blocks": view.blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": len(view.listing),
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": _NAME_MAX,
        }

    def _view_of(self, listing: list[VideoMeta]) -> _ListingView:
        """The view of `listing`, built by the first caller since it replaced the last one (a
        caller meanwhile waits for it: the same work)."""
        with self._listing_view_lock:
            view = self._listing_view
            if view is None or view.listing is not listing:
                entries = [
                    (".", {"st_mode": _DIR_MODE, "st_ino": _inode_of(f"/{paths.BY_HASH_DIR}")}, 0),
                    ("..", {"st_mode": _DIR_MODE, "st_ino": _inode_of("/")}, 0),
                ]
                entries += [
                    (meta.name,
                     {"st_mode": _FILE_MODE, "st_ino": paths.video_inode(meta.content_hash)}, 0)
                    for meta in listing
                ]
                blocks = sum(-(-meta.size // _STATFS_UNIT) for meta in listing)
                view = self._listing_view = _ListingView(listing, entries, blocks)
            return view

    # -- files ---------------------------------------------------------------------------------

    @_fuse_operation
    def open(self, path: str, fi: Any) -> int:
        if fi.flags & os.O_ACCMODE != os.O_RDONLY or fi.flags & os.O_TRUNC:
            raise FuseOSError(errno.EROFS)
        parsed = self._parse(path)
        handle: _Handle
        if parsed.is_dir:
            raise FuseOSError(errno.EISDIR)
        if parsed.kind is paths.PathKind.STATS:
            content = json.dumps(self.stats(), indent=2, sort_keys=True) + "\n"
            handle = _StatsHandle(content.encode())
            fi.direct_io = 1  # its size changes on every open
        else:
            meta = self._video(parsed)
            readahead = Readahead(
                self.cache,
                meta.content_hash,
                meta.size,
                executor=self._executor,
                block_size=self.cache.block_size,
                max_window=self.config.readahead_max,
            )
            handle = _VideoHandle(meta, readahead)
            self.counters.add("opens")
        with self._lock:
            fi.fh = number = next(self._handle_ids)
            self._handles[number] = handle
        return 0

    def _handle(self, fi: Any) -> _Handle:
        with self._lock:
            handle = self._handles.get(fi.fh)
        if handle is None:
            raise FuseOSError(errno.EBADF)
        return handle

    @_fuse_operation
    def read(self, path: str, size: int, offset: int, fi: Any, *,
             reply: Callable[[list[Piece]], Any] = join_pieces) -> Any:
        """Bytes `[offset, offset + size)` of the open file, clamped at its end, as `reply`
        makes its answer of the pieces of blocks holding them (vcfs.blocks): by default one
        `bytes`; `read_buf` has them copied into libfuse's buffer instead. The reply is made
        under this operation's errno handling."""
        handle = self._handle(fi)
        if isinstance(handle, _StatsHandle):
            return reply([(handle.content, *clamp_range(offset, size, len(handle.content)))])
        meta = handle.meta
        log.debug("read %s [%d, +%d)", meta.content_hash[:12], offset, size)
        self.counters.observe_size("read", size)
        # Tell readahead first, so its prefetches run while this read waits for its blocks.
        scattered = handle.readahead.on_read(offset, size)
        pieces = self.cache.pieces(meta.content_hash, meta.size, offset, size,
                                   scattered=scattered)
        self.counters.add("fuse_reads")
        self.counters.add("bytes_read", sum(stop - start for _, start, stop in pieces))
        return reply(pieces)

    def read_buf(self, path: str, answer: Any, size: int, offset: int, fi: Any) -> int:
        """`read`, answered in a buffer made once the bytes are in, and filled straight from
        the cached blocks. libfuse's plain read allocates one of `size` bytes before asking
        and holds it while the read waits: a MiB per read waiting on the service, up to 48 MiB
        besides the cache (vcfs.limits). libfuse calls only this one of the two. A buffer that
        cannot be had is `read`'s MemoryError: ENOMEM, counted and logged there."""
        vector: int = self.read(path, size, offset, fi, reply=reply_buffer)
        ctypes.cast(answer, ctypes.POINTER(ctypes.c_void_p))[0] = vector
        return 0

    @_fuse_operation
    def release(self, path: str, fi: Any) -> int:
        with self._lock:
            handle = self._handles.get(fi.fh)
        if isinstance(handle, _VideoHandle):
            handle.readahead.close()
            readahead = handle.readahead.stats()
            self.counters.add("readahead_tasks", readahead["tasks_submitted"])
            self.counters.add("readahead_blocks", readahead["blocks_requested"])
        # Open until its counters are in: stats showing no open files show all of them.
        with self._lock:
            self._handles.pop(fi.fh, None)
        return 0

    @_fuse_operation
    def access(self, path: str, amode: int) -> int:
        """What `access(2)` (`test -w`, `find -writable`) asks. Only a mount vcfs did not make
        asks it (mount.fuse3 -o drop_privileges: no `default_permissions`, and without `ro`
        the kernel's own EROFS): say what the modes and the read-only mount do, not yes."""
        parsed = self._parse(path)
        if amode & os.W_OK:
            raise FuseOSError(errno.EROFS)
        if amode & os.X_OK and not parsed.is_dir:
            raise FuseOSError(errno.EACCES)  # files are 0444
        return 0

    # -- everything that would change something: read-only ------------------------------------

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = _read_only
    setxattr = removexattr = symlink = truncate = unlink = utimens = write = _read_only


def _inode_of(path: str) -> int:
    """Inode of one of the fixed paths."""
    parsed = paths.parse_path(path)
    if parsed is None:
        raise ValueError(f"not a vcfs path: {path}")
    return parsed.inode


def raise_kernel_readahead(mountpoint: str, kilobytes: int) -> None:
    """Let the kernel read ahead `kilobytes` on this mount, so its reads grow from 128 KiB to
    1 MiB (libfuse3 negotiates 1 MiB requests; the bdi's read_ahead_kb caps them). Root only."""
    device = os.stat(mountpoint).st_dev
    knob = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(knob) as file:
            before = int(file.read())
        if before >= kilobytes:
            return
        with open(knob, "w") as file:
            file.write(str(kilobytes))
    except OSError as exc:
        log.info(
            "kernel readahead of %s stays at its default (%s); run as root for 1 MiB reads",
            mountpoint, exc.strerror,
        )
        return
    log.info("kernel readahead of %s raised from %d to %d KiB", mountpoint, before, kilobytes)
