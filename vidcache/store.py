"""The cache's durable state: blob files under the data directory and their SQLite index.

Layout of the data directory DIR:

    DIR/<bucket>/<prefix>/<h[0:2]>/<h[2:4]>/<hash>.<ext>   blobs (no <prefix> level when empty)
    DIR/.vidcache/index.sqlite3                          index (WAL): videos, url_aliases
    DIR/.vidcache/tmp/                                   downloads in progress
    DIR/.vidcache/lock                                   flock: one server per data directory

Buckets and prefixes are single path segments that cannot start with '.', so no blob path can
reach `.vidcache` or leave DIR.

Invariant: a blob exists iff its record does. A new blob is renamed into place (atomic, same
file system as tmp/) and then its record committed; a deletion commits first and then unlinks.
A crash between the two steps leaves at most an orphan blob, which `open()` removes at the next
start-up together with every leftover temp file, once PRAGMA quick_check finds the index sound
(a damaged one can read as if it lacked records). The index itself is never rewritten to mend
it: SQLite's errors saying it cannot be read are IndexUnreadable, for the operator.

Concurrency: writes run one at a time, under the store's write lock and on its one write
connection, their file-system steps (mkdir, rename, the directory's fsync, unlink, pruning empty
folders) inside that lock too: no other write can rename, unlink or prune the same paths between
a write's two steps, so the order above holds without more coordination (the ingest pipeline
serialises its adds and deletes anyway). Reads never take that lock: each runs in a read
transaction (one committed snapshot) on a read connection of its own while it runs, one of
READ_CONNECTIONS opened with the index. In WAL mode a reader does not wait for the writer, so a
slow disk's fsyncs (the blob's directory, the WAL at commit) hold up the other writes only; a
read sees a video once its record is committed. A read may find a record whose blob a delete
unlinks next: callers already treat a blob missing at open as no such video.

Reads of many rows (a listing page, every perceptual hash) run one at a time, under the scan
lock, so they hold one connection at most and the reads of one video (/meta, /resolve, /chunks)
and the count always find another: with one read connection for all, a /meta waited for every
listing page before it (a get() of 100 000 videos took 14-19 ms beside a thread listing pages of
1000, 73-90 ms beside four, instead of 0.07-0.09). Not a connection per concurrent read, nor
scans at once: SQLite lets go of the GIL at every row, so scans at once passed it between
threads at every row (8 threads listing took twice the CPU per page and did half as many pages
as one at a time), and connections opened per read kept their page cache and descriptors for the
server's life.

A URL alias is the URL without its `user:password@` (sent to the origin, never kept): the same
URL with or without them is one alias. The value of each secret parameter of its query (a
signature, a token, a key: vidcache_client/_credentials.py) is kept as a digest of it,
`REDACTED-` and 32 hex digits of its BLAKE3: the origin needs the value itself, so the index
holds no credential, and yet two URLs that differ only there (`dl?token=A`, `dl?token=B`: two
videos, as like as not) stay two aliases, as the exact strings they were compared as before.
So too in a URL nested in the query (`fetch?url=https%3A...%3Ftoken%3DA`): its user info left
out, its secrets' values (as written, percent-encoded) digested.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from vidcache.chunks import DIGEST_SIZE, MIB, chunk_page, digest_count
from vidcache.errors import (
    DataDirInUse,
    IndexUnreadable,
    InvalidRequest,
    ShuttingDown,
    StorageError,
    TooLarge,
    VidcacheError,
)
from vidcache.space import free_space, mib
from vidcache_client._credentials import REDACTED, with_secrets_replaced

log = logging.getLogger(__name__)

INTERNAL_DIR = ".vidcache"
INDEX_FILE = "index.sqlite3"  # in INTERNAL_DIR

SEGMENT_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"  # a bucket or a non-empty prefix
HASH_PATTERN = r"[0-9a-f]{64}"
_SEGMENT_RE = re.compile(SEGMENT_PATTERN)
_BLOB_NAME_RE = re.compile(r"[0-9a-f]{64}\.[a-z0-9]{1,8}")
_HASH_RE = re.compile(HASH_PATTERN)

# one for a scan, the others for the reads of one video beside it (see the module's docstring)
READ_CONNECTIONS = 4
# What the WAL file is cut back to at the first commit after it starts over: more than its
# ordinary cycle (SQLite's checkpoint at 1000 pages, ~4 MiB, plus the write that crosses it, up
# to ~2 MiB for a 4 GiB video's digests), so that is never cut and regrown; only what a big
# write or writes under a long read's snapshot (the WAL cannot start over under it) added.
WAL_SIZE_LIMIT = 8 * MIB

_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    hash          TEXT PRIMARY KEY,
    bucket        TEXT NOT NULL,
    prefix        TEXT NOT NULL,
    file_path     TEXT NOT NULL UNIQUE,
    size_bytes    INTEGER NOT NULL,
    duration_s    REAL NOT NULL,
    mime_type     TEXT NOT NULL,
    first_seen    TEXT NOT NULL,
    meta          TEXT NOT NULL,
    phash         TEXT NOT NULL,
    chunk_size    INTEGER NOT NULL,
    chunk_digests BLOB NOT NULL
);
-- one per filter of the listing, each ending in its ORDER BY hash, so a page is read in order
-- from where the cursor points instead of sorting the whole bucket or prefix for every page
CREATE INDEX IF NOT EXISTS videos_location ON videos (bucket, prefix, hash);
CREATE INDEX IF NOT EXISTS videos_bucket ON videos (bucket, hash);
CREATE INDEX IF NOT EXISTS videos_prefix ON videos (prefix, hash);
CREATE TABLE IF NOT EXISTS url_aliases (
    url      TEXT PRIMARY KEY,
    hash     TEXT NOT NULL REFERENCES videos (hash) ON DELETE CASCADE,
    added_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS url_aliases_hash ON url_aliases (hash);
"""
# PRAGMA user_version of an index brought up to date; 1: aliases without user:password@,
# 2: and with digests of their secret parameters' values, 3: and so in the URLs nested in
# their queries
_SCHEMA_VERSION = 3
_SECRET_DIGEST = re.compile(rf"{REDACTED}-[0-9a-f]{{32}}")


