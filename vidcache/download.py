"""Fetch an ingest URL into a temp file, hashing while writing.

One pass over the bytes computes the whole-file BLAKE3 (the content hash) and the BLAKE3 of
every chunk of the service's chunk size (chunks.py; published at /video/{hash}/chunks so
readers can verify ranges). The size cap is enforced on the bytes actually received, not only
on Content-Length. A size known ahead that the data directory has no room for (space.py, with
what the downloads under way have yet to write) is refused before the first byte; bytes beyond
it (no size known, or a gzip body decoded) are promised room before they are written, and the
download stops (507) when there is none. A body the origin encodes (gzip, deflate) is decoded
in pieces of bounded size (content_coding.py), so those checks stop a gzip bomb before it
takes the memory.

http(s): redirects are followed by hand so every hop passes the HostGuard, and each request is
sent to the address the guard approved (Host header and TLS SNI keep the original name).
Two time limits: `timeout` for any single wait (resolving the host name, connecting, or
between two reads: a stalled origin) and `max_time` for the whole download (an origin trickling
a byte now and then would otherwise hold an ingest slot forever).

file://: only below the directories the operator listed with --allow-file-dir. The path is
resolved (symlinks followed) and checked before opening, and the file actually opened is
checked again through /proc/self/fd, so swapping a directory for a symlink between the two
steps cannot lead outside; FIFOs and devices are refused (they could block or never end).

At shutdown `stop` cuts the downloads under way, wherever they wait (resolving the host name:
resolver.py; connecting, for the first answer, for the body: their sockets are shut down,
origin_sockets.py) and refuses new ones; whatever error that causes is ShuttingDown (503),
never a verdict on the origin.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import blake3
import httpcore
import httpx

from vidcache import __version__
from vidcache.chunks import ChunkHasher, check_chunk_size
from vidcache.content_coding import EncodingError, decoded
from vidcache.errors import (
    BadSetting,
    IngestRefused,
    InvalidRequest,
    ShuttingDown,
    StorageError,
    TooLarge,
    UpstreamError,
    UpstreamTimeout,
)
from vidcache.hostguard import HostGuard
from vidcache.origin_sockets import IdleClosingPool, StoppableBackend
from vidcache.progress import IngestProgress
from vidcache.resolver import StoppableResolver
from vidcache.space import Claim, FreeSpace
from vidcache_client._arguments import size_text
from vidcache_client._credentials import basic_authorization, without_credentials

MAX_URL_LENGTH = 8192
MAX_REDIRECTS = 5
# seconds an idle connection to an origin is kept for the next download
ORIGIN_KEEPALIVE = 5.0
_COPY_SIZE = 256 * 1024


@dataclass(frozen=True)
class Download:
    path: Path  # temp file in the store's tmp dir; the caller moves or removes it
    size: int
    content_hash: str
    chunk_size: int
    chunk_digests: bytes  # concatenated 32-byte digests, one per chunk_size chunk


def parse_url(url: str) -> httpx.URL:
    """The URL if ingest can fetch it at all, else InvalidRequest saying why (with the URL as
    shown: without its credentials)."""
    shown = without_credentials(url)
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(f"URL longer than {MAX_URL_LENGTH} characters")
    if not url or any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise InvalidRequest(f"malformed URL {shown!r}: empty or contains spaces/control "
                             "characters")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON "\ud800" escape
        raise InvalidRequest(f"malformed URL {shown!r}: not valid Unicode text") from exc
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise InvalidRequest(f"malformed URL {shown!r}: {exc}") from exc
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise InvalidRequest(f"malformed URL {shown!r}: port {parsed.port} is not 1-65535")
    if not parsed.scheme:
        hint = f" (a file on the server: file://{shown}, see --allow-file-dir)" if (
            url.startswith("/")) else ""
        raise InvalidRequest(f"malformed URL {shown!r}: expected an absolute http(s):// URL{hint}")
    if parsed.scheme not in ("http", "https", "file"):
        raise InvalidRequest(f"unsupported URL scheme {parsed.scheme!r} in {shown!r}: "
                             "use http, https or file")
    if parsed.scheme != "file" and not parsed.raw_host:
        raise InvalidRequest(f"malformed URL {shown!r}: no host")
    if parsed.scheme == "file" and "\0" in parsed.path:
        raise InvalidRequest(f"malformed URL {shown!r}: NUL character in the file path")
    return parsed


def _redirect_target(url: httpx.URL, location: str, shown: str) -> httpx.URL:
    """The URL `url`'s answer redirects to with `location`; one that is malformed or that
    ingest would refuse is the origin's fault (502), not the request's (422 for the one
    `url` names, as given)."""
    try:
        return parse_url(str(url.join(location)))
    except httpx.InvalidURL as exc:  # httpx cannot even join it
        raise UpstreamError(f"{shown} redirects to a malformed URL "
                            f"{without_credentials(location)!r}: {exc}") from exc
    except InvalidRequest as exc:
        raise UpstreamError(f"{shown} redirects to a URL ingest refuses: {exc}") from exc


def _limit_text(size: int) -> str:
    """`4 GiB (4294967296 bytes)`: the limit as it was likely given, and in bytes to compare
    with the video's size beside it."""
    given = size_text(size)
    return given if given.endswith(" bytes") else f"{given} ({size} bytes)"


