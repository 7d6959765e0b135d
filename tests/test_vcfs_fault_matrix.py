"""Cells of the matrix "service misbehaviour x vcfs operation" that tests/test_vcfs_faults.py
leaves out: a slow-loris (an answer trickling in a byte at a time, every receive in time) on
the small answers (`/meta`, `/chunks`, the listing), a stall before the answer's head, a 404
for a listed video's bytes, malformed metadata and digests, the service restarted between two
reads, and the operations that must not wait on the service at all (statfs, the stats file,
a listing already made).

Each case: the operation returns (run on a thread joined with a limit: a behaviour check, not
a speed target), with the right errno or the source's bytes, never other bytes; and the mount
works again once the fault is gone. Same set-up as test_vcfs_faults.py: the real service, the
benchmark's proxy with `bench.faults` in between, real mounts with `--timeout 3`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.faults import (
    FlipByte,
    Latency,
    Overlong,
    Refuse,
    Trickle,
    any_request,
    path_prefix,
    video_range_requests,
)
from bench.proxy import Request
from tests.support import VidcacheServer, wait_until
from tests.vcfs_fault_support import (
    CHUNK,
    DATA,
    EIO_BOUND,
    HANG_LIMIT,
    HASH,
    TIMEOUT,
    FakeClock,
    FakeService,
    FaultyLink,
    Source,
    bounded,
    bounded_read,
    fault_mount,
    ingest,
    range_of_block,
    read_uncached,
)
from tests.vcfs_support import (
    VcfsMount,
    daemon_pid,
    process_alive,
    requires_fuse,
    vcfs_command,
)
from vcfs.errors import RemoteUnavailable
from vcfs.remote import _NO_VIDEO, Remote, RemoteConfig
from vidcache_client import VidCacheClient

pytestmark = requires_fuse

ROOT = Path(__file__).resolve().parent.parent

BUCKET = "vcfs-fault-matrix"
MIB = 1 << 20
READ = 64 * 1024
NAMES = ("big.mp4", "big_moov_end.mp4", "a.mp4", "b.mp4")


@pytest.fixture(scope="module")
def sources(videos: dict[str, Path], media_url: str,
            vidcache_server: VidcacheServer) -> dict[str, Source]:
    return ingest(vidcache_server.url, media_url, videos, NAMES, bucket=BUCKET)


@pytest.fixture
def mount(tmp_path: Path, link: FaultyLink, sources: dict[str, Source]) -> Iterator[VcfsMount]:
    """A fresh mount (nothing cached: metadata, digests and the listing are asked for)."""
    with fault_mount(link.url, tmp_path / "mnt") as mounted:
        yield mounted
        link.faults.clear()
        mounted.wait_quiet(HANG_LIMIT)


def only_block(source: Source, offset: int) -> Callable[[Request], bool]:
    path, header = f"/video/{source.content_hash}", range_of_block(source, offset)
    return lambda request: request.path == path and request.range == header


def remote_stats(mounted: VcfsMount) -> dict[str, int]:
    return dict(mounted.stats()["remote"])


# ---------------------------------------------------------------------------------------------
# Slow-loris on the small answers


@pytest.mark.parametrize("route", ["own sockets", "httpx"])
@pytest.mark.parametrize("trickled", ["metadata", "range"])
def test_a_trickling_answer_gives_its_connection_up_by_the_deadline(
    vidcache_server: VidcacheServer, sources: dict[str, Source], trickled: str, route: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Metadata, or a range answer's head, trickling in a byte every 0.3 s (each receive in
    time, the whole taking minutes): the operations fail by their deadline, and once the
    service answers normally again the next one works. Before, each given-up attempt went on
    receiving on its worker thread and connection until the whole answer (or head) was in:
    with two workers, two such operations left the third (fault over, service fine) failing
    after its full deadline. `httpx`: the client reads everything through httpx, as it does
    when the environment names a proxy (here the fault proxy itself, as HTTP_PROXY)."""
    big = sources["big.mp4"]
    with FaultyLink(vidcache_server.port) as faulty:
        if route == "httpx":
            for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("http_proxy", faulty.url)
        remote = Remote.connect(faulty.url, config=RemoteConfig(
            timeout=TIMEOUT, workers=2, first_block_with_meta=False))
        try:
            calls: list[Callable[[], Any]]
            if trickled == "metadata":
                match = path_prefix("/meta/")
                calls = [functools.partial(remote.meta, sources[name].content_hash)
                         for name in NAMES[:3]]
            else:
                assert remote.fetch(big.content_hash, 0, MIB) == big.data[:MIB]
                match = video_range_requests
                calls = [functools.partial(remote.fetch, big.content_hash, block * MIB,
                                           (block + 1) * MIB) for block in (1, 2, 5)]
            faulty.faults.enable(Trickle(seconds_per_byte=0.3, match=match))
            for call in calls[:2]:
                started = time.monotonic()
                with pytest.raises(RemoteUnavailable):
                    call()
                assert time.monotonic() - started <= EIO_BOUND
            assert faulty.faults.injected()["trickle"] >= 2
            # through httpx, to a proxy: requests name the whole URL
            assert all(target.startswith("http://") == (route == "httpx")
                       for target in faulty.request_targets())
            faulty.faults.clear()
            if trickled == "metadata":
                meta = calls[2]()
                assert meta is not None and meta.size == sources[NAMES[2]].size
            else:
                assert calls[2]() == big.data[5 * MIB : 6 * MIB]
        finally:
            remote.close()


