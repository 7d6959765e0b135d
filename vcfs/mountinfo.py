"""Lines of /proc/self/mountinfo (proc(5)), for its two readers: `vcfs mount`'s look at its
mount point (vcfs.cli) and the cgroup lookup of vcfs.memory."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MountInfo:
    """One mount, its paths and type unescaped."""

    root: str  # the part of its file system mounted here (a cgroup hierarchy's subtree)
    mount_point: str
    fstype: str
    super_options: str  # comma-separated, as written


def mounts(text: str) -> Iterator[MountInfo]:
    """The mounts of a mountinfo file's `text`, in its order (the last of a mount point is
    the topmost); a line without the fields is skipped."""
    for line in text.splitlines():
        fields, _, tail = line.partition(" - ")
        mount_fields, tail_fields = fields.split(" "), tail.split(" ")
        if len(mount_fields) < 5 or len(tail_fields) < 3:
            continue
        yield MountInfo(root=_unescape(mount_fields[3]), mount_point=_unescape(mount_fields[4]),
                        fstype=_unescape(tail_fields[0]), super_options=tail_fields[2])


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)
