"""Chunk digests of the real service (`GET /video/{hash}/chunks`): recorded at the server's
`--chunk-size` for new ingests, while a video stored under another chunk size (a data
directory of vidcache 1.0, which recorded 1 MiB chunks) keeps its own, also through a
duplicate ingest after the setting changed. Pages (`?start=&end=`, bytes, end exclusive) list
the chunks overlapping a byte range: every page must be the matching slice of the whole list."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_support import Api, digest
from tests.support import VidcacheServer
from vidcache.chunks import DIGEST_SIZE, accepts_gzip, chunk_page
from vidcache.store import NewVideo, Store

pytestmark = pytest.mark.timeout(120)

KIB = 1024
MIB = 1024 * KIB


def chunk_digests(data: bytes, chunk_size: int) -> list[str]:
    return [digest(data[i:i + chunk_size]) for i in range(0, len(data), chunk_size)]


@dataclass(frozen=True)
class Mixed:
    """One data directory holding a video ingested at 1 MiB chunks, then one at 256 KiB."""

    api: Api
    old_hash: str  # big.mp4, ingested while the server ran with --chunk-size 1M
    new_hash: str  # big_moov_end.mp4, ingested after a restart with --chunk-size 256K


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, media_url: str) -> Iterator[Mixed]:
    data_dir = tmp_path_factory.mktemp("svc-chunks") / "data"
    with VidcacheServer(data_dir, "--chunk-size", "1M") as before:
        api = Api(before.url)
        old_hash = api.ingest_ok(f"{media_url}/big.mp4", "old")["hash"]
        api.close()
    with VidcacheServer(data_dir, "--chunk-size", "256K") as server:
        api = Api(server.url)
        new_hash = api.ingest_ok(f"{media_url}/big_moov_end.mp4", "new")["hash"]
        yield Mixed(api, old_hash, new_hash)
        api.close()


def test_new_ingests_are_recorded_in_256_kib_chunks(mixed: Mixed,
                                                     videos: dict[str, Path]) -> None:
    data = videos["big_moov_end.mp4"].read_bytes()
    answer = mixed.api.http.get(f"/video/{mixed.new_hash}/chunks")
    assert answer.status_code == 200
    expected = chunk_digests(data, 256 * KIB)
    assert answer.json() == {"hash": mixed.new_hash, "chunk_size": 256 * KIB, "first_chunk": 0,
                             "chunk_count": len(expected), "digests": expected}
    assert len(expected) > 4 and len(data) % (256 * KIB) != 0  # many, the last one short


def test_a_video_stored_in_1_mib_chunks_keeps_them(mixed: Mixed,
                                                   videos: dict[str, Path]) -> None:
    data = videos["big.mp4"].read_bytes()
    answer = mixed.api.http.get(f"/video/{mixed.old_hash}/chunks").json()
    expected = chunk_digests(data, MIB)
    assert answer == {"hash": mixed.old_hash, "chunk_size": MIB, "first_chunk": 0,
                      "chunk_count": len(expected), "digests": expected}
    # the rest of the record is served as before
    assert mixed.api.meta(mixed.old_hash).json()["size_bytes"] == len(data)
    ranged = mixed.api.http.get(f"/video/{mixed.old_hash}", headers={"Range": "bytes=5-99"})
    assert (ranged.status_code, ranged.content) == (206, data[5:100])


def test_a_duplicate_ingest_keeps_the_recorded_chunk_size(mixed: Mixed, media_url: str) -> None:
    again = mixed.api.ingest_ok(f"{media_url}/big.mp4?from=elsewhere", "new")
    assert (again["status"], again["hash"]) == ("duplicate", mixed.old_hash)
    assert mixed.api.http.get(f"/video/{mixed.old_hash}/chunks").json()["chunk_size"] == MIB


def test_the_smallest_chunk_size(tmp_path: Path, media_url: str,
                                 videos: dict[str, Path]) -> None:
    data = videos["b.mp4"].read_bytes()
    with VidcacheServer(tmp_path / "data", "--chunk-size", "64K") as server:
        api = Api(server.url)
        content_hash = api.ingest_ok(f"{media_url}/b.mp4", "small")["hash"]
        answer = api.http.get(f"/video/{content_hash}/chunks").json()
        api.close()
    assert answer["chunk_size"] == 64 * KIB
    assert answer["digests"] == chunk_digests(data, 64 * KIB)


def test_unknown_and_malformed_hashes(mixed: Mixed) -> None:
    unknown = mixed.api.http.get(f"/video/{'0' * 64}/chunks")
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": f"no video with hash {'0' * 64}"}
    assert mixed.api.http.get(f"/video/{'A' * 64}/chunks").status_code == 422


def test_serve_refuses_a_chunk_size_that_is_no_power_of_two(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vidcache", "serve", "--data", str(tmp_path / "data"),
         "--port", "1", "--chunk-size", "100K"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert ("argument --chunk-size: chunk size must be a power of two from 64 KiB to 16 MiB, "
            "got 102400 bytes") in done.stderr
    assert not (tmp_path / "data").exists()  # refused before touching anything


def plain_and_gzipped(mixed: Mixed, accept: str, params: dict[str, str] | None = None
                      ) -> tuple[httpx.Response, httpx.Response, bytes]:
    """The digest list (or page) asked for without compression, and asked for with
    `Accept-Encoding: accept`: that answer and its body as sent."""
    path = f"/video/{mixed.new_hash}/chunks"
    plain = mixed.api.http.get(path, params=params, headers={"Accept-Encoding": "identity"})
    raw = mixed.api.http.build_request("GET", path, params=params,
                                       headers={"Accept-Encoding": accept})
    compressed = mixed.api.http.send(raw, stream=True)
    try:
        body = b"".join(compressed.iter_raw())
    finally:
        compressed.close()
    assert compressed.headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in compressed.headers["vary"]
    assert json.loads(gzip.decompress(body)) == plain.json()
    return plain, compressed, body


@pytest.mark.parametrize("accept", ["gzip", "br, gzip;q=0.5", "*"])
def test_the_list_is_gzip_compressed_for_clients_that_accept_it(mixed: Mixed,
                                                               accept: str) -> None:
    plain, _, body = plain_and_gzipped(mixed, accept)
    assert "content-encoding" not in plain.headers
    assert len(body) < len(plain.content) * 0.6


@pytest.mark.parametrize(("header", "expected"), [
    ("gzip", True), ("GZIP", True), ("x-gzip", True), ("deflate, gzip;q=0.8", True),
    ("*", True), ("", False), ("identity", False), ("gzip;q=0", False), ("gzip;q=0.0", False),
    ("br", False), ("gzip;q=bogus", False),
])
def test_accepts_gzip(header: str, expected: bool) -> None:
    assert accepts_gzip(header) is expected


# --- pages: ?start=&end= -------------------------------------------------------------------------

def expected_page(data: bytes, chunk_size: int, start: int, end: int | None) -> dict[str, Any]:
    """The page by the protocol's definition, computed from the source bytes."""
    whole = chunk_digests(data, chunk_size)
    count = len(whole)
    stop = len(data) if end is None else min(end, len(data))
    first = min(start // chunk_size, count)
    last = math.ceil(stop / chunk_size) if start < stop else first
    return {"chunk_size": chunk_size, "first_chunk": first, "chunk_count": count,
            "digests": whole[first:last]}


def page(api: Api, content_hash: str, **params: int | str) -> httpx.Response:
    return api.http.get(f"/video/{content_hash}/chunks", params=params)


C = 256 * KIB  # the chunk size of mixed.new_hash


@pytest.mark.parametrize(("start", "end", "first", "count"), [
    (0, C, 0, 1),                    # exactly the first chunk
    (C, 3 * C, 1, 2),                # exact boundaries
    (C - 1, C + 1, 0, 2),            # two bytes straddling a boundary
    (C + 5, 2 * C - 5, 1, 1),        # inside one chunk
    (5, 3 * C + 1, 0, 4),            # cutting the first and the last chunk of the range
    (0, 1, 0, 1),                    # one byte
    (3 * C, 3 * C, 3, 0),            # end == start: nothing
    (3 * C + 7, 3 * C + 7, 3, 0),    # end == start inside a chunk: still nothing
    (3 * C + 7, 2 * C, 3, 0),        # end < start: nothing
])
def test_a_page_is_the_slice_of_the_chunks_overlapping_the_range(
        mixed: Mixed, videos: dict[str, Path], start: int, end: int, first: int,
        count: int) -> None:
    data = videos["big_moov_end.mp4"].read_bytes()
    answer = page(mixed.api, mixed.new_hash, start=start, end=end)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    whole = chunk_digests(data, C)
    assert document == {"hash": mixed.new_hash, "chunk_size": C, "first_chunk": first,
                        "chunk_count": len(whole), "digests": whole[first:first + count]}
    assert document == {"hash": mixed.new_hash, **expected_page(data, C, start, end)}


def test_pages_at_the_end_of_the_file(mixed: Mixed, videos: dict[str, Path]) -> None:
    data = videos["big_moov_end.mp4"].read_bytes()
    size, whole = len(data), chunk_digests(data, C)
    count = len(whole)
    assert size % C  # the last chunk is short

    last = page(mixed.api, mixed.new_hash, start=size - 1).json()
    assert (last["first_chunk"], last["digests"]) == (count - 1, whole[-1:])
    # an end beyond the file ends at its last (short) chunk, with or without a start
    beyond = page(mixed.api, mixed.new_hash, start=C, end=size + 10 * C).json()
    assert (beyond["first_chunk"], beyond["digests"]) == (1, whole[1:])
    only_end = page(mixed.api, mixed.new_hash, end=2 * C).json()
    assert (only_end["first_chunk"], only_end["digests"]) == (0, whole[:2])
    # no byte of the range in the file: nothing, first_chunk clamped to the chunk count
    for start in (count * C, count * C + 1, (count + 5) * C, 10**30):
        past = page(mixed.api, mixed.new_hash, start=start).json()
        assert past == {"hash": mixed.new_hash, "chunk_size": C, "first_chunk": count,
                        "chunk_count": count, "digests": []}
    # past the size but inside the span of the short last chunk: nothing either, from there
    for start, end in ((size, None), (size, size + C), (size + 1, count * C)):
        tail = page(mixed.api, mixed.new_hash, start=start, **({} if end is None else
                                                                {"end": end})).json()
        assert (tail["first_chunk"], tail["digests"]) == (count - 1, [])


def test_every_page_of_a_walk_is_a_slice_of_the_whole_list(mixed: Mixed) -> None:
    """Pages of an odd byte length, walked over the whole 1 MiB-chunk video, put together give
    the whole list, each chunk once per page it overlaps."""
    whole = mixed.api.http.get(f"/video/{mixed.old_hash}/chunks").json()
    size = mixed.api.meta(mixed.old_hash).json()["size_bytes"]
    step = MIB + 12345
    for start in range(0, size, step):
        document = page(mixed.api, mixed.old_hash, start=start, end=start + step).json()
        first = document["first_chunk"]
        assert first == start // MIB
        assert document["digests"] == whole["digests"][first:first + len(document["digests"])]
        assert first + len(document["digests"]) == min(math.ceil((start + step) / MIB),
                                                       whole["chunk_count"])


def test_a_page_is_gzip_compressed_too(mixed: Mixed) -> None:
    plain, _, _ = plain_and_gzipped(mixed, "gzip", {"start": str(C), "end": str(4 * C)})
    assert len(plain.json()["digests"]) == 3


@pytest.mark.parametrize(("params", "complaint"), [
    ({"start": "-1"}, "start: Input should be greater than or equal to 0"),
    ({"end": "-5"}, "end: Input should be greater than or equal to 0"),
    ({"start": "abc"}, "start: Input should be a valid integer"),
    ({"end": "1.5"}, "end: Input should be a valid integer"),
    ({"start": "0", "end": ""}, "end: Input should be a valid integer"),
])
def test_bad_range_parameters_are_refused_with_a_reason(mixed: Mixed, params: dict[str, str],
                                                        complaint: str) -> None:
    answer = mixed.api.http.get(f"/video/{mixed.new_hash}/chunks", params=params)
    assert answer.status_code == 422
    assert complaint in answer.json()["detail"]


def test_an_unknown_hash_with_a_range_is_404(mixed: Mixed) -> None:
    unknown = page(mixed.api, "0" * 64, start=0, end=C)
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": f"no video with hash {'0' * 64}"}


@pytest.mark.parametrize(("start", "end", "size", "expected"), [
    (0, None, 0, range(0, 0)), (0, 10, 0, range(0, 0)), (5, None, 0, range(0, 0)),
    (C, 2 * C, 0, range(0, 0)),                    # an empty file has no chunk at all
    (0, None, C, range(0, 1)), (C, None, C, range(1, 1)), (C - 1, None, C, range(0, 1)),
    (0, None, C + 1, range(0, 2)), (C + 1, None, C + 1, range(1, 1)),
    (C + 1, 2 * C, C + 1, range(1, 1)), (2 * C, 3 * C, C + 1, range(2, 2)),
    (0, 3 * C, 2 * C, range(0, 2)), (C, C + 1, 2 * C, range(1, 2)),
    # a 5 GiB video: pages just below, across and past 2**31 and 2**32, and its short end
    (2**31 - 1, 2**31 + 1, 5 * 2**30 + 1, range(8191, 8193)),
    (2**32 - 1, 2**32, 5 * 2**30 + 1, range(16383, 16384)),
    (2**32, 2**32 + 1, 5 * 2**30 + 1, range(16384, 16385)),
    (5 * 2**30, None, 5 * 2**30 + 1, range(20480, 20481)),
    (2**33, None, 5 * 2**30 + 1, range(20481, 20481)),
])
def test_chunk_page(start: int, end: int | None, size: int, expected: range) -> None:
    assert chunk_page(start, end, C, size) == expected


def test_the_store_pages_an_empty_video(tmp_path: Path) -> None:
    """The service cannot ingest an empty file (no media in it), but its record must page."""
    store = Store(tmp_path / "data")
    store.open()
    try:
        blob = tmp_path / "data" / ".vidcache" / "tmp" / "empty"
        blob.write_bytes(b"")
        empty_hash = digest(b"")
        store.add_video(NewVideo(content_hash=empty_hash, bucket="b", prefix="", extension="mp4",
                                 size_bytes=0, duration_s=0.0, mime_type="video/mp4", meta={},
                                 phash="", chunk_size=C, chunk_digests=b""),
                        url="http://media.test/empty.mp4", temp_path=blob)
        for start, end in ((0, None), (0, 100), (C, 2 * C)):
            digests = store.chunk_digests(empty_hash, start=start, end=end)
            assert digests is not None
            assert (digests.chunk_count, digests.first_chunk, digests.digests) == (0, 0, b"")
    finally:
        store.close()


def test_the_store_reads_only_the_page(tmp_path: Path) -> None:
    """A page of a long list is the matching slice of the stored bytes (incremental blob read
    at the right offset), also across SQLite's overflow pages."""
    store = Store(tmp_path / "data")
    store.open()
    try:
        chunk_size, count = 64 * KIB, 5000  # 160 KB of digests: many overflow pages
        stored = b"".join(i.to_bytes(DIGEST_SIZE, "big") for i in range(count))
        blob = tmp_path / "data" / ".vidcache" / "tmp" / "long"
        blob.write_bytes(b"")
        long_hash = digest(b"long")
        store.add_video(NewVideo(content_hash=long_hash, bucket="b", prefix="", extension="mp4",
                                 size_bytes=count * chunk_size - 3, duration_s=1.0,
                                 mime_type="video/mp4", meta={}, phash="",
                                 chunk_size=chunk_size, chunk_digests=stored),
                        url="http://media.test/long.mp4", temp_path=blob)
        digests = store.chunk_digests(long_hash, start=3000 * chunk_size + 1,
                                      end=3100 * chunk_size)
        assert digests is not None
        assert (digests.first_chunk, digests.chunk_count) == (3000, count)
        assert digests.digests == stored[3000 * DIGEST_SIZE:3100 * DIGEST_SIZE]
        assert store.chunk_digests("f" * 64) is None
    finally:
        store.close()
