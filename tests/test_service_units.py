"""Pure parts of the vidcache service, tested without a server: size parsing, the host guard,
the stoppable resolver (its threads and their cap), bucket/prefix rules, perceptual-hash
arithmetic, named locks, hashing while downloading (at any allowed chunk size), the chunk-size
rule, the listing's query plans, the JSON answer to an unexpected server error (which a
healthy real server cannot produce) and to a thread refused once an answer is under way (which
a real one cannot be made to refuse just then), credentials cut from an ingest's shown URL, the
wording of `vidcache ingest`'s progress line, and the bound on the serving path's blob index."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import logging
import socket
import sqlite3
import tempfile
import threading
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send

from tests.support import wait_until
from vcfs.paths import video_name
from vidcache import serving
from vidcache.app import create_app
from vidcache.chunks import DEFAULT_CHUNK_SIZE, DIGEST_SIZE, KIB, MIB, check_chunk_size
from vidcache.cli import _default_name, build_parser, parse_size
from vidcache.config import GIB, ServiceConfig
from vidcache.content_coding import PIECE_SIZE, EncodingError, decoded
from vidcache.download import _HashingWriter
from vidcache.errors import (
    IndexUnreadable,
    IngestRefused,
    InvalidRequest,
    MediaToolError,
    ShuttingDown,
    StorageError,
    TooLarge,
    VidcacheError,
)
from vidcache.failure_log import FailureLog
from vidcache.frame_check import size as compared_at
from vidcache.hostguard import HostGuard
from vidcache.locks import KeyedLocks
from vidcache.media import UNIFORM_FRAMES, MediaInfo, decode_phash, encode_phash, near_duplicate
from vidcache.progress_line import _Rate, describe
from vidcache.resolver import AddrInfo, StoppableResolver
from vidcache.space import FreeSpace
from vidcache.store import (
    INDEX_FILE,
    WAL_SIZE_LIMIT,
    NewVideo,
    Store,
    _index_error,
    blob_relpath,
    check_location,
)
from vidcache.thread_refusals import ThreadRefusals
from vidcache.tools import Tools
from vidcache_client import IngestUnderWay
from vidcache_client._credentials import without_credentials

with warnings.catch_warnings():  # Starlette's notice that it prefers httpx2 for TestClient
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.mark.parametrize(("text", "size"), [
    ("1", 1), ("100000", 100_000), ("4G", 4 * 1024**3), ("500M", 500 * 1024**2),
    ("1.5GiB", 3 * 1024**3 // 2), ("64k", 65536), ("2TB", 2 * 1024**4),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "G", "-1", "4X", "1e9", "lots"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


@pytest.mark.parametrize(("host", "category"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.1", "private"),
    ("192.168.1.2", "private"), ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"),
    ("::ffff:127.0.0.1", "loopback"), ("fe80::1", "link-local"), ("100.64.0.1", "non-public"),
])
def test_host_guard_refuses_non_public_addresses(host: str, category: str) -> None:
    with pytest.raises(IngestRefused, match=f"{category}.*--ingest-allow"):
        HostGuard([]).address_for(host, 80)


def test_host_guard_allows_public_and_listed_addresses() -> None:
    assert HostGuard([]).address_for("93.184.216.34", 80) == "93.184.216.34"
    guard = HostGuard(["127.0.0.1", "10.0.0.0/8", " ", "media.internal"])
    assert guard.address_for("127.0.0.1", 80) == "127.0.0.1"
    assert guard.address_for("10.20.30.40", 80) == "10.20.30.40"
    with pytest.raises(IngestRefused):
        guard.address_for("127.0.0.2", 80)
    # a name on the list is allowed whatever it resolves to
    assert HostGuard(["localhost"]).address_for("localhost", 80) in ("127.0.0.1", "::1")


@pytest.mark.parametrize("entry", ["not a host", "10.0.0.0/33", "http://x"])
def test_host_guard_refuses_bad_allow_entries(entry: str) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        HostGuard([entry])



class _HeldLookup:
    """A resolver's lookup that waits until `release` is set; `hosts` it was asked for."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hosts: list[str] = []

    def __call__(self, host: str, port: int) -> list[AddrInfo]:
        self.hosts.append(host)
        self.release.wait(timeout=120)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]


