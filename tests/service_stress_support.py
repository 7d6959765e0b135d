"""Helpers for the service's crash, load, limit, disk and auth tests: many small perceptually
distinct videos, an origin that trickles its bodies, one that holds them half-way (or sends
them chunked), a vidcache server that kills itself with SIGKILL at a chosen point of its own
code, one that pauses there, one whose DNS server does not answer, and a check of a data
directory's invariants."""

from __future__ import annotations

import contextlib
import errno
import http.server
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from tests.service_support import blob_files, digest, temp_files
from tests.support import VidcacheServer, serving, wait_until

_SMALL = ["-t", "2", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]

# lavfi sources at 160x120, 2 s: pairwise perceptual distances measured 17-40 (of 64), far
# above the service's threshold of 10, so each is stored as a video of its own.
DISTINCT_SOURCES: dict[str, str] = {
    "testsrc": "testsrc=size=160x120:rate=10",
    "testsrc2": "testsrc2=size=160x120:rate=10",
    "mandelbrot": "mandelbrot=size=160x120:rate=10",
    "cell30": "cellauto=size=160x120:rate=10:rule=30:seed=1",
    "cell110": "cellauto=size=160x120:rate=10:rule=110:seed=3",
    "cell90": "cellauto=size=160x120:rate=10:rule=90:seed=3",
    "life": "life=size=160x120:rate=10:seed=5",
    "life2": "life=size=160x120:rate=10:seed=9:mold=10",
    "gradients": "gradients=size=160x120:rate=10:seed=11",
    "sierpinski": "sierpinski=size=160x120:rate=10:seed=2",
    "smptebars": "smptebars=size=160x120:rate=10",
    "mptestsrc": "mptestsrc=rate=10",
}


def make_distinct_videos(out_dir: Path, names: list[str]) -> dict[str, Path]:
    """`<name>.mp4` for each DISTINCT_SOURCES name in `names`; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = out_dir / f"{name}.mp4"
        if not path.exists():
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                            DISTINCT_SOURCES[name], *_SMALL, str(path)], check=True)
        paths[name] = path
    return paths


def make_reencode(source: Path, out: Path) -> Path:
    """A smaller, lower-bitrate copy of `source`: other bytes, the same video to the eye."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), "-vf", "scale=120:90",
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                    "-b:v", "60k", str(out)], check=True)
    return out


# --- loopback origins of a directory, each with its own handler -----------------------------

class _Origin:
    """A threaded loopback HTTP server of `directory`, its requests handled by a subclass of
    `handler` that knows this origin as `origin`; a context manager."""

    def __init__(self, directory: Path, handler: type[http.server.SimpleHTTPRequestHandler]
                 ) -> None:
        bound: type[http.server.SimpleHTTPRequestHandler] = type(
            "Handler", (handler,), {"origin": self})

        def make(*args: Any) -> http.server.SimpleHTTPRequestHandler:
            return bound(*args, directory=str(directory))

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._running = contextlib.ExitStack()

    def _release(self) -> None:
        """Let the answers under way end (called before the server shuts down)."""

    def __enter__(self) -> Self:
        self._running.enter_context(serving(self._server))
        self._running.callback(self._release)  # last in, first out: before the shutdown
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._running.close()


# --- an origin that trickles ---------------------------------------------------------------

class _TrickleHandler(http.server.SimpleHTTPRequestHandler):
    """`/slow/<name>[?...]` sends the file in `piece`-byte writes `pause` seconds apart (and
    records the bytes sent per request path); any other path is served normally."""

    origin: TrickleOrigin

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if not self.path.startswith("/slow/"):
            super().do_GET()
            return
        name = self.path.removeprefix("/slow/").partition("?")[0]
        data = (Path(self.directory) / name).read_bytes()
        origin = self.origin
        try:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for start in range(0, len(data), origin.piece):
                self.wfile.write(data[start:start + origin.piece])
                self.wfile.flush()
                origin.record(self.path, min(start + origin.piece, len(data)))
                if origin.closing.wait(origin.pause):  # pacing, not synchronisation
                    return
        except OSError:  # the downloading server was killed
            self.close_connection = True


class TrickleOrigin(_Origin):
    def __init__(self, directory: Path, *, piece: int, pause: float) -> None:
        self.directory = directory
        self.piece = piece
        self.pause = pause
        self.closing = threading.Event()
        self._sent: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__(directory, _TrickleHandler)

    def record(self, path: str, sent: int) -> None:
        with self._lock:
            self._sent[path] = sent

    def sent(self, path: str) -> int:
        """Bytes of `/slow/...` request path `path` sent so far (by its latest request)."""
        with self._lock:
            return self._sent.get(path, 0)

    def _release(self) -> None:
        self.closing.set()


