"""Real parts for the tests: generated videos, a loopback HTTP server, the vidcache service;
and a hand-cranked executor, whose background work runs when the test says.

Every stored video must be perceptually distinct from the others (the service dedups near
copies), except `a_small.mp4`, which is a re-encode of `a.mp4` on purpose: ingest it only into
a server of your own, or `a.mp4` can never be stored there. Sources are seeded, so every run
generates the same videos.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx
import pytest

from bench.stack import free_port, serving, wait_until
from bench.stack import origin as serve_directory

# the loopback helpers are the benchmark's (bench/stack.py), shared so they exist once
__all__ = ["ESTABLISHED", "LISTEN", "SYN_SENT", "VIDEO_SPECS", "ManualExecutor", "VidcacheServer",
           "command_line", "descendants", "documented_options", "free_port", "listening_on",
           "make_videos", "new_cgroup", "open_descriptors", "preload_library", "processes",
           "self_signed_certificate", "serve_directory", "serving", "sighup_in_children",
           "sockets_to_loopback", "subcommand_options", "tmpfs_holding_a_file", "wait_until"]


def preload_library(name: str, out_dir: Path) -> Path:
    """tests/<name>.c built with cc into `out_dir` as an LD_PRELOAD library (a disk that fails
    or stalls on request). Skips the test without cc."""
    if (cc := shutil.which("cc")) is None:
        pytest.skip("needs cc")
    library = out_dir / f"{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(library),
                    str(Path(__file__).with_name(f"{name}.c")), "-ldl"], check=True)
    return library


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) files in `folder` for 127.0.0.1 only (no host name), valid a day."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


ESTABLISHED, SYN_SENT, LISTEN = "01", "02", "0A"  # TCP states as /proc/net/tcp writes them


def _tcp_sockets() -> Iterator[tuple[str, str, str, str]]:
    """(local address, remote address, state, inode) of every TCP socket on this machine, IPv4
    and IPv6, as /proc/net/tcp and tcp6 write them (hex ADDRESS:PORT)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            _slot, local, remote, state, _queues, _timer, _retransmits, _uid, _timeout, inode, \
                *_ = line.split()
            yield local, remote, state, inode


def sockets_to_loopback(port: int, state: str, *, pid: int | None = None) -> int:
    """How many TCP sockets on this machine (of process `pid` only, if given) are connected
    (or connecting) to 127.0.0.1:`port` in `state`."""
    inodes = None if pid is None else _socket_inodes(pid)
    return sum(1 for _, remote, in_state, inode in _tcp_sockets()
               if remote == f"0100007F:{port:04X}" and in_state == state
               and (inodes is None or inode in inodes))


