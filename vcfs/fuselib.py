"""mfusepy, loaded on libfuse3.

mfusepy looks for `libfuse.so.2` first and takes libfuse3 only when libfuse2 is absent, but
libfuse2 caps every read at 128 KiB while libfuse3 negotiates 1 MiB requests (with the mount's
kernel readahead raised, about 1.5x the throughput). So unless the user chose a library with
mfusepy's own FUSE_LIBRARY_PATH, point it at libfuse3 before mfusepy loads. Import mfusepy's
names from here, never from mfusepy directly, or the choice depends on import order.

Importing raises OSError when no libfuse is installed at all.
"""

import ctypes
import os
from collections.abc import Sequence
from ctypes.util import find_library

from vcfs.blocks import Piece, bytes_address

if not os.environ.get("FUSE_LIBRARY_PATH"):
    _libfuse3 = find_library("fuse3")
    if _libfuse3:
        os.environ["FUSE_LIBRARY_PATH"] = _libfuse3

import mfusepy
from mfusepy import FUSE, FuseOSError, Operations, fuse_version_major, fuse_version_minor

__all__ = ["FUSE", "FuseOSError", "Operations", "current_fuse", "fuse_version_major",
           "fuse_version_minor", "reply_buffer", "session_exited"]

# Two libfuse calls mfusepy does not wrap, on its handle of the library (its own fuse_exit()
# reaches libfuse the same way). Both exist in libfuse 2 and 3.
_libfuse = mfusepy._libfuse
_libfuse.fuse_get_session.argtypes = (ctypes.c_void_p,)
_libfuse.fuse_get_session.restype = ctypes.c_void_p
_libfuse.fuse_session_exited.argtypes = (ctypes.c_void_p,)
_libfuse.fuse_session_exited.restype = ctypes.c_int


def current_fuse() -> int | None:
    """Inside a FUSE operation (`init` included): the `struct fuse *` serving it."""
    fuse: int | None = _libfuse.fuse_get_context().contents.fuse
    return fuse


def session_exited(fuse: int) -> bool:
    """Whether libfuse's loop of `fuse` has been told to end (a signal, an unmount). `fuse`
    must still exist: call this only until the filesystem's `destroy` has run."""
    return bool(_libfuse.fuse_session_exited(_libfuse.fuse_get_session(fuse)))


class _Buf(ctypes.Structure):
    """libfuse's `struct fuse_buf`."""

    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _BufVec(ctypes.Structure):
    """libfuse's `struct fuse_bufvec` with its one buffer (`buf[1]`, in place: mfusepy's
    `fuse_bufvec` has a pointer there instead)."""

    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _Buf)]


# libfuse frees a read_buf's answer with the C library's free(): it must come from its malloc.
_libc = ctypes.CDLL(None)
_malloc = _libc.malloc
_malloc.argtypes = (ctypes.c_size_t,)
_malloc.restype = ctypes.c_void_p
_free = _libc.free
_free.argtypes = (ctypes.c_void_p,)
_free.restype = None


def reply_buffer(pieces: Sequence[Piece]) -> int:
    """The address of a new `struct fuse_bufvec` holding the bytes the pieces take, one after
    the other, for libfuse's read_buf, which sends it and frees both it and its memory. Each
    piece is copied from its `bytes` straight into that memory (the copy runs without the
    GIL); `pieces` holds the objects, so their memory stays while it is copied. Raises
    MemoryError; TypeError for a piece of another object than a `bytes` (its memory may move
    or be mutable), ValueError for bounds outside its `bytes`, both before any copy."""
    size = 0
    for block, start, stop in pieces:
        if not isinstance(block, bytes):
            raise TypeError(f"a piece of a {type(block).__name__}, not of a bytes")
        if not 0 <= start <= stop <= len(block):
            raise ValueError(f"bytes [{start}, {stop}) of a {len(block)}-byte piece")
        size += stop - start
    vector, memory = _malloc(ctypes.sizeof(_BufVec)), _malloc(max(size, 1))
    if not vector or not memory:
        _free(vector)
        _free(memory)
        raise MemoryError(f"no memory for the answer to a read of {size} bytes")
    at = memory
    for block, start, stop in pieces:
        ctypes.memmove(at, bytes_address(block) + start, stop - start)
        at += stop - start
    answer = _BufVec.from_address(vector)
    answer.count, answer.idx, answer.off = 1, 0, 0
    answer.buf.size, answer.buf.flags, answer.buf.mem = size, 0, memory
    answer.buf.fd, answer.buf.pos = -1, 0
    return int(vector)
