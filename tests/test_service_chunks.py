"""Chunk digests of the real service (`GET /video/{hash}/chunks`): recorded at the server's
`--chunk-size` for new ingests, while a video stored under another chunk size (a data
directory of vidcache 1.0, which recorded 1 MiB chunks) keeps its own, also through a
duplicate ingest after the setting changed."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service_support import Api, digest
from tests.support import VidcacheServer
from vidcache.chunks import accepts_gzip

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
    assert answer.json() == {"hash": mixed.new_hash, "chunk_size": 256 * KIB,
                             "digests": expected}
    assert len(expected) > 4 and len(data) % (256 * KIB) != 0  # many, the last one short


def test_a_video_stored_in_1_mib_chunks_keeps_them(mixed: Mixed,
                                                   videos: dict[str, Path]) -> None:
    data = videos["big.mp4"].read_bytes()
    answer = mixed.api.http.get(f"/video/{mixed.old_hash}/chunks").json()
    assert answer == {"hash": mixed.old_hash, "chunk_size": MIB,
                      "digests": chunk_digests(data, MIB)}
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


@pytest.mark.parametrize("accept", ["gzip", "br, gzip;q=0.5", "*"])
def test_the_list_is_gzip_compressed_for_clients_that_accept_it(mixed: Mixed,
                                                               accept: str) -> None:
    plain = mixed.api.http.get(f"/video/{mixed.new_hash}/chunks",
                               headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    raw = mixed.api.http.build_request("GET", f"/video/{mixed.new_hash}/chunks",
                                       headers={"Accept-Encoding": accept})
    compressed = mixed.api.http.send(raw, stream=True)
    try:
        body = b"".join(compressed.iter_raw())
    finally:
        compressed.close()
    assert compressed.headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in compressed.headers["vary"]
    assert json.loads(gzip.decompress(body)) == plain.json()
    assert len(body) < len(plain.content) * 0.6


@pytest.mark.parametrize(("header", "expected"), [
    ("gzip", True), ("GZIP", True), ("x-gzip", True), ("deflate, gzip;q=0.8", True),
    ("*", True), ("", False), ("identity", False), ("gzip;q=0", False), ("gzip;q=0.0", False),
    ("br", False), ("gzip;q=bogus", False),
])
def test_accepts_gzip(header: str, expected: bool) -> None:
    assert accepts_gzip(header) is expected