def url_alias(url: str) -> str:
    """The alias `url` is stored and looked up as (see the module's docstring)."""
    return with_secrets_replaced(url, _secret_digest)


def _secret_digest(value: str) -> str:
    if _SECRET_DIGEST.fullmatch(value):
        # a digest already: the migration repeated after a crash before its version was set
        return value
    digest = blake3.blake3(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{REDACTED}-{digest[:32]}"


def is_content_hash(value: str) -> bool:
    """True for a lowercase 64-hex BLAKE3 digest, the only form a stored hash takes."""
    return _HASH_RE.fullmatch(value) is not None


def check_segment(kind: str, value: str, *, allow_empty: bool = False) -> None:
    """Refuse a bucket or prefix that is not one simple path segment."""
    if allow_empty and not value:
        return
    if not _SEGMENT_RE.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidRequest(
            f"bad {kind} {shown!r}: must be {'empty or ' if allow_empty else ''}one path "
            "segment of letters, digits, '.', '_' or '-', not starting with '.' or '-', at most "
            "128 characters")


def check_location(bucket: str, prefix: str) -> None:
    check_segment("bucket", bucket)
    check_segment("prefix", prefix, allow_empty=True)


def check_meta(meta: dict[str, Any], *, max_bytes: int, max_depth: int) -> None:
    """Refuse client metadata that could not be stored and served back exactly as given."""
    if _deeper_than(meta, max_depth):  # first: encoding a very deep value would recurse
        raise InvalidRequest(f"meta is nested more than {max_depth} levels deep")
    try:
        encoded = json.dumps(meta, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        size = len(encoded.encode("utf-8"))
    except ValueError as exc:  # NaN/Infinity (accepted by Python's JSON parser), surrogates
        raise InvalidRequest(f"meta cannot be stored as standard JSON: {exc}") from exc
    if size > max_bytes:
        raise TooLarge(f"meta is {size} bytes as JSON, more than the limit of {max_bytes}")


def _deeper_than(value: object, limit: int) -> bool:
    """Whether objects/arrays nest more than `limit` levels in `value` (breadth first, so a
    hostile depth costs no recursion)."""
    level = [value]
    for _depth in range(limit + 1):
        containers = [item for item in level if isinstance(item, dict | list)]
        if not containers:
            return False
        level = [child for item in containers
                 for child in (item.values() if isinstance(item, dict) else item)]
    return True


def blob_relpath(bucket: str, prefix: str, content_hash: str, extension: str) -> str:
    parts = [bucket, *([prefix] if prefix else []), content_hash[0:2], content_hash[2:4],
             f"{content_hash}.{extension}"]
    return "/".join(parts)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, kw_only=True)
class NewVideo:
    """What ingest learned about a video that is about to be stored."""

    content_hash: str
    bucket: str
    prefix: str
    extension: str
    size_bytes: int
    duration_s: float
    mime_type: str
    meta: dict[str, Any]
    phash: str  # media.encode_phash() form; opaque to the store
    chunk_size: int
    chunk_digests: bytes  # concatenated DIGEST_SIZE-byte BLAKE3 digests of chunk_size chunks

    def __post_init__(self) -> None:
        count = digest_count(self.size_bytes, self.chunk_size)
        if len(self.chunk_digests) != count * DIGEST_SIZE:
            raise ValueError(f"{len(self.chunk_digests)} bytes of chunk digests for "
                             f"{count} chunks of {self.chunk_size} bytes")


@dataclass(frozen=True, kw_only=True)
class VideoRecord:
    content_hash: str
    bucket: str
    prefix: str
    file_path: str  # relative to the data directory, '/'-separated
    size_bytes: int
    duration_s: float
    mime_type: str
    first_seen: str
    meta: dict[str, Any]
    chunk_size: int  # as recorded at ingest (1 MiB for videos stored before --chunk-size)
    aliases: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class DigestPage:
    """Part of a video's recorded chunk digests: chunks first_chunk, first_chunk + 1, ..."""

    chunk_size: int
    chunk_count: int  # of the whole video
    first_chunk: int
    digests: bytes  # concatenated DIGEST_SIZE-byte digests, possibly none


@dataclass(frozen=True)
class RecoveryReport:
    temp_files: int
    orphan_blobs: int
    records_without_blob: int


class Store:
    """Thread-safe: writes under one lock on one connection, reads each on one of a few read
    connections, scans one at a time (see the module's docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.internal_dir = data_dir / INTERNAL_DIR
        self.tmp_dir = self.internal_dir / "tmp"
        self._write_lock = threading.Lock()
        self._db: sqlite3.Connection | None = None  # the write connection
        # the idle read connections (closed ones after close(), for the reads still to come)
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._read_connections = 0  # open, idle or not
        self._scan_lock = threading.Lock()
        self._lock_file: int | None = None

    # --- life cycle -------------------------------------------------------------------------

    def open(self) -> RecoveryReport:
        """Lock the data directory, create or open the index and repair what a crash left."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = os.open(self.internal_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_file)
            self._lock_file = None
            raise DataDirInUse(f"{self.data_dir} is in use by another vidcache process") from exc
        try:
            with _index_errors("open the index", self.internal_dir):
                self._db = db = self._connect()
                db.execute("PRAGMA journal_mode = WAL")
                # FULL: a committed record must survive power loss, its blob was fsynced before
                db.execute("PRAGMA synchronous = FULL")
                # SQLite starts the WAL over once it is copied into the index, but never shrinks
                # the file: without a limit it stays as large as it ever grew
                db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
                db.execute("PRAGMA foreign_keys = ON")
                db.executescript(_SCHEMA)
                self._migrate()  # an older index's VACUUM needs room too
                self._readers = queue.SimpleQueue()
                for _ in range(READ_CONNECTIONS):
                    reader = self._connect()
                    # counted at once, so that close() closes it too if its pragma fails; no
                    # read takes it before open() returns
                    self._readers.put(reader)
                    self._read_connections += 1
                    # a write on a reader would bypass the write lock
                    reader.execute("PRAGMA query_only = ON")
            with _index_errors("read the index", self.internal_dir, reading=True):
                report = self._recover()
        except BaseException:
            # whatever stopped it (a bug too): the index's connections and the lock let go, so
            # that the caller may open the directory again
            self.close()
            raise
        if any((report.temp_files, report.orphan_blobs, report.records_without_blob)):
            log.warning("start-up recovery in %s: removed %d temp files, %d orphan blobs, "
                        "%d records whose blob was missing", self.data_dir, report.temp_files,
                        report.orphan_blobs, report.records_without_blob)
        return report

    def _connect(self) -> sqlite3.Connection:
        # used by one thread at a time, not always the one that opened it
        return sqlite3.connect(self.internal_dir / INDEX_FILE, check_same_thread=False,
                               isolation_level=None)

    def close(self) -> None:
        """Close the connections once the write and the reads under way, if any, have ended."""
        with self._write_lock:
            db, self._db = self._db, None  # from now on a read taking a connection gives it back
            readers = [self._readers.get() for _ in range(self._read_connections)]
            self._read_connections = 0
            for connection in (*readers, *([] if db is None else [db])):
                connection.close()
            for reader in readers:  # closed, for the reads still to come
                self._readers.put(reader)
            if self._lock_file is not None:
                os.close(self._lock_file)
                self._lock_file = None

    @property
    def db(self) -> sqlite3.Connection:
        """The write connection."""
        if self._db is None:  # closed: only the server's shutdown closes it
            raise ShuttingDown()
        return self._db

    @contextlib.contextmanager
    def _reading(self, *, scan: bool = False) -> Iterator[sqlite3.Connection]:
        """A read connection, for this caller alone, in a read transaction: one committed
        snapshot of the index, taken without the write lock. `scan`: a read of many rows, run
        under the scan lock."""
        with self._scan_lock if scan else contextlib.nullcontext():
            db = self._readers.get()
            try:
                if self._db is None:  # closed: only the server's shutdown closes it
                    raise ShuttingDown()
                with _index_errors("read the index", self.internal_dir, reading=True):
                    db.execute("BEGIN")
                    try:
                        yield db
                    finally:
                        if db.in_transaction:
                            db.execute("ROLLBACK")  # ends the snapshot; nothing was written
            finally:
                self._readers.put(db)

    def _migrate(self) -> None:
        """Bring an index written by an older version up to _SCHEMA_VERSION."""
        if self.db.execute("PRAGMA user_version").fetchone()[0] >= _SCHEMA_VERSION:
            return
        # VACUUM copies the rows it can read: a damaged index came out sound but without
        # the rows it could not, and the recovery then removed their blobs as orphans
        self._check_index()
        with self._transaction():
            cut = self._cut_alias_credentials()
        if cut:
            log.warning("removed the credentials from %d URL aliases in %s", cut, self.data_dir)
        # Rewritten whole, and the WAL emptied: the text of the rows changed (or deleted by
        # an older version) must not linger in free pages or old frames. The version is set
        # last, so a crash before it repeats all this at the next start. Checkpointed before
        # the VACUUM too: one that finds no room has filled the disk with its frames, and the
        # aliases' pages left in the WAL could not then be copied into an index that grew.
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            self.db.execute("VACUUM")
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code in _NO_ROOM:
                self._vacuum_postponed("disk full")
                return
            # A write refused otherwise, as with EDQUOT (SQLite says SQLITE_FULL for ENOSPC
            # only), loses nothing either. The VACUUM reports an I/O error in its copy into a
            # temporary database as a bare SQLITE_IOERR, a write of the copy and perhaps a read
            # of the index: the index read whole without one (else IndexUnreadable, the start
            # stopped) says it was a write. A read of the index failing in the copy (EIO) is
            # SQLITE_CORRUPT (SQLite 3.40.1): the index read whole says that read failed once,
            # and the index is sound; stopping would send its operator to restore a backup.
            if code is not None and code & 0xFF == sqlite3.SQLITE_CORRUPT:
                self._check_index()
                self._vacuum_postponed(f"a read failed ({exc}, but the index reads whole: the "
                                       "disk failing)")
                return
            if code not in (*_WRITE_FAILED, sqlite3.SQLITE_IOERR):
                raise
            if code == sqlite3.SQLITE_IOERR:
                self._check_index()
            self._vacuum_postponed(f"a write failed ({exc}: a disk quota reached, or the disk "
                                   "failing)")
            return
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _vacuum_postponed(self, why: str) -> None:
        """After a VACUUM whose writes failed (no room, a quota) or whose read failed once: its
        frames given back (the WAL emptied), one warning saying `why`, the version left as it
        was. The aliases are rewritten (committed) and work; refusing to start would turn the
        upgrade of a nearly full disk into an outage."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (pages,), (free_pages,), (page_size,) = (
            self.db.execute(f"PRAGMA {name}").fetchone()
            for name in ("page_count", "freelist_count", "page_size"))
        frames = pages - free_pages  # the copy: a page each, in the WAL
        # and the WAL's index (-shm) grows by a block per _SHM_FRAMES frames past its first
        need = (_WAL_HEADER + frames * (page_size + _WAL_FRAME_HEADER)
                + -(-max(0, frames - _SHM_FIRST_FRAMES) // _SHM_FRAMES) * _SHM_BLOCK)
        temp_need = frames * page_size
        free, temp_dir = free_space(self.internal_dir), _sqlite_temp_dir()
        temp_free = free_space(temp_dir)
        log.warning("the index %s was not rewritten whole (VACUUM): %s: it needs about %d bytes "
                    "(%s) free in %s, %d are free (%s), and for an index larger than SQLite's "
                    "cache about %d (%s) in its temporary directory %s, %d are free (%s); until "
                    "then the text of the aliases rewritten or deleted before (their "
                    "credentials too) may remain in its free pages; the rewrite is tried again "
                    "at the next start", self.internal_dir / INDEX_FILE, why, need, mib(need),
                    self.internal_dir, free, mib(free), temp_need, mib(temp_need), temp_dir,
                    temp_free, mib(temp_free))

    def _cut_alias_credentials(self) -> int:
        """Store each alias as url_alias makes it, as versions before 3 did not (before 1,
        with user:password@; before 2, with the secrets of its query; before 3, with those of
        a URL nested in its query); where two become one, the oldest is kept. Returns how many
        aliases had credentials."""
        rows = self.db.execute("SELECT rowid, url FROM url_aliases ORDER BY rowid").fetchall()
        cut = 0
        for rowid, url in rows:
            alias = url_alias(url)
            if alias == url:
                continue
            cut += 1
            if self.db.execute("SELECT 1 FROM url_aliases WHERE url = ? AND rowid < ?",
                               (alias, rowid)).fetchone():
                self.db.execute("DELETE FROM url_aliases WHERE rowid = ?", (rowid,))
            else:  # replacing a newer row of the alias, if any
                self.db.execute("UPDATE OR REPLACE url_aliases SET url = ? WHERE rowid = ?",
                                (alias, rowid))
        return cut

    def _recover(self) -> RecoveryReport:
        temp_files = 0
        for entry in list(self.tmp_dir.iterdir()):
            temp_files += 1
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

        # One walk finds every blob, and an orphan by its name alone: no stat per record, no
        # Path per file, no rmdir of a directory still holding something (at 100 000 videos
        # these were 100 000 stats and 52 000 failed rmdirs at every start).
        hashes = dict(self.db.execute("SELECT file_path, hash FROM videos"))
        found: set[str] = set()
        orphans = 0
        for top in self.data_dir.iterdir():
            if top.name == INTERNAL_DIR or not top.is_dir():
                continue
            removed: set[str] = set()  # directories emptied and removed so far
            for dirpath, dirnames, filenames in os.walk(top, topdown=False):
                base = Path(dirpath).relative_to(self.data_dir).as_posix()
                left = sum(os.path.join(dirpath, name) not in removed for name in dirnames)
                for name in filenames:
                    relpath = f"{base}/{name}"
                    if relpath in hashes:
                        found.add(relpath)
                    elif _BLOB_NAME_RE.fullmatch(name):
                        if not orphans:
                            self._check_index()  # before the first blob goes
                        Path(dirpath, name).unlink(missing_ok=True)
                        orphans += 1
                        continue
                    left += 1
                if not left:
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
                        removed.add(dirpath)

        # Their blobs are gone already: one transaction for all, not a commit (fsync) each.
        # Checked one by one before they go: a blob behind a symlinked directory, which the
        # walk does not enter, is there all the same.
        missing = [content_hash for file_path, content_hash in hashes.items()
                   if file_path not in found and not (self.data_dir / file_path).is_file()]
        if missing:
            if not orphans:
                self._check_index()
            with self._transaction():
                for content_hash in missing:
                    log.warning("record %s has no blob any more; removing the record",
                                content_hash)
                    self.db.execute("DELETE FROM videos WHERE hash = ?", (content_hash,))
        return RecoveryReport(temp_files, orphans, len(missing))

    def _check_index(self) -> None:
        """Before the migration rewrites the index and before the recovery removes a blob or
        a record: IndexUnreadable unless the index is sound. A damaged one may read as if it
        lacked records, without an error (a leaf page's cell count overwritten: its other rows
        are skipped), and their blobs would go as orphans, lost for good. Only then: PRAGMA
        quick_check reads the whole index."""
        lines = [line for (text,) in self.db.execute("PRAGMA quick_check(5)")
                 for line in text.splitlines() if not line.startswith("*** ")]
        if lines != ["ok"]:
            # a page its disk failed to read (an I/O error's code) is not known to be damaged
            failed_reads = any(int(code) & 0xFF == sqlite3.SQLITE_IOERR
                               for line in lines
                               for code in _PAGE_ERROR_CODE.findall(line))
            state = "cannot be read whole (its disk failing)" if failed_reads else "is damaged"
            raise IndexUnreadable(
                f"the index {self.internal_dir / INDEX_FILE} {state} (PRAGMA quick_check: "
                f"{'; '.join(lines)}): until it is repaired or restored, the start-up "
                "recovery removes nothing (a blob without a record may be a video it lost)")

    # --- reads ------------------------------------------------------------------------------

    def get(self, content_hash: str) -> VideoRecord | None:
        with self._reading() as db:
            return self._get(db, content_hash)

    def _get(self, db: sqlite3.Connection, content_hash: str) -> VideoRecord | None:
        row = db.execute(f"SELECT {_RECORD_COLUMNS} FROM videos WHERE hash = ?",
                         (content_hash,)).fetchone()
        return None if row is None else self._records(db, [row])[0]

    def lookup_url(self, url: str) -> VideoRecord | None:
        """The video `url` is an alias of, user:password@ or not."""
        with self._reading() as db:
            row = db.execute("SELECT hash FROM url_aliases WHERE url = ?",
                             (url_alias(url),)).fetchone()
            return None if row is None else self._get(db, row[0])

    def list_videos(self, *, bucket: str | None, prefix: str | None, after: str | None,
                    limit: int, max_meta_bytes: int | None = None,
                    ) -> tuple[list[VideoRecord], bool]:
        """Records ordered by hash, those after the cursor `after`: at most `limit`, and, given
        `max_meta_bytes`, no more than their stored `meta` fits in (one at least). With whether
        more records follow them."""
        where: list[str] = []
        params: list[object] = []
        for column, value in (("bucket", bucket), ("prefix", prefix)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if after is not None:
            where.append("hash > ?")
            params.append(after)
        sql = f"SELECT {_RECORD_COLUMNS} FROM videos"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY hash LIMIT ?"
        meta_column = _RECORD_COLUMNS.split(", ").index("meta")
        with self._reading(scan=True) as db:
            rows: list[tuple[Any, ...]] = []
            meta_bytes = 0
            # one more than asked tells whether more follow; rows are read one by one, so a
            # page cut by its meta never holds the rest in memory
            for row in db.execute(sql, (*params, limit + 1)):
                meta_bytes += len(row[meta_column].encode())
                if len(rows) == limit or (
                        rows and max_meta_bytes is not None and meta_bytes > max_meta_bytes):
                    return self._records(db, rows), True
                rows.append(row)
            return self._records(db, rows), False

    def chunk_digests(self, content_hash: str, *, start: int = 0,
                      end: int | None = None) -> DigestPage | None:
        """The recorded digests of the chunks overlapping bytes [start, end) of the video
        (chunks.chunk_page; `end` None: to the end), None if there is no such video.

        Reads only the page's bytes of the stored list (incremental blob I/O), so a page of a
        long list costs what a page of a short one does."""
        with self._reading() as db:
            row = db.execute("SELECT rowid, chunk_size, size_bytes FROM videos "
                             "WHERE hash = ?", (content_hash,)).fetchone()
            if row is None:
                return None
            rowid, chunk_size, size = row
            page = chunk_page(start, end, chunk_size, size)
            digests = b""
            if page:
                with db.blobopen("videos", "chunk_digests", rowid, readonly=True) as blob:
                    blob.seek(page.start * DIGEST_SIZE)
                    digests = blob.read(len(page) * DIGEST_SIZE)
        return DigestPage(chunk_size=chunk_size, chunk_count=digest_count(size, chunk_size),
                          first_chunk=page.start, digests=digests)

    def phashes(self) -> list[tuple[str, str, float]]:
        """(hash, encoded perceptual hash, duration) of every stored video, oldest first."""
        with self._reading(scan=True) as db:
            return [(h, p, d) for h, p, d in
                    db.execute("SELECT hash, phash, duration_s FROM videos ORDER BY rowid")]

    def count(self) -> int:
        with self._reading() as db:
            return int(db.execute("SELECT count(*) FROM videos").fetchone()[0])

    def blob_path(self, record: VideoRecord) -> Path:
        return self.data_dir / record.file_path

    def _records(self, db: sqlite3.Connection,
                 rows: Sequence[tuple[Any, ...]]) -> list[VideoRecord]:
        hashes = [row[0] for row in rows]
        aliases: dict[str, list[str]] = {h: [] for h in hashes}
        if hashes:
            marks = ",".join("?" * len(hashes))
            for content_hash, url in db.execute(
                    f"SELECT hash, url FROM url_aliases WHERE hash IN ({marks}) ORDER BY rowid",
                    hashes):
                aliases[content_hash].append(url)
        return [
            VideoRecord(content_hash=row[0], bucket=row[1], prefix=row[2], file_path=row[3],
                        size_bytes=row[4], duration_s=row[5], mime_type=row[6],
                        first_seen=row[7], meta=json.loads(row[8]), chunk_size=row[9],
                        aliases=tuple(aliases[row[0]]))
            for row in rows
        ]

    # --- writes -----------------------------------------------------------------------------

    def add_alias(self, url: str, content_hash: str) -> VideoRecord | None:
        """Record `url` (as its url_alias) as a source of the stored video; None if that video
        is gone."""
        with self._write_lock, _index_errors("update the index", self.internal_dir):
            if self._get(self.db, content_hash) is None:
                return None
            with self._transaction():
                self.db.execute("INSERT INTO url_aliases (url, hash, added_at) VALUES (?, ?, ?)",
                                (url_alias(url), content_hash, _now_iso()))
            return self._get(self.db, content_hash)

    def add_video(self, video: NewVideo, *, url: str, temp_path: Path) -> VideoRecord:
        """Move the downloaded file into place and commit its record and first URL alias
        (`url` as its url_alias)."""
        file_path = blob_relpath(video.bucket, video.prefix, video.content_hash,
                                 video.extension)
        final = self.data_dir / file_path
        with self._write_lock, _index_errors("update the index", self.internal_dir):
            db = self.db  # closed: nothing is moved into the bucket
            try:
                self._move_into_place(temp_path, final)
                now = _now_iso()
                with self._transaction():
                    db.execute(
                        f"INSERT INTO videos ({_INSERT_COLUMNS}) VALUES ({','.join('?' * 12)})",
                        (video.content_hash, video.bucket, video.prefix, file_path,
                         video.size_bytes, video.duration_s, video.mime_type, now,
                         json.dumps(video.meta, separators=(",", ":")), video.chunk_size,
                         video.phash, video.chunk_digests))
                    db.execute(
                        "INSERT INTO url_aliases (url, hash, added_at) VALUES (?, ?, ?)",
                        (url_alias(url), video.content_hash, now))
            except BaseException:
                # one left on a file system turned read-only is removed at the next start
                with contextlib.suppress(OSError):
                    final.unlink(missing_ok=True)
                self._prune_empty_dirs(final.parent)
                raise
            record = self._get(db, video.content_hash)
            assert record is not None
            return record

    def _move_into_place(self, temp_path: Path, final: Path) -> None:
        """Rename the temp file to the blob path `final`, durably; StorageError if the file
        system refuses (a directory to create on a full disk, a read-only one)."""
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(temp_path, 0o644)  # mkstemp made it private; the blob is for reading
            os.replace(temp_path, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError.from_os_error("store the video", self.data_dir, exc) from exc

    def delete(self, content_hash: str) -> bool:
        """Remove record, aliases (by cascade) and blob; False if there was no such video."""
        with self._write_lock, _index_errors("update the index", self.internal_dir):
            record = self._get(self.db, content_hash)
            if record is None:
                return False
            with self._transaction():
                self.db.execute("DELETE FROM videos WHERE hash = ?", (content_hash,))
            blob = self.blob_path(record)
            blob.unlink(missing_ok=True)
            self._prune_empty_dirs(blob.parent)
            return True

    def _prune_empty_dirs(self, directory: Path) -> None:
        while directory != self.data_dir and directory.is_relative_to(self.data_dir):
            try:
                directory.rmdir()
            except OSError:  # not empty
                return
            directory = directory.parent

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """A write transaction; StorageError if the file system cannot take it (the index's
        write-ahead log cannot grow on a full disk), which leaves the index as it was."""
        db = self.db
        with _index_errors("update the index", self.internal_dir):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # not after a COMMIT that failed and rolled back
                    db.execute("ROLLBACK")
                raise


# A record leaves out the phash and the digests: every read looks records up, few need those
# (and the digests are ~32 bytes per chunk: 128 KiB for a 1 GiB video in 256 KiB chunks).
_RECORD_COLUMNS = ("hash, bucket, prefix, file_path, size_bytes, duration_s, mime_type, "
                   "first_seen, meta, chunk_size")
_INSERT_COLUMNS = f"{_RECORD_COLUMNS}, phash, chunk_digests"


# quick_check's line for a page it could not read ("Page 23: unable to get the page. error
# code=8458")
_PAGE_ERROR_CODE = re.compile(r"unable to get the page\. error code=(\d+)")
# SQLite's errors for a file system without room: full, or the -shm cannot grow
_NO_ROOM = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE)
# and for a write it refused otherwise ('disk I/O error'): a quota (EDQUOT), a failing disk
_WRITE_FAILED = (sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_FSYNC)
# The WAL's layout: a header, then a header before each page; its index, the -shm, in blocks
# of 32 KiB, the first for fewer frames (it holds the index's header too)
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24
_SHM_BLOCK = 32768
_SHM_FRAMES = 4096
_SHM_FIRST_FRAMES = 4062


@contextlib.contextmanager
def _index_errors(doing: str, where: Path, *, reading: bool = False) -> Iterator[None]:
    """SQLite's errors saying the index in the directory `where` cannot be read, raised as
    IndexUnreadable (`cannot DOING WHERE/index.sqlite3: ...`), and those saying the file
    system cannot take its writes as StorageError (`cannot DOING in WHERE: ...`); any other
    (a constraint: a bug) passes as it is. `reading`: nothing but reads runs in it."""
    try:
        yield
    except sqlite3.Error as exc:
        if (error := _index_error(doing, where, exc, reading=reading)) is None:
            raise
        raise error from exc


def _index_error(doing: str, where: Path, exc: sqlite3.Error, *,
                 reading: bool) -> VidcacheError | None:
    """SQLite's error as IndexUnreadable if it says the index cannot be read (a damaged file,
    a read that failed: any I/O error of a read), as StorageError if it says the file system
    cannot take the index's writes (full, read-only, failing); None for any other."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    if code in _NO_ROOM:
        return StorageError(doing, where, errno.ENOSPC, str(exc))
    if (code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
            or code in (sqlite3.SQLITE_IOERR_READ, sqlite3.SQLITE_IOERR_SHORT_READ)
            or (reading and code & 0xFF in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN))):
        return IndexUnreadable(f"cannot {doing} {where / INDEX_FILE}: {exc}")
    if code & 0xFF == sqlite3.SQLITE_READONLY:
        return StorageError(doing, where, errno.EROFS, str(exc))
    if code & 0xFF in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN):
        return StorageError(doing, where, _refusal_errno(where), str(exc))
    return None


def _refusal_errno(directory: Path) -> int | None:
    """The errno with which `directory`'s file system refuses a new file now, if it does.
    SQLite reports a write refused as a plain I/O error ('disk I/O error'), without its errno:
    an ext4 turned read-only under it (errors=remount-ro) says EROFS only to this."""
    try:
        with tempfile.TemporaryFile(dir=directory):  # no name: nothing to remove
            return None
    except OSError as exc:
        return exc.errno


def _sqlite_temp_dir() -> str:
    """The directory SQLite makes its temporary files in (a VACUUM's copy of the index, once
    it outgrows the cache): the first usable of these, as its unixTempFileDir picks it."""
    for candidate in (os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR"), "/var/tmp",
                      "/usr/tmp", "/tmp"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return "."


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
