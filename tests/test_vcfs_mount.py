"""vcfs mounted for real over the real vidcache service, read with cat/dd/ffprobe/ffmpeg and
os.pread, compared byte for byte with the source files.

Most tests share one module-wide mount; tests whose counters must start cold (probes, cache
reuse) or that kill/stop the daemon get a mount of their own (`fresh_mount`). Where a test
needs a read to reach the daemon rather than the kernel's page cache, it drops the file's
pages with posix_fadvise(DONTNEED).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import importlib.metadata
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from blake3 import blake3
from PIL import Image

import vcfs
import vcfs.limits
from bench.proxy import Connection, Hooks, ProxyConfig, ProxyThread, Request
from tests.support import (
    VidcacheServer,
    documented_options,
    free_port,
    interrupt_while_it_waits,
    new_cgroup,
    serve_directory,
    sighup_in_children,
    subcommand_options,
    tmpfs_holding_a_file,
    wait_until,
)
from tests.vcfs_support import (
    AS_NOBODY,
    NOBODY,
    VcfsMount,
    daemon_pid,
    drop_pages,
    in_private_mount_namespace,
    mount_factory,
    process_alive,
    python_for_nobody,
    requires_fuse,
    thread_stacks,
    vcfs_command,
)
from vcfs import cli, paths
from vcfs.blocks import BlockCache
from vcfs.fs import VcfsOperations
from vcfs.remote import VideoMeta
from vidcache_client import VidCacheClient

pytestmark = requires_fuse

BUCKET = "vcfs-mount"
CORPUS = ("a.mp4", "b.mp4", "c.mkv", "big.mp4", "big_moov_end.mp4")
KIB = 1 << 10
MIB = 1 << 20


@dataclass(frozen=True)
class Video:
    source: Path
    content_hash: str
    file_name: str  # <hash>.<ext> under by-hash/
    size: int
    first_seen: str

    def data(self) -> bytes:
        return self.source.read_bytes()


@pytest.fixture(scope="module")
def corpus(
    videos: dict[str, Path], media_url: str, vidcache_server: VidcacheServer
) -> dict[str, Video]:
    """The corpus videos, ingested into the session's service (our own bucket)."""
    result = {}
    with VidCacheClient(vidcache_server.url) as client:
        for name in CORPUS:
            content_hash = client.ingest(f"{media_url}/{name}", bucket=BUCKET)["hash"]
            assert content_hash == blake3(videos[name].read_bytes()).hexdigest()
            meta = client.get_meta(content_hash)
            assert meta is not None
            result[name] = Video(
                source=videos[name],
                content_hash=content_hash,
                file_name=paths.video_name(content_hash, meta["file_path"]),
                size=meta["size_bytes"],
                first_seen=meta["first_seen"],
            )
    return result


@pytest.fixture(scope="module")
def mount(
    tmp_path_factory: pytest.TempPathFactory, vidcache_server: VidcacheServer,
    corpus: dict[str, Video],
) -> Iterator[VcfsMount]:
    with VcfsMount(vidcache_server.url, tmp_path_factory.mktemp("vcfs") / "mnt") as mounted:
        yield mounted


@pytest.fixture
def fresh_mount(
    tmp_path: Path, vidcache_server: VidcacheServer, corpus: dict[str, Video]
) -> Iterator[Callable[..., VcfsMount]]:
    """Factory: `fresh_mount(*vcfs_args)` mounts a new daemon (cold caches); all unmounted."""
    with mount_factory(vidcache_server.url, tmp_path) as start:
        yield start


def read_head(path: Path, size: int) -> bytes:
    """The first `size` bytes in 1 MiB reads, without the kernel's readahead: it would fetch
    past `size` in the background, still in flight when the test reads the counters."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return b"".join(os.pread(fd, min(MIB, size - offset), offset)
                        for offset in range(0, size, MIB))
    finally:
        os.close(fd)


def pread_uncached(fd: int, size: int, offset: int) -> bytes:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, size, offset)


def ffprobe_json(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
        capture_output=True, check=True, timeout=60,
    ).stdout
    probe: dict[str, Any] = json.loads(out)
    probe["format"].pop("filename")
    return probe


def frame_md5(path: Path, seconds: float) -> str:
    """MD5 of the first video frame decoded after seeking to `seconds` (ffmpeg -ss)."""
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-ss", str(seconds), "-i", str(path), "-frames:v", "1",
         "-f", "md5", "-"],
        capture_output=True, check=True, timeout=60, text=True,
    ).stdout.strip()


# ---------------------------------------------------------------------------------------------
# Namespace


def test_root_and_by_hash_listing(mount: VcfsMount, corpus: dict[str, Video]) -> None:
    root = mount.mountpoint
    assert sorted(os.listdir(root)) == [".vcfs", "by-hash"]
    assert os.listdir(root / ".vcfs") == ["stats"]
    listed = set(os.listdir(root / "by-hash"))
    assert {video.file_name for video in corpus.values()} <= listed
    for directory in (root, root / "by-hash", root / ".vcfs"):
        info = os.stat(directory)
        assert stat.S_ISDIR(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o555
        # Times of the mount's start, not 1970; links as find and du expect them.
        assert info.st_mtime == pytest.approx(time.time(), abs=3600)
        assert info.st_nlink == (4 if directory == root else 2)


def test_df_counts_the_videos_of_the_last_listing(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video]
) -> None:
    mounted = fresh_mount("-o", "ro,fsname=videos")  # -o may repeat what vcfs sets itself
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    assert f"videos {mounted.mountpoint} fuse.vcfs ro," in "\n".join(mounts)
    requests = mounted.stats()["remote"]["http_requests"]  # the start-up's checks
    assert os.statvfs(mounted.mountpoint).f_files == 0  # no listing yet, and df asks for none
    assert mounted.stats()["remote"]["http_requests"] == requests
    listed = os.listdir(mounted.mountpoint / "by-hash")
    total = sum(os.stat(mounted.video(name)).st_size for name in listed)
    info = os.statvfs(mounted.mountpoint)
    assert info.f_files == len(listed) >= len(corpus)
    assert total <= info.f_blocks * info.f_frsize < total + 4096 * len(listed)
    assert info.f_bfree == info.f_bavail == 0


def test_o_max_read_bounds_the_kernels_reads(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video]
) -> None:
    """libfuse3 mounts with `-o max_read=N` only if the file system's init asks for the same
    N: the mount failed ("init() and fuse_session_new() requested different maximum read
    size (0 vs 65536)", libfuse code 8)."""
    video = corpus["big.mp4"]
    mounted = fresh_mount("-o", "max_read=65536")
    with open(mounted.video(video.file_name), "rb") as stream:
        assert stream.read() == video.data()
    fuse = mounted.stats()["fuse"]
    assert fuse["bytes_read"] >= video.size
    assert fuse["largest_read"] == 64 * KIB


class _Walked(list[VideoMeta]):
    """A listing that counts how often it is gone through."""

    walks = 0

    def __iter__(self) -> Iterator[VideoMeta]:
        self.walks += 1
        return super().__iter__()


class _ListingRemote:
    """Stands in for vcfs.remote.Remote: its listing is `listing`."""

    def __init__(self, listing: _Walked) -> None:
        self.listing = listing

    def list_videos(self) -> _Walked:
        return self.listing

    def last_listing(self) -> _Walked:
        return self.listing


def test_readdir_and_statfs_go_through_a_listing_once() -> None:
    """A player lists the folder at every open, `df` asks statfs: at 100k videos, readdir spent
    0.2 s building the entries and statfs 5 ms on the sum, each time."""
    videos = [VideoMeta(f"{n:064x}", 5000 * n, 0, f"{n:064x}.mp4") for n in range(1, 4)]
    remote = _ListingRemote(_Walked(videos))
    operations = VcfsOperations(remote, BlockCache(lambda h, s, e: b""),  # type: ignore[arg-type]
                                mountpoint="/nonexistent")
    try:
        entries = operations.readdir(f"/{paths.BY_HASH_DIR}", None)
        assert [name for name, _, _ in entries] == [".", "..", *(v.name for v in videos)]
        assert entries[2][1] == {"st_mode": stat.S_IFREG | 0o444,
                                 "st_ino": paths.video_inode(videos[0].content_hash)}
        info = operations.statfs("/")
        assert (info["f_files"], info["f_blocks"]) == (3, 2 + 3 + 4)  # in 4 KiB units
        walks = remote.listing.walks
        for _ in range(3):
            assert operations.readdir(f"/{paths.BY_HASH_DIR}", None) == entries
            assert operations.statfs("/") == info
        assert remote.listing.walks == walks
        remote.listing = _Walked(videos[:1])  # the next listing
        assert len(operations.readdir(f"/{paths.BY_HASH_DIR}", None)) == 3
        assert operations.statfs("/")["f_files"] == 1
    finally:
        operations.close()


def test_getattr_of_videos(mount: VcfsMount, corpus: dict[str, Video]) -> None:
    assert corpus["c.mkv"].file_name.endswith(".mkv")
    for video in corpus.values():
        info = os.stat(mount.video(video.file_name))
        assert stat.S_ISREG(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o444
        assert info.st_size == video.size == video.source.stat().st_size
        assert info.st_mtime == pytest.approx(datetime.fromisoformat(video.first_seen).timestamp())
        assert info.st_ino == paths.video_inode(video.content_hash)
        assert os.stat(mount.video(video.file_name)).st_ino == info.st_ino


def test_bad_names_are_enoent_without_requests(mount: VcfsMount, corpus: dict[str, Video]) -> None:
    content_hash = corpus["a.mp4"].content_hash
    bad = [
        "by-hash/notahash.mp4",
        f"by-hash/{content_hash.upper()}.mp4",
        f"by-hash/{content_hash}",
        f"by-hash/{content_hash}.",
        f"by-hash/{content_hash}.MP4",
        f"by-hash/{content_hash}.waytoolongext",
        f"by-hash/{content_hash[:-1]}.mp4",
        "nothing-here",
        ".vcfs/nothing-here",
    ]
    before = mount.stats()["remote"]["http_requests"]
    for name in bad:
        with pytest.raises(FileNotFoundError):
            os.stat(mount.mountpoint / name)
    assert mount.stats()["remote"]["http_requests"] == before


def test_unknown_hash_and_wrong_extension_are_enoent(
    mount: VcfsMount, corpus: dict[str, Video]
) -> None:
    with pytest.raises(FileNotFoundError):
        os.stat(mount.video("0" * 64 + ".mp4"))
    with pytest.raises(FileNotFoundError):
        open(mount.video("1" * 64 + ".mkv"), "rb").close()
    mp4 = corpus["a.mp4"].content_hash
    with pytest.raises(FileNotFoundError):
        os.stat(mount.video(f"{mp4}.mkv"))
    mkv = corpus["c.mkv"].content_hash
    with pytest.raises(FileNotFoundError):
        os.stat(mount.video(f"{mkv}.mp4"))


def unique_video(folder: Path) -> Path:
    """folder/fresh.mp4, a second of a still of random 8x8 blocks: perceptually unlike any
    other stored video, so the service stores it as a video of its own."""
    image = Image.frombytes("L", (8, 8), os.urandom(64)).resize((128, 96), Image.Resampling.NEAREST)
    image.save(folder / "still.png")
    source = folder / "fresh.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-loop", "1", "-i", str(folder / "still.png"), "-t", "1",
         "-r", "5", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(source)],
        check=True, timeout=60,
    )
    return source


