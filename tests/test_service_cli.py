"""The `vidcache` command line: `ingest`, `list`, `show` and `delete` through the real client
against a real service, usage errors, and complete --help texts (of `resolve`, `get` and
`ingests` too, whose other tests are in test_service_cli_reads.py)."""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.faults import Refuse, path_prefix
from bench.stack import stop_process
from tests.service_support import digest, read_then_leave, read_until_closed, store_many
from tests.support import (
    VidcacheServer,
    documented_options,
    free_port,
    interrupt_while_it_waits,
    self_signed_certificate,
    serving,
    sighup_in_children,
    subcommand_options,
    wait_until,
)
from tests.vcfs_fault_support import FaultyLink
from vidcache import __version__, cli
from vidcache_client import VidCacheClient

pytestmark = pytest.mark.timeout(120)

SERVE_OPTIONS = ["--data", "--host", "--port", "--max-size", "--download-timeout",
                 "--max-download-time", "--media-memory", "--keep-alive", "--phash-threshold",
                 "--chunk-size", "--allow-file-dir",
                 "--ingest-allow", "--token-file", "--token-reads", "--log-level",
                 "VIDCACHE_INGEST_ALLOW"]
INGEST_OPTIONS = ["URL", "--bucket", "--prefix", "--meta", "--server", "--token-file",
                  "--timeout"]
SERVICE_OPTIONS = ["--server", "--token-file", "--timeout"]
COMMAND_OPTIONS = {"list": ["--bucket", "--prefix", "--json", *SERVICE_OPTIONS],
                   "show": ["HASH", *SERVICE_OPTIONS], "delete": ["HASH", *SERVICE_OPTIONS],
                   "resolve": ["URL", "--json", *SERVICE_OPTIONS],
                   "get": ["HASH", "--output", "--range", "--force", *SERVICE_OPTIONS],
                   "ingests": ["--json", *SERVICE_OPTIONS]}
TOKEN = "s3cret-token"


def vidcache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vidcache", *args], capture_output=True,
                          text=True, timeout=90)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    with VidcacheServer(tmp_path_factory.mktemp("svc-cli") / "data") as server:
        yield server


def test_ingest_prints_the_result_and_stores_meta(own: VidcacheServer, media_url: str,
                                                  videos: dict[str, Path]) -> None:
    url = f"{media_url}/a.mp4"
    run = vidcache("ingest", url, "--bucket", "cli", "--prefix", "p", "--meta", "title=A b",
                   "--meta", "expr=x=1", "--server", own.url)
    assert run.returncode == 0, run.stderr
    h = digest(videos["a.mp4"].read_bytes())
    expected = {"hash": h, "status": "new", "file_path": f"cli/p/{h[:2]}/{h[2:4]}/{h}.mp4",
                "source": url}
    # byte for byte: scripts (scripts/demo) read it
    assert run.stdout == json.dumps(expected) + "\n"
    assert httpx.get(f"{own.url}/meta/{h}").json()["meta"] == {"title": "A b", "expr": "x=1"}
    again = vidcache("ingest", url, "--bucket", "cli", "--server", own.url)
    assert json.loads(again.stdout)["status"] == "url_alias"


def test_ingest_failure_exits_1_with_the_servers_reason(own: VidcacheServer,
                                                        media_url: str) -> None:
    run = vidcache("ingest", f"{media_url}/a.mp4", "--bucket", "../x", "--server", own.url)
    assert run.returncode == 1
    assert "bad bucket" in run.stderr and run.stdout == ""
    unreachable = vidcache("ingest", f"{media_url}/a.mp4", "--bucket", "b", "--server",
                           f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert "vidcache ingest: error:" in unreachable.stderr


def test_ingest_through_a_server_that_is_not_vidcache_says_so(media_url: str) -> None:
    """The test's origin, a plain file server, answers the POST 501 with an HTML page, which
    was the reason given, tags and all. A --server with `user:password@` (a proxy's Basic
    auth) is named without them (was whole)."""
    for server in (media_url, media_url.replace("http://", "http://user:hunter2@")):
        run = vidcache("ingest", f"{media_url}/a.mp4", "--bucket", "b", "--server", server)
        assert (run.returncode, run.stdout) == (1, "")
        assert run.stderr == (f"vidcache ingest: error: {media_url} answered POST /ingest with "
                              "HTTP 501: not a vidcache service (check --server)\n")


def test_a_vidcache_refusing_an_ingest_with_404_gives_its_reason(own: VidcacheServer,
                                                                  media_url: str) -> None:
    """A 404 in vidcache's JSON (here from the fault proxy in front of the service: another
    vidcache deployment may answer one) is the service's reason, not "not a vidcache"."""
    with FaultyLink(own.port) as link:
        link.faults.enable(Refuse(status=404, detail="no such bucket here",
                                  match=path_prefix("/ingest")))
        run = vidcache("ingest", f"{media_url}/a.mp4", "--bucket", "b", "--server", link.url)
    assert run.returncode == 1
    assert "no such bucket here" in run.stderr and "not a vidcache" not in run.stderr, run.stderr


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VidcacheServer, Path]]:
    """A service that ingests the local files below the directory it yields with it."""
    allowed = tmp_path_factory.mktemp("allowed")
    with VidcacheServer(tmp_path_factory.mktemp("svc-cli-local") / "data",
                        "--allow-file-dir", str(allowed)) as server:
        yield server, allowed


