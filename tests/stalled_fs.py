"""A FUSE file system whose root answers its first `stat` only once released: a directory on
a stalled network file system, as a program walking it meets one. Run as
`python -m tests.stalled_fs MOUNTPOINT GATE`, GATE a FIFO: the first `stat` of the root opens
it for reading, which waits until the test opens it for writing, and reads it to its end, when
the test closes it; from then on the root is an empty directory. Unmount to stop it."""

from __future__ import annotations

import errno
import stat
import sys
import threading
from typing import Any

import mfusepy


class Stalled(mfusepy.Operations):  # type: ignore[misc]  # mfusepy is untyped
    def __init__(self, gate: str) -> None:
        self._gate = gate
        self._released = threading.Event()

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOENT)
        if not self._released.is_set():
            with open(self._gate, "rb") as gate:
                gate.read()
            self._released.set()
        return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", ".."]


def main() -> None:
    mountpoint, gate = sys.argv[1:]
    mfusepy.FUSE(Stalled(gate), mountpoint, foreground=True, ro=True)


if __name__ == "__main__":
    main()