def test_newly_ingested_video_appears(
    mount: VcfsMount, vidcache_server: VidcacheServer, tmp_path: Path
) -> None:
    source = unique_video(tmp_path)
    content_hash = blake3(source.read_bytes()).hexdigest()
    path = mount.video(f"{content_hash}.mp4")
    assert not path.exists()  # a negative lookup, now cached by the kernel and by vcfs
    with serve_directory(tmp_path) as url, VidCacheClient(vidcache_server.url) as client:
        result = client.ingest(f"{url}/fresh.mp4", bucket=BUCKET)
    assert result["hash"] == content_hash
    wait_until(path.exists, timeout=20, what="the new video visible in the mount")
    assert path.read_bytes() == source.read_bytes()
    wait_until(lambda: path.name in os.listdir(path.parent), timeout=20, what="listed")


def test_a_deleted_video_is_enoent_to_open_and_read_while_the_kernel_still_stats_it(
    fresh_mount: Callable[..., VcfsMount], vidcache_server: VidcacheServer, tmp_path: Path
) -> None:
    """docs/vcfs.md, a video deleted from the service: a read of what is not cached gets the
    service's 404 as ENOENT, and so does every open from then on, while `stat` of the name
    still succeeds (the kernel keeps it for a day and does not ask vcfs); `ls` lists it no
    more."""
    source = unique_video(tmp_path)
    with serve_directory(tmp_path) as url, VidCacheClient(vidcache_server.url) as client:
        content_hash = client.ingest(f"{url}/{source.name}", bucket=BUCKET)["hash"]
    mounted = fresh_mount("--no-first-block")  # nothing of the video cached by its lookup
    path = mounted.video(f"{content_hash}.mp4")
    assert path.stat().st_size == source.stat().st_size
    with VidCacheClient(vidcache_server.url) as client:
        client.delete(content_hash)
    with pytest.raises(FileNotFoundError):
        path.read_bytes()
    assert path.stat().st_size == source.stat().st_size
    with pytest.raises(FileNotFoundError):
        open(path, "rb").close()
    assert path.name not in os.listdir(path.parent)


# ---------------------------------------------------------------------------------------------
# Bytes


def test_whole_files_with_cat_and_dd(
    mount: VcfsMount, corpus: dict[str, Video], tmp_path: Path
) -> None:
    for video in corpus.values():
        path = mount.video(video.file_name)
        cat = subprocess.run(["cat", str(path)], capture_output=True, check=True, timeout=60)
        assert cat.stdout == video.data(), video.source.name
        copy = tmp_path / "copy"
        subprocess.run(
            ["dd", f"if={path}", f"of={copy}", "bs=1M", "status=none"], check=True, timeout=60
        )
        assert copy.read_bytes() == video.data(), video.source.name


def test_random_reads_across_small_blocks_and_past_eof(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video]
) -> None:
    # 64 KiB blocks in a 1 MiB cache: reads span many blocks and force evictions.
    mounted = fresh_mount("--block-size", "64K", "--cache-size", "1M",
                          "--readahead-max", "256K")
    block = 64 * 1024
    rng = random.Random(1234)
    for name in ("big.mp4", "big_moov_end.mp4", "b.mp4"):
        video = corpus[name]
        data = video.data()
        fd = os.open(mounted.video(video.file_name), os.O_RDONLY)
        try:
            for _ in range(150):
                edge = rng.randrange(0, video.size // block + 2) * block
                offset = rng.choice([
                    rng.randrange(0, video.size),
                    max(edge + rng.randrange(-300, 300), 0),
                    video.size - rng.randrange(0, 3 * block),
                ])
                size = rng.choice([1, 4096, rng.randrange(1, 3 * block), 300_000])
                got = pread_uncached(fd, size, offset)
                assert got == data[offset : offset + size], (name, offset, size)
            for offset in (video.size, video.size + 1, video.size + 10 * MIB):
                assert pread_uncached(fd, 4096, offset) == b""
            assert pread_uncached(fd, 4096, video.size - 100) == data[-100:]
        finally:
            os.close(fd)
    stats = mounted.stats()
    assert stats["cache"]["evictions"] > 0
    assert stats["cache"]["cached_bytes"] <= MIB
    assert stats["fuse"]["errors"] == 0


def fetched_when_quiet(mounted: VcfsMount) -> int:
    """The bytes fetched so far, once no fetch is under way."""
    mounted.wait_quiet(30)
    fetched: int = mounted.stats()["remote"]["bytes_fetched"]
    return fetched


def test_scattered_small_reads_fetch_only_the_chunks_they_need(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video]
) -> None:
    """A 100 KiB read into a block's first 256 KiB digest chunk, after another read that
    continued nothing either, brings that chunk alone, not the rest of its 1 MiB block (a
    media scanner's pattern); a read that then continues one fetches only what it lacks.
    A read returns once the bytes it needs are in, the rest of its block may still be on its
    way: the counters are read once no fetch is under way (with both cores busy, about 1 run
    in 7 counted the first read's block, or the continuing read's rest, after the reads)."""
    mounted = fresh_mount()
    video = corpus["big.mp4"]
    data = video.data()
    chunk = 256 * KIB
    first, *offsets = [block * MIB + 10 * KIB for block in range(1, video.size // MIB, 2)][:9]
    fd = os.open(mounted.video(video.file_name), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead around them
        assert os.pread(fd, 100 * KIB, first) == data[first : first + 100 * KIB]
        before = fetched_when_quiet(mounted)  # a jump: its whole block
        for offset in offsets:
            assert os.pread(fd, 100 * KIB, offset) == data[offset : offset + 100 * KIB]
        scattered = fetched_when_quiet(mounted) - before
        assert scattered == len(offsets) * chunk
        continued = offsets[0] + 100 * KIB
        assert os.pread(fd, 400 * KIB, continued) == data[continued : continued + 400 * KIB]
        assert fetched_when_quiet(mounted) - before == scattered + MIB - chunk
    finally:
        os.close(fd)


CHUNK = 256 * KIB  # the service's digest chunk for these videos


def mount_for_a_last_page_tail(fresh_mount: Callable[..., VcfsMount],
                               video: Video) -> tuple[VcfsMount, int]:
    """A mount, and its block size, whose last block of `video` holds the last page past its
    first chunk, so that a read of that page fetches a tail (whatever the video's size)."""
    block = next(size for size in (MIB << k for k in range(7))
                 if (video.size - 1) % size >= CHUNK)
    return fresh_mount("--block-size", str(block), "--no-first-block"), block


def test_a_last_page_read_first_is_not_fetched_again_by_a_read_through(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video], tmp_path: Path
) -> None:
    """A player reads a file's first page, then its last (for an index at the end): that
    fetches the last block's tail (from the digest chunk holding the page, the digests
    known since the first read); reading the file through with `dd` then fetches only that
    block's head, joined with the tail: every byte of the file is fetched once."""
    video = corpus["big.mp4"]
    data = video.data()
    mounted, _ = mount_for_a_last_page_tail(fresh_mount, video)
    path = mounted.video(video.file_name)
    last_page = (video.size - 1) // 4096 * 4096
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # those pages alone
        assert os.pread(fd, 4096, 0) == data[:4096]
        first = fetched_when_quiet(mounted)  # the first block
        assert os.pread(fd, 4096, last_page) == data[last_page:]
    finally:
        os.close(fd)
    assert fetched_when_quiet(mounted) - first == video.size - last_page // CHUNK * CHUNK
    copy = tmp_path / "copy"
    subprocess.run(["dd", f"if={path}", f"of={copy}", f"bs={MIB}", "status=none"],
                   check=True, timeout=60)
    assert copy.read_bytes() == data
    assert fetched_when_quiet(mounted) == video.size  # the tail was not fetched again
    stats = mounted.stats()
    assert stats["cache"]["cached_bytes"] == video.size
    assert stats["fuse"]["errors"] == 0


def test_readahead_reaching_a_last_page_read_first_fetches_the_rest_of_its_block(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video]
) -> None:
    """A player reads a file's first page, then its last (the last block's tail), then
    plays it through: readahead reaching the last block fetches what lies before the tail
    (joined with it), so the reader does not stop there for a fetch of its own. The reads
    stop where the last block begins: every byte is then fetched, once, and reading the
    rest is served from memory."""
    video = corpus["big.mp4"]
    data = video.data()
    mounted, block = mount_for_a_last_page_tail(fresh_mount, video)
    path = mounted.video(video.file_name)
    last_page = (video.size - 1) // 4096 * 4096
    last_block = (video.size - 1) // block * block
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # these reads alone reach vcfs
        assert os.pread(fd, 4096, 0) == data[:4096]
        assert os.pread(fd, 4096, last_page) == data[last_page:]
        for offset in range(0, last_block, MIB):  # a stream: readahead's window grows
            assert os.pread(fd, MIB, offset) == data[offset : offset + MIB]
        wait_until(lambda: mounted.stats()["remote"]["bytes_fetched"] == video.size,
                   timeout=20, what="readahead to fetch the last block's head")
        misses = mounted.stats()["cache"]["misses"]
        assert os.pread(fd, video.size - last_block, last_block) == data[last_block:]
    finally:
        os.close(fd)
    stats = mounted.stats()
    assert stats["cache"]["misses"] == misses  # the last block was whole in memory
    assert stats["remote"]["bytes_fetched"] == stats["cache"]["cached_bytes"] == video.size
    assert stats["fuse"]["errors"] == 0


def test_concurrent_readers_same_and_different_files(
    mount: VcfsMount, corpus: dict[str, Video]
) -> None:
    names = ("big.mp4", "big_moov_end.mp4", "a.mp4")
    sources = {name: corpus[name].data() for name in names}

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        name = names[seed % len(names)]
        fd = os.open(mount.video(corpus[name].file_name), os.O_RDONLY)
        try:
            for _ in range(40):
                offset = rng.randrange(0, corpus[name].size)
                size = rng.randrange(1, 2 * MIB)
                got = pread_uncached(fd, size, offset)
                assert got == sources[name][offset : offset + size], (name, offset, size)
        finally:
            os.close(fd)
        return seed

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert sorted(pool.map(reader, range(12))) == list(range(12))


def test_log_level_debug_logs_every_read_with_its_offset_and_size(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video]
) -> None:
    """docs/vcfs.md: `--log-level debug` logs every read with its offset and size, where a
    user sees what the kernel sends (Troubleshooting: reads of 128 KiB)."""
    video = corpus["big.mp4"]
    mounted = fresh_mount()  # VcfsMount logs at debug level
    assert mounted.video(video.file_name).read_bytes() == video.data()
    fuse = mounted.stats()["fuse"]
    logged = [(int(offset), int(size)) for offset, size in re.findall(
        rf"DEBUG vcfs\.fs: read {video.content_hash[:12]} \[(\d+), \+(\d+)\)", mounted.log())]
    assert len(logged) == fuse["fuse_reads"]
    assert max(size for _, size in logged) == fuse["largest_read"]
    covered = 0  # the reads, in offset order, leave no byte of the video out
    for offset, size in sorted(logged):
        assert offset <= covered
        covered = max(covered, offset + size)
    assert covered >= video.size


