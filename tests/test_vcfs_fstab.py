"""vcfs mounted as mount(8) mounts an /etc/fstab line of type fuse.vcfs: through Debian's
mount.fuse3, which runs `vcfs URL MOUNTPOINT -o OPTIONS` from PATH and waits for it.

mount(8) runs its helpers with a PATH of its own (/usr/local/bin:...), where these tests must
not put anything: they call mount.fuse3 directly with a PATH holding a `vcfs` of this tree, or
mount(8) with the helper's `type#source` form, `fuse` and `/path/to/vcfs#URL`, which names the
program by its path. Both run the same `vcfs URL MOUNTPOINT -o OPTIONS` call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from blake3 import blake3

from tests.support import VidcacheServer, free_port, wait_until
from tests.vcfs_support import requires_fuse
from vcfs import paths
from vcfs.cli import mount_entry
from vidcache_client import VidCacheClient

MOUNT_FUSE3 = shutil.which("mount.fuse3", path="/sbin:/usr/sbin")
pytestmark = [*requires_fuse,
              pytest.mark.skipif(MOUNT_FUSE3 is None, reason="no mount.fuse3 (fuse3 package)"),
              pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of an fstab line needs root")]

ROOT = Path(__file__).resolve().parent.parent
KIB = 1 << 10


@pytest.fixture(scope="module")
def video(media_url: str, vidcache_server: VidcacheServer,
          videos: dict[str, Path]) -> tuple[str, bytes]:
    """b.mp4, ingested: its name under by-hash/ and its bytes."""
    with VidCacheClient(vidcache_server.url) as client:
        content_hash = client.ingest(f"{media_url}/b.mp4", bucket="vcfs-fstab")["hash"]
        meta = client.get_meta(content_hash)
    data = videos["b.mp4"].read_bytes()
    assert meta is not None and content_hash == blake3(data).hexdigest()
    return paths.video_name(content_hash, meta["file_path"]), data


@pytest.fixture
def helper_path(tmp_path: Path) -> str:
    """A PATH whose `vcfs` is this tree's, as a symlink to a venv's console script would be."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "vcfs"
    program.write_text(f'#!/bin/sh\nexec {sys.executable} -m vcfs "$@"\n')
    program.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty directory, unmounted after the test, its daemon gone."""
    directory = tmp_path / "mnt"
    directory.mkdir()
    try:
        yield directory
    finally:
        subprocess.run(["fusermount3", "-u", str(directory)], capture_output=True, check=False)
        wait_until(lambda: not _daemons(directory), timeout=20, what="the daemon exited")


def _daemons(mountpoint: Path) -> list[int]:
    """The pids of vcfs daemons serving `mountpoint`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vcfs" in argv and str(mountpoint).encode() in argv and b"--foreground" in argv:
            found.append(int(entry.name))
    return found


def mount_fuse3(url: str, mountpoint: Path, options: str,
                path: str) -> subprocess.CompletedProcess[str]:
    """What mount(8) runs for `URL MOUNTPOINT fuse.vcfs OPTIONS` in /etc/fstab."""
    assert MOUNT_FUSE3 is not None
    return subprocess.run(
        [MOUNT_FUSE3, url, str(mountpoint), "-t", "fuse.vcfs", "-o", options],
        capture_output=True, text=True, timeout=90,
        env={**os.environ, "PATH": path, "PYTHONPATH": str(ROOT)})