def open_descriptors(pid: int | str) -> list[str]:
    """What each descriptor process `pid` ("self" for this one) has open names: a file's path,
    `socket:[INODE]`, `pipe:[INODE]`..."""
    targets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since it was listed
            targets.append(os.readlink(fd))
    return targets


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` has open."""
    return {target[len("socket:["):-1] for target in open_descriptors(pid)
            if target.startswith("socket:[")}


def listening_on(port: int) -> bool:
    """Whether a TCP socket on this machine listens on `port` (any address, IPv4 or IPv6)."""
    return any(state == LISTEN and int(local.rsplit(":", 1)[1], 16) == port
               for local, _, state, _ in _tcp_sockets())


def command_line(pid: int) -> str:
    """The process's argv joined by spaces; "" once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):  # gone, or exiting between open and read
        return ""


def processes() -> dict[int, int]:
    """The live processes on this machine (zombies not counted): PID -> parent PID."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the command may hold spaces and parentheses: the fields follow the last ')'
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except (FileNotFoundError, ProcessLookupError):  # exited before the open or the read
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> dict[int, str]:
    """The live processes under `pid` (children, theirs ...): PID -> command line."""
    parents = processes()
    found: dict[int, str] = {}
    generation = [pid]
    while generation:
        generation = [child for child, parent in parents.items() if parent in generation]
        found.update((child, command_line(child)) for child in generation)
    return found


@contextlib.contextmanager
def sighup_in_children(*, ignored: bool) -> Iterator[None]:
    """Processes started inside get SIGHUP ignored (as under nohup) or, whatever the tests run
    under, its default action (as from a terminal). Children inherit an ignored signal; a
    handler of the caller's own, the no-op here, is reset to the default by exec."""
    previous = signal.signal(signal.SIGHUP,
                             signal.SIG_IGN if ignored else lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


@contextlib.contextmanager
def tmpfs_holding_a_file(target: Path) -> Iterator[Path]:
    """A tmpfs mounted at the new directory `target` (root only), holding one file, whose path
    is yielded: what a command refusing to unmount it must leave. Unmounted at the end."""
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(target)], check=True)
    try:
        notes = target / "notes"
        notes.write_text("keep me")
        yield notes
    finally:
        subprocess.run(["umount", str(target)], check=False)


_X264 = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
# a keyframe every 2 s, as in real footage, so a seek need not decode from the start; one
# encoder thread, as x264's threads under a rate cap make other bytes on every run (big.mp4
# measured 22 030 861-22 038 556 bytes): where a file's last block falls, and what tests of
# it do, then changed from session to session
_BIG = ["-c:v", "libx264", "-preset", "ultrafast", "-threads", "1", "-pix_fmt", "yuv420p",
        "-g", "50", "-b:v", "20M", "-maxrate", "20M", "-bufsize", "40M"]

# name -> ffmpeg arguments between `ffmpeg -y` and the output path. Generated in this order,
# so a re-encode may read a file made before it ({dir} is the output folder).
VIDEO_SPECS: dict[str, list[str]] = {
    # small mp4 with the moov atom first (faststart)
    "a.mp4": ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=6",
              *_X264, "-movflags", "+faststart"],
    # the same video re-encoded smaller at another bitrate: a perceptual duplicate of a.mp4
    "a_small.mp4": ["-i", "{dir}/a.mp4", "-vf", "scale=240:180", *_X264, "-b:v", "150k"],
    # a different video
    "b.mp4": ["-f", "lavfi", "-i", "mandelbrot=size=320x240:rate=25", "-t", "6", *_X264],
    # a non-mp4 container
    "c.mkv": ["-f", "lavfi", "-i", "cellauto=size=320x240:rate=25:rule=110:seed=7", "-t", "6",
              *_X264],
    # ~20 MB at 20 Mb/s, faststart: for block/readahead/probe-fraction tests
    "big.mp4": ["-f", "lavfi", "-i", "testsrc=size=1280x720:rate=25:duration=8",
                "-vf", "noise=alls=40:allf=t", *_BIG, "-movflags", "+faststart"],
    # ~20 MB at 20 Mb/s with the moov atom at the end (ffmpeg's default for mp4)
    # (not `gradients`: its frames differ from run to run whatever its seed)
    "big_moov_end.mp4": ["-f", "lavfi", "-i", "life=size=1280x720:rate=25:seed=7:mold=10",
                         "-t", "8", "-vf", "noise=alls=40:allf=t", *_BIG],
}


@contextlib.contextmanager
def new_cgroup(controller: str, prepare: Callable[[Path, bool], None] = lambda d, v1: None,
               ) -> Iterator[tuple[Path, bool, list[str]]]:
    """A new cgroup of `controller` ("memory", "pids"): (its directory, whether it is cgroup
    v1's, an argv prefix that runs a command in it), `prepare`d (its limits written) before it
    is handed over; skips without a hierarchy of that controller this process may create a
    cgroup in (v1's, or v2's with the controller enabled at the root) and prepare. Removed on
    leaving, once the child has exited."""
    name = f"vcfs-test-{os.getpid()}"
    for root in (Path("/sys/fs/cgroup") / controller, Path("/sys/fs/cgroup"),
                 Path("/sys/fs/cgroup/unified")):
        v1 = root.name == controller
        controllers = root / "cgroup.subtree_control"
        if not v1 and not (controllers.exists()
                           and controller in controllers.read_text().split()):
            continue
        if not (root / "cgroup.procs").exists():
            continue
        directory = root / name
        try:
            directory.mkdir()
        except OSError:
            continue
        try:
            try:
                prepare(directory, v1)
            except OSError:
                continue
            procs = shlex.quote(str(directory / "cgroup.procs"))
            yield directory, v1, ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]
            return
        finally:
            directory.rmdir()
    pytest.skip(f"needs a {controller} cgroup hierarchy this process can create a cgroup in "
                "(root)")


def make_videos(out_dir: Path) -> dict[str, Path]:
    """Generate the test corpus (plus `notvideo.bin`) into `out_dir`; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, args in VIDEO_SPECS.items():
        path = out_dir / name
        if not path.exists():
            argv = [a.replace("{dir}", str(out_dir)) for a in args]
            # Made before the first test (conftest), out of reach of any test's hang guard.
            subprocess.run(["ffmpeg", "-v", "error", "-y", *argv, str(path)], check=True,
                           timeout=300)
        paths[name] = path
    junk = out_dir / "notvideo.bin"
    junk.write_bytes(os.urandom(64 * 1024))
    paths[junk.name] = junk
    return paths


class VidcacheServer:
    """The real `vidcache serve` in a subprocess on 127.0.0.1 (or `host`), allowed to ingest
    from loopback."""

    def __init__(self, data_dir: Path, *extra_args: str, port: int | None = None,
                 new_session: bool = False, host: str = "127.0.0.1") -> None:
        """`new_session`: the server leads a process group of its own, as a shell's foreground
        job does (a Ctrl-C reaches the whole group)."""
        self.data_dir = data_dir
        self.new_session = new_session
        self.extra_args = list(extra_args)
        self.host = host
        self.port = port or free_port()
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []  # an argv the server runs under (new_cgroup's)

    def command(self) -> list[str]:
        """The argv after the interpreter: `-m vidcache` here; subclasses may run a launcher."""
        return ["-m", "vidcache"]

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 30.0) -> VidcacheServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, *self.command(), "serve", "--data", str(self.data_dir),
                "--host", self.host, "--port", str(self.port),
                "--ingest-allow", "127.0.0.1", *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([*self.prefix, *argv], stdout=log,
                                            stderr=subprocess.STDOUT,
                                            env=self.environment(),
                                            start_new_session=self.new_session)
        try:
            wait_until(self._healthy, timeout=timeout, what=f"vidcache on {self.url}")
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"vidcache did not start:\n{self.log()}") from exc
        return self

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"vidcache exited with {self.process.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: a crash, for recovery tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> VidcacheServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Interrupted:
    """How a command Ctrl-C'd while it waited for a server ended."""

    returncode: int
    out: str
    err: str
    children: list[int]  # its child processes when it was interrupted


def _ctrl_c(command: int, _children: list[int]) -> None:
    os.kill(command, signal.SIGINT)


def interrupt_while_it_waits(
    argv_for: Callable[[str], Sequence[str]], *,
    interrupt: Callable[[int, list[int]], None] = _ctrl_c,
) -> Interrupted:
    """Run `argv_for(url)` against a server at `url` that accepts and never answers, and
    `interrupt` it once it has connected, given its PID and its children's: by default
    SIGINT to it (a terminal's Ctrl-C)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(60)
        command = subprocess.Popen(
            argv_for(f"http://127.0.0.1:{silent.getsockname()[1]}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            connection, _ = silent.accept()  # the command waits for the answer
            with connection:
                children = [int(pid) for pid in Path(
                    f"/proc/{command.pid}/task/{command.pid}/children").read_text().split()]
                interrupt(command.pid, children)
                out, err = command.communicate(timeout=60)
        finally:
            if command.poll() is None:
                command.kill()
                command.wait()
    return Interrupted(command.returncode, out, err, children)


_P = ParamSpec("_P")
_T = TypeVar("_T")


class ManualExecutor(Executor):
    """Queues submitted calls until the test runs them: deterministic 'background' work."""

    def __init__(self) -> None:
        self.queue: list[tuple[Future[Any], Callable[[], Any]]] = []

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
               ) -> Future[_T]:
        future: Future[_T] = Future()
        self.queue.append((future, functools.partial(fn, *args, **kwargs)))
        return future

    def run_one(self) -> None:
        future, call = self.queue.pop(0)
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def run_all(self) -> None:
        while self.queue:
            self.run_one()

    def pending(self) -> int:
        return sum(not future.done() for future, _ in self.queue)


def documented_options(doc: Path, heading: str) -> dict[str, str]:
    """The options table under `heading` (up to the next `## `) of a Markdown doc: each row
    whose first cell starts with `` `- ``, as {option: its second cell, the default}."""
    section = doc.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `-")]
    return {row[0].strip("| `").split()[0]: row[1].strip() for row in rows}


def subcommand_options(parser: argparse.ArgumentParser, command: str
                       ) -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """The parser of `command` and its options shown in --help, by their first spelling."""
    subparsers = next(action for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction))
    sub = subparsers.choices[command]
    return sub, {action.option_strings[0]: action for action in sub._actions
                 if action.option_strings and action.help != argparse.SUPPRESS
                 and action.dest != "help"}
