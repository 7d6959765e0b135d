"""scripts/demo's refusals: what it checks before starting anything (no set-up, no server, no
mount), so that it never talks to a server it did not start or unmounts what it did not mount.
The demo's full run is README's first command, run on a fresh clone before every release."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import free_port, tmpfs_holding_a_file

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
