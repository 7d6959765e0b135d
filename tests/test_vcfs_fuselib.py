"""vcfs answers reads through libfuse's read_buf, in a buffer made once the bytes are in.

libfuse's plain read allocates a buffer of the read's size before asking and holds it while
the read waits: with 48 reads waiting on the service, 48 MiB besides the cache (measured: peak
RSS 170-178 MB under 60 readers with a 36 MiB cache, 119-152 MB through read_buf). Every
mount test reads through it; these check what libfuse is handed.
"""

from __future__ import annotations

import ctypes
import errno
from types import SimpleNamespace

import pytest

from vcfs.blocks import BlockCache
from vcfs.fs import VcfsOperations, _StatsHandle
from vcfs.fuselib import FuseOSError, _BufVec, reply_buffer

_libc = ctypes.CDLL(None)
_libc.free.argtypes = (ctypes.c_void_p,)


def _answer(address: int) -> tuple[_BufVec, bytes]:
    """The `struct fuse_bufvec` at `address` and the bytes it holds, freed as libfuse does."""
    vector = _BufVec.from_buffer_copy(_BufVec.from_address(address))
    data = ctypes.string_at(vector.buf.mem, vector.buf.size)
    _libc.free(vector.buf.mem)
    _libc.free(address)
    return vector, data


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 4096])
def test_a_reply_buffer_is_one_memory_buffer_holding_a_copy(data: bytes) -> None:
    vector, held = _answer(reply_buffer(data))
    assert (vector.count, vector.idx, vector.off) == (1, 0, 0)
    assert (vector.buf.size, vector.buf.flags, vector.buf.fd, vector.buf.pos) == (len(data), 0,
                                                                                  -1, 0)
    assert held == data


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
