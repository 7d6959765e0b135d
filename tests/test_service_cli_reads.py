"""`vidcache resolve`, `get` and `ingests` through the real client against a real service:
the hash a URL was stored as, a video's bytes (whole, a range, to stdout) compared with its
source, a download that fails or is interrupted leaving no file, progress on a terminal (and
none where its thread cannot start), and the ingests under way as a table. Usage errors, --help
and the error lines shared with the other commands are in test_service_cli.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.faults import Refuse, Stall, Truncate, path_prefix
from bench.proxy import LinkProfile, ProxyConfig, ProxyThread
from tests.service_support import digest, on_terminal, read_then_leave, serve_origin, unique
from tests.support import VidcacheServer, free_port, new_cgroup, preload_library, wait_until
from tests.vcfs_fault_support import FaultyLink
from vidcache.chunks import KIB, MIB

pytestmark = pytest.mark.timeout(120)


def vidcache(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "vidcache", *args], capture_output=True,
                          timeout=90, cwd=cwd)


@dataclass(frozen=True)
class Stored:
    server: VidcacheServer
    url: str  # the service's base URL
    source: bytes  # b.mp4, stored from `origin_url` as `hash`
    origin_url: str
    hash: str


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, media_url: str,
           videos: dict[str, Path]) -> Iterator[Stored]:
    with VidcacheServer(tmp_path_factory.mktemp("svc-cli-reads") / "data") as server:
        url = f"{media_url}/b.mp4"
        ingested = vidcache("ingest", url, "--bucket", "reads", "--server", server.url)
        assert ingested.returncode == 0, ingested.stderr
        source = videos["b.mp4"].read_bytes()
        assert json.loads(ingested.stdout)["hash"] == digest(source)
        yield Stored(server, server.url, source, url, digest(source))


def _left_in(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


# --- resolve ---------------------------------------------------------------------------------

def test_resolve_prints_each_urls_hash_and_says_which_it_does_not_know(stored: Stored,
                                                                        media_url: str) -> None:
    """One hash a line in the order given, each URL once; an unknown one is an error line
    naming it (without its password), the others still printed, exit status 1. --json: the
    service's {"hash", "url"}."""
    unknown = f"{media_url}/never-ingested.mp4".replace("http://", "http://user:hunter2@")
    run = vidcache("resolve", stored.origin_url, unknown, stored.origin_url,
                   "--server", stored.url)
    assert (run.returncode, run.stdout.decode()) == (1, f"{stored.hash}\n")
    assert run.stderr.decode() == (
        f"vidcache resolve: error: {media_url}/never-ingested.mp4: no video ingested from this "
        f"URL at {stored.url}\n")
    as_json = vidcache("resolve", "--json", stored.origin_url, "--server", stored.url)
    assert (as_json.returncode, as_json.stderr) == (0, b"")
    assert json.loads(as_json.stdout) == {"hash": stored.hash, "url": stored.origin_url}


@pytest.mark.parametrize(("url", "refused"), [
    ("", "an empty URL"),
    # a byte that is not UTF-8: the client refused to send it (exit 1, "no request sent")
    (os.fsdecode(b"http://user:hunter2@o.test/\xff.mp4"),
     "not UTF-8 text, which no request can carry"),
    ("/no/such/dir/v.mp4", "'/no/such/dir/v.mp4' is a path, not a URL: vidcache ingest sends a "
                           "local file's path as its file:// URL, file:///no/such/dir/v.mp4"),
], ids=["empty", "not-utf-8", "path"])
def test_resolve_of_an_argument_that_is_no_url_is_a_usage_error(stored: Stored, url: str,
                                                                 refused: str) -> None:
    """No video can have been stored from it: exit status 2 and one error line after the usage,
    as for a malformed hash of show, get or delete, and none of the URLs asked for (the known
    one before it not printed), its password never shown. It was an error line per URL and
    exit status 1, as for a URL the service does not know."""
    run = vidcache("resolve", stored.origin_url, url, "--server", stored.url)
    assert (run.returncode, run.stdout) == (2, b""), run.stderr
    stderr = run.stderr.decode()
    assert stderr.startswith("usage: vidcache resolve ") and "hunter2" not in stderr
    assert stderr.splitlines()[-1] == f"vidcache resolve: error: argument URL: {refused}"


