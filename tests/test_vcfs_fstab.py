"""vcfs mounted as mount(8) mounts an /etc/fstab line of type fuse.vcfs: through Debian's
mount.fuse3, which runs `vcfs URL MOUNTPOINT -o OPTIONS` from PATH and waits for it.

mount(8) runs its helpers with a PATH of its own (/usr/local/bin:...), where these tests must
not put anything: they call mount.fuse3 directly with a PATH holding a `vcfs` of this tree, or
mount(8) with the helper's `type#source` form, `fuse` and `/path/to/vcfs#URL`, which names the
program by its path. Both run the same `vcfs URL MOUNTPOINT -o OPTIONS` call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import VidcacheServer, free_port, wait_until
from tests.vcfs_support import (
    AS_NOBODY,
    NOBODY,
    in_private_mount_namespace,
    ingested_for_mount,
    python_for_nobody,
    requires_fuse,
    thread_stacks,
    vcfs_command,
)
from vcfs.cli import is_stale_mount, mount_entry
from vcfs.limits import THREAD_STACK

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
    return ingested_for_mount(vidcache_server.url, media_url, videos["b.mp4"],
                              bucket="vcfs-fstab")


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


def _foreground_daemons(matches: Callable[[list[bytes]], bool]) -> list[int]:
    """The pids of the processes running `vcfs mount --foreground` whose argv `matches`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--foreground" in argv and matches(argv):
            found.append(int(entry.name))
    return found


def _daemons(mountpoint: Path) -> list[int]:
    """The pids of vcfs daemons serving `mountpoint`."""
    return _foreground_daemons(lambda argv: b"vcfs" in argv and str(mountpoint).encode() in argv)


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
    # vcfs's own thread stacks, libfuse's threads' included, not ulimit -s (vcfs.limits)
    assert set(thread_stacks(pid)) == {THREAD_STACK}
    unmounted = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True,
                               timeout=60)
    assert unmounted.returncode == 0, unmounted.stderr
    wait_until(lambda: not _daemons(mountpoint), timeout=20, what="the daemon exited")
    assert "unmounted" in log_file.read_text()


def mount_8(url: str, mountpoint: Path, helper_path: str, options: str, *,
            program: str | None = None) -> subprocess.CompletedProcess[str]:
    """`mount -t fuse /path/to/vcfs#URL MOUNTPOINT -o OPTIONS`: the program named in the
    source (helper_path's vcfs unless given), as mount(8) runs its helpers with a PATH of its
    own."""
    program = program or helper_path.split(":", 1)[0] + "/vcfs"
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
    ("daemon", 1, "-o daemon: not a mount option"),  # was libfuse's "unknown option"
    # were libfuse's "unknown option", after the health check
    ("help", 1, "-o help: not a mount option (vcfs mount --help lists the options)"),
    ("version", 1, "-o version: not a mount option (vcfs --version shows the version)"),
    ("status_fd=3", 1, "-o status_fd: not a mount option (internal to --daemon"),
    ("allow_other,allow_root", 1, "-o allow_other,allow_root: one or the other"),
    # was mounted, the cache then growing until the OOM killer ended the daemon
    ("cache_size=100T", 1, "--cache-size 102400 GiB is more than this machine's memory ("),
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


def _fd_daemons(log_file: Path) -> list[int]:
    """The pids of vcfs daemons logging to `log_file` that serve a /dev/fd/N mount point."""
    return _foreground_daemons(lambda argv: str(log_file).encode() in argv
                               and any(arg.startswith(b"/dev/fd/") for arg in argv))


