"""The `vidcache` command line: `ingest` through the real client against a real service,
usage errors, and complete --help texts."""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.faults import Refuse, path_prefix
from tests.service_support import digest
from tests.support import VidcacheServer, free_port, interrupt_while_it_waits
from tests.vcfs_fault_support import FaultyLink

pytestmark = pytest.mark.timeout(120)

SERVE_OPTIONS = ["--data", "--host", "--port", "--max-size", "--download-timeout",
                 "--max-download-time", "--keep-alive", "--phash-threshold", "--chunk-size",
                 "--allow-file-dir",
                 "--ingest-allow", "--token-file", "--token-reads", "--log-level",
                 "VIDCACHE_INGEST_ALLOW"]
INGEST_OPTIONS = ["URL", "--bucket", "--prefix", "--meta", "--server", "--token-file",
                  "--timeout"]


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
    assert json.loads(run.stdout) == {"hash": h, "status": "new",
                                      "file_path": f"cli/p/{h[:2]}/{h[2:4]}/{h}.mp4"}
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
    [],
])
def test_usage_errors_exit_2(args: list[str]) -> None:
    run = vidcache(*args)
    assert run.returncode == 2
    assert "error:" in run.stderr


# --data under a file: a value the old code let through fails at once there, not serving.
_NO_DATA = "/dev/null/data"


@pytest.mark.parametrize(("args", "refused"), [
    (["serve", "--data", _NO_DATA, "--port", "99999"], "--port: must be a port number from 1 "
                                                       "to 65535, not '99999'"),
    (["serve", "--data", _NO_DATA, "--port", "-1"], "--port: must be a port number"),
    (["serve", "--data", _NO_DATA, "--host", ""], "--host: must name an address, not ''"),
    (["serve", "--data", _NO_DATA, "--host", "999.1.1.1"],
     "vidcache serve: error: --host 999.1.1.1: Name or service not known"),
    (["serve", "--data", _NO_DATA, "--download-timeout", "nan"],
     "--download-timeout: must be a positive number of seconds, not 'nan'"),
    (["serve", "--data", _NO_DATA, "--max-download-time", "inf"],
     "--max-download-time: must be a positive number of seconds, not 'inf'"),
    (["serve", "--data", _NO_DATA, "--keep-alive", "1.5"],
     "--keep-alive: must be a positive whole number of seconds, not '1.5'"),
    (["serve", "--data", _NO_DATA, "--max-size", "1.5"],
     "--max-size: not a whole number of bytes: '1.5'"),
    (["serve", "--data", _NO_DATA, "--max-size", "9" * 400], "--max-size: size too large"),
    (["serve", "--data", _NO_DATA, "--phash-threshold", "x"],
     "--phash-threshold: must be a whole number from 0 to 64"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "http://127.0.0.1:9",
      "--timeout", "nan"], "--timeout: must be a positive number of seconds, not 'nan'"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "http://127.0.0.1:9",
      "--timeout", "inf"], "--timeout: must be a positive number of seconds, not 'inf'"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "127.0.0.1:8020"],
     "--server: must be an http:// or https:// URL with a host"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "ftp://x"],
     "--server: must be an http:// or https:// URL with a host"),
    (["ingest", "http://x/v.mp4", "--bucket", "b", "--server", "http://127.0.0.1:99999"],
     "--server: must be an http:// or https:// URL with a host"),
])
def test_bad_option_values_are_usage_errors_naming_the_value(args: list[str],
                                                              refused: str) -> None:
    """Not a traceback (--server without a scheme, --timeout nan or inf), nor a server saying
    it serves on a port it does not (uvicorn binds 99999 % 65536)."""
    run = vidcache(*args)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and refused in run.stderr, run.stderr


def test_bad_env_allow_list_is_a_usage_error(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "vidcache", "serve", "--data", str(tmp_path)],
                         capture_output=True, text=True, timeout=60,
                         env={"VIDCACHE_INGEST_ALLOW": "ok.example,bad entry", "PATH": ""})
    assert run.returncode == 2
    assert "VIDCACHE_INGEST_ALLOW" in run.stderr and "bad entry" in run.stderr


def test_a_port_in_use_is_an_error_without_a_serving_line(tmp_path: Path) -> None:
    """'serving on ...' is said only once the socket listens: never before the bind error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = vidcache("serve", "--data", str(tmp_path), "--port", str(port))
    assert run.returncode == 3
    assert "address already in use" in run.stderr
    assert "serving" not in run.stderr, run.stderr


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
        str(corrupt): f"vidcache serve: error: cannot open the index of {corrupt} "
                      f"({corrupt}/.vidcache/index.sqlite3): file is not a database\n",
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
    the data directory: No such file or directory')."""
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


def test_serving_is_said_once_the_port_listens(own: VidcacheServer) -> None:
    assert f"serving {own.data_dir} on {own.url} (no authentication)" in own.log()


def test_help_lists_every_option() -> None:
    top = vidcache("--help")
    assert top.returncode == 0 and "serve" in top.stdout and "ingest" in top.stdout
    serve = vidcache("serve", "--help")
    assert serve.returncode == 0
    for option in [*SERVE_OPTIONS, "1-65535", "Exit status"]:
        assert option in serve.stdout, option
    ingest = vidcache("ingest", "--help")
    assert ingest.returncode == 0
    for option in [*INGEST_OPTIONS, "1-128 of A-Z a-z 0-9", "Exit status"]:
        assert option in " ".join(ingest.stdout.split()), option


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "vidcache"
    run = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    assert run.stdout.startswith("vidcache ")