def test_resolve_asks_for_a_url_this_services_ingest_would_refuse(stored: Stored) -> None:
    """`ftp://` is no URL this service ingests, but another vidcache 1.x deployment may: it is
    asked for, and not known here (exit status 1), not refused as a usage error."""
    run = vidcache("resolve", "ftp://o.test/v.mp4", "--server", stored.url)
    assert (run.returncode, run.stdout) == (1, b""), run.stderr
    assert run.stderr.decode() == (
        f"vidcache resolve: error: ftp://o.test/v.mp4: no video ingested from this URL at "
        f"{stored.url}\n")


# --- get -------------------------------------------------------------------------------------

def test_get_writes_the_stored_bytes_and_never_replaces_a_file_unless_forced(
        stored: Stored, tmp_path: Path) -> None:
    """The whole video under HASH.mp4 (the stored file's extension) in the current directory,
    byte for byte; a second get refuses the existing file, which keeps its content, before
    any request; --force replaces it, keeping its permission bits; nothing else is left."""
    name = f"{stored.hash}.mp4"
    run = vidcache("get", stored.hash, "--server", stored.url, cwd=tmp_path)
    assert (run.returncode, run.stderr) == (0, b"")
    assert run.stdout.decode() == f"saved {name} ({len(stored.source)} bytes)\n"
    assert (tmp_path / name).read_bytes() == stored.source
    mine = tmp_path / "mine.mp4"
    mine.write_bytes(b"keep me")
    mine.chmod(0o600)
    refused = vidcache("get", stored.hash, "-o", str(mine), "--server",
                       f"http://127.0.0.1:{free_port()}")  # refused before asking anyone
    assert (refused.returncode, refused.stdout) == (1, b"")
    assert refused.stderr.decode() == (f"vidcache get: error: {mine} exists: give --force to "
                                       "replace it\n")
    assert mine.read_bytes() == b"keep me"
    forced = vidcache("get", stored.hash, "-o", str(mine), "--force", "--server", stored.url)
    assert forced.returncode == 0, forced.stderr
    assert mine.read_bytes() == stored.source and mine.stat().st_mode & 0o777 == 0o600
    into_a_directory = vidcache("get", stored.hash, "-o", str(tmp_path), "--force",
                                "--server", stored.url)
    assert into_a_directory.returncode == 1
    assert b"is a directory" in into_a_directory.stderr
    assert _left_in(tmp_path) == sorted([name, "mine.mp4"])


@pytest.mark.parametrize(("asked", "part"), [
    ("100-1123", slice(100, 1124)), ("0-0", slice(0, 1)), ("2000-", slice(2000, None)),
    ("0-99999999", slice(0, None)),  # an end past the video's stops at its last byte
], ids=["middle", "first byte", "to the end", "past the end"])
def test_get_a_range_to_stdout_and_to_a_file(stored: Stored, tmp_path: Path, asked: str,
                                             part: slice) -> None:
    """--range START-END gives bytes START to END, both included, as the client's
    byte_range; -o - writes them to stdout."""
    piped = vidcache("get", stored.hash, "--range", asked, "-o", "-", "--server", stored.url)
    assert (piped.returncode, piped.stderr) == (0, b"")
    assert piped.stdout == stored.source[part]
    out = tmp_path / "part.bin"
    saved = vidcache("get", stored.hash, "--range", asked, "-o", str(out), "--server", stored.url)
    assert saved.returncode == 0, saved.stderr
    assert out.read_bytes() == stored.source[part]


def test_get_the_whole_video_to_stdout(stored: Stored) -> None:
    run = vidcache("get", stored.hash, "-o", "-", "--server", stored.url)
    assert (run.returncode, run.stderr) == (0, b"")
    assert run.stdout == stored.source


def test_get_to_a_reader_that_stops_ends_quietly(stored: Stored) -> None:
    """`vidcache get HASH -o - | head -c 100`: the status of a command that SIGPIPE ends, as
    `vidcache list | head`; not "cannot write -: Broken pipe", nor 0 (stdout's write of the
    chunk, 430 KB, took the 64 KiB the pipe held when its reader left and said so: the rest was
    dropped without a word)."""
    head, status = read_then_leave(["get", stored.hash, "-o", "-", "--server", stored.url],
                                   lambda stdout: stdout.read(100))
    assert head == stored.source[:100] and status == 141


