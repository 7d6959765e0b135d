"""mfusepy, loaded on libfuse3.

mfusepy looks for `libfuse.so.2` first and takes libfuse3 only when libfuse2 is absent, but
libfuse2 caps every read at 128 KiB while libfuse3 negotiates 1 MiB requests (with the mount's
kernel readahead raised, about 1.5x the throughput). So unless the user chose a library with
mfusepy's own FUSE_LIBRARY_PATH, point it at libfuse3 before mfusepy loads. Import mfusepy's
names from here, never from mfusepy directly, or the choice depends on import order.

Importing raises OSError when no libfuse is installed at all.
"""

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from ctypes.util import find_library

from vcfs.blocks import Piece, bytes_address

if not os.environ.get("FUSE_LIBRARY_PATH"):
    # The dynamic loader first: find_library runs `ldconfig -p` in a child process, which a
    # limit on processes (pids.max, ulimit -u) refuses, and then answers None, as if no
    # libfuse3 were installed.
    try:
        ctypes.CDLL("libfuse3.so.3")
        os.environ["FUSE_LIBRARY_PATH"] = "libfuse3.so.3"
    except OSError:
        _libfuse3 = find_library("fuse3")
        if _libfuse3:
            os.environ["FUSE_LIBRARY_PATH"] = _libfuse3

import mfusepy
from mfusepy import FUSE, FuseOSError, Operations, fuse_version_major, fuse_version_minor

__all__ = ["FUSE", "FuseOSError", "Operations", "current_fuse", "fuse_version_major",
           "fuse_version_minor", "libfuse_thread_refusals", "reply_buffer", "session_exited"]

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


# libfuse's log function (3.7 and later): `void (*)(enum fuse_log_level, const char *fmt,
# va_list)`. A va_list parameter is a pointer (x86-64: an array that decays; aarch64: a
# composite past 16 bytes, passed by reference): passed on untouched to vsnprintf.
_LogFunction = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_set_log_function = getattr(_libfuse, "fuse_set_log_func", None)
if _set_log_function is not None:
    _set_log_function.argtypes = (ctypes.c_void_p,)
    _set_log_function.restype = None
_vsnprintf = _libc.vsnprintf
_vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
_vsnprintf.restype = ctypes.c_int
# fuse_start_thread's format, 3.0 to 3.17
_THREAD_REFUSED_PREFIX = b"fuse: error creating thread: "
_THREAD_REFUSED = _THREAD_REFUSED_PREFIX + b"%s\n"
_LOG_LINE_MAX = 4096


@contextlib.contextmanager
def libfuse_thread_refusals(refused: Callable[[str], None]) -> Iterator[None]:
    """While inside: each time libfuse cannot start a worker thread, `refused(why)` (e.g.
    "Resource temporarily unavailable") instead of its line on stderr. Under a limit on
    threads libfuse tries again at every request that finds all its workers busy, a line each
    time (hundreds a minute under load); the request is served meanwhile by the worker that
    received it. Its other messages go to stderr as before. libfuse 2 has no log function:
    there, nothing changes. `refused` runs on a libfuse thread that holds the loop's lock
    (every worker waits for it before and after each request): it must be quick and must not
    wait for a FUSE request."""
    if _set_log_function is None:
        yield
        return

    def log(level: int, form: bytes, arguments: int) -> None:
        line = ctypes.create_string_buffer(_LOG_LINE_MAX)
        _vsnprintf(line, _LOG_LINE_MAX, form, arguments)
        if form == _THREAD_REFUSED:
            refused(line.value.removeprefix(_THREAD_REFUSED_PREFIX).decode(
                errors="replace").rstrip("\n"))
        else:
            os.write(2, line.value)

    function = _LogFunction(log)  # referenced until libfuse is told to forget it
    _set_log_function(ctypes.cast(function, ctypes.c_void_p))
    try:
        yield
    finally:
        _set_log_function(None)  # libfuse's own again
