"""Helpers for the vidcache service tests: an origin server that misbehaves on request, one
that keeps connections alive and counts them, a thin HTTP client of the wire protocol and the
`api` fixture made of it, looks into a service's data directory, `vidcache serve` run where it
is expected to stop at start, presigned URLs with the secrets that must never be shown, and a
`vidcache` command drawing on a terminal."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import http.server
import json
import os
import pty
import re
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import termios
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import httpx
import pytest
from blake3 import blake3

from tests.support import VidcacheServer, free_port, serving, wait_until
from vidcache.chunks import DEFAULT_CHUNK_SIZE
from vidcache.store import Store, blob_relpath

CHUNK = 1024 * 1024
# what the origin's /signed/ route takes for a valid signature of a presigned URL
SIGNATURE = "5e11f00d5ec4e7c0ffee0ddba11ad5e1f5e11f00d5ec4e7c0ffee0ddba11ad5e1"
# the secrets of the URLs the tests ingest, which no answer, log or file may show
WRONG_SIGNATURE = "0bad51690bad51690bad51690bad51690bad51690bad51690bad51690bad5169"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN"
OTHER_SESSION_TOKEN = "FwoGZXIvYXdzOTHERSESSIONTOKEN"
SECRETS = (SIGNATURE, WRONG_SIGNATURE, ACCESS_KEY, SESSION_TOKEN, OTHER_SESSION_TOKEN)


def presigned(origin: str, name: str, signature: str, *, number: int = 5,
              token: str = SESSION_TOKEN) -> str:
    """An S3 presigned URL of /signed/<name>, `id=number` telling one such URL from another."""
    return (f"{origin}/signed/{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={ACCESS_KEY}%2F20250131%2Fus-east-1%2Fs3%2Faws4_request"
            f"&X-Amz-Date=20250131T120000Z&X-Amz-Expires=3600"
            f"&X-Amz-Security-Token={token}&X-Amz-SignedHeaders=host"
            f"&X-Amz-Signature={signature}&id={number}")


def redirector(origin: str, url: str) -> str:
    """A redirector's link to `url`: percent-encoded whole in its query, as real ones do."""
    return f"{origin}/fetch?url={quote(url, safe='')}&via=mail"


def shown(origin: str, name: str, *, number: int = 5) -> str:
    """presigned(...) as the service and the command show it, whatever its signature."""
    return (f"{origin}/signed/{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential=REDACTED&X-Amz-Date=20250131T120000Z&X-Amz-Expires=3600"
            f"&X-Amz-Security-Token=REDACTED&X-Amz-SignedHeaders=host"
            f"&X-Amz-Signature=REDACTED&id={number}")


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def files_holding_secrets(data_dir: Path) -> list[Path]:
    return [path for path in (data_dir / ".vidcache").rglob("*")
            if path.is_file() and leaks(path.read_bytes().decode("latin-1"))]


def digest(data: bytes) -> str:
    return str(blake3(data).hexdigest())


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends on `sock` until it closes the connection; each receive waits
    at most the socket's timeout (then socket.timeout: an answer that never ends fails)."""
    received = b""
    while piece := sock.recv(65536):
        received += piece
    return received


def routes_error_body(detail: str) -> bytes:
    """An error body `{"detail": detail}` as the service's routes send it (Starlette's
    JSONResponse: no spaces, UTF-8), which every layer below them must match."""
    return json.dumps({"detail": detail}, ensure_ascii=False, separators=(",", ":")).encode()


def unique(purpose: str) -> str:
    """A bucket name (or URL query) no other test uses."""
    return f"svc-{purpose}-{uuid.uuid4().hex[:8]}"


def blob_files(data_dir: Path) -> list[Path]:
    """Every file of the data directory outside the service's internal `.vidcache` folder."""
    return sorted(p for p in data_dir.rglob("*")
                  if p.is_file() and ".vidcache" not in p.relative_to(data_dir).parts)


def temp_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / ".vidcache" / "tmp").rglob("*"))


