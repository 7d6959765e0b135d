"""Reads while a write is held in its commit path, against the real service: an ingest held as
its blob is renamed into place, as the blob's directory is fsynced, as its record is committed;
a delete held as it commits, as it unlinks the blob. Every read of the videos stored before
answers meanwhile: a slow disk's fsyncs hold up the other writes, never the reads. And reads of
one video while a listing holds its read: they never wait for a scan."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service_stress_support import (
    PausingServer,
    assert_consistent,
    background,
    make_distinct_videos,
)
from tests.service_support import Api, store_many
from tests.support import VidcacheServer, open_descriptors, serve_directory, wait_until
from vidcache.store import READ_CONNECTIONS

pytestmark = pytest.mark.timeout(180)

KEPT = ["testsrc", "mandelbrot"]  # stored in bucket "kept" and read while the write is held
GONE = "life"  # stored in bucket "gone", deleted by the held delete
HELD = "gradients"  # ingested into bucket "held" by the held ingest
# far beyond what a read takes here (milliseconds); before, each waited for the release
READ_TIMEOUT = 30


@dataclass(frozen=True)
class Prepared:
    data: Path  # a data directory holding the KEPT and GONE videos, no server on it
    origin: str
    files: dict[str, Path]
    hashes: dict[str, str]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prepared]:
    folder = tmp_path_factory.mktemp("reads")
    files = make_distinct_videos(folder / "videos", [*KEPT, GONE, HELD])
    with serve_directory(folder / "videos") as origin:
        data = folder / "data"
        with VidcacheServer(data) as server:
            api = Api(server.url)
            hashes = {name: api.ingest_ok(f"{origin}/{name}.mp4", "kept")["hash"]
                      for name in KEPT}
            hashes[GONE] = api.ingest_ok(f"{origin}/{GONE}.mp4", "gone")["hash"]
            api.close()
        yield Prepared(data, origin, files, hashes)


@dataclass(frozen=True)
class Hold:
    write: str  # "ingest" or "delete"
    point: tuple[str, str]
    gone_listed: bool  # whether the deleted video is still listed while held


HOLDS = {
    "ingest-rename": Hold("ingest", ("os.rename", "/held/"), True),
    "ingest-dir-fsync": Hold("ingest", ("open", "/held/"), True),  # _fsync_dir's open
    "ingest-commit": Hold("ingest", ("test.sql", "'COMMIT'"), True),
    "delete-commit": Hold("delete", ("test.sql", "'COMMIT'"), True),
    "delete-unlink": Hold("delete", ("os.remove", "/gone/"), False),
}


def _assert_reads_answer(url: str, prepared: Prepared, hold: Hold) -> None:
    """Every read route answers for the KEPT videos, /video cold (the server's first request
    for them); the listing shows the state committed before the held write."""
    with httpx.Client(base_url=url, timeout=READ_TIMEOUT) as http:
        for name in KEPT:
            content_hash = prepared.hashes[name]
            meta = http.get(f"/meta/{content_hash}")
            assert meta.status_code == 200 and meta.json()["hash"] == content_hash, meta.text
            resolved = http.get("/resolve", params={"url": f"{prepared.origin}/{name}.mp4"})
            assert resolved.json()["hash"] == content_hash, resolved.text
            chunks = http.get(f"/video/{content_hash}/chunks")
            assert chunks.status_code == 200 and chunks.json()["digests"], chunks.text
            video = http.get(f"/video/{content_hash}")
            assert video.content == prepared.files[name].read_bytes()
        listed = {item["hash"] for item in http.get("/videos").json()["items"]}
        expected = {prepared.hashes[name] for name in KEPT}
        if hold.gone_listed:
            expected.add(prepared.hashes[GONE])
        assert listed == expected
        assert http.get("/health").json()["videos"] == len(expected)


@pytest.mark.parametrize("hold", HOLDS.values(), ids=HOLDS.keys())
def test_reads_answer_while_a_write_is_held_in_its_commit(tmp_path: Path, prepared: Prepared,
                                                         hold: Hold) -> None:
    """Was: every read waited for the write, as all took the store's one lock (each read
    here timed out until the write was released)."""
    data = tmp_path / "data"
    shutil.copytree(prepared.data, data)
    server = PausingServer(data, hold.point)
    answers: list[httpx.Response] = []

    def write() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            if hold.write == "ingest":
                answers.append(http.post("/ingest", json={
                    "url": f"{prepared.origin}/{HELD}.mp4", "bucket": "held"}))
            else:
                answers.append(http.delete(f"/video/{prepared.hashes[GONE]}"))

    with server:
        with background(write):
            try:
                wait_until(server.paused, timeout=60,
                           what=f"the {hold.write} held at {hold.point}")
                _assert_reads_answer(server.url, prepared, hold)
            finally:
                server.release()
        [answer] = answers
        assert answer.status_code == (200 if hold.write == "ingest" else 204), answer.text
        stored = {record["hash"] for record in assert_consistent(data, server.url)}
    kept = {prepared.hashes[name] for name in KEPT}
    assert stored - kept == ({answer.json()["hash"], prepared.hashes[GONE]}
                             if hold.write == "ingest" else set())


def test_concurrent_reads_share_a_few_read_connections(tmp_path: Path) -> None:
    """Reads run on READ_CONNECTIONS read connections of their own (writes have another).
    Was: a connection per read running at once, kept for the server's life (16 clients listing
    at once left ~16 connections, 2 descriptors each, and ~2 MB of page cache each); and
    concurrent multi-row reads ran slower than one at a time (SQLite lets go of the GIL at
    every row: 8 threads listing took twice the CPU per page and did half as many pages)."""
    data = tmp_path / "data"
    hashes = store_many(data, 2000, meta=json.dumps({"note": "x" * 1000}))
    with VidcacheServer(data) as server:
        assert server.process is not None

        def read(number: int) -> None:
            with httpx.Client(base_url=server.url, timeout=READ_TIMEOUT) as http:
                for turn in range(20):
                    after = hashes[(number * 131 + turn * 17) % len(hashes)]
                    page = http.get("/videos", params={"limit": 200, "after": after})
                    assert page.status_code == 200, page.text
                    assert http.get(f"/meta/{after}").json()["hash"] == after

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(read, range(16)))
        index = data / ".vidcache" / "index.sqlite3"
        # one descriptor per SQLite connection on the index itself (its -wal and -shm aside)
        assert open_descriptors(server.process.pid).count(str(index)) == 1 + READ_CONNECTIONS


def test_reads_of_one_video_answer_while_a_listing_holds_its_read(tmp_path: Path) -> None:
    """A listing page held as its SELECT starts, in its read transaction on a read connection:
    /meta, /resolve, /chunks and /health answer meanwhile, and the page is whole once released.
    Was: reads ran one at a time on one read connection under one lock, so a /meta waited for
    every listing page before it (~20 ms beside one client listing pages of 1000 videos of
    100 000); each read here timed out until the listing was released."""
    data = tmp_path / "data"
    hashes = store_many(data, 50)
    server = PausingServer(data, ("test.sql", "ORDER BY hash LIMIT"))
    pages: list[httpx.Response] = []

    def listing() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            pages.append(http.get("/videos", params={"limit": 1000}))

    with server, background(listing):
        try:
            wait_until(server.paused, timeout=60, what="the listing held at its SELECT")
            with httpx.Client(base_url=server.url, timeout=READ_TIMEOUT) as http:
                for number in (0, len(hashes) - 1):
                    content_hash = hashes[number]
                    meta = http.get(f"/meta/{content_hash}")
                    assert meta.status_code == 200 and meta.json()["hash"] == content_hash
                    resolved = http.get("/resolve",
                                        params={"url": f"http://origin.test/{number}.mp4"})
                    assert resolved.json()["hash"] == content_hash, resolved.text
                    chunks = http.get(f"/video/{content_hash}/chunks")
                    assert chunks.status_code == 200 and chunks.json()["digests"], chunks.text
                assert http.get("/health").json()["videos"] == len(hashes)
        finally:
            server.release()
    [page] = pages
    assert page.status_code == 200, page.text
    assert [item["hash"] for item in page.json()["items"]] == sorted(hashes)
