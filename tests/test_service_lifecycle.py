"""The service across restarts and crashes: state survives, leftovers are cleaned at start-up,
one server per data directory. Every test runs services of its own on its own data dir."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_support import (
    Api,
    blob_files,
    digest,
    serve_origin,
    store_many,
    temp_files,
)
from tests.support import VidcacheServer, free_port, open_descriptors, wait_until
from vidcache.store import RecoveryReport, Store, blob_relpath

pytestmark = pytest.mark.timeout(120)


def _snapshot(api: Api, hashes: list[str]) -> dict[str, Any]:
    return {h: {"meta": api.meta(h).json(),
                "chunks": api.http.get(f"/video/{h}/chunks").json(),
                "bytes": api.http.get(f"/video/{h}").content}
            for h in hashes}


def test_restart_keeps_everything(tmp_path: Path, media_url: str,
                                  videos: dict[str, Path]) -> None:
    data = tmp_path / "data"
    with VidcacheServer(data) as server:
        api = Api(server.url)
        a = api.ingest_ok(f"{media_url}/a.mp4", "keep", meta={"k": "v"})
        api.ingest_ok(f"{media_url}/a.mp4?again", "keep")
        c = api.ingest_ok(f"{media_url}/c.mkv", "keep", prefix="p")
        before = _snapshot(api, [a["hash"], c["hash"]])
        listing = api.http.get("/videos").json()
        api.close()

    with VidcacheServer(data) as server:
        api = Api(server.url)
        assert _snapshot(api, [a["hash"], c["hash"]]) == before
        assert before[a["hash"]]["bytes"] == videos["a.mp4"].read_bytes()
        assert api.http.get("/videos").json() == listing
        assert api.ingest_ok(f"{media_url}/a.mp4?again", "keep")["status"] == "url_alias"
        # the perceptual hashes survived too
        small = api.ingest_ok(f"{media_url}/a_small.mp4", "keep")
        assert (small["status"], small["hash"]) == ("duplicate", a["hash"])
        api.close()


def test_startup_cleans_temp_files_orphans_and_dangling_records(
        tmp_path: Path, media_url: str, videos: dict[str, Path]) -> None:
    data = tmp_path / "data"
    with VidcacheServer(data) as server:
        api = Api(server.url)
        b = api.ingest_ok(f"{media_url}/b.mp4", "rec")
        c = api.ingest_ok(f"{media_url}/c.mkv", "rec")
        api.close()

    # what a crash (or an operator) may leave behind
    tmp = data / ".vidcache" / "tmp"
    (tmp / "download-1234.part").write_bytes(b"partial" * 1000)
    (tmp / "frames-xyz").mkdir()
    (tmp / "frames-xyz" / "0.gray").write_bytes(b"\0" * 4096)
    orphan_hash = "ab" * 32
    orphan = data / "rec" / "ab" / "abab" / f"{orphan_hash}.mp4"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"moved into place, record never committed")
    unrelated = data / "rec" / "NOTES.txt"
    unrelated.write_text("not ours to delete")
    (data / c["file_path"]).unlink()  # a record whose blob is gone

    with VidcacheServer(data) as server:
        api = Api(server.url)
        assert temp_files(data) == []
        assert not orphan.exists() and not orphan.parent.exists()
        assert unrelated.exists()
        assert "start-up recovery" in server.log()
        assert api.http.get(f"/video/{b['hash']}").content == videos["b.mp4"].read_bytes()
        assert api.meta(c["hash"]).status_code == 404
        assert api.http.get("/resolve", params={"url": f"{media_url}/c.mkv"}).status_code == 404
        assert api.ingest_ok(f"{media_url}/c.mkv", "rec")["status"] == "new"
        assert sorted(p.name for p in blob_files(data)) == sorted(
            [f"{b['hash']}.mp4", f"{c['hash']}.mkv", "NOTES.txt"])
        api.close()


def test_startup_recovery_of_many_videos_walks_their_blobs_once(tmp_path: Path) -> None:
    """At every start the recovery stat-ed each record's blob, tried to remove every directory
    of the data directory (at 100 000 videos: 52 000 rmdirs, all failing but for the empty
    ones) and committed (fsync) the removal of each record whose blob was gone, one by one:
    2.6 s of CPU, now 1.1 s; and 5 000 such records of 20 000 took 2.4 s, now 0.8 s. What it
    removes is unchanged."""
    data = tmp_path / "data"
    hashes = store_many(data, 3000)
    gone = hashes[:300]
    for content_hash in gone:
        (data / blob_relpath("many", "", content_hash, "mp4")).unlink()
    orphan = data / "many" / "ab" / "ab" / f"{'ab' * 32}.mp4"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"moved into place, record never committed")
    (data / "many" / "empty" / "left").mkdir(parents=True)  # by a delete cut short
    directories = sum(1 for path in data.rglob("*") if path.is_dir())

    report, calls = _open_counting(data)
    assert report == RecoveryReport(temp_files=0, orphan_blobs=1, records_without_blob=300)
    assert calls["commit"] == 1, calls  # one per record removed: 300
    assert calls["stat"] == 300, calls  # one per record not walked past: 3000 (all)
    # only the directories left empty (those above, their parents when emptied too)
    removed = directories - sum(1 for path in data.rglob("*") if path.is_dir())
    assert calls["rmdir"] == removed, (calls, removed)  # every directory tried: ~2700
    assert not orphan.exists()
    bucket = data / "many"
    assert [path for path in bucket.rglob("*") if path.is_dir() and not any(path.iterdir())] == []
    store = Store(data)
    store.open()
    try:
        assert store.count() == 2700 and all(store.get(h) is None for h in gone)
        assert store.get(hashes[-1]) is not None
    finally:
        store.close()

    report, calls = _open_counting(data)
    assert report == RecoveryReport(temp_files=0, orphan_blobs=0, records_without_blob=0)
    assert calls == {"stat": 0, "rmdir": 0, "commit": 0}, calls


def test_startup_recovery_keeps_blobs_behind_a_symlinked_directory(tmp_path: Path) -> None:
    """An operator who moved part of a bucket to another disk and left a symlink keeps its
    videos: the recovery's walk does not follow symlinks, and a record it did not pass is
    checked on its own before it is removed (was: removed)."""
    data = tmp_path / "data"
    hashes = store_many(data, 20)
    moved = (data / blob_relpath("many", "", hashes[0], "mp4")).parent
    elsewhere = tmp_path / "other-disk" / moved.name
    elsewhere.parent.mkdir()
    shutil.move(moved, elsewhere)
    moved.symlink_to(elsewhere, target_is_directory=True)
    behind = [h for h in hashes if (elsewhere / f"{h}.mp4").exists()]
    store = Store(data)
    report = store.open()
    try:
        assert report == RecoveryReport(temp_files=0, orphan_blobs=0, records_without_blob=0)
        assert store.count() == 20 and all(store.get(h) is not None for h in behind)
    finally:
        store.close()


def _open_counting(data: Path) -> tuple[RecoveryReport, dict[str, int]]:
    """Open (and close) the store of `data`, counting the stats of its blobs, the rmdirs and
    the transactions committed."""
    calls = {"stat": 0, "rmdir": 0, "commit": 0}

    def counted(name: str, call: Any) -> Any:
        def wrapper(path: Any, *args: Any, **kwargs: Any) -> Any:
            if name != "stat" or str(path).endswith(".mp4"):  # a blob's
                calls[name] += 1
            return call(path, *args, **kwargs)
        return wrapper

    transaction = Store._transaction

    @contextlib.contextmanager
    def counted_transaction(self: Store) -> Iterator[None]:
        with transaction(self):
            yield
        calls["commit"] += 1

    store = Store(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "stat", counted("stat", os.stat))
        patch.setattr(os, "rmdir", counted("rmdir", os.rmdir))
        patch.setattr(Store, "_transaction", counted_transaction)
        report = store.open()
    store.close()
    return report, calls


def test_crash_during_download_leaves_nothing(tmp_path: Path, videos: dict[str, Path]) -> None:
    data = tmp_path / "data"
    outcome: list[object] = []
    with serve_origin(videos["big.mp4"].parent) as (origin, stalled):
        server = VidcacheServer(data).start()
        try:
            url = f"{origin}/stall/big.mp4"

            def ingest() -> None:
                try:
                    outcome.append(httpx.post(f"{server.url}/ingest", timeout=60,
                                              json={"url": url, "bucket": "crash"}))
                except httpx.HTTPError as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=ingest)
            thread.start()
            assert stalled.wait(timeout=30)
            wait_until(lambda: temp_files(data), timeout=30, what="a partial download")
            server.kill()
            thread.join(timeout=30)
        finally:
            server.stop()
    assert isinstance(outcome[0], httpx.HTTPError)  # the connection died with the server

    with VidcacheServer(data) as restarted:
        assert temp_files(data) == []
        assert blob_files(data) == []
        assert httpx.get(f"{restarted.url}/videos").json() == {"items": [], "next": None}
        assert httpx.get(f"{restarted.url}/resolve", params={"url": url}).status_code == 404


def test_credentials_in_an_older_index_are_cut_at_start(tmp_path: Path,
                                                        media_url: str) -> None:
    """An index written before aliases were stored without `user:password@` holds them: the
    service cuts them when it opens the data directory, and where two aliases become one it
    keeps the older; nothing in `.vidcache` holds the password after (it stayed there, and the
    URL without them was another alias, resolving elsewhere or not at all)."""
    data = tmp_path / "data"
    with VidcacheServer(data) as server:
        api = Api(server.url)
        b = api.ingest_ok(f"{media_url}/b.mp4", "old")["hash"]
        c = api.ingest_ok(f"{media_url}/c.mkv", "old")["hash"]
        api.close()
    with_credentials = media_url.replace("http://", "http://user:s3cr3t@")
    # as an older version stored them, oldest first
    older = [("http://user:s3cr3t@h.test/x.mp4", b),  # cut
             (f"{with_credentials}/b.mp4", b),  # cut: b.mp4's alias, which is older
             ("http://user:s3cr3t@h.test/y.mp4", c),  # cut: older than the next one
             ("http://h.test/y.mp4", b)]
    index = sqlite3.connect(data / ".vidcache" / "index.sqlite3")
    index.execute("PRAGMA secure_delete = OFF")  # the default of SQLite's own builds
    with index:
        index.executemany("INSERT INTO url_aliases (url, hash, added_at) VALUES (?, ?, "
                          "'2025-01-31T12:00:00.000Z')",
                          [*older, ("http://user:s3cr3t@h.test/gone.mp4", b)])
        # deleted (as a deleted video's aliases are): its text stays in the file's free space
        index.execute("DELETE FROM url_aliases WHERE url LIKE '%gone.mp4'")
        index.execute("PRAGMA user_version = 0")
    index.close()
    assert any(b"s3cr3t" in path.read_bytes() for path in (data / ".vidcache").rglob("*")
               if path.is_file())

    with VidcacheServer(data) as server:
        api = Api(server.url)
        assert api.meta(b).json()["aliases"] == [f"{media_url}/b.mp4", "http://h.test/x.mp4"]
        assert api.meta(c).json()["aliases"] == [f"{media_url}/c.mkv", "http://h.test/y.mp4"]
        for url, video in ((f"{with_credentials}/b.mp4", b), ("http://h.test/x.mp4", b),
                           ("http://other:pw@h.test/y.mp4", c)):
            assert api.http.get("/resolve", params={"url": url}).json()["hash"] == video, url
            # h.test does not resolve: nothing is downloaded
            assert api.ingest_ok(url, "old")["status"] == "url_alias", url
        leaks = [path for path in (data / ".vidcache").rglob("*")
                 if path.is_file() and b"s3cr3t" in path.read_bytes()]
        assert leaks == []
        assert "removed the credentials from 3 URL aliases" in server.log()
        api.close()


def _index_descriptors() -> list[str]:
    """The files of an index (the -wal and -shm too) this process has descriptors open on."""
    return [target for target in open_descriptors("self")
            if "/.vidcache/index.sqlite3" in target]


def _opens_with(data: Path, count: int) -> bool:
    """Whether the data directory opens (again) and holds `count` videos."""
    store = Store(data)
    store.open()
    try:
        return store.count() == count
    finally:
        store.close()


def test_a_failed_migration_lets_go_of_the_index(tmp_path: Path) -> None:
    """An index of version 2 holding an alias that is not text (a BLOB another program wrote):
    the migration's rewrite of the aliases fails with a TypeError, no error of the index's
    (which open() would have translated). open() raises it and lets go of the data directory:
    no descriptor left on the index's files, and, the alias removed, the directory opens in
    this process again and is migrated. (Before: the write connection stayed open, on the
    index and its -wal and -shm, and so did the directory's lock: the second open() was
    'DIR is in use by another vidcache process'.)"""
    data = tmp_path / "data"
    store_many(data, 3)
    index = data / ".vidcache" / "index.sqlite3"
    with contextlib.closing(sqlite3.connect(index)) as db, db:
        db.execute("INSERT INTO url_aliases (url, hash, added_at) SELECT ?, hash, "
                   "'2025-01-31T12:00:00.000Z' FROM videos LIMIT 1",
                   (b"http://h.test/v.mp4?token=1",))
        db.execute("PRAGMA user_version = 2")
    assert _index_descriptors() == []
    with pytest.raises(TypeError):
        Store(data).open()
    assert _index_descriptors() == []

    with contextlib.closing(sqlite3.connect(index)) as db, db:
        db.execute("DELETE FROM url_aliases WHERE typeof(url) = 'blob'")
    assert _opens_with(data, 3)
    assert _index_descriptors() == []
    with contextlib.closing(sqlite3.connect(index)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)


def test_a_reader_failing_at_open_lets_go_of_the_index(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The third read connection's PRAGMA query_only failing (SQLite out of memory, which
    Python raises as MemoryError; no real fault on this machine makes that pragma fail, it
    touches no file, so a connection's execute is made to fail): open() raises it and leaves
    no descriptor on the index, neither the readers opened before nor the one that failed, and
    the directory opens again. (Before: the failing reader's descriptor was left open.) A
    connect failing instead (RLIMIT_NOFILE) left none already."""
    data = tmp_path / "data"
    store_many(data, 3)

    class OutOfMemory(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql == "PRAGMA query_only = ON":
                raise MemoryError()
            return super().execute(sql, *args)

    connect = Store._connect
    connections = [0]

    def failing_third_reader(store: Store) -> sqlite3.Connection:
        connections[0] += 1  # the write connection, then the readers
        if connections[0] < 4:
            return connect(store)
        return sqlite3.connect(store.internal_dir / "index.sqlite3", check_same_thread=False,
                               isolation_level=None, factory=OutOfMemory)

    monkeypatch.setattr(Store, "_connect", failing_third_reader)
    assert _index_descriptors() == []
    with pytest.raises(MemoryError):
        Store(data).open()
    assert connections[0] == 4
    assert _index_descriptors() == []
    monkeypatch.undo()
    assert _opens_with(data, 3)


def test_one_server_per_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with VidcacheServer(data):
        second = subprocess.run(
            [sys.executable, "-m", "vidcache", "serve", "--data", str(data), "--port",
             str(free_port())], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "in use by another vidcache" in second.stderr


def test_blob_bytes_on_disk_are_the_source(tmp_path: Path, media_url: str,
                                           videos: dict[str, Path]) -> None:
    data = tmp_path / "data"
    with VidcacheServer(data) as server:
        api = Api(server.url)
        result = api.ingest_ok(f"{media_url}/b.mp4", "disk", prefix="pre")
        api.close()
    blob = data / result["file_path"]
    assert blob.read_bytes() == videos["b.mp4"].read_bytes()
    assert digest(blob.read_bytes()) == result["hash"]
    assert blob.stat().st_mode & 0o444 == 0o444  # readable by whoever serves the directory