def test_drop_privileges_has_mount_fuse3_mount_and_vcfs_serve_without_privileges(
    tmp_path: Path, vidcache_server: VidcacheServer, video: tuple[str, bytes],
    helper_path: str, mountpoint: Path,
) -> None:
    """mount.fuse3 -o drop_privileges mounts itself, then runs `vcfs URL /dev/fd/N -o ...`
    with no capabilities left: vcfs serves that descriptor, mounted already, until umount.
    Was: 'mount point /dev/fuse is not a directory' (the /dev/fd/N link resolved), and a dead
    mount left behind."""
    log_file = tmp_path / "vcfs.log"
    started = mount_fuse3(vidcache_server.url, mountpoint,
                          f"drop_privileges,ro,allow_other,cache_size=64M,log_file={log_file}",
                          helper_path)
    try:
        assert (started.returncode, started.stdout, started.stderr) == (0, "", "")
        assert mount_entry(str(mountpoint)) == ("fuse.vcfs", 0)
        [pid] = _fd_daemons(log_file)
        status = Path(f"/proc/{pid}/status").read_text()
        assert "CapEff:\t0000000000000000" in status, status
        name, data = video
        assert (mountpoint / "by-hash" / name).read_bytes() == data
        unmounted = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True,
                                   timeout=60)
        assert unmounted.returncode == 0, unmounted.stderr
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        wait_until(lambda: not _fd_daemons(log_file), timeout=20, what="the daemon exited")
    log = log_file.read_text()
    assert "serving the mount made on /dev/fd/" in log, log
    assert "unmounted the mount made on /dev/fd/" in log, log


def test_a_failed_start_after_drop_privileges_names_the_dead_mount(
    vidcache_server: VidcacheServer, mountpoint: Path, helper_path: str,
) -> None:
    """mount.fuse3 mounted before vcfs started, and vcfs, without privileges, cannot unmount:
    the error says the mount is left dead and what clears it."""
    failed = mount_fuse3(f"http://127.0.0.1:{free_port()}", mountpoint,
                         "drop_privileges,allow_other", helper_path)
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.splitlines()
    assert len(lines) == 2, failed.stderr
    assert lines[0].startswith("vcfs: error: cannot reach the vidcache service"), failed.stderr
    assert lines[1].startswith("vcfs: the mount made for /dev/fd/"), failed.stderr
    assert lines[1].endswith("vcfs cannot unmount it: umount its mount point"), failed.stderr
    assert mount_entry(str(mountpoint)) == ("fuse.vcfs", 0)  # the fixture unmounts it


def test_a_signal_leaves_a_drop_privileges_mount_dead_and_says_so(
    tmp_path: Path, vidcache_server: VidcacheServer, helper_path: str, mountpoint: Path,
) -> None:
    """libfuse unmounts only what it mounted, and vcfs has no privileges left: after SIGTERM
    the mount stays, dead, and the log says what clears it (was: 'unmounted')."""
    log_file = tmp_path / "vcfs.log"
    started = mount_fuse3(vidcache_server.url, mountpoint,
                          f"drop_privileges,ro,log_file={log_file}", helper_path)
    assert started.returncode == 0, started.stderr
    [pid] = _fd_daemons(log_file)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not _fd_daemons(log_file), timeout=20, what="the daemon exited")
    assert is_stale_mount(str(mountpoint))  # the fixture unmounts it
    log = log_file.read_text()
    assert "WARNING vcfs: stopped by a signal: the mount made on /dev/fd/" in log, log
    assert "until its mount point is unmounted (umount)" in log, log
    assert "unmounted the mount" not in log, log


