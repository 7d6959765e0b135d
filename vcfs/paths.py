"""The vcfs namespace: which FUSE paths exist, and what each one names.

Pure functions and frozen dataclasses, no I/O. The mount looks like::

    /                               root directory
    /by-hash/                       one file per stored video
    /by-hash/<hash>.<ext>           a video: 64 lowercase hex BLAKE3 hash + its extension
    /.vcfs/                         hidden control directory
    /.vcfs/stats                    JSON counters

`parse_path` maps a path to a `VcfsPath` or to None. None means ENOENT *without asking the
service*: a name that cannot be a video (wrong length, uppercase hex, no or odd extension) is
refused here, so tab completion and stray `stat` calls in the mount never become HTTP requests.
Whether the extension is the *right* one for that hash needs the video's metadata, which the
caller has; compare the looked-up name with `video_name(hash, meta["file_path"])`.

Inodes are derived from the content hash (`video_inode`), so a video keeps its inode across
lookups, opens and even remounts, without any table to keep; the fixed entries use small
inodes that the hash-derived ones can never take.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

BY_HASH_DIR = "by-hash"
CONTROL_DIR = ".vcfs"
STATS_FILE = "stats"
# Extension for a video whose stored file name has no usable one: "some bytes", honestly.
FALLBACK_EXT = "bin"

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_EXT_RE = re.compile(r"[0-9a-z]{1,8}")


class PathKind(enum.Enum):
    """What a parsed path names."""

    ROOT = "root"
    BY_HASH = "by-hash"
    VIDEO = "video"
    CONTROL = "control"
    STATS = "stats"

    @property
    def is_dir(self) -> bool:
        return self in (PathKind.ROOT, PathKind.BY_HASH, PathKind.CONTROL)


@dataclass(frozen=True, slots=True)
class VideoName:
    """A syntactically valid `<hash>.<ext>` file name."""

    content_hash: str
    ext: str

    def __str__(self) -> str:
        return f"{self.content_hash}.{self.ext}"


@dataclass(frozen=True, slots=True)
class VcfsPath:
    """A path that exists in the vcfs namespace (for VIDEO: one that may exist)."""

    kind: PathKind
    video: VideoName | None = None  # set exactly when kind is VIDEO

    @property
    def is_dir(self) -> bool:
        return self.kind.is_dir

    @property
    def inode(self) -> int:
        if self.video is not None:
            return video_inode(self.video.content_hash)
        return _FIXED_INODES[self.kind]


# Small fixed inodes; root is 1 as FUSE expects. Video inodes start above _VIDEO_INODE_BASE.
_FIXED_INODES: dict[PathKind, int] = {
    PathKind.ROOT: 1,
    PathKind.BY_HASH: 2,
    PathKind.CONTROL: 3,
    PathKind.STATS: 4,
}
_VIDEO_INODE_BASE = 16

_FIXED_PATHS: dict[str, VcfsPath] = {
    "/": VcfsPath(PathKind.ROOT),
    f"/{BY_HASH_DIR}": VcfsPath(PathKind.BY_HASH),
    f"/{CONTROL_DIR}": VcfsPath(PathKind.CONTROL),
    f"/{CONTROL_DIR}/{STATS_FILE}": VcfsPath(PathKind.STATS),
}


def is_content_hash(text: str) -> bool:
    """True for a lowercase 64-hex BLAKE3 hash."""
    return _HASH_RE.fullmatch(text) is not None


def is_valid_ext(text: str) -> bool:
    """True for an extension vcfs can show: 1-8 lowercase letters or digits, no dot."""
    return _EXT_RE.fullmatch(text) is not None


def parse_video_name(name: str) -> VideoName | None:
    """Split `<64 lowercase hex>.<ext>` into its parts; None for any other name."""
    content_hash, dot, ext = name.partition(".")
    if not dot or not is_content_hash(content_hash) or not is_valid_ext(ext):
        return None
    return VideoName(content_hash, ext)


def parse_path(path: str) -> VcfsPath | None:
    """What the FUSE path names, or None if it cannot exist (answer ENOENT, ask no one).

    Paths are taken exactly as FUSE passes them: absolute, no trailing slash, no `.`/`..`.
    """
    fixed = _FIXED_PATHS.get(path)
    if fixed is not None:
        return fixed
    prefix = f"/{BY_HASH_DIR}/"
    if path.startswith(prefix):
        video = parse_video_name(path[len(prefix):])
        if video is not None:
            return VcfsPath(PathKind.VIDEO, video)
    return None


def ext_for(file_path: str | None) -> str:
    """The extension vcfs shows for a video stored under `file_path` (lowercased).

    Falls back to `FALLBACK_EXT` when the stored name has no extension a path could carry.
    """
    if not file_path:
        return FALLBACK_EXT
    ext = PurePosixPath(file_path).suffix.removeprefix(".").lower()
    return ext if is_valid_ext(ext) else FALLBACK_EXT


def video_name(content_hash: str, file_path: str | None) -> str:
    """The file name of a video under /by-hash: `<hash>.<ext of the service's file_path>`."""
    if not is_content_hash(content_hash):
        raise ValueError(f"not a lowercase 64-hex content hash: {content_hash!r}")
    return f"{content_hash}.{ext_for(file_path)}"


def video_inode(content_hash: str) -> int:
    """A stable inode for a video: its hash's first 60 bits, offset past the fixed inodes.

    Stays below 2**61, so it fits a signed 64-bit ino_t; two videos share an inode only if
    their hashes share 60 leading bits.
    """
    if not is_content_hash(content_hash):
        raise ValueError(f"not a lowercase 64-hex content hash: {content_hash!r}")
    return _VIDEO_INODE_BASE + int(content_hash[:15], 16)