def test_ingest_of_several_urls_and_local_files(local: tuple[VidcacheServer, Path],
                                                media_url: str, videos: dict[str, Path]) -> None:
    """One after another, one JSON line each, naming the argument it is for (the lines could
    not be told apart when one failed between them); a local file is its absolute file://
    URL; one that fails is a line on stderr and exit status 1, the others still stored (the
    command took one URL before). A URL's password is not shown."""
    server, allowed = local
    copy = allowed / "b copy.mp4"
    copy.write_bytes(videos["b.mp4"].read_bytes())
    with_password = f"{media_url}/c.mkv".replace("http://", "http://user:hunter2@")
    run = vidcache("ingest", "no-such-file.mp4", os.path.relpath(copy), with_password,
                   "--bucket", "several", "--server", server.url)
    assert run.returncode == 1, run.stderr
    assert run.stderr == ("vidcache ingest: error: no-such-file.mp4: no such file, and not a URL "
                          "(http://, https:// or file://)\n")
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(result["hash"], result["status"], result["source"]) for result in results] == [
        (digest(copy.read_bytes()), "new", os.path.relpath(copy)),
        (digest(videos["c.mkv"].read_bytes()), "new", f"{media_url}/c.mkv")]
    meta = httpx.get(f"{server.url}/meta/{results[0]['hash']}").json()
    assert meta["aliases"] == [copy.resolve().as_uri()]  # file:///.../b%20copy.mp4
    again = vidcache("ingest", str(copy.resolve()), "--bucket", "several", "--server",
                     server.url)
    assert (again.returncode, json.loads(again.stdout)["status"]) == (0, "url_alias")


def test_a_local_file_the_service_does_not_allow_names_the_directory_to_allow(
        own: VidcacheServer, local: tuple[VidcacheServer, Path], videos: dict[str, Path],
        tmp_path: Path) -> None:
    """A service without --allow-file-dir, and one allowing another directory, answer 403:
    the command says which --allow-file-dir would do (the path was sent as a URL before)."""
    outside = tmp_path / "v.mp4"
    outside.write_bytes(videos["a.mp4"].read_bytes())
    for server, path in ((own, videos["a.mp4"]), (local[0], outside)):
        run = vidcache("ingest", str(path), "--bucket", "b", "--server", server.url)
        assert (run.returncode, run.stdout) == (1, ""), run.stderr
        refusal, advice = run.stderr.splitlines()
        assert refusal.startswith(f"vidcache ingest: error: {path}: ingest of {path.as_uri()} "
                                  "into bucket 'b': HTTP 403 Forbidden: "), refusal
        assert advice == ("vidcache ingest: the service ingests only the local files it can "
                          "read below a directory it allows: start it with --allow-file-dir "
                          f"{path.parent} (or a directory above)")


def test_a_local_file_that_fails_is_named_as_given(local: tuple[VidcacheServer, Path],
                                                   media_url: str, tmp_path: Path) -> None:
    """A path is sent as its file:// URL, symlinks resolved: its error line starts with the
    path as given, as a result's "source" does (it named only the file:// URL of the link's
    target, which matched none of the arguments)."""
    server, allowed = local
    target = allowed / "not-a-video.mp4"
    target.write_bytes(b"not a video")
    link = tmp_path / "clip.mp4"
    link.symlink_to(target)
    given = os.path.relpath(link)
    run = vidcache("ingest", given, f"{media_url}/a.mp4", "--bucket", "named", "--server",
                   server.url)
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith(
        f"vidcache ingest: error: {given}: ingest of {target.as_uri()} into bucket 'named': "
        "HTTP 422 Unprocessable Entity: not a video"), run.stderr
    assert [json.loads(line)["source"] for line in run.stdout.splitlines()] == [
        f"{media_url}/a.mp4"]


MANY = 1200  # more than one page of GET /videos (1000)


@dataclass(frozen=True)
class Many:
    server: VidcacheServer
    sizes: dict[str, int]  # hash -> size of the MANY tiny videos of bucket `many`
    few: dict[str, dict[str, Any]]  # hash -> meta of b.mp4 in bucket `few`, c.mkv in `few/p`


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory, media_url: str) -> Iterator[Many]:
    data = tmp_path_factory.mktemp("svc-cli-many") / "data"
    data.mkdir()
    hashes = store_many(data, MANY)
    sizes = {h: len(f"video {n} of {MANY}") for n, h in enumerate(hashes)}
    with VidcacheServer(data) as server, VidCacheClient(server.url) as client:
        few = [client.ingest(f"{media_url}/b.mp4", "few")["hash"],
               client.ingest(f"{media_url}/c.mkv", "few", prefix="p")["hash"]]
        yield Many(server, sizes, {h: client.get_meta(h) or {} for h in few})


