"""A real vcfs mount for tests: `python -m vcfs mount ... --foreground` in a subprocess.

`VcfsMount.start` waits (with a deadline) until the mount point is mounted, failing with the
daemon's log if it exits or never mounts; `stop` always unmounts (fusermount3 -u, then
SIGTERM/SIGKILL the daemon if it lingers). Leaving the context prints the daemon's log, which
pytest shows only for failed tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import site
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from tests.support import wait_until
from vcfs import paths
from vidcache_client import VidCacheClient

FUSE_MISSING_REASON = (
    "real mounts need /dev/fuse and fusermount3 (run as root, or with --device /dev/fuse)"
)


def fuse_missing() -> bool:
    return not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None


requires_fuse = [pytest.mark.fuse, pytest.mark.skipif(fuse_missing(), reason=FUSE_MISSING_REASON)]


_ROOT = Path(__file__).resolve().parent.parent

NOBODY = 65534  # the conventional unprivileged uid and gid (Debian's nobody and nogroup)
# As that user: what setpriv runs has no capabilities left (it keeps the bounding set, so
# that setuid fusermount3 works as for any user).
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=-all"]


def in_private_mount_namespace(setup: str, *args: str) -> list[str]:
    """argv running the shell `setup` (root, with `args` as $1...) in a new, private mount
    namespace: what it mounts there is seen only by what it then runs (`exec "$@"`)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "sh", *args]


@functools.cache
def python_for_nobody() -> tuple[str, dict[str, str]] | None:
    """How uid 65534 runs this checkout: its own interpreter if that user can, else the
    system's python3 of the same version on the checkout's packages (an interpreter built
    under root's home, as pyenv's, is out of that user's reach); None if neither works."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = ":".join(site.getsitepackages())
    for python, env in (
        (sys.executable, {}),
        (shutil.which(f"python{version}", path="/usr/local/bin:/usr/bin") or "",
         {"PYTHONPATH": f"{_ROOT}:{site_packages}"}),
    ):
        if python and subprocess.run(
                [*AS_NOBODY, "env", *(f"{k}={v}" for k, v in env.items()), python, "-c",
                 "import vcfs.cli"], cwd="/", capture_output=True, timeout=60).returncode == 0:
            return python, env
    return None


def process_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a daemon we started, once it exits)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or exiting between open and read
        return False
    return "\nState:\tZ" not in status


def daemon_pid(started: subprocess.CompletedProcess[str]) -> int:
    """The daemon's pid, from what `vcfs mount --daemon` printed once mounted
    ("... (pid N)")."""
    return int(started.stdout.rsplit("pid ", 1)[1].rstrip(")\n"))

def thread_stacks(pid: int) -> list[int]:
    """The stack size of each thread of process `pid` but its main thread: the size of the
    mapping its stack pointer is in (/proc/PID/task/TID/syscall), which is what the thread was
    started with (glibc's guard page below it is a mapping of its own). A thread on a CPU at
    that moment is left out: its stack pointer is not shown."""
    mappings = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        start, _, end = line.split(maxsplit=1)[0].partition("-")
        mappings.append((int(start, 16), int(end, 16)))
    sizes = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        if int(tid) == pid or fields[0] == "running":
            continue
        pointer = int(fields[-2], 16)  # "NR ARGS... SP PC", or "-1 SP PC" outside a call
        sizes += [end - start for start, end in mappings if start <= pointer < end]
    return sizes


def drop_pages(path: Path) -> None:
    """Evict the file's pages from the kernel's page cache: the next read reaches vcfs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def vcfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vcfs", *args]


class VcfsMount:
    """One vcfs daemon mounted at `mountpoint` (see module docstring)."""

    def __init__(self, url: str, mountpoint: Path, *extra_args: str) -> None:
        self.url = url
        self.mountpoint = mountpoint
        self.extra_args = list(extra_args)
        self.log_path = mountpoint.parent / f"{mountpoint.name}-vcfs.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []

    def start(self, timeout: float = 30.0) -> VcfsMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        argv = vcfs_command(
            "mount", self.url, str(self.mountpoint), "--foreground", "--log-level", "debug",
            *self.extra_args,
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([*self.prefix, *argv], stdout=log,
                                            stderr=subprocess.STDOUT)
        try:
            wait_until(self._mounted, timeout=timeout, what=f"vcfs mounted at {self.mountpoint}")
        except BaseException:
            self.stop()
            print(self.log())
            raise
        return self

    def _mounted(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"vcfs exited with {self.process.returncode}:\n{self.log()}")
        if not os.path.ismount(self.mountpoint):
            return False
        try:  # a stale mount left here also looks mounted, but statfs fails (ENOTCONN)
            os.statvfs(self.mountpoint)
        except OSError:
            return False
        return True

    def stop(self) -> int | None:
        """Unmount and wait for the daemon; its exit code (None if it was never started)."""
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True,
                       check=False)
        if self.process is None:
            return None
        code: int | None = None
        for escalation in (None, signal.SIGTERM, signal.SIGKILL):
            if escalation is not None:
                self.process.send_signal(escalation)
            try:
                code = self.process.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        # A daemon killed while mounted leaves a stale mount: clear it too.
        subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True,
                       check=False)
        return code

    def kill(self) -> None:
        """SIGKILL the daemon, leaving the mount stale (for recovery tests)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def video(self, name: str) -> Path:
        return self.mountpoint / "by-hash" / name

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.mountpoint / ".vcfs" / "stats").read_bytes())
        return result

    def wait_quiet(self, timeout: float) -> None:
        """Wait until no block fetch is under way: a read returns once the bytes it needs are
        in, while the rest of its block (or a retry of it) may still be on its way."""
        wait_until(lambda: self.stats()["cache"]["fetching_blocks"] == 0, timeout=timeout,
                   what=f"the fetches of {self.mountpoint} to end")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> VcfsMount:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            print(f"--- vcfs log ({self.log_path}) ---\n{self.log()}")


@contextlib.contextmanager
def mount_factory(url: str, directory: Path) -> Iterator[Callable[..., VcfsMount]]:
    """`start(*vcfs_args)` mounts a new daemon (cold caches, counters at zero) of the service
    at `url` under `directory`; every one is unmounted on leaving."""
    with contextlib.ExitStack() as stack:
        count = iter(range(100))

        def start(*args: str) -> VcfsMount:
            mountpoint = directory / f"mnt{next(count)}"
            return stack.enter_context(VcfsMount(url, mountpoint, *args))

        yield start


def ingested_for_mount(server_url: str, media_url: str, source: Path, *,
                       bucket: str) -> tuple[str, bytes]:
    """`source` (served by the media server under its name) ingested: its name under by-hash/
    in a mount of that service, and its bytes."""
    with VidCacheClient(server_url) as client:
        content_hash = client.ingest(f"{media_url}/{source.name}", bucket=bucket)["hash"]
        meta = client.get_meta(content_hash)
    data = source.read_bytes()
    assert meta is not None and content_hash == blake3(data).hexdigest()
    return paths.video_name(content_hash, meta["file_path"]), data
