"""The real service under concurrent load: 32 ingests at once, with exact duplicates, URL
aliases and re-encodes among them, then 32 concurrent range readers, every byte compared with
the source."""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_stress_support import (
    assert_consistent,
    make_distinct_videos,
    make_reencode,
)
from tests.service_support import digest
from tests.support import VidcacheServer, serve_directory
from vidcache_client import VidCacheClient

pytestmark = pytest.mark.timeout(180)

GROUPS = ["testsrc", "testsrc2", "mandelbrot", "cell30", "cell110", "cell90", "life",
          "gradients"]
REENCODED = {"testsrc2", "mandelbrot"}  # their group also gets a smaller re-encode
READERS = 32
READS_PER_READER = 40


@dataclass(frozen=True)
class Request:
    group: str
    url: str
    file: Path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path]) -> dict[str, Path]:
    """The group videos, the re-encodes (`<name>_small`) and a link to big.mp4."""
    folder = tmp_path_factory.mktemp("load-videos")
    files = make_distinct_videos(folder, GROUPS)
    for name in REENCODED:
        files[f"{name}_small"] = make_reencode(files[name], folder / f"{name}_small.mp4")
    (folder / "big.mp4").symlink_to(videos["big.mp4"])
    files["big"] = folder / "big.mp4"
    return files


@pytest.fixture(scope="module")
def origin(corpus: dict[str, Path]) -> Iterator[str]:
    with serve_directory(corpus["big"].parent) as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    with VidcacheServer(tmp_path_factory.mktemp("load") / "data") as running:
        yield running


def _requests(origin: str, corpus: dict[str, Path]) -> list[Request]:
    """4 per group: the same URL twice (-> one url_alias), the same bytes under another URL
    (-> duplicate) and either a third URL or, for REENCODED groups, the re-encode."""
    requests = []
    for name in GROUPS:
        url = f"{origin}/{name}.mp4"
        fourth = (Request(name, f"{origin}/{name}_small.mp4", corpus[f"{name}_small"])
                  if name in REENCODED else Request(name, f"{url}?copy=2", corpus[name]))
        requests += [Request(name, url, corpus[name]), Request(name, url, corpus[name]),
                     Request(name, f"{url}?copy=1", corpus[name]), fourth]
    return requests


@pytest.fixture(scope="module")
def ingested(server: VidcacheServer, origin: str,
             corpus: dict[str, Path]) -> list[tuple[Request, dict[str, Any]]]:
    requests = _requests(origin, corpus)
    random.Random(32).shuffle(requests)
    barrier = threading.Barrier(len(requests))
    with VidCacheClient(server.url, timeout=120, max_connections=len(requests)) as client:

        def ingest(request: Request) -> dict[str, Any]:
            barrier.wait(timeout=30)
            return client.ingest(request.url, "load")

        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(ingest, requests))
    return list(zip(requests, results, strict=True))


def test_32_parallel_ingests_store_one_video_per_content(
        ingested: list[tuple[Request, dict[str, Any]]], server: VidcacheServer) -> None:
    assert len(ingested) == 32
    by_group: dict[str, list[tuple[Request, dict[str, Any]]]] = collections.defaultdict(list)
    for request, result in ingested:
        by_group[request.group].append((request, result))
    records = {r["hash"]: r for r in assert_consistent(server.data_dir, server.url)}
    assert len(records) == len(GROUPS)

    for group, pairs in by_group.items():
        statuses = collections.Counter(result["status"] for _, result in pairs)
        assert statuses == {"new": 1, "url_alias": 1, "duplicate": 2}, (group, statuses)
        hashes = {result["hash"] for _, result in pairs}
        assert len(hashes) == 1, group
        (stored_hash,) = hashes
        # the stored bytes are those of whichever request of the group won
        winner = next(r.file for r, result in pairs if result["status"] == "new")
        assert stored_hash == digest(winner.read_bytes())
        for request, result in pairs:
            same_bytes = digest(request.file.read_bytes()) == stored_hash
            if result["status"] == "duplicate" and not same_bytes:  # perceptual match
                assert 0 <= result["phash_distance"] <= 10, result
            else:
                assert "phash_distance" not in result, result
        record = records[stored_hash]
        assert sorted(record["aliases"]) == sorted({r.url for r, _ in pairs})
        assert record["bucket"] == "load"


@pytest.fixture(scope="module")
def stored(ingested: list[tuple[Request, dict[str, Any]]], server: VidcacheServer,
           origin: str, corpus: dict[str, Path]) -> dict[str, bytes]:
    """hash -> bytes of every stored video, big.mp4 (~20 MB) included."""
    with VidCacheClient(server.url, timeout=120) as client:
        client.ingest(f"{origin}/big.mp4", "load")
    data = {}
    for request, result in ingested:
        content = request.file.read_bytes()
        if digest(content) == result["hash"]:
            data[result["hash"]] = content
    big = corpus["big"].read_bytes()
    data[digest(big)] = big
    assert len(data) == len(GROUPS) + 1
    return data


def test_32_concurrent_range_readers_get_exact_bytes(stored: dict[str, bytes],
                                                      server: VidcacheServer) -> None:
    hashes = sorted(stored)
    barrier = threading.Barrier(READERS)

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        verified = 0
        with VidCacheClient(server.url, timeout=60, max_connections=1) as client, \
                httpx.Client(base_url=server.url, timeout=60) as http:
            barrier.wait(timeout=30)
            for _ in range(READS_PER_READER):
                content_hash = rng.choice(hashes)
                data = stored[content_hash]
                size = len(data)
                length = rng.randrange(1, 256 * 1024)
                form = rng.choice(["first-last", "first-", "-suffix"])
                if form == "first-last":  # through the client, which checks Content-Range
                    start = rng.randrange(size)
                    end = min(size - 1, start + length - 1)
                    got = client.get_bytes(content_hash, byte_range=(start, end))
                    assert got == data[start:end + 1]
                else:  # the tail, asked for as an open range or as a suffix
                    first = max(0, size - length)
                    header = f"bytes={first}-" if form == "first-" else f"bytes=-{length}"
                    response = http.get(f"/video/{content_hash}", headers={"Range": header})
                    assert response.status_code == 206
                    assert response.headers["content-range"] == f"bytes {first}-{size - 1}/{size}"
                    got = response.content
                    assert got == data[first:]
                verified += len(got)
        return verified

    with ThreadPoolExecutor(READERS) as pool:
        verified = sum(pool.map(reader, range(READERS)))
    assert verified > 0
    print(f"\n{READERS} readers x {READS_PER_READER} ranged reads: {verified} bytes verified")
