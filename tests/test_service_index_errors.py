"""The service over an index SQLite cannot read: pages of a real index damaged (a sector of
zeros, as a failing disk or a torn write leaves one), before the server starts or under it
while it runs. Every request that needs the damaged pages answers 500 with the JSON detail
`cannot read the index FILE: database disk image is malformed` (`cannot update ...` for a write),
logged as one line, no traceback, its connection kept, the repeats of a failure counted
rather than each logged; the rest is still served; the index is never changed and no blob is
removed, at start-up recovery either.
"""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
import struct
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from tests.service_support import (
    Api,
    blob_files,
    digest,
    serve_refused,
    store_many,
    temp_files,
)
from tests.support import VidcacheServer, wait_until
from vidcache.failure_log import FailureLog

pytestmark = pytest.mark.timeout(180)

MALFORMED = "database disk image is malformed"
PAGE = 4096  # the index's page size (SQLite's default)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, media_url: str) -> Path:
    """A data directory of 300 small videos (bucket `many`, so that each table and index
    spans several pages) and two real ones ingested (bucket `real`); copied by each test."""
    data = tmp_path_factory.mktemp("index-errors") / "data"
    store_many(data, 300)
    with VidcacheServer(data) as server:
        api = Api(server.url)
        for name in ("a.mp4", "b.mp4"):
            api.ingest_ok(f"{media_url}/{name}", "real")
        api.close()
    return data


