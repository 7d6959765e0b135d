"""Writing a download to a file so that a failed or interrupted one leaves nothing under its
name: the bytes go to a temporary file beside it, which takes the name only once whole and on
disk. `VidCacheClient.download_to_file` and `vidcache get` both write this way."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_whole(dest: str, write: Callable[[BinaryIO], int], *, replace: bool = True) -> int:
    """`write(out)` into a temporary file beside `dest`, then the file renamed to `dest`;
    what `write` returned. On any failure (an exception from `write` included) `dest` is as
    it was and the temporary file is removed. As writing to `dest` would, a symlink's target
    is written (the link stays), a replaced file keeps its permission bits, and a FIFO or a
    device (/dev/null) is written into directly, whatever `replace` says. With `replace` False
    an existing file `dest`, even one made while `write` ran, is left alone: FileExistsError."""
    try:
        dest_mode: int | None = os.stat(dest).st_mode
    except FileNotFoundError:
        dest_mode = None
    if dest_mode is not None and not stat.S_ISREG(dest_mode):
        # Nothing to replace atomically, and replacing it would destroy it (as root,
        # /dev/null itself). A directory fails here, before `write` runs.
        with open(dest, "wb") as out:
            return write(out)
    if dest_mode is None and os.path.basename(dest) in ("", ".", ".."):
        # "new/": a directory's name, which realpath would make a file's ("new")
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), dest)
    dest_path = Path(os.path.realpath(dest))
    temp_path = dest_path.with_name(f".{dest_path.name}.{secrets.token_hex(4)}.part")
    # Made inside the `try` that removes it, so that a Ctrl-C (KeyboardInterrupt) raised as
    # open() returns, before anything holds the file, leaves nothing behind. Only an open()
    # that failed made nothing to remove (O_EXCL: a file of that name is someone else's).
    made = True
    try:
        with contextlib.ExitStack() as opened:
            try:
                # "x": O_EXCL, never write through someone else's file; mode 0o666, which
                # leaves the umask to decide, as for any ordinary new file.
                out = opened.enter_context(open(temp_path, "xb"))
            except OSError:
                made = False
                raise
            if dest_mode is not None:
                os.fchmod(out.fileno(), stat.S_IMODE(dest_mode))  # a private file stays so
            written = write(out)
            # Durable before it takes the name, so a crash cannot leave an empty `dest`.
            os.fsync(out.fileno())
        if replace:
            os.replace(temp_path, dest_path)
        else:
            _link_new(temp_path, dest_path)
    finally:
        if made:
            temp_path.unlink(missing_ok=True)  # linked, or not to be kept
    return written


def _link_new(temp: Path, dest: Path) -> None:
    """`temp` given the name `dest`, which must not exist (FileExistsError)."""
    try:
        os.link(temp, dest)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # a file system without hard links (FAT; ENOSYS: a FUSE one on an older kernel):
        # checked once more, then renamed
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest)) from exc
        os.rename(temp, dest)
