"""vidcache_client against the real vidcache service, comparing bytes with the source files.

Most tests share the session's service (`vidcache_server`), so they only rely on what no other
module can change for them: b.mp4, c.mkv and big.mp4 are perceptually distinct from every other
generated video, so whoever ingested them first, their hash is the BLAKE3 of their own bytes.
Tests that need a known state (ingest statuses, listing, delete) run against a service of
their own (`own_client`), so they neither see nor disturb other modules' videos.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from blake3 import blake3

import vidcache
from tests.support import (
    ESTABLISHED,
    VidcacheServer,
    preload_library,
    sockets_to_loopback,
    wait_until,
)
from tests.vcfs_fault_support import FaultyLink
from vidcache.chunks import DEFAULT_CHUNK_SIZE
from vidcache_client import (
    InvalidRequestError,
    NotFoundError,
    RangeNotSatisfiableError,
    RequestTimeout,
    VidCacheClient,
    VideoPage,
)

MiB = 1024 * 1024
SHARED_VIDEOS = ["b.mp4", "c.mkv", "big.mp4"]
UNKNOWN_HASH = "0" * 64
RangeMaker = Callable[[int], tuple[int, int]]


def unique_bucket(purpose: str) -> str:
    return f"client-{purpose}-{uuid.uuid4().hex[:8]}"


def digest(data: bytes) -> str:
    return str(blake3(data).hexdigest())


@dataclass(frozen=True)
class Stored:
    """A video ingested for these tests: its hash, source URL and source bytes."""

    hash: str
    url: str
    data: bytes
    result: dict[str, object]


@pytest.fixture(scope="module")
def client(vidcache_server: VidcacheServer) -> Iterator[VidCacheClient]:
    with VidCacheClient(vidcache_server.url, timeout=120) as shared_client:
        yield shared_client


@pytest.fixture(scope="module")
def stored(client: VidCacheClient, videos: dict[str, Path], media_url: str) -> dict[str, Stored]:
    bucket = unique_bucket("shared")
    ingested = {}
    for name in SHARED_VIDEOS:
        url = f"{media_url}/{name}"
        result = client.ingest(url, bucket)
        ingested[name] = Stored(result["hash"], url, videos[name].read_bytes(), result)
    return ingested


@pytest.fixture(scope="module")
def own_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidCacheClient]:
    """A client of a service of this module's own, empty at the start."""
    with VidcacheServer(tmp_path_factory.mktemp("client-own") / "data") as server, \
            VidCacheClient(server.url, timeout=120) as private_client:
        yield private_client


# --- ingest, resolve, metadata -------------------------------------------------------------------

@pytest.mark.parametrize("name", SHARED_VIDEOS)
def test_ingest_returns_the_blake3_of_the_source(stored: dict[str, Stored], name: str) -> None:
    video = stored[name]
    assert video.hash == digest(video.data)
    assert video.result["status"] in {"new", "duplicate", "url_alias"}
    file_path = video.result["file_path"]
    assert isinstance(file_path, str)
    assert file_path.endswith(f"{video.hash}{Path(name).suffix}")


def test_ingesting_a_known_url_again_is_an_alias(client: VidCacheClient,
                                                 stored: dict[str, Stored]) -> None:
    video = stored["b.mp4"]
    result = client.ingest(video.url, unique_bucket("again"))
    assert result["status"] == "url_alias"
    assert result["hash"] == video.hash


def test_resolve(client: VidCacheClient, stored: dict[str, Stored], media_url: str) -> None:
    video = stored["c.mkv"]
    assert client.resolve(video.url) == {"hash": video.hash, "url": video.url}
    assert client.resolve(f"{media_url}/never-ingested.mp4") is None


@pytest.mark.parametrize("name", SHARED_VIDEOS)
def test_get_meta(client: VidCacheClient, stored: dict[str, Stored], name: str) -> None:
    video = stored[name]
    meta = client.get_meta(video.hash)
    assert meta is not None
    assert meta["hash"] == video.hash
    assert meta["size_bytes"] == len(video.data)
    assert meta["duration_s"] == pytest.approx(6 if name != "big.mp4" else 8, abs=0.5)
    assert video.url in meta["aliases"]
    assert meta["mime_type"].startswith("video/")
    assert isinstance(meta["first_seen"], str)


