"""vcfs answers reads through libfuse's read_buf, in a buffer made once the bytes are in.

libfuse's plain read allocates a buffer of the read's size before asking and holds it while
the read waits: with 48 reads waiting on the service, 48 MiB besides the cache (measured: peak
RSS 170-178 MB under 60 readers with a 36 MiB cache, 119-152 MB through read_buf). Every
mount test reads through it; these check what libfuse is handed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tracemalloc
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from vcfs import fuselib
from vcfs.blocks import BlockCache
from vcfs.fs import VcfsOperations, _StatsHandle, _VideoHandle
from vcfs.fuselib import FuseOSError, _BufVec, reply_buffer
from vcfs.readahead import Readahead
from vcfs.remote import VideoMeta

H = "ab" * 32

_libc = ctypes.CDLL(None)
_libc.free.argtypes = (ctypes.c_void_p,)


def _answer(address: int) -> tuple[_BufVec, bytes]:
    """The `struct fuse_bufvec` at `address` and the bytes it holds, freed as libfuse does."""
    vector = _BufVec.from_buffer_copy(_BufVec.from_address(address))
    data = ctypes.string_at(vector.buf.mem, vector.buf.size)
    _libc.free(vector.buf.mem)
    _libc.free(address)
    return vector, data


BLOCK = bytes(range(256)) * 4096


@pytest.mark.parametrize("pieces", [
    [], [(b"", 0, 0)], [(b"x", 0, 1)], [(BLOCK, 0, len(BLOCK))], [(BLOCK, 1000, 132_072)],
    [(BLOCK, len(BLOCK) - 777, len(BLOCK)), (b"x", 0, 0), (BLOCK[::-1], 0, 4097),
     (b"abc", 1, 2)],
])
def test_a_reply_buffer_is_one_memory_buffer_holding_the_pieces_one_after_the_other(
    pieces: list[tuple[bytes, int, int]],
) -> None:
    vector, held = _answer(reply_buffer(pieces))
    expected = b"".join(block[start:stop] for block, start, stop in pieces)
    assert (vector.count, vector.idx, vector.off) == (1, 0, 0)
    assert (vector.buf.size, vector.buf.flags, vector.buf.fd, vector.buf.pos) == (
        len(expected), 0, -1, 0)
    assert held == expected


@pytest.mark.parametrize("bounds", [(-1, 3), (2, 1), (0, 4), (4, 4)])
def test_a_piece_with_bounds_outside_its_bytes_is_refused_before_any_copy(
    bounds: tuple[int, int],
) -> None:
    with pytest.raises(ValueError, match="of a 3-byte piece"):
        reply_buffer([(b"abcdefgh", 0, 8), (b"abc", *bounds)])


def test_a_piece_of_something_else_than_a_bytes_is_refused_before_any_copy() -> None:
    with pytest.raises(TypeError, match="a piece of a bytearray, not of a bytes"):
        reply_buffer([(b"abc", 0, 3), (bytearray(b"abc"), 0, 3)])  # type: ignore[list-item]


def test_read_buf_answers_with_the_bytes_of_read_or_raises_its_error() -> None:
    operations = VcfsOperations(None, BlockCache(lambda h, s, e: b""),  # type: ignore[arg-type]
                                mountpoint="/nonexistent")
    try:
        operations._handles[7] = _StatsHandle(b'{"cache": {}}\n')
        answer = ctypes.c_void_p()
        pointer = ctypes.pointer(answer)
        assert operations.read_buf("/.vcfs/stats", pointer, 4096, 2, SimpleNamespace(fh=7)) == 0
        assert answer.value is not None
        assert _answer(answer.value)[1] == b'cache": {}}\n'

        unanswered = ctypes.c_void_p()
        with pytest.raises(FuseOSError) as caught:
            operations.read_buf("/.vcfs/stats", ctypes.pointer(unanswered), 4096, 0,
                                SimpleNamespace(fh=8))
        assert caught.value.errno == errno.EBADF
        assert unanswered.value is None  # libfuse frees nothing and answers the error
    finally:
        operations.close()


MIB = 1 << 20


@pytest.fixture
def video() -> Iterator[tuple[VcfsOperations, bytes, list[tuple[str, int, int]]]]:
    """Operations with video H (3 MiB and a bit, 1 MiB blocks) open as handle 1; the fetches."""
    data = os.urandom(3 * MIB + 123)
    calls: list[tuple[str, int, int]] = []

    def fetch(content_hash: str, start: int, end: int) -> bytes:
        calls.append((content_hash, start, end))
        return data[start:end]

    cache = BlockCache(fetch)
    operations = VcfsOperations(None, cache, mountpoint="/nonexistent")  # type: ignore[arg-type]
    meta = VideoMeta(H, len(data), 0, f"{H}.mp4")
    operations._handles[1] = _VideoHandle(meta, Readahead(
        cache, H, len(data), executor=operations._executor, block_size=MIB, max_window=0))
    try:
        yield operations, data, calls
    finally:
        operations.close()


def _read_buf(operations: VcfsOperations, size: int, offset: int) -> bytes:
    answer = ctypes.c_void_p()
    assert operations.read_buf(f"/by-hash/{H}.mp4", ctypes.pointer(answer), size, offset,
                               SimpleNamespace(fh=1)) == 0
    assert answer.value is not None
    return _answer(answer.value)[1]


def test_read_buf_of_a_video_gives_its_bytes_across_blocks_and_clipped_at_its_end(
    video: tuple[VcfsOperations, bytes, list[tuple[str, int, int]]],
) -> None:
    operations, data, calls = video
    reads = [(MIB // 2 + 1, MIB - 3), (3, 5), (MIB, MIB), (2 * MIB - 1, 2), (0, 3 * MIB),
             (len(data) - 1000, 131_072), (len(data), 4096), (len(data) + MIB, 4096)]
    for offset, size in reads:
        assert _read_buf(operations, size, offset) == data[offset : offset + size]
        fi = SimpleNamespace(fh=1)
        assert operations.read(f"/by-hash/{H}.mp4", size, offset, fi) == data[offset:][:size]
    assert calls == [(H, 0, 2 * MIB), (H, 2 * MIB, 3 * MIB), (H, 3 * MIB, len(data))]
    counted = operations.counters.snapshot()
    assert counted["fuse_reads"] == 2 * len(reads)
    assert counted["bytes_read"] == 2 * sum(len(data[o : o + s]) for o, s in reads)
    assert counted["largest_read"] == 3 * MIB


@pytest.mark.parametrize(("offset", "size"), [(1000, 131_072), (MIB // 2, MIB)])
def test_read_buf_copies_cached_blocks_into_its_answer_without_a_bytes_of_the_read(
    video: tuple[VcfsOperations, bytes, list[tuple[str, int, int]]], offset: int, size: int,
) -> None:
    """A read that is part of a block, or spans two, was a `bytes` made of the blocks, then
    copied again into the answer: now the blocks are copied into the answer (made with the
    C library's malloc, which tracemalloc does not see) and nothing of the read's size is
    made in Python."""
    operations, data, _ = video
    operations.cache.read(H, len(data), 0, 2 * MIB)  # warm
    answer = ctypes.c_void_p()
    tracemalloc.start()
    try:
        operations.read_buf(f"/by-hash/{H}.mp4", ctypes.pointer(answer), size, offset,
                            SimpleNamespace(fh=1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.value is not None
    assert _answer(answer.value)[1] == data[offset : offset + size]
    assert peak < size // 4, peak


def test_read_buf_without_memory_for_its_answer_is_enomem(
    video: tuple[VcfsOperations, bytes, list[tuple[str, int, int]]],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    operations, _, _ = video
    monkeypatch.setattr(fuselib, "_malloc", lambda size: None)
    unanswered = ctypes.c_void_p()
    with pytest.raises(FuseOSError) as caught:
        operations.read_buf(f"/by-hash/{H}.mp4", ctypes.pointer(unanswered), 4096, 10,
                            SimpleNamespace(fh=1))
    assert caught.value.errno == errno.ENOMEM
    assert unanswered.value is None
    assert (f"read('/by-hash/{H}.mp4', 4096, 10) failed (ENOMEM): no memory for the answer "
            "to a read of 4096 bytes") in caplog.text
    assert operations.counters.get("errors") == 1  # like every operation's ENOMEM


_FUSE_LOG_ERR = 3


def test_libfuses_refused_thread_starts_go_to_vcfs_and_its_other_messages_to_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """libfuse writes a line at each refused start, thousands under a limit on threads (see
    test_vcfs_threads): vcfs takes those, only while serving, and leaves libfuse the rest."""
    fuse_log = fuselib._libfuse.fuse_log
    refusals: list[str] = []
    with fuselib.libfuse_thread_refusals(refusals.append):
        fuse_log(_FUSE_LOG_ERR, b"fuse: error creating thread: %s\n", b"Resource unavailable")
        fuse_log(_FUSE_LOG_ERR, b"fuse: bad mount point `%s': %s\n", b"/x", b"No such file")
    fuse_log(_FUSE_LOG_ERR, b"fuse: error creating thread: %s\n", b"after")
    assert refusals == ["Resource unavailable"]
    assert capfd.readouterr().err == ("fuse: bad mount point `/x': No such file\n"
                                      "fuse: error creating thread: after\n")


def test_libfuses_refused_thread_starts_make_one_line_then_one_counting_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    operations = VcfsOperations(None, BlockCache(lambda h, s, e: b""),  # type: ignore[arg-type]
                                mountpoint="/nonexistent")
    try:
        for _ in range(5):
            operations.libfuse_thread_refused("Resource temporarily unavailable")
    finally:
        operations.close()
    lines = [record.getMessage() for record in caplog.records
             if "libfuse could not start another FUSE thread" in record.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("libfuse could not start another FUSE thread (Resource "
                               "temporarily unavailable): a limit on threads"), lines
    assert lines[1].startswith("libfuse could not start another FUSE thread, 4 times in the "
                               "last "), lines
