"""mfusepy, loaded on libfuse3.

mfusepy looks for `libfuse.so.2` first and takes libfuse3 only when libfuse2 is absent, but
libfuse2 caps every read at 128 KiB while libfuse3 negotiates 1 MiB requests (with the mount's
kernel readahead raised, about 1.5x the throughput). So unless the user chose a library with
mfusepy's own FUSE_LIBRARY_PATH, point it at libfuse3 before mfusepy loads. Import mfusepy's
names from here, never from mfusepy directly, or the choice depends on import order.

Importing raises OSError when no libfuse is installed at all.
"""

import os
from ctypes.util import find_library

if not os.environ.get("FUSE_LIBRARY_PATH"):
    _libfuse3 = find_library("fuse3")
    if _libfuse3:
        os.environ["FUSE_LIBRARY_PATH"] = _libfuse3

from mfusepy import FUSE, FuseOSError, Operations, fuse_version_major

__all__ = ["FUSE", "FuseOSError", "Operations", "fuse_version_major"]