def test_get_meta_of_unknown_hash_is_none(client: VidCacheClient) -> None:
    assert client.get_meta(UNKNOWN_HASH) is None
    assert client.get_chunk_digests(UNKNOWN_HASH) is None


def test_health(client: VidCacheClient) -> None:
    health = client.health()
    assert health["status"] == "ok"
    assert health["version"] == vidcache.__version__  # what `vidcache --version` prints
    assert isinstance(health["videos"], int)


def test_ingest_of_a_non_video_is_refused(client: VidCacheClient, media_url: str) -> None:
    url = f"{media_url}/notvideo.bin"
    with pytest.raises(InvalidRequestError, match="not a video") as caught:
        client.ingest(url, unique_bucket("junk"))
    assert caught.value.status_code == 422
    assert url in str(caught.value)
    assert client.resolve(url) is None


@pytest.mark.parametrize("bucket", ["", "..", "a/b", "/abs"])
def test_ingest_into_a_bad_bucket_is_refused(client: VidCacheClient, media_url: str,
                                             bucket: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        client.ingest(f"{media_url}/b.mp4?bucket-test={uuid.uuid4().hex}", bucket)
    assert caught.value.status_code is not None and 400 <= caught.value.status_code < 500


# --- reading bytes --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHARED_VIDEOS)
def test_get_bytes_whole(client: VidCacheClient, stored: dict[str, Stored], name: str) -> None:
    video = stored[name]
    assert client.get_bytes(video.hash) == video.data


# (start, end) as functions of the size: first byte, a header, across a MiB boundary, the last
# byte, the whole file, and an end past EOF that the server clamps to the last byte.
RANGES: dict[str, RangeMaker] = {
    "first-byte": lambda size: (0, 0),
    "header": lambda size: (0, 65_535),
    "middle": lambda size: (size // 3, size // 3 + 100_000),
    "last-byte": lambda size: (size - 1, size - 1),
    "whole": lambda size: (0, size - 1),
    "clamped-at-eof": lambda size: (size - 10, size + 1_000_000),
}


@pytest.mark.parametrize("name", ["b.mp4", "big.mp4"])
@pytest.mark.parametrize("make_range", RANGES.values(), ids=RANGES.keys())
def test_get_bytes_ranges(client: VidCacheClient, stored: dict[str, Stored], name: str,
                          make_range: RangeMaker) -> None:
    video = stored[name]
    start, end = make_range(len(video.data))
    assert client.get_bytes(video.hash, byte_range=(start, end)) == video.data[start:end + 1]


def test_range_starting_at_eof_is_not_satisfiable(client: VidCacheClient,
                                                  stored: dict[str, Stored]) -> None:
    video = stored["b.mp4"]
    size = len(video.data)
    with pytest.raises(RangeNotSatisfiableError) as caught:
        client.get_bytes(video.hash, byte_range=(size, size + 10))
    assert caught.value.size == size
    assert video.hash in str(caught.value)


def test_get_bytes_of_unknown_hash(client: VidCacheClient) -> None:
    with pytest.raises(NotFoundError, match=UNKNOWN_HASH):
        client.get_bytes(UNKNOWN_HASH, byte_range=(0, 9))


def _read_in_a_worker(base_url: str, content_hash: str, byte_range: tuple[int, int]) -> bytes:
    with VidCacheClient(base_url) as client:
        return client.get_bytes(content_hash, byte_range=byte_range)


def test_errors_in_a_worker_process_reach_the_caller(vidcache_server: VidcacheServer,
                                                     stored: dict[str, Stored]) -> None:
    """Before, the worker's NotFoundError could not be unpickled: the pool broke instead."""
    video = stored["b.mp4"]
    size = len(video.data)
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        assert pool.submit(_read_in_a_worker, vidcache_server.url, video.hash,
                           (0, 99)).result(timeout=120) == video.data[:100]
        with pytest.raises(NotFoundError, match=UNKNOWN_HASH) as missing:
            pool.submit(_read_in_a_worker, vidcache_server.url, UNKNOWN_HASH,
                        (0, 9)).result(timeout=120)
        assert missing.value.status_code == 404 and missing.value.json_detail
        with pytest.raises(RangeNotSatisfiableError) as past_the_end:
            pool.submit(_read_in_a_worker, vidcache_server.url, video.hash,
                        (size, size + 10)).result(timeout=120)
        assert past_the_end.value.size == size


def test_stream_video(vidcache_server: VidcacheServer, stored: dict[str, Stored]) -> None:
    video = stored["big.mp4"]
    chunk_size = 256 * 1024
    with VidCacheClient(vidcache_server.url, chunk_size=chunk_size) as streaming:
        with streaming.stream_video(video.hash) as chunks:
            pieces = list(chunks)
        assert b"".join(pieces) == video.data
        assert all(len(piece) == chunk_size for piece in pieces[:-1])
        assert 0 < len(pieces[-1]) <= chunk_size
        start, end = MiB - 5, 3 * MiB + 7
        with streaming.stream_video(video.hash, byte_range=(start, end)) as chunks:
            assert b"".join(chunks) == video.data[start:end + 1]


def test_download_to_file(client: VidCacheClient, stored: dict[str, Stored],
                          tmp_path: Path) -> None:
    video = stored["big.mp4"]
    dest = tmp_path / "copy.mp4"
    assert client.download_to_file(video.hash, dest) == len(video.data)
    assert dest.read_bytes() == video.data
    # over an existing file, and a range
    assert client.download_to_file(video.hash, dest, byte_range=(100, 1099)) == 1000
    assert dest.read_bytes() == video.data[100:1100]
    assert list(tmp_path.iterdir()) == [dest]


def test_failed_download_keeps_the_existing_file(client: VidCacheClient,
                                                 tmp_path: Path) -> None:
    dest = tmp_path / "copy.mp4"
    dest.write_bytes(b"keep me")
    with pytest.raises(NotFoundError):
        client.download_to_file(UNKNOWN_HASH, dest)
    assert dest.read_bytes() == b"keep me"
    assert list(tmp_path.iterdir()) == [dest]


def test_ctrl_c_as_the_temporary_file_is_made_leaves_nothing(client: VidCacheClient,
                                                             stored: dict[str, Stored],
                                                             tmp_path: Path) -> None:
    """A real SIGINT at the earliest moment: raised by open() itself once it has made the
    `.part` file (an LD_PRELOAD library), so that KeyboardInterrupt comes as the call returns.
    It came before the `try` that removes the file, which stayed; now it propagates with
    nothing left and `dest` as it was."""
    library = preload_library("sigint_after_open", tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "kept.mp4").write_bytes(b"keep me")
    download = ("import sys\nfrom vidcache_client import VidCacheClient\n"
                "with VidCacheClient(sys.argv[1]) as client:\n"
                "    try:\n"
                "        client.download_to_file(sys.argv[2], sys.argv[3])\n"
                "    except KeyboardInterrupt:\n"
                "        sys.exit(130)\n")
    for name in ("new.mp4", "kept.mp4"):
        run = subprocess.run([sys.executable, "-c", download, client.base_url,
                              stored["b.mp4"].hash, str(folder / name)], capture_output=True,
                             timeout=60, env={**os.environ, "LD_PRELOAD": str(library)})
        assert (run.returncode, run.stderr) == (130, b"")
    assert sorted(os.listdir(folder)) == ["kept.mp4"]
    assert (folder / "kept.mp4").read_bytes() == b"keep me"


def test_download_through_a_symlink_writes_its_target(client: VidCacheClient,
                                                     stored: dict[str, Stored],
                                                     tmp_path: Path) -> None:
    """As the seed's "directly to a local file" (open(dest, "wb")) does: the link stays."""
    video = stored["b.mp4"]
    target = tmp_path / "library" / "b.mp4"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.mp4"
    link.symlink_to(target)
    assert client.download_to_file(video.hash, link) == len(video.data)
    assert link.is_symlink()
    assert target.read_bytes() == video.data
    assert sorted(tmp_path.rglob("*")) == [target.parent, target, link]


def test_download_keeps_the_mode_of_the_file_it_replaces(client: VidCacheClient,
                                                         stored: dict[str, Stored],
                                                         tmp_path: Path) -> None:
    video = stored["b.mp4"]
    dest = tmp_path / "private.mp4"
    dest.write_bytes(b"old")
    for mode in (0o600, 0o666):
        dest.chmod(mode)
        client.download_to_file(video.hash, dest)
        assert stat.S_IMODE(dest.stat().st_mode) == mode
    assert dest.read_bytes() == video.data


def test_download_into_a_fifo_writes_into_it(client: VidCacheClient, stored: dict[str, Stored],
                                             tmp_path: Path) -> None:
    """A FIFO or a device (/dev/null) is written into, not replaced by a regular file."""
    video = stored["b.mp4"]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    # Linux opens a FIFO O_RDWR at once: the reader's open returns, and it sees EOF once this
    # and the download's write end are closed, whatever the download did.
    holder = os.open(fifo, os.O_RDWR)
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        assert client.download_to_file(video.hash, fifo) == len(video.data)
    finally:
        os.close(holder)
        reader.join(timeout=60)
    assert received == [video.data]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert list(tmp_path.iterdir()) == [fifo]


def test_chunk_digests_match_the_source(client: VidCacheClient,
                                        stored: dict[str, Stored]) -> None:
    video = stored["big.mp4"]
    digests = client.get_chunk_digests(video.hash)
    assert digests is not None
    assert digests["hash"] == video.hash
    chunk_size = digests["chunk_size"]
    assert chunk_size == DEFAULT_CHUNK_SIZE  # the service's default for new ingests
    expected = [digest(video.data[offset:offset + chunk_size])
                for offset in range(0, len(video.data), chunk_size)]
    assert digests["digests"] == expected


def test_threads_share_one_client(vidcache_server: VidcacheServer,
                                  stored: dict[str, Stored]) -> None:
    """Many small ranged reads from 8 threads over a 4-connection pool, all exact.

    Before the client lent each thread its own connection (vidcache_client/_pool.py), this
    failed about one run in three with `ReadError: Bad file descriptor`.
    """
    video = stored["big.mp4"]
    size = len(video.data)
    rng = random.Random(1234)
    ranges = []
    for _ in range(1500):
        start = rng.randrange(size)
        ranges.append((start, min(size - 1, start + rng.randrange(1, 32 * 1024))))
    with VidCacheClient(vidcache_server.url, max_connections=4) as shared, \
            ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda r: shared.get_bytes(video.hash, byte_range=r), ranges))
    for (start, end), data in zip(ranges, results, strict=True):
        assert data == video.data[start:end + 1]


