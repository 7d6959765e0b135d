"""vcfs when no thread can be started (vcfs.threads): a real mount in a cgroup whose pids.max
leaves it none, and a block cache whose background pool cannot start one. A read gets its
bytes, or ENOMEM with one log line naming the limits; never EIO with a traceback per read, and
never a hang: a block left in flight by a fetch that never started would keep its readers
waiting for good (seen: a reader stuck in the kernel until the daemon was killed)."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import VidcacheServer, wait_until
from tests.vcfs_fault_support import ingest
from tests.vcfs_support import FUSE_MISSING_REASON, VcfsMount, fuse_missing, new_cgroup
from vcfs.blocks import BlockCache

MIB = 1 << 20
HANG_LIMIT = 60.0  # seconds: a reader not done by then hangs


@pytest.mark.fuse
@pytest.mark.skipif(fuse_missing(), reason=FUSE_MISSING_REASON)
def test_reads_under_a_pids_max_get_their_bytes_or_enomem_and_never_hang(
    tmp_path: Path, videos: dict[str, Path], media_url: str, vidcache_server: VidcacheServer
) -> None:
    """pids.max set to the threads of the idle mount: no thread can start. 60 readers of 1 MiB
    at random offsets (cold blocks) each get the right bytes or ENOMEM, within HANG_LIMIT; the
    reads vcfs fails for want of a thread get ENOMEM, the log saying so, naming the limits,
    never blaming the service; once the limit is lifted, every read works again. Was: EIO
    with a traceback per read, and readers of a block whose background fetch could not start
    waited for it forever."""
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
                return "bytes" if data == source.data[offset : offset + MIB] else "wrong bytes"

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
            assert set(outcomes) <= {"bytes", "ENOMEM"}, outcomes
            (cgroup / "pids.max").write_text("max")
            # vcfs refused some reads (the kernel re-asks a failed read page by page: those
            # may then have their bytes)
            assert mount.stats()["fuse"]["errors"] >= outcomes.count("ENOMEM")
            assert mount.stats()["fuse"]["errors"] > 0
            assert {read(reader) for reader in range(100, 110)} == {"bytes"}
            log = mount.log()
            assert ("failed (ENOMEM): no thread could be started: a limit on threads "
                    "(ulimit -u, the cgroup's pids.max) or on the memory for their stacks "
                    "(ulimit -d, ulimit -v) is reached") in log, log
            assert "Traceback" not in log and "(EIO)" not in log, log


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