def test_list_prints_every_video_one_line_each(many: Many) -> None:
    """Tab-separated hash, size, duration and file_path, of every page; --bucket and --prefix
    filter; --json gives each one's metadata as /meta does."""
    run = vidcache("list", "--server", many.server.url)
    assert (run.returncode, run.stderr) == (0, "")
    rows = [line.split("\t") for line in run.stdout.splitlines()]
    assert [row[0] for row in rows] == sorted([*many.sizes, *many.few])  # each once, in order
    for h, *fields in rows:
        meta = many.few.get(h)
        assert fields == ([str(meta["size_bytes"]), f"{meta['duration_s']:.3f}",
                           meta["file_path"]] if meta else
                          [str(many.sizes[h]), "1.000", f"many/{h[:2]}/{h[2:4]}/{h}.mp4"])
    b, c = many.few
    for options, listed in ((["--bucket", "few"], sorted(many.few)),
                            (["--bucket", "few", "--prefix", ""], [b]),
                            (["--prefix", "p"], [c]), (["--bucket", "none"], [])):
        run = vidcache("list", *options, "--server", many.server.url)
        assert [line.split("\t")[0] for line in run.stdout.splitlines()] == listed, options
    as_json = vidcache("list", "--bucket", "few", "--json", "--server", many.server.url)
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == [
        many.few[h] for h in sorted(many.few)]


def test_list_to_a_reader_that_stops_ends_quietly(many: Many) -> None:
    """`vidcache list | head -1`: no BrokenPipeError traceback; the status of a command that
    SIGPIPE ends (the listing, ~170 KB, is more than the pipe holds)."""
    line, status = read_then_leave(["list", "--server", many.server.url],
                                   lambda stdout: stdout.readline())
    assert len(line) > 64 and status == 141


@pytest.mark.parametrize("command", [
    ["list"], ["show", "0" * 64], ["delete", "0" * 64], ["resolve", "http://o.test/v.mp4"],
    ["get", "0" * 64, "-o", "-"], ["ingests"]])
def test_a_server_that_is_not_vidcache_or_none_is_one_error_line(command: list[str],
                                                                  media_url: str) -> None:
    """The plain file server answers list and ingests 404 and delete 501, with an HTML page
    (show and get take its 404 for no such video, resolve for an unknown URL, as the client
    does); nothing listens on the last URL; the user:password@ of --server is never shown."""
    answer = {"list": "GET /videos with HTTP 404",
              "delete": f"DELETE /video/{'0' * 64} with HTTP 501",
              "ingests": "GET /ingests with HTTP 404"}.get(command[0])
    unknown = ("http://o.test/v.mp4: no video ingested from this URL" if command[0] == "resolve"
               else f"no video {'0' * 64}")
    for server in (media_url, media_url.replace("http://", "http://user:hunter2@")):
        run = vidcache(*command, "--server", server)
        assert (run.returncode, run.stdout) == (1, ""), run.stderr
        assert run.stderr == (f"vidcache {command[0]}: error: {media_url} answered {answer}: "
                              "not a vidcache service (check --server)\n" if answer else
                              f"vidcache {command[0]}: error: {unknown} at {media_url}\n")
    unreachable = vidcache(*command, "--server", f"http://user:hunter2@127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith(f"vidcache {command[0]}: error: "), unreachable.stderr
    assert unreachable.stderr.count("\n") == 1 and "hunter2" not in unreachable.stderr
    # what to do too (was the connection error alone)
    assert unreachable.stderr.endswith(
        "Connection refused): nothing listens there (start the service, vidcache serve, or "
        "check --server)\n"), unreachable.stderr


def _html_page(handler: http.server.BaseHTTPRequestHandler, status: int, title: str,
               headers: dict[str, str] | None = None) -> None:
    """Answer as a reverse proxy does: `status` with an HTML page titled `title`."""
    page = f"<html><head><title>{title}</title></head></html>".encode()
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Type", "text/html")
    handler.send_header("Content-Length", str(len(page)))
    handler.end_headers()
    handler.wfile.write(page)


class _GatewayTimeout(http.server.BaseHTTPRequestHandler):
    """nginx's answer once its proxy_read_timeout passes: 504 with an HTML page."""

    def do_POST(self) -> None:
        _html_page(self, 504, "504 Gateway Time-out")

    def log_message(self, format: str, *args: object) -> None:
        del format, args


def test_a_proxys_504_says_the_video_may_still_be_stored() -> None:
    """A reverse proxy giving up on a long ingest: the service goes on and may store it. The
    advice said nothing of that (only after the command's own --timeout)."""
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatewayTimeout)) as proxy:
        run = vidcache("ingest", "http://origin.test/v.mp4", "--bucket", "b", "--server",
                       f"http://127.0.0.1:{proxy.server_address[1]}")
    assert (run.returncode, run.stdout) == (1, ""), run.stderr
    first, advice = run.stderr.splitlines()
    assert first.startswith("vidcache ingest: error: ") and "HTTP 504" in first, first
    assert advice == ("vidcache ingest: a proxy in front stopped waiting (its read timeout, "
                      "e.g. nginx's proxy_read_timeout, 60 s by default); the service may still "
                      "store it: ingest the URL again later (a stored URL is answered at once)")


class _BasicAuthProxy(http.server.BaseHTTPRequestHandler):
    """A reverse proxy asking for HTTP Basic auth: 401 with an HTML page, whatever is sent."""

    def do_GET(self) -> None:
        _html_page(self, 401, "401 Authorization Required",
                   {"WWW-Authenticate": 'Basic realm="cache"'})

    def log_message(self, format: str, *args: object) -> None:
        del format, args