@pytest.mark.parametrize("timeout", [2.0**31, 1e10, math.inf])
def test_a_timeout_longer_than_a_socket_takes_waits_as_long_as_it_can(
        vidcache_server: VidcacheServer, stored: dict[str, Stored], timeout: float) -> None:
    """The seed's timeout is any float of seconds: one of 2**31 s or more timed out every
    call at once (RequestTimeout: CPython's socket timeouts stop there), one past ~9.2e9 s
    (inf too) raised OverflowError, outside the client's errors. Over the client's own
    sockets (lookups, read_range_into) and through httpx (get_bytes)."""
    video = stored["b.mp4"]
    with VidCacheClient(vidcache_server.url, timeout=timeout) as patient:
        assert patient.health()["status"] == "ok"
        assert patient.resolve(video.url) == {"hash": video.hash, "url": video.url}
        buffer = bytearray(10)
        assert patient.read_range_into(video.hash, 5, [buffer]) == 10
        assert buffer == video.data[5:15]
        assert patient.get_bytes(video.hash, byte_range=(0, 9)) == video.data[:10]


def test_max_connections_bounds_the_pool(vidcache_server: VidcacheServer,
                                        stored: dict[str, Stored]) -> None:
    """With both pooled connections held by open streams, a third request waits, then times
    out: the pool really is max_connections wide."""
    video = stored["big.mp4"]
    with VidCacheClient(vidcache_server.url, timeout=2, max_connections=2) as small_pool, \
            small_pool.stream_video(video.hash) as first, \
            small_pool.stream_video(video.hash) as second:
        with pytest.raises(RequestTimeout):
            small_pool.get_bytes(video.hash, byte_range=(0, 9))
        assert next(iter(first)) == next(iter(second)) == video.data[:MiB]


