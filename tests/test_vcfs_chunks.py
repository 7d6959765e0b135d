"""vcfs over videos whose chunk digests have different chunk sizes, on a real service: one
ingested while the server recorded 1 MiB chunks (a data directory of vidcache 1.0), one
ingested after a restart with 256 KiB chunks. Both read whole through a mount, with 1 MiB and
with 256 KiB blocks, every chunk verified; a byte flipped on the way inside a 256 KiB chunk is
caught by that chunk's digest and the block fetched again.

The fine-chunk path of `Remote.fetch_blocks` (blocks of several chunks, each block verified
chunk by chunk as it arrives) is also checked against a fake service, for what a real one
cannot do on demand: a wrong digest in the middle of a run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from blake3 import blake3

from bench.faults import FlipByte, Stall
from bench.proxy import Request
from tests.support import VidcacheServer, wait_until
from tests.vcfs_fault_support import FaultyLink, Source, bounded_read, ingest, read_uncached
from tests.vcfs_support import VcfsMount, requires_fuse
from vcfs.errors import RemoteUnavailable
from vcfs.remote import Remote, RemoteConfig
from vidcache_client import VidCacheClient

T = TypeVar("T", bound=Callable[..., Any])
KIB = 1 << 10
MIB = 1 << 20
READ = 64 * KIB


@dataclass(frozen=True)
class Stored:
    server: VidcacheServer
    old: Source  # big.mp4, digests of 1 MiB chunks
    new: Source  # big_moov_end.mp4, digests of 256 KiB chunks


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, media_url: str,
           videos: dict[str, Path]) -> Iterator[Stored]:
    data_dir = tmp_path_factory.mktemp("vcfs-chunks") / "data"
    with VidcacheServer(data_dir, "--chunk-size", "1M") as before:
        old = ingest(before.url, media_url, videos, ("big.mp4",), bucket="old")["big.mp4"]
    with VidcacheServer(data_dir, "--chunk-size", "256K") as server:
        new = ingest(server.url, media_url, videos, ("big_moov_end.mp4",),
                     bucket="new")["big_moov_end.mp4"]
        with VidCacheClient(server.url) as client:
            for source, chunk_size in ((old, MIB), (new, 256 * KIB)):
                digests = client.get_chunk_digests(source.content_hash)
                assert digests is not None and digests["chunk_size"] == chunk_size
        yield Stored(server, old, new)


@pytest.fixture(scope="module")
def link(stored: Stored) -> Iterator[FaultyLink]:
    with FaultyLink(stored.server.port) as faulty:
        yield faulty


def mounting(test: T) -> T:
    """The marks of a test that mounts vcfs (skipped where FUSE is missing)."""
    for mark in requires_fuse:
        test = mark(test)
    return test


def chunk_count(source: Source, chunk_size: int) -> int:
    return -(-source.size // chunk_size)


def remote_stats(mount: VcfsMount) -> dict[str, int]:
    remote: dict[str, int] = mount.stats()["remote"]
    return remote


@mounting
@pytest.mark.parametrize("block_size", ["1M", "256K"])
def test_both_chunk_sizes_read_whole_and_verified(stored: Stored, link: FaultyLink,
                                                  tmp_path: Path, block_size: str) -> None:
    with VcfsMount(link.url, tmp_path / "mnt", "--block-size", block_size) as mount:
        for source, chunk_size in ((stored.old, MIB), (stored.new, 256 * KIB)):
            before = remote_stats(mount)
            path = mount.video(source.file_name)
            copy = tmp_path / source.file_name
            shutil.copyfile(path, copy)  # one sequential read, as cat does
            assert copy.read_bytes() == source.data, source.name
            after = remote_stats(mount)
            verified = after["verified_chunks"] - before["verified_chunks"]
            if block_size == "1M":  # whole chunks in every block: each verified once
                assert verified == chunk_count(source, chunk_size), source.name
                assert after["verify_extra_bytes"] == before["verify_extra_bytes"]
            else:  # the 1 MiB chunks are fetched widened; each is verified at least once
                assert verified >= chunk_count(source, chunk_size), source.name
        assert after["verify_failures"] == 0
        assert mount.stats()["fuse"]["errors"] == 0
        # a player's first look at each file: the container parses
        for source in (stored.old, stored.new):
            probe = subprocess.run(
                ["ffprobe", "-v", "error", "-show_entries", "format=size", "-of", "csv=p=0",
                 str(mount.video(source.file_name))],
                capture_output=True, text=True, timeout=60, check=True)
            assert probe.stdout.strip() == str(source.size)


@mounting
@pytest.mark.parametrize("block_size", [MIB, 256 * KIB])
def test_a_flipped_byte_in_a_256_kib_chunk_is_caught(stored: Stored, link: FaultyLink,
                                                     tmp_path: Path, block_size: int) -> None:
    source = stored.new
    with VcfsMount(link.url, tmp_path / "mnt", "--block-size", str(block_size),
                   "--readahead-max", "0", "--timeout", "5") as mount:
        path = mount.video(source.file_name)
        assert read_uncached(path, 10, 0) == source.data[:10]  # digests known from here on
        offset = 3 * MIB + 100 * KIB
        block_start = offset // block_size * block_size
        header = f"bytes={block_start}-{block_start + block_size - 1}"

        def the_block(request: Request) -> bool:
            return request.headers.get("range") == header

        before = remote_stats(mount)
        flipped = link.faults.injected().get("flip_byte", 0)
        link.faults.enable(FlipByte(match=the_block), times=1)
        result = bounded_read(path, READ, offset, limit=30)
        assert result.error is None, result.error
        assert result.data == source.data[offset : offset + READ]
        assert link.faults.injected().get("flip_byte") == flipped + 1
        # The read may be answered from the block's first chunk before the flipped one is in:
        # the block's fetch then catches it and fetches the block again, after the read.
        after = wait_until(
            lambda: (stats := remote_stats(mount))["retries"] > before["retries"] and stats,
            timeout=30, what="the block fetched again")
        assert after
        assert after["verify_failures"] - before["verify_failures"] == 1
    # the middle byte of the block's body was flipped: the 256 KiB chunk holding it failed
    chunk = (block_start + block_size // 2) // (256 * KIB)
    low, high = chunk * 256 * KIB, (chunk + 1) * 256 * KIB - 1
    assert re.search(rf"chunk {chunk} \(bytes {low}-{high}\) has BLAKE3 [0-9a-f]{{64}}, the "
                     r"service recorded [0-9a-f]{64}", mount.log())


@mounting
def test_a_read_into_the_middle_of_a_cold_block_fetches_from_its_chunk_on(
    stored: Stored, link: FaultyLink, tmp_path: Path,
) -> None:
    source = stored.new  # 256 KiB chunks
    with VcfsMount(link.url, tmp_path / "mnt", "--readahead-max", "0") as mount:
        path = mount.video(source.file_name)
        assert read_uncached(path, 10, 0) == source.data[:10]  # digests known from here on
        offset = 2 * MIB + 600 * KIB  # in chunk 2 of block 2
        assert read_uncached(path, READ, offset) == source.data[offset : offset + READ]
        ranges = [r for p, r in link.request_log() if source.content_hash in p and r]
        assert ranges[-1] == f"bytes={2 * MIB + 512 * KIB}-{3 * MIB - 1}"
        # the block's tail answers reads from there on; its start needs only what lies before
        assert read_uncached(path, READ, 2 * MIB + 512 * KIB) == source.data[
            2 * MIB + 512 * KIB : 2 * MIB + 512 * KIB + READ]
        assert read_uncached(path, READ, 2 * MIB) == source.data[2 * MIB : 2 * MIB + READ]
        ranges = [r for p, r in link.request_log() if source.content_hash in p and r]
        assert ranges[-2:] == [f"bytes={2 * MIB + 512 * KIB}-{3 * MIB - 1}",
                               f"bytes={2 * MIB}-{2 * MIB + 512 * KIB - 1}"]
        assert mount.stats()["remote"]["verify_failures"] == 0


UNVERIFIED = "larger than vcfs widens a fetch to (4 MiB)"


@mounting
def test_chunks_too_big_to_widen_a_fetch_to_are_said_unverified_and_whole_blocks_verify_them(
    tmp_path: Path, media_url: str, videos: dict[str, Path],
) -> None:
    """A service recording 8 MiB chunks (vidcache serve --chunk-size 8M): vcfs widens a fetch
    to whole chunks of up to 4 MiB only, so the 1 MiB blocks of such a video are checked
    against their ranges, not the digests. That was silent, where docs/vcfs.md said every
    byte was verified: the log says so once, naming the --block-size that verifies them; with
    8 MiB blocks every chunk is verified and nothing is said."""
    with VidcacheServer(tmp_path / "data", "--chunk-size", "8M") as server:
        source = ingest(server.url, media_url, videos, ("big.mp4",),
                        bucket="big-chunks")["big.mp4"]
        with VcfsMount(server.url, tmp_path / "small-blocks") as mount:
            assert mount.video(source.file_name).read_bytes() == source.data  # 22 blocks
            lines = [line for line in mount.log().splitlines() if UNVERIFIED in line]
            assert len(lines) == 1, lines
            assert (" WARNING " in lines[0] and "its chunk digests are of 8 MiB chunks" in lines[0]
                    and "a --block-size that is a multiple of 8 MiB" in lines[0]), lines
        with VcfsMount(server.url, tmp_path / "whole-chunks", "--block-size", "8M") as mount:
            assert mount.video(source.file_name).read_bytes() == source.data
            mount.wait_quiet(30)
            assert remote_stats(mount)["verified_chunks"] >= chunk_count(source, 8 * MIB)
            assert UNVERIFIED not in mount.log()


STALL = 6.0  # seconds the proxy holds back the rest of a block in the stall test


@mounting
def test_a_read_of_a_blocks_start_is_answered_while_the_rest_of_the_block_is_stalled(
    stored: Stored, link: FaultyLink, tmp_path: Path,
) -> None:
    source = stored.new  # 256 KiB chunks
    block = 2 * MIB
    header = f"bytes={block}-{block + MIB - 1}"
    with VcfsMount(link.url, tmp_path / "mnt", "--readahead-max", "0") as mount:
        path = mount.video(source.file_name)
        assert read_uncached(path, 10, 0) == source.data[:10]  # digests known from here on
        earlier = len(link.request_log())  # the link serves the whole module
        link.faults.enable(Stall(seconds=STALL, after_bytes=400 * KIB,
                                 match=lambda request: request.headers.get("range") == header),
                           times=1)
        # The block's first chunk is in, verified and handed over; the rest waits STALL s.
        result = bounded_read(path, READ, block, limit=STALL / 2)
        assert result.error is None, result.error
        assert result.data == source.data[block : block + READ]
        assert link.faults.injected().get("stall") == 1
        # The block itself is cached once the stall is over, in one request.
        rest = bounded_read(path, READ, block + MIB - READ, limit=3 * STALL)
        assert rest.data == source.data[block + MIB - READ : block + MIB]
        ranges = [r for p, r in link.request_log()[earlier:] if source.content_hash in p and r]
        assert ranges == [header]


# ---------------------------------------------------------------------------------------------
# fetch_blocks with blocks of several chunks, against a fake service


CHUNK = 1000
DATA = bytes(range(256)) * 20  # 5120 bytes: five chunks of 1000 and one of 120
HASH = blake3(DATA).hexdigest()


class FakeService:
    def __init__(self) -> None:
        self.digests = [blake3(DATA[i : i + CHUNK]).hexdigest()
                        for i in range(0, len(DATA), CHUNK)]
        self.ranges: list[str] = []
        self.piece = len(DATA)  # bodies are sent in pieces of this many bytes

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == f"/meta/{HASH}":
            return httpx.Response(200, json={"hash": HASH, "size_bytes": len(DATA),
                                             "file_path": f"b/{HASH}.mp4"})
        if path == f"/video/{HASH}/chunks":
            return httpx.Response(200, json={"hash": HASH, "chunk_size": CHUNK,
                                             "digests": self.digests})
        assert path == f"/video/{HASH}"
        header = request.headers["Range"]
        self.ranges.append(header)
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", header)
        assert match is not None
        start, end = int(match[1]), min(int(match[2]), len(DATA) - 1)
        body = DATA[start : end + 1]
        pieces = [body[i : i + self.piece] for i in range(0, len(body), self.piece)]
        return httpx.Response(206, content=iter(pieces),
                              headers={"Content-Range": f"bytes {start}-{end}/{len(DATA)}",
                                       "Content-Length": str(len(body))})


@pytest.fixture
def fake() -> FakeService:
    return FakeService()


@pytest.fixture
def remote(fake: FakeService) -> Iterator[Remote]:
    client = VidCacheClient("http://vidcache.test", transport=httpx.MockTransport(fake.handle))
    made = Remote(client, config=RemoteConfig(timeout=1.0), sleep=lambda _: None)
    yield made
    made.close()


def test_blocks_of_several_chunks_come_in_one_request_each_verified(
    remote: Remote, fake: FakeService,
) -> None:
    remote.fetch(HASH, 0, 2 * CHUNK)  # digests known from here on
    arrived: list[tuple[int, bytes]] = []
    blocks = remote.fetch_blocks(HASH, 2 * CHUNK, len(DATA), 2 * CHUNK,
                                 on_block=lambda i, block: arrived.append((i, block)))
    assert blocks == [DATA[2 * CHUNK : 4 * CHUNK], DATA[4 * CHUNK :]]  # the last one short
    assert arrived == list(enumerate(blocks))
    assert fake.ranges[-1] == f"bytes={2 * CHUNK}-{len(DATA) - 1}"  # one request
    assert remote.counters.get("verified_chunks") == 6
    assert remote.counters.get("verify_extra_bytes") == 0


@pytest.mark.parametrize(("bad_chunk", "handed_on"), [(3, []), (4, [0])])
def test_a_block_with_a_bad_chunk_is_never_handed_on(remote: Remote, fake: FakeService,
                                                     bad_chunk: int,
                                                     handed_on: list[int]) -> None:
    """Blocks [2000, 4000) and [4000, 5120): the good ones before the bad one are handed on
    as they arrive; the retries ask only for the rest."""
    fake.digests[bad_chunk] = "0" * 64
    remote.fetch(HASH, 0, 2 * CHUNK)  # chunks 0 and 1 are fine; digests known from here on
    arrived: list[int] = []
    with pytest.raises(RemoteUnavailable, match=f"chunk {bad_chunk}"):
        remote.fetch_blocks(HASH, 2 * CHUNK, len(DATA), 2 * CHUNK,
                            on_block=lambda i, _block: arrived.append(i))
    assert arrived == handed_on
    retried_from = 2 * CHUNK * (1 + len(handed_on))
    assert fake.ranges[-1] == f"bytes={retried_from}-{len(DATA) - 1}"
    assert remote.counters.get("verify_failures") > 1  # every attempt checked, none passed


def fetch_trickling(remote: Remote, fake: FakeService, *, skip: int = 0
                    ) -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    """`fetch_blocks` of bytes 2000 on in blocks of 2000, the body sent in pieces of 300 (the
    digests known already): its blocks and every (position, ready, verified start) reported
    while they arrived."""
    remote.fetch(HASH, 0, 2 * CHUNK)
    fake.piece = 300
    partial: list[tuple[int, int, bytes]] = []
    blocks = remote.fetch_blocks(
        HASH, 2 * CHUNK, len(DATA), 2 * CHUNK, skip=skip,
        on_partial=lambda i, block, ready: partial.append((i, ready, block[:ready])))
    return blocks, partial


def test_a_blocks_verified_start_is_handed_on_chunk_by_chunk_as_it_arrives(
    remote: Remote, fake: FakeService,
) -> None:
    blocks, partial = fetch_trickling(remote, fake)
    assert blocks == [DATA[2 * CHUNK : 4 * CHUNK], DATA[4 * CHUNK :]]
    # each block's first chunk, once in and verified; never a whole block, never a cut chunk
    assert partial == [(0, CHUNK, DATA[2 * CHUNK : 3 * CHUNK]),
                       (1, CHUNK, DATA[4 * CHUNK : 5 * CHUNK])]


def test_a_chunk_failing_its_digest_is_never_handed_on(remote: Remote, fake: FakeService) -> None:
    fake.digests[3] = "0" * 64
    remote.fetch(HASH, 0, 2 * CHUNK)
    fake.piece = 300
    partial: list[tuple[int, int]] = []
    with pytest.raises(RemoteUnavailable, match="chunk 3"):
        remote.fetch_blocks(HASH, 2 * CHUNK, len(DATA), 2 * CHUNK,
                            on_partial=lambda i, _block, ready: partial.append((i, ready)))
    assert set(partial) == {(0, CHUNK)}  # chunk 2 only, at every attempt


def test_a_run_may_leave_out_the_whole_chunks_its_reader_skips(
    remote: Remote, fake: FakeService,
) -> None:
    blocks, partial = fetch_trickling(remote, fake, skip=CHUNK + 500)
    # chunk 2 left out, chunk 3 (holding byte 3500, the first one needed) on
    assert fake.ranges[-1] == f"bytes={3 * CHUNK}-{len(DATA) - 1}"
    assert blocks == [DATA[3 * CHUNK : 4 * CHUNK], DATA[4 * CHUNK :]]
    assert partial == [(1, CHUNK, DATA[4 * CHUNK : 5 * CHUNK])]  # ready counts from the tail
    assert remote.counters.get("bytes_fetched") == 2 * CHUNK + len(DATA) - 3 * CHUNK
    remote.fetch_blocks(HASH, 0, 2 * CHUNK, 2 * CHUNK, skip=CHUNK - 1)
    assert fake.ranges[-1] == f"bytes=0-{2 * CHUNK - 1}"  # no whole chunk to leave out
