"""`vidcache serve` runs the service; `vidcache ingest`, `list`, `show`, `delete`, `resolve`,
`get` and `ingests` ask a running one, through the client, to ingest URLs or local files, list,
describe or delete videos, say which video a URL was ingested as, download one, or list the
ingests under way."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

import httpx

from vidcache import __version__
from vidcache.chunks import (
    DEFAULT_CHUNK_SIZE,
    KIB,
    MAX_CHUNK_SIZE,
    MIB,
    MIN_CHUNK_SIZE,
    check_chunk_size,
)
from vidcache.config import DEFAULT_PORT, MIN_MEDIA_MEMORY, ServiceConfig
from vidcache.errors import VidcacheError
from vidcache.hostguard import HostGuard
from vidcache_client import (
    AuthError,
    ByteRange,
    IngestUnderWay,
    NotFoundError,
    RangeNotSatisfiableError,
    RequestTimeout,
    StatusError,
    TransportError,
    VidCacheClient,
    VidCacheError,
)
from vidcache_client._arguments import (
    HelpFormatter,
    RawDescriptionHelpFormatter,
    TokenFileError,
    positive_seconds,
    read_token_file,
    service_url,
    signal_name,
)
from vidcache_client._arguments import parse_size as parse_any_size
from vidcache_client._credentials import without_credentials
from vidcache_client._files import write_whole
from vidcache_client._validate import validate_hash

if TYPE_CHECKING:  # imported where the service starts: the client commands need none of it
    from fastapi import FastAPI

ALLOW_ENV = "VIDCACHE_INGEST_ALLOW"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# The service answers an ingest once the video is downloaded, checked and stored: up to its
# --max-download-time (default 3600 s), then the time to probe and hash it.
_INGEST_TIMEOUT = 4000.0
# list, show and delete: the service answers them at once (a delete may wait for an ingest's
# commit, a fraction of a second)
_CALL_TIMEOUT = 30.0
_CALL_TIMEOUT_HELP = (f"seconds to wait for each of the service's answers (default "
                      f"{_CALL_TIMEOUT:g})")
# seconds the requests in flight get to finish at SIGTERM, Ctrl-C or SIGHUP
_GRACE = 5
# connections waiting to be accepted: uvicorn's default, which it used when it bound the port
_BACKLOG = 2048
# The pieces `vidcache get` receives a video in (the client's chunk_size), each counted by its
# progress line once written: 0.26 s of a 1 Mbit/s link, where the client's default 1 MiB held
# the line still for 8.4 s. No slower: httpx reads 64 KiB at a time, which 1 MiB chunks are
# joined from (a loopback get of 200 MiB: 0.57 s against 0.64 s, medians of 15).
_STREAM_CHUNK = 32 * KIB


def parse_size(text: str) -> int:
    """Bytes from `123`, `500M`, `4G`, `1.5GiB` (binary units); ArgumentTypeError if not, or 0."""
    size = parse_any_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def _memory_cap(text: str) -> int | None:
    """A size of at least MIN_MEDIA_MEMORY, or None for 0 (no cap)."""
    size = parse_any_size(text)
    if 0 < size < MIN_MEDIA_MEMORY:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_MEDIA_MEMORY // MIB}M (ffprobe alone needs 56 MiB, and "
            f"fails without a word below), or 0 for no cap, not {text!r}")
    return size or None


def _allow_entry(text: str) -> str:
    try:
        HostGuard([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _data_dir(text: str) -> Path:
    if not text:  # Path("") is the current directory: `--data "$UNSET"` would serve it
        raise argparse.ArgumentTypeError("must name a directory, not ''")
    return Path(text)


def _directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"not a directory: {text}")
    return path.resolve()


def _chunk_size(text: str) -> int:
    try:
        return check_chunk_size(parse_size(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# The checks below name the value they refuse: argparse's own message for a ValueError names
# the function ("invalid _port value").
def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _threshold(text: str) -> int:
    value = _integer(text)
    if value is None or not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 0 to 64 (bits of a 64-bit hash), not {text!r}")
    return value


def _host(text: str) -> str:
    if not text:  # uvicorn binds '' on every interface: `--host "$UNSET"` would open the API
        raise argparse.ArgumentTypeError("must name an address, not '' (0.0.0.0 and :: are "
                                         "every interface)")
    return text


def _port(text: str) -> int:
    # uvicorn would take 99999 (listening on 99999 % 65536 while saying 99999) and -1.
    value = _integer(text)
    if value is None or not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, not {text!r}")
    return value


def _whole_seconds(text: str) -> int:
    value = _integer(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive whole number of seconds, not {text!r}")
    return value


def _token_file(text: str) -> str:
    """The token read from the file named `text` (argparse turns the error into exit 2)."""
    try:
        return read_token_file(text)
    except TokenFileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _output(text: str) -> str:
    if not text:  # `-o "$UNSET"` would write the default name instead
        raise argparse.ArgumentTypeError("must name a file (or - for stdout), not ''")
    return text


def _content_hash(text: str) -> str:
    try:
        return validate_hash(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"must be a video's hash, 64 lowercase hex digits, not {text!r}") from exc


def _url_to_resolve(text: str) -> str:
    """`vidcache resolve`'s URL, refused as a usage error (as a malformed hash is, and none is
    asked for) only when it is no URL at all: empty, not UTF-8 (no request can carry it), or a
    local file's path, named with the file:// URL its ingest sent. Any other is asked for: a
    vidcache 1.x deployment may ingest URLs this service's ingest refuses."""
    if not text:
        raise argparse.ArgumentTypeError("an empty URL")
    try:
        text.encode()
    except UnicodeEncodeError as exc:  # not shown: it may hold a password
        raise argparse.ArgumentTypeError("not UTF-8 text, which no request can carry") from exc
    if not _SCHEME.match(text) and (text.startswith("/") or os.path.exists(text)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is a path, not a URL: vidcache ingest sends a local file's path as its "
            f"file:// URL, {Path(text).resolve().as_uri()}")
    return text