def test_a_log_file_rotated_away_is_followed_by_a_new_one(
    tmp_path: Path, vidcache_server: VidcacheServer, corpus: dict[str, Video]
) -> None:
    """A mount runs for weeks, and logrotate renames its `--log-file` (then compresses and
    deletes the renamed file). The daemon wrote on into the file it had opened: into the
    rotated one, and once that was deleted, into a file nobody could read that held its disk
    space until the unmount. The next line after a rotation now goes to a new file at the
    path, and the daemon's stdout and stderr (libfuse's messages, a traceback) with it."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log_file = tmp_path / "vcfs.log"
    rotated = tmp_path / "vcfs.log.1"
    video = corpus["a.mp4"]
    started = subprocess.run(
        vcfs_command("mount", vidcache_server.url, str(mountpoint), "--daemon", "--log-file",
                     str(log_file), "--log-level", "debug"),  # a line per read
        capture_output=True, text=True, timeout=60)
    pid = None
    try:
        assert started.returncode == 0, started.stderr
        pid = daemon_pid(started)
        log_file.rename(rotated)
        assert (mountpoint / "by-hash" / video.file_name).read_bytes() == video.data()
        line = f"DEBUG vcfs.fs: read {video.content_hash[:12]} [0, "
        wait_until(lambda: log_file.exists() and line in log_file.read_text(), timeout=10,
                   what=f"{line!r} in a new {log_file}")
        assert line not in rotated.read_text()
        assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)] == [str(log_file)] * 2
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        if pid is not None:
            wait_until(lambda: not process_alive(pid), timeout=20, what="the daemon exited")


@pytest.mark.parametrize(("args", "shown"), [
    ([], "(cache 256 MiB in 1 MiB blocks, readahead up to 16 MiB)"),
    (["--cache-size", "1536K", "--block-size", "256K", "--readahead-max", "128K"],
     "(cache 1536 KiB in 256 KiB blocks, readahead up to 128 KiB)"),
    (["--readahead-max", "1000000"], "readahead up to 1000000 bytes)"),
    (["--readahead-max", "0"], "blocks, no readahead)"),
])
def test_the_mount_line_of_the_log_gives_the_sizes_as_set(
    fresh_mount: Callable[..., VcfsMount], args: list[str], shown: str
) -> None:
    """The log's `mounting URL at MOUNTPOINT (...)` line shows the cache, block and readahead
    sizes the mount runs with. Was: whole MiB rounded down (`--readahead-max 128K` logged as
    `readahead up to 0 MiB`, readahead off as the same)."""
    mounted = fresh_mount(*args)
    [line] = [line for line in mounted.log().splitlines() if " vcfs: mounting " in line]
    assert line.endswith(shown), line


def test_second_read_comes_from_memory(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video]
) -> None:
    mounted = fresh_mount()
    video = corpus["big.mp4"]
    path = mounted.video(video.file_name)
    # Less than a stream (8 MiB, vcfs.readahead), so drop-behind leaves every block cached.
    data = video.data()[: 6 * MIB]
    assert read_head(path, len(data)) == data
    first = mounted.stats()
    assert first["remote"]["bytes_fetched"] >= len(data)
    drop_pages(path)
    assert read_head(path, len(data)) == data
    second = mounted.stats()
    assert second["fuse"]["fuse_reads"] > first["fuse"]["fuse_reads"]  # vcfs served it...
    assert second["cache"]["hits"] > first["cache"]["hits"]
    assert second["remote"]["http_requests"] == first["remote"]["http_requests"]  # ...from RAM
    assert second["remote"]["bytes_fetched"] == first["remote"]["bytes_fetched"]
    if os.geteuid() == 0:  # the raised kernel readahead lets the kernel send 1 MiB reads
        assert second["fuse"]["largest_read"] == MIB
    print(json.dumps(second, indent=1))


# ---------------------------------------------------------------------------------------------
# Players: ffprobe and a seek with ffmpeg fetch little, and see the same media as locally


@pytest.mark.parametrize("name", ["big.mp4", "big_moov_end.mp4", "c.mkv"])
def test_ffprobe_and_seek_through_the_mount(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video], name: str
) -> None:
    mounted = fresh_mount()
    video = corpus[name]
    path = mounted.video(video.file_name)
    probe = ffprobe_json(path)
    assert probe == ffprobe_json(video.source)
    fetched = mounted.stats()["remote"]["bytes_fetched"]
    print(f"ffprobe of {name} ({video.size} bytes) fetched {fetched} bytes")
    if video.size > 8 * MIB:  # small files fit in a block or two; the fraction means nothing
        assert fetched < video.size / 4
    middle = float(probe["format"]["duration"]) / 2
    assert frame_md5(path, middle) == frame_md5(video.source, middle)
    print(f"after ffmpeg -ss {middle}: {json.dumps(mounted.stats())}")


# ---------------------------------------------------------------------------------------------
# Read-only, stats


def test_every_change_is_erofs(mount: VcfsMount, corpus: dict[str, Video]) -> None:
    existing = mount.video(corpus["a.mp4"].file_name)
    new = mount.video("f" * 64 + ".mp4")
    attempts: list[Callable[[], object]] = [
        lambda: os.open(existing, os.O_RDWR),
        lambda: os.open(existing, os.O_WRONLY | os.O_APPEND),
        lambda: os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        lambda: os.open(mount.mountpoint / "by-hash" / "x", os.O_CREAT | os.O_WRONLY),
        lambda: os.truncate(existing, 0),
        lambda: os.rename(existing, new),
        lambda: os.chmod(existing, 0o644),
        lambda: os.chown(existing, 1, 1),
        lambda: os.utime(existing, (0, 0)),
        lambda: os.unlink(existing),
        lambda: os.mkdir(mount.mountpoint / "by-hash" / "dir"),
        lambda: os.rmdir(mount.mountpoint / "by-hash"),
        lambda: os.symlink(existing, mount.mountpoint / "link"),
        lambda: os.link(existing, mount.mountpoint / "hardlink"),
        lambda: os.setxattr(existing, "user.x", b"1"),
        lambda: os.removexattr(existing, "user.x"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS, attempt
    # There are no extended attributes to read (getfattr: "Operation not supported").
    for read_xattrs in (lambda: os.getxattr(existing, "user.x"), lambda: os.listxattr(existing)):
        with pytest.raises(OSError) as caught:
            read_xattrs()
        assert caught.value.errno == errno.ENOTSUP, read_xattrs
    assert existing.read_bytes() == corpus["a.mp4"].data()


def test_names_that_are_not_videos(mount: VcfsMount, corpus: dict[str, Video]) -> None:
    """ENOENT, without a request, for what cannot be a video's name; a name longer than
    statfs's f_namemax is ENAMETOOLONG as on other file systems (it was ENOENT up to the
    kernel's own FUSE limit of 1024 bytes)."""
    name, content_hash = corpus["a.mp4"].file_name, corpus["a.mp4"].content_hash
    by_hash = mount.mountpoint / "by-hash"
    before = mount.stats()["remote"]["http_requests"]
    for odd in (content_hash.upper() + ".mp4", content_hash + ".MP4", content_hash[:63] + ".mp4",
                content_hash + "0.mp4", content_hash, content_hash + ".", "." + name,
                content_hash + ".toolongext", "a" * 255):
        with pytest.raises(FileNotFoundError):
            os.stat(by_hash / odd)
    assert mount.stats()["remote"]["http_requests"] == before
    assert os.statvfs(mount.mountpoint).f_namemax == 255
    for overlong in ("a" * 256, content_hash + "." + "m" * 200, "é" * 128):
        with pytest.raises(OSError) as caught:
            os.stat(by_hash / overlong)
        assert caught.value.errno == errno.ENAMETOOLONG, overlong
        with pytest.raises(OSError) as caught:
            os.open(by_hash / overlong, os.O_WRONLY | os.O_CREAT)
        assert caught.value.errno == errno.ENAMETOOLONG, overlong
    assert (by_hash / ".." / "by-hash" / name).stat().st_size == corpus["a.mp4"].size


def documented_stats_keys() -> set[str]:
    """The keys docs/vcfs.md's table of `.vcfs/stats` names in its first column, a section's
    as `section.key` (`fuse.fuse_reads`)."""
    doc = (ROOT / "docs" / "vcfs.md").read_text()
    section = doc.split("## Counters: `.vcfs/stats`", 1)[1].split("\n## ", 1)[0]
    return {name for line in section.splitlines() if line.startswith("| `")
            for name in re.findall(r"`([^`]+)`", line.split("|")[1])}


def stats_keys(stats: dict[str, Any]) -> set[str]:
    """`stats`'s keys as documented: a section's as `section.key`, a histogram's by its name."""
    keys = set()
    for name, value in stats.items():
        if isinstance(value, dict):
            keys |= {f"{name}.{key}" for key in value}
        else:
            keys.add(name)
    return keys


def test_stats_file_is_live_json(mount: VcfsMount, corpus: dict[str, Video]) -> None:
    before = mount.stats()
    info = os.stat(mount.mountpoint / ".vcfs" / "stats")
    assert info.st_mode & 0o777 == 0o444
    # The mount's start, as its directories show (`ls -l .vcfs` showed 1970).
    mounted = os.stat(mount.mountpoint)
    assert (info.st_mtime_ns, info.st_ctime_ns, info.st_atime_ns) == (
        mounted.st_mtime_ns, mounted.st_ctime_ns, mounted.st_atime_ns)
    drop_pages(mount.video(corpus["b.mp4"].file_name))
    with open(mount.video(corpus["b.mp4"].file_name), "rb") as file:
        file.read(10)
        assert mount.stats()["open_files"] == before["open_files"] + 1
    wait_until(lambda: mount.stats()["open_files"] == before["open_files"], timeout=10,
               what="the handle released")
    # Every counter is in docs/vcfs.md's table, which names none that is not: the read above
    # reached vcfs (its pages dropped first), so the read-size histogram exists too.
    assert stats_keys(mount.stats()) == documented_stats_keys()


# ---------------------------------------------------------------------------------------------
# Lifecycle: signals, crashes, daemon mode


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_cleanly(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video], signum: int
) -> None:
    with sighup_in_children(ignored=False):  # libfuse leaves an ignored SIGHUP (nohup) so
        mounted = fresh_mount()
    assert mounted.video(corpus["a.mp4"].file_name).read_bytes() == corpus["a.mp4"].data()
    assert mounted.process is not None
    mounted.process.send_signal(signum)
    assert mounted.process.wait(timeout=20) == 0
    assert not os.path.ismount(mounted.mountpoint)
    assert os.listdir(mounted.mountpoint) == []
    log = mounted.log()
    assert "unmounted" in log and '"fuse_reads": ' in log


