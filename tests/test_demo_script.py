"""scripts/demo, README's first command. Its refusals: what it checks before starting anything
(no set-up, no server, no mount), so that it never talks to a server it did not start or
unmounts what it did not mount. Its full runs: what it starts (a loopback origin, the service,
the vcfs mount) is stopped and unmounted at its end, on Ctrl-C and when it is killed."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import (
    VidcacheServer,
    command_line,
    descendants,
    free_port,
    listening_on,
    processes,
    tmpfs_holding_a_file,
    wait_until,
)
from tests.vcfs_support import VcfsMount, process_alive, requires_fuse
from vcfs.cli import mount_entry

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


@requires_fuse[0]
@requires_fuse[1]
def test_a_mount_point_that_cannot_be_listed_is_refused(tmp_path: Path) -> None:
    """`[[ -n $(ls -A DIR) ]]` took a directory ls could not read for an empty one (ls's failure
    masked): the demo started the service, ingested, and failed only at the mount. Here the
    directory's listing fails with EIO, on a FUSE file system of the test's
    (tests/unlistable_fs.py)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    served = subprocess.Popen([sys.executable, "-m", "tests.unlistable_fs", str(fs)],
                              cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: mount_entry(str(fs)) is not None or served.poll() is not None,
                   timeout=60, what="the unlistable file system mounted")
        assert mount_entry(str(fs)) is not None, served.returncode
        result = run_demo("--port", str(free_port()), "--mount", str(fs / "dir"))
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(fs)], check=False)
        served.wait(timeout=30)
    assert result.returncode == 1, result
    assert "Input/output error" in result.stderr, result.stderr  # ls's reason
    assert result.stderr.endswith(f"demo: {fs}/dir is not an empty directory; pass --mount DIR\n")
    assert "==>" not in result.stdout  # nothing was started


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "abc"], "--port takes a port number (1-65535), not 'abc'"),
    (["--port", "70000"], "--port takes a port number (1-65535), not '70000'"),
    (["--port", "0"], "--port takes a port number (1-65535), not '0'"),
    (["--port"], "--port needs a value"),
    (["--bogus"], "unknown option --bogus"),
])
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    result = run_demo(*args)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_a_port_with_a_leading_zero_is_a_usage_error(tmp_path: Path) -> None:
    """--port 010 passed the range check as octal 8, then went to the service, which listens
    on 10 (08 was refused after bash's "value too great for base"). Here the demo would then
    refuse its mount point, in which there is a file."""
    (tmp_path / "file").write_text("x")
    result = run_demo("--port", "010", "--mount", str(tmp_path))
    assert (result.returncode, result.stderr) == (
        2, "demo: --port takes a port number (1-65535), not '010' (see --help)\n")


def test_help_explains_each_option_and_shows_no_code() -> None:
    result = run_demo("--help")
    assert result.returncode == 0
    assert "set -" not in result.stdout  # it printed the script's next line
    for line in ("--keep        leave the service and the mount up until Ctrl-C",
                 "--mount DIR   mount point", "(default /mnt/vc)",
                 "--port PORT   the service's port on 127.0.0.1 (default 8020)"):
        assert line in result.stdout, result.stdout


# ---------------------------------------------------------------------------------------------
# Full runs: what the demo starts is stopped at its end, on Ctrl-C and when it is killed.
# A run took 8 s here once installed (scripts/setup then does nothing); the first one also
# encodes the sample (24 s in all), once, into the checkout's demo-data/ (kept out of git).

REPO = DEMO.parent.parent
KEPT_UP = "stay up; press Ctrl-C to stop both."
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the demo installs with apt-get and "
                             "mounts with -o allow_other: run as root")


@dataclass
class Demo:
    """One `scripts/demo` run in a session of its own, as a terminal's foreground job (a
    Ctrl-C reaches its whole process group), its output in `output`."""

    process: subprocess.Popen[bytes]
    port: int
    mountpoint: Path
    output: Path
    children: dict[int, str] = field(default_factory=dict)  # its background processes

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_kept_up(self) -> None:
        """Until it says the service and the mount stay up (--keep); then note its children."""
        wait_until(lambda: KEPT_UP in self.text() or self.process.poll() is not None,
                   timeout=300, what="the demo's service and mount up")
        assert self.process.poll() is None, f"the demo exited early:\n{self.text()}"
        self.children = descendants(self.process.pid)

    def leftovers(self) -> list[str]:
        """What of the run is still there: its mount (live or stale), a listener on its
        port, its background processes."""
        left = [f"pid {pid}: {command}" for pid, command in self.children.items()
                if process_alive(pid)]
        if mount_entry(str(self.mountpoint)) is not None:
            left.append(f"a mount at {self.mountpoint}")
        if listening_on(self.port):
            left.append(f"a listener on port {self.port}")
        return left