class _HashingWriter:
    def __init__(self, file: BinaryIO, *, max_size: int, url: str, chunk_size: int,
                 directory: Path, claim: Claim) -> None:
        self._file = file
        self._directory = directory
        self._claim = claim
        self._max_size = max_size
        self._url = url
        self._doing = f"write the download of {url}"
        self._whole = blake3.blake3()
        self._chunks = ChunkHasher(chunk_size)
        self.size = 0

    def check_announced_size(self, size: int) -> None:
        """TooLarge over --max-size (whatever the disk), else StorageError if the data
        directory has no room for it."""
        if size > self._max_size:
            raise TooLarge(f"{self._url} is {size} bytes, more than the server's --max-size of "
                           f"{_limit_text(self._max_size)}")
        self._claim.promise(size, self._doing)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._max_size:
            raise TooLarge(f"{self._url} is larger than the server's --max-size of "
                           f"{_limit_text(self._max_size)}")
        self._claim.cover(self.size, self._doing)
        try:
            self._file.write(data)
            # on the file system now, as `written` says: left in the buffer (st_blksize,
            # a page or more), bytes counted as written had not yet taken the free space
            # the next check sees, which let the download past its promise
            self._file.flush()
        except OSError as exc:
            raise self._storage_error(exc) from exc
        self._claim.written = self.size
        self._whole.update(data)
        self._chunks.update(data)

    def finish(self) -> tuple[str, bytes]:
        """(content hash, chunk digests); flushes the file to disk."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise self._storage_error(exc) from exc
        return self._whole.hexdigest(), self._chunks.finish()

    def _storage_error(self, exc: OSError) -> StorageError:
        return StorageError.from_os_error(self._doing, self._directory, exc)


class _Body(httpx.SyncByteStream):
    """An httpcore response's body as httpx's stream; `received` hears of each piece as sent,
    before decoding (what its Content-Length counts)."""

    def __init__(self, response: httpcore.Response, received: Callable[[int], None]) -> None:
        self._response = response
        self._received = received

    def __iter__(self) -> Iterator[bytes]:
        for data in self._response.iter_stream():
            self._received(len(data))
            yield data


def origin_tls() -> ssl.SSLContext:
    """The TLS context https origins are checked with: certifi's CAs, or those of SSL_CERT_FILE
    / SSL_CERT_DIR (a company's own CA); BadSetting if SSL_CERT_FILE holds none."""
    try:
        return httpx.create_ssl_context(trust_env=True)
    except OSError as exc:  # missing, unreadable, or no PEM certificate in it (ssl.SSLError)
        raise BadSetting(f"SSL_CERT_FILE={os.environ.get('SSL_CERT_FILE')}: cannot load CA "
                         f"certificates from it ({exc.strerror or exc})") from exc


class Downloader:
    def __init__(self, *, tmp_dir: Path, max_size: int, timeout: float, max_time: float,
                 guard: HostGuard, chunk_size: int,
                 allow_file_dirs: Sequence[Path] = (), tls: ssl.SSLContext | None = None
                 ) -> None:
        self._tmp_dir = tmp_dir
        self._chunk_size = check_chunk_size(chunk_size)
        self._space = FreeSpace(tmp_dir, self._chunk_size)
        self._max_size = max_size
        self._timeout = timeout
        self._max_time = max_time
        self._guard = guard
        self._file_dirs = tuple(d.resolve() for d in allow_file_dirs)
        self._resolver = StoppableResolver()
        self._sockets = StoppableBackend()
        tls = tls or origin_tls()
        # no proxies (they would bypass the address check) and no redirects (followed by hand)
        self._pool = IdleClosingPool(partial(
            httpcore.ConnectionPool, ssl_context=tls, network_backend=self._sockets,
            max_connections=100, max_keepalive_connections=20,
            keepalive_expiry=ORIGIN_KEEPALIVE), ORIGIN_KEEPALIVE)

    def close(self) -> None:
        self._pool.close()

    def stop(self) -> None:
        """Cut the downloads under way and refuse new ones: the server is shutting down."""
        self._resolver.stop()
        self._sockets.stop()

    @property
    def _stopped(self) -> bool:
        return self._sockets.stopped

    @contextlib.contextmanager
    def fetch(self, url: str, progress: IngestProgress) -> Iterator[Download]:
        """Download `url` into a new temp file, telling `progress` the bytes expected and
        received; nothing is left behind on failure. The room promised to the download is
        held for the block, with its margin for what the ingest writes next (the sampled
        frames, the index's update): given back when the download ends, another download could
        take it while this one is validated and hashed. The temp file, unless moved into the
        store meanwhile, is removed at the end of the block."""
        parsed = parse_url(url)
        if self._stopped:
            raise ShuttingDown()
        with self._space.claim() as claim:
            download = self._download_to_temp(parsed, url, claim, progress)
            try:
                yield download
            finally:
                # one left on a file system turned read-only is removed at the next start
                with contextlib.suppress(OSError):
                    download.path.unlink(missing_ok=True)

    def _download_to_temp(self, parsed: httpx.URL, url: str, claim: Claim,
                          progress: IngestProgress) -> Download:
        try:
            fd, name = tempfile.mkstemp(dir=self._tmp_dir, prefix="download-", suffix=".part")
        except OSError as exc:
            raise StorageError.from_os_error("create a temp file", self._tmp_dir, exc) from exc
        path = Path(name)
        deadline = time.monotonic() + self._max_time
        try:
            with open(fd, "wb") as file:
                writer = _HashingWriter(file, max_size=self._max_size,
                                        url=without_credentials(url),
                                        chunk_size=self._chunk_size, directory=self._tmp_dir,
                                        claim=claim)
                try:
                    if parsed.scheme == "file":
                        self._copy_local(parsed, writer, deadline, progress)
                    else:
                        self._download(parsed, writer, deadline, progress)
                    if self._stopped:  # a body without Content-Length, cut, looks complete
                        raise ShuttingDown()
                    content_hash, digests = writer.finish()
                except BaseException:
                    # closed here, quietly: closing flushes what a failed write left in the
                    # buffer, which fails again (a full disk) and would replace the error
                    with contextlib.suppress(OSError):
                        file.close()
                    raise
            return Download(path, writer.size, content_hash, self._chunk_size, digests)
        except BaseException as exc:
            # one left on a file system turned read-only is removed at the next start
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            if self._stopped and isinstance(exc, Exception):  # the shutdown cut it
                raise ShuttingDown() from exc
            raise

    def _check_progress(self, deadline: float, url: str) -> None:
        """Between two pieces of a download: stop it if the server stops or time is up."""
        if self._stopped:
            raise ShuttingDown()
        if time.monotonic() > deadline:
            raise UpstreamTimeout(f"download of {url} took longer than the server's "
                                  f"--max-download-time of {self._max_time:g} s")

    def _download(self, url: httpx.URL, writer: _HashingWriter, deadline: float,
                  progress: IngestProgress) -> None:
        with self._pool.lend() as pool:
            self._download_through(pool, url, writer, deadline, progress)

    def _download_through(self, pool: httpcore.ConnectionPool, url: httpx.URL,
                          writer: _HashingWriter, deadline: float,
                          progress: IngestProgress) -> None:
        original = without_credentials(str(url))  # as messages and logs show it
        for _hop in range(MAX_REDIRECTS + 1):
            host = url.raw_host.decode("ascii")
            port = url.port or (443 if url.scheme == "https" else 80)
            address = self._address_for(host, port, original)
            extensions: dict[str, object] = {"timeout": dict.fromkeys(
                ("connect", "read", "write", "pool"), self._timeout)}
            if url.scheme == "https":
                extensions["sni_hostname"] = host
            try:
                target = httpcore.URL(scheme=url.raw_scheme, host=address.encode("ascii"),
                                      port=port, target=url.raw_path)
                headers = [("Host", url.netloc.decode("ascii")), ("Accept", "*/*"),
                           ("Accept-Encoding", "identity"),
                           ("User-Agent", f"vidcache/{__version__}")]
                if url.scheme == "https":
                    # The pool keys connections by the checked address, not the name: a kept-alive
                    # connection verified for a.example would serve b.example at the same IP
                    # without b's certificate ever being checked
                    headers.append(("Connection", "close"))
                if url.username or url.password:  # user:password@, as httpx sent them
                    headers.append(("Authorization", basic_authorization(url)))
                with pool.stream("GET", target, extensions=extensions,
                                 headers=headers) as answer:
                    # As httpx's response, for its reading of the status and headers
                    response = httpx.Response(answer.status, headers=answer.headers,
                                              stream=_Body(answer, progress.received),
                                              extensions=answer.extensions)
                    location = response.headers.get("location")
                    if response.is_redirect and location:
                        url = _redirect_target(url, location, original)
                        if url.scheme == "file":
                            raise IngestRefused(f"{original} redirects to a file:// URL")
                        continue
                    if response.status_code != 200:
                        raise UpstreamError(f"{original} answered {response.status_code} "
                                            f"{response.reason_phrase}".rstrip())
                    announced = response.headers.get("content-length", "")
                    expected = int(announced) if announced.isdigit() else None
                    if expected is not None:
                        writer.check_announced_size(expected)
                    progress.expect(expected)
                    # An origin may encode the body whatever Accept-Encoding says (S3 does):
                    # decoded in bounded pieces, not by httpx, which inflates each piece
                    # received whole and leaves a coding it does not know encoded
                    for data in decoded(response.iter_raw(),
                                        response.headers.get_list("content-encoding",
                                                                  split_commas=True)):
                        writer.write(data)
                        self._check_progress(deadline, original)
                    return
            except httpcore.TimeoutException as exc:
                raise UpstreamTimeout(f"download of {original} stalled: no progress for "
                                      f"{self._timeout:g} s ({type(exc).__name__})") from exc
            except httpcore.ConnectError as exc:
                raise UpstreamError(f"cannot connect to {host}:{port} for {original}: "
                                    f"{exc}") from exc
            except (httpcore.NetworkError, httpcore.ProtocolError, EncodingError) as exc:
                raise UpstreamError(f"download of {original} failed: {exc}") from exc
        raise UpstreamError(f"{original}: more than {MAX_REDIRECTS} redirects")

    def _address_for(self, host: str, port: int, url: str) -> str:
        """The guard's address for `host`, its lookup cut by `stop` and bounded by `timeout`
        as any other wait for the origin is (the system resolver's own limit may be far
        longer than --download-timeout)."""
        try:
            return self._guard.address_for(
                host, port, partial(self._resolver.resolve, timeout=self._timeout))
        except TimeoutError as exc:
            raise UpstreamTimeout(f"cannot resolve host {host!r} for {url}: no answer within "
                                  f"the server's --download-timeout of {self._timeout:g} s"
                                  ) from exc

    def _copy_local(self, url: httpx.URL, writer: _HashingWriter, deadline: float,
                    progress: IngestProgress) -> None:
        if not self._file_dirs:
            raise IngestRefused("file:// URLs are disabled; start the server with "
                                "--allow-file-dir DIR to ingest local files below DIR")
        shown = without_credentials(str(url))  # as messages and logs show it
        if url.host not in ("", "localhost"):
            raise InvalidRequest(f"file:// URL with a remote host {url.host!r}: {shown}")
        path = Path(url.path)
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise InvalidRequest(f"cannot resolve {path}: {exc}") from exc
        self._check_allowed(path, real)
        try:
            if not stat.S_ISREG(os.stat(real).st_mode):
                raise InvalidRequest(f"not a regular file: {path}")
            # O_NONBLOCK: should a FIFO appear here after the check, opening it cannot block
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except PermissionError as exc:
            raise IngestRefused(f"cannot read {path}: permission denied") from exc
        except OSError as exc:
            raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from exc
        with open(fd, "rb") as source:
            self._check_allowed(path, Path(os.readlink(f"/proc/self/fd/{fd}")))
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise InvalidRequest(f"not a regular file: {path}")
            writer.check_announced_size(status.st_size)
            progress.expect(status.st_size)
            try:
                while data := source.read(_COPY_SIZE):
                    writer.write(data)
                    progress.received(len(data))
                    self._check_progress(deadline, shown)
            except OSError as exc:
                raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from exc

    def _check_allowed(self, path: Path, real: Path) -> None:
        if not any(real.is_relative_to(directory) for directory in self._file_dirs):
            raise IngestRefused(f"{path} is outside the directories allowed by --allow-file-dir")