def _resolving(resolver: StoppableResolver, host: str, outcome: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            outcome.append(resolver.resolve(host, 80, timeout=120))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_stopped_resolver_ends_the_resolutions_waiting_and_refuses_new_ones() -> None:
    """One resolution waits for its lookup, a second for a thread to look up in: the stop
    ends both with ShuttingDown at once, and the lookup left waiting is a daemon thread (it
    does not hold up the interpreter's exit)."""
    lookup = _HeldLookup()
    resolver = StoppableResolver(lookup, max_lookups=1)
    outcome: list[object] = []
    try:
        first = _resolving(resolver, "a.test", outcome)
        wait_until(lambda: lookup.hosts == ["a.test"], timeout=30, what="the lookup waiting")
        second = _resolving(resolver, "b.test", outcome)
        resolver.stop()
        for thread in (first, second):
            thread.join(timeout=30)
            assert not thread.is_alive(), "a resolution still waits after the stop"
        assert [type(exc) for exc in outcome] == [ShuttingDown, ShuttingDown], outcome
        held = [t for t in threading.enumerate() if t.name == "resolve a.test"]
        assert [t.daemon for t in held] == [True]
        with pytest.raises(ShuttingDown):
            resolver.resolve("c.test", 80, timeout=30)
        assert lookup.hosts == ["a.test"]
    finally:
        lookup.release.set()
    wait_until(lambda: not any(t.name == "resolve a.test" for t in threading.enumerate()),
               timeout=30, what="the lookup's thread ended")


def test_resolver_threads_are_capped_even_for_lookups_given_up_on() -> None:
    """A resolution that timed out leaves its lookup running, in its thread; with the cap's
    one thread so held, the next resolution waits for it (and times out) rather than start
    another, and gets it once the lookup has ended."""
    lookup = _HeldLookup()
    resolver = StoppableResolver(lookup, max_lookups=1)
    try:
        with pytest.raises(TimeoutError):
            resolver.resolve("a.test", 80, timeout=0.1)
        wait_until(lambda: lookup.hosts == ["a.test"], timeout=30, what="the lookup waiting")
        with pytest.raises(TimeoutError):
            resolver.resolve("b.test", 80, timeout=0.1)
        assert lookup.hosts == ["a.test"]
    finally:
        lookup.release.set()
    assert resolver.resolve("c.test", 80, timeout=30)[0][4] == ("192.0.2.1", 80)
    assert lookup.hosts == ["a.test", "c.test"]

@pytest.mark.parametrize(("bucket", "prefix"), [
    ("videos", ""), ("v_1.backup-2", "2024"), ("a", "b.c"), ("x" * 128, "y" * 128)])
def test_simple_segments_are_accepted(bucket: str, prefix: str) -> None:
    check_location(bucket, prefix)


@pytest.mark.parametrize(("bucket", "prefix"), [
    ("", ""), ("..", ""), (".vidcache", ""), ("a/b", ""), ("/", ""), ("a\\b", ""),
    ("é", ""), ("x" * 129, ""), ("ok", "."), ("ok", "a/b"), ("ok", "/abs"), ("ok", "a\0"),
])
def test_path_like_segments_are_refused(bucket: str, prefix: str) -> None:
    with pytest.raises(InvalidRequest, match="bucket" if not prefix else "prefix"):
        check_location(bucket, prefix)


def test_blob_layout() -> None:
    h = "0123456789abcdef" * 4
    assert blob_relpath("b", "", h, "mp4") == f"b/01/23/{h}.mp4"
    assert blob_relpath("b", "p", h, "mkv") == f"b/p/01/23/{h}.mkv"


def _listing_plans(store: Store, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """SQLite's plan of each filtered listing query the store makes, first page and later
    (`store` is opened here, closed before)."""
    statements: list[str] = []
    connect = store._connect

    def traced() -> sqlite3.Connection:  # the read connections too, opened with the index
        connection = connect()
        connection.set_trace_callback(statements.append)
        return connection

    monkeypatch.setattr(store, "_connect", traced)
    store.open()
    filters = (("b", None), (None, ""), (None, "p"), ("b", "p"))  # (bucket, prefix)
    for (bucket, prefix), after in itertools.product(filters, (None, "8" * 64)):
        store.list_videos(bucket=bucket, prefix=prefix, after=after, limit=100,
                          max_meta_bytes=1 << 20)
    return {sql: [row[3] for row in store.db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            for sql in statements if sql.startswith("SELECT hash, bucket")}


def test_listing_pages_are_read_in_order_from_an_index(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A page of a bucket or prefix is read from an index in hash order, from the cursor on:
    with the whole filter sorted per page (TEMP B-TREE), listing a bucket of 100 000 videos
    took 17 s instead of 3. A data directory made before these indexes gets them at start."""
    store = Store(tmp_path / "data")
    store.open()
    store.db.executescript("DROP INDEX IF EXISTS videos_bucket; "
                           "DROP INDEX IF EXISTS videos_prefix;")
    store.close()
    try:
        plans = _listing_plans(store, monkeypatch)
        assert len(plans) == 8
        for sql, plan in plans.items():
            assert not any("TEMP B-TREE" in step for step in plan), (sql, plan)
            filtered = [column for column in ("bucket", "prefix") if f"{column} = " in sql]
            assert len(plan) == 1 and plan[0].startswith("SEARCH"), (sql, plan)
            assert all(f"{column}=?" in plan[0] for column in filtered), (sql, plan)
    finally:
        store.close()


def _add_a_4_gib_video(store: Store, number: int) -> None:
    """A record as an ingest of a 4 GiB video in 64 KiB chunks commits: 2 MiB of digests."""
    size, chunk_size = 4 * GIB, 64 * KIB
    content_hash = blake3(f"4 GiB video {number}".encode()).hexdigest()
    blob = store.tmp_dir / content_hash
    blob.write_bytes(b"")  # the record's size is what the index holds
    store.add_video(NewVideo(content_hash=content_hash, bucket="b", prefix="", extension="mp4",
                             size_bytes=size, duration_s=3600.0, mime_type="video/mp4", meta={},
                             phash="", chunk_size=chunk_size,
                             chunk_digests=bytes(size // chunk_size * DIGEST_SIZE)),
                    url=f"http://media.test/{number}.mp4", temp_path=blob)


def test_the_index_write_ahead_log_shrinks_back_once_a_long_read_ends(tmp_path: Path) -> None:
    """Writes made while a read holds its snapshot (big videos' digests, 10 MiB of them) grow
    the index's WAL past WAL_SIZE_LIMIT: SQLite cannot start the log over under that read. Once
    the read has ended, the next commits (one after which the log is copied whole into the
    index, one that starts it over) cut the file back to the limit. (Before: it stayed at its
    largest, 10.8 MB here, for the server's life.)"""
    store = Store(tmp_path / "data")
    store.open()
    wal = store.internal_dir / f"{INDEX_FILE}-wal"
    try:
        with store._reading() as reader:
            reader.execute("SELECT count(*) FROM videos").fetchone()  # its snapshot taken
            for number in range(5):
                _add_a_4_gib_video(store, number)
        assert wal.stat().st_size > WAL_SIZE_LIMIT
        hash_0 = blake3(b"4 GiB video 0").hexdigest()
        aliases = itertools.count()

        def written_and_shrunk() -> bool:
            store.add_alias(f"http://media.test/alias-{next(aliases)}.mp4", hash_0)
            return wal.stat().st_size <= WAL_SIZE_LIMIT

        wait_until(written_and_shrunk, timeout=10, what="the WAL cut back to its limit")
        assert store.count() == 5
    finally:
        store.close()


def test_the_index_wal_index_follows_the_largest_log_and_no_more(tmp_path: Path) -> None:
    """The -shm (the WAL's index) is never cut while the store is open, but it is sized by the
    most frames the log has held at once, not by what it has written: 32 KiB, and a block of
    32 KiB more per 4096 frames past the first 4062. Many writes one after another keep it at
    one block; the same burst under a long read, twice, leaves it at the first burst's size."""
    store = Store(tmp_path / "data")
    store.open()
    wal, shm = (store.internal_dir / f"{INDEX_FILE}-{suffix}" for suffix in ("wal", "shm"))
    numbers = itertools.count()
    hash_0 = blake3(b"4 GiB video 0").hexdigest()
    aliases = itertools.count()

    def written_and_shrunk() -> bool:
        store.add_alias(f"http://media.test/alias-{next(aliases)}.mp4", hash_0)
        return wal.stat().st_size <= WAL_SIZE_LIMIT

    def blocks_for(wal_size: int) -> int:
        frames = (wal_size - 32) // (4096 + 24)  # the log's header, then a header per page
        return 1 + -(-max(0, frames - 4062) // 4096)

    try:
        for _ in range(30):  # 60 MiB, checkpointed as it goes
            _add_a_4_gib_video(store, next(numbers))
        assert shm.stat().st_size == 32 * KIB
        largest_logs, sizes = [], []
        for _burst in range(2):
            with store._reading() as reader:
                reader.execute("SELECT count(*) FROM videos").fetchone()  # its snapshot taken
                for _ in range(20):
                    _add_a_4_gib_video(store, next(numbers))
                largest_logs.append(wal.stat().st_size)
            wait_until(written_and_shrunk, timeout=10, what="the WAL cut back to its limit")
            sizes.append(shm.stat().st_size)
        assert sizes[0] == blocks_for(largest_logs[0]) * 32 * KIB > 32 * KIB
        assert blocks_for(largest_logs[1]) == blocks_for(largest_logs[0])
        assert sizes[1] == sizes[0]
    finally:
        store.close()


def test_near_duplicate_is_the_mean_over_the_frames_compared() -> None:
    black, grey = UNIFORM_FRAMES
    a = (0x5, 0xFF, None, black, 0xF0, 0x1234, black, grey)
    b = (0x5, 0x0F, 0x1, 0xFFFF, 0xF0, 0x1234, black, 0xFF)
    assert near_duplicate(a, 10.0, a, 10.0, 0) == 0
    # None and two uniform frames are not compared, a uniform and a textured one are:
    # 0, 4, 16, 0, 0, 9 bits
    assert near_duplicate(a, 10.0, b, 10.0, 10) == round(29 / 6)
    assert near_duplicate(a, 10.0, b, 10.0, 7) is None  # 16 bits is more than twice 7
    assert near_duplicate(a, 10.0, b, 10.5, 10) == 5  # durations 0.5 s apart: alike
    assert near_duplicate(a, 10.0, b, 10.51, 10) is None
    assert near_duplicate(a, 200.0, b, 201.0, 10) == 5  # 0.5 % of the longer
    assert near_duplicate(a, 200.0, b, 201.1, 10) is None
    # fewer than half the frames compared: black or grey on both sides says nothing
    assert near_duplicate((black, grey, black, 0x5), 10.0, (black, grey, grey, 0x5), 10.0,
                          64) is None
    assert near_duplicate((None, None), 10.0, (1, 2), 10.0, 64) is None
    assert decode_phash(encode_phash((*b, None))) == (*b, None)
    assert encode_phash((0xF, None)) == "000000000000000f,-"


def test_keyed_locks_serialise_one_key_only() -> None:
    locks = KeyedLocks()
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def holder() -> None:
        with locks.hold("k"):
            inside.set()
            release.wait(timeout=10)
            order.append("first")

    thread = threading.Thread(target=holder)
    thread.start()
    assert inside.wait(timeout=10)
    with locks.hold("other"):  # another key does not wait
        order.append("other")
    release.set()
    with locks.hold("k"):
        order.append("second")
    thread.join(timeout=10)
    assert order == ["other", "first", "second"]
    assert len(locks) == 0  # nothing left behind once nobody holds a key


@settings(max_examples=60, deadline=None)
@given(chunk_size=st.sampled_from([64 * KIB, 256 * KIB, MIB]),
       chunks=st.sampled_from([0, 1, 2, 3]), extra=st.sampled_from([-1, 0, 1, 12345]),
       cuts=st.lists(st.integers(min_value=0, max_value=4 * MIB), max_size=6))
def test_hashing_writer_digests_whatever_the_write_sizes(chunk_size: int, chunks: int,
                                                         extra: int, cuts: list[int]) -> None:
    size = max(chunks * chunk_size + extra, 0)
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    directory = Path(tempfile.gettempdir())
    with tempfile.TemporaryFile() as sink, FreeSpace(directory, chunk_size).claim() as claim:
        writer = _HashingWriter(sink, max_size=size, url="test", chunk_size=chunk_size,
                                directory=directory, claim=claim)
        points = sorted({c for c in cuts if c < size} | {0, size})
        for start, end in itertools.pairwise(points):
            writer.write(data[start:end])
        content_hash, digests = writer.finish()
        with pytest.raises(TooLarge, match="--max-size"):
            writer.write(b"1")
        sink.seek(0)
        assert sink.read() == data
    assert content_hash == blake3(data).hexdigest()
    assert digests == b"".join(blake3(data[i:i + chunk_size]).digest()
                               for i in range(0, size, chunk_size))


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


_TEXT = bytes(range(256)) * 64 + bytes(3 * MIB) + b"end"  # zeros: a high ratio, as a bomb's
_CODED = {"gzip": gzip.compress(_TEXT), "deflate": zlib.compress(_TEXT),
          "raw deflate": _raw_deflate(_TEXT)}


@settings(max_examples=60, deadline=None)
@given(how=st.sampled_from(sorted(_CODED)),
       cuts=st.lists(st.integers(min_value=0, max_value=8 * KIB), max_size=6))
def test_an_encoded_body_is_decoded_in_bounded_pieces(how: str, cuts: list[int]) -> None:
    """Whatever the pieces received (one byte first included: raw deflate then failed as zlib's
    format in httpx's decoder), the bytes come back whole, none of their pieces longer than
    PIECE_SIZE (httpx gave 3 MiB at once)."""
    encoded = _CODED[how]
    points = sorted({c for c in cuts if c < len(encoded)} | {0, len(encoded)})
    pieces = [encoded[start:end] for start, end in itertools.pairwise(points)]
    out = list(decoded(pieces, ["deflate" if how == "raw deflate" else how]))
    assert b"".join(out) == _TEXT
    assert max(map(len, out)) <= PIECE_SIZE


@pytest.mark.parametrize("codings", [["gzip"], ["deflate"], ["deflate", "gzip"]])
@pytest.mark.parametrize("pieces", [[], [b""]], ids=["no-piece", "empty-piece"])
def test_an_empty_encoded_body_decodes_to_nothing(codings: list[str],
                                                  pieces: list[bytes]) -> None:
    """An empty body (Content-Length: 0, or chunked with no data) holds no stream to be cut
    short; the first byte of a stream is one cut short."""
    assert list(decoded(pieces, codings)) == []
    outer = codings[-1]
    first = (gzip.compress(b"") if outer == "gzip" else zlib.compress(b""))[:1]
    with pytest.raises(EncodingError, match=f"the {outer} stream ends early"):
        list(decoded([first], [outer]))


@pytest.mark.parametrize("size", [64 * KIB, 128 * KIB, 256 * KIB, MIB, 16 * MIB])
def test_chunk_sizes_are_powers_of_two_in_range(size: int) -> None:
    assert check_chunk_size(size) == size
    assert ServiceConfig(data_dir=Path("unused"), chunk_size=size).chunk_size == size


@pytest.mark.parametrize("size", [0, 4 * KIB, 32 * KIB, 96 * KIB, 1000 * KIB, 32 * MIB])
def test_other_chunk_sizes_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="power of two from 64 KiB to 16 MiB"):
        check_chunk_size(size)
    with pytest.raises(ValueError, match="power of two"):
        ServiceConfig(data_dir=Path("unused"), chunk_size=size)


def test_serve_takes_a_chunk_size() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "--data", "d"]).chunk_size == DEFAULT_CHUNK_SIZE
    assert parser.parse_args(["serve", "--data", "d", "--chunk-size", "1M"]).chunk_size == MIB
    assert parser.parse_args(["serve", "--data", "d", "--chunk-size", "131072"]).chunk_size \
        == 128 * KIB


def test_serve_takes_a_media_memory_cap_or_none() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "--data", "d"]).media_memory == 3 * GIB
    assert parser.parse_args(["serve", "--data", "d", "--media-memory", "512M"]).media_memory \
        == 512 * MIB
    assert parser.parse_args(["serve", "--data", "d", "--media-memory", "0"]).media_memory \
        is None


def test_serve_refuses_a_media_memory_cap_ffprobe_cannot_start_in(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--data", "d", "--media-memory", "64M"])
    assert exited.value.code == 2
    assert ("--media-memory: must be at least 128M (ffprobe alone needs 56 MiB, and fails "
            "without a word below), or 0 for no cap, not '64M'") in capsys.readouterr().err


@pytest.mark.parametrize("text", ["32K", "64M", "lots"])
def test_serve_refuses_a_bad_chunk_size(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--data", "d", "--chunk-size", text])
    assert exited.value.code == 2
    assert "--chunk-size" in capsys.readouterr().err


def test_unexpected_errors_are_json_500(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_self: Store) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Store, "count", broken)
    app = create_app(ServiceConfig(data_dir=tmp_path / "data"))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/health")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error; the server log has details"}


def test_a_thread_refused_once_the_answer_began_cuts_it_short_with_a_line(
        caplog: pytest.LogCaptureFixture) -> None:
    """A thread refused after the answer's headers went (a file read of FileResponse): no 503
    can follow them, so the answer is cut short (uvicorn closes the connection, the client
    sees fewer bytes than announced), with a line naming the request, not a traceback."""
    sent: list[Message] = []
    start: Message = {"type": "http.response.start", "status": 206,
                      "headers": [(b"content-length", b"1024")]}

    async def answer_then_refused(_scope: Scope, _receive: Receive, send: Send) -> None:
        await send(start)
        raise RuntimeError("can't start new thread")

    async def record(message: Message) -> None:
        sent.append(message)

    async def disconnected() -> Message:
        return {"type": "http.disconnect"}

    refusals = ThreadRefusals(answer_then_refused,
                              failures=FailureLog(logging.getLogger("vidcache.app")))
    scope: Scope = {"type": "http", "method": "GET", "path": "/video/" + "0" * 64}
    with caplog.at_level(logging.WARNING, logger="vidcache.app"):
        asyncio.run(refusals(scope, disconnected, record))
    assert sent == [start]
    assert caplog.messages == [
        f"GET /video/{'0' * 64} cut short: the server is out of threads: a limit on threads "
        "(ulimit -u, the cgroup's pids.max) or on the memory for their stacks (ulimit -d, "
        "ulimit -v) is reached; try again"]


@pytest.mark.parametrize(("code", "reading", "error"), [
    (sqlite3.SQLITE_IOERR_READ, True, IndexUnreadable),
    (sqlite3.SQLITE_IOERR_SHORT_READ, True, IndexUnreadable),
    (sqlite3.SQLITE_IOERR_FSTAT, True, IndexUnreadable),  # any I/O error of a read
    (sqlite3.SQLITE_IOERR_READ, False, IndexUnreadable),  # a write's read of a page
    (sqlite3.SQLITE_CORRUPT_INDEX, False, IndexUnreadable),
    (sqlite3.SQLITE_IOERR_WRITE, False, StorageError),
    (sqlite3.SQLITE_CONSTRAINT_UNIQUE, False, None),  # a bug: passes as it is (500, traceback)
])
def test_sqlite_errors_of_the_index(tmp_path: Path, code: int, reading: bool,
                                    error: type[VidcacheError] | None) -> None:
    """A failing disk's read errors, which no disk here can be made to give (no device-mapper,
    no fault injection), are IndexUnreadable as a damaged index is
    (tests/test_service_index_errors.py): a 500 naming the index, not a 507 (the disk is not
    full) nor a bare 500."""
    raised = sqlite3.OperationalError("disk I/O error")
    raised.sqlite_errorcode = code
    translated = _index_error("read the index", tmp_path, raised, reading=reading)
    assert type(translated) is (type(None) if error is None else error)
    if error is IndexUnreadable:
        assert str(translated) == f"cannot read the index {tmp_path / INDEX_FILE}: disk I/O error"
        assert translated is not None and translated.status_code == 500


@pytest.mark.parametrize(("url", "shown"), [
    ("http://user:secret@host.test:8080/v.mp4?x=1", "http://host.test:8080/v.mp4?x=1"),
    ("https://user@host.test/v.mp4", "https://host.test/v.mp4"),
    ("http://a@b:c@host.test/v", "http://host.test/v"),  # up to the last '@', as httpx reads it
    ("http://us%40er:p%3Ass@[::1]:80/v", "http://[::1]:80/v"),
    ("HTTP://u:p@host.test", "HTTP://host.test"),
    ("http://host.test/path@x/v.mp4", "http://host.test/path@x/v.mp4"),
    ("http://host.test/v.mp4?q=a@b", "http://host.test/v.mp4?q=a@b"),
    ("http://host.test#a@b", "http://host.test#a@b"),
    ("file:///data/a@b.mp4", "file:///data/a@b.mp4"),
    # refused for a slip a browser forgives, the refusal showing the URL
    (" http://u:p@host.test/v", " http://host.test/v"),
    ("http:\\\\u:p@host.test\\v", "http:\\\\host.test\\v"),
])
def test_an_ingests_url_is_shown_without_credentials(url: str, shown: str) -> None:
    assert without_credentials(url) == shown
    assert httpx.URL(without_credentials(url)).userinfo == b""


@given(scheme=st.sampled_from(["http:", "HTTPS:", "file:", "x-1.a+b:", ":", ""]),
       userinfo=st.text(st.characters(exclude_characters="/?#", exclude_categories=["Cs"]),
                        min_size=1),
       rest=st.sampled_from(["host.test/v.mp4", "[::1]:8080", "host.test/a@b?c@d#e@f"]))
def test_whatever_httpx_reads_as_credentials_is_never_shown(scheme: str, userinfo: str,
                                                            rest: str) -> None:
    """Even after an empty scheme (':'), which httpx takes as one (the URL is then refused,
    the refusal showing it)."""
    url = f"{scheme}//{userinfo}@{rest}"
    assert without_credentials(url) == f"{scheme}//{rest}"


def _ingest(phase: str, received: int = 0, expected: int | None = None) -> IngestUnderWay:
    return IngestUnderWay("http://o.test/v.mp4", "b", "", phase, received, expected,
                          "2025-01-31T12:00:00.123Z")


@pytest.mark.parametrize(("ingest", "rate", "line"), [
    (None, None, "waiting for the service (52 s)"),
    (_ingest("downloading", 432_328_294, 1 << 30), 12_373_196.8,
     "downloading 412.3 of 1,024.0 MiB (40%), 11.8 MiB/s, 52 s"),
    (_ingest("downloading", 0, 1 << 30), 0.0,
     "downloading 0.0 of 1,024.0 MiB (0%), 0.0 KiB/s, 52 s"),  # stalled
    (_ingest("downloading", 51_200, 102_400), None, "downloading 50.0 of 100.0 KiB (50%), 52 s"),
    (_ingest("downloading", 3 << 20), 1536.0, "downloading 3.0 MiB, 1.5 KiB/s, 52 s"),
    (_ingest("queued"), None, "queued behind other ingests, 52 s"),
    (_ingest("validating", 10, 10), None, "validating (ffprobe), 52 s"),
    (_ingest("phash"), None, "perceptual hash (ffmpeg), 52 s"),
    (_ingest("storing"), None, "storing, 52 s"),
    (_ingest("a later phase"), None, "a later phase, 52 s"),
])
def test_the_progress_line_says_where_the_ingest_is(ingest: IngestUnderWay | None,
                                                    rate: float | None, line: str) -> None:
    assert describe(ingest, rate, 52.4) == f"vidcache ingest: {line}"


def test_the_download_rate_is_over_the_last_seconds_of_polls() -> None:
    rate = _Rate()
    assert rate.update(_ingest("downloading", 0), 100.0) is None  # one poll: no rate yet
    assert rate.update(_ingest("downloading", MIB), 101.0) == MIB
    for second in range(2, 10):  # 1 MiB/s, then it stalls: the rate falls to 0 within 5 s
        rate.update(_ingest("downloading", min(second, 4) * MIB), 100.0 + second)
    assert rate.update(_ingest("downloading", 4 * MIB), 110.0) == 0.0
    assert rate.update(_ingest("validating", 10, 10), 111.0) is None
    restarted = IngestUnderWay("http://o.test/v.mp4", "b", "", "downloading", 0, None,
                               "2025-01-31T12:05:00.000Z")
    assert rate.update(restarted, 112.0) is None  # another ingest of the URL: from scratch


def _video_of(width: int, height: int) -> MediaInfo:
    return MediaInfo(duration_s=6.0, container="mpegts", mime_type="video/mp2t",
                     extension="ts", video_stream=0, audio_stream=None, start_s=0.0,
                     pixel_rate=0.0, size=(width, height))


def test_the_frame_check_compares_at_the_size_known() -> None:
    """A video whose size media.probe could not find (0x0: no keyframe in its first 10 000
    packets) is compared at the other's size, not at 8x8 (a word unseen); with neither known
    the check cannot be made, and ingest stores the video apart."""
    assert compared_at(_video_of(0, 0), _video_of(1280, 720)) == (1280, 720)
    assert compared_at(_video_of(3840, 2160), _video_of(0, 0)) == (1920, 1080)
    assert compared_at(_video_of(640, 360), _video_of(1280, 720)) == (640, 360)
    with pytest.raises(MediaToolError):
        compared_at(_video_of(0, 0), _video_of(0, 0))


def test_a_tool_not_installed_is_the_servers_fault() -> None:
    """A decoder missing on the server says nothing about the video: 500 naming what to
    install (docs/service.md, "Ingest errors"), not 422 "not a video"."""
    with pytest.raises(MediaToolError, match="is not installed; install ffmpeg") as refused:
        Tools(timeout=5).run(["vidcache-test-no-such-tool", "-version"], what="the tool")
    assert refused.value.status_code == 500


@pytest.mark.parametrize("file_path", [
    "b/ab/cd/HASH.mp4", "b/HASH.MKV", "b/p/HASH.webm", "b/HASH", "b/HASH.tar.gz", "b/HASH.",
    "b/HASH.toolong99", "b/HASH.m-4", "", None])
def test_vidcache_get_names_a_video_as_vcfs_shows_it(file_path: str | None) -> None:
    """`vidcache get` without -o writes HASH.EXT "as vcfs names it" (its --help): the stored
    file's extension, lowercased, or .bin for one a name cannot carry (a vidcache 1.x may
    store a file without one). Was: the bare HASH, a name vcfs never shows."""
    content_hash = "ab" * 32
    assert (_default_name(content_hash, {"file_path": file_path})
            == video_name(content_hash, file_path))



class _BlobsOnDisk:
    """The two calls `BlobIndex` makes of its `Store`, answered from files in a folder (a
    real store of more than INDEX_CAPACITY videos would take minutes to fill)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, content_hash: str) -> SimpleNamespace | None:
        path = self.folder / content_hash
        return SimpleNamespace(path=path, mime_type="video/mp4") if path.exists() else None

    def blob_path(self, record: SimpleNamespace) -> Path:
        return Path(record.path)


def test_the_blob_index_keeps_the_videos_last_loaded_up_to_its_capacity(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each video loaded is kept for the next request's lookup, at most INDEX_CAPACITY of them
    (here 2), the one loaded first let go first; a forgotten one (deleted) is let go at once."""
    monkeypatch.setattr(serving, "INDEX_CAPACITY", 2)
    hashes = [f"{number:064x}" for number in range(3)]
    for content_hash in hashes:
        (tmp_path / content_hash).write_bytes(content_hash.encode())
    index = serving.BlobIndex(cast(Store, _BlobsOnDisk(tmp_path)))
    for content_hash in hashes:
        blob = index.load(content_hash)
        assert blob is not None and blob.size == 64
    assert [index.cached(h) is not None for h in hashes] == [False, True, True]
    index.forget(hashes[1])
    assert [index.cached(h) is not None for h in hashes] == [False, False, True]
    assert index.load(f"{9:064x}") is None  # not stored: nothing kept
    assert index.cached(f"{9:064x}") is None