def test_lookup_and_listing_under_a_slow_loris_fail_in_time_then_work(
    mount: VcfsMount, link: FaultyLink, sources: dict[str, Source],
) -> None:
    source = sources["big.mp4"]
    by_hash = mount.mountpoint / "by-hash"
    link.faults.enable(Trickle(seconds_per_byte=0.3, match=path_prefix("/meta/")))
    lookup = bounded(lambda: os.stat(by_hash / source.file_name))
    assert lookup.errno == errno.EIO and lookup.seconds <= EIO_BOUND, lookup
    link.faults.clear()
    link.faults.enable(Trickle(seconds_per_byte=0.3, match=path_prefix("/videos")))
    listing = bounded(lambda: os.listdir(by_hash))
    assert listing.errno == errno.EIO and listing.seconds <= EIO_BOUND, listing
    link.faults.clear()
    assert os.stat(by_hash / source.file_name).st_size == source.size
    assert {s.file_name for s in sources.values()} <= set(os.listdir(by_hash))
    assert read_uncached(mount.video(source.file_name), READ, 3 * MIB) == (
        source.data[3 * MIB : 3 * MIB + READ])


def test_digests_under_a_slow_loris_fail_the_read_in_time_and_nothing_unverified_is_returned(
    mount: VcfsMount, link: FaultyLink, sources: dict[str, Source],
) -> None:
    source = sources["big_moov_end.mp4"]
    path = mount.video(source.file_name)
    link.faults.enable(Trickle(seconds_per_byte=0.3,
                               match=path_prefix(f"/video/{source.content_hash}/chunks")))
    assert os.stat(path).st_size == source.size  # the metadata came
    read = bounded_read(path, READ, 5 * MIB, limit=HANG_LIMIT)
    assert read.data is None and read.errno == errno.EIO, read
    assert read.seconds <= EIO_BOUND, read
    link.faults.clear()
    verified = remote_stats(mount)["verified_chunks"]
    assert wait_until(lambda: bounded_read(path, READ, 5 * MIB, limit=HANG_LIMIT).data,
                      timeout=10, interval=0.2, what="the read working again") == (
        source.data[5 * MIB : 5 * MIB + READ])
    assert remote_stats(mount)["verified_chunks"] > verified  # read verified, not downgraded


# ---------------------------------------------------------------------------------------------
# Stalls, 404s, malformed answers


