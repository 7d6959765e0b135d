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
from ctypes.util import find_library

if not os.environ.get("FUSE_LIBRARY_PATH"):
    _libfuse3 = find_library("fuse3")
    if _libfuse3:
        os.environ["FUSE_LIBRARY_PATH"] = _libfuse3

import mfusepy
from mfusepy import FUSE, FuseOSError, Operations, fuse_version_major, fuse_version_minor

__all__ = ["FUSE", "FuseOSError", "Operations", "current_fuse", "fuse_version_major",
           "fuse_version_minor", "session_exited"]

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