def test_get_refuses_an_existing_default_name_before_downloading(stored: Stored,
                                                                 tmp_path: Path) -> None:
    """Without -o the name (HASH.EXT) is known once the meta has come: an existing file, or a
    directory, of that name is refused then, not after the whole video has been downloaded
    (the proxy refuses every /video/ request: one asked for would fail otherwise)."""
    name = f"{stored.hash}.mp4"
    (tmp_path / name).write_bytes(b"keep me")
    with FaultyLink(stored.server.port) as link:
        link.faults.enable(Refuse(match=path_prefix("/video/")))
        run = vidcache("get", stored.hash, "--server", link.url, cwd=tmp_path)
        (tmp_path / name).unlink()
        (tmp_path / name).mkdir()
        forced = vidcache("get", stored.hash, "--force", "--server", link.url, cwd=tmp_path)
    assert (run.returncode, run.stdout) == (1, b"")
    assert run.stderr.decode() == f"vidcache get: error: {name} exists: give --force to " \
                                  "replace it\n"
    assert (forced.returncode, forced.stdout) == (1, b"")
    assert forced.stderr.decode() == f"vidcache get: error: {name} is a directory: give the " \
                                     "file to write with -o FILE\n"
    assert _left_in(tmp_path) == [name]


def test_get_errors_leave_no_file(stored: Stored, tmp_path: Path) -> None:
    """An unknown hash, a range starting past the end, a service that is down, a file in a
    directory that does not exist: one error line, exit status 1, nothing written."""
    size, missing, out = len(stored.source), "0" * 64, tmp_path / "out.mp4"
    for args, error in (
            ([missing, "--server", stored.url], f"no video {missing} at {stored.url}"),
            ([stored.hash, "--range", f"{size}-{size + 10}", "--server", stored.url],
             f"--range starts past the end of the video ({size} bytes: the last is byte "
             f"{size - 1})"),
            ([stored.hash, "--server", f"http://127.0.0.1:{free_port()}"],
             "nothing listens there"),
            ([stored.hash, "--server", stored.url, "-o", str(out / "x")],
             f"cannot write {out / 'x'}: No such file or directory")):
        run = vidcache("get", "-o", str(out), *args)
        assert (run.returncode, run.stdout) == (1, b""), run.stderr
        stderr = run.stderr.decode()
        assert stderr.startswith("vidcache get: error: ") and error in stderr, stderr
        assert stderr.count("\n") == 1, stderr
        assert _left_in(tmp_path) == []


def test_a_download_cut_short_leaves_no_file_under_its_name(stored: Stored,
                                                            tmp_path: Path) -> None:
    """The service's answer ends after 16 KiB (a proxy in between cuts it): the client sees
    the body short of its Content-Length; neither the file nor a temporary one is left, and an
    existing file forced to be replaced keeps its content."""
    out, kept = tmp_path / "new.mp4", tmp_path / "kept.mp4"
    kept.write_bytes(b"keep me")
    with FaultyLink(stored.server.port) as link:
        link.faults.enable(Truncate(after_bytes=16 * KIB, match=path_prefix("/video/")))
        runs = [vidcache("get", stored.hash, "-o", str(out), "--server", link.url),
                vidcache("get", stored.hash, "-o", str(kept), "--force", "--server", link.url)]
    for run in runs:
        assert (run.returncode, run.stdout) == (1, b""), run.stderr
        assert run.stderr.decode().startswith("vidcache get: error: video "), run.stderr
    assert _left_in(tmp_path) == ["kept.mp4"]
    assert kept.read_bytes() == b"keep me"


def test_a_file_made_during_the_download_is_not_replaced(stored: Stored,
                                                         tmp_path: Path) -> None:
    """FILE did not exist when the command started, and another program writes it while the
    answer stalls half-way: without --force it keeps that file's content, says so, and leaves
    no temporary file. (A check at the start alone would let the rename replace it.)"""
    size, out = len(stored.source), tmp_path / "raced.mp4"
    with FaultyLink(stored.server.port) as link:
        link.faults.enable(Stall(seconds=5, after_bytes=size // 2,
                                 match=path_prefix("/video/")))
        with subprocess.Popen([sys.executable, "-m", "vidcache", "get", stored.hash, "-o",
                               str(out), "--server", link.url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as get:
            wait_until(lambda: list(tmp_path.iterdir()), timeout=60, what="the temporary file")
            out.write_bytes(b"theirs")
            stdout, stderr = get.communicate(timeout=90)
    assert (get.returncode, stdout) == (1, b""), stderr
    assert stderr.decode() == f"vidcache get: error: {out} exists: give --force to replace it\n"
    assert out.read_bytes() == b"theirs"
    assert _left_in(tmp_path) == ["raced.mp4"]


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS],
                         ids=["FAT", "CIFS", "FUSE without link"])