def test_a_proxy_asking_for_basic_auth_is_answered_in_the_commands_terms() -> None:
    """The advice was the client library's, "give user:password@ in the client's base URL"
    (its page left out): now --server's."""
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 _BasicAuthProxy)) as proxy:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        runs = [vidcache("list", "--server", server)
                for server in (url, url.replace("http://", "http://user:hunter2@"))]
    error = ("vidcache list: error: listing of videos: HTTP 401 from a proxy in front of the "
             "service\n")
    assert [(run.returncode, run.stdout, run.stderr) for run in runs] == [
        (1, "", f"{error}vidcache list: if the proxy asks for HTTP Basic auth, give "
                "user:password@ in --server\n"),
        (1, "", f"{error}vidcache list: the proxy refused the user:password@ of --server\n")]


def test_list_with_a_bad_bucket_gives_the_services_reason(own: VidcacheServer) -> None:
    run = vidcache("list", "--bucket", "../x", "--server", own.url)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr.startswith("vidcache list: error: listing of videos bucket='../x': HTTP "
                                 "422"), run.stderr


def test_show_and_delete(own: VidcacheServer, media_url: str) -> None:
    """show prints /meta's JSON; delete says `deleted HASH` for each video it deleted, a hash
    it has not (or given twice) is an error line and exit status 1, the others still
    deleted; a malformed hash is a usage error and nothing is deleted."""
    ingested = vidcache("ingest", f"{media_url}/b.mp4", "--bucket", "to-delete", "--server",
                        own.url)
    h, missing = json.loads(ingested.stdout)["hash"], "0" * 64
    show = vidcache("show", h, "--server", own.url)
    assert (show.returncode, show.stderr) == (0, "")
    assert json.loads(show.stdout) == httpx.get(f"{own.url}/meta/{h}").json()
    unknown = vidcache("show", missing, "--server", own.url)
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr == f"vidcache show: error: no video {missing} at {own.url}\n"
    malformed = vidcache("delete", h, h.upper(), "--server", own.url)
    assert malformed.returncode == 2 and "argument HASH: must be a video's hash" in malformed.stderr
    assert httpx.get(f"{own.url}/meta/{h}").status_code == 200
    delete = vidcache("delete", missing, h, h, "--server", own.url)
    assert (delete.returncode, delete.stdout) == (1, f"deleted {h}\n")
    assert delete.stderr == f"vidcache delete: error: no video {missing} at {own.url}\n"
    assert httpx.get(f"{own.url}/meta/{h}").status_code == 404
    again = vidcache("delete", h, "--server", own.url)
    assert (again.returncode, again.stdout) == (1, "")
    assert again.stderr == f"vidcache delete: error: no video {h} at {own.url}\n"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VidcacheServer, Path]]:
    """A service that needs the token (yielded in its file) for every request."""
    folder = tmp_path_factory.mktemp("svc-cli-token")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    with VidcacheServer(folder / "data", "--token-file", str(token_file),
                        "--token-reads") as server:
        yield server, token_file


@pytest.mark.parametrize(("command", "call", "request_line"), [
    (["list"], "listing of videos", "GET /videos"),
    (["show", "0" * 64], f"metadata of video {'0' * 64}", f"GET /meta/{'0' * 64}"),
    (["delete", "0" * 64], f"delete of video {'0' * 64}", f"DELETE /video/{'0' * 64}"),
    (["resolve", "http://o.test/v.mp4"], "resolve of http://o.test/v.mp4", "GET /resolve"),
    (["get", "0" * 64, "-o", "-"], f"metadata of video {'0' * 64}", f"GET /meta/{'0' * 64}"),
    (["ingests"], "list of ingests under way", "GET /ingests"),
    (["ingest", "http://127.0.0.1:9/v.mp4", "--bucket", "b"],
     "ingest of http://127.0.0.1:9/v.mp4 into bucket 'b'", "POST /ingest")])
def test_a_service_needing_the_token_says_to_give_it(command: list[str], call: str,
                                                     request_line: str,
                                                     guarded: tuple[VidcacheServer, Path],
                                                     tmp_path: Path) -> None:
    """In the command's terms: the error line was the client library's, advising to "pass
    VidCacheClient(..., token=...)", before the line naming --token-file."""
    server, token_file = guarded
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("wrong-token\n")
    for token, reason, advice in (
            ([], f"{request_line} needs a bearer token: send 'Authorization: Bearer <token>' "
                 "with the token of the server's --token-file",
             "give the server's token with --token-file FILE"),
            (["--token-file", str(wrong_file)],
             f"{request_line}: wrong bearer token (it does not match the server's --token-file)",
             "the server refused the token of --token-file")):
        run = vidcache(*command, "--server", server.url, *token)
        assert (run.returncode, run.stdout) == (1, ""), run.stderr
        assert run.stderr == (
            f"vidcache {command[0]}: error: {call}: HTTP 401: {reason}\n"
            f"vidcache {command[0]}: {advice}\n"), run.stderr
    allowed = vidcache(*command, "--server", server.url, "--token-file", str(token_file))
    assert TOKEN not in allowed.stdout + allowed.stderr
    if command == ["list"]:
        assert (allowed.returncode, allowed.stdout, allowed.stderr) == (0, "", "")
    elif command == ["ingests"]:
        assert (allowed.returncode, allowed.stdout, allowed.stderr) == (
            0, "no ingests under way\n", "")
    elif command[0] == "ingest":  # let through, to fail at its origin
        assert allowed.returncode == 1 and "HTTP 401" not in allowed.stderr, allowed.stderr
    elif command[0] == "resolve":
        assert allowed.returncode == 1
        assert allowed.stderr == ("vidcache resolve: error: http://o.test/v.mp4: no video "
                                  f"ingested from this URL at {server.url}\n")
    else:
        assert allowed.returncode == 1
        assert allowed.stderr == f"vidcache {command[0]}: error: no video {'0' * 64} at " \
                                 f"{server.url}\n"