def test_stale_mount_is_cleared_at_start(
    fresh_mount: Callable[..., VcfsMount], vidcache_server: VidcacheServer,
    corpus: dict[str, Video],
) -> None:
    crashed = fresh_mount()
    crashed.kill()
    with pytest.raises(OSError) as caught:
        os.listdir(crashed.mountpoint)
    assert caught.value.errno == errno.ENOTCONN  # "Transport endpoint is not connected"
    with VcfsMount(vidcache_server.url, crashed.mountpoint) as again:
        assert again.video(corpus["a.mp4"].file_name).read_bytes() == corpus["a.mp4"].data()
        assert "stale mount" in again.log()


def test_vcfs_unmount_clears_the_stale_mount_of_a_daemon_that_died(
    fresh_mount: Callable[..., VcfsMount],
) -> None:
    """docs/vcfs.md, Troubleshooting: "Transport endpoint is not connected" after the daemon
    died is undone by `vcfs unmount MOUNTPOINT` (exit status 0), leaving the empty directory."""
    crashed = fresh_mount()
    crashed.kill()
    with pytest.raises(OSError) as caught:
        os.listdir(crashed.mountpoint)
    assert caught.value.errno == errno.ENOTCONN
    cleared = run_vcfs("unmount", str(crashed.mountpoint))
    assert (cleared.returncode, cleared.stderr) == (0, "")
    assert not os.path.ismount(crashed.mountpoint)
    assert os.listdir(crashed.mountpoint) == []