def test_an_fstab_line_mounts_through_mount_fuse3(
    tmp_path: Path, vidcache_server: VidcacheServer, video: tuple[str, bytes],
    helper_path: str, mountpoint: Path,
) -> None:
    """vcfs's options as -o ones, FUSE's passed on, mount(8)'s and systemd's dropped; the
    helper returns once mounted, saying nothing, as mount(8) (was: `vcfs mount --daemon`'s
    "vcfs: mounted ..." line, which mount(8) passes to the terminal, or the journal at boot).
    Was: 'invalid choice' for the URL taken as the command."""
    log_file = tmp_path / "vcfs.log"
    options = (f"rw,nosuid,nodev,_netdev,noauto,nofail,x-systemd.automount,cache_size=64M,"
               f"block_size=256K,no_first_block,allow_other,log_file={log_file}")
    started = mount_fuse3(vidcache_server.url, mountpoint, options, helper_path)
    assert (started.returncode, started.stdout, started.stderr) == (0, "", "")
    assert mount_entry(str(mountpoint)) == ("fuse.vcfs", 0)
    assert os.statvfs(mountpoint).f_bsize == 256 * KIB  # block_size=256K
    [pid] = _daemons(mountpoint)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--cache-size") + 1] == str(64 << 20).encode(), argv
    assert b"--no-first-block" in argv, argv
    fuse_options = {argv[i + 1] for i, arg in enumerate(argv) if arg == b"-o"}
    assert b"allow_other" in fuse_options and b"nosuid" in fuse_options, argv
    assert not {b"rw", b"_netdev", b"x-systemd.automount"} & fuse_options, argv
    name, data = video
    assert (mountpoint / "by-hash" / name).read_bytes() == data
    unmounted = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True,
                               timeout=60)
    assert unmounted.returncode == 0, unmounted.stderr
    wait_until(lambda: not _daemons(mountpoint), timeout=20, what="the daemon exited")
    assert "unmounted" in log_file.read_text()


def mount_8(url: str, mountpoint: Path, helper_path: str, options: str
            ) -> subprocess.CompletedProcess[str]:
    """`mount -t fuse /path/to/vcfs#URL MOUNTPOINT -o OPTIONS`: the program named in the
    source, as mount(8) runs its helpers with a PATH of its own."""
    program = helper_path.split(":", 1)[0] + "/vcfs"
    return subprocess.run(["mount", "-t", "fuse", f"{program}#{url}", str(mountpoint),
                           "-o", options], capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_mount_8_runs_vcfs_as_its_helper(
    vidcache_server: VidcacheServer, video: tuple[str, bytes], mountpoint: Path,
    helper_path: str,
) -> None:
    """`mount -t fuse /path/to/vcfs#URL MOUNTPOINT -o ...`: mount(8) (libmount) passes on what
    it does not keep for itself, and waits for the helper."""
    mounted = mount_8(vidcache_server.url, mountpoint, helper_path,
                      "defaults,_netdev,cache_size=32M,allow_other")
    assert (mounted.returncode, mounted.stdout, mounted.stderr) == (0, "", "")
    assert mount_entry(str(mountpoint)) == ("fuse.vcfs", 0)
    name, data = video
    assert (mountpoint / "by-hash" / name).read_bytes() == data


@pytest.mark.parametrize(("options", "status", "message"), [
    ("allow_other", 1, "vcfs: error: cannot reach the vidcache service at http://127.0.0.1:"),
    ("cache_size=lots", 2, "argument --cache-size: invalid size"),
    ("cache_sise=2G", 1, "unknown option"),
    ("foreground", 1, "-o foreground: not a mount option"),
])
def test_a_failed_mount_reaches_mount_fuse3s_caller(
    vidcache_server: VidcacheServer, mountpoint: Path, helper_path: str, options: str,
    status: int, message: str,
) -> None:
    """A service that does not answer, a bad value, an option of neither vcfs nor FUSE: the
    helper's status is not 0, the reason on its stderr, and nothing stays mounted."""
    url = (f"http://127.0.0.1:{free_port()}" if options == "allow_other"
           else vidcache_server.url)
    failed = mount_fuse3(url, mountpoint, f"{options},_netdev", helper_path)
    assert failed.returncode == status, failed.stderr
    assert message in failed.stderr, failed.stderr
    assert mount_entry(str(mountpoint)) is None
    assert not _daemons(mountpoint)


def test_mount_8_reports_a_helper_that_failed(mountpoint: Path, helper_path: str) -> None:
    failed = mount_8(f"http://127.0.0.1:{free_port()}", mountpoint, helper_path,
                     "_netdev,allow_other")
    assert failed.returncode != 0
    assert "cannot reach the vidcache service" in failed.stderr, failed.stderr
    assert mount_entry(str(mountpoint)) is None