@contextlib.contextmanager
def demo(tmp_path: Path, *options: str, mountpoint: Path | None = None,
         through_symlink: bool = False) -> Iterator[Demo]:
    """Run the demo from tmp_path on a free port with its mount at `mountpoint` (tmp_path/mnt
    by default); `through_symlink`: by a symlink to it in tmp_path/bin (as `ln -s` into a
    directory on PATH). Leaving kills, by PID, what of the run is still there and unmounts its
    mount point."""
    port = free_port()
    mountpoint = mountpoint or tmp_path / "mnt"
    output = tmp_path / "demo.out"
    script = DEMO
    if through_symlink:
        script = tmp_path / "bin" / "vc-demo"
        script.parent.mkdir()
        script.symlink_to(DEMO)
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [str(script), *options, "--port", str(port), "--mount", str(mountpoint)],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True)
    run = Demo(process, port, mountpoint, output)
    try:
        yield run
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        for pid, command in run.children.items():
            if process_alive(pid) and command_line(pid) == command:  # not a reused PID
                os.kill(pid, signal.SIGKILL)
        if mount_entry(str(mountpoint)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        print(f"--- the demo's output ---\n{run.text()}")


def assert_kept_up(run: Demo) -> None:
    """--keep: the play command it prints names the mounted video, the service and the mount
    (-o allow_other, README: for a desktop user's player) answer, and its three background
    processes are the origin, the service and vcfs."""
    played = re.search(r"^Play it:  mpv (\S+)   \(or vlc, as your desktop user\)$", run.text(),
                       re.MULTILINE)
    assert played, run.text()
    assert Path(played[1]).parent == run.mountpoint / "by-hash"
    sample = REPO / "demo-data" / "samples" / "sample.mp4"
    assert os.stat(played[1]).st_size == sample.stat().st_size
    options = subprocess.run(["findmnt", "-no", "OPTIONS", "--mountpoint", str(run.mountpoint)],
                             capture_output=True, text=True, check=True).stdout
    assert "allow_other" in options.strip().split(","), options
    assert httpx.get(f"http://127.0.0.1:{run.port}/health").status_code == 200
    assert (f"Service on http://127.0.0.1:{run.port} and mount at {run.mountpoint} {KEPT_UP}"
            in run.text())
    kinds = sorted(kind for command in run.children.values()
                   for kind in ("-m http.server", "vcfs mount", "vidcache serve")
                   if kind in command)
    assert len(run.children) == 3 and kinds == ["-m http.server", "vcfs mount",
                                                "vidcache serve"], run.children


def assert_cleared(mountpoint: Path) -> None:
    """Nothing mounted at `mountpoint`, nor a stale mount there: an empty directory."""
    assert mount_entry(str(mountpoint)) is None
    assert os.listdir(mountpoint) == []


@requires_fuse[0]
@requires_fuse[1]
@as_root
@pytest.mark.timeout(600)  # the first run also generates the sample
@pytest.mark.parametrize(("sent", "status"), [(signal.SIGTERM, 143),
                                              (signal.SIGKILL, -signal.SIGKILL)],
                         ids=["kill", "kill -9"])
def test_a_killed_demo_leaves_nothing_running_or_mounted(
        tmp_path: Path, sent: signal.Signals, status: int) -> None:
    """README: "The servers and the mount it starts are stopped even if the demo itself is
    killed (`kill -9` ...)": on SIGTERM its trap stops them; SIGKILL runs no trap, and its
    background processes get SIGTERM from the kernel as it dies (setpriv --pdeathsig)."""
    with demo(tmp_path, "--keep") as run:
        run.wait_kept_up()
        assert_kept_up(run)
        os.kill(run.process.pid, sent)  # the script alone, not its group
        assert run.process.wait(timeout=60) == status
        try:
            wait_until(lambda: not run.leftovers(), timeout=60,
                       what="the killed demo's processes and mount gone")
        except TimeoutError:
            pytest.fail(f"left behind by the killed demo: {run.leftovers()}")
        assert_cleared(run.mountpoint)


@requires_fuse[0]
@requires_fuse[1]
@as_root
@pytest.mark.timeout(600)  # the first run also generates the sample
def test_ctrl_c_stops_a_kept_demo_and_its_start_clears_a_stale_mount(
        tmp_path: Path, vidcache_server: VidcacheServer) -> None:
    """--keep: "press Ctrl-C to stop both": the demo exits 130 (interrupted) once everything it
    started is stopped and unmounted. README: "a stale mount an earlier run left there is
    cleared": the demo starts on the dead mount a killed vcfs left at DIR."""
    mountpoint = tmp_path / "mnt"
    crashed = VcfsMount(vidcache_server.url, mountpoint).start()
    try:
        crashed.kill()
        with pytest.raises(OSError) as caught:
            os.listdir(mountpoint)
        assert caught.value.errno == errno.ENOTCONN  # "Transport endpoint is not connected"
        with demo(tmp_path, "--keep", mountpoint=mountpoint) as run:
            run.wait_kept_up()
            assert_kept_up(run)
            os.killpg(run.process.pid, signal.SIGINT)  # as a terminal sends Ctrl-C
            assert run.process.wait(timeout=60) == 130
            # The demo stops, and waits for, what it started before it exits.
            assert run.leftovers() == []
            assert_cleared(mountpoint)
    finally:
        crashed.stop()  # the stale mount, if the demo did not start


@requires_fuse[0]
@requires_fuse[1]
@as_root
@pytest.mark.timeout(600)  # the first run also generates the sample
def test_a_demo_run_to_its_end_stops_everything_and_says_how_to_keep_it(tmp_path: Path) -> None:
    """README: "It stops everything at the end" (and the logs of every run are in demo-data/);
    its last line gives the --keep command for the same port and mount point, and mpv's. Run
    by a symlink placed elsewhere, it works in its checkout (it took the symlink's directory's
    parent for the checkout: no scripts/setup there, exit 127)."""
    with demo(tmp_path, through_symlink=True) as run:
        assert run.process.wait(timeout=300) == 0, run.text()
        hint = re.search(r"^Done; stopping\. To play it, run 'scripts/demo --keep (.*)', then: "
                         r"mpv (\S+)$", run.text(), re.MULTILINE)
        assert hint, run.text()
        assert hint[1] == f"--port {run.port} --mount {run.mountpoint}"
        assert Path(hint[2]).parent == run.mountpoint / "by-hash"
        origin = re.search(r"^==> ingesting http://127\.0\.0\.1:(\d+)/", run.text(), re.MULTILINE)
        assert origin, run.text()
        assert not listening_on(run.port) and not listening_on(int(origin[1]))
        mentions = (str(run.mountpoint), f"--port {run.port}", f"demo-data/samples {origin[1]}")
        assert [command for command in map(command_line, processes())
                if any(mention in command for mention in mentions)] == []
        assert_cleared(run.mountpoint)
        for log in ("vidcache.log", "vcfs.log", "origin.log"):
            assert (REPO / "demo-data" / log).stat().st_size > 0, log


@as_root
@pytest.mark.timeout(600)  # the first run also generates the sample
def test_a_service_that_cannot_start_is_reported_with_the_end_of_its_log(tmp_path: Path) -> None:
    """The demo's wait for its service fails at once when the service exits, with the end of
    the service's log, and leaves nothing running. Here another vidcache holds the demo's data
    directory (one service per data directory)."""
    holder = VidcacheServer(REPO / "demo-data" / "store").start()
    try:
        with demo(tmp_path) as run:
            assert run.process.wait(timeout=300) == 1, run.text()
            log = REPO / "demo-data" / "vidcache.log"
            report = run.text().partition(f"demo: vidcache on http://127.0.0.1:{run.port} did "
                                          f"not start; the end of {log}:\n")[2]
            assert "is in use by another vidcache process" in report, run.text()
            assert "==> ingesting" not in run.text()
            assert not listening_on(run.port)
            assert [command for command in map(command_line, processes())
                    if "demo-data/samples" in command or f"--port {run.port}" in command] == []
            assert mount_entry(str(run.mountpoint)) is None
        assert httpx.get(f"{holder.url}/health").status_code == 200  # the demo left it alone
    finally:
        holder.stop()
        holder.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def sample_set_aside() -> Iterator[Path]:
    """The checkout's demo sample moved aside for the test (the demo then encodes it again),
    and put back after it, the encoding's .part removed; yields the sample's path."""
    sample = REPO / "demo-data" / "samples" / "sample.mp4"
    kept = sample.with_name("sample.mp4.kept-by-test")
    if sample.exists():
        sample.rename(kept)
    try:
        yield sample
    finally:
        sample.with_name("sample.mp4.part").unlink(missing_ok=True)
        if kept.exists():
            kept.replace(sample)


def _video_seconds(path: Path) -> float:
    """The duration ffprobe reads in `path`; 0 when it cannot read one."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                            "-of", "csv=p=0", str(path)], capture_output=True, text=True,
                           check=False)
    try:
        return float(probe.stdout.strip())
    except ValueError:
        return 0.0


@as_root
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("sent", "status"), [(signal.SIGTERM, 143),
                                              (signal.SIGKILL, -signal.SIGKILL)],
                         ids=["kill", "kill -9"])
def test_a_demo_killed_while_it_encodes_the_sample_stops_the_encoding(
        tmp_path: Path, sent: signal.Signals, status: int) -> None:
    """Was: the encoding ran in the foreground, so a SIGTERM waited for its end (~20 s here)
    and a kill -9 left it running, writing the .part the next run's ffmpeg writes too. Now it
    stops with the demo: no sample, and what was encoded is short of the 30 s."""
    with sample_set_aside() as sample, demo(tmp_path) as run:
        part = sample.with_name("sample.mp4.part")

        def encoder() -> list[int]:
            return [pid for pid in processes() if str(part) in command_line(pid)
                    and command_line(pid).startswith("ffmpeg")]

        wait_until(lambda: encoder() or run.process.poll() is not None, timeout=120,
                   what="the demo encoding its sample")
        assert encoder(), run.text()
        os.kill(run.process.pid, sent)  # the script alone, not its group
        assert run.process.wait(timeout=60) == status, run.text()
        wait_until(lambda: not encoder(), timeout=30, what="the sample's ffmpeg gone")
        assert not sample.exists()
        assert _video_seconds(part) < 29, "the encoding ran on to its end"