def test_a_read_whose_answer_never_starts_fails_in_time_then_works(
    mount: VcfsMount, link: FaultyLink, sources: dict[str, Source],
) -> None:
    """A stall before the answer's head (Latency of a minute), not after it."""
    source = sources["big.mp4"]
    path = mount.video(source.file_name)
    assert read_uncached(path, 10, 0) == source.data[:10]
    offset = 6 * MIB
    link.faults.enable(Latency(seconds=60, match=only_block(source, offset)))
    read = bounded_read(path, READ, offset, limit=HANG_LIMIT)
    assert read.data is None and read.errno == errno.EIO and read.seconds <= EIO_BOUND, read
    link.faults.clear()
    assert wait_until(lambda: bounded_read(path, READ, offset, limit=HANG_LIMIT).data,
                      timeout=10, interval=0.2, what="the read working again") == (
        source.data[offset : offset + READ])


def test_a_listed_video_whose_bytes_answer_404_reads_enoent_then_works(
    mount: VcfsMount, link: FaultyLink, sources: dict[str, Source],
) -> None:
    source = sources["big.mp4"]
    by_hash = mount.mountpoint / "by-hash"
    assert source.file_name in os.listdir(by_hash)
    path = mount.video(source.file_name)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        link.faults.enable(Refuse(status=404, match=only_block(source, 4 * MIB)))
        failed = bounded(lambda: os.pread(fd, READ, 4 * MIB))
        assert failed.value is None and failed.errno == errno.ENOENT, failed
        assert failed.seconds <= EIO_BOUND, failed
        link.faults.clear()
        # The open file reads again at once; the name is back once the miss expires.
        assert os.pread(fd, READ, 4 * MIB) == source.data[4 * MIB : 4 * MIB + READ]
    finally:
        os.close(fd)

    def size() -> int | None:  # ENOENT while the service's "no such video" is remembered
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    assert wait_until(size, timeout=15, interval=0.2, what="the name back") == source.size