def test_ctrl_c_of_a_listing_is_one_line() -> None:
    """The service is a socket that never answers."""
    ended = interrupt_while_it_waits(lambda url: [
        sys.executable, "-m", "vidcache", "list", "--server", url])
    assert (ended.returncode, ended.out, ended.err) == (130, "", "vidcache list: interrupted\n")


def _ingest_from_a_silent_service(port: int, timeout: str,
                                  stderr: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vidcache", "ingest", "http://127.0.0.1:9/v.mp4", "--bucket", "b",
         "--server", f"http://127.0.0.1:{port}", "--timeout", timeout],
        stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=90)


def test_ingest_shows_its_wait_on_a_terminal_and_gives_up_after_its_timeout() -> None:
    """The service answers an ingest only once the video is stored: on a terminal the wait is
    shown; past --timeout the command says the service may still store it. The service here
    is a socket whose backlog accepts the connection and that never answers."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        terminal, stderr = pty.openpty()
        try:
            run = _ingest_from_a_silent_service(port, "2", stderr)
        finally:
            os.close(stderr)
        shown = b""
        with open(terminal, "rb", buffering=0) as master:
            while True:
                try:
                    data = master.read(4096)
                except OSError:  # EIO: the terminal's other end is closed
                    break
                if not data:
                    break
                shown += data
        piped = _ingest_from_a_silent_service(port, "1", subprocess.PIPE)
    text = shown.decode()
    assert run.returncode == 1 and run.stdout == ""
    assert "\rvidcache ingest: waiting for the service (1 s)" in text, text
    assert "\r\x1b[K" in text  # erased before the error
    assert "timed out" in text and "may still store it" in text and "--timeout" in text, text
    assert piped.returncode == 1
    assert "waiting" not in piped.stderr and "timed out" in piped.stderr, piped.stderr


def test_ctrl_c_of_an_ingest_says_the_service_may_still_store_it() -> None:
    """It was a KeyboardInterrupt traceback. The service is a socket that never answers."""
    ended = interrupt_while_it_waits(lambda url: [
        sys.executable, "-m", "vidcache", "ingest", "http://127.0.0.1:9/v.mp4", "--bucket", "b",
        "--server", url])
    assert (ended.returncode, ended.out) == (130, "")
    assert ended.err == ("vidcache ingest: interrupted; the service may still store it: ingest the "
                   "URL again later (a stored URL is answered at once)\n")


@pytest.mark.parametrize("args", [
    ["ingest", "http://x/v.mp4"],  # --bucket missing
    ["ingest", "http://x/v.mp4", "--bucket", "b", "--meta", "novalue"],
    ["serve"],  # --data missing
    ["serve", "--data", "/tmp/x", "--max-size", "4X"],
    ["serve", "--data", "/tmp/x", "--phash-threshold", "65"],
    ["serve", "--data", "/tmp/x", "--ingest-allow", "not a host"],
    ["serve", "--data", "/tmp/x", "--allow-file-dir", "/no/such/dir"],
    ["list", "--timeout", "0"],
    ["show"],
    ["show", "0" * 64, "1" * 64],
    ["delete"],
    ["resolve"],
    ["get"],
    ["get", "0" * 64, "0" * 64],
    ["get", "0" * 64, "--range", "0-9"],  # without -o: part of a video under its name
    ["ingests", "extra"],
    [],
])
def test_usage_errors_exit_2(args: list[str]) -> None:
    run = vidcache(*args)
    assert run.returncode == 2
    assert "error:" in run.stderr


# --data under a file: a value the old code let through fails at once there, not serving.
_NO_DATA = "/dev/null/data"
_SECONDS = "must be a number of seconds above 0, at most 31536000 (a year)"


@pytest.mark.parametrize(("args", "refused"), [
    (["serve", "--data", _NO_DATA, "--port", "99999"], "--port: must be a port number from 1 "
                                                       "to 65535, not '99999'"),
    (["serve", "--data", _NO_DATA, "--port", "-1"], "--port: must be a port number"),
    (["serve", "--data", _NO_DATA, "--host", ""], "--host: must name an address, not ''"),
    (["serve", "--data", _NO_DATA, "--host", "999.1.1.1"],
     "vidcache serve: error: --host 999.1.1.1: Name or service not known"),
    (["serve", "--data", _NO_DATA, "--download-timeout", "nan"],
     f"--download-timeout: {_SECONDS}, not 'nan'"),
    (["serve", "--data", _NO_DATA, "--max-download-time", "inf"],
     f"--max-download-time: {_SECONDS}, not 'inf'"),
    # a 500 for every ingest: too long for a socket's timeout
    (["serve", "--data", _NO_DATA, "--download-timeout", "1e12"],
     f"--download-timeout: {_SECONDS}, not '1e12'"),
    (["serve", "--data", _NO_DATA, "--keep-alive", "1.5"],
     "--keep-alive: must be a positive whole number of seconds, not '1.5'"),
    (["serve", "--data", _NO_DATA, "--max-size", "1.5"],
     "--max-size: not a whole number of bytes: '1.5'"),
    (["serve", "--data", _NO_DATA, "--max-size", "9" * 400], "--max-size: size too large"),
    (["serve", "--data", _NO_DATA, "--phash-threshold", "x"],
     "--phash-threshold: must be a whole number from 0 to 64"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "http://127.0.0.1:9",
      "--timeout", "nan"], f"--timeout: {_SECONDS}, not 'nan'"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "http://127.0.0.1:9",
      "--timeout", "inf"], f"--timeout: {_SECONDS}, not 'inf'"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "127.0.0.1:8020"],
     "--server: must be an http:// or https:// URL with a host"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "ftp://x"],
     "--server: must be an http:// or https:// URL with a host"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "http://127.0.0.1:99999"],
     "--server: must be an http:// or https:// URL with a host"),
    (["show", "0" * 63], f"argument HASH: must be a video's hash, 64 lowercase hex digits, "
                         f"not '{'0' * 63}'"),
    (["delete", "0" * 64, "x" * 64], "argument HASH: must be a video's hash"),
    (["get", "0" * 64, "-o", "-", "--range", "9-0"],
     "--range: must be START-END, the first and last byte to get (counted from 0, END not "
     "before START), or START- for the rest of the video, not '9-0'"),
    (["get", "0" * 64, "-o", "-", "--range", "-500"], "--range: must be START-END"),
    (["get", "0" * 64, "-o", ""], "-o/--output: must name a file (or - for stdout), not ''"),
    (["get", "0" * 64, "-o", "-", "--range", "0x10-20"], "--range: must be START-END"),
])
def test_bad_option_values_are_usage_errors_naming_the_value(args: list[str],
                                                              refused: str) -> None:
    """Not a traceback (--server without a scheme, --timeout nan or inf), nor a server saying
    it serves on a port it does not (uvicorn binds 99999 % 65536)."""
    run = vidcache(*args)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and refused in run.stderr, run.stderr


def test_credentials_in_server_and_a_token_file_are_a_usage_error(tmp_path: Path) -> None:
    """Both would be the Authorization header: the client's ValueError was a traceback."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = "http://user:hunter2@127.0.0.1:9"
    for command in (["ingest", "http://x/v.mp4", "--bucket", "b"], ["list"]):
        run = vidcache(*command, "--server", server, "--token-file", str(token_file))
        assert (run.returncode, run.stdout) == (2, "")
        assert run.stderr == (f"vidcache {command[0]}: error: --server's user:password@ and "
                              "--token-file would both be the Authorization header: give only "
                              "one\n")