def _access_errno(path: Path, mode: int) -> int:
    """access(2)'s errno for `path` and `mode`, 0 if allowed (os.access says only yes or no)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.access(os.fsencode(path), mode) == 0 else ctypes.get_errno()


def test_a_drop_privileges_mount_without_ro_refuses_writes_and_says_so_to_access(
    tmp_path: Path, vidcache_server: VidcacheServer, video: tuple[str, bytes],
    helper_path: str, mountpoint: Path,
) -> None:
    """docs/vcfs.md, read-only: a drop_privileges line without `ro` is mounted read-write and
    without `default_permissions` by mount.fuse3, so the kernel leaves every check to vcfs:
    writes fail with EROFS and change nothing, and access(2) says so too (`test -w`: EROFS;
    `test -x` of a 0444 video: EACCES). Was: access(2) allowed everything."""
    log_file = tmp_path / "vcfs.log"
    started = mount_fuse3(vidcache_server.url, mountpoint,
                          f"drop_privileges,log_file={log_file}", helper_path)
    try:
        assert started.returncode == 0, started.stderr
        name, data = video
        folder = mountpoint / "by-hash"
        path = folder / name
        assert not os.statvfs(mountpoint).f_flag & os.ST_RDONLY  # the kernel asks vcfs
        listed = sorted(os.listdir(folder))  # the session's service: other tests' videos too
        assert name in listed
        assert _access_errno(path, os.R_OK) == 0
        assert _access_errno(folder, os.R_OK | os.X_OK) == 0
        for target, mode, expected in ((path, os.W_OK, errno.EROFS),
                                       (path, os.R_OK | os.W_OK, errno.EROFS),
                                       (folder, os.W_OK, errno.EROFS),
                                       (mountpoint / ".vcfs" / "stats", os.W_OK, errno.EROFS),
                                       (path, os.X_OK, errno.EACCES)):
            assert _access_errno(target, mode) == expected, (target, mode)
        for attempt in (lambda: os.open(path, os.O_WRONLY), lambda: os.open(path, os.O_RDWR),
                        lambda: os.truncate(path, 0), lambda: os.utime(path),
                        lambda: os.chmod(path, 0o644), lambda: os.unlink(path),
                        lambda: os.rename(path, folder / "x.mp4"),
                        lambda: os.mkdir(folder / "d"),
                        lambda: os.open(folder / "new", os.O_WRONLY | os.O_CREAT)):
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EROFS, attempt
        assert sorted(os.listdir(folder)) == listed
        assert path.read_bytes() == data
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        wait_until(lambda: not _fd_daemons(log_file), timeout=20, what="the daemon exited")


@pytest.mark.parametrize("name", ["vcfs", "vcfs/sshfs"])
def test_vcfs_unmount_goes_by_the_program_a_drop_privileges_mount_is_named_after(
    tmp_path: Path, vidcache_server: VidcacheServer, helper_path: str, mountpoint: Path,
    name: str,
) -> None:
    """mount.fuse3 -o drop_privileges mounts `/path/to/vcfs#URL` as type fuse./path/to/vcfs,
    the program it runs: `vcfs unmount` unmounts it, the daemon logs so and exits (was: '... is
    a fuse./.../vcfs mount, not a vcfs one'). A program of another name is another file system,
    even in a directory named vcfs (here vcfs itself as sshfs: a FUSE daemon that keeps the
    mount alive, since a dead one is cleared whatever it was): refused, left mounted."""
    program = tmp_path / "programs" / name
    program.parent.mkdir(parents=True, exist_ok=True)
    program.write_text(f'#!/bin/sh\nexec {sys.executable} -m vcfs "$@"\n')
    program.chmod(0o755)
    log_file = tmp_path / "vcfs.log"
    mounted = mount_8(vidcache_server.url, mountpoint, helper_path,
                      f"drop_privileges,ro,log_file={log_file}", program=str(program))
    try:
        assert (mounted.returncode, mounted.stdout, mounted.stderr) == (0, "", "")
        assert mount_entry(str(mountpoint)) == (f"fuse.{program}", 0)
        unmounted = subprocess.run(vcfs_command("unmount", str(mountpoint)),
                                   capture_output=True, text=True, timeout=60)
        if name == "vcfs":
            assert (unmounted.returncode, unmounted.stderr) == (0, ""), unmounted.stderr
            assert mount_entry(str(mountpoint)) is None
            wait_until(lambda: not _fd_daemons(log_file), timeout=20, what="the daemon exited")
            assert "unmounted the mount made on /dev/fd/" in log_file.read_text()
        else:
            assert unmounted.returncode == 1
            assert unmounted.stderr == (f"vcfs: error: {mountpoint} is a fuse.{program} mount, "
                                        "not a vcfs one; not unmounting it (umount, or "
                                        "fusermount3 -u for another FUSE file system)\n")
            assert mount_entry(str(mountpoint)) == (f"fuse.{program}", 0)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        wait_until(lambda: not _fd_daemons(log_file), timeout=20, what="the daemon exited")


@pytest.mark.parametrize("user_allow_other", [False, True])
def test_a_user_mounts_user_fstab_lines(
    vidcache_server: VidcacheServer, video: tuple[str, bytes], user_allow_other: bool,
) -> None:
    """mount(8) runs the helper as the user who mounts a `user` or `users` line: vcfs mounts
    through the setuid fusermount3, as `vcfs mount` run by that user does; umount by the same
    user unmounts. allow_other also needs user_allow_other in /etc/fuse.conf, and without it
    vcfs says so on one line (was: fusermount3's line, then 'mounting at ... failed (libfuse
    code 4; see above)'). As uid 65534 in a private mount namespace whose /etc/fstab and
    /etc/fuse.conf are the test's, and /dev/fuse 0666."""
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs unshare and setpriv")
    python = python_for_nobody()
    if python is None:
        pytest.skip(f"uid {NOBODY} can run neither this Python nor a system one on the checkout")
    interpreter, env = python
    name, data = video
    work = Path(tempfile.mkdtemp(prefix="vcfs-user-fstab-", dir="/tmp"))
    work.chmod(0o755)
    home = work / "home"
    (home / "own").mkdir(parents=True)
    (home / "shared").mkdir()
    for path in (home, home / "own", home / "shared"):
        os.chown(path, NOBODY, NOBODY)
    # mount(8) gives a user's helpers a clean environment: the program sets its own.
    program = work / "vcfs"
    program.write_text(f"#!/bin/sh\nexec env {shlex.join(f'{k}={v}' for k, v in env.items())} "
                       f"{shlex.quote(interpreter)} -m vcfs \"$@\"\n")
    program.chmod(0o755)
    source = f"{program}#{vidcache_server.url}"
    (work / "fstab").write_text(
        f"{source} {home}/own fuse users,noauto,cache_size=32M 0 0\n"
        f"{source} {home}/shared fuse user,noauto,allow_other 0 0\n")
    (work / "fuse.conf").write_text("user_allow_other\n" if user_allow_other
                                    else "#user_allow_other\n")
    setup = ('mkdir "$1/dev" && mount -t tmpfs -o mode=0755 none "$1/dev" && '
             'mknod -m 0666 "$1/dev/fuse" c 10 229 && mount --bind "$1/dev/fuse" /dev/fuse && '
             'mount --bind "$1/fstab" /etc/fstab && mount --bind "$1/fuse.conf" /etc/fuse.conf '
             '&& shift && exec "$@"')
    script = ('for m in own shared; do mount "$0/$m" >"$0/$m.out" 2>"$0/$m.err"; '
              'echo $? >"$0/$m.rc"; if [ "$(cat "$0/$m.rc")" = 0 ]; then '
              'cat "$0/$m/by-hash/$1" >"$0/$m.copy"; '
              'umount "$0/$m" 2>>"$0/$m.err"; echo $? >"$0/$m.unmounted"; fi; done')
    try:
        subprocess.run(in_private_mount_namespace(setup, str(work), *AS_NOBODY, "sh", "-c",
                                                  script, str(home), name),
                       capture_output=True, timeout=180, check=True, cwd="/")
        outcome = {m: [(home / f"{m}.{part}").read_text() if (home / f"{m}.{part}").exists()
                       else None for part in ("rc", "out", "err", "unmounted")]
                   for m in ("own", "shared")}
        assert outcome["own"] == ["0\n", "", "", "0\n"], outcome
        assert (home / "own.copy").read_bytes() == data
        if user_allow_other:
            assert outcome["shared"] == ["0\n", "", "", "0\n"], outcome
            assert (home / "shared.copy").read_bytes() == data
        else:
            assert outcome["shared"] == [
                "1\n", "", f"vcfs: error: -o allow_other: a user other than root (uid {NOBODY}) "
                "needs user_allow_other in /etc/fuse.conf, which fusermount3 requires: as root, "
                "add that line, or mount without allow_other (the mount is then yours alone)\n",
                None], outcome
    finally:
        # A daemon left serving in the namespace would keep it: ended, it unmounts there.
        for pid in _daemons(home / "own") + _daemons(home / "shared"):
            os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _daemons(home / "own") + _daemons(home / "shared"), timeout=20,
                   what="the daemons exited")
        shutil.rmtree(work, ignore_errors=True)
