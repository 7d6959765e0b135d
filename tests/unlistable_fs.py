"""A FUSE file system holding one directory, /dir, whose attributes answer but whose listing
fails (EIO): a directory `ls` cannot read, as on a failing disk or network file system. Run
as `python -m tests.unlistable_fs MOUNTPOINT`; unmount to stop it."""

from __future__ import annotations

import errno
import stat
import sys
from typing import Any

import mfusepy


class Unlistable(mfusepy.Operations):  # type: ignore[misc]  # mfusepy is untyped
    use_ns = True  # (no times to give; mfusepy warns without it)

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        if path not in ("/", "/dir"):
            raise mfusepy.FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}

    def readdir(self, path: str, fh: Any) -> list[str]:
        if path == "/dir":
            raise mfusepy.FuseOSError(errno.EIO)
        return [".", "..", "dir"]


def main() -> None:
    mfusepy.FUSE(Unlistable(), sys.argv[1], foreground=True, ro=True)


if __name__ == "__main__":
    main()