def test_a_daemon_killed_before_it_mounted_is_said_with_exit_status_1(tmp_path: Path) -> None:
    """docs/vcfs.md, `--daemon`: start-up errors end in exit status 1. A daemon killed before
    it mounted (the OOM killer, a crash) printed nothing, and its -9 became exit status 247."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    ended = interrupt_while_it_waits(  # the daemon's health check waits on the silent server
        lambda url: vcfs_command("mount", url, str(mountpoint), "--daemon"),
        interrupt=lambda _command, children: os.kill(children[0], signal.SIGKILL))
    [daemon] = ended.children
    assert (ended.returncode, ended.out) == (1, "")
    assert ended.err == (f"vcfs: error: the daemon (pid {daemon}) was killed by SIGKILL before "
                         "the mount came up\n")
    assert not os.path.ismount(mountpoint)


def test_daemon_mode_detaches_once_mounted(
    tmp_path: Path, vidcache_server: VidcacheServer, corpus: dict[str, Video]
) -> None:
    mountpoint = tmp_path / "the mount"  # a space, which mountinfo escapes: unmount reads it
    mountpoint.mkdir()
    log_file = tmp_path / "daemon.log"
    started = subprocess.run(
        vcfs_command("mount", vidcache_server.url, str(mountpoint), "--daemon",
                     "--log-file", str(log_file), "--no-first-block", "--keep-passed", "0"),
        capture_output=True, text=True, timeout=60,
    )
    pid = None
    try:
        assert started.returncode == 0, started.stderr
        assert os.path.ismount(mountpoint)  # already up when the command returns
        pid = daemon_pid(started)
        # the detached daemon got every option
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--no-first-block" in argv and b"--keep-passed" in argv, argv
        video = corpus["b.mp4"]
        assert (mountpoint / "by-hash" / video.file_name).read_bytes() == video.data()
        stats = json.loads((mountpoint / ".vcfs" / "stats").read_text())
        assert stats["remote"]["first_blocks"] == 0
        stopped = subprocess.run(vcfs_command("unmount", str(mountpoint)),
                                 capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert not os.path.ismount(mountpoint)
        wait_until(lambda: not process_alive(pid), timeout=20, what="the daemon exited")
        assert "unmounted" in log_file.read_text()
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        if pid is not None and process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_unmount_of_a_mount_in_use_says_so_and_lazy_detaches_it(
    fresh_mount: Callable[..., VcfsMount], corpus: dict[str, Video]
) -> None:
    """docs/vcfs.md, `vcfs unmount` and Troubleshooting: with a file open in the mount, `vcfs
    unmount` says it is busy and what to do (exit status 1, one line); `--lazy` detaches it at
    once (exit status 0), the open file reads on, and the daemon exits once it is closed."""
    mounted = fresh_mount()
    assert mounted.process is not None
    video = corpus["a.mp4"]
    with open(mounted.video(video.file_name), "rb") as held:
        busy = run_vcfs("unmount", str(mounted.mountpoint))
        assert busy.returncode == 1, busy.stderr
        lines = busy.stderr.splitlines()
        assert len(lines) == 1, busy.stderr
        assert lines[0].startswith(f"vcfs: error: cannot unmount {mounted.mountpoint}: "), lines
        assert lines[0].endswith(" busy (files still open? use --lazy)"), lines
        assert os.path.ismount(mounted.mountpoint)
        lazy = run_vcfs("unmount", "--lazy", str(mounted.mountpoint))
        assert (lazy.returncode, lazy.stderr) == (0, "")
        assert not os.path.ismount(mounted.mountpoint)
        assert held.read() == video.data()
        assert mounted.process.poll() is None  # it serves the open file until it is closed
    assert mounted.process.wait(timeout=20) == 0
    assert "unmounted" in mounted.log()


class _BasicAuth(Hooks):
    """A reverse proxy asking for HTTP Basic auth: 401 unless the request has `user:hunter2`."""

    def on_request(self, conn: Connection, request: Request) -> bytes | None:
        del conn
        if request.headers.get("authorization") == (
                "Basic " + base64.b64encode(b"user:hunter2").decode("ascii")):
            return None
        return (b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"proxy\"\r\n"
                b"Content-Length: 0\r\n\r\n")


def test_a_daemons_command_line_has_no_credentials(
    tmp_path: Path, vidcache_server: VidcacheServer, corpus: dict[str, Video]
) -> None:
    """`--daemon` with a URL with `user:password@` (a proxy's Basic auth): the daemon's command
    line, which every user sees in the process list, names the URL without them, and the
    daemon mounts through the proxy with them all the same. Was: the URL whole in it."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    pid = None
    with ProxyThread(ProxyConfig(upstream_port=vidcache_server.port), hooks=_BasicAuth()) as proxy:
        refused = run_vcfs("mount", proxy.url, str(mountpoint), "--timeout", "3")
        assert refused.returncode == 1 and "401" in refused.stderr, refused.stderr
        url = proxy.url.replace("http://", "http://user:hunter2@")
        try:
            # the daemon runs in "/": it imports this tree's vcfs by PYTHONPATH
            started = subprocess.run(vcfs_command("mount", url, str(mountpoint), "--daemon"),
                                     capture_output=True, text=True, timeout=60,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert started.returncode == 0, started.stderr
            pid = daemon_pid(started)
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert proxy.url.encode() in argv, argv
            assert not [arg for arg in argv if b"hunter2" in arg], argv
            video = corpus["b.mp4"]
            assert (mountpoint / "by-hash" / video.file_name).read_bytes() == video.data()
        finally:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                           check=False)
            if pid is not None:
                wait_until(lambda: not process_alive(pid), timeout=20, what="the daemon exited")


def test_a_mount_point_given_by_a_symlink_is_its_target(
    tmp_path: Path, vidcache_server: VidcacheServer, corpus: dict[str, Video]
) -> None:
    """A symlink is never a mount point: vcfs waited for the path given to become one, so
    --daemon reported failure after --timeout + 30 s (the mount was up all along), and
    fusermount3 -u refused the symlink ("Invalid argument")."""
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    log_file = tmp_path / "daemon.log"
    try:
        started = subprocess.run(
            vcfs_command("mount", vidcache_server.url, str(link), "--daemon", "--timeout", "3",
                         "--log-file", str(log_file)),
            capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith(f"vcfs: mounted {vidcache_server.url} at {target} ")
        video = corpus["b.mp4"]
        assert (link / "by-hash" / video.file_name).read_bytes() == video.data()
        stopped = run_vcfs("unmount", str(link))
        assert stopped.returncode == 0, stopped.stderr
        assert not os.path.ismount(target)
        assert "did not appear" not in log_file.read_text()
    finally:
        subprocess.run(["fusermount3", "-u", str(target)], capture_output=True, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_unmount_refuses_a_file_system_that_is_not_vcfs(tmp_path: Path) -> None:
    """As root, fusermount3 -u unmounts whatever it is given: a tmpfs, and its files, would go."""
    target = tmp_path / "a tmpfs"  # a space, which mountinfo escapes
    with tmpfs_holding_a_file(target) as notes:
        result = run_vcfs("unmount", str(target))
        assert result.returncode == 1, result.stderr
        assert "is a tmpfs mount, not a vcfs one" in result.stderr, result.stderr
        assert os.path.ismount(target) and notes.read_text() == "keep me"


@contextlib.contextmanager
def dead_fuse_mount_of_another_type(target: Path) -> Iterator[None]:
    """A FUSE mount of type fuse.sshfs at the new directory `target` whose daemon was killed
    ("Transport endpoint is not connected"), as a crashed sshfs leaves; cleared at the end."""
    target.mkdir()
    serve = ("import sys; from vcfs.fuselib import FUSE, Operations; "
             "FUSE(Operations(), sys.argv[1], foreground=True, ro=True, fsname='host:/home', "
             "subtype='sshfs')")
    daemon = subprocess.Popen([sys.executable, "-c", serve, str(target)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: f" {target} fuse.sshfs " in Path("/proc/self/mounts").read_text(),
                   timeout=30, what=f"the sshfs-like mount at {target}")
        daemon.kill()
        daemon.wait(timeout=10)
        assert cli.is_stale_mount(str(target))
        yield
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        subprocess.run(["fusermount3", "-uz", str(target)], capture_output=True, check=False)


def test_a_dead_mount_of_another_file_system_is_not_vcfs_s_to_clear(tmp_path: Path) -> None:
    """docs/vcfs.md: a stale mount "left by a vcfs that crashed" is cleared, "any other mount
    there is refused". A dead sshfs's was unmounted by `vcfs unmount` (exit 0) and by `vcfs
    mount` on it (with a warning, then mounted over): fusermount3, as root, unmounts any type."""
    target = tmp_path / "sshfs"
    with dead_fuse_mount_of_another_type(target):
        result = run_vcfs("unmount", str(target))
        assert (result.returncode, result.stderr) == (1, (
            f"vcfs: error: {target} is a fuse.sshfs mount, not a vcfs one; not unmounting it "
            "(umount, or fusermount3 -u for another FUSE file system)\n"))
        result = run_vcfs("mount", "http://127.0.0.1:1", str(target))
        assert (result.returncode, result.stderr) == (1, (
            f"vcfs: error: {target} is already a mount point (fuse.sshfs, whose daemon died: "
            "not vcfs's to unmount; choose an empty directory that is not a mount point)\n"))
        assert cli.is_stale_mount(str(target))  # still there, dead


# ---------------------------------------------------------------------------------------------
# Start-up errors: one line, non-zero exit


def test_a_mount_point_that_is_a_vcfs_mount_says_to_unmount_it(mount: VcfsMount) -> None:
    result = run_vcfs("mount", mount.url, str(mount.mountpoint), "--daemon")
    assert (result.returncode, result.stderr) == (1, (
        f"vcfs: error: {mount.mountpoint} is already a mount point (a vcfs mount: vcfs unmount "
        f"{mount.mountpoint} to free it)\n"))
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    assert [line.split()[1] for line in mounts].count(str(mount.mountpoint)) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_mount_point_that_is_another_mount_says_to_choose_another(tmp_path: Path) -> None:
    """It said to `vcfs unmount` it, which refuses a mount that is not vcfs's."""
    target = tmp_path / "tmpfs"
    with tmpfs_holding_a_file(target) as notes:
        result = run_vcfs("mount", "http://127.0.0.1:1", str(target))
        assert (result.returncode, result.stderr) == (1, (
            f"vcfs: error: {target} is already a mount point (tmpfs: choose an empty directory "
            "that is not a mount point)\n"))
        assert notes.read_text() == "keep me"


def run_vcfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vcfs_command(*args), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", ["--foreground", "--daemon"])
def test_ctrl_c_before_the_mount_is_up_leaves_nothing(tmp_path: Path, mode: str) -> None:
    """Ctrl-C while vcfs waits for a service that does not answer (a socket that accepts and
    never answers) was a KeyboardInterrupt traceback; with --daemon the detached child, which the
    terminal's Ctrl-C does not reach, went on and could mount after the user gave up."""
    ended = interrupt_while_it_waits(
        lambda url: vcfs_command("mount", url, str(tmp_path), "--timeout", "30", mode))
    assert (ended.returncode, ended.out, ended.err) == (
        130, "", "vcfs: interrupted, nothing mounted\n")
    pids = ended.children
    wait_until(lambda: not any(process_alive(pid) for pid in pids), timeout=20,
               what="the daemon gone")
    assert not os.path.ismount(tmp_path)


def test_a_web_server_that_is_not_vidcache_is_named_as_such(tmp_path: Path,
                                                           media_url: str) -> None:
    """The test's origin, a plain file server, answers /health 404 with an HTML page, which
    was the message, tags and all. A URL with `user:password@` (for a proxy's Basic auth) is
    named without them (was whole)."""
    for url in (media_url, media_url.replace("http://", "http://user:hunter2@")):
        result = run_vcfs("mount", url, str(tmp_path), "--timeout", "3")
        assert result.returncode == 1, result.stderr
        assert result.stderr == (
            f"vcfs: error: cannot reach the vidcache service at {media_url}: health check: "
            "HTTP 404: something answers there, but not a vidcache service (check the URL and "
            "port)\n"), result.stderr
        assert not os.path.ismount(tmp_path)


def test_a_url_with_a_path_the_service_has_no_api_at_is_refused(
    tmp_path: Path, vidcache_server: VidcacheServer
) -> None:
    """The service's own answer to `GET /wrong/health` (404, "no such endpoint") was taken for
    a vidcache 1.x without /health: a mistyped path mounted, silently with --daemon, an empty
    by-hash in which every video was "No such file" (its /meta a 404 too)."""
    url = f"{vidcache_server.url}/wrong"
    try:
        result = run_vcfs("mount", url, str(tmp_path), "--timeout", "3", "--daemon")
        assert (result.returncode, result.stderr) == (1, (
            f"vcfs: error: cannot reach the vidcache service at {url}: health check: HTTP 404 "
            "(no such endpoint: GET /wrong/health): a vidcache service answers there, but its "
            "API is not at this path (check the URL's path)\n")), result
        assert not os.path.ismount(tmp_path)
    finally:
        subprocess.run(["fusermount3", "-u", str(tmp_path)], capture_output=True, check=False)


_JSON_API = """
from fastapi import FastAPI

app = FastAPI()


@app.get("/items")
def items() -> list[str]:
    return ["a", "b"]
"""


def test_a_json_api_that_is_not_vidcache_is_refused(tmp_path: Path) -> None:
    """Another JSON API (FastAPI, under uvicorn) answers /health 404 `{"detail": "Not Found"}`,
    as a vidcache 1.x without /health does: it was mounted, "mounted" and exit status 0 with
    --daemon, an empty by-hash in which every name was "No such file", the one warning in a
    log there was none of. Its 404 for a video's bytes is that same answer, a vidcache 1.x's
    says there is no such video (test_vcfs_fault_matrix.py mounts one)."""
    (tmp_path / "json_api.py").write_text(_JSON_API)
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "json_api:app", "--app-dir",
                            str(tmp_path), "--host", "127.0.0.1", "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/items"), timeout=30, what="the JSON API")
        result = run_vcfs("mount", url, str(mountpoint), "--timeout", "3", "--daemon")
        assert (result.returncode, result.stdout, result.stderr) == (1, "", (
            f"vcfs: error: cannot reach the vidcache service at {url}: health check: HTTP 404 "
            "(Not Found): something answers there, but not a vidcache service (check the URL "
            "and port)\n")), result
        assert not os.path.ismount(mountpoint)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        api.terminate()
        api.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_startup_errors_are_one_clear_line(
    tmp_path: Path, vidcache_server: VidcacheServer
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "file").write_text("x")
    url = vidcache_server.url
    cases = {
        # what to do too (was the connection error alone)
        "Connection refused): nothing listens there (start the service, vidcache serve, or "
        "check the URL and port)": ("mount", f"http://127.0.0.1:{free_port()}", str(empty)),
        "does not exist": ("mount", url, str(tmp_path / "missing")),
        "is not empty": ("mount", url, str(full)),
        "is not a directory": ("mount", url, str(full / "file")),
        "must be at most half of --cache-size": ("mount", url, str(empty), "--cache-size",
                                                 "8M", "--readahead-max", "16M"),
        # sizes that parse, but out of their bounds (docs/vcfs.md: exit 1, not usage's 2)
        "--block-size must be a multiple of 4K between 4K and 64M, not 3072": (
            "mount", url, str(empty), "--block-size", "3K"),
        "--cache-size (1048576) must hold at least two blocks (2097152)": (
            "mount", url, str(empty), "--cache-size", "1M"),
        "must be at most --cache-size": ("mount", url, str(empty), "--cache-size", "8M",
                                         "--readahead-max", "1M", "--keep-passed", "9M"),
        f"{empty} is not mounted": ("unmount", str(empty)),
        # was "is not mounted" alone, as for an existing directory
        "is not mounted (it does not exist: a typo?)": ("unmount", str(tmp_path / "missing")),
        "-o subtype: a vcfs mount is of type fuse.vcfs": ("mount", url, str(empty),
                                                           "-o", "subtype=videos"),
        "vcfs is read-only: -o rw is not possible": ("mount", url, str(empty),
                                                      "-o", "allow_other,rw"),
        "cannot open the log file": ("mount", url, str(empty), "--daemon", "--log-file",
                                     str(tmp_path / "missing" / "vcfs.log")),
    }
    for message, args in cases.items():
        result = run_vcfs(*args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vcfs: error: "), result.stderr
        assert message in lines[0], result.stderr
        assert not os.path.ismount(empty)
    refused = run_vcfs("mount", url, str(empty), "-o", "no_such_option")
    assert refused.returncode == 1 and "mounting at" in refused.stderr, refused.stderr
    assert "unmounted" not in refused.stderr, refused.stderr  # it never was mounted
    daemon = run_vcfs("mount", f"http://127.0.0.1:{free_port()}", str(empty), "--daemon")
    assert daemon.returncode == 1
    assert "cannot reach the vidcache service" in daemon.stderr
    bad_size = run_vcfs("mount", url, str(empty), "--cache-size", "lots")
    assert bad_size.returncode == 2 and "invalid size" in bad_size.stderr
    for args in (("mount", url, "", "--daemon"), ("unmount", "")):  # not the current directory
        try:
            nameless = subprocess.run(vcfs_command(*args), capture_output=True, text=True,
                                      timeout=60, cwd=empty,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert nameless.returncode == 2, nameless.stderr
            assert "MOUNTPOINT: must name a directory, not ''" in nameless.stderr
            assert not os.path.ismount(empty)
        finally:
            subprocess.run(["fusermount3", "-u", str(empty)], capture_output=True, check=False)
    no_scheme = run_vcfs("mount", url.removeprefix("http://"), str(empty))
    assert no_scheme.returncode == 2 and "Traceback" not in no_scheme.stderr
    assert "must be an http:// or https:// URL" in no_scheme.stderr, no_scheme.stderr
    no_fusermount = subprocess.run(
        vcfs_command("mount", url, str(empty)), capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": ""},
    )
    assert no_fusermount.returncode == 1
    assert no_fusermount.stderr.startswith("vcfs: error: fusermount3 not found"), no_fusermount


@pytest.mark.parametrize(("options", "message"), [
    ("help", "-o help: not a mount option (vcfs mount --help lists the options)"),
    ("version", "-o version: not a mount option (vcfs --version shows the version)"),
    ("fsname=v,status_fd=3", "-o status_fd: not a mount option (internal to --daemon, which "
                             "sets it itself)"),
    # libfuse 3 mounts the pair as allow_root: other users got "Permission denied"
    ("allow_root,fsname=v,allow_other", "-o allow_other,allow_root: one or the other (with "
     "both, libfuse lets in only the owner and root, as allow_root): allow_other for every "
     "user, allow_root for the owner and root"),
    # Was: mounted with 4 threads, which 4 reads stalled on the service all took.
    ("max_threads=4", "-o max_threads=4: vcfs needs at least 64 FUSE threads (48 reads may "
     "wait on the service at once, and the rest answer lookups, listings and reads of cached "
     "bytes meanwhile); more are allowed"),
    ("max_idle_threads=-1", "-o max_idle_threads=-1: max_idle_threads takes a whole number of "
     "threads"),
])
@pytest.mark.parametrize("mode", [[], ["--daemon"]])
def test_o_words_libfuse_would_refuse_are_refused_before_the_service_is_asked(
    tmp_path: Path, options: str, message: str, mode: list[str]
) -> None:
    """Was: the health check, then libfuse's "unknown option" (or, for the allow pair, a mount
    only root and the owner could read). Nothing listens at the URL: asking the service first
    would be "cannot reach the vidcache service"."""
    empty = tmp_path / "empty"
    empty.mkdir()
    try:
        result = run_vcfs("mount", f"http://127.0.0.1:{free_port()}", str(empty), "-o",
                          options, *mode)
        assert (result.returncode, result.stderr) == (1, f"vcfs: error: {message}\n")
        assert not os.path.ismount(empty)
    finally:
        subprocess.run(["fusermount3", "-u", str(empty)], capture_output=True, check=False)


@pytest.mark.parametrize(("limit", "cache", "message"), [
    (["--data=536870912"], "1G", "--cache-size 1 GiB is more than its data limit (512 MiB, "
     "ulimit -d) can hold besides the ~116 MiB vcfs needs otherwise: give a --cache-size of at "
     "most 396 MiB, or raise the limit (systemd: LimitDATA=)"),
    (["--as=805306368"], "1G", "--cache-size 1 GiB is more than its address-space limit (768 "
     "MiB, ulimit -v) can hold besides the ~196 MiB vcfs needs otherwise: give a --cache-size "
     "of at most 572 MiB, or raise the limit (systemd: LimitAS=)"),
    # the machine's memory, or a cgroup's limit where the tests run in a smaller one
    ([], "100T", "--cache-size 102400 GiB is more than "),
])
@pytest.mark.parametrize("mode", [[], ["--daemon"]])
def test_a_cache_that_cannot_fit_is_refused_before_the_service_is_asked(
    tmp_path: Path, limit: list[str], cache: str, message: str, mode: list[str]
) -> None:
    """Was: mounted, and the cache grew with what was read until the OOM killer ended the
    daemon (a 1 GiB cache in a 200 MiB cgroup: killed 164 MiB into a read, the mount dead),
    or, under ulimit -d, every read needing a new block failed with EIO. The URL is a socket
    that never answers: a connection waiting on it is a service asked."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as service:
        url = f"http://127.0.0.1:{service.getsockname()[1]}"
        try:
            result = subprocess.run(
                ["prlimit", *limit, "--", *vcfs_command("mount", url, str(empty), "--cache-size",
                                                        cache, "--timeout", "1", *mode)],
                capture_output=True, text=True, timeout=60)
            assert result.returncode == 1, result.stderr
            assert result.stderr.startswith(f"vcfs: error: {message}"), result.stderr
            assert result.stderr.count("\n") == 1, result.stderr
            assert not select.select([service], [], [], 0)[0], "the service was asked"
            assert not os.path.ismount(empty)
        finally:
            subprocess.run(["fusermount3", "-u", str(empty)], capture_output=True, check=False)


def test_a_cache_that_cannot_fit_in_its_cgroup_is_refused(tmp_path: Path) -> None:
    """Was: mounted, then OOM-killed once 164 MiB had been read into the cache (measured with
    this cgroup's limit, 200 MiB, and a 1 GiB cache), the mount left dead."""
    empty = tmp_path / "empty"
    empty.mkdir()
    def limit_memory(directory: Path, v1: bool) -> None:
        (directory / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(
            str(200 * MIB))

    with new_cgroup("memory", limit_memory) as (directory, v1, in_cgroup), \
            socket.create_server(("127.0.0.1", 0)) as service:
        cgroup = f"/{directory.name}"
        limit_file = "memory.limit_in_bytes" if v1 else "memory.max"
        url = f"http://127.0.0.1:{service.getsockname()[1]}"
        try:
            result = subprocess.run(
                [*in_cgroup, *vcfs_command("mount", url, str(empty), "--cache-size", "1G",
                                           "--timeout", "1")],
                capture_output=True, text=True, timeout=60)
            assert (result.returncode, result.stderr) == (1, (
                f"vcfs: error: --cache-size 1 GiB is more than the memory limit of its cgroup "
                f"{cgroup} (200 MiB, {limit_file}) can hold besides the ~116 MiB vcfs needs "
                f"otherwise: give a --cache-size of at most 84 MiB, or raise its {limit_file}\n"))
            assert not select.select([service], [], [], 0)[0], "the service was asked"
            assert not os.path.ismount(empty)
        finally:
            subprocess.run(["fusermount3", "-u", str(empty)], capture_output=True, check=False)


def test_a_cache_that_fits_a_limit_but_not_the_thread_stacks_under_load_is_warned_of(
    tmp_path: Path, vidcache_server: VidcacheServer
) -> None:
    """A 256 MiB cache fits in a 600 MiB data limit, but not with what vcfs uses when busy, the
    stacks of its 200 threads (2 MiB each) above all: mounted, with a warning a --daemon
    without a log file says on its terminal."""
    empty = tmp_path / "empty"
    empty.mkdir()
    try:
        result = subprocess.run(
            ["prlimit", f"--data={600 * MIB}", f"--stack={8 * MIB}", "--",
             *vcfs_command("mount", vidcache_server.url, str(empty), "--cache-size", "256M",
                           "--daemon")],
            capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(empty)
        assert re.fullmatch(
            r"\S+ \S+ WARNING vcfs: its data limit \(600 MiB, ulimit -d\) holds --cache-size "
            r"256 MiB, but not also up to ~512 MiB more that vcfs uses when busy, 400 MiB of it "
            r"the stacks of its up to 200 threads: under such load reads may fail \(EIO, "
            r"ENOMEM\), and the mount stop; give a smaller --cache-size, or raise the limit "
            r"\(systemd: LimitDATA=\)\n",
            result.stderr), result.stderr
    finally:
        subprocess.run(["fusermount3", "-u", str(empty)], capture_output=True, check=False)


# `vcfs mount` whose reads of the memory limits (vcfs.memory.current_limits) are counted.
_COUNTING_LIMIT_READS = """
import sys
from vcfs import cli
reads = []
read = cli.current_limits


def counted():
    reads.append(1)
    return read()


cli.current_limits = counted
try:
    sys.exit(cli.main(sys.argv[1:]))
finally:
    print(f"memory limits read {len(reads)} time(s)", file=sys.stderr)
"""


def test_a_mount_reads_the_memory_limits_once_for_its_refusal_and_its_warnings(
    tmp_path: Path
) -> None:
    """The cache fits (no refusal) but not with a busy vcfs (the warning, in the log once it is
    set up); the service does not answer. Was: read again for the warnings, which could then
    be of other figures than the check that let the cache through."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as service:  # never answers
        url = f"http://127.0.0.1:{service.getsockname()[1]}"
        result = subprocess.run(
            ["prlimit", f"--data={600 * MIB}", "--", sys.executable, "-c",
             _COUNTING_LIMIT_READS, "mount", url, str(empty), "--cache-size", "256M",
             "--timeout", "1"],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert "WARNING vcfs: its data limit (600 MiB, ulimit -d) holds --cache-size 256 MiB" in (
        lines[0]), result.stderr
    assert lines[-2].startswith(f"vcfs: error: cannot reach the vidcache service at {url}")
    assert lines[-1] == "memory limits read 1 time(s)", result.stderr
    assert not os.path.ismount(empty)


@pytest.mark.parametrize(("fuse_stack", "data_limit"), [
    # The smallest data limits vcfs mounts a 16 MiB cache under without a warning: ~116 MiB
    # besides the cache, ~512 MiB more when busy, 400 MiB of it 200 threads' stacks of 2 MiB
    # (vcfs.memory), 128 MiB more with FUSE threads' of 4 MiB.
    (None, 644 * MIB),
    (4 * MIB, 772 * MIB),
])
def test_a_busy_mount_under_a_data_limit_reads_every_byte(
    tmp_path: Path, vidcache_server: VidcacheServer, corpus: dict[str, Video],
    fuse_stack: int | None, data_limit: int,
) -> None:
    """60 readers of 1 MiB at random offsets (48 reads waiting on vcfs, its most) under
    `ulimit -d` and a `ulimit -s` of 8 MiB, mounted with --daemon: every byte is right, and
    every thread has a stack of 2 MiB, libfuse's threads that of FUSE_THREAD_STACK if it asks
    for more. Was: each thread's stack was ulimit -s, 1.6 GiB for 200, and reads failed with
    EIO once threads could no longer start (vcfs warned of it, ~1.7 GiB more when busy)."""
    mountpoint, log_file = tmp_path / "mnt", tmp_path / "vcfs.log"
    mountpoint.mkdir()
    environment = dict(os.environ)
    if fuse_stack is not None:
        environment["FUSE_THREAD_STACK"] = str(fuse_stack)
    videos = [corpus["big.mp4"], corpus["big_moov_end.mp4"]]
    sources = [video.data() for video in videos]
    pid = None
    try:
        started = subprocess.run(
            ["prlimit", f"--data={data_limit}", f"--stack={8 * MIB}", "--",
             *vcfs_command("mount", vidcache_server.url, str(mountpoint), "--cache-size", "16M",
                           "--daemon", "--log-file", str(log_file))],
            capture_output=True, text=True, timeout=90, env=environment)
        assert started.returncode == 0, started.stderr
        pid = daemon_pid(started)

        def read(reader: int) -> None:
            rng = random.Random(reader)
            which = reader % len(videos)
            source = sources[which]
            fd = os.open(mountpoint / "by-hash" / videos[which].file_name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                for _ in range(16):
                    offset = rng.randrange(0, len(source) - MIB)
                    assert pread_uncached(fd, MIB, offset) == source[offset : offset + MIB]
            finally:
                os.close(fd)

        with concurrent.futures.ThreadPoolExecutor(max_workers=60) as pool:
            list(pool.map(read, range(60)))
        stats = json.loads((mountpoint / ".vcfs" / "stats").read_text())
        assert stats["fuse"]["errors"] == 0
        stacks = thread_stacks(pid)
        assert len(stacks) > 60  # FUSE threads, fetch threads, HTTP workers (~140 were seen)
        if fuse_stack is None:
            assert set(stacks) == {vcfs.limits.THREAD_STACK} == {2 * MIB}
        else:
            assert set(stacks) == {2 * MIB, fuse_stack}
            assert 0 < stacks.count(fuse_stack) <= vcfs.limits.FUSE_THREADS
        assert " WARNING " not in log_file.read_text()
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        if pid is not None:
            wait_until(lambda: not process_alive(pid), timeout=20, what="the daemon exited")


@pytest.mark.parametrize("given", ["1048576", "64K", "2147483648", " 4194304", ""])
@pytest.mark.parametrize("mode", [[], ["--daemon"]])
def test_a_fuse_thread_stack_libfuse_would_not_take_or_too_small_is_refused(
    tmp_path: Path, given: str, mode: list[str]
) -> None:
    """libfuse gives its threads the stack of FUSE_THREAD_STACK (atoi) if set, vcfs sets it to
    its own 2 MiB otherwise: less could overflow (a dead mount), and what libfuse cannot read
    it would replace with ulimit -s. Nothing listens at the URL: refused before it is asked."""
    empty = tmp_path / "empty"
    empty.mkdir()
    try:
        result = subprocess.run(
            vcfs_command("mount", f"http://127.0.0.1:{free_port()}", str(empty), *mode),
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "FUSE_THREAD_STACK": given})
        assert (result.returncode, result.stderr) == (1, (
            f"vcfs: error: FUSE_THREAD_STACK={given!r} in the environment: libfuse's thread "
            "stack must be a number of bytes from 2097152 (2 MiB, what vcfs sets when the "
            "variable is unset) to 2147483647; unset it, or give more\n"))
        assert not os.path.ismount(empty)
    finally:
        subprocess.run(["fusermount3", "-u", str(empty)], capture_output=True, check=False)


@pytest.mark.parametrize("fd", [0, 1000])
@pytest.mark.parametrize("mode", [[], ["--daemon"]])
def test_a_dev_fd_mount_point_must_be_an_open_dev_fuse(
    vidcache_server: VidcacheServer, fd: int, mode: list[str]
) -> None:
    """/dev/fd/N is the form of mount.fuse3 -o drop_privileges: the /dev/fuse descriptor of
    a mount made already. Was: the link resolved, '/dev/null is not a directory' (or 'does not
    exist'); with --daemon (as mount(8)'s helper runs), an unopened one was 'cannot start the
    daemon (python): [Errno 9] Bad file descriptor: '/''."""
    result = subprocess.run(vcfs_command("mount", vidcache_server.url, f"/dev/fd/{fd}", *mode),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (
        1, f"vcfs: error: mount point /dev/fd/{fd}: descriptor {fd} is not an open /dev/fuse: "
           "/dev/fd/N is for the /dev/fuse descriptor of a mount made for vcfs, as mount.fuse3 "
           "-o drop_privileges passes\n")


def test_a_missing_dev_fuse_is_named_with_the_fix(
    tmp_path: Path, vidcache_server: VidcacheServer
) -> None:
    """As in a container started without --device /dev/fuse: a private mount namespace with
    an empty /dev."""
    empty = tmp_path / "empty"
    empty.mkdir()
    hide_dev = in_private_mount_namespace('mount -t tmpfs none /dev && exec "$@"')
    if shutil.which("unshare") is None or subprocess.run(
            [*hide_dev, "true"], capture_output=True, timeout=60, check=False).returncode:
        pytest.skip("needs unshare and the right to mount in a new mount namespace (root)")
    result = subprocess.run([*hide_dev, *vcfs_command("mount", vidcache_server.url, str(empty))],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("vcfs: error: /dev/fuse is not available"), result.stderr
    assert "--device /dev/fuse" in result.stderr
    assert not os.path.ismount(empty)


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def as_nobody() -> Iterator[tuple[Callable[[str, str], list[str]], Path]]:
    """(wrap, home): `wrap(mode, script)` runs the shell `script` as uid/gid 65534 without
    capabilities, in a private mount namespace whose /dev/fuse is the real device with
    permissions `mode`; `$VCFS` runs this checkout's vcfs there, and `home` is an empty
    directory that user owns. Skipped where that cannot be set up (it needs root, unshare
    and setpriv)."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs root, unshare and setpriv")
    python = python_for_nobody()
    if python is None:
        pytest.skip(f"uid {NOBODY} can run neither this Python nor a system one on the checkout")
    interpreter, env = python
    work = Path(tempfile.mkdtemp(prefix="vcfs-nobody-", dir="/tmp"))
    work.chmod(0o755)
    home = work / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)

    def wrap(mode: str, script: str) -> list[str]:
        # A tmpfs of our own for the node (/tmp may be nodev), bound over /dev/fuse.
        setup = ('mkdir "$1/dev" && mount -t tmpfs -o mode=0755 none "$1/dev" && '
                 'mknod -m "$2" "$1/dev/fuse" c 10 229 && mount --bind "$1/dev/fuse" /dev/fuse '
                 '&& shift 2 && exec "$@"')
        return in_private_mount_namespace(
            setup, str(work), mode, *AS_NOBODY, "env", *(f"{k}={v}" for k, v in env.items()),
            f"VCFS={interpreter} -m vcfs", "sh", "-c", script)

    try:
        yield wrap, home
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_unmount_by_another_user_says_whose_mount_it_is(mount: VcfsMount) -> None:
    """Root's mount (without allow_other) refuses other users even a stat of its root: vcfs
    unmount said "... is not mounted" there, fusermount3 "entry ... not found in /etc/mtab"."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    python = python_for_nobody()
    if python is None:
        pytest.skip(f"uid {NOBODY} can run neither this Python nor a system one on the checkout")
    interpreter, env = python
    result = subprocess.run(
        [*AS_NOBODY, "env", *(f"{k}={v}" for k, v in env.items()), interpreter, "-m", "vcfs",
         "unmount", str(mount.mountpoint)],
        capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"vcfs: error: {mount.mountpoint} was mounted by uid 0: only that "
                             "user or root can unmount it\n"), result.stderr
    assert os.path.ismount(mount.mountpoint)


def test_a_user_without_access_to_dev_fuse_is_told_the_fix(
    as_nobody: tuple[Callable[[str, str], list[str]], Path], vidcache_server: VidcacheServer,
) -> None:
    """/dev/fuse as root's alone (0600, as where no udev runs): libfuse would only say
    "Permission denied"."""
    wrap, home = as_nobody
    (home / "mnt").mkdir()
    result = subprocess.run(wrap("0600", f"$VCFS mount {vidcache_server.url} {home}/mnt"),
                            capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        f"vcfs: error: /dev/fuse is not readable and writable by this user (uid {NOBODY}; "
        "mode 0600)"), result.stderr
    assert "chmod 0666 /dev/fuse" in result.stderr


def test_a_user_without_write_access_to_the_mount_point_is_told_so(
    as_nobody: tuple[Callable[[str, str], list[str]], Path], vidcache_server: VidcacheServer,
) -> None:
    """fusermount3 refuses it after libfuse started: its own line, then vcfs's 'mounting ...
    failed (libfuse code 4; see above)'."""
    wrap, home = as_nobody
    roots = home.parent / "root's"
    roots.mkdir(mode=0o755)
    result = subprocess.run(wrap("0666", f"$VCFS mount {vidcache_server.url} \"{roots}\""),
                            capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert (result.returncode, result.stderr) == (
        1, f"vcfs: error: mount point {roots} is not writable by this user (uid {NOBODY}), "
           "which fusermount3 requires: use a directory of your own\n")


def test_a_user_other_than_root_mounts_reads_and_unmounts(
    as_nobody: tuple[Callable[[str, str], list[str]], Path],
    vidcache_server: VidcacheServer, corpus: dict[str, Video],
) -> None:
    """With /dev/fuse 0666 (a standard system), uid 65534 mounts through fusermount3, reads a
    video whole and unmounts, all in the namespace, where the mount lives. The kernel's
    readahead stays at its default: only root may raise it. What it mounted is its own, as
    `ls -l` shows it (every file and directory was root's)."""
    wrap, home = as_nobody
    video = corpus["a.mp4"]
    mnt = home / "mnt"
    owned = [mnt, mnt / "by-hash", mnt / ".vcfs", mnt / ".vcfs" / "stats",
             mnt / "by-hash" / video.file_name]
    script = (f"mkdir {mnt} && $VCFS mount {vidcache_server.url} {mnt} --daemon "
              f"--log-file {home}/vcfs.log && sha256sum {mnt}/by-hash/{video.file_name} && "
              f"stat -c 'owner %u:%g' {' '.join(map(str, owned))}; "
              f"read=$?; $VCFS unmount {mnt} && exit $read")
    result = subprocess.run(wrap("0666", script), capture_output=True, text=True, timeout=120,
                            check=False, cwd="/")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(video.data()).hexdigest() in result.stdout.split(), result.stdout
    owners = [line for line in result.stdout.splitlines() if line.startswith("owner ")]
    assert owners == [f"owner {NOBODY}:{NOBODY}"] * len(owned), result.stdout
    log = (home / "vcfs.log").read_text()
    assert "stays at its default" in log and "unmounted" in log, log


def test_uid_gid_and_umask_options_apply_to_every_file_and_directory(
    vidcache_server: VidcacheServer, corpus: dict[str, Video],
) -> None:
    """docs/vcfs.md, Non-root use: libfuse's -o gid=G,umask=M make every file and directory
    `0777 & ~M` (not `0444 & ~M`) and group G's, so a group is let in and others kept out; a
    umask below 0222 shows write bits, and writes still fail (EROFS)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    video = corpus["a.mp4"]
    place = Path(tempfile.mkdtemp(prefix="vcfs-umask-", dir="/tmp"))
    try:
        place.chmod(0o755)  # pytest's own temporary directories are root's alone
        with VcfsMount(vidcache_server.url, place / "mnt", "-o",
                       f"allow_other,gid={NOBODY},umask=0227") as mounted:
            everything = [mounted.mountpoint, mounted.mountpoint / "by-hash",
                          mounted.mountpoint / ".vcfs", mounted.mountpoint / ".vcfs" / "stats",
                          mounted.video(video.file_name)]
            assert [(stat.S_IMODE(info.st_mode), info.st_gid)
                    for info in map(os.stat, everything)] == [(0o550, NOBODY)] * len(everything)
            for uid, allowed in ((NOBODY, True), (NOBODY - 1, False)):
                read = subprocess.run(
                    ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat",
                     str(mounted.video(video.file_name))],
                    capture_output=True, timeout=60, check=False, cwd="/")
                if allowed:
                    assert read.returncode == 0 and read.stdout == video.data(), read.stderr
                else:
                    assert read.returncode != 0 and b"Permission denied" in read.stderr, read
        with VcfsMount(vidcache_server.url, place / "mnt", "-o", "umask=077") as mounted:
            path = mounted.video(video.file_name)
            assert stat.S_IMODE(path.stat().st_mode) == 0o700
            with pytest.raises(OSError) as caught:
                os.open(path, os.O_WRONLY)
            assert caught.value.errno == errno.EROFS
    finally:
        shutil.rmtree(place, ignore_errors=True)


def test_the_daemon_is_started_with_every_option_it_was_given(tmp_path: Path) -> None:
    """`--daemon` starts `vcfs mount ... --foreground` with arguments rebuilt from the parsed
    options; parsing those again gives the same options (every field set away from its
    default here, so an option the rebuild forgets fails this test)."""
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    given = cli.build_parser().parse_args([
        "mount", "http://cache:8020/", str(tmp_path), "--cache-size", "64M",
        "--block-size", "256K", "--readahead-max", "8M", "--keep-passed", "4M",
        "--timeout", "12.5", "--token-file", str(token), "--daemon", "-o", "allow_other,noatime",
        "--log-level", "debug", "--log-file", str(tmp_path / "log"), "--no-raise-readahead",
        "--no-first-block",
    ])
    options = cli.mount_options(given)
    for field in dataclasses.fields(cli.MountOptions):
        if field.default is not dataclasses.MISSING:
            assert getattr(options, field.name) != field.default, field.name
    again = cli.build_parser().parse_args(cli.foreground_arguments(options))
    assert again.daemon is False
    assert cli.mount_options(again) == options


def test_a_daemon_that_cannot_be_started_is_a_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a traceback: e.g. an interpreter this user may not run (a venv under /root)."""
    options = cli.mount_options(cli.build_parser().parse_args(
        ["mount", "http://cache:8020/", str(tmp_path), "--daemon"]))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(cli.StartupError, match="cannot start the daemon"):
        cli.run_daemon(options)


def test_a_daemon_that_never_reports_is_named_with_the_time_waited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command waits --timeout plus a margin for the daemon's mount; its message named
    --timeout alone (30 s after a wait of 60 s by default). The daemon here is a stand-in
    that hangs, as one under a mount point on a stalled file system would."""
    hung = tmp_path / "hung-python"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    options = cli.mount_options(cli.build_parser().parse_args(
        ["mount", "http://cache:8020/", str(tmp_path), "--daemon", "--timeout", "0.5"]))
    monkeypatch.setattr(sys, "executable", str(hung))
    monkeypatch.setattr(cli, "_DAEMON_START_MARGIN", 1.0)
    with pytest.raises(cli.StartupError, match=r"did not come up within 1\.5 s"):
        cli.run_daemon(options)


_SECONDS = "must be a number of seconds above 0, at most 31536000 (a year)"


@pytest.mark.parametrize(("args", "message"), [
    (["127.0.0.1:8020"], "must be an http:// or https:// URL with a host"),
    (["ftp://cache:8020"], "must be an http:// or https:// URL with a host"),
    (["http://"], "must be an http:// or https:// URL with a host"),
    (["http://cache:port"], "Invalid port: 'port'"),
    # "a positive number" was wrong for inf
    (["http://cache:8020", "--timeout", "inf"], f"--timeout: {_SECONDS}, not 'inf'"),
    (["http://cache:8020", "--timeout", "nan"], f"--timeout: {_SECONDS}, not 'nan'"),
    (["http://cache:8020", "--timeout", "0"], f"--timeout: {_SECONDS}, not '0'"),
    # too long for the waits it bounds
    (["http://cache:8020", "--timeout", "1e12"], f"--timeout: {_SECONDS}, not '1e12'"),
    (["http://cache:8020", "--cache-size", "9" * 400], "too large"),  # was an OverflowError
])
def test_bad_arguments_are_usage_errors(args: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["mount", *args[:1], "/mnt", *args[1:]])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def _options(*args: str) -> cli.MountOptions:
    return cli.mount_options(cli.build_parser().parse_args(["mount", "http://c:1", "/m", *args]))


def test_options_that_depend_on_others() -> None:
    # The default readahead window fits a small cache instead of refusing it.
    assert _options().readahead_max == 16 * MIB
    assert _options("--cache-size", "8M").readahead_max == 4 * MIB
    assert _options("--cache-size", "8M", "--readahead-max", "0").readahead_max == 0
    # A first block fetched with a lookup is verified alone: only blocks of whole chunks; and
    # a stat-only lookup costs it: none above 1M.
    assert _options().first_block_with_meta
    assert _options("--block-size", "512K").first_block_with_meta
    assert not _options("--block-size", "64K").first_block_with_meta
    assert not _options("--block-size", "1028K").first_block_with_meta
    assert not _options("--block-size", "4M").first_block_with_meta
    assert not _options("--block-size", "64M").first_block_with_meta
    # -o passes mount options on, fixed ones included; not the FUSE helper's own keywords.
    assert _options("-o", "ro,fsname=cache").fuse_options == ("ro", "fsname=cache")
    for keyword in ("debug", "foreground", "nothreads", "daemon"):
        with pytest.raises(cli.StartupError, match="not a mount option"):
            _options("-o", keyword)
    # libfuse's thread pool may grow, not shrink below vcfs's (vcfs/limits.py).
    assert _options("-o", "max_threads=80,max_idle_threads=0,clone_fd").fuse_options == (
        "max_threads=80", "max_idle_threads=0", "clone_fd")
    for size in ("64K", "0", "", "\N{SUPERSCRIPT TWO}"):  # the last: was int()'s ValueError
        with pytest.raises(cli.StartupError, match="-o max_read: a number of bytes above 0"):
            _options("-o", f"max_read={size}")


def test_libfuse_thread_options_by_version() -> None:
    # max_threads from 3.12 only: an older libfuse stops at an option it does not know.
    assert cli.libfuse_thread_options((3, 14)) == {"max_threads": "64", "max_idle_threads": "64"}
    assert cli.libfuse_thread_options((3, 12)) == {"max_threads": "64", "max_idle_threads": "64"}
    assert cli.libfuse_thread_options((3, 11)) == {"max_idle_threads": "64"}
    assert cli.libfuse_thread_options((3, 10)) == {"max_idle_threads": "64"}


def test_help_lists_every_option_with_defaults() -> None:
    result = run_vcfs("mount", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # as argparse wrapped it, but on one line
    for option in ("--cache-size", "--block-size", "--readahead-max", "--timeout",
                   "--foreground", "--daemon", "-o", "--log-level", "--log-file",
                   "--no-raise-readahead", "--no-first-block", "--keep-passed", "256M", "16M",
                   "default: 30", "default: a quarter of", "from 4K to 64M",
                   "at least two blocks", "at most --cache-size", "raw_fi", "fsname=NAME",
                   "exit status:"):
        assert option in text, option


def test_the_docs_name_every_option_of_the_help_with_its_default() -> None:
    """docs/vcfs.md's table of `vcfs mount`'s options and its list of the options an fstab
    line spells as -o ones name exactly the options the command has, with its defaults."""
    documented = documented_options(ROOT / "docs" / "vcfs.md", "## `vcfs mount`")
    parser = cli.build_parser()
    _, options = subcommand_options(parser, "mount")
    assert set(documented) == set(options)
    # What the options come to when none is given (--readahead-max's is worked out).
    defaults = cli.mount_options(parser.parse_args(["mount", "http://127.0.0.1:1", "/mnt"]))
    stated = {name: re.match(r"`([^`]+)`", default) for name, default in documented.items()}
    assert {name for name, value in stated.items() if value} == {
        "--cache-size", "--block-size", "--readahead-max", "--timeout", "--log-level"}
    for name, value in stated.items():
        if value is not None:
            action = options[name]
            given = action.type(value.group(1)) if callable(action.type) else value.group(1)
            assert given == getattr(defaults, action.dest), name
    doc = (ROOT / "docs" / "vcfs.md").read_text()
    spelled = doc.split("is that option (", 1)[1].split(")", 1)[0]
    fstab = {"--" + name.replace("_", "-") for name in re.findall(r"`([a-z_]+)=?[^`]*`", spelled)}
    assert fstab == cli._mount_long_options(parser)


def test_help_says_how_mount_8_runs_vcfs() -> None:
    """The mount helper's form (an /etc/fstab line of type fuse.vcfs) has no command of its
    own: `vcfs --help` says it is there and how its options are spelled."""
    result = run_vcfs("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for part in ("fuse.vcfs", "vcfs URL MOUNTPOINT -o OPTION", "--daemon", "cache_size=1G",
                 "token_file=", "nofail", "allow_other"):
        assert part in text, part


def test_version_names_the_command_and_its_version() -> None:
    result = run_vcfs("--version")
    assert result.returncode == 0
    assert result.stdout == f"vcfs {vcfs.__version__}\n"
    assert importlib.metadata.version("vcfs") == vcfs.__version__  # the distribution's


def test_every_argument_of_every_command_says_what_it_is() -> None:
    commands = next(action for action in cli.build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        for action in parser._actions:
            assert action.help, f"vcfs {name} --help: {action.metavar or action.dest} unexplained"


# ---------------------------------------------------------------------------------------------
# A service of our own that we can stop and corrupt


def test_service_outage_and_corrupt_bytes_give_eio_then_recover(
    tmp_path: Path, media_url: str, corpus: dict[str, Video]
) -> None:
    video = corpus["big.mp4"]
    data = video.data()
    with VidcacheServer(tmp_path / "own-data") as server:
        with VidCacheClient(server.url) as client:
            file_path = client.ingest(f"{media_url}/big.mp4", bucket="own")["file_path"]
        own = VcfsMount(server.url, tmp_path / "mnt", "--timeout", "2", "--readahead-max", "0")
        with own:
            fd = os.open(own.video(video.file_name), os.O_RDONLY)
            try:
                assert pread_uncached(fd, 4096, 0) == data[:4096]
                # Outage: an uncached block fails with EIO once the 2 s deadline has passed.
                server.stop()
                with pytest.raises(OSError) as caught:
                    pread_uncached(fd, 4096, 10 * MIB)
                assert caught.value.errno == errno.EIO
                failed = own.stats()["remote"]
                assert failed["retries"] > 0 and failed["errors"] > 0
                # The service comes back (same port): the same mount serves the same read.
                server.start()
                assert pread_uncached(fd, 4096, 10 * MIB) == data[10 * MIB : 10 * MIB + 4096]
                # Corrupt bytes on the service's disk fail their digest and never reach us.
                corrupt_at = 15 * MIB + 123
                with open(server.data_dir / file_path, "r+b") as blob:
                    blob.seek(corrupt_at)
                    blob.write(bytes([data[corrupt_at] ^ 0xFF]))
                with pytest.raises(OSError) as caught:
                    pread_uncached(fd, 4096, corrupt_at)
                assert caught.value.errno == errno.EIO
                assert own.stats()["remote"]["verify_failures"] > 0
                assert pread_uncached(fd, 4096, 5 * MIB) == data[5 * MIB : 5 * MIB + 4096]
            finally:
                os.close(fd)
            assert "failed (EIO)" in own.log()


@pytest.mark.parametrize(("conf", "allowed"), [
    ("user_allow_other\n", True),
    ("  user_allow_other   # for the players\n", True),
    ("#user_allow_other\n", False),
    ("mount_max = 1000\nuser_allow_other", False),  # fusermount3 skips a last line unended
])
def test_allow_other_by_a_user_is_checked_as_fusermount3_reads_fuse_conf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conf: str, allowed: bool,
) -> None:
    """A user other than root asking allow_other is refused before mounting unless
    fusermount3 would take it; fusermount3 parses only lines ended by a newline, so a last
    line without one was taken as allowing it, and fusermount3 then refused the mount on two
    lines after libfuse started."""
    conf_file = tmp_path / "fuse.conf"
    conf_file.write_text(conf)
    monkeypatch.setattr(cli, "_FUSE_CONF", str(conf_file))
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    if allowed:
        cli.check_allow_other(["allow_other"])
    else:
        with pytest.raises(cli.StartupError, match="needs user_allow_other in "):
            cli.check_allow_other(["allow_other"])
    cli.check_allow_other(["ro"])  # nothing to check


def test_allow_root_by_a_user_is_checked_as_allow_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """allow_root (root may read the user's mount too) is under fusermount3's same rule, and
    the refusal names the option asked."""
    conf_file = tmp_path / "fuse.conf"
    conf_file.write_text("#user_allow_other\n")
    monkeypatch.setattr(cli, "_FUSE_CONF", str(conf_file))
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    with pytest.raises(cli.StartupError, match=r"^-o allow_root: a user other than root \(uid "
                                               r"1000\) needs user_allow_other in "):
        cli.check_allow_other(["fsname=x", "allow_root"])
    conf_file.write_text("user_allow_other\n")
    cli.check_allow_other(["allow_root"])
