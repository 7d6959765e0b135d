"""The other ways programs read a file, through a real mount of the real service: sendfile(2)
(nginx, Python's shutil.copyfile), splice(2), copy_file_range(2) (cp), mmap(2), preadv(2)
into several buffers, O_DIRECT, posix_fadvise/madvise(WILLNEED), reads at and past the end.

Each gives the source's bytes; when the service fails, EIO within the read's deadline (a
mapping's page: SIGBUS, the kernel's answer to a failed page fault), never other bytes; and
none of them makes vcfs fetch much more than what is read. `.vcfs/stats`, the one file opened
with direct_io, is checked through the same calls. Faults come from the benchmark's proxy
(tests/vcfs_fault_support.py); the mount behind it has the fault tests' settings (`--timeout
3`, a 2 MiB cache, no readahead), so a read of a block no other read touched reaches it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.faults import Refuse
from tests.support import VidcacheServer, wait_until
from tests.vcfs_fault_support import (
    EIO_BOUND,
    FaultyLink,
    Source,
    fault_mount,
    ingest,
    link_fixture,
    read_uncached,
)
from tests.vcfs_support import VcfsMount, drop_pages, requires_fuse
from vcfs.remote import RemoteConfig

pytestmark = requires_fuse

BUCKET = "vcfs-readers"
MIB = 1 << 20
READ = 64 * 1024
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux 5.14; Python 3.11's mmap module does not name it


@pytest.fixture(scope="module")
def sources(videos: dict[str, Path], media_url: str,
            vidcache_server: VidcacheServer) -> dict[str, Source]:
    return ingest(vidcache_server.url, media_url, videos, ("a.mp4", "big.mp4"), bucket=BUCKET)


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory, vidcache_server: VidcacheServer,
          sources: dict[str, Source]) -> Iterator[VcfsMount]:
    with VcfsMount(vidcache_server.url, tmp_path_factory.mktemp("readers") / "mnt") as mounted:
        yield mounted


link = link_fixture("module")


@pytest.fixture(scope="module")
def faulty_mount(tmp_path_factory: pytest.TempPathFactory, link: FaultyLink,
                 sources: dict[str, Source]) -> Iterator[VcfsMount]:
    mountpoint = tmp_path_factory.mktemp("readers-faults") / "mnt"
    with fault_mount(link.url, mountpoint) as mounted:
        source = sources["big.mp4"]  # metadata and digests cached: faults hit the bytes
        assert read_uncached(mounted.video(source.file_name), 10, 0) == source.data[:10]
        yield mounted


# ---------------------------------------------------------------------------------------------
# The readers, each giving the bytes it read (or raising OSError)


def sendfile(path: Path, offset: int, size: int, out: Path) -> bytes:
    """os.sendfile from `path` to the file `out`, as nginx and shutil.copyfile do, until
    `size` bytes or the end."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with open(out, "wb") as target:
            done = 0
            while done < size:
                sent = os.sendfile(target.fileno(), fd, offset + done, size - done)
                if sent == 0:
                    break
                done += sent
    finally:
        os.close(fd)
    return out.read_bytes()


def splice(path: Path, offset: int, size: int) -> bytes:
    """splice(2) from `path` into a pipe, emptied after each call (a call moves at most the
    pipe's 16 pages), until `size` bytes or the end."""
    fd = os.open(path, os.O_RDONLY)
    read_end, write_end = os.pipe()
    parts = []
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        while size > 0 and (moved := os.splice(fd, write_end, size)):
            while moved > 0:
                part = os.read(read_end, moved)
                parts.append(part)
                moved -= len(part)
                size -= len(part)
    finally:
        for end in (fd, read_end, write_end):
            os.close(end)
    return b"".join(parts)


def preadv(path: Path, offset: int, sizes: tuple[int, ...]) -> bytes:
    """One preadv(2) into buffers of `sizes`: the bytes it filled."""
    buffers = [bytearray(size) for size in sizes]
    fd = os.open(path, os.O_RDONLY)
    try:
        filled = os.preadv(fd, buffers, offset)
    finally:
        os.close(fd)
    return b"".join(buffers)[:filled]