def serve_refused(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`vidcache serve` on `data_dir`, expected to stop at start."""
    return subprocess.run([sys.executable, "-m", "vidcache", "serve", "--data", str(data_dir),
                           "--port", str(free_port())], capture_output=True, text=True,
                          timeout=60)


def store_many(data_dir: Path, count: int, *, bucket: str = "many",
               meta: str = "{}") -> list[str]:
    """`count` tiny videos stored as the service stores them (a blob file each, its record,
    whose `meta` is the JSON text `meta`, and URL alias), written directly: a large data
    directory in seconds instead of `count` ingests. Their hashes, in the order written."""
    store = Store(data_dir)
    store.open()  # the schema, as the service makes it
    store.close()
    hashes = []
    db = sqlite3.connect(data_dir / ".vidcache" / "index.sqlite3", isolation_level=None)
    try:
        db.execute("BEGIN")
        for number in range(count):
            content = f"video {number} of {count}".encode()
            content_hash = digest(content)
            file_path = blob_relpath(bucket, "", content_hash, "mp4")
            (data_dir / file_path).parent.mkdir(parents=True, exist_ok=True)
            (data_dir / file_path).write_bytes(content)
            db.execute(
                "INSERT INTO videos (hash, bucket, prefix, file_path, size_bytes, duration_s, "
                "mime_type, first_seen, meta, phash, chunk_size, chunk_digests) "
                "VALUES (?, ?, '', ?, ?, 1.0, 'video/mp4', '2025-01-31T12:00:00.000Z', ?, "
                "?, ?, ?)",
                (content_hash, bucket, file_path, len(content), meta,
                 f"{number:016x}," * 7 + "-",
                 DEFAULT_CHUNK_SIZE, blake3(content).digest()))
            db.execute("INSERT INTO url_aliases (url, hash, added_at) "
                       "VALUES (?, ?, '2025-01-31T12:00:00.000Z')",
                       (f"http://origin.test/{number}.mp4", content_hash))
            hashes.append(content_hash)
        db.execute("COMMIT")
    finally:
        db.close()
    return hashes


class Api:
    """The wire protocol over httpx, returning raw responses so tests see status and headers."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=120)

    def ingest(self, url: str, bucket: str, prefix: str = "",
               meta: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.post("/ingest", json={"url": url, "bucket": bucket, "prefix": prefix,
                                               "meta": meta or {}})

    def ingest_ok(self, url: str, bucket: str, prefix: str = "",
                  meta: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.ingest(url, bucket, prefix, meta)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def meta(self, content_hash: str) -> httpx.Response:
        return self.http.get(f"/meta/{content_hash}")

    def close(self) -> None:
        self.http.close()


def api_fixture(upstream: str = "vidcache_server",
                name: str = "api") -> Callable[..., Iterator[Api]]:
    """A module-scoped fixture `name`: an Api of the service of the fixture named `upstream`,
    closed after the module. Declared in a module with `api = api_fixture(...)`."""

    def api(request: pytest.FixtureRequest) -> Iterator[Api]:
        server: VidcacheServer = request.getfixturevalue(upstream)
        client = Api(server.url)
        yield client
        client.close()

    api.__doc__ = f"An Api of `{upstream}`, one for the module."
    return pytest.fixture(scope="module", name=name)(api)


class _OriginHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files like SimpleHTTPRequestHandler, plus misbehaviours chosen by path:

    /redirect/<n>/<name>   n redirects, then <name>;  /redirect-to?<url>  one redirect to url
    /nolength/<name>       the body without Content-Length, ended by closing the connection
    /stall/<name>          half the body, then silence until the origin is closed
    /gzip/<name>           the body gzip-compressed (Content-Encoding: gzip) whatever the client
                           accepts, as S3 serves an object stored with that encoding
    /stored-as/<coding>/<name>  the file as it is, labelled Content-Encoding: <coding> (an
                           object stored compressed, or a coding the client did not ask for)
    /auth/<name>           401 unless the request has HTTP Basic credentials user:secret
    /signed/<name>?...     403 unless the query's X-Amz-Signature is SIGNATURE (an S3 presigned
                           URL's)
    /by-token?token=<name> <name>, as a download link whose token names the file does
    /fetch?url=<URL>&...   a redirect to URL (percent-encoded), as a redirector's link does

    Other queries are ignored, as a plain file server does.
    """

    release: threading.Event
    stalled: threading.Event

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if match := re.fullmatch(r"/redirect/(\d+)/(.+)", self.path):
            hops, name = int(match.group(1)), match.group(2)
            target = f"/redirect/{hops - 1}/{name}" if hops > 1 else f"/{name}"
            self._redirect(target)
        elif self.path.startswith("/auth/"):
            if self.headers.get("Authorization") == "Basic " + base64.b64encode(
                    b"user:secret").decode("ascii"):
                self.path = self.path.removeprefix("/auth")
                super().do_GET()
            else:
                self.send_error(401)
        elif self.path.startswith("/signed/"):
            query = parse_qs(urlsplit(self.path).query)
            if query.get("X-Amz-Signature") == [SIGNATURE]:
                self.path = self.path.removeprefix("/signed")
                super().do_GET()
            else:
                self.send_error(403)
        elif self.path.startswith("/by-token?"):
            self.path = "/" + parse_qs(urlsplit(self.path).query)["token"][0]
            super().do_GET()
        elif self.path.startswith("/fetch?"):
            self._redirect(parse_qs(urlsplit(self.path).query)["url"][0])
        elif self.path.startswith("/redirect-to?"):
            self._redirect(self.path.partition("?")[2])
        elif match := re.fullmatch(r"/stored-as/([^/]+)/(.+)", self.path):
            data = (Path(self.directory) / match.group(2)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Encoding", unquote(match.group(1)))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif match := re.fullmatch(r"/(nolength|stall|gzip)/(.+)", self.path):
            self._misbehave(match.group(1), match.group(2))
        else:
            super().do_GET()

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _misbehave(self, how: str, name: str) -> None:
        data = (Path(self.directory) / name.partition("?")[0]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if how == "gzip":
            data = gzip.compress(data)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
        if how == "stall":
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if how in ("nolength", "gzip"):
            self.wfile.write(data)
        else:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.stalled.set()
            self.release.wait(timeout=60)
        self.close_connection = True


class _TlsOrigin(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a client refusing the certificate is what some tests want."""


class _KeepAliveHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # connections kept until the client closes them

    def log_message(self, format: str, *args: object) -> None:
        pass


class _CountingOrigin(http.server.ThreadingHTTPServer):
    accepted = 0

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.accepted += 1
        return True


@contextlib.contextmanager
def keep_alive_origin(directory: Path) -> Iterator[tuple[str, Callable[[], int]]]:
    """A loopback HTTP/1.1 origin for `directory` that keeps a connection for as long as its
    client does; yields (base URL, how many connections it has accepted so far)."""

    def make(*args: Any) -> _KeepAliveHandler:
        return _KeepAliveHandler(*args, directory=str(directory))

    with serving(_CountingOrigin(("127.0.0.1", 0), make)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}", lambda: server.accepted


@contextlib.contextmanager
def serve_origin(directory: Path, *, tls: ssl.SSLContext | None = None
                 ) -> Iterator[tuple[str, threading.Event]]:
    """A loopback origin for `directory` (see _OriginHandler); yields (base URL, stalled), where
    `stalled` is set once a /stall/ response has sent its first half. With `tls`: https, and
    HTTP/1.1 so that connections are kept alive as real https origins do."""
    release, stalled = threading.Event(), threading.Event()
    attributes: dict[str, object] = {"release": release, "stalled": stalled}
    if tls is not None:
        attributes["protocol_version"] = "HTTP/1.1"
    handler = type("Handler", (_OriginHandler,), attributes)

    def make(*args: Any) -> _OriginHandler:
        return handler(*args, directory=str(directory))  # type: ignore[no-any-return]

    server = (_TlsOrigin if tls else http.server.ThreadingHTTPServer)(("127.0.0.1", 0), make)
    if tls is not None:  # the handshake happens in the connection's thread, on its first read
        server.socket = tls.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    with serving(server):
        try:
            yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", stalled
        finally:
            release.set()  # before the shutdown, which waits for the answers under way


# --- a command whose reader leaves -----------------------------------------------------------

def read_then_leave(args: list[str], read: Callable[[IO[bytes]], bytes]) -> tuple[bytes, int]:
    """`vidcache ARGS` with its stdout piped to a reader that takes `read(stdout)` and then
    closes the pipe (`| head`); (what was read, the exit status). Its stderr must stay empty:
    no BrokenPipeError traceback, no error line."""
    command = subprocess.Popen([sys.executable, "-m", "vidcache", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert command.stdout is not None and command.stderr is not None
        got = read(command.stdout)
        command.stdout.close()
        status = command.wait(timeout=60)
        assert command.stderr.read() == b""
        return got, status
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()


# --- a command on a terminal ------------------------------------------------------------------

class OnTerminal:
    """`vidcache ARGS` with its stderr on a pseudo-terminal (stdout piped, for the results):
    what it draws there (progress lines) is read as it comes."""

    def __init__(self, *args: str, columns: int = 0, prefix: Sequence[str] = ()) -> None:
        """`columns`: the terminal's width (0: unknown, as a pseudo-terminal starts); `prefix`:
        an argv to run it under (a cgroup's, tests.support.new_cgroup)."""
        master, slave = pty.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
            self.process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "vidcache", *args], stdout=subprocess.PIPE,
                stderr=slave, text=True)
        finally:
            os.close(slave)
        self._master = master
        self._shown = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                return
            if not data:
                return
            with self._lock:
                self._shown += data

    def text(self) -> str:
        with self._lock:
            return self._shown.decode(errors="replace")

    def wait_drawn(self, text: str) -> None:
        try:
            wait_until(lambda: text in self.text(), timeout=60, what=f"{text!r} drawn")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; drawn: {self.text()!r}") from exc

    def finish(self) -> tuple[int, str, str]:
        """(exit status, stdout, everything drawn) once the command has ended."""
        out, _ = self.process.communicate(timeout=90)
        self._reader.join(timeout=30)
        os.close(self._master)
        return self.process.returncode, out, self.text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def on_terminal(*args: str, columns: int = 0, prefix: Sequence[str] = ()
                ) -> Iterator[OnTerminal]:
    terminal = OnTerminal(*args, columns=columns, prefix=prefix)
    try:
        yield terminal
    finally:
        terminal.kill()