def test_get_writes_to_a_file_system_without_hard_links(stored: Stored, tmp_path: Path,
                                                        refusal: int) -> None:
    """Without --force the whole file is linked to its name, which never replaces one; where
    link() is refused as a file system without hard links refuses it, the file is renamed
    instead (an existing one checked just before)."""
    library = preload_library("no_hard_links", tmp_path)
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "vidcache", "get", stored.hash, "-o", str(out), "--server",
         stored.url], capture_output=True, timeout=90,
        env={**os.environ, "LD_PRELOAD": str(library), "VIDCACHE_LINK_ERRNO": str(refusal)})
    assert (run.returncode, run.stderr) == (0, b"")
    assert out.read_bytes() == stored.source
    assert _left_in(out.parent) == ["v.mp4"]


def test_get_shows_its_progress_on_a_terminal_and_ctrl_c_leaves_no_file(
        stored: Stored, tmp_path: Path) -> None:
    """The answer stalls half-way: the line says how much of how much has arrived; Ctrl-C
    then ends the command with status 130, the line erased, no file (nor part of one) left."""
    size, out = len(stored.source), tmp_path / "stalled.mp4"
    with FaultyLink(stored.server.port) as link:
        link.faults.enable(Stall(seconds=90, after_bytes=size // 2,
                                 match=path_prefix("/video/")))
        with on_terminal("get", stored.hash, "-o", str(out), "--server", link.url) as terminal:
            terminal.wait_drawn("vidcache get: downloading ")
            terminal.wait_drawn(f" of {size / KIB:,.1f} KiB (")
            wait_until(lambda: list(tmp_path.iterdir()), timeout=60, what="the temporary file")
            terminal.process.send_signal(signal.SIGINT)
            status, stdout, shown = terminal.finish()
    assert (status, stdout) == (130, ""), shown
    assert "\r\x1b[Kvidcache get: interrupted" in shown, shown
    assert _left_in(tmp_path) == []


def _one_process(cgroup: Path, _: bool) -> None:
    """A cgroup's limit: its first process, no thread besides its main one."""
    (cgroup / "pids.max").write_text("1")


def test_get_on_a_terminal_where_no_thread_can_start_downloads_without_its_line(
        stored: Stored, tmp_path: Path) -> None:
    """In a cgroup whose pids.max is 1, the command's own process: the progress line's thread
    cannot start, and the download goes on without the line (it was a traceback and status 1
    before any byte was asked for)."""
    out = tmp_path / "v.mp4"
    with new_cgroup("pids", _one_process) as (_, _, in_cgroup), \
            on_terminal("get", stored.hash, "-o", str(out), "--server", stored.url,
                        prefix=in_cgroup) as terminal:
        status, stdout, shown = terminal.finish()
    assert (status, stdout) == (0, f"saved {out} ({len(stored.source)} bytes)\n"), shown
    assert shown == "", shown
    assert out.read_bytes() == stored.source


def test_ingest_on_a_terminal_where_no_thread_can_start_ingests_without_its_line(
        stored: Stored) -> None:
    """The same for `vidcache ingest`, whose line also needs a thread polling the service."""
    with new_cgroup("pids", _one_process) as (_, _, in_cgroup), \
            on_terminal("ingest", stored.origin_url, "--bucket", "cli-reads", "--server",
                        stored.url, prefix=in_cgroup) as terminal:
        status, stdout, shown = terminal.finish()
    assert (status, shown) == (0, ""), shown
    assert json.loads(stdout)["hash"] == stored.hash


# an amount `vidcache get` draws: "downloading 0.4 of 2.3 MiB (17%)"
_DRAWN_AMOUNT = re.compile(r"downloading ([0-9,.]+) of [0-9,.]+ (KiB|MiB)")