def read_direct(path: Path, offset: int, size: int) -> bytes:
    """One read of `size` bytes of an O_DIRECT open (into a page-aligned buffer, as O_DIRECT
    wants; FUSE passes any offset and size on as they are)."""
    buffer = mmap.mmap(-1, -(-size // PAGE) * PAGE)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        filled = os.preadv(fd, [memoryview(buffer)[:size]], offset)
    finally:
        os.close(fd)
    return buffer[:filled]


def copyfile(path: Path, out: Path) -> bytes:
    shutil.copyfile(path, out)
    return out.read_bytes()


def cp(path: Path, out: Path) -> bytes:
    """cp(1): copy_file_range first, read/write once that is refused across file systems."""
    done = subprocess.run(["cp", str(path), str(out)], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise OSError(errno.EIO, done.stderr.strip())
    return out.read_bytes()


class MappedRead:
    """A child interpreter reading `size` bytes at `offset` of a shared read-only mapping of
    the whole file (`populate`: with MADV_POPULATE_READ first). `seconds` runs from just
    before it touches the mapping (the child says when) to its exit."""

    def __init__(self, path: Path, offset: int, size: int, *, populate: bool = False) -> None:
        advice = f"m.madvise({MADV_POPULATE_READ}, {offset // PAGE * PAGE}, {size})\n"
        code = (
            "import mmap, sys, time\n"
            f"f = open({str(path)!r}, 'rb')\n"
            "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
            "print(time.monotonic(), flush=True)\n"
            + (advice if populate else "")
            + f"sys.stdout.buffer.write(m[{offset}:{offset + size}])\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
        ended = time.monotonic()
        started, _, self.data = done.stdout.partition(b"\n")
        self.seconds = ended - float(started)
        self.returncode = done.returncode
        self.stderr = done.stderr.decode(errors="replace")


def mapped(path: Path, offset: int, size: int) -> bytes:
    """The bytes through a mapping; OSError naming the signal that ended the child."""
    read = MappedRead(path, offset, size)
    if read.returncode != 0:
        raise OSError(errno.EIO, f"child ended with {read.returncode}: {read.stderr[-300:]}")
    return read.data


def failure_of(reader: Callable[[], bytes]) -> tuple[OSError | None, float]:
    """What `reader` raised (None: it returned) and after how many seconds."""
    started = time.monotonic()
    try:
        reader()
    except OSError as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def failed_within(bound: float, results: dict[str, tuple[OSError | None, float]],
                  mapped_read: MappedRead) -> dict[str, float]:
    """Assert that each reader (`failure_of`'s results) got EIO, and the mapped page SIGBUS,
    within `bound` seconds of a failing service; their seconds, rounded, by name."""
    for name, (error, seconds) in results.items():
        assert error is not None, f"{name}: returned data from a failing service"
        assert error.errno == errno.EIO, f"{name}: {error}"
        assert seconds <= bound, f"{name}: EIO after {seconds:.1f} s"
    assert mapped_read.returncode == -signal.SIGBUS, mapped_read.stderr
    assert mapped_read.seconds <= bound, mapped_read.seconds
    return {name: round(seconds, 2) for name, (_, seconds) in results.items()} | {
        "mmap": round(mapped_read.seconds, 2)}


def recovered(reader: Callable[[], bytes], what: str) -> bytes:
    """What `reader` returns once it stops failing: a range that failed is given one attempt
    for a second, so the first read after a failure may still get EIO."""
    def attempt() -> bytes | None:
        try:
            return reader()
        except OSError:
            return None
    data = wait_until(attempt, timeout=10, interval=0.2, what=f"{what} working again")
    assert data is not None
    return data


# ---------------------------------------------------------------------------------------------
# The bytes


@pytest.mark.parametrize("name", ["a.mp4", "big.mp4"])
def test_sendfile_splice_and_copies_give_the_source_bytes(
    mount: VcfsMount, sources: dict[str, Source], name: str, tmp_path: Path,
) -> None:
    source = sources[name]
    path, out, data = mount.video(source.file_name), tmp_path / "copy", source.data
    drop_pages(path)
    assert sendfile(path, 12_345, source.size, out) == data[12_345:]
    assert sendfile(path, source.size - 100, 1000, out) == data[-100:]
    assert sendfile(path, source.size, 1000, out) == b""
    assert sendfile(path, source.size + MIB, 1000, out) == b""
    drop_pages(path)
    offset = source.size // 2
    assert splice(path, offset, READ) == data[offset : offset + READ]
    assert splice(path, source.size - 10, READ) == data[-10:]
    assert splice(path, source.size, READ) == b""
    drop_pages(path)
    assert copyfile(path, out) == data
    drop_pages(path)
    assert cp(path, out) == data
    fd = os.open(path, os.O_RDONLY)
    try:
        with open(out, "wb") as target:
            # Linux 5.19 and later refuse a copy between two file systems of different
            # types with EXDEV; cp and shutil then read and write (above).
            try:
                copied = os.copy_file_range(fd, target.fileno(), source.size)
            except OSError as exc:
                assert exc.errno == errno.EXDEV, exc
            else:
                assert copied > 0
                assert out.read_bytes() == data[:copied]
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["a.mp4", "big.mp4"])
def test_preadv_and_o_direct_give_the_source_bytes(
    mount: VcfsMount, sources: dict[str, Source], name: str,
) -> None:
    source = sources[name]
    path, data = mount.video(source.file_name), source.data
    drop_pages(path)
    # Several buffers, one across the first block's edge when there is one.
    start = min(MIB - 1000, source.size - 50_000)
    assert preadv(path, start, (100, 40_000, 7, 2_000)) == data[start : start + 42_107]
    assert preadv(path, 5_000, (777,) * 1024) == data[5_000 : 5_000 + 777 * 1024]
    assert preadv(path, source.size - 1_000, (600, 600, 600)) == data[-1_000:]
    assert preadv(path, source.size, (600, 600)) == b""
    # O_DIRECT: the kernel sends the asked range itself, in reads of at most a request each.
    assert read_direct(path, 0, source.size + PAGE) == data
    assert read_direct(path, 1_000, 3 * MIB) == data[1_000 : 1_000 + 3 * MIB]
    assert read_direct(path, source.size - 100, PAGE) == data[-100:]
    assert read_direct(path, source.size, PAGE) == b""
    assert read_direct(path, source.size + MIB, PAGE) == b""


def test_unaligned_reads_across_block_edges_give_the_source_bytes_cold_and_warm(
    vidcache_server: VidcacheServer, sources: dict[str, Source], tmp_path: Path,
) -> None:
    """O_DIRECT hands vcfs each read as it was asked: unaligned offsets and sizes inside a
    block, across a block's edge, from a part of a block on, to the file's end. vcfs answers
    each from the pieces of the blocks holding it, copied into libfuse's buffer: once as the
    blocks arrive (parts of blocks too), once from its cache. The counters count every byte."""
    source = sources["big.mp4"]
    data = source.data
    assert source.size > 4 * MIB
    reads = [
        (MIB + 12_345, 1_000),  # into a cold block: a tail of it is fetched
        (MIB - 1, 3),  # across block 0's edge into that tail
        (MIB + 5, 20_000),  # the tail's start, and the block's bytes before it
        (2 * MIB - 4_097, 8_193),
        (2 * MIB + MIB // 2 + 7, MIB - 14),  # from the middle of a block to the next one's
        (3 * MIB - 1, MIB),
        (7, 131_071),
        (source.size - 777, 4_096),  # clipped at the end
        (source.size - MIB - 3, MIB),
    ]
    with VcfsMount(vidcache_server.url, tmp_path / "mnt", "--cache-size", "64M") as mounted:
        path = mounted.video(source.file_name)
        before = mounted.stats()
        for _ in ("cold", "warm"):
            for offset, size in reads:
                assert read_direct(path, offset, size) == data[offset : offset + size], (
                    offset, size)
        after = mounted.stats()
    expected = 2 * sum(len(data[offset : offset + size]) for offset, size in reads)
    assert after["fuse"]["bytes_read"] - before["fuse"]["bytes_read"] == expected
    assert after["fuse"]["fuse_reads"] - before["fuse"]["fuse_reads"] >= 2 * len(reads)
    assert after["cache"]["hits"] > before["cache"]["hits"]
    assert after["fuse"]["errors"] == 0


@pytest.mark.parametrize("name", ["a.mp4", "big.mp4"])
def test_mmap_gives_the_source_bytes(
    mount: VcfsMount, sources: dict[str, Source], name: str,
) -> None:
    source = sources[name]
    path = mount.video(source.file_name)
    drop_pages(path)
    with open(path, "rb") as file:
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as shared:
            assert len(shared) == source.size
            assert shared[source.size - 100 :] == source.data[-100:]  # the last page first
            assert shared[:] == source.data
        drop_pages(path)
        with mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as own:
            assert own[:] == source.data


# ---------------------------------------------------------------------------------------------
# .vcfs/stats: generated at open, served with direct_io, size 0 in stat


def _libc_mmap(fd: int, flags: int) -> int:
    """mmap(2) of the first page of `fd`, read-only: its errno (0: it mapped, and is unmapped
    again untouched). Python's mmap refuses a file whose stat size is 0 before asking."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    address = libc.mmap(None, PAGE, mmap.PROT_READ, flags, fd, 0)
    if address == ctypes.c_void_p(-1).value:
        return ctypes.get_errno()
    libc.munmap(address, PAGE)
    return 0


def test_the_stats_file_through_sendfile_mmap_and_o_direct(
    mount: VcfsMount, tmp_path: Path,
) -> None:
    stats = mount.mountpoint / ".vcfs" / "stats"
    assert os.stat(stats).st_size == 0
    assert "fuse" in json.loads(read_direct(stats, 0, MIB))
    assert "fuse" in json.loads(preadv(stats, 0, (10, MIB)))
    # The kernel splices a FUSE file through its page cache, up to its stat size, direct_io or
    # not: nothing (Linux 6.18). Never a part of the document.
    for copied in (sendfile(stats, 0, MIB, tmp_path / "copy"), splice(stats, 0, READ),
                   copyfile(stats, tmp_path / "copy")):
        assert copied == b"" or "fuse" in json.loads(copied)
    assert "fuse" in json.loads(cp(stats, tmp_path / "copy"))  # cp reads
    with open(stats, "rb") as file:
        with pytest.raises(ValueError, match="cannot mmap an empty file"):
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        # A shared mapping of a direct_io file: ENODEV ("No such device").
        assert _libc_mmap(file.fileno(), mmap.MAP_SHARED) == errno.ENODEV


# ---------------------------------------------------------------------------------------------
# What they fetch


def test_willneed_and_mapped_pages_fetch_around_what_is_asked_not_the_file(
    tmp_path: Path, vidcache_server: VidcacheServer, sources: dict[str, Source],
) -> None:
    """posix_fadvise(WILLNEED) of a whole file, madvise(WILLNEED) of a whole mapping and a
    page touched in a mapping each start one kernel readahead window (1 MiB when vcfs could
    raise it, as root), so vcfs fetches the block or two under it, not the 22 MB video."""
    with VcfsMount(vidcache_server.url, tmp_path / "mnt") as mounted:  # cold, counters at 0
        source = sources["big.mp4"]
        path = mounted.video(source.file_name)
        os.stat(path)  # the lookup's first block, before counting
        mounted.wait_quiet(10)

        def fetched_by(action: Callable[[int, mmap.mmap], None]) -> int:
            before = mounted.stats()
            fd = os.open(path, os.O_RDONLY)
            try:
                with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapping:
                    action(fd, mapping)
            finally:
                os.close(fd)
            # Readahead answers no one: wait until its read has reached vcfs and been served.
            wait_until(lambda: mounted.stats()["fuse"]["fuse_reads"] > before["fuse"]["fuse_reads"],
                       timeout=10, what="the kernel's readahead reaching vcfs")
            mounted.wait_quiet(10)
            return int(mounted.stats()["remote"]["bytes_fetched"]
                       - before["remote"]["bytes_fetched"])

        def fadvise_rest(fd: int, _: mmap.mmap) -> None:
            os.posix_fadvise(fd, 4 * MIB, 0, os.POSIX_FADV_WILLNEED)  # from 4 MiB to the end

        def madvise_rest(_: int, mapping: mmap.mmap) -> None:
            mapping.madvise(mmap.MADV_WILLNEED, 10 * MIB, source.size - 10 * MIB)

        def touch_a_page(_: int, mapping: mmap.mmap) -> None:
            assert mapping[16 * MIB + 5] == source.data[16 * MIB + 5]

        figures = {action.__name__: fetched_by(action)
                   for action in (fadvise_rest, madvise_rest, touch_a_page)}
        assert all(0 < fetched <= 2 * MIB for fetched in figures.values()), figures
        mounted.wait_quiet(10)  # nothing else arrived late
        assert mounted.stats()["remote"]["bytes_fetched"] <= 7 * MIB, figures
        print(f"\nFIGURES fetched {figures}")


# ---------------------------------------------------------------------------------------------
# When the service fails


def test_every_reader_gets_eio_or_sigbus_within_the_deadline_then_the_bytes(
    faulty_mount: VcfsMount, link: FaultyLink, sources: dict[str, Source], tmp_path: Path,
) -> None:
    """The service refusing every range (503): each reader, side by side on a block of its own
    (cp and copyfile from the start, failing at block 1), fails within the deadline, with EIO
    or, through a mapping, SIGBUS; MADV_POPULATE_READ fails with EFAULT. Once the service
    answers, each reads the source's bytes."""
    source = sources["big.mp4"]
    path, data = faulty_mount.video(source.file_name), source.data

    def at(block: int) -> int:
        return block * MIB + 4096

    readers: dict[str, tuple[Callable[[], bytes], bytes]] = {
        "pread": (lambda: read_uncached(path, READ, at(2)), data[at(2) : at(2) + READ]),
        "sendfile": (lambda: sendfile(path, at(3), READ, tmp_path / "sendfile"),
                     data[at(3) : at(3) + READ]),
        "splice": (lambda: splice(path, at(4), READ), data[at(4) : at(4) + READ]),
        "preadv": (lambda: preadv(path, at(5), (100, READ - 100)), data[at(5) : at(5) + READ]),
        "o_direct": (lambda: read_direct(path, at(6), READ), data[at(6) : at(6) + READ]),
        "copyfile": (lambda: copyfile(path, tmp_path / "copyfile"), data),
        "cp": (lambda: cp(path, tmp_path / "cp"), data),
    }
    drop_pages(path)
    link.faults.enable(Refuse(status=503))
    try:
        with concurrent.futures.ThreadPoolExecutor(len(readers) + 2) as pool:
            mapping = pool.submit(MappedRead, path, at(8), READ)
            populate = pool.submit(MappedRead, path, at(10), READ, populate=True)
            futures = {name: pool.submit(failure_of, reader)
                       for name, (reader, _) in readers.items()}
            results = {name: future.result(timeout=60) for name, future in futures.items()}
            mapped_read, populated = mapping.result(timeout=60), populate.result(timeout=60)
    finally:
        link.faults.clear()
    figures = failed_within(EIO_BOUND, results, mapped_read)
    assert populated.returncode == 1, populated.stderr
    assert "[Errno 14] Bad address" in populated.stderr  # EFAULT
    assert populated.seconds <= EIO_BOUND, populated.seconds
    figures["populate"] = round(populated.seconds, 2)
    print(f"\nFIGURES EIO after, s: {figures}")
    faulty_mount.wait_quiet(EIO_BOUND + 10)
    readers["mmap"] = (lambda: mapped(path, at(8), READ), data[at(8) : at(8) + READ])
    for name, (reader, expected) in readers.items():
        assert recovered(reader, name) == expected, name


def test_a_stopped_service_gives_eio_and_sigbus_within_the_deadline(
    tmp_path: Path, videos: dict[str, Path], media_url: str,
) -> None:
    """The service stopped (connections refused) after a video's lookup: sendfile, splice,
    copyfile and O_DIRECT, side by side, get EIO, a mapped page SIGBUS, within the deadline;
    once the service is started again, the same calls read the source's bytes."""
    timeout = 1.0
    bound = timeout + timeout / 3 + 3.0
    with VidcacheServer(tmp_path / "own") as server:
        source = ingest(server.url, media_url, videos, ("a.mp4",), bucket="own")["a.mp4"]
        # No first block with the lookup: the video's bytes are not in the mount yet.
        with VcfsMount(server.url, tmp_path / "mnt", "--timeout", str(timeout),
                       "--no-first-block") as mounted:
            path, data = mounted.video(source.file_name), source.data
            assert os.stat(path).st_size == source.size
            readers: dict[str, Callable[[], bytes]] = {
                "sendfile": lambda: sendfile(path, 0, source.size, tmp_path / "sendfile"),
                "splice": lambda: splice(path, 0, source.size),
                "copyfile": lambda: copyfile(path, tmp_path / "copyfile"),
                "o_direct": lambda: read_direct(path, 0, source.size),
            }
            server.stop()
            with concurrent.futures.ThreadPoolExecutor(len(readers) + 1) as pool:
                mapping = pool.submit(MappedRead, path, 0, source.size)
                futures = {name: pool.submit(failure_of, reader)
                           for name, reader in readers.items()}
                results = {name: future.result(timeout=60) for name, future in futures.items()}
                mapped_read = mapping.result(timeout=60)
            figures = failed_within(bound, results, mapped_read)
            print(f"\nFIGURES EIO after, s: {figures}")
            server.start()
            readers["mmap"] = lambda: mapped(path, 0, source.size)
            for name, reader in readers.items():
                drop_pages(path)
                assert recovered(reader, name) == data, name


def test_a_populated_mapping_of_a_failing_service_never_gives_other_bytes(
    faulty_mount: VcfsMount, link: FaultyLink, sources: dict[str, Source],
) -> None:
    """mmap(MAP_POPULATE) reads every page in before it returns. On Linux 6.18 the kernel asks
    again for a page whose read failed for as long as it fails, a FUSE read each time: vcfs
    gives each one attempt (the range failed less than 1 s before), at most one per
    `failure_pause` (0.25 s; it was ~500 a second against a service refusing at once). The
    call returns once the service answers, with the source's bytes; the mount keeps serving
    meanwhile, and its log stays a few lines. (A kernel that gives up instead leaves the page
    to SIGBUS.)"""
    source = sources["big.mp4"]
    path = faulty_mount.video(source.file_name)
    offset = 14 * MIB
    code = (
        "import mmap, os, sys\n"
        f"fd = os.open({str(path)!r}, os.O_RDONLY)\n"
        f"m = mmap.mmap(fd, {READ}, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,\n"
        f"              prot=mmap.PROT_READ, offset={offset})\n"
        "sys.stdout.buffer.write(m[:])\n"
    )
    drop_pages(path)
    errors = faulty_mount.stats()["fuse"]["errors"]
    paced = faulty_mount.stats()["remote"]["paced_tries"]  # the module's earlier tests' too
    link.faults.enable(Refuse(status=503))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        # Past one read's deadline of failures, into the re-asks (the mount answering its
        # stats file meanwhile).
        wait_until(lambda: faulty_mount.stats()["remote"]["paced_tries"] > paced
                   or child.poll() is not None, timeout=EIO_BOUND + 10,
                   what="the populating mapping's reads failing again")
        began, asked = time.monotonic(), faulty_mount.stats()["remote"]["http_requests"]
        wait_until(lambda: faulty_mount.stats()["remote"]["paced_tries"] >= paced + 9
                   or child.poll() is not None, timeout=30,
                   what="the populating mapping's reads re-asked")
        span = time.monotonic() - began
        requests = faulty_mount.stats()["remote"]["http_requests"] - asked
        still_waiting = child.poll() is None
    finally:
        link.faults.clear()
    try:
        out, err = child.communicate(timeout=EIO_BOUND + 10)
    finally:
        child.kill()
    if child.returncode == 0:
        assert out == source.data[offset : offset + READ]
    else:
        assert child.returncode == -signal.SIGBUS, err
    assert faulty_mount.log().count("failed (EIO)") <= 12
    # A slower machine only lowers the rate; the pause is a floor between attempts.
    assert requests <= span / RemoteConfig().failure_pause + 2, (requests, span)
    print(f"\nFIGURES populate: waited for the service: {still_waiting}, "
          f"failed reads: {faulty_mount.stats()['fuse']['errors'] - errors}, "
          f"{requests} requests in {span:.2f} s")
