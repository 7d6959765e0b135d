"""A video larger than 4 GiB, end to end: ingest, the service's reads and chunk digests, the
client and a vcfs mount, at offsets just below, at and past 2**31 and 2**32 and at the end.

The video is cheap to make: a tiny mp4 with its moov atom first, followed by one `free` box
(64-bit size) reaching past 4 GiB, sparse but for random bytes around 2**31 and from just below
2**32 to the end. Players and ffprobe skip the box; every layer must still serve its bytes at
the right offsets, and random bytes there make a wrapped or truncated offset visible (a read
landing elsewhere finds zeros or the clip). The source is a file:// ingest, so nothing is sent
over HTTP twice; the service still reads, hashes and writes all of it (~4 GiB of disk while
the module runs, removed at its end; ~20-30 s on 2 shared cores).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from blake3 import blake3

from tests.support import VidcacheServer
from tests.vcfs_support import VcfsMount, requires_fuse
from vcfs import paths
from vidcache.space import free_space
from vidcache_client import VidCacheClient

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
SIZE = 2**32 + 5 * MIB + 12345  # the last digest chunk and the last block both short
CHUNK = 256 * 1024  # the service's default --chunk-size
# (start, end_exclusive) of the random bytes; zeros (a hole) elsewhere past the clip
RANDOM_SPANS = ((2**31 - MIB, 2**31 + MIB), (2**32 - 2 * MIB, SIZE))
# (offset, length) of the reads every layer is checked with
READS = (
    (2**31 - 1000, 1000), (2**31 - 1, 2), (2**31, 4096), (2**31 - 300_000, 600_000),
    (2**32 - 1000, 1000), (2**32 - 1, 2), (2**32, 1), (2**32, MIB), (2**32 + 1, 12345),
    (2**32 - 300_000, 3 * MIB), (SIZE - 1, 1), (SIZE - 100_000, 100_000),
)


@dataclass(frozen=True)
class BigVideo:
    path: Path
    hash: str
    server: VidcacheServer

    def bytes_at(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as source:
            source.seek(offset)
            return source.read(length)


def _make_sparse_mp4(path: Path) -> None:
    clip = path.with_name("clip.mp4")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi",
                    "-i", "testsrc2=size=160x120:rate=25", "-t", "2", "-c:v", "libx264",
                    "-preset", "ultrafast", "-g", "10", "-movflags", "+faststart", str(clip)],
                   check=True, timeout=60)
    head = clip.read_bytes()
    noise = random.Random(33)
    with open(path, "wb") as out:
        out.write(head)
        out.write(struct.pack(">I4sQ", 1, b"free", SIZE - len(head)))  # size 1: 64-bit size
        out.truncate(SIZE)
        for start, end in RANDOM_SPANS:
            out.seek(start)
            out.write(noise.randbytes(end - start))


def _content_hash(path: Path) -> str:
    hasher = blake3(max_threads=blake3.AUTO)
    with open(path, "rb") as source:
        while data := source.read(16 * MIB):
            hasher.update(data)
    return hasher.hexdigest()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigVideo]:
    directory = tmp_path_factory.mktemp("big")
    # the blob, plus the index's digests and the margin ingest asks for
    if free_space(directory) < SIZE + 512 * MIB:
        pytest.skip(f"needs {SIZE + 512 * MIB} bytes free in {directory}")
    source = directory / "source" / "big.mp4"
    source.parent.mkdir()
    _make_sparse_mp4(source)
    data_dir = directory / "data"
    server = VidcacheServer(data_dir, "--max-size", "5G", "--allow-file-dir",
                            str(source.parent))
    try:
        with server, VidCacheClient(server.url) as client:
            result = client.ingest(f"file://{source}", bucket="big")
            assert result["status"] == "new"
            yield BigVideo(source, result["hash"], server)
    finally:
        # 4 GiB on disk, and a sparse 4 GiB: not kept with pytest's tmp dirs (the log is)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(source.parent, ignore_errors=True)


def test_the_ingest_hashes_and_stores_every_byte(big: BigVideo) -> None:
    assert big.hash == _content_hash(big.path)
    with VidCacheClient(big.server.url) as client:
        meta = client.get_meta(big.hash)
    assert meta is not None and meta["size_bytes"] == SIZE
    assert (big.server.data_dir / meta["file_path"]).stat().st_size == SIZE
    listed = subprocess.run([sys.executable, "-m", "vidcache", "list", "--server",
                             big.server.url], capture_output=True, text=True, check=True,
                            timeout=60).stdout
    assert listed.split("\t")[:2] == [big.hash, str(SIZE)]


def test_the_service_serves_ranges_past_4_gib(big: BigVideo) -> None:
    url = f"{big.server.url}/video/{big.hash}"
    with httpx.Client(timeout=60) as http:
        for offset, length in READS:
            last = offset + length - 1
            # the fast path (vidcache/serving.py), then the route (If-Range goes there)
            for extra in ({}, {"If-Range": f'"{big.hash}"'}):
                answer = http.get(url, headers={"Range": f"bytes={offset}-{last}", **extra})
                assert answer.status_code == 206
                assert answer.headers["content-range"] == f"bytes {offset}-{last}/{SIZE}"
                assert answer.content == big.bytes_at(offset, length), (offset, length, extra)
        suffix = http.get(url, headers={"Range": "bytes=-70000"})
        assert suffix.content == big.bytes_at(SIZE - 70000, 70000)
        assert http.head(url).headers["content-length"] == str(SIZE)
        assert http.get(url, headers={"Range": f"bytes={SIZE}-"}).status_code == 416
        both = http.get(url, headers={"Range": f"bytes=0-9,{2**32 - 5}-{2**32 + 4}"})
        assert both.headers["content-type"].startswith("multipart/byteranges")
        assert f"bytes {2**32 - 5}-{2**32 + 4}/{SIZE}".encode() in both.content
        assert big.bytes_at(2**32 - 5, 10) in both.content


def test_chunk_digests_past_4_gib_are_those_of_the_bytes(big: BigVideo) -> None:
    count = -(-SIZE // CHUNK)
    with VidCacheClient(big.server.url) as client:
        for start, end in ((2**31 - 1, 2**31 + 1), (2**32 - 1, 2**32 + 1), (SIZE - 1, SIZE)):
            page = client.get_chunk_digests(big.hash, start=start, end=end)
            assert page is not None
            assert (page["chunk_size"], page["chunk_count"]) == (CHUNK, count)
            assert page["first_chunk"] == start // CHUNK
            assert len(page["digests"]) == -(-end // CHUNK) - start // CHUNK
            for index, digest in enumerate(page["digests"], page["first_chunk"]):
                length = min(CHUNK, SIZE - index * CHUNK)
                assert digest == blake3(big.bytes_at(index * CHUNK, length)).hexdigest()
        whole = client.get_chunk_digests(big.hash)
    assert whole is not None and len(whole["digests"]) == count
    assert whole["digests"][2**32 // CHUNK] == blake3(big.bytes_at(2**32, CHUNK)).hexdigest()


def test_the_client_reads_past_4_gib(big: BigVideo, tmp_path: Path) -> None:
    with VidCacheClient(big.server.url) as client:
        for offset, length in READS:
            asked = (offset, offset + length - 1)
            assert client.get_bytes(big.hash, byte_range=asked) == big.bytes_at(offset, length)
            with client.stream_video(big.hash, byte_range=asked) as chunks:
                assert b"".join(chunks) == big.bytes_at(offset, length)
            buffers = [bytearray(MIB) for _ in range(-(-length // MIB))]
            got = client.read_range_into(big.hash, offset, buffers)
            assert got == min(len(buffers) * MIB, SIZE - offset)
            assert b"".join(buffers)[:length] == big.bytes_at(offset, length)
        dest = tmp_path / "part.bin"
        asked = (2**32 - 3 * MIB, SIZE + 10**12)  # past the end: up to the last byte
        written = client.download_to_file(big.hash, dest, byte_range=asked)
    assert written == SIZE - asked[0]
    assert dest.read_bytes() == big.bytes_at(asked[0], written)


@pytest.mark.parametrize("options", [(), ("--block-size", "12K")], ids=["default", "12K"])
@requires_fuse[0]
@requires_fuse[1]
def test_a_vcfs_mount_reads_past_4_gib(big: BigVideo, tmp_path: Path,
                                       options: tuple[str, ...]) -> None:
    """Through the kernel, FUSE and mfusepy (its off_t), the block cache and readahead (12K
    blocks straddle 2**31 and 2**32: neither is a multiple of 12 KiB), chunk verification and
    the digest pages past 2**32."""
    with VidCacheClient(big.server.url) as client:
        meta = client.get_meta(big.hash)
    assert meta is not None
    with VcfsMount(big.server.url, tmp_path / "mnt", *options) as mount:
        video = mount.video(paths.video_name(big.hash, meta["file_path"]))
        assert video.stat().st_size == SIZE
        fd = os.open(video, os.O_RDONLY)
        try:
            for offset, length in READS:
                assert os.pread(fd, length, offset) == big.bytes_at(offset, length), offset
            assert os.pread(fd, 10, SIZE) == b""
            # a sequential read across 2**32 to the end, readahead included
            os.lseek(fd, 2**32 - 2 * MIB, os.SEEK_SET)
            tail = b"".join(iter(lambda: os.read(fd, MIB), b""))
            assert tail == big.bytes_at(2**32 - 2 * MIB, SIZE)
        finally:
            os.close(fd)
        probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=size",
                                "-of", "json", str(video)], capture_output=True, text=True,
                               check=True, timeout=60)
        assert json.loads(probe.stdout)["format"]["size"] == str(SIZE)
        stats = mount.stats()
    assert stats["remote"]["verified_chunks"] > 0
    assert stats["remote"]["verify_failures"] == stats["remote"]["errors"] == 0
    assert stats["fuse"]["errors"] == 0
    assert stats["fuse"]["bytes_read"] >= SIZE - 2**32