@pytest.mark.parametrize("kind", ["read_range_into", "stream_video"])
def test_close_lets_a_running_call_finish_then_closes_its_connection(
        vidcache_server: VidcacheServer, stored: dict[str, Stored], kind: str) -> None:
    """docs/client.md: close() while a call runs (here, from inside it) lets the call finish
    with its bytes, then closes its connection; later calls raise RuntimeError. Through a
    proxy of the test's own, whose port only this client's connections go to."""
    video = stored["big.mp4"]
    with FaultyLink(vidcache_server.port) as link:
        port = httpx.URL(link.url).port
        assert port is not None
        client = VidCacheClient(link.url, timeout=30)

        def close_while_running() -> None:
            assert sockets_to_loopback(port, ESTABLISHED) == 1  # the running call's
            client.close()

        if kind == "read_range_into":
            buffers = [bytearray(MiB) for _ in range(3)]
            received = client.read_range_into(
                video.hash, 0, buffers,
                on_filled=lambda index: close_while_running() if index == 0 else None)
            assert received == 3 * MiB and b"".join(buffers) == video.data[:3 * MiB]
        else:
            with client.stream_video(video.hash, byte_range=(0, 3 * MiB - 1)) as chunks:
                close_while_running()
                assert b"".join(chunks) == video.data[:3 * MiB]
        with pytest.raises(RuntimeError, match="closed"):
            client.get_meta(video.hash)
        wait_until(lambda: sockets_to_loopback(port, ESTABLISHED) == 0, timeout=10,
                   what="the closed client's connection to be closed")


