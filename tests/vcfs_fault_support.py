"""Shared parts of the vcfs fault and soak tests: a faulty link (the benchmark's loopback proxy
with a `bench.faults.FaultInjector`) between vcfs and a real service and the `link` fixture
made of it, reads and other filesystem calls that cannot hang the test, the videos' source
bytes to compare with, and a fake service (one video, whose answers a test can spoil) for
vcfs.remote's edge cases.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from blake3 import blake3

from bench.faults import FaultInjector
from bench.proxy import ProxyConfig, ProxyThread
from tests.support import VidcacheServer
from tests.vcfs_support import VcfsMount
from vcfs import paths
from vidcache_client import VidCacheClient

MIB = 1 << 20
TIMEOUT = 3.0  # the fault mounts' --timeout
# A failing operation ends by its deadline + one request timeout (a third of the deadline);
# the slack covers FUSE and a loaded machine.
EIO_BOUND = TIMEOUT + TIMEOUT / 3 + 3.0
# Beyond this a read counts as hung (the test fails instead of waiting for it).
HANG_LIMIT = EIO_BOUND + 10.0


def fault_mount(url: str, mountpoint: Path, *vcfs_args: str,
                timeout: float = TIMEOUT) -> VcfsMount:
    """A mount with the fault tests' settings: `--timeout`, a 2 MiB cache and no readahead,
    so a read of a block no other read touched reaches the service (and its faults)."""
    return VcfsMount(url, mountpoint, "--timeout", str(timeout), "--cache-size", "2M",
                     "--readahead-max", "0", *vcfs_args)


@dataclass(frozen=True)
class Source:
    """A video stored in the service, with the bytes it must read as."""

    name: str
    content_hash: str
    file_name: str  # <hash>.<ext> under by-hash/
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def ingest(server_url: str, media_url: str, videos: dict[str, Path], names: tuple[str, ...],
           *, bucket: str, token: str | None = None) -> dict[str, Source]:
    """Ingest the named corpus videos; name -> Source."""
    sources = {}
    with VidCacheClient(server_url, token=token) as client:
        for name in names:
            data = videos[name].read_bytes()
            content_hash = client.ingest(f"{media_url}/{name}", bucket=bucket)["hash"]
            assert content_hash == blake3(data).hexdigest()
            meta = client.get_meta(content_hash)
            assert meta is not None
            sources[name] = Source(name, content_hash,
                                   paths.video_name(content_hash, meta["file_path"]), data)
    return sources


class FaultyLink:
    """The latency proxy in front of a service on `upstream_port`, with switchable faults."""

    def __init__(self, upstream_port: int) -> None:
        self.faults = FaultInjector()
        # Small chunks: a bandwidth cap then trickles steadily instead of in 256 KiB bursts
        # (the proxy delays whole chunks), and stalls start close to where they are asked.
        config = ProxyConfig(upstream_port=upstream_port, chunk_size=16 * 1024)
        self._proxy = ProxyThread(config, hooks=self.faults)

    @property
    def url(self) -> str:
        return self._proxy.url

    def requests(self) -> int:
        return int(self._proxy.counters()["requests"])

    def request_log(self) -> list[tuple[str, str | None]]:
        """(path, Range header) of every request the proxy has seen, in order."""
        log = self._proxy.counters()["request_log"]
        return [(str(entry["path"]), entry["range"]) for entry in log]

    def request_connections(self) -> list[tuple[object, str]]:
        """(connection id, path) of every request the proxy has seen, in order."""
        log = self._proxy.counters()["request_log"]
        return [(entry["conn"], str(entry["path"])) for entry in log]

    def request_targets(self) -> list[str]:
        """The target (path and query) of every request the proxy has seen, in order."""
        return [str(entry["target"]) for entry in self._proxy.counters()["request_log"]]

    def range_connections(self) -> list[tuple[object, str]]:
        """(connection id, Range header) of every request the proxy has seen, in order."""
        return [(entry["conn"], str(entry.get("range")))
                for entry in self._proxy.counters()["request_log"]]

    def ranges(self) -> list[str]:
        """The Range header of every request the proxy has seen, in order."""
        return [str(entry.get("range")) for entry in self._proxy.counters()["request_log"]]

    def connections(self) -> int:
        return int(self._proxy.counters()["connections"])

    def reset(self) -> None:
        """No faults, counters at zero: what the proxy has seen starts again."""
        self.faults.clear()
        self._proxy.reset_counters()

    def __enter__(self) -> FaultyLink:
        self._proxy.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.faults.clear()
        self._proxy.stop()


def link_fixture(scope: Literal["function", "module"] = "function",
                 upstream: str = "vidcache_server") -> Callable[..., Iterator[FaultyLink]]:
    """The fixture `link`, declared in a module with `link = link_fixture(...)`: a FaultyLink
    in front of the service of the fixture named `upstream`, fresh for each test, or one for
    the module where a module-scoped mount or client goes through it."""

    def link(request: pytest.FixtureRequest) -> Iterator[FaultyLink]:
        server: VidcacheServer = request.getfixturevalue(upstream)
        with FaultyLink(server.port) as faulty:
            yield faulty

    lifetime = "fresh for each test" if scope == "function" else "one for the module"
    link.__doc__ = f"A FaultyLink in front of `{upstream}`, {lifetime}; no faults at first."
    return pytest.fixture(scope=scope, name="link")(link)


@dataclass(frozen=True)
class ReadResult:
    data: bytes | None
    error: OSError | None
    seconds: float

    @property
    def errno(self) -> int | None:
        return None if self.error is None else self.error.errno


def read_uncached(path: Path, size: int, offset: int) -> bytes:
    """`pread` through the mount with the kernel's page cache and readahead out of the way, so
    exactly this read reaches vcfs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


