"""The contenders: each one a way for a user to read the stored videos.

A contender turns a `Video` into something a workload can read: a file path (local file and the
FUSE mounts) or a URL (curl, ffmpeg reading HTTP directly). Networked contenders reach the
service through the profile's proxy, so the proxy's counters are the server-side figures.
`cold()` makes the next read cold: the local file's pages are dropped from the page cache with
posix_fadvise(DONTNEED), and mounts are unmounted (the next `target()` mounts afresh), which
drops both the kernel's pages for the mount and the daemon's own cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bench.guardian import guard_mount, guarded
from bench.stack import Video, stop_process, wait_until

MOUNT_TIMEOUT_S = 60.0


class ContenderUnavailable(Exception):
    """The contender cannot run here (not installed, or it failed to mount): skipped, with why."""


@dataclass(frozen=True)
class Capabilities:
    files: bool  # offers a path: dd, ffprobe, ffmpeg, pread all work
    url: bool  # offers a URL; what a URL contender can run is limited to `url_workloads`
    url_workloads: tuple[str, ...] = ()


class Contender:
    """Base: override `target`, and for daemons `cold`, `pids` and `close`."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    networked: ClassVar[bool] = True

    def __init__(self, *, base_url: str, work_dir: Path, videos: list[Video]) -> None:
        self.base_url = base_url  # the proxy in front of the service
        self.work_dir = work_dir
        self.videos = videos

    @classmethod
    def missing(cls) -> str | None:
        """Why it cannot run on this machine, or None."""
        return None

    @classmethod
    def supports(cls, workload: str) -> bool:
        caps = cls.capabilities
        return caps.files or workload in caps.url_workloads

    def target(self, video: Video) -> str:
        raise NotImplementedError

    def cold(self) -> None:
        """Make the next read of every video cold."""

    def pids(self) -> list[int]:
        """The daemon processes whose peak RSS is reported."""
        return []

    def close(self) -> None:
        self.cold()


def _missing_binary(binary: str) -> str | None:
    if shutil.which(binary) is None:
        return f"`{binary}` is not installed (scripts/bench installs it from Debian)"
    return None


class LocalFile(Contender):
    """The generated file on local disk: the floor."""

    name = "local"
    capabilities = Capabilities(files=True, url=False)
    networked = False

    def target(self, video: Video) -> str:
        return str(video.local_path)

    def cold(self) -> None:
        for video in self.videos:
            drop_page_cache(video.local_path)


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped; these files are written once, long ago
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Curl(Contender):
    """`curl -o /dev/null` of /video/{hash}: one HTTP stream, no cache."""

    name = "curl"
    capabilities = Capabilities(files=False, url=True, url_workloads=("sequential",))

    @classmethod
    def missing(cls) -> str | None:
        return _missing_binary("curl")

    def target(self, video: Video) -> str:
        return f"{self.base_url}/video/{video.content_hash}"


class FfmpegDirect(Contender):
    """ffmpeg/ffprobe given the /video/{hash} URL (their own HTTP client, no FUSE)."""

    name = "ffmpeg-url"
    capabilities = Capabilities(files=False, url=True, url_workloads=("ffprobe", "seek"))

    @classmethod
    def missing(cls) -> str | None:
        return _missing_binary("ffprobe") or _missing_binary("ffmpeg")

    def target(self, video: Video) -> str:
        return f"{self.base_url}/video/{video.content_hash}"


