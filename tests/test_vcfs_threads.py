"""vcfs when no thread can be started (vcfs.threads): a real mount in a cgroup whose pids.max
leaves it none, and a block cache whose background pool cannot start one. A read gets its
bytes, or ENOMEM with one log line naming the limits; never EIO with a traceback per read, and
never a hang: a block left in flight by a fetch that never started would keep its readers
waiting for good (seen: a reader stuck in the kernel until the daemon was killed)."""

from __future__ import annotations

import concurrent.futures
import errno
import gc
import os
import random
import subprocess
import threading
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import VidcacheServer, new_cgroup, wait_until
from tests.vcfs_fault_support import ingest
from tests.vcfs_support import (
    FUSE_MISSING_REASON,
    VcfsMount,
    fuse_missing,
    vcfs_command,
)
from vcfs.blocks import BlockCache
from vcfs.threads import submit

MIB = 1 << 20
HANG_LIMIT = 60.0  # seconds: a reader not done by then hangs


@pytest.mark.fuse
@pytest.mark.skipif(fuse_missing(), reason=FUSE_MISSING_REASON)
def test_reads_under_a_pids_max_get_their_bytes_or_enomem_and_never_hang(
    tmp_path: Path, videos: dict[str, Path], media_url: str, vidcache_server: VidcacheServer
) -> None:
    """pids.max set to the threads of the idle mount: no thread can start. 60 readers of 1 MiB
    at random offsets (cold blocks) each get the right bytes (all, or those before a page vcfs
    refused) or ENOMEM, within HANG_LIMIT; the reads vcfs fails for want of a thread get
    ENOMEM, the log saying so, naming the limits, never blaming the service; once the limit
    is lifted, every read works again; libfuse's refused thread starts make a log line per
    10 s. Was: EIO with a traceback per read,
    readers of a block whose background fetch could not start waited for it forever, and
    libfuse wrote `fuse: error creating thread` at each refusal (1,000 to 5,000 lines)."""
    source = ingest(vidcache_server.url, media_url, videos, ("big.mp4",),
                    bucket="vcfs-threads")["big.mp4"]
    with new_cgroup("pids") as (cgroup, _, in_cgroup):
        mount = VcfsMount(vidcache_server.url, tmp_path / "mnt", "--cache-size", "4M")
        mount.prefix = in_cgroup
        with mount:
            path = mount.video(source.file_name)

            def read(reader: int) -> str:
                offset = random.Random(reader).randrange(0, source.size - MIB)
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    data = os.pread(fd, MIB, offset)
                except OSError as exc:
                    return errno.errorcode[exc.errno or 0]
                finally:
                    os.close(fd)
                if data != source.data[offset : offset + len(data)] or not data:
                    return "wrong bytes"
                # a page after the first refused: the kernel returns those before it
                return "bytes" if len(data) == MIB else "short"

            (cgroup / "pids.max").write_text((cgroup / "pids.current").read_text())
            # Not `with`: a pool's exit would wait for a hung reader, until the daemon is killed.
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=30)
            try:
                readers = [pool.submit(read, reader) for reader in range(60)]
                _, hung = concurrent.futures.wait(readers, timeout=HANG_LIMIT)
                if hung:  # first: a fork (fusermount) closing their files would hang too
                    mount.kill()
                assert not hung, f"{len(hung)} readers hung"
                outcomes = [reader.result() for reader in readers]
            finally:
                pool.shutdown(wait=False)
            assert set(outcomes) <= {"bytes", "short", "ENOMEM"}, outcomes
            (cgroup / "pids.max").write_text("max")
            # vcfs refused some reads (the kernel re-asks a failed read page by page: those
            # may then have their bytes)
            assert mount.stats()["fuse"]["errors"] >= len(outcomes) - outcomes.count("bytes")
            assert mount.stats()["fuse"]["errors"] > 0
            assert {read(reader) for reader in range(100, 110)} == {"bytes"}
            log = mount.log()
            assert ("failed (ENOMEM): no thread could be started: a limit on threads "
                    "(ulimit -u, the cgroup's pids.max) or on the memory for their stacks "
                    "(ulimit -d, ulimit -v) is reached") in log, log
            assert "Traceback" not in log and "(EIO)" not in log, log
            # libfuse's own refusals (a line each, thousands here) are summed up: a line per
            # 10 s, naming the limits
            assert "fuse: error creating thread" not in log
            refusals = log.count("libfuse could not start another FUSE thread "
                                 "(Resource temporarily unavailable")
            assert 1 <= refusals <= 1 + mount.stats()["uptime_s"] // 10, log