def test_an_open_file_reads_again_after_a_404_that_came_before_its_digests(
    mount: VcfsMount, link: FaultyLink, sources: dict[str, Source],
) -> None:
    """The range's 404 arrives before the digests asked for beside it (a slow `/chunks`): the
    video is forgotten, the digests with it, and the next read of the open file needs the
    metadata again. It was answered from the remembered 404 (ENOENT for `negative_ttl`, the
    test above failing now and then under load); an open file's read asks the service."""
    source = sources["big.mp4"]
    assert source.file_name in os.listdir(mount.mountpoint / "by-hash")  # metadata, no digests
    fd = os.open(mount.video(source.file_name), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        digests = path_prefix(f"/video/{source.content_hash}/chunks")
        link.faults.enable(Latency(seconds=0.5, match=digests))
        link.faults.enable(Refuse(status=404, match=only_block(source, 4 * MIB)))
        failed = bounded(lambda: os.pread(fd, READ, 4 * MIB))
        assert failed.value is None and failed.errno == errno.ENOENT, failed
        link.faults.clear()
        assert os.pread(fd, READ, 4 * MIB) == source.data[4 * MIB : 4 * MIB + READ]
    finally:
        os.close(fd)


@pytest.mark.parametrize("answered", ["/meta/", "/videos"])
def test_malformed_metadata_or_listing_is_eio_then_works(
    mount: VcfsMount, link: FaultyLink, sources: dict[str, Source], answered: str,
) -> None:
    """200 with a JSON object lacking every field (no hash, no size, no items): an error
    (EIO), not a missing file (ENOENT) nor an empty directory; fine again once it ends."""
    source = sources["a.mp4"]
    by_hash = mount.mountpoint / "by-hash"

    def call() -> Any:
        if answered == "/meta/":
            return os.stat(by_hash / source.file_name).st_size
        return set(os.listdir(by_hash))

    link.faults.enable(Refuse(status=200, match=path_prefix(answered)))
    failed = bounded(call)
    assert failed.errno == errno.EIO and failed.seconds <= EIO_BOUND, failed
    link.faults.clear()
    worked = bounded(call)
    assert worked.error is None, worked
    assert worked.value == (source.size if answered == "/meta/" else
                            worked.value | {s.file_name for s in sources.values()})


@contextlib.contextmanager
def _looked_up(tmp_path: Path, link: FaultyLink, source: Source
               ) -> Iterator[tuple[VcfsMount, Path]]:
    """A mount on which `source` was looked up (a stat) for its metadata only
    (`--no-first-block`): its digests are first asked for by a read."""
    with fault_mount(link.url, tmp_path / "mnt", "--no-first-block") as mounted:
        path = mounted.video(source.file_name)
        assert os.stat(path).st_size == source.size
        yield mounted, path


def test_malformed_digests_fail_the_first_read_and_no_byte_is_returned_unverified(
    tmp_path: Path, link: FaultyLink, sources: dict[str, Source],
) -> None:
    """`/chunks` answered 200 with a JSON object without digests, for a cold video: the read
    fails (EIO) rather than returning bytes it cannot check; afterwards they are checked.
    (`--no-first-block`: the stat's lookup asks for the metadata only, so that the digests
    are asked by the read, with the fault on.)"""
    source = sources["b.mp4"]
    with _looked_up(tmp_path, link, source) as (mounted, path):
        link.faults.enable(Refuse(status=200,
                                  match=path_prefix(f"/video/{source.content_hash}/chunks")))
        read = bounded_read(path, READ, 0, limit=HANG_LIMIT)
        assert read.data is None and read.errno == errno.EIO, read
        assert read.seconds <= EIO_BOUND, read
        link.faults.clear()
        verified = remote_stats(mounted)["verified_chunks"]
        assert wait_until(lambda: bounded_read(path, READ, 0, limit=HANG_LIMIT).data,
                          timeout=10, interval=0.2, what="the read working again") == (
            source.data[:READ])
        assert remote_stats(mounted)["verified_chunks"] > verified


def test_a_stray_404_for_the_digests_alone_never_leaves_a_video_unverified(
    tmp_path: Path, link: FaultyLink, sources: dict[str, Source],
) -> None:
    """One 404 for `/chunks` of a video whose metadata the service just gave was kept as
    "this video has no digests": every later read of it went unverified, and a flipped byte
    reached the reader. Now vcfs asks for the metadata and the digests again: the read gets
    its bytes, verified. (`--no-first-block`: the digests are asked by the read, with the
    fault on, not by the stat's lookup.)"""
    _refuse_the_digests_once_then_flip_a_byte(tmp_path, link, sources["big_moov_end.mp4"], 404)


@pytest.mark.parametrize("status", [429, 400])
def test_another_refusal_of_the_digests_fails_the_read_and_never_leaves_the_video_unverified(
    tmp_path: Path, link: FaultyLink, sources: dict[str, Source], status: int,
) -> None:
    """One 429 (a rate-limiting proxy in front of the service) or 400 for `/chunks` was kept
    as "this video has no digests", as a 404 once was: every later read of the video went
    unverified, and a flipped byte reached the reader. Now the read that met it fails (EIO),
    nothing is kept, and the next read asks for the digests again: the kernel's re-asking of
    the failed read at once gets its bytes, verified."""
    _refuse_the_digests_once_then_flip_a_byte(tmp_path, link, sources["big_moov_end.mp4"],
                                              status)


def _refuse_the_digests_once_then_flip_a_byte(tmp_path: Path, link: FaultyLink,
                                              source: Source, status: int) -> None:
    """`/chunks` of the looked-up `source` refused once with `status`: its first read gets its
    bytes, verified (after `status`, from a later ask); then a byte flipped on a later block
    is caught by its digests, not returned."""
    with _looked_up(tmp_path, link, source) as (mounted, path):
        link.faults.enable(Refuse(status=status,
                                  match=path_prefix(f"/video/{source.content_hash}/chunks")),
                           times=1)
        first = bounded_read(path, READ, 0, limit=HANG_LIMIT)
        assert first.data == source.data[:READ], first
        assert link.faults.injected()["refuse"] == 1
        before = remote_stats(mounted)
        assert before["verified_chunks"] > 0
        offset = 3 * MIB
        link.faults.enable(FlipByte(at=100, match=only_block(source, offset)), times=1)
        flipped = bounded_read(path, READ, offset, limit=HANG_LIMIT)
        assert flipped.data == source.data[offset : offset + READ], "a flipped byte returned"
        assert remote_stats(mounted)["verify_failures"] == before["verify_failures"] + 1


@pytest.mark.parametrize("first_block", [True, False], ids=["first-block", "no-first-block"])
def test_a_service_that_publishes_no_digests_is_read_range_checked(
    tmp_path: Path, link: FaultyLink, sources: dict[str, Source], first_block: bool,
) -> None:
    """A vidcache 1.x without this project's extensions answers every `/chunks` 404 while its
    `/meta` finds the video: its videos are read (checked against their ranges only), not
    ENOENT. With the first block or without: the lookup's 404 for `/chunks` then comes
    between the answers for `/meta` and the first block, or last."""
    source = sources["big_moov_end.mp4"]
    with VcfsMount(link.url, tmp_path / "mnt", "--timeout", str(TIMEOUT),
                   *() if first_block else ("--no-first-block",)) as mounted:
        link.faults.enable(Refuse(status=404,
                                  match=path_prefix(f"/video/{source.content_hash}/chunks")))
        path = mounted.video(source.file_name)
        read = bounded_read(path, READ, 5 * MIB, limit=HANG_LIMIT)
        assert read.data == source.data[5 * MIB : 5 * MIB + READ], read
        assert remote_stats(mounted)["verified_chunks"] == 0
        # asked with the read's range, then with the metadata once more (after the lookup's
        # own try with the first block): then read unverified
        assert link.faults.injected()["refuse"] == (3 if first_block else 2)


def _extension_route(request: Request) -> bool:
    """The routes this project adds to the vidcache 1.x wire protocol."""
    return (request.path == "/health" or request.path.startswith("/videos")
            or request.path.endswith("/chunks"))


@pytest.mark.parametrize("first_block", [True, False], ids=["first-block", "no-first-block"])
def test_a_vidcache_without_our_extensions_is_mounted_and_read_by_name(
    tmp_path: Path, link: FaultyLink, sources: dict[str, Source], first_block: bool,
) -> None:
    """A vidcache 1.x deployment has the wire protocol's routes only: /health, /videos and
    /chunks answer its JSON 404. vcfs mounts it (it refused: no /health), by-hash lists
    nothing, and a video opened by name reads as its source, range-checked: its digests are
    never asked for (they were, along with a lookup's first block)."""
    link.faults.enable(Refuse(status=404, detail="Not Found", match=_extension_route))
    source = sources["big_moov_end.mp4"]
    with VcfsMount(link.url, tmp_path / "mnt", "--timeout", str(TIMEOUT),
                   *() if first_block else ("--no-first-block",)) as mounted:
        assert "without the extensions of this project" in mounted.log()
        assert os.listdir(mounted.mountpoint / "by-hash") == []
        path = mounted.video(source.file_name)
        assert os.stat(path).st_size == source.size
        with open(path, "rb") as stream:
            assert stream.read() == source.data
        assert remote_stats(mounted)["verified_chunks"] == 0
        asked = [target.split("?")[0] for target in link.request_targets()]
        assert not any(path.startswith("/videos") for path in asked)
        assert not any(path.endswith("/chunks") for path in asked)


def test_a_vidcache_without_our_extensions_is_checked_with_two_requests(
    tmp_path: Path, link: FaultyLink,
) -> None:
    """A vidcache 1.x's start-up check is its 404 for /health and for the first byte of a video
    no service has: that 404 (not 401/403) says reads are let through. A `GET /meta/<64
    zeros>` followed, to learn whether reads need another token: it could tell nothing more."""
    link.faults.enable(Refuse(status=404, detail="Not Found", match=_extension_route))
    with VcfsMount(link.url, tmp_path / "mnt", "--timeout", str(TIMEOUT)) as mounted:
        assert link.request_targets() == ["/health", f"/video/{_NO_VIDEO}"]
        assert remote_stats(mounted)["http_requests"] == 2


def test_a_vidcache_without_our_extensions_behind_a_token_is_refused_at_start(
    tmp_path: Path,
) -> None:
    """A vidcache 1.x whose reads need a token vcfs lacks (or has wrong) refuses the video of
    its start-up check: the mount stops there, naming the refusal as for this project's
    service (`refused access to ...: HTTP 401: ...; advice`), with no request after it, and
    with no warning before it about what a mount of a vidcache 1.x lacks."""
    token, wrong = tmp_path / "token", tmp_path / "wrong"
    token.write_text("s3cret-token\n")
    wrong.write_text("not-the-token\n")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    refused = f"refused access to video data: HTTP 401: GET /video/{_NO_VIDEO}"
    with VidcacheServer(tmp_path / "own", "--token-file", str(token), "--token-reads") as (
            server), FaultyLink(server.port) as link:
        link.faults.enable(Refuse(status=404, detail="Not Found", match=_extension_route))
        for args, problem, advice in (
            ((), "needs a bearer token", "the service requires a token: mount with --token-file "
             "FILE"),
            (("--token-file", str(wrong)), "wrong bearer token", "the service refused vcfs's "
             "token: check that --token-file holds the token of the service's --token-file"),
        ):
            before = len(link.request_targets())
            result = subprocess.run(
                vcfs_command("mount", link.url, str(mountpoint), "--timeout", str(TIMEOUT),
                             *args),
                capture_output=True, text=True, timeout=60, check=False)
            assert result.returncode == 1, result.stderr
            [error] = result.stderr.splitlines()
            assert error.startswith(
                f"vcfs: error: the vidcache service at {link.url} {refused}"), result.stderr
            assert problem in error and error.endswith(f"; {advice}"), result.stderr
            assert not os.path.ismount(mountpoint)
            assert link.request_targets()[before:] == ["/health", f"/video/{_NO_VIDEO}"]


def test_a_daemon_without_a_log_file_shows_its_start_up_warnings(
    tmp_path: Path, link: FaultyLink, sources: dict[str, Source]
) -> None:
    """`vcfs mount --daemon` without --log-file keeps no log: the warning that the server was
    taken for a vidcache 1.x (whose by-hash lists nothing) reached no one. It is printed on
    stderr once mounted, and nothing else of the daemon's start is."""
    link.faults.enable(Refuse(status=404, detail="Not Found", match=_extension_route))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    pid = None
    try:
        # the daemon runs in "/": it imports this tree's vcfs by PYTHONPATH
        started = subprocess.run(
            vcfs_command("mount", link.url, str(mountpoint), "--daemon", "--timeout",
                         str(TIMEOUT)),
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert started.returncode == 0, started.stderr
        pid = daemon_pid(started)
        warnings = started.stderr.splitlines()
        assert len(warnings) == 1, started.stderr
        assert " WARNING " in warnings[0], started.stderr
        assert "without the extensions of this project" in warnings[0], started.stderr
        assert os.listdir(mountpoint / "by-hash") == []
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        if pid is not None:
            wait_until(lambda: not process_alive(pid), timeout=20, what="the daemon exited")


@dataclass
class _DigestsRefused(FakeService):
    """The fake service of the vcfs.remote tests, answering `/chunks` 404 the first times."""

    digests_refused: int = 1

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == f"/video/{HASH}/chunks" and self.digests_refused:
            self.digests_refused -= 1
            self.requests.append(request.url.path)
            return httpx.Response(404, json={"detail": "no such video"})
        return super().handle(request)


@pytest.mark.parametrize(("refused", "verified", "asked"),
                         [(1, True, 2), (2, True, 3), (3, False, 3)],
                         ids=["once", "twice", "publishes-none"])
def test_a_404_for_the_digests_asked_with_a_lookup_is_not_kept_as_no_digests(
    refused: int, verified: bool, asked: int,
) -> None:
    """The same through the lookup that asks for the metadata, the digests and the first block
    together: a 404 for the digests there made the first block (and every block after it)
    pass unverified. Now the read asks for them again, and after a second 404 for the
    metadata and the digests once more: verified if they come; read unverified only if the
    service, still describing the video, never gives them."""
    service, clock = _DigestsRefused(digests_refused=refused), FakeClock()
    client = VidCacheClient("http://vidcache.test", transport=httpx.MockTransport(service.handle))
    remote = Remote(client, config=RemoteConfig(timeout=1.0), sleep=clock.sleep, clock=clock)
    try:
        assert remote.meta(HASH, first_block=len(DATA)) is not None
        assert remote.fetch(HASH, 0, len(DATA)) == DATA
        assert remote.counters.get("verified_chunks") == (
            -(-len(DATA) // CHUNK) if verified else 0)
        assert service.requests.count(f"/video/{HASH}/chunks") == asked
    finally:
        remote.close()


def test_bodies_running_past_their_length_are_never_data(
    tmp_path: Path, link: FaultyLink, sources: dict[str, Source],
) -> None:
    """Every range answer followed by bytes beyond its Content-Length (a server miscounting):
    a sequential read with readahead (answers following each other on kept-alive
    connections) and scattered reads return the source's bytes, the extra bytes never taken
    for data nor for the next answer's."""
    source = sources["big.mp4"]
    with VcfsMount(link.url, tmp_path / "mnt", "--timeout", str(TIMEOUT)) as mounted:
        path = mounted.video(source.file_name)
        assert read_uncached(path, 10, 0) == source.data[:10]
        link.faults.enable(Overlong(extra=b"HTTP/1.1 206 Partial Content\r\n" + b"x" * 4096))

        def read_all() -> bytes:
            with open(path, "rb") as stream:
                return stream.read(8 * MIB)

        whole = bounded(read_all)
        assert whole.error is None and whole.value == source.data[: 8 * MIB], whole
        for offset in (9 * MIB + 4096, 15 * MIB, 12 * MIB + 100_000):
            read = bounded_read(path, READ, offset, limit=HANG_LIMIT)
            assert read.data == source.data[offset : offset + READ], read
        assert link.faults.injected()["overlong"] >= 3


# ---------------------------------------------------------------------------------------------
# What must not wait on the service


def test_statfs_the_stats_file_and_a_made_listing_answer_while_the_service_stalls(
    mount: VcfsMount, link: FaultyLink, sources: dict[str, Source],
) -> None:
    source = sources["big.mp4"]
    path = mount.video(source.file_name)
    by_hash = mount.mountpoint / "by-hash"
    names = set(os.listdir(by_hash))
    assert read_uncached(path, READ, 0) == source.data[:READ]
    link.faults.enable(Latency(seconds=60, match=any_request))
    # Each well within one request timeout: none of them asks the service.
    statfs = bounded(lambda: os.statvfs(mount.mountpoint), limit=TIMEOUT / 3)
    assert statfs.error is None and statfs.value.f_files >= len(sources), statfs
    stats = bounded(mount.stats, limit=TIMEOUT / 3)
    assert stats.error is None and "remote" in stats.value, stats
    listing = bounded(lambda: set(os.listdir(by_hash)), limit=TIMEOUT / 3)
    assert listing.value == names, listing
    cached = bounded(lambda: os.pread(os.open(path, os.O_RDONLY), READ, 0), limit=TIMEOUT / 3)
    assert cached.value == source.data[:READ], cached


# ---------------------------------------------------------------------------------------------
# The service restarted between two reads


def test_the_service_restarted_between_two_reads_costs_no_error(
    tmp_path: Path, videos: dict[str, Path], media_url: str,
) -> None:
    """The mount's kept-alive connections die with the service: the next read, on a new one,
    returns the right bytes without an error (a connection found closed is replaced)."""
    with VidcacheServer(tmp_path / "own") as server, FaultyLink(server.port) as faulty:
        source = ingest(server.url, media_url, videos, ("big.mp4",), bucket="own")["big.mp4"]
        with fault_mount(faulty.url, tmp_path / "mnt") as mounted:
            path = mounted.video(source.file_name)
            assert read_uncached(path, READ, 2 * MIB) == source.data[2 * MIB : 2 * MIB + READ]
            mounted.wait_quiet(HANG_LIMIT)
            server.stop()
            server.start()
            before = remote_stats(mounted)
            read = bounded_read(path, READ, 7 * MIB, limit=HANG_LIMIT)
            assert read.data == source.data[7 * MIB : 7 * MIB + READ], read
            after = remote_stats(mounted)
            assert after["errors"] == before["errors"], (before, after)