# --- an origin that holds its bodies half-way, or sends them chunked -------------------------

class _HoldingHandler(http.server.SimpleHTTPRequestHandler):
    """`/chunked/<name>`: the file in chunks of the origin's `chunk` bytes (Transfer-Encoding:
    chunked, its size not announced); `/held/<name>`: its Content-Length and half of it, the
    rest once the origin's `resume()` is called. Other paths are served normally."""

    protocol_version = "HTTP/1.1"  # for chunked answers
    origin: HoldingOrigin

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        how, _, name = self.path.strip("/").partition("/")
        if how not in ("chunked", "held"):
            super().do_GET()
            return
        resume = self.origin.resumed
        data = (Path(self.directory) / name).read_bytes()
        self.close_connection = True
        self.send_response(200)
        self.send_header("Connection", "close")
        try:
            if how == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = self.origin.chunk
                for start in range(0, len(data), chunk):
                    piece = data[start:start + chunk]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                resume.wait(timeout=60)
                self.wfile.write(data[len(data) // 2:])
        except OSError:  # the server hung up: what a refused download does
            pass


class HoldingOrigin(_Origin):
    """A loopback origin of `directory` (see _HoldingHandler)."""

    def __init__(self, directory: Path, *, chunk: int = 64 * 1024) -> None:
        self.chunk = chunk
        self.resumed = threading.Event()
        super().__init__(directory, _HoldingHandler)

    def resume(self) -> None:
        """Send the rest of the `/held/` answers under way; later ones are held again."""
        resumed, self.resumed = self.resumed, threading.Event()
        resumed.set()

    def _release(self) -> None:
        self.resumed.set()


# --- a server that kills itself at a chosen point ----------------------------------------------

# Runs `vidcache` with an audit hook (PEP 578). Python raises audit events right before the
# operations that matter here: "open" (files and directories), "os.rename" (os.replace),
# "os.remove", "subprocess.Popen". Once armed by SIGUSR1 (which also creates the file
# $VIDCACHE_TEST_ARMED), the hook SIGKILLs the process at the first event named
# $VIDCACHE_TEST_KILL_EVENT whose arguments contain $VIDCACHE_TEST_KILL_MATCH, after
# $VIDCACHE_TEST_KILL_DELAY seconds (0: before the operation happens).
_LAUNCHER = r"""
import os, signal, sys, threading
event = os.environ["VIDCACHE_TEST_KILL_EVENT"]
match = os.environ["VIDCACHE_TEST_KILL_MATCH"]
delay = float(os.environ["VIDCACHE_TEST_KILL_DELAY"])
marker = os.environ["VIDCACHE_TEST_ARMED"]
state = {"armed": False, "fired": False}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def hook(name, args):
    if name != event or not state["armed"] or state["fired"] or match not in repr(args):
        return
    state["fired"] = True
    if delay > 0:
        threading.Timer(delay, die).start()
    else:
        die()

def arm(_signum, _frame):
    with open(marker, "w"):
        pass
    state["armed"] = True

signal.signal(signal.SIGUSR1, arm)
sys.addaudithook(hook)
from vidcache.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass(frozen=True)
class KillPoint:
    """Where a KillableServer dies: the first audit `event` whose arguments contain `match`,
    `delay` seconds later."""

    event: str
    match: str
    delay: float = 0.0


class KillableServer(VidcacheServer):
    """The real service, run through _LAUNCHER so that it can be armed to SIGKILL itself at a
    KillPoint; without arming it behaves exactly like `vidcache serve`."""

    def __init__(self, data_dir: Path, kill: KillPoint | None, *extra_args: str) -> None:
        super().__init__(data_dir, *extra_args)
        self.kill_point = kill
        self.marker = data_dir.parent / f"{data_dir.name}-armed"

    def command(self) -> list[str]:
        return ["-c", _LAUNCHER]

    def environment(self) -> dict[str, str]:
        kill = self.kill_point or KillPoint("-none-", "-none-")
        return {**os.environ, "VIDCACHE_TEST_KILL_EVENT": kill.event,
                "VIDCACHE_TEST_KILL_MATCH": kill.match,
                "VIDCACHE_TEST_KILL_DELAY": str(kill.delay),
                "VIDCACHE_TEST_ARMED": str(self.marker)}

    def start(self, timeout: float = 30.0) -> KillableServer:
        self.marker.unlink(missing_ok=True)
        super().start(timeout)
        return self

    def arm(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR1)
        wait_until(self.marker.exists, timeout=10, what="the kill hook armed")

    def died(self) -> bool:
        return self.process is not None and self.process.poll() is not None


# --- a server that pauses at a chosen point ------------------------------------------------------

# Runs `vidcache` with an audit hook that holds the thread raising the first audit event named
# $VIDCACHE_TEST_PAUSE_EVENT whose arguments contain $VIDCACHE_TEST_PAUSE_MATCH: it creates the
# file $VIDCACHE_TEST_PAUSED and waits (up to 120 s) for the file $VIDCACHE_TEST_RELEASE. Every
# rename's target (os.replace too) is appended to the file $VIDCACHE_TEST_RENAMES. SQLite raises
# no event of its own as it runs a statement, so the launcher adds one: "test.sql", with the
# statement, as each statement of any connection starts (before a COMMIT's work: the
# transaction is open and holds the index's write lock).
_PAUSE_LAUNCHER = r"""
import os, sqlite3, sys, time
event = os.environ["VIDCACHE_TEST_PAUSE_EVENT"]
match = os.environ["VIDCACHE_TEST_PAUSE_MATCH"]
paused = os.environ["VIDCACHE_TEST_PAUSED"]
release = os.environ["VIDCACHE_TEST_RELEASE"]
renames = os.environ["VIDCACHE_TEST_RENAMES"]
state = {"fired": False}

def hook(name, args):
    if name == "os.rename":
        with open(renames, "a") as record:
            record.write(f"{args[1]}\n")
    if name != event or state["fired"] or match not in repr(args):
        return
    state["fired"] = True
    open(paused, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)

sys.addaudithook(hook)
connect = sqlite3.connect

def traced_connect(*args, **kwargs):
    connection = connect(*args, **kwargs)
    connection.set_trace_callback(lambda statement: sys.audit("test.sql", statement))
    return connection

sqlite3.connect = traced_connect
from vidcache.cli import main
sys.exit(main(sys.argv[1:]))
"""


class PausingServer(VidcacheServer):
    """The real service, run through _PAUSE_LAUNCHER: the first thread to reach `point`
    (an audit event and a string its arguments contain) waits there until `release()`."""

    def __init__(self, data_dir: Path, point: tuple[str, str], *extra_args: str) -> None:
        super().__init__(data_dir, *extra_args)
        self.point = point
        self._paused, self._released, self._renames = (
            data_dir.parent / f"{data_dir.name}-{what}" for what in ("paused", "released",
                                                                     "renames"))

    def command(self) -> list[str]:
        return ["-c", _PAUSE_LAUNCHER]

    def environment(self) -> dict[str, str]:
        event, match = self.point
        return {**os.environ, "VIDCACHE_TEST_PAUSE_EVENT": event,
                "VIDCACHE_TEST_PAUSE_MATCH": match,
                "VIDCACHE_TEST_PAUSED": str(self._paused),
                "VIDCACHE_TEST_RELEASE": str(self._released),
                "VIDCACHE_TEST_RENAMES": str(self._renames)}

    def paused(self) -> bool:
        return self._paused.exists()

    def release(self) -> None:
        self._released.touch()

    def renamed_to(self) -> list[str]:
        """The targets of every rename the server made."""
        return self._renames.read_text().splitlines() if self._renames.exists() else []



# --- a server whose DNS server does not answer ---------------------------------------------------

# Runs `vidcache` in a mount namespace of its own (in a user namespace: no privilege needed) in
# which /etc/resolv.conf is the file sys.argv[1]: the system resolver (glibc's getaddrinfo) then
# asks the DNS server named there. The mount is seen by this process alone and ends with it; no
# file of the system changes.
_SILENT_DNS_LAUNCHER = r"""
import os, sys
resolv_conf, args = sys.argv[1], sys.argv[2:]
os.execvp("unshare", ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                      'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv_conf,
                      sys.executable, "-m", "vidcache", *args])
"""

# glibc's longest: 30 s per attempt, and 2 attempts
_RESOLVER_OPTIONS = "options timeout:30 attempts:2"


def _dns_socket() -> socket.socket:
    """A UDP socket on port 53 of a loopback address of its own (127.53.x.y): tests running at
    once do not share it."""
    for _ in range(20):
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            dns.bind((f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}", 53))
        except OSError as exc:
            dns.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return dns
    raise RuntimeError("no free loopback address for a DNS server")


def can_run_a_silent_dns() -> bool:
    """Whether this machine lets a test listen on port 53 of a loopback address other than
    127.0.0.1 (root; some sandboxes have that one only) and bind a file over /etc/resolv.conf
    in the namespaces above (a machine may have no /etc/resolv.conf)."""
    try:
        _dns_socket().close()
    except (OSError, RuntimeError):
        return False
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         'mount --bind "$0" /etc/resolv.conf', "/etc/hosts"], capture_output=True,
        check=False).returncode == 0


class SilentDnsServer(VidcacheServer):
    """The real service, run through _SILENT_DNS_LAUNCHER, whose only DNS server receives the
    queries and never answers: a lookup of a host name not in /etc/hosts waits in the system
    resolver for a minute (_RESOLVER_OPTIONS). The server's own start resolves only its numeric
    --host, which needs no DNS."""

    def __init__(self, data_dir: Path, *extra_args: str, new_session: bool = False) -> None:
        super().__init__(data_dir, *extra_args, new_session=new_session)
        self._resolv_conf = data_dir.parent / f"{data_dir.name}-resolv.conf"
        self._dns: socket.socket | None = None
        self._asked = False

    def command(self) -> list[str]:
        return ["-c", _SILENT_DNS_LAUNCHER, str(self._resolv_conf)]

    def start(self, timeout: float = 30.0) -> SilentDnsServer:
        self._dns = _dns_socket()
        self._dns.setblocking(False)
        self._resolv_conf.write_text(
            f"nameserver {self._dns.getsockname()[0]}\n{_RESOLVER_OPTIONS}\n")
        try:
            super().start(timeout)
        except BaseException:
            self.release()
            raise
        return self

    def asked(self) -> bool:
        """Whether the DNS server has received a query (which it drops)."""
        if not self._asked and self._dns is not None:
            with contextlib.suppress(BlockingIOError):
                self._asked = bool(self._dns.recv(512))
        return self._asked

    def release(self) -> None:
        """Close the DNS server: a lookup still asking it fails at once (port unreachable)."""
        if self._dns is not None:
            self._dns.close()
            self._dns = None

    def stop(self) -> None:
        self.release()
        super().stop()


# --- invariants of a data directory ---------------------------------------------------------

_INTERNAL = re.compile(r"index\.sqlite3(-wal|-shm)?|lock|tmp")


def listing(base_url: str) -> list[dict[str, Any]]:
    """Every stored video's metadata, following the `next` cursor."""
    items: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000, **({"after": after} if after else {})}
        page = httpx.get(f"{base_url}/videos", params=params, timeout=30).json()
        items += page["items"]
        after = page["next"]
        if after is None:
            return items