# START-END or START-: ASCII digits only (int() takes other digits, and "_")
_BYTE_RANGE = re.compile(r"([0-9]+)-([0-9]*)")


def _byte_range(text: str) -> tuple[int, int | None]:
    """(start, end) of `--range START-END`, both inclusive; end None for `START-`."""
    match = _BYTE_RANGE.fullmatch(text)
    if match is not None:
        start, end = int(match[1]), int(match[2]) if match[2] else None
        if end is None or start <= end:
            return start, end
    raise argparse.ArgumentTypeError(
        f"must be START-END, the first and last byte to get (counted from 0, END not before "
        f"START), or START- for the rest of the video, not {text!r}")


def _meta_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidcache", formatter_class=HelpFormatter,
        description="vidcache: a content-addressed video cache service (vidcache 1.x API).")
    parser.add_argument("--version", action="version", version=f"vidcache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the service", formatter_class=HelpFormatter,
        description="Run the vidcache service over the data directory DIR (blobs, SQLite index "
                    "and temp files all live there; one server per directory).",
        epilog=f"Hosts that resolve to loopback, private, link-local or other non-public "
               f"addresses are refused for ingest unless allowed with --ingest-allow or "
               f"${ALLOW_ENV} (comma-separated), e.g. --ingest-allow 127.0.0.1 "
               f"--ingest-allow 10.0.0.0/8. "
               f"Exit status at start: 1 if DIR cannot be used (or SSL_CERT_FILE, or "
               f"--media-memory on this machine), 2 for a bad option, 3 if it "
               f"cannot listen (address in use), 130 on Ctrl-C before it is ready (SIGTERM and "
               f"SIGHUP then end it, with what it opened closed). SIGTERM, "
               f"Ctrl-C and SIGHUP (unless ignored, as under nohup) stop it gracefully once it "
               f"is ready: requests in flight get {_GRACE} s.")
    serve.add_argument("--data", metavar="DIR", type=_data_dir, required=True,
                       help="data directory (created if missing)")
    serve.add_argument("--host", type=_host, default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; without --token-file "
                            "the API has no authentication)")
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT,
                       help=f"port to listen on, 1-65535 (default {DEFAULT_PORT})")
    serve.add_argument("--max-size", metavar="SIZE", type=parse_size, default="4G",
                       help="largest video ingest accepts, bytes or K/M/G/T of 1024 (default 4G)")
    serve.add_argument("--download-timeout", metavar="S", type=positive_seconds, default=30.0,
                       help="seconds a download may make no progress (default 30)")
    serve.add_argument("--max-download-time", metavar="S", type=positive_seconds, default=3600.0,
                       help="seconds a whole download may take (default 3600)")
    serve.add_argument("--media-memory", metavar="SIZE", type=_memory_cap, default="3G",
                       help="memory each ffprobe/ffmpeg run may take (its data segment: heap "
                            "and thread stacks), bytes or K/M/G/T of 1024, at least 128M; a "
                            "video that needs more is refused (422); 0: no cap (default 3G)")
    serve.add_argument("--keep-alive", metavar="S", type=_whole_seconds, default=75,
                       help="whole seconds an idle client connection is kept open, so a "
                            "reader that paused (a player, vcfs) needs no new connection; "
                            "also how long a client may stay silent before its request is "
                            "whole (default 75)")
    serve.add_argument("--phash-threshold", metavar="BITS", type=_threshold, default=10,
                       help="largest mean perceptual-hash distance (of 64 bits) that counts "
                            "as the same video, no sampled frame more than twice it apart "
                            "(default 10)")
    serve.add_argument("--chunk-size", metavar="SIZE", type=_chunk_size,
                       default=DEFAULT_CHUNK_SIZE,
                       help="record a BLAKE3 digest per chunk of this size for new ingests, "
                            "published at /video/HASH/chunks: a power of two from "
                            f"{MIN_CHUNK_SIZE // KIB}K to {MAX_CHUNK_SIZE // MIB}M "
                            f"(default {DEFAULT_CHUNK_SIZE // KIB}K; stored videos keep theirs)")
    serve.add_argument("--allow-file-dir", metavar="DIR", type=_directory, action="append",
                       default=[], help="allow file:// ingest URLs below DIR, an existing "
                                        "directory (repeatable)")
    serve.add_argument("--ingest-allow", metavar="HOST_OR_CIDR", type=_allow_entry,
                       action="append", default=[],
                       help="allow ingest from this host name, IP or network although it is "
                            f"loopback/private (repeatable; also ${ALLOW_ENV})")
    serve.add_argument("--token-file", metavar="FILE", dest="token", type=_token_file,
                       help="require 'Authorization: Bearer <token>' for ingest and delete; "
                            "the token is the file's one line (printable ASCII, no spaces)")
    serve.add_argument("--token-reads", action="store_true",
                       help="require the token for reads too (all but /health and the API "
                            "description); needs --token-file")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                       help="log level (default info)")

    _add_client_commands(commands)
    return parser


def _add_service_options(parser: argparse.ArgumentParser, timeout: float,
                         timeout_help: str) -> None:
    """--server, --token-file and --timeout, as every command asking a running service has."""
    parser.add_argument("--server", type=service_url,
                        default=f"http://127.0.0.1:{DEFAULT_PORT}",
                        help=f"service base URL (default http://127.0.0.1:{DEFAULT_PORT})")
    parser.add_argument("--token-file", metavar="FILE", dest="token", type=_token_file,
                        help="send the bearer token in FILE (for a server run with "
                             "--token-file)")
    parser.add_argument("--timeout", metavar="S", type=positive_seconds, default=timeout,
                        help=timeout_help)