def _drawn_amounts(shown: str) -> list[int]:
    """The byte counts the progress line drew, in order (to its 0.1 unit)."""
    return [round(float(number.replace(",", "")) * (KIB if unit == "KiB" else MIB))
            for number, unit in _DRAWN_AMOUNT.findall(shown)]


def test_get_on_a_slow_link_redraws_its_progress_within_the_first_mib(stored: Stored,
                                                                      tmp_path: Path) -> None:
    """The service answers through a link capped at 1 Mbit/s (bench/proxy.py's token bucket,
    passing 16 KiB on at a time): the line's count moves several times within the first MiB
    (or the whole video, if smaller). It moved once per chunk of the client's default 1 MiB:
    8.4 s at that rate, the line saying 0.0 until then."""
    first = min(MIB, len(stored.source))
    slow = LinkProfile(name="1 Mbit/s", rate_bytes_per_s=125_000)
    config = ProxyConfig(upstream_port=stored.server.port, profile=slow, chunk_size=16 * KIB)
    with ProxyThread(config) as link, on_terminal("get", stored.hash, "-o",
                                                  str(tmp_path / "slow.mp4"), "--server",
                                                  link.url) as terminal:

        def within_first() -> set[int]:
            return {got for got in _drawn_amounts(terminal.text()) if 0 < got < first}

        wait_until(lambda: len(within_first()) > 1 or terminal.process.poll() is not None
                   or any(got >= first for got in _drawn_amounts(terminal.text())),
                   timeout=60, what="the count drawn past its first MiB")
        terminal.process.send_signal(signal.SIGINT)  # the rest would take a while
        status, _, shown = terminal.finish()
    assert status in (0, 130), shown
    assert len(within_first()) > 1, shown


@pytest.mark.parametrize("force", [False, True], ids=["linked", "renamed"])
def test_ctrl_c_as_the_temporary_file_is_made_leaves_nothing(stored: Stored, tmp_path: Path,
                                                             force: bool) -> None:
    """A real SIGINT at the earliest moment: raised by open() itself once it has made the
    `.part` file (an LD_PRELOAD library), so that KeyboardInterrupt comes as the call returns.
    It came before the `try` that removes the file, which stayed; now status 130 and nothing
    left, with --force (renamed over FILE) or without (linked to it)."""
    library = preload_library("sigint_after_open", tmp_path)
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "vidcache", "get", stored.hash, "-o", str(out), "--server",
         stored.url, *(["--force"] if force else [])], capture_output=True, timeout=90,
        env={**os.environ, "LD_PRELOAD": str(library)})
    assert (run.returncode, run.stdout, run.stderr) == (130, b"", b"vidcache get: interrupted\n")
    assert _left_in(out.parent) == []


def test_get_writes_no_video_to_a_terminal(stored: Stored) -> None:
    """-o - with stdout a terminal is refused, as curl refuses binary output there: a video's
    bytes would garble it."""
    master, slave = pty.openpty()
    try:
        get = subprocess.run([sys.executable, "-m", "vidcache", "get", stored.hash, "-o", "-",
                              "--server", stored.url], stdout=slave, stderr=subprocess.PIPE,
                             timeout=60, check=False)
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    try:
        shown = os.read(master, 1 << 16)
    except OSError:  # EIO: nothing was written before every end of the terminal closed
        shown = b""
    finally:
        os.close(master)
    assert (get.returncode, shown) == (2, b""), get.stderr
    assert get.stderr.startswith(b"vidcache get: error: -o - would write the video's bytes to "
                                 b"the terminal: ")


def test_get_to_a_closed_stdout_says_so(stored: Stored) -> None:
    """-o - with stdout closed (>&-, where Python has no sys.stdout): an error line, status 1
    (stdout cannot be written), not a traceback."""
    run = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "vidcache",
                          "get", stored.hash, "-o", "-", "--server", stored.url],
                         stderr=subprocess.PIPE, timeout=60, check=False)
    assert (run.returncode, run.stderr) == (
        1, b"vidcache get: error: cannot write stdout: it is closed\n")