class Mount:
    """One FUSE daemon process in the foreground, mounted at `mountpoint`."""

    def __init__(self, argv: list[str], mountpoint: Path, log_path: Path, *,
                 probe: Path) -> None:
        self.argv = argv
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.probe = probe  # a path that exists once the mount serves
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        guard_mount(self.mountpoint)
        try:
            with open(self.log_path, "ab") as log:
                self.process = guarded(subprocess.Popen(self.argv, stdout=log,
                                                        stderr=subprocess.STDOUT,
                                                        stdin=subprocess.DEVNULL))
            wait_until(self._ready, timeout=MOUNT_TIMEOUT_S, what=f"mount at {self.mountpoint}")
        except BaseException as exc:
            # Also on Ctrl-C or a signal while it mounts: the caller never gets this mount
            # to stop, and the daemon would mount on its own a moment later.
            self.stop()
            if not isinstance(exc, (TimeoutError, ContenderUnavailable)):
                raise
            tail = self.log_path.read_text(errors="replace")[-800:]
            raise ContenderUnavailable(f"{exc}; log tail:\n{tail}") from exc

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ContenderUnavailable(
                f"`{' '.join(self.argv[:3])} ...` exited with {self.process.returncode}")
        return os.path.ismount(self.mountpoint) and self.probe.exists()

    def stop(self) -> None:
        if self.process is None:
            return
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False,
                           capture_output=True, timeout=30)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                stop_process(self.process)
        else:  # not mounted yet (or any more): no unmount will end it
            stop_process(self.process)
        if os.path.ismount(self.mountpoint):  # the daemon died without unmounting
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False,
                           capture_output=True, timeout=30)
        self.process = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class _MountedContender(Contender):
    """A contender that is one mount of the whole service, remounted to go cold."""

    def __init__(self, *, base_url: str, work_dir: Path, videos: list[Video]) -> None:
        super().__init__(base_url=base_url, work_dir=work_dir, videos=videos)
        self.mountpoint = work_dir / f"mnt-{self.name}"
        self._mount: Mount | None = None
        self.mounts = 0

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _path(self, video: Video) -> Path:
        raise NotImplementedError

    def target(self, video: Video) -> str:
        if self._mount is None:
            # Ready once the videos' directory answers: looking up a video itself would warm
            # the contender's caches (vcfs fetches a first block on a cold lookup, rclone
            # lists the directory) before the measured read.
            mount = Mount(self._argv(), self.mountpoint, self.work_dir / f"{self.name}.log",
                          probe=self._path(self.videos[0]).parent)
            mount.start()
            self._mount = mount
            self.mounts += 1
        return str(self._path(video))

    def cold(self) -> None:
        if self._mount is not None:
            self._mount.stop()
            self._mount = None

    def pids(self) -> list[int]:
        pid = None if self._mount is None else self._mount.pid
        return [] if pid is None else [pid]


class Vcfs(_MountedContender):
    """`vcfs mount URL MOUNTPOINT --foreground --log-level warning` with default options
    (unless `options`)."""

    name = "vcfs"
    capabilities = Capabilities(files=True, url=False)
    options: ClassVar[tuple[str, ...]] = ()  # extra `vcfs mount` options, for experiments

    @classmethod
    def missing(cls) -> str | None:
        try:
            import vcfs.cli  # noqa: F401
        except ImportError as exc:
            return f"vcfs is not importable ({exc})"
        return None

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "vcfs", "mount", self.base_url, str(self.mountpoint),
                "--foreground", "--log-level", "warning", *self.options]

    def _path(self, video: Video) -> Path:
        return self.mountpoint / "by-hash" / f"{video.content_hash}.{video.ext}"

    def stats(self) -> str | None:
        try:
            return (self.mountpoint / ".vcfs" / "stats").read_text()
        except OSError:
            return None


class Rclone(_MountedContender):
    """`rclone mount :http:` of /video/ with default VFS options (listing from the index shim)."""

    name = "rclone"
    capabilities = Capabilities(files=True, url=False)

    @classmethod
    def missing(cls) -> str | None:
        return _missing_binary("rclone")

    def _argv(self) -> list[str]:
        return ["rclone", "mount", ":http:", str(self.mountpoint), "--http-url",
                f"{self.base_url}/video/", "--read-only",
                "--config", str(self.work_dir / "rclone.conf")]

    def _path(self, video: Video) -> Path:
        return self.mountpoint / video.content_hash


class Httpfs2(Contender):
    """`httpfs2 URL MOUNTPOINT`: one mount per file, each a single-file FUSE filesystem."""

    name = "httpfs2"
    capabilities = Capabilities(files=True, url=False)

    def __init__(self, *, base_url: str, work_dir: Path, videos: list[Video]) -> None:
        super().__init__(base_url=base_url, work_dir=work_dir, videos=videos)
        self._mounts: dict[str, Mount] = {}

    @classmethod
    def missing(cls) -> str | None:
        return _missing_binary("httpfs2")

    def target(self, video: Video) -> str:
        mountpoint = self.work_dir / f"mnt-httpfs2-{video.content_hash[:12]}"
        path = mountpoint / video.content_hash
        if video.content_hash not in self._mounts:
            url = f"{self.base_url}/video/{video.content_hash}"
            mount = Mount(["httpfs2", "-f", "-c", "/dev/null", url, str(mountpoint)],
                          mountpoint, self.work_dir / "httpfs2.log", probe=path)
            mount.start()
            self._mounts[video.content_hash] = mount
        return str(path)

    def cold(self) -> None:
        for mount in self._mounts.values():
            mount.stop()
        self._mounts.clear()

    def pids(self) -> list[int]:
        return [pid for mount in self._mounts.values() if (pid := mount.pid) is not None]


CONTENDERS: dict[str, type[Contender]] = {
    cls.name: cls for cls in (LocalFile, Curl, FfmpegDirect, Rclone, Httpfs2, Vcfs)
}