@pytest.fixture
def data(template: Path, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "data"
    shutil.copytree(template, copy)
    yield copy


def index_of(data_dir: Path) -> Path:
    return data_dir / ".vidcache" / "index.sqlite3"


def pages(index: Path, sql: str, *params: object) -> list[int]:
    with closing(sqlite3.connect(index)) as db:
        return [page for (page,) in db.execute(sql, params)]


def root_page(index: Path, name: str) -> int:
    return pages(index, "SELECT rootpage FROM sqlite_schema WHERE name = ?", name)[0]


def damage(index: Path, page: int) -> None:
    """Zeros over the first 512 bytes of `page` (its b-tree header among them)."""
    with open(index, "r+b") as file:
        file.seek((page - 1) * PAGE)
        file.write(bytes(512))


def page_bytes(index: Path, page: int) -> bytes:
    with open(index, "rb") as file:
        file.seek((page - 1) * PAGE)
        return file.read(PAGE)


def lower_a_cell_count(index: Path) -> None:
    """The last leaf page of the videos table said to hold one row: SQLite reads it without an
    error, as if its other videos were not there."""
    leaf = pages(index, "SELECT pageno FROM dbstat WHERE name = 'videos' "
                        "AND pagetype = 'leaf' ORDER BY pageno")[-1]
    with open(index, "r+b") as file:
        file.seek((leaf - 1) * PAGE + 3)  # the cell count of a leaf page's header
        file.write(struct.pack(">H", 1))


def hashes(data_dir: Path, bucket: str) -> list[str]:
    return sorted(path.name.split(".")[0] for path in blob_files(data_dir / bucket))


def failures(server: VidcacheServer) -> list[str]:
    return [line.split(": ", 1)[1] for line in server.log().splitlines()
            if " failed (500): " in line]


REPEATS = re.compile(r"(.*) \(and (\d+) more failed like it in the [\d.]+ s before it, "
                     r"on (.*)\)")


def counted(line: str) -> tuple[str, int, str]:
    """A logged failure's line without its count of repeats, how many failures it stands for
    (itself and that count), and the paths the count says they failed on ("" if none)."""
    if match := REPEATS.fullmatch(line):
        return match[1], 1 + int(match[2]), match[3]
    return line, 1, ""


def test_reads_of_a_damaged_index_are_a_500_naming_it(data: Path, media_url: str) -> None:
    """The index of hashes damaged: /meta, /video (the fast path's lookup included),
    /video/chunks, /resolve, /videos and a DELETE each answer 500 with SQLite's reason and the
    index's path; each is one line in the log; the connection stays open for the next request.
    (Before: 500 'internal server error; the server log has details', a traceback of 90
    lines in the log for each, and the connection closed: the client's next request on it
    failed with 'Connection reset by peer'.)"""
    index = index_of(data)
    damage(index, root_page(index, "sqlite_autoindex_videos_1"))
    damaged = index.read_bytes()
    blobs = blob_files(data)
    video = hashes(data, "real")[0]
    unreadable = {"detail": f"cannot read the index {index}: {MALFORMED}"}
    with VidcacheServer(data) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        for path in (f"/meta/{video}", f"/video/{video}", f"/video/{video}/chunks",
                     f"/resolve?url={media_url}/a.mp4", "/videos"):
            answer = http.get(path)
            assert (answer.status_code, answer.json()) == (500, unreadable), path
            assert http.get("/ingests").status_code == 200  # on the same connection
        answer = http.delete(f"/video/{video}")
        assert (answer.status_code, answer.json()) == (
            500, {"detail": f"cannot update the index {index}: {MALFORMED}"})
        wait_until(lambda: len(failures(server)) == 2, timeout=30, what="2 failures logged")
    # the four reads after the first failed as it did: counted, the last logged at shutdown
    # with the paths of the three before it
    assert [counted(line) for line in failures(server)] == [
        (f"GET /meta/{video} failed (500): {unreadable['detail']}", 1, ""),
        (f"DELETE /video/{video} failed (500): cannot update the index {index}: {MALFORMED}",
         1, ""),
        (f"GET /videos failed (500): {unreadable['detail']}", 4,
         f"3 paths, /video/{video} first, /resolve last")]
    assert "Traceback" not in server.log()
    assert index.read_bytes() == damaged
    assert blob_files(data) == blobs


def test_health_counts_over_a_damaged_index_with_the_same_500(data: Path) -> None:
    """/health counts the videos: the index it scans for that damaged under the running
    server, it answers the same 500 as the other reads, which the OpenAPI document lists for it
    (and for them)."""
    index = index_of(data)
    with closing(sqlite3.connect(index)) as db:
        plan = " ".join(str(row[-1]) for row in
                        db.execute("EXPLAIN QUERY PLAN SELECT count(*) FROM videos"))
    counted_by = re.search(r"USING COVERING INDEX (\w+)", plan)
    assert counted_by is not None, plan
    with VidcacheServer(data) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        damage(index, root_page(index, counted_by[1]))
        answer = http.get("/health")
        assert (answer.status_code, answer.json()) == (
            500, {"detail": f"cannot read the index {index}: {MALFORMED}"})
        paths = http.get("/openapi.json").json()["paths"]
    for path in ("/health", "/meta/{content_hash}", "/video/{content_hash}",
                 "/video/{content_hash}/chunks", "/resolve", "/videos"):
        assert "500" in paths[path]["get"]["responses"], path


def test_the_repeats_of_a_failure_are_counted_not_each_logged(data: Path) -> None:
    """A player reading on over a damaged index: 300 /meta and 200 /video requests failing
    with the same message, a DELETE among them failing with another. The first read's line is
    logged at once, whole, and so is the DELETE's; the other reads are counted, at most a line a
    minute, the last of them logged at shutdown with the count of those before it: every
    failure accounted for, in 3 lines (within a minute), the count saying on which paths: both,
    the first and the last named. (Before: 501 lines; then a count without its paths.)"""
    index = index_of(data)
    damage(index, root_page(index, "sqlite_autoindex_videos_1"))
    video = hashes(data, "real")[0]
    unreadable = f"cannot read the index {index}: {MALFORMED}"
    delete = f"DELETE /video/{video} failed (500): cannot update the index {index}: {MALFORMED}"
    with VidcacheServer(data) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        started = time.monotonic()
        for number in range(500):
            path = f"/meta/{video}" if number < 300 else f"/video/{video}"
            assert http.get(path).status_code == 500, path
            if number == 250:
                assert http.delete(f"/video/{video}").status_code == 500
                wait_until(lambda: delete in failures(server), timeout=30,
                           what="the DELETE's failure logged")
        minutes = int((time.monotonic() - started) // 60)
    lines = [counted(line) for line in failures(server)]
    assert lines[:2] == [(f"GET /meta/{video} failed (500): {unreadable}", 1, ""),
                         (delete, 1, "")]
    reads = [(line, count, paths) for line, count, paths in lines if line != delete]
    assert 2 <= len(reads) <= 2 + minutes
    assert reads[-1][0] == f"GET /video/{video} failed (500): {unreadable}"
    assert sum(count for _, count, _ in reads) == 500
    assert lines.count((delete, 1, "")) == 1
    both = f"2 paths, /meta/{video} first, /video/{video} last"
    if len(reads) == 2:  # within a minute: one count, of both
        assert reads[1][2] == both
    assert {paths for _, _, paths in reads[1:]} <= {both, f"/meta/{video}", f"/video/{video}"}


def test_a_failure_log_line_per_kind_and_interval(caplog: pytest.LogCaptureFixture) -> None:
    """FailureLog on a clock of its own (the real one would take minutes): a kind's first line
    at once, its repeats counted, the first after the interval logged with their count; a
    count left open is closed (its last line, the count of those before it) by a failure of
    another kind past the interval, or at shutdown. A count names the paths of the failures
    it counts: the one path, or how many and the first and the last."""
    now = [0.0]
    failures = FailureLog(logging.getLogger("test.failures"), interval=60, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "test.failures")

    def fail(at: float, kind: str, line: str, path: str) -> None:
        now[0] = at
        failures.failed(kind, logging.ERROR, line, path=path)

    for at, kind, line, path in ((0, "a", "a0", "/w"), (1, "a", "a1", "/x"),
                                 (2, "b", "b0", "/w"), (30, "a", "a30", "/y"),
                                 (59.5, "a", "a59", "/x"), (61, "a", "a61", "/w"),
                                 (62, "b", "b62", "/w"), (90, "a", "a90", "/z"),
                                 (100, "a", "a100", "/w"), (125, "b", "b125", "/w"),
                                 (126, "b", "b126", "/w")):
        fail(at, kind, line, path)
    failures.flush()
    failures.flush()  # nothing more
    assert caplog.messages == [
        "a0", "b0",
        # a1, a30, a59
        "a61 (and 3 more failed like it in the 61.0 s before it, on 2 paths, /x first, "
        "/x last)",
        "b62",  # b0's interval over, nothing counted since
        # a's count (a90, a100) closed by b's failure past a's interval
        "a100 (and 1 more failed like it in the 39.0 s before it, on /z)",
        "b125",
        "b126"]  # closed at shutdown


def test_a_failure_log_count_names_its_paths_up_to_a_cap(
        caplog: pytest.LogCaptureFixture) -> None:
    """A count's distinct paths are counted up to PATHS_COUNTED (100), its first and last
    named: memory bounded whatever the paths requested."""
    now = [0.0]
    failures = FailureLog(logging.getLogger("test.failures"), interval=60, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "test.failures")
    for kind, paths in (("cap", 100), ("past", 150)):
        for number in range(1 + 2 * paths):  # the first logged, then each path twice
            failures.failed(kind, logging.ERROR, f"{kind}{number}",
                            path=f"/p{(number - 1) % paths}")
    failures.flush()
    assert caplog.messages == [
        "cap0", "past0",
        "cap200 (and 199 more failed like it in the 0.0 s before it, on 100 paths, /p0 first, "
        "/p98 last)",
        "past300 (and 299 more failed like it in the 0.0 s before it, on more than 100 paths, "
        "/p0 first, /p148 last)"]


def test_an_index_damaged_under_the_running_server(data: Path, media_url: str) -> None:
    """An index of the listing by bucket damaged while the server runs: that listing is a
    500 naming the index, an ingest needing it and a delete too (nothing of either is left
    or lost), and everything else is still served."""
    index = index_of(data)
    many = hashes(data, "many")
    with VidcacheServer(data) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.get(f"/meta/{many[0]}").status_code == 200
        damage(index, root_page(index, "videos_bucket"))
        blobs = blob_files(data)

        answer = http.get("/videos", params={"bucket": "many"})
        assert (answer.status_code, answer.json()) == (
            500, {"detail": f"cannot read the index {index}: {MALFORMED}"})
        cannot_update = {"detail": f"cannot update the index {index}: {MALFORMED}"}
        answer = http.post("/ingest", json={"url": f"{media_url}/c.mkv", "bucket": "many"})
        assert (answer.status_code, answer.json()) == (500, cannot_update)
        answer = http.delete(f"/video/{many[0]}")
        assert (answer.status_code, answer.json()) == (500, cannot_update)

        assert (blob_files(data), temp_files(data)) == (blobs, [])
        for video in (many[0], *hashes(data, "real")):
            assert http.get(f"/meta/{video}").status_code == 200
            assert http.get(f"/video/{video}").status_code == 200
        assert len(http.get("/videos", params={"limit": 1000}).json()["items"]) == 302
        wait_until(lambda: len(failures(server)) == 3, timeout=30, what="3 failures logged")
    assert failures(server) == [
        f"GET /videos failed (500): cannot read the index {index}: {MALFORMED}",
        f"ingest {media_url}/c.mkv failed (500): {cannot_update['detail']}",
        f"DELETE /video/{many[0]} failed (500): {cannot_update['detail']}"]
    assert "Traceback" not in server.log()


def test_an_index_unreadable_at_the_frame_check_fails_the_ingest(
        data: Path, media_url: str, videos: dict[str, Path]) -> None:
    """The videos table's leaf holding a.mp4's record damaged while the server runs, then
    a_small.mp4 (a.mp4's near-duplicate) ingested: its check up close cannot read a.mp4's
    record, which is the server's fault like any other unreadable index: 500 naming the index,
    nothing stored or left. (Before: taken for frames that could not be compared, logged as
    'not merged with it', and the video went on to be stored apart; only the index's update
    failing after that stopped it, and an index readable again by then kept a spare copy.)"""
    index = index_of(data)
    leaves = {page: page_bytes(index, page) for page in pages(
        index, "SELECT pageno FROM dbstat WHERE name = 'videos' AND pagetype = 'leaf'")}
    holds_a = [page for page, leaf in leaves.items()
               if digest(videos["a.mp4"].read_bytes()).encode() in leaf]
    other = next(video for video in hashes(data, "many")
                 if not any(video.encode() in leaves[page] for page in holds_a))
    with VidcacheServer(data) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        for page in holds_a:
            damage(index, page)
        # A change elsewhere makes the server's connections drop the pages they keep.
        assert http.delete(f"/video/{other}").status_code == 204
        blobs = blob_files(data)
        url = f"{media_url}/a_small.mp4"
        answer = http.post("/ingest", json={"url": url, "bucket": "real"})
        assert (answer.status_code, answer.json()) == (
            500, {"detail": f"cannot read the index {index}: {MALFORMED}"})
        assert (blob_files(data), temp_files(data)) == (blobs, [])
        wait_until(lambda: len(failures(server)) == 1, timeout=30, what="the failure logged")
    assert failures(server) == [
        f"ingest {url} failed (500): cannot read the index {index}: {MALFORMED}"]
    assert "not merged" not in server.log()


def test_a_start_on_a_damaged_index(data: Path) -> None:
    """The videos table damaged: the start-up recovery cannot read it; one line naming the
    index, exit status 1, nothing changed."""
    index = index_of(data)
    damage(index, root_page(index, "videos"))
    damaged, blobs = index.read_bytes(), blob_files(data)
    run = serve_refused(data)
    assert (run.returncode, run.stdout, run.stderr) == (
        1, "", f"vidcache serve: error: cannot read the index {index}: {MALFORMED}\n")
    assert (index.read_bytes(), blob_files(data)) == (damaged, blobs)


def test_start_up_recovery_removes_nothing_on_a_damaged_index(data: Path) -> None:
    """A leaf page of the videos table with its cell count lowered reads without an error, as
    if its other videos were not there: their blobs, seen as orphans, were removed at start
    (lost for good). Now the recovery checks the index before it removes anything:
    one line, exit status 1, every blob kept; the index repaired (here: put back), the server
    starts and serves every video."""
    index = index_of(data)
    intact = index.read_bytes()
    lower_a_cell_count(index)
    damaged, blobs = index.read_bytes(), blob_files(data)
    run = serve_refused(data)
    assert (run.returncode, run.stdout) == (1, ""), run.stderr
    first, rest = run.stderr.split(" (PRAGMA quick_check: ", 1)
    assert first == f"vidcache serve: error: the index {index} is damaged"
    assert rest.endswith("): until it is repaired or restored, the start-up recovery removes "
                         "nothing (a blob without a record may be a video it lost)\n"), run.stderr
    assert (index.read_bytes(), blob_files(data)) == (damaged, blobs)

    index.write_bytes(intact)
    with VidcacheServer(data) as server:
        listing = httpx.get(f"{server.url}/videos", params={"limit": 1000}).json()
        assert len(listing["items"]) == len(blobs) == 302
    assert "start-up recovery" not in server.log()


def test_an_older_index_damaged_is_not_migrated(data: Path) -> None:
    """The same damage to an index of version 2, which the first start of version 3 migrates
    (its aliases rewritten, then VACUUMed): the VACUUM copied only the rows it could read, a
    sound index without the damaged page's videos, and the recovery's check then passed and
    removed their blobs as orphans (lost for good). Now the index is checked before the
    migration rewrites it: one line, exit status 1, the index and every blob as they were."""
    index = index_of(data)
    with closing(sqlite3.connect(index)) as db:
        db.execute("PRAGMA user_version = 2")
    lower_a_cell_count(index)
    damaged, blobs = index.read_bytes(), blob_files(data)
    run = serve_refused(data)
    assert (run.returncode, run.stdout) == (1, ""), run.stderr
    assert run.stderr.startswith(f"vidcache serve: error: the index {index} is damaged "
                                 "(PRAGMA quick_check: "), run.stderr
    assert (index.read_bytes(), blob_files(data)) == (damaged, blobs)