# --- a service of our own: statuses, listing, delete ---------------------------------------------

def test_the_seed_readme_quick_start_runs_as_written(
        tmp_path: Path, media_url: str, videos: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed README's quick start, call for call: its base URL by host name (localhost),
    ingest by keywords, a download to a relative path, a stream, a range, delete, close; and
    its second example, the client as a context manager. Against a service of its own, so
    the statuses are known and the delete disturbs no other test."""
    if "127.0.0.1" not in {info[4][0] for info in socket.getaddrinfo("localhost", None)}:
        pytest.skip("localhost is not 127.0.0.1 on this machine")
    source = videos["big.mp4"].read_bytes()  # > 1 MB: the range is a part, the stream chunks
    url = f"{media_url}/big.mp4"
    with VidcacheServer(tmp_path / "data") as server:
        monkeypatch.chdir(tmp_path)  # after the server's start: it runs this tree's vidcache
        client = VidCacheClient(f"http://localhost:{server.port}")
        result = client.ingest(
            url=url,
            bucket="videos",
            prefix="archive",
            meta={"title": "Cool video"},
        )
        assert result["hash"] == digest(source)  # BLAKE3 hex digest
        assert result["status"] == "new"
        entry = client.resolve(url)
        assert entry == {"hash": result["hash"], "url": url}
        meta = client.get_meta(entry["hash"])
        assert meta is not None
        assert meta["duration_s"] == pytest.approx(8, abs=0.5)
        assert meta["aliases"] == [url]
        assert meta["meta"] == {"title": "Cool video"}
        assert client.get_bytes(entry["hash"]) == source
        assert client.download_to_file(entry["hash"], "video.mp4") == len(source)
        assert (tmp_path / "video.mp4").read_bytes() == source
        processed = []
        with client.stream_video(entry["hash"]) as chunks:
            for chunk in chunks:
                processed.append(chunk)
        assert b"".join(processed) == source
        assert {len(chunk) for chunk in processed[:-1]} == {1_048_576}
        assert client.get_bytes(entry["hash"], byte_range=(0, 1_000_000)) \
            == source[:1_000_001]
        client.delete(entry["hash"])
        assert client.get_meta(entry["hash"]) is None
        client.close()

        with VidCacheClient(f"http://localhost:{server.port}") as client:
            result = client.ingest(url=f"{media_url}/c.mkv", bucket="videos")
        assert result["status"] == "new"
        with pytest.raises(RuntimeError, match="closed"):
            client.get_meta(result["hash"])


def test_ingest_statuses(own_client: VidCacheClient, media_url: str,
                         videos: dict[str, Path]) -> None:
    bucket = unique_bucket("statuses")
    url = f"{media_url}/a.mp4"
    first = own_client.ingest(url, bucket, "2024", {"title": "A"})
    assert first["status"] == "new"
    assert first["hash"] == digest(videos["a.mp4"].read_bytes())
    alias = own_client.ingest(url, bucket)
    assert (alias["status"], alias["hash"]) == ("url_alias", first["hash"])
    same_bytes_url = f"{url}?mirror=1"
    exact = own_client.ingest(same_bytes_url, bucket)
    assert (exact["status"], exact["hash"]) == ("duplicate", first["hash"])
    reencoded_url = f"{media_url}/a_small.mp4"
    near = own_client.ingest(reencoded_url, bucket)
    assert (near["status"], near["hash"]) == ("duplicate", first["hash"])
    assert isinstance(near["phash_distance"], int)
    meta = own_client.get_meta(first["hash"])
    assert meta is not None
    assert {url, same_bytes_url, reencoded_url} <= set(meta["aliases"])
    assert (meta["bucket"], meta["prefix"], meta["meta"]) == (bucket, "2024", {"title": "A"})
    # the seed: every answer has `file_path` (the stored file's), only a perceptual match
    # `phash_distance`
    answers = [first, alias, exact, near]
    assert [answer["file_path"] for answer in answers] == [meta["file_path"]] * 4
    assert ["phash_distance" in answer for answer in answers] == [False, False, False, True]


def test_list_videos_pages_through_everything(own_client: VidCacheClient,
                                              media_url: str) -> None:
    bucket = unique_bucket("listing")
    first = own_client.ingest(f"{media_url}/b.mp4", bucket, "one")["hash"]
    second = own_client.ingest(f"{media_url}/c.mkv", bucket, "two")["hash"]
    listed = [item["hash"] for item in own_client.list_videos(bucket=bucket, page_size=1)]
    assert listed == sorted([first, second])
    assert [item["hash"] for item in own_client.list_videos(bucket=bucket, prefix="one")] \
        == [first]
    everything = [item["hash"] for item in own_client.list_videos(page_size=1)]
    assert everything == sorted(set(everything))
    assert {first, second} <= set(everything)
    assert list(own_client.list_videos(bucket=unique_bucket("empty"))) == []


def test_list_videos_page_is_one_page_after_its_cursor(own_client: VidCacheClient,
                                                       media_url: str) -> None:
    """The pages a caller asks for one by one, as vcfs does to retry a page alone, are the
    pages `list_videos` goes through; asking for one again gives it again."""
    bucket = unique_bucket("pages")
    for name in ("b.mp4", "c.mkv"):  # perhaps stored already, in another bucket
        own_client.ingest(f"{media_url}/{name}", bucket)
    everything = list(own_client.list_videos())
    hashes = [item["hash"] for item in everything]
    assert len(hashes) >= 2
    pages = [own_client.list_videos_page(page_size=1)]
    while pages[-1].next is not None:
        pages.append(own_client.list_videos_page(after=pages[-1].next, page_size=1))
    assert [page.items for page in pages] == [[item] for item in everything]
    assert [page.next for page in pages] == [*hashes[:-1], None]
    assert own_client.list_videos_page(after=hashes[0], page_size=1) == pages[1]
    assert own_client.list_videos_page(after=hashes[-1]) == VideoPage([], None)
    assert own_client.list_videos_page(after=hashes[0]).items == everything[1:]
    bucket_of_first = everything[0]["bucket"]
    assert own_client.list_videos_page(bucket=bucket_of_first).items \
        == list(own_client.list_videos(bucket=bucket_of_first))
    assert own_client.list_videos_page(bucket=unique_bucket("empty")) == VideoPage([], None)


def test_delete_removes_blob_record_and_aliases(own_client: VidCacheClient,
                                                media_url: str) -> None:
    bucket = unique_bucket("delete")
    # c.mkv may already be stored here by the listing test under another URL: the delete
    # must remove that alias too.
    token = uuid.uuid4().hex
    ours = [f"{media_url}/c.mkv?delete={token}", f"{media_url}/c.mkv?delete={token}&alias=1"]
    content_hash = own_client.ingest(ours[0], bucket)["hash"]
    assert own_client.ingest(ours[1], bucket)["status"] == "duplicate"
    meta = own_client.get_meta(content_hash)
    assert meta is not None
    aliases = meta["aliases"]
    assert set(ours) <= set(aliases)
    own_client.delete(content_hash)
    assert own_client.get_meta(content_hash) is None
    assert [own_client.resolve(url) for url in aliases] == [None] * len(aliases)
    with pytest.raises(NotFoundError):
        own_client.get_bytes(content_hash, byte_range=(0, 9))
    with pytest.raises(NotFoundError, match=content_hash):
        own_client.delete(content_hash)
    assert content_hash not in {item["hash"] for item in own_client.list_videos()}
    assert own_client.ingest(ours[1], bucket)["status"] == "new"