def assert_consistent(data_dir: Path, base_url: str) -> list[dict[str, Any]]:
    """A blob exists iff its record does, each blob holds the bytes of its hash and size, and
    nothing else lies around (no temp file, no stray file in the internal folder). Returns
    the records."""
    records = listing(base_url)
    on_disk = {p.relative_to(data_dir).as_posix() for p in blob_files(data_dir)}
    assert on_disk == {r["file_path"] for r in records}, (on_disk, records)
    for record in records:
        data = (data_dir / record["file_path"]).read_bytes()
        assert (len(data), digest(data)) == (record["size_bytes"], record["hash"])
    assert temp_files(data_dir) == []
    internal = sorted(p.name for p in (data_dir / ".vidcache").iterdir())
    assert all(_INTERNAL.fullmatch(name) for name in internal), internal
    return records


def processes_using(path: Path) -> list[int]:
    """PIDs whose command line mentions `path` (say, a decoder left working in a data dir)."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def programs_using(path: Path, *names: str) -> list[int]:
    """PIDs of `processes_using(path)` that run one of the programs `names` (say, the
    service's ffmpeg working on a download in its data dir)."""
    found = []
    for pid in processes_using(path):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().partition(b"\0")[0]
        except OSError:
            continue
        if Path(os.fsdecode(argv0)).name in names:
            found.append(pid)
    return found


@contextlib.contextmanager
def background(target: Any) -> Iterator[threading.Thread]:
    """Run `target` in a thread for the block; joined (bounded) at the end."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(timeout=60)