def test_bad_env_allow_list_is_a_usage_error(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "vidcache", "serve", "--data", str(tmp_path)],
                         capture_output=True, text=True, timeout=60,
                         env={"VIDCACHE_INGEST_ALLOW": "ok.example,bad entry", "PATH": ""})
    assert run.returncode == 2
    assert "VIDCACHE_INGEST_ALLOW" in run.stderr and "bad entry" in run.stderr


def test_a_port_in_use_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    """It was uvicorn's log (start-up, a bind error naming neither the option nor what to do,
    shutdown) after the data directory was made and its index opened; 'serving on ...' is said
    only once the socket listens, never before the bind error."""
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = vidcache("serve", "--data", str(data), "--port", str(port))
    assert (run.returncode, run.stderr) == (3, (
        f"vidcache serve: error: cannot listen on 127.0.0.1 port {port}: address already in "
        "use (something else listens there: stop it or give another --port)\n"))
    assert not data.exists()


def test_an_unusable_data_directory_is_one_line_naming_it(tmp_path: Path) -> None:
    """A file, a corrupt index (a traceback before), or an empty --data (the current directory
    before: `--data "$UNSET"` made a data directory of wherever the command ran)."""
    a_file = tmp_path / "a file"
    a_file.write_text("x")
    corrupt = tmp_path / "corrupt"
    (corrupt / ".vidcache").mkdir(parents=True)
    (corrupt / ".vidcache" / "index.sqlite3").write_text("not a database")
    expected = {
        str(a_file): f"vidcache serve: error: cannot use {a_file} as the data directory: Not a "
                     f"directory: {a_file}/.vidcache/tmp\n",
        str(corrupt): f"vidcache serve: error: cannot open the index "
                      f"{corrupt}/.vidcache/index.sqlite3: file is not a database\n",
    }
    for data, message in expected.items():
        run = vidcache("serve", "--data", data, "--port", str(free_port()))
        assert (run.returncode, run.stderr) == (1, message)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with socket.socket() as taken:  # the old code stops at the bind, having made cwd a store
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        empty = subprocess.run(
            [sys.executable, "-m", "vidcache", "serve", "--data", "", "--port",
             str(taken.getsockname()[1])], capture_output=True, text=True, timeout=90, cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert empty.returncode == 2, empty.stderr
    assert "argument --data: must name a directory, not ''" in empty.stderr
    assert list(cwd.iterdir()) == []


def test_an_unusable_ssl_cert_file_is_one_line_naming_it(tmp_path: Path) -> None:
    """SSL_CERT_FILE names the CAs that https origins are checked against: one that is missing
    or holds no certificate stopped the server blaming the data directory ('cannot use DATA as
    the data directory: No such file or directory'), then made that directory all the same."""
    not_pem = tmp_path / "not-pem.crt"
    not_pem.write_text("not a certificate\n")
    for cert_file in (tmp_path / "missing.crt", not_pem):
        run = subprocess.run(
            [sys.executable, "-m", "vidcache", "serve", "--data", str(tmp_path / "data"),
             "--port", str(free_port())], capture_output=True, text=True, timeout=90,
            env={**os.environ, "SSL_CERT_FILE": str(cert_file)})
        assert run.returncode == 1, run.stderr
        assert run.stderr.startswith(f"vidcache serve: error: SSL_CERT_FILE={cert_file}: "
                                     "cannot load CA certificates from it"), run.stderr
        assert "data directory" not in run.stderr and "\n" not in run.stderr.rstrip("\n")
        assert not (tmp_path / "data").exists()  # refused before it was made (it was)


def test_serving_is_said_once_the_port_listens(own: VidcacheServer) -> None:
    assert (f"serving {own.data_dir} on {own.url} (no authentication); Ctrl-C stops it"
            in own.log())


def _connection(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionRefusedError:
        return None


@contextlib.contextmanager
def _held_up_at_start(
    data: Path, certificates: Path, **output: Any,
) -> Iterator[tuple[subprocess.Popen[bytes], int, socket.socket]]:
    """`vidcache serve` held up at start once it listens: its SSL_CERT_FILE is `certificates`,
    made a FIFO that nothing writes yet. Yields it, its port and a connection made meanwhile;
    stopped at the end. `output`: Popen's stdout and stderr."""
    os.mkfifo(certificates)
    port = free_port()
    starting = subprocess.Popen(
        [sys.executable, "-m", "vidcache", "serve", "--data", str(data), "--port", str(port)],
        env={**os.environ, "SSL_CERT_FILE": str(certificates)}, **output)
    try:
        early = wait_until(lambda: _connection(port), timeout=60, what="the port listening")
        assert early is not None  # for mypy: wait_until returns a truthy result
        with early:
            yield starting, port, early
    finally:
        stop_process(starting)


def test_the_port_is_held_while_the_service_starts(tmp_path: Path) -> None:
    """It listens from before the data directory and the rest are opened: here the start is
    held up by SSL_CERT_FILE, a FIFO that nothing writes yet. Meanwhile another server on the
    port fails at once with the one-line message, and a client that connected is answered once
    the service is up. Before, the port was only tried and let go: a second server took it, and
    the first ended in uvicorn's bind error (log lines, exit 3)."""
    certificates = tmp_path / "ca.pem"
    authority, _ = self_signed_certificate(tmp_path)
    log_path = tmp_path / "first.log"
    with (open(log_path, "wb") as log,
          _held_up_at_start(tmp_path / "first", certificates, stdout=log,
                            stderr=subprocess.STDOUT) as (_, port, early)):
        second = vidcache("serve", "--data", str(tmp_path / "second"), "--port", str(port))
        assert (second.returncode, second.stderr) == (3, (
            f"vidcache serve: error: cannot listen on 127.0.0.1 port {port}: address "
            "already in use (something else listens there: stop it or give another "
            "--port)\n"))
        assert not (tmp_path / "second").exists()
        assert "serving" not in log_path.read_text()
        early.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with open(certificates, "wb") as fifo:  # the service waits for it to be written
            fifo.write(authority.read_bytes())
        answer = read_until_closed(early)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert f"on http://127.0.0.1:{port} (no authentication)" in log_path.read_text()


def test_ctrl_c_while_it_starts_is_one_line(tmp_path: Path) -> None:
    """A Ctrl-C before the service is ready (here held up by SSL_CERT_FILE, a FIFO nothing
    writes) was a traceback ending in KeyboardInterrupt."""
    with _held_up_at_start(tmp_path / "data", tmp_path / "ca.pem", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE) as (starting, _, _):
        starting.send_signal(signal.SIGINT)
        out, err = starting.communicate(timeout=60)
    assert (starting.returncode, out, err) == (
        130, b"", b"vidcache serve: interrupted before it was ready\n")


def _reader_opened(fifo: Path) -> int | None:
    """The FIFO's write end, once a reader has it open (ENXIO before: none has)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


@contextlib.contextmanager
def _recovery_held_up(
    data: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], int, Callable[[], None]]]:
    """`vidcache serve` on `data` held up in its start-up recovery, the index open: a directory
    in `data` is a stalled FUSE mount (tests.stalled_fs), whose root the recovery stats, as
    on a stalled network file system. Yields the service once that stat waits, its port, and
    what answers the stat (closing the write end of the mount's gate). The service is stopped
    and the mount unmounted at the end; with SIGHUP's default action in the service, as
    from a terminal, whatever the tests run under (under nohup it stays ignored)."""
    stalled, gate = data / "stalled", data.parent / "gate"
    stalled.mkdir(parents=True)
    os.mkfifo(gate)
    writers: list[int] = []

    def release() -> None:
        while writers:
            os.close(writers.pop())

    mounted = subprocess.Popen([sys.executable, "-m", "tests.stalled_fs", str(stalled), str(gate)],
                               cwd=Path(__file__).resolve().parent.parent)
    try:
        wait_until(lambda: f" {stalled} fuse" in Path("/proc/self/mounts").read_text(),
                   timeout=60, what="the stalled file system mounted")
        port = free_port()
        with sighup_in_children(ignored=False):
            starting = subprocess.Popen(
                [sys.executable, "-m", "vidcache", "serve", "--data", str(data), "--port",
                 str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # the gate has a reader once the mount is asked for its root's attributes
            writer = wait_until(lambda: _reader_opened(gate), timeout=60,
                                what="the service's recovery reaching the stalled mount")
            assert writer is not None  # for mypy: wait_until returns a truthy result
            writers.append(writer)
            yield starting, port, release
        finally:
            stop_process(starting)
    finally:
        if not writers and (waiting := _reader_opened(gate)) is not None:
            writers.append(waiting)  # a stat that came meanwhile: answered, nothing waits
        release()
        subprocess.run(["fusermount3", "-u", "-z", str(stalled)], capture_output=True,
                       check=False)
        stop_process(mounted)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["TERM", "INT", "HUP"])
def test_a_stop_signal_while_it_starts_closes_the_data_directory(
        tmp_path: Path, signum: signal.Signals) -> None:
    """SIGTERM, Ctrl-C or SIGHUP once the data directory is open, before the service is ready
    (held up in its recovery by a stalled mount in the data directory): one line saying so,
    the exit status the signal gives once the service is ready (130 for Ctrl-C: it never
    served), and the index closed (SQLite removes its WAL file when the last connection
    closes), the lock and the port let go. Was: SIGTERM and SIGHUP ended it by their default
    action, without a word and with the index left open. The signal comes while the stat
    waits; the stat is answered after it, and the signal handled then."""
    data = tmp_path / "data"
    with _recovery_held_up(data) as (starting, port, answer_the_stat):
        assert (data / ".vidcache" / "index.sqlite3-wal").exists()  # the index is open
        starting.send_signal(signum)
        answer_the_stat()
        out, err = starting.communicate(timeout=60)
    said = ("interrupted" if signum == signal.SIGINT else f"stopped by {signum.name}")
    assert (starting.returncode, out, err) == (
        130 if signum == signal.SIGINT else -signum, b"",
        f"vidcache serve: {said} before it was ready\n".encode())
    assert not (data / ".vidcache" / "index.sqlite3-wal").exists()
    with VidcacheServer(data, port=port) as again:  # the lock and the port are free
        assert "start-up recovery" not in again.log()


def test_an_ipv6_address_is_said_as_a_url(tmp_path: Path) -> None:
    """`--host ::1`: the log said `http://::1:PORT`, which no client takes for a URL (the
    server's health is asked for at the URL in brackets)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with VidcacheServer(tmp_path / "data", host="::1") as server:
        assert server.url == f"http://[::1]:{server.port}"
        assert f"serving {server.data_dir} on {server.url} (no authentication)" in server.log()


def test_help_lists_every_option() -> None:
    top = vidcache("--help")
    assert top.returncode == 0 and "serve" in top.stdout and "ingest" in top.stdout
    serve = vidcache("serve", "--help")
    assert serve.returncode == 0
    for option in [*SERVE_OPTIONS, "1-65535", "Exit status"]:
        assert option in serve.stdout, option
    ingest = vidcache("ingest", "--help")
    assert ingest.returncode == 0
    for option in [*INGEST_OPTIONS, "1-128 of A-Z a-z 0-9", "Exit status", "examples:",
                   "--allow-file-dir"]:
        assert option in " ".join(ingest.stdout.split()), option
    for command, options in COMMAND_OPTIONS.items():
        assert command in top.stdout
        run = vidcache(command, "--help")
        assert run.returncode == 0
        for option in [*options, "Exit status", "examples:", f"vidcache {command}"]:
            assert option in run.stdout, (command, option)


def test_the_docs_table_names_every_serve_option_with_the_default_of_the_help() -> None:
    """docs/service.md's table of `vidcache serve`'s options names exactly the options the
    command has; each default it states is what the command takes, and what --help says."""
    documented = documented_options(
        Path(__file__).resolve().parent.parent / "docs" / "service.md", "## Running it")
    parser = cli.build_parser()
    serve, options = subcommand_options(parser, "serve")
    assert set(documented) == set(options)
    defaults = parser.parse_args(["serve", "--data", "/nonexistent/data"])
    help_text = " ".join(serve.format_help().split())
    stated = {name: re.fullmatch(r"`([^`]+)`", default) for name, default in documented.items()}
    assert {name for name, value in stated.items() if value is None} == {
        "--data", "--allow-file-dir", "--ingest-allow", "--token-file", "--token-reads"}
    for name, value in stated.items():
        if value is not None:
            action = options[name]
            given = action.type(value.group(1)) if callable(action.type) else value.group(1)
            assert given == getattr(defaults, action.dest), name
            assert re.search(rf"\(default {re.escape(value.group(1))}[;)]", help_text), name


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "vidcache"
    run = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    assert run.stdout == f"vidcache {__version__}\n"
