"""The servers a benchmark run stands on, all on 127.0.0.1 and all stopped by the run.

- `Origin`: a plain HTTP server for the generated media, which the service ingests from;
- `Service`: the real `vidcache serve` (or a `bench.service_variants` variant) on a free port;
- `Nginx`: Debian's nginx serving the service's blob directory, the yardstick for the
  service's own `GET /video/{hash}` throughput;
- `ingest()`: puts a generated video into the service and checks the stored hash is the BLAKE3
  of the bytes we made (a near-duplicate match would silently alias another video).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import blake3
import httpx

from bench.guardian import guarded

T = TypeVar("T")
Server = TypeVar("Server", bound=socketserver.BaseServer)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], *, timeout: float, what: str = "condition",
               interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time. Only ever our own child."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(server: Server, *, name: str | None = None) -> Iterator[Server]:
    """`server` answering in a daemon thread for the block; then shut down, its socket closed
    and its thread waited for."""
    thread = threading.Thread(target=server.serve_forever, daemon=True, name=name)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def origin(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on loopback; yields the base URL (no trailing slash)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler),
                 name="bench-origin") as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


class LoopbackServer:
    """A server process of the run on a free loopback port: started by `start()` (which
    subclasses define), stopped with SIGTERM (then SIGKILL) by `stop()` or the `with` block."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def _wait_ready(self, probe: Callable[[], bool], *, timeout: float, what: str,
                    log: Path | str) -> None:
        """Poll `probe` until the started process serves; if it exits or times out first,
        or a signal or Ctrl-C ends the wait, stop it (a failed `start()` never reaches
        `__exit__`) and raise, naming its `log`."""
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.process.returncode}; see {log}")
            return probe()
        try:
            wait_until(ready, timeout=timeout, what=f"{what} on {self.url}")
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class Service(LoopbackServer):
    """A vidcache service process on a free loopback port over `data_dir`."""

    def __init__(self, data_dir: Path, log_path: Path, *, variant: list[str] | None = None,
                 label: str = "vidcache serve (uvicorn)") -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.variant = variant  # None = the real CLI; else bench.service_variants arguments
        self.label = label
        super().__init__()

    def start(self) -> Service:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.variant is None:
            argv = [sys.executable, "-m", "vidcache", "serve", "--data", str(self.data_dir),
                    "--port", str(self.port), "--ingest-allow", "127.0.0.1",
                    "--log-level", "warning"]
        else:
            argv = [sys.executable, "-m", "bench.service_variants", "--data",
                    str(self.data_dir), "--port", str(self.port), *self.variant]
        with open(self.log_path, "ab") as log:
            self.process = guarded(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        self._wait_ready(self._healthy, timeout=60, what=self.label, log=self.log_path)
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False



@dataclass(frozen=True)
class Video:
    """A generated video as stored by the service."""

    name: str
    content_hash: str
    size: int
    duration_s: float
    local_path: Path  # the generated file (the "local file" contender reads this copy)
    blob_path: Path  # the service's own copy
    file_path: str  # relative to the data directory, as the service reports it

    @property
    def ext(self) -> str:
        return Path(self.file_path).suffix.lstrip(".") or "bin"


def blake3_of(path: Path) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            hasher.update(chunk)
    return str(hasher.hexdigest())


def warm_page_cache(paths: list[Path]) -> None:
    """Read the files so their pages are in memory. Before each cold start of a contender,
    for the service's copies of the videos it is about to read ("cold" is about the
    contender's caches) and the local ones the checks compare with: this VM's kernel pages
    out page cache idle for a minute, and disk reads during a measurement slowed whoever
    went first."""
    buffer = bytearray(8 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def ingest(service: Service, origin_url: str, path: Path) -> Video:
    expected = blake3_of(path)
    with httpx.Client(base_url=service.url, timeout=600) as client:
        answer = client.post("/ingest", json={"url": f"{origin_url}/{path.name}",
                                              "bucket": "bench"})
        if answer.status_code != 200:
            raise RuntimeError(f"ingest of {path.name} failed: {answer.status_code} "
                               f"{answer.text}")
        result = answer.json()
        if result["hash"] != expected:
            raise RuntimeError(
                f"ingest of {path.name} returned {result['status']} {result['hash']}, not the "
                f"file's BLAKE3 {expected}: the service took it for a near-duplicate "
                f"(phash distance {result.get('phash_distance')}); give it another lavfi "
                f"source in bench/media.py")
        meta = client.get(f"/meta/{expected}").raise_for_status().json()
    return Video(name=path.name, content_hash=expected, size=int(meta["size_bytes"]),
                 duration_s=float(meta["duration_s"]), local_path=path,
                 blob_path=service.data_dir / meta["file_path"], file_path=meta["file_path"])


class Nginx(LoopbackServer):
    """Debian's nginx (sendfile on, one worker) serving `root` on a free loopback port."""

    def __init__(self, root: Path, work_dir: Path) -> None:
        self.root = root
        self.work_dir = work_dir
        super().__init__()

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()

    def start(self) -> Nginx:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        conf = self.work_dir / "nginx.conf"
        conf.write_text(
            f"daemon off;\nworker_processes 1;\npid {self.work_dir}/nginx.pid;\n"
            f"error_log {self.work_dir}/error.log;\n"
            "events { worker_connections 256; }\n"
            "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n"
            f"  client_body_temp_path {self.work_dir}/body;\n"
            f"  proxy_temp_path {self.work_dir}/proxy;\n"
            f"  server {{ listen 127.0.0.1:{self.port}; root {self.root}; }}\n}}\n")
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = guarded(subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(self.work_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait_ready(self._listening, timeout=20, what="nginx",
                         log=self.work_dir / "error.log")
        return self

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

