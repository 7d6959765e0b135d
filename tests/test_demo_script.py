"""scripts/demo: its refusals, what it checks before starting anything (no set-up, no server,
no mount), so that it never talks to a server it did not start or unmounts what it did not
mount; and, with --keep, that what it started stops when it is interrupted or killed. The
demo's full run is README's first command, run on a fresh clone before every release."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import free_port, tmpfs_holding_a_file, wait_until

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo"


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DEMO), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run_demo("--port", str(port), "--mount", str(mountpoint))
    assert result.returncode == 1, result.stderr
    assert f"something already listens on 127.0.0.1:{port}" in result.stderr
    assert "==>" not in result.stdout  # nothing was started
    assert not mountpoint.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_mounted_mount_point_is_refused_and_left_mounted(tmp_path: Path) -> None:
    target = tmp_path / "in use"
    with tmpfs_holding_a_file(target) as notes:
        result = run_demo("--port", str(free_port()), "--mount", str(target))
        assert result.returncode == 1, result.stderr
        assert "is already a mount point (tmpfs)" in result.stderr, result.stderr
        assert notes.read_text() == "keep me"


def test_a_mount_point_with_files_in_it_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = run_demo("--port", str(free_port()), "--mount", str(tmp_path))
    assert result.returncode == 1
    assert "is not an empty directory" in result.stderr, result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "abc"], "--port takes a port number (1-65535), not 'abc'"),
    (["--port", "70000"], "--port takes a port number (1-65535), not '70000'"),
    (["--port"], "--port needs a value"),
    (["--bogus"], "unknown option --bogus"),
])
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    result = run_demo(*args)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_help_explains_each_option_and_shows_no_code() -> None:
    result = run_demo("--help")
    assert result.returncode == 0
    assert "set -" not in result.stdout  # it printed the script's next line
    for line in ("--keep        leave the service and the mount up until Ctrl-C",
                 "--mount DIR   mount point", "(default /mnt/vc)",
                 "--port PORT   the service's port on 127.0.0.1 (default 8020)"):
        assert line in result.stdout, result.stdout


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(child) for child in
                    Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:  # it has exited meanwhile
        return []
    return [grandchild for child in children for grandchild in [child, *_descendants(child)]]


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _mounted(path: Path) -> bool:
    """Whether something is mounted at `path`, a stale FUSE mount too (os.path.ismount says
    False for one: its stat fails)."""
    return any(line.split()[4] == str(path)
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo installs what it needs and mounts as root")
@pytest.mark.timeout(600)  # a first run on a fresh clone encodes the sample video too
@pytest.mark.parametrize("how", ["Ctrl-C", "kill", "kill -9"])
def test_what_a_kept_demo_started_stops_when_it_is_interrupted_or_killed(
    tmp_path: Path, how: str
) -> None:
    """README: with --keep the service and the mount stay up until Ctrl-C, and they are
    stopped even if the demo itself is killed (`kill`: its trap stops them; `kill -9`, which
    runs no trap: each background process gets SIGTERM from the kernel as its parent dies)."""
    port, mountpoint, out = free_port(), tmp_path / "mnt", tmp_path / "demo.out"
    with out.open("w") as output:
        demo = subprocess.Popen([str(DEMO), "--keep", "--port", str(port), "--mount",
                                 str(mountpoint)], stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group, as a terminal's job
    started: list[int] = []
    try:
        wait_until(lambda: ("press Ctrl-C to stop both" in out.read_text()
                            or demo.poll() is not None),
                   timeout=540, what="the demo to say it keeps the service and mount up")
        text = out.read_text()
        assert demo.poll() is None, text
        assert "identical: " in text and f"Play it:  mpv {mountpoint}/by-hash/" in text, text
        assert _mounted(mountpoint) and _listening(port)
        started = _descendants(demo.pid)  # the origin, the service and the mount's daemon
        assert len(started) >= 3, started
        if how == "Ctrl-C":  # a terminal's: to the whole job
            os.killpg(demo.pid, signal.SIGINT)
            assert demo.wait(timeout=60) == 130
        elif how == "kill":  # SIGTERM to the script alone
            demo.terminate()
            assert demo.wait(timeout=60) != 0
        else:
            demo.kill()
            demo.wait(timeout=60)
        wait_until(lambda: not any(_running(pid) for pid in started), timeout=60,
                   what="the processes the demo started to exit")
        assert not _mounted(mountpoint)  # nor left stale
        assert not _listening(port)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in started:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if _mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