class BackgroundRead:
    """`read_uncached` on a daemon thread, so that a hung read fails the test instead of
    hanging it: `result(limit)` raises AssertionError if the read has not ended by then."""

    def __init__(self, path: Path, size: int, offset: int) -> None:
        self.what = f"read of {size} bytes at {offset} of {path.name}"
        self._outcome: ReadResult | None = None
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(path, size, offset),
                                        daemon=True, name="bounded-read")
        self._thread.start()

    def _run(self, path: Path, size: int, offset: int) -> None:
        try:
            data, error = read_uncached(path, size, offset), None
        except OSError as exc:
            data, error = None, exc
        self._outcome = ReadResult(data, error, time.monotonic() - self._started)

    def done(self) -> bool:
        return self._outcome is not None

    def result(self, limit: float) -> ReadResult:
        self._thread.join(max(limit - (time.monotonic() - self._started), 0))
        if self._outcome is None:
            raise AssertionError(f"{self.what} hung: still blocked after {limit} s")
        return self._outcome


def bounded_read(path: Path, size: int, offset: int, *, limit: float) -> ReadResult:
    return BackgroundRead(path, size, offset).result(limit)


class Outcome:
    """What a filesystem call run on a thread did: its result or its OSError, and how long."""

    def __init__(self, value: Any, error: OSError | None, seconds: float) -> None:
        self.value, self.error, self.seconds = value, error, seconds

    @property
    def errno(self) -> int | None:
        return None if self.error is None else self.error.errno

    def __repr__(self) -> str:
        return f"<{self.error or 'ok'} after {self.seconds:.1f} s>"