def _start_under(limit: int, cgroup: Path, in_cgroup: list[str], url: str, mountpoint: Path,
                 log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`vcfs mount --foreground` with pids.max `limit`, once it has exited or said it is
    mounted: the process and its log."""
    (cgroup / "pids.max").write_text(str(limit))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*in_cgroup, *vcfs_command("mount", url, str(mountpoint), "--foreground")],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: process.poll() is not None
                   or f"mounted at {mountpoint}" in log_path.read_text(),
                   timeout=HANG_LIMIT, what=f"vcfs under pids.max {limit} to exit or mount")
    except BaseException:
        process.kill()
        process.wait()
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        raise
    return process, log_path.read_text()


@pytest.mark.fuse
@pytest.mark.skipif(fuse_missing(), reason=FUSE_MISSING_REASON)
def test_a_mount_short_of_threads_at_start_fails_with_one_line_or_comes_up_whole(
    tmp_path: Path, vidcache_server: VidcacheServer
) -> None:
    """pids.max from 1 up, until vcfs mounts: each start that cannot have the threads it needs
    (the health check's request, the thread watching the mount, libfuse's first worker) exits
    with code 1, one `vcfs: error:` line, no traceback and nothing mounted; the first that
    mounts says so (the kernel readahead raised, `--daemon`'s parent told) and unmounts with
    code 0. Was: with the thread watching the mount refused in `init`, a mount served requests
    but never said it was mounted (a `--daemon` parent waiting for it in vain), and its
    unmount failed with tracebacks; the health check's refusal was a traceback; and with no
    process to spare, libfuse3 was not found (`install the fuse3 package`): find_library
    runs ldconfig."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    errors = []
    with new_cgroup("pids") as (cgroup, _, in_cgroup):
        for limit in range(1, 16):
            process, log = _start_under(limit, cgroup, in_cgroup, vidcache_server.url,
                                        mountpoint, tmp_path / f"vcfs-{limit}.log")
            assert "Traceback" not in log, log
            if process.returncode is not None:
                assert process.returncode == 1, log
                assert log.splitlines()[-1].startswith("vcfs: error: "), log
                assert not os.path.ismount(mountpoint), log
                errors.append(log.splitlines()[-1])
                continue
            os.statvfs(mountpoint)
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
            assert process.wait(timeout=HANG_LIMIT) == 0
            assert "Traceback" not in (tmp_path / f"vcfs-{limit}.log").read_text()
            break
        else:
            pytest.fail(f"vcfs did not mount under any pids.max up to {limit}: {errors}")
    no_thread = [line for line in errors if "no thread could be started" in line]
    assert any("the thread watching the mount" in line for line in no_thread), errors
    assert not any("cannot be loaded" in line for line in errors), errors


class _NoNewThread(concurrent.futures.ThreadPoolExecutor):
    """A pool that cannot start a thread once `refuse` is set, as CPython's fails then: the
    call queued first, then RuntimeError from the thread's start."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refuse = threading.Event()

    def _adjust_thread_count(self) -> None:
        if self.refuse.is_set():
            raise RuntimeError("can't start new thread")
        super()._adjust_thread_count()


def test_a_block_whose_background_fetch_cannot_start_is_fetched_by_its_reader() -> None:
    """A read needing only the start of its last cold block fetches it in the background; no
    thread to be had, its reader fetches it itself, and a second reader of the block, waiting
    for that fetch, gets it. Was: the first read failed with RuntimeError and left the block
    in flight with no fetch: the second reader waited for good."""
    block = 1 << 16
    data = bytes(range(256)) * (4 * block // 256)
    arrived = threading.Event()

    def block_fetcher(content_hash: str, start: int, end: int, block_size: int, *,
                      on_block: Callable[[int, bytes], None], **_: Any) -> list[bytes]:
        blocks = [data[low : min(low + block_size, end)] for low in range(start, end, block_size)]
        arrived.wait(HANG_LIMIT)  # the second reader waits for this fetch meanwhile
        for position, piece in enumerate(blocks):
            on_block(position, piece)
        return blocks

    cache = BlockCache(lambda h, s, e: data[s:e], block_size=block, capacity=8 * block,
                       block_fetcher=block_fetcher)
    background = _NoNewThread(max_workers=4)
    background.refuse.set()
    cache._background = background
    # Not `with`: its exit would wait for a hung reader.
    readers = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    try:
        first = readers.submit(cache.read, "h", len(data), block - 10, 20)
        wait_until(lambda: cache.stats()["fetching_blocks"] == 2, timeout=HANG_LIMIT,
                   what="the first reader to claim blocks 0 and 1")
        second = readers.submit(cache.read, "h", len(data), block + 100, 100)
        wait_until(lambda: cache.stats()["inflight_waits"] == 1, timeout=HANG_LIMIT,
                   what="the second reader to wait for block 1")
        arrived.set()
        assert second.result(timeout=HANG_LIMIT) == data[block + 100 : block + 200]
        assert first.result(timeout=HANG_LIMIT) == data[block - 10 : block + 10]
    finally:
        readers.shutdown(wait=False)
    assert cache.stats()["fetching_blocks"] == 0
    background.shutdown()


class _Held:
    """An object to follow by a weak reference."""


@pytest.mark.parametrize("fails", [True, False], ids=["exception", "result"])
def test_a_call_through_submit_is_freed_once_its_caller_lets_go_without_the_collector(
    fails: bool,
) -> None:
    """With the garbage collector off, a call through `submit` that fails while a local holds
    an object (or returns it): once the call is done and its caller drops the future (and the
    exception), the object is freed, as with `executor.submit`. Was: kept in reference
    cycles until the collector ran (the future, its exception, the traceback, the frame
    of `submit`'s closure holding the future; the future and the executor's, each holding
    the other through a callback): in an outage, failed fetches' blocks by the hundred MiB
    (docs/reliability.md)."""
    freed: list[weakref.ref[_Held]] = []
    submitted = threading.Event()

    def call() -> _Held:
        submitted.wait(HANG_LIMIT)  # done after `submit` has returned, as a fetch is
        held = _Held()
        freed.append(weakref.ref(held))
        if fails:
            raise ValueError("failed")
        return held

    gc.disable()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            future = submit(pool, "a test call", call)
            submitted.set()
            assert (future.exception(timeout=HANG_LIMIT) is not None) == fails
            del future
            # the worker's next call runs once it has let go of this one's frames
            pool.submit(lambda: None).result(timeout=HANG_LIMIT)
            assert freed[0]() is None
    finally:
        gc.enable()


def test_a_failed_call_through_submit_keeps_its_traceback_for_its_caller() -> None:
    """The future of a failed call has its exception, with the traceback down to the frame
    that raised and that frame's locals, for a log line, after the worker is done with it and
    the collector has run: `submit` does not clear frames to free them."""

    def call() -> None:
        held = _Held()
        raise ValueError(f"failed holding {held!r}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = submit(pool, "a test call", call)
        pool.submit(lambda: None).result(timeout=HANG_LIMIT)
    gc.collect()
    error = future.exception(timeout=HANG_LIMIT)
    assert isinstance(error, ValueError)
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    assert frames[-1].f_code is call.__code__
    assert isinstance(frames[-1].f_locals["held"], _Held)
    assert "in call\n" in "".join(traceback.format_exception(error))