@pytest.mark.parametrize("size", ["missing", "true", "-1", '"62 MB"'])
def test_get_of_metadata_without_a_size_says_so(tmp_path: Path, size: str) -> None:
    """A server whose metadata has no usable size_bytes (a bool is not one): an error line,
    status 1, no file and no traceback."""
    content_hash = "ab" * 32
    meta: dict[str, object] = {"hash": content_hash, "file_path": "v.mp4"}
    if size != "missing":
        meta["size_bytes"] = json.loads(size)
    served = tmp_path / "served"
    (served / "meta").mkdir(parents=True)
    (served / "meta" / content_hash).write_text(json.dumps(meta))
    with serve_origin(served) as (url, _):
        run = vidcache("get", content_hash, "-o", str(tmp_path / "v.mp4"), "--server", url)
    assert (run.returncode, run.stdout) == (1, b""), run.stderr
    assert run.stderr.decode() == (f"vidcache get: error: metadata of video {content_hash}: "
                                   "no size_bytes in the service's answer\n")
    assert _left_in(tmp_path) == ["served"]


def test_get_off_a_terminal_draws_nothing(stored: Stored, tmp_path: Path) -> None:
    run = vidcache("get", stored.hash, "-o", str(tmp_path / "v.mp4"), "--server", stored.url)
    assert run.returncode == 0 and run.stderr == b""


# --- ingests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    with VidcacheServer(tmp_path_factory.mktemp("svc-cli-ingests") / "data",
                        "--download-timeout", "10") as server:
        yield server


def test_ingests_shows_a_stalled_download_as_a_table(busy: VidcacheServer,
                                                     videos: dict[str, Path]) -> None:
    """Half of big.mp4 received, the origin stalled: one row under the header with its age,
    phase, bytes of the Content-Length and percentage, bucket/prefix and URL (its password not
    shown); --json gives what GET /ingests answers. Once the ingest has failed: none."""
    size = videos["big.mp4"].stat().st_size
    bucket = unique("cli-ingests")
    with contextlib.ExitStack() as running:  # the ingest outlives the origin
        with serve_origin(videos["big.mp4"].parent) as (origin, stalled):
            shown = f"{origin}/stall/big.mp4"
            ingest = running.enter_context(subprocess.Popen(
                [sys.executable, "-m", "vidcache", "ingest",
                 shown.replace("http://", "http://user:secret@"), "--bucket", bucket,
                 "--prefix", "p", "--server", busy.url],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            assert stalled.wait(timeout=60)
            wait_until(lambda: [item for item in httpx.get(f"{busy.url}/ingests").json()["items"]
                                if item["bytes_received"] == size // 2],
                       timeout=60, what="half of the video received")
            table = vidcache("ingests", "--server", busy.url)
            as_json = vidcache("ingests", "--json", "--server", busy.url)
            answer = httpx.get(f"{busy.url}/ingests").json()
        _, failed = ingest.communicate(timeout=90)  # leaving the origin ended the stall
    assert ingest.returncode == 1 and b"HTTP 502" in failed, failed
    assert (table.returncode, table.stderr) == (0, b"")
    header, row = table.stdout.decode().splitlines()
    assert header.split() == ["AGE", "PHASE", "PROGRESS", "BUCKET", "URL"]
    progress = f"{size // 2 / MIB:,.1f} of {size / MIB:,.1f} MiB ({size // 2 * 100 // size}%)"
    assert row.endswith(f"  downloading  {progress}  {bucket}/p  {shown}"), row
    assert row.split("  ")[0].endswith(" s") and "secret" not in row
    assert header.index("URL") == row.index(shown)  # aligned
    assert (as_json.returncode, json.loads(as_json.stdout)) == (0, answer)
    none = vidcache("ingests", "--server", busy.url)
    assert (none.returncode, none.stdout, none.stderr) == (0, b"no ingests under way\n", b"")


def test_ingests_of_a_vidcache_without_the_route_says_so(busy: VidcacheServer) -> None:
    """A vidcache 1.x without the extension answers 404 in its JSON ({"detail": "Not Found"},
    FastAPI's), here from the fault proxy in front of the service."""
    with FaultyLink(busy.port) as link:
        link.faults.enable(Refuse(status=404, detail="Not Found", match=path_prefix("/ingests")))
        run = vidcache("ingests", "--server", link.url)
    assert (run.returncode, run.stdout) == (1, b"")
    assert run.stderr.decode() == (
        f"vidcache ingests: error: {link.url} has no GET /ingests (HTTP 404): a vidcache service "
        "without that extension, which does not list its ingests under way\n")