def _add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands that ask a running service, through the client."""
    # Raw: the examples keep their lines; the options' help is still wrapped.
    raw = RawDescriptionHelpFormatter
    ingest = commands.add_parser(
        "ingest", formatter_class=raw,
        help="ingest URLs or local files into a running service, one JSON result each",
        description="""\
Ask a running vidcache service to ingest each URL_OR_PATH, one after another,
and print each result as one JSON line, naming the URL_OR_PATH it is for as
given (its user:password@ left out, the secrets of its query REDACTED):
  {"hash", "status", "file_path", "phash_distance"?, "source"}
A local file's path is sent as its absolute file:// URL: the service reads the
file itself, so it must run on this machine and allow the file's directory
(vidcache serve --allow-file-dir DIR).""",
        epilog="""\
examples:
  vidcache ingest https://example.com/v.mp4 --bucket videos --meta title="My video"
  vidcache ingest /srv/incoming/*.mp4 --bucket videos --prefix 2024
  xargs -a urls.txt vidcache ingest --bucket videos >results.jsonl

Exit status: 0 if every one is stored (new, duplicate or url_alias); 1 if any
is not (each on stderr with the service's reason, or why it could not be
reached; the others are still ingested); 2 for a bad option; 130 on Ctrl-C (the
service may still store the one under way).""")
    ingest.add_argument("sources", metavar="URL_OR_PATH", nargs="+",
                        help="http(s):// URL of a video, file:// URL, or the path of a local "
                             "file")
    ingest.add_argument("--bucket", required=True,
                        help="bucket to store a new video in: 1-128 of A-Z a-z 0-9 . _ -, not "
                             "starting with . or -")
    ingest.add_argument("--prefix", default="",
                        help="prefix inside the bucket, one segment like BUCKET (default none)")
    ingest.add_argument("--meta", metavar="KEY=VALUE", type=_meta_item, action="append",
                        default=[], help="metadata stored with a new video (repeatable)")
    _add_service_options(ingest, _INGEST_TIMEOUT,
                         "seconds to wait for the service's answer to each, which comes once "
                         f"the video is stored (default {_INGEST_TIMEOUT:g}: the service's "
                         "default --max-download-time and time to check it); on a terminal "
                         "its progress is shown")

    listing = commands.add_parser(
        "list", formatter_class=raw, help="list the stored videos",
        description="""\
List the videos a running vidcache service stores, ordered by hash, one line
each: hash, size in bytes, duration in seconds and file_path (in the data
directory), separated by tabs (no field holds a space); with --json, each one's
metadata (the fields of vidcache show) as one JSON line.""",
        epilog="""\
examples:
  vidcache list --bucket videos
  vidcache list | cut -f1                       # the hashes
  vidcache list | sort -k2,2n | tail -5         # the 5 largest
  vidcache list --json | jq -r 'select(.duration_s > 600) | .aliases[]'

Exit status: 0; 1 if the service failed or could not be reached (the lines
printed before stay); 2 for a bad option; 141 if its reader leaves early
(| head), as for a command killed by SIGPIPE.""")
    listing.add_argument("--bucket", help="only the videos of this bucket")
    listing.add_argument("--prefix",
                         help="only the videos of this prefix ('' for those without one)")
    listing.add_argument("--json", action="store_true",
                         help="print each video's metadata as one JSON line")
    _add_service_options(listing, _CALL_TIMEOUT, _CALL_TIMEOUT_HELP)

    show = commands.add_parser(
        "show", formatter_class=raw, help="print a stored video's metadata as JSON",
        description="""\
Print what a running vidcache service stores about the video HASH, as JSON:
{"hash", "size_bytes", "duration_s", "first_seen", "aliases", "meta", "bucket",
"prefix", "file_path", "mime_type"}.""",
        epilog="""\
examples:
  vidcache show 9f2c...
  vidcache show "$hash" | jq -r .aliases[]

Exit status: 0; 1 if there is no such video, or the service failed or could
not be reached; 2 for a bad option or a malformed HASH.""")
    show.add_argument("hash", metavar="HASH", type=_content_hash,
                      help="the video's hash (64 lowercase hex digits)")
    _add_service_options(show, _CALL_TIMEOUT, _CALL_TIMEOUT_HELP)

    delete = commands.add_parser(
        "delete", formatter_class=raw, help="delete stored videos",
        description="""\
Delete each video HASH from a running vidcache service (its file, its record
and every URL alias), printing "deleted HASH" for each. A service run with
--token-file needs its token.""",
        epilog="""\
examples:
  vidcache delete 9f2c... --token-file /etc/vidcache/token
  vidcache list --bucket scratch | cut -f1 | xargs -r vidcache delete

Exit status: 0 if every one was deleted; 1 if any was not (no such video, the
service's reason, or why it could not be reached: each on stderr, the others
still deleted); 2 for a bad option or a malformed HASH (then none is deleted).""")
    delete.add_argument("hashes", metavar="HASH", nargs="+", type=_content_hash,
                        help="a video's hash (64 lowercase hex digits)")
    _add_service_options(delete, _CALL_TIMEOUT, _CALL_TIMEOUT_HELP)

    resolve = commands.add_parser(
        "resolve", formatter_class=raw, help="say which stored video each URL was ingested as",
        description="""\
Ask a running vidcache service which video each URL was ingested as (an ingest
of it, or of another URL of the same video, stored it), and print its hash, one
line per URL in the order given (each once); with --json, the service's answer
{"hash", "url"} as one JSON line, its "url" naming the URL (without its
user:password@, the secrets of its query REDACTED). Nothing is downloaded.""",
        epilog="""\
examples:
  vidcache resolve https://example.com/v.mp4
  vidcache show "$(vidcache resolve https://example.com/v.mp4)"
  xargs -a urls.txt vidcache resolve --json >hashes.jsonl

Exit status: 0 if every URL is known; 1 if any is not (each on stderr, the
others still printed), or the service failed or could not be reached; 2 for a
bad option or a URL that is no URL (empty, not UTF-8, a file's path: then none
is asked for).""")
    resolve.add_argument("urls", metavar="URL", nargs="+", type=_url_to_resolve,
                         help="a URL as it was ingested (the service matches it exactly)")
    resolve.add_argument("--json", action="store_true",
                         help='print the service\'s answer, {"hash", "url"}, as one JSON line')
    _add_service_options(resolve, _CALL_TIMEOUT, _CALL_TIMEOUT_HELP)

    get = commands.add_parser(
        "get", formatter_class=raw, help="download a stored video, or a range of its bytes",
        description="""\
Download the video HASH from a running vidcache service into FILE (default:
HASH plus the stored file's extension, .bin if it has none, as vcfs names it,
in the current directory), or to stdout with -o -. The bytes go to a temporary
file beside FILE, renamed to FILE once every byte has arrived and is on disk: a
download that fails or is interrupted leaves no file (nor part of one) under
that name. An existing FILE is left alone unless --force. On a terminal the
progress is shown on stderr, as vidcache ingest shows it.""",
        epilog="""\
examples:
  vidcache get 9f2c...                            # ./9f2c....mp4
  vidcache get "$hash" -o /srv/export/talk.mp4 --force
  vidcache get "$hash" --range 0-1048575 -o head.bin   # the first MiB
  vidcache get "$hash" -o - | ffprobe -i -

Exit status: 0; 1 if there is no such video, FILE exists (without --force) or
cannot be written, the range starts past the video's end, or the service failed
or could not be reached (nothing is left under FILE); 2 for a bad option, a
malformed HASH or range, --range without -o, or -o - with stdout a terminal;
130 on Ctrl-C (nothing left under FILE); 141 if the reader of stdout leaves
early.""")
    get.add_argument("hash", metavar="HASH", type=_content_hash,
                     help="the video's hash (64 lowercase hex digits)")
    get.add_argument("-o", "--output", metavar="FILE", type=_output,
                     help="the file to write (- for stdout; default HASH.EXT here)")
    get.add_argument("--range", metavar="START-END", type=_byte_range,
                     help="only bytes START to END, both included and counted from 0 ('START-' "
                          "for the rest); a range past the end stops at the last byte; needs -o")
    get.add_argument("--force", action="store_true",
                     help="replace FILE if it exists (still only once the download is whole)")
    _add_service_options(get, _CALL_TIMEOUT,
                         f"seconds to wait for the service's answer and then for each piece "
                         f"of the video, not for the whole download (default {_CALL_TIMEOUT:g})")

    ingests = commands.add_parser(
        "ingests", formatter_class=raw, help="list the ingests under way",
        description="""\
List the ingests a running vidcache service is running right now (GET /ingests),
oldest first, as a table: how long ago each was asked for, its phase, its
progress (bytes received of the origin's Content-Length, and the percentage, when
the origin announced it), its bucket/prefix and its URL (without credentials).
With --json, the service's answer as one JSON line: {"items": [{"url", "bucket",
"prefix", "phase", "bytes_received", "bytes_expected", "started"}...]}.""",
        epilog="""\
examples:
  vidcache ingests
  watch -n1 vidcache ingests
  vidcache ingests --json | jq -r '.items[] | select(.phase == "downloading") | .url'

Exit status: 0 (also when none is under way); 1 if the service failed, could not
be reached, or has no GET /ingests (a vidcache without that extension); 2 for a
bad option.""")
    ingests.add_argument("--json", action="store_true",
                         help="print the service's answer as one JSON line")
    _add_service_options(ingests, _CALL_TIMEOUT, _CALL_TIMEOUT_HELP)


class StoppedStarting(BaseException):
    """A stop signal (SIGTERM, Ctrl-C, SIGHUP) that came before the service was ready, raised
    wherever the start was (recovering the data directory, say), so that what it had opened
    is closed on the way out. A BaseException, as KeyboardInterrupt: no `except Exception` of
    the start takes it for a failure of its own."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StartSignals:
    """The handler of SIGTERM, SIGINT and SIGHUP (unless ignored, as under nohup) from the
    moment `vidcache serve` has read its command line: until uvicorn has its own handlers, the
    first of them raises StoppedStarting, and any after it waits for the start to wind down
    (ignored). uvicorn puts back the handlers it found when it has shut down and raises the
    signal it got again: from `hand_over()` on, this one does what the signal did before (the
    default action; KeyboardInterrupt for SIGINT)."""

    def __init__(self) -> None:
        self.state = "starting"
        self.previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue
            self.previous[signum] = signal.signal(signum, self)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.state == "starting":
            self.state = "stopping"
            raise StoppedStarting(signum)
        if self.state == "handed over":
            previous = self.previous[signum]
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signum, previous)
                signal.raise_signal(signum)

    def hand_over(self) -> None:
        self.state = "handed over"

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def _serve(args: argparse.Namespace) -> int:
    start_signals = _StartSignals()
    try:
        return _start(args, start_signals)
    except StoppedStarting as stop:
        # the sockets, the lock and the index are closed, a recovery cut short is done again
        # at the next start: what is left is to say so, and end as the signal ends it once
        # the service is ready (uvicorn raises SIGTERM and SIGHUP again; Ctrl-C: 130, which
        # says it never served)
        if stop.signum == signal.SIGINT:
            print("vidcache serve: interrupted before it was ready", file=sys.stderr)
            return 130
        print(f"vidcache serve: stopped by {signal_name(stop.signum)} before it was ready",
              file=sys.stderr)
        signal.signal(stop.signum, signal.SIG_DFL)
        signal.raise_signal(stop.signum)
        return 128 + stop.signum  # the signal blocked (a mask inherited): a shell's status
    finally:
        start_signals.restore()


def _start(args: argparse.Namespace, start_signals: _StartSignals) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.token_reads and args.token is None:
        print("vidcache serve: error: --token-reads needs --token-file", file=sys.stderr)
        return 2
    from_env = [entry for entry in os.environ.get(ALLOW_ENV, "").split(",") if entry.strip()]
    try:
        allow = [*args.ingest_allow, *(_allow_entry(entry) for entry in from_env)]
    except argparse.ArgumentTypeError as exc:
        print(f"vidcache serve: error: ${ALLOW_ENV}: {exc}", file=sys.stderr)
        return 2
    config = ServiceConfig(
        data_dir=args.data.resolve(), host=args.host, port=args.port, max_size=args.max_size,
        download_timeout=args.download_timeout, max_download_time=args.max_download_time,
        phash_threshold=args.phash_threshold, chunk_size=args.chunk_size,
        allow_file_dirs=tuple(args.allow_file_dir),
        ingest_allow=tuple(allow), log_level=args.log_level, token=args.token,
        token_reads=args.token_reads, keep_alive=args.keep_alive,
        media_memory=args.media_memory)
    try:  # before the data directory is opened; uvicorn would say only "Name ... not known"
        addresses = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        print(f"vidcache serve: error: --host {config.host}: {exc.strerror}", file=sys.stderr)
        return 2
    sockets = _listening_sockets(addresses)
    if isinstance(sockets, str):
        print(f"vidcache serve: error: cannot listen on {config.host} port {config.port}: "
              f"{sockets}", file=sys.stderr)
        return 3
    try:
        return _serve_on(sockets, config, start_signals)
    finally:
        for sock in sockets:
            sock.close()


def _listening_sockets(addresses: list[tuple[Any, ...]]) -> list[socket.socket] | str:
    """A socket listening on each of `addresses`, bound as asyncio binds them for uvicorn; or
    why one cannot be (another server has its port). Said before the data directory is opened,
    where uvicorn's own bind error came after it, as log lines that name neither the option to
    change nor what to do. Listening at once holds the port (two sockets with SO_REUSEADDR may
    both bind it until one listens); a client that connects while the data directory is opened
    waits in the backlog and is answered once the app has started."""
    sockets: list[socket.socket] = []
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this kernel lacks (IPv6 disabled): asyncio skips it too
            continue
        sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio binds it, beside an IPv4 socket
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
            sock.listen(_BACKLOG)
        except OSError as exc:
            for bound in sockets:
                bound.close()
            advice = {errno.EADDRINUSE: "something else listens there: stop it or give "
                                        "another --port",
                      errno.EACCES: "a port below 1024 needs root: give another --port",
                      errno.EADDRNOTAVAIL: "no interface of this machine has that "
                                           "address: give another --host"}
            reason = (exc.strerror or str(exc)).lower()
            hint = advice.get(exc.errno or 0)
            return f"{reason} ({hint})" if hint else reason
    return sockets or "no address of a kind this machine supports"


def _serve_on(sockets: list[socket.socket], config: ServiceConfig,
              start_signals: _StartSignals) -> int:
    """Opens the data directory and serves the app on `sockets` until SIGTERM, Ctrl-C or
    SIGHUP; StoppedStarting, with the data directory closed, if one comes before uvicorn
    handles them."""
    from vidcache.app import create_app
    from vidcache.http_protocol import without_uvicorns_parse_warning
    from vidcache.store import INDEX_FILE, INTERNAL_DIR

    logging.getLogger("uvicorn.access").addFilter(_query_without_credentials)
    logging.getLogger("uvicorn.error").addFilter(without_uvicorns_parse_warning)
    # httpx logs each request with the pinned IP; ingest logs the outcome with the URL instead
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        app = create_app(config)
    except VidcacheError as exc:
        print(f"vidcache serve: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"vidcache serve: error: cannot use {config.data_dir} as the data directory: "
              f"{exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # one the store does not explain (a table of another shape)
        print(f"vidcache serve: error: cannot open the index "
              f"{config.data_dir / INTERNAL_DIR / INDEX_FILE}: {exc}", file=sys.stderr)
        return 1
    try:
        _run_uvicorn(app, sockets, config, start_signals)
    except StoppedStarting:  # before uvicorn took the signals: its lifespan never started
        app.state.close_unstarted()
        raise
    return 0


def _run_uvicorn(app: FastAPI, sockets: list[socket.socket], config: ServiceConfig,
                 start_signals: _StartSignals) -> None:
    """Serves `app` on `sockets` until SIGTERM, Ctrl-C or SIGHUP."""
    import uvicorn

    from vidcache.http_protocol import PipelinedHttpToolsProtocol
    from vidcache.ingest import STOP_TIMEOUT

    auth = ("no authentication" if config.token is None else
            "bearer token required for every request but /health and the API description"
            if config.token_reads else
            "bearer token required for ingest and delete")
    host = f"[{config.host}]" if ":" in config.host else config.host  # an IPv6 address
    # uvicorn logs no "running on ..." line for sockets handed to it: this line says it
    serving = (f"serving {config.data_dir} on http://{host}:{config.port} ({auth}); "
               f"Ctrl-C stops it")

    class Server(uvicorn.Server):
        """Says `serving ...` once its sockets listen. Takes SIGHUP (its terminal closed) as
        uvicorn takes SIGTERM: a graceful shutdown, then the signal again (uvicorn handles only
        SIGINT and SIGTERM: a SIGHUP cut the requests in flight); but not under nohup, whose
        SIGHUP stays ignored. At shutdown, stops the ingests still running when the grace
        period is over, so that they answer 503 before uvicorn cancels the requests left (a
        plain-text 500 and a traceback each)."""

        hung_up = False

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            before = signal.getsignal(signal.SIGHUP)
            taken = before != signal.SIG_IGN
            if taken:
                signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                with super().capture_signals():
                    # Replaced by uvicorn's, with no moment in between when a signal does
                    # what it does by default; put back when uvicorn is done, for it to
                    # raise the signal again.
                    start_signals.hand_over()
                    yield
            finally:
                if taken:
                    signal.signal(signal.SIGHUP, before)
            if self.hung_up:
                signal.raise_signal(signal.SIGHUP)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.hung_up = self.hung_up or sig == signal.SIGHUP
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            logging.getLogger("vidcache").info("%s", serving)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            stop = asyncio.get_running_loop().call_later(_GRACE, app.state.stop_ingests)
            try:
                await super().shutdown(sockets)
            finally:
                stop.cancel()

    # log_config=None: uvicorn's loggers go through the format configured above
    server = Server(uvicorn.Config(
        app, log_level=config.log_level, log_config=None, backlog=_BACKLOG,
        timeout_graceful_shutdown=_GRACE + STOP_TIMEOUT, timeout_keep_alive=config.keep_alive,
        http=PipelinedHttpToolsProtocol))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has shut down gracefully
        server.run(sockets=sockets)


def _query_without_credentials(record: logging.LogRecord) -> bool:
    """uvicorn's access log line with the URLs in its query (`GET /resolve?url=...`) shown
    without their credentials, as every other line of the log shows a URL."""
    if isinstance(record.args, tuple) and len(record.args) == 5:  # client, method, target...
        target = record.args[2]
        if isinstance(target, str):
            record.args = (*record.args[:2], without_credentials(target), *record.args[3:])
    return True


# What a vidcache service never answers these requests with, another web server may: 404 (no
# such path), 405 or 501 (no such method).
_NOT_VIDCACHE_STATUSES = frozenset({404, 405, 501})
# How a URL starts; a source of `vidcache ingest` that does not (nor names a file) is neither.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# the most records GET /videos gives in one page: the fewest requests for a whole listing
_PAGE_SIZE = 1000
# an ingest whose answer did not come (the service goes on): what the caller can do
_MAY_STILL_STORE = ("the service may still store %s: ingest the URL again later (a stored URL "
                    "is answered at once)")


def _failure(command: str, exc: VidCacheError, args: argparse.Namespace, request: str, *,
             about: str = "", advice: str = "", content_hash: str | None = None) -> str:
    """The error line of `vidcache COMMAND` for what the client raised asking `request`
    (`POST /ingest`), starting with `about` (the argument it is for) if given, with a line of
    `advice` after it if any; `content_hash`: the video asked for, whose 404 from the service
    says there is no such video."""
    message = str(exc)
    if isinstance(exc, AuthError) and exc.status_code == 401:
        # The call (the client's words: "ingest of URL", which names the URL of several)
        # without the client's advice, which names its Python API (VidCacheClient(...,
        # token=...), "the client's base URL"): this command's options are the advice.
        call = message.partition(f": HTTP {exc.status_code} ")[0]
        if exc.json_detail:  # vidcache's own refusal: its reason
            message = f"{call}: HTTP 401: {exc.detail}"
            advice = ("give the server's token with --token-file FILE" if args.token is None
                      else "the server refused the token of --token-file")
        else:  # a proxy's page, not shown
            message = f"{call}: HTTP 401 from a proxy in front of the service"
            advice = ("the proxy refused the user:password@ of --server"
                      if httpx.URL(args.server).userinfo else
                      "if the proxy asks for HTTP Basic auth, give user:password@ in --server")
    elif isinstance(exc, NotFoundError) and exc.json_detail and content_hash is not None:
        message = _no_video(content_hash, args)
    elif (isinstance(exc, StatusError) and exc.status_code in _NOT_VIDCACHE_STATUSES
          and not exc.json_detail):  # a vidcache explains itself in JSON
        # Not the other server's error page (HTML) as the reason.
        message = (f"{without_credentials(args.server)} answered {request} with HTTP "
                   f"{exc.status_code}: not a vidcache service (check --server)")
    elif isinstance(exc, TransportError) and exc.refused:
        message = (f"{message}: nothing listens there (start the service, vidcache serve, or "
                   "check --server)")
    line = f"vidcache {command}: error: {f'{about}: ' if about else ''}{message}"
    return f"{line}\nvidcache {command}: {advice}" if advice else line


def _no_video(content_hash: str, args: argparse.Namespace) -> str:
    return f"no video {content_hash} at {without_credentials(args.server)}"


def _emit(line: str) -> None:
    """`line` on stdout at once: a reader of several results sees each as it comes."""
    print(line, flush=True)


def _ingest_url(source: str) -> str | None:
    """What the service is asked to ingest for `source`: an existing local file's absolute
    file:// URL (symlinks resolved, as the service checks the real path against its
    --allow-file-dir), else `source` itself if it is a URL; None if it is neither."""
    if os.path.exists(source):
        return Path(source).resolve().as_uri()
    return source if _SCHEME.match(source) else None


def _ingest_advice(exc: VidCacheError, url: str) -> str:
    if isinstance(exc, RequestTimeout):
        return f"{_MAY_STILL_STORE % 'it'}, or wait longer with --timeout"
    if isinstance(exc, StatusError) and exc.status_code == 504 and not exc.json_detail:
        # not the service's own 504 (JSON: the origin timed out, nothing stored), a proxy's
        return ("a proxy in front stopped waiting (its read timeout, e.g. nginx's "
                f"proxy_read_timeout, 60 s by default); {_MAY_STILL_STORE % 'it'}")
    if isinstance(exc, AuthError) and exc.status_code == 403 and url.startswith("file:"):
        directory = os.path.dirname(unquote(urlsplit(url).path))
        return ("the service ingests only the local files it can read below a directory it "
                f"allows: start it with --allow-file-dir {directory} (or a directory above)")
    return ""


def _ingest(client: VidCacheClient, args: argparse.Namespace) -> int:
    from vidcache.progress_line import own_ingest, progress_on_terminal

    failed = False
    for number, source in enumerate(args.sources):
        url = _ingest_url(source)
        if url is None:
            print(f"vidcache ingest: error: {without_credentials(source)}: no such file, and "
                  "not a URL (http://, https:// or file://)", file=sys.stderr)
            failed = True
            continue
        shown = without_credentials(url)
        try:
            with progress_on_terminal(partial(own_ingest, client, shown)):
                result = client.ingest(url, args.bucket, prefix=args.prefix,
                                       meta=dict(args.meta))
        except VidCacheError as exc:
            # A path is sent as its file:// URL, symlinks resolved: the line names it as given
            # too, as the results' "source" does.
            about = without_credentials(source) if url != source else ""
            print(_failure("ingest", exc, args, "POST /ingest", about=about,
                           advice=_ingest_advice(exc, url)), file=sys.stderr)
            failed = True
            continue
        except KeyboardInterrupt:
            which = shown if len(args.sources) > 1 else "it"
            left = len(args.sources) - number - 1
            rest = f"; the {left} after it were not asked for" if left else ""
            print(f"vidcache ingest: interrupted; {_MAY_STILL_STORE % which}{rest}",
                  file=sys.stderr)
            return 130
        # which line is which, when the failures between them went to stderr
        _emit(json.dumps({**result, "source": without_credentials(source)}))
    return 1 if failed else 0


def _listing_line(item: dict[str, Any]) -> str:
    """A video of `vidcache list`: hash, size, duration and file_path, separated by tabs."""
    duration = item.get("duration_s")
    seconds = f"{duration:.3f}" if isinstance(duration, int | float) else "-"
    return "\t".join((str(item.get("hash")), str(item.get("size_bytes")), seconds,
                      str(item.get("file_path"))))


def _list(client: VidCacheClient, args: argparse.Namespace) -> int:
    try:
        for item in client.list_videos(bucket=args.bucket, prefix=args.prefix,
                                       page_size=_PAGE_SIZE):
            _emit(json.dumps(item) if args.json else _listing_line(item))
    except VidCacheError as exc:
        print(_failure("list", exc, args, "GET /videos"), file=sys.stderr)
        return 1
    return 0


def _show(client: VidCacheClient, args: argparse.Namespace) -> int:
    try:
        meta = client.get_meta(args.hash)
    except VidCacheError as exc:
        print(_failure("show", exc, args, f"GET /meta/{args.hash}"), file=sys.stderr)
        return 1
    if meta is None:
        print(f"vidcache show: error: {_no_video(args.hash, args)}", file=sys.stderr)
        return 1
    _emit(json.dumps(meta, indent=2))
    return 0


def _delete(client: VidCacheClient, args: argparse.Namespace) -> int:
    failed = False
    for content_hash in dict.fromkeys(args.hashes):  # each once, in the order given
        try:
            client.delete(content_hash)
        except VidCacheError as exc:
            print(_failure("delete", exc, args, f"DELETE /video/{content_hash}",
                           content_hash=content_hash), file=sys.stderr)
            failed = True
            continue
        _emit(f"deleted {content_hash}")
    return 1 if failed else 0


def _resolve(client: VidCacheClient, args: argparse.Namespace) -> int:
    failed = False
    for url in dict.fromkeys(args.urls):  # each once, in the order given
        try:
            entry = client.resolve(url)
        except VidCacheError as exc:
            print(_failure("resolve", exc, args, "GET /resolve"), file=sys.stderr)
            failed = True
            continue
        if entry is None:
            print(f"vidcache resolve: error: {without_credentials(url)}: no video ingested from "
                  f"this URL at {without_credentials(args.server)}", file=sys.stderr)
            failed = True
            continue
        _emit(json.dumps(entry) if args.json else str(entry["hash"]))
    return 1 if failed else 0


# the extension of a stored file's name that `vidcache get` names its file with, and the one
# for a name without such an extension: as vcfs.paths names a video
_EXTENSION = re.compile(r"\.[a-z0-9]{1,8}")
_NO_EXTENSION = ".bin"


def _default_name(content_hash: str, meta: dict[str, Any]) -> str:
    """HASH plus the extension of the service's file_path if it has one a name can carry,
    else .bin: the name vcfs shows the video under."""
    suffix = PurePosixPath(str(meta.get("file_path") or "")).suffix.lower()
    return content_hash + (suffix if _EXTENSION.fullmatch(suffix) else _NO_EXTENSION)


def _exists(dest: str) -> str:
    return f"vidcache get: error: {dest} exists: give --force to replace it"


def _refused(dest: str, force: bool) -> bool:
    """Whether `vidcache get` will not write `dest` (a directory; without --force, anything
    there), said on stderr."""
    if os.path.isdir(dest):
        refusal = f"vidcache get: error: {dest} is a directory: give the file to write with -o FILE"
    elif os.path.lexists(dest) and not force:
        refusal = _exists(dest)
    else:
        return False
    print(refusal, file=sys.stderr)
    return True


def _get(client: VidCacheClient, args: argparse.Namespace) -> int:
    if args.range is not None and args.output is None:
        print("vidcache get: error: --range needs -o FILE (or -o - for stdout): part of a video "
              "would pass for the video under its name", file=sys.stderr)
        return 2
    if args.output == "-" and sys.stdout is None:  # started with it closed (>&-)
        print("vidcache get: error: cannot write stdout: it is closed", file=sys.stderr)
        return 1
    if args.output == "-" and sys.stdout.isatty():
        print("vidcache get: error: -o - would write the video's bytes to the terminal: "
              "redirect stdout (> FILE, | ffprobe -i -) or give -o FILE", file=sys.stderr)
        return 2
    if args.output not in (None, "-") and _refused(args.output, args.force):
        return 1  # before any request
    try:
        meta = client.get_meta(args.hash)
    except VidCacheError as exc:
        print(_failure("get", exc, args, f"GET /meta/{args.hash}"), file=sys.stderr)
        return 1
    if meta is None:
        print(f"vidcache get: error: {_no_video(args.hash, args)}", file=sys.stderr)
        return 1
    size = meta.get("size_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        print(f"vidcache get: error: metadata of video {args.hash}: no size_bytes in the "
              "service's answer", file=sys.stderr)
        return 1
    byte_range: ByteRange | None = None
    expected = size
    if args.range is not None:
        start, end = args.range
        byte_range = (start, max(start, size - 1) if end is None else end)
        expected = max(0, min(byte_range[1], size - 1) - start + 1)
    dest = args.output or _default_name(args.hash, meta)
    if args.output is None and _refused(dest, args.force):
        return 1  # the name known from the meta, before the video is downloaded
    try:
        if dest == "-":
            _copy_video(client, args.hash, byte_range, expected, sys.stdout.buffer)
            return 0
        written = _save_video(client, args, byte_range, expected, dest)
    except RangeNotSatisfiableError:
        print(f"vidcache get: error: --range starts past the end of the video ({size} bytes: "
              f"the last is byte {size - 1})", file=sys.stderr)
        return 1
    except VidCacheError as exc:
        print(_failure("get", exc, args, f"GET /video/{args.hash}", content_hash=args.hash),
              file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout's reader left: ended as `list` ends then
        raise
    except FileExistsError:  # created while the video was downloaded
        print(_exists(dest), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vidcache get: error: cannot write {dest}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    _emit(f"saved {dest} ({written} bytes)")
    return 0


def _copy_video(client: VidCacheClient, content_hash: str, byte_range: ByteRange | None,
                expected: int, out: BinaryIO) -> int:
    """The video's bytes (or the range's) written to `out`, with their progress on a terminal;
    how many."""
    from vidcache.progress_line import download_on_terminal

    written = 0
    with download_on_terminal(lambda: written, expected), \
            client.stream_video(content_hash, byte_range) as chunks:
        for chunk in chunks:
            rest = memoryview(chunk)
            while rest:  # a pipe whose reader leaves mid-write takes part of it, and says so
                rest = rest[out.write(rest):]
            written += len(chunk)
    out.flush()
    return written


def _save_video(client: VidCacheClient, args: argparse.Namespace,
                byte_range: ByteRange | None, expected: int, dest: str) -> int:
    """The video written to the file `dest` as the client's download_to_file writes it (a
    temporary file renamed once whole and on disk), with its progress shown, and without
    --force never replacing a file, even one made during the download; the bytes written."""
    return write_whole(dest, lambda out: _copy_video(client, args.hash, byte_range, expected,
                                                     out), replace=args.force)


def _age(started: str, now: datetime) -> str:
    """How long ago the ISO-8601 time `started` was: `42 s`, `3 min 5 s`, `2 h 10 min`."""
    try:
        then = datetime.fromisoformat(started)
    except ValueError:
        return "-"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int((now - then).total_seconds()))  # clocks a little apart: not negative
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _ingests_table(ingests: list[IngestUnderWay], now: datetime) -> list[str]:
    """The lines of `vidcache ingests`: a header, then one aligned row per ingest."""
    from vidcache.progress_line import amount

    rows = [("AGE", "PHASE", "PROGRESS", "BUCKET", "URL")]
    for ingest in ingests:
        progress = ("-" if ingest.bytes_received == 0 and ingest.bytes_expected is None else
                    amount(ingest.bytes_received, ingest.bytes_expected))
        bucket = f"{ingest.bucket}/{ingest.prefix}" if ingest.prefix else ingest.bucket
        rows.append((_age(ingest.started, now), ingest.phase, progress, bucket, ingest.url))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)),
                       row[-1]]) for row in rows]


def _ingests(client: VidCacheClient, args: argparse.Namespace) -> int:
    try:
        ingests = client.ingests()
    except NotFoundError as exc:
        if not exc.json_detail:  # another server's page
            print(_failure("ingests", exc, args, "GET /ingests"), file=sys.stderr)
        else:
            print(f"vidcache ingests: error: {without_credentials(args.server)} has no GET "
                  "/ingests (HTTP 404): a vidcache service without that extension, which "
                  "does not list its ingests under way", file=sys.stderr)
        return 1
    except VidCacheError as exc:
        print(_failure("ingests", exc, args, "GET /ingests"), file=sys.stderr)
        return 1
    if args.json:
        _emit(json.dumps({"items": [dataclasses.asdict(ingest) for ingest in ingests]}))
    elif not ingests:
        _emit("no ingests under way")
    else:
        for line in _ingests_table(ingests, datetime.now(UTC)):
            _emit(line)
    return 0


_CLIENT_COMMANDS: dict[str, Callable[[VidCacheClient, argparse.Namespace], int]] = {
    "ingest": _ingest, "list": _list, "show": _show, "delete": _delete, "resolve": _resolve,
    "get": _get, "ingests": _ingests}


def _ask_service(args: argparse.Namespace) -> int:
    """Run a command that asks the service through the client."""
    command = args.command
    if args.token is not None and httpx.URL(args.server).userinfo:
        print(f"vidcache {command}: error: --server's user:password@ and --token-file would "
              "both be the Authorization header: give only one", file=sys.stderr)
        return 2
    try:
        with VidCacheClient(args.server, timeout=args.timeout, chunk_size=_STREAM_CHUNK,
                            token=args.token) as client:
            return _CLIENT_COMMANDS[command](client, args)
    except KeyboardInterrupt:
        print(f"vidcache {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout's reader is gone (`vidcache list | head`): stop quietly, as a command ended
        # by SIGPIPE does, with nothing left to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _serve(args) if args.command == "serve" else _ask_service(args)