def bounded(call: Callable[[], Any], limit: float = HANG_LIMIT) -> Outcome:
    """`call()` on a thread; the test fails if it has not returned by `limit`."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    started = time.monotonic()
    future = pool.submit(call)
    try:
        value = future.result(timeout=limit)
    except OSError as exc:
        return Outcome(None, exc, time.monotonic() - started)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"{call} hung: still blocked after {limit} s")
    finally:
        pool.shutdown(wait=False)
    return Outcome(value, None, time.monotonic() - started)


class Regions:
    """Hands out 1 MiB-block offsets of the given videos round-robin, so that consecutive reads
    hit blocks no recent read touched: with a block cache of a few blocks, every read then
    reaches the service (through the faults). Block 0 is left to warm-up reads."""

    def __init__(self, sources: list[Source], block_size: int = MIB) -> None:
        self._blocks = [(source, index * block_size) for index in range(1, 64)
                        for source in sources if index * block_size < source.size]
        self._next = 0
        self._lock = threading.Lock()

    def next(self) -> tuple[Source, int]:
        with self._lock:
            block = self._blocks[self._next % len(self._blocks)]
            self._next += 1
            return block


def range_of_block(source: Source, offset: int, block_size: int = MIB) -> str:
    """The Range header vcfs sends to fetch the block holding `offset`."""
    start = offset // block_size * block_size
    return f"bytes={start}-{min(start + block_size, source.size) - 1}"


# A fake service for what the real one cannot be made to do on demand (vcfs.remote over
# httpx.MockTransport, with a fake clock: no sleeping).
CHUNK = 1000
DATA = bytes(range(256)) * 10  # 2560 bytes: chunks of 1000, 1000, 560
HASH = blake3(DATA).hexdigest()


@dataclass
class FakeService:
    """A tiny vidcache: one video, whose answers a test can spoil."""

    digests: list[str] = field(
        default_factory=lambda: [blake3(DATA[i : i + CHUNK]).hexdigest()
                                 for i in range(0, len(DATA), CHUNK)]
    )
    failures: list[int] = field(default_factory=list)  # statuses to answer before serving
    ignore_range: bool = False
    requests: list[str] = field(default_factory=list)
    ranges: list[str] = field(default_factory=list)  # Range headers of video requests
    block: Callable[[], object] | None = None  # called before answering a video request
    listed: list[str] = field(default_factory=lambda: [HASH])  # hashes /videos lists, in order
    block_listing: Callable[[], object] | None = None  # called before answering /videos
    on_request: Callable[[], object] | None = None  # called first, for every request
    gone: set[str] = field(default_factory=set)  # hashes deleted: 404 for everything of theirs
    cursors: list[str | None] = field(default_factory=list)  # `after` of each /videos request
    no_chunks: bool = False  # /chunks answers 404 (a service that publishes no digests)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.on_request is not None:
            self.on_request()
        path = request.url.path
        self.requests.append(path)
        if path == "/videos":
            self.cursors.append(request.url.params.get("after"))
        if path == f"/video/{HASH}":
            self.ranges.append(request.headers.get("Range", ""))
            if self.block is not None:
                self.block()
        if any(content_hash in path for content_hash in self.gone):
            return httpx.Response(404, json={"detail": "deleted"})
        if self.failures:
            status = self.failures.pop(0)
            return httpx.Response(status, json={"detail": f"injected {status}"})
        if path == f"/meta/{HASH}":
            return httpx.Response(200, json={
                "hash": HASH, "size_bytes": len(DATA), "first_seen": "2024-05-06T07:08:09Z",
                "file_path": f"b/{HASH}.mp4",
            })
        if path == "/videos":
            if self.block_listing is not None:
                self.block_listing()
            limit, after = int(request.url.params["limit"]), request.url.params.get("after")
            start = 0 if after is None else self.listed.index(after) + 1
            page = self.listed[start : start + limit]
            return httpx.Response(200, json={"items": [{
                "hash": listed, "size_bytes": len(DATA), "file_path": f"b/{listed}.mp4",
            } for listed in page], "next": page[-1] if start + limit < len(self.listed) else None})
        if path == f"/video/{HASH}/chunks" and not self.no_chunks:
            return httpx.Response(200, json={"hash": HASH, "chunk_size": CHUNK,
                                             "digests": self.digests})
        if path == f"/video/{HASH}":
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
            assert match is not None
            start, end = int(match[1]), min(int(match[2]), len(DATA) - 1)
            if self.ignore_range:
                return httpx.Response(200, content=DATA)
            return httpx.Response(206, content=DATA[start : end + 1], headers={
                "Content-Range": f"bytes {start}-{end}/{len(DATA)}"})
        return httpx.Response(404, json={"detail": "no such thing"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
