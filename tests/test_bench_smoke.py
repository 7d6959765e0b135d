"""`scripts/bench --quick` runs end to end: media, service, proxy, mounts, JSON, chart, table.

The benchmark itself never runs in the test suite (its figures are not assertions); this only
checks the harness works. Peers that are not installed are skipped by the harness, which
records why; the test does not install them (BENCH_NO_INSTALL=1).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.contenders import Mount
from bench.faults import FaultInjector, Latency, Refuse, Stall, path_prefix
from bench.guardian import Guardian
from bench.proxy import (
    LOOPBACK,
    Connection,
    HookChain,
    Hooks,
    LinkProfile,
    ProxyConfig,
    ProxyThread,
    Verdict,
    body_length,
)
from bench.proxy_process import ProxyProcess
from bench.shims import CanonicalHeaderCase, IndexShim
from bench.splice_relay import SpliceRelay
from bench.stack import LoopbackServer, Video, serving
from bench.workloads import READ_SIZE, read_segments
from tests.service_stress_support import processes_using, programs_using
from tests.support import VidcacheServer, command_line, descendants, wait_until
from tests.vcfs_support import VcfsMount, process_alive, requires_fuse

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "BENCH_NO_INSTALL": "1"})
    assert result.returncode == 0, f"scripts/bench --quick failed:\n{result.stderr[-4000:]}"
    return out, result.stdout


@contextlib.contextmanager
def _bench_in_background(tmp_path: Path, contender: str
                         ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`scripts/bench --quick` of one contender, leading a process group of its own (as a
    terminal's foreground job: a Ctrl-C reaches all of it), and the file of its progress;
    killed if still running at the end, and its work directory removed."""
    progress = tmp_path / "progress.log"
    with open(progress, "w") as stderr:
        bench = subprocess.Popen(
            [str(ROOT / "scripts" / "bench"), "--quick", "--contenders", contender,
             "--out", str(tmp_path)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            env={**os.environ, "BENCH_NO_INSTALL": "1"})
    try:
        yield bench, progress
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        work = _logged_path(progress, "work directory ")
        if work:
            shutil.rmtree(work, ignore_errors=True)


@requires_fuse[0]
@requires_fuse[1]
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_a_signal_stops_the_run_and_leaves_no_mount_or_server_behind(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """`kill` (SIGTERM) of `scripts/bench`, or Ctrl-C (SIGINT to its whole process group, the
    proxies' included), while vcfs is being measured: the harness unmounts and stops what it
    started, keeps its logs and says where, without a traceback."""
    with _bench_in_background(tmp_path, "vcfs") as (bench, progress):
        wait_until(lambda: "· vcfs · run 1/1" in progress.read_text(), timeout=120,
                   what="vcfs measured")
        if signum == signal.SIGINT:
            os.killpg(bench.pid, signum)
        else:
            bench.send_signal(signum)
        assert bench.wait(timeout=60) == 128 + signum
        log = progress.read_text()
        work = log.rpartition("stopped; logs kept in ")[2].strip().partition("\n")[0]
        assert work.startswith("/"), log
        assert "Traceback" not in log, log
        assert work not in Path("/proc/mounts").read_text()
        assert processes_using(Path(work)) == []


@requires_fuse[0]
@requires_fuse[1]
def test_a_killed_harness_leaves_no_mount_or_server_behind(tmp_path: Path) -> None:
    """SIGKILL of the harness (the OOM killer's, or pytest's on an interrupted test) while vcfs
    is being measured: it cleans up nothing itself, yet within a bounded time nothing is left
    mounted under its work directory, no process works in it (the service, the proxy, the
    daemon), and its guardian has exited too. Was: the service and the mount stayed."""
    with _bench_in_background(tmp_path, "vcfs") as (bench, progress):
        work = wait_until(lambda: _logged_path(progress, "work directory "), timeout=120,
                          what="the work directory")
        wait_until(lambda: "· vcfs · run 1/1" in progress.read_text(), timeout=120,
                   what="vcfs measured")
        wait_until(lambda: _mounts_under(work), timeout=60, interval=0.005, what="vcfs mounted")
        # scripts/bench execs the harness: its PID is the harness's
        assert b"bench.run" in Path(f"/proc/{bench.pid}/cmdline").read_bytes()
        guardians = [pid for pid, command in descendants(bench.pid).items()
                     if "bench.guardian" in command]

        def left_behind() -> list[str]:
            return ([f"mount {path}" for path in _mounts_under(work)]
                    + [f"process {pid}: {command_line(pid) or '(ended)'}"
                       for pid in processes_using(Path(work))]
                    + [f"guardian {pid}" for pid in guardians if process_alive(pid)])

        try:
            bench.kill()
            assert bench.wait(timeout=60) == -signal.SIGKILL
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: not left_behind(), timeout=60, what="nothing left behind")
            assert left_behind() == []
        finally:  # only ours, should a check have failed
            for pid in processes_using(Path(work)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for path in _mounts_under(work):
                subprocess.run(["fusermount3", "-u", "-z", path], check=False, timeout=30)


@requires_fuse[0]
@requires_fuse[1]
def test_the_guardian_stops_and_unmounts_only_what_it_was_told_about(
    tmp_path: Path, vidcache_server: VidcacheServer
) -> None:
    """The guardian's pipe closed without 'done' (the harness gone): it stops the process it
    was told about, lazily unmounts the mount point it was told about (dead: its daemon got
    SIGKILL), leaves a process it was not told about running, and exits."""
    guardian = Guardian().start()
    told = subprocess.Popen(_sleeper(tmp_path))
    untold = subprocess.Popen(_sleeper(tmp_path))
    mount = VcfsMount(vidcache_server.url, tmp_path / "mnt")
    try:
        guardian.watch(told.pid)
        mount.start()
        guardian.watch_mount(mount.mountpoint)
        mount.kill()
        guardian.close(done=False)
        assert told.wait(timeout=10) == -signal.SIGTERM
        assert untold.poll() is None
        assert _mounts_under(str(tmp_path)) == []
    finally:
        for process in (told, untold):
            process.kill()
            process.wait()
        mount.stop()


def test_the_guardian_told_done_stops_nothing(tmp_path: Path) -> None:
    """On a normal end the harness says nothing is left: the guardian exits and stops nothing,
    even a process it was told about that still runs."""
    guardian = Guardian().start()
    told = subprocess.Popen(_sleeper(tmp_path))
    try:
        guardian.watch(told.pid)
        guardian.close(done=True)
        assert told.poll() is None
    finally:
        told.kill()
        told.wait()


def _mounts_under(directory: str) -> list[str]:
    """The mount points in /proc/mounts inside `directory`."""
    return [fields[1] for line in Path("/proc/mounts").read_text().splitlines()
            if (fields := line.split())[1].startswith(directory + "/")]


def test_ctrl_c_while_the_service_decodes_the_corpus_stops_the_run(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the process group) while the service runs ffprobe/ffmpeg on a video of
    the corpus: the run says it stopped, with exit 130, and the service's log calls no video
    invalid. Was: its decoders, in the same process group, got the SIGINT too, and the ingest
    failed with 422 'not a video'."""
    with _bench_in_background(tmp_path, "local") as (bench, progress):
        work = wait_until(lambda: _logged_path(progress, "work directory "), timeout=120,
                          what="the work directory")
        store = Path(work) / "store"
        wait_until(lambda: programs_using(store, "ffprobe", "ffmpeg"),
                   timeout=120, interval=0.005, what="the service decoding a video")
        os.killpg(bench.pid, signal.SIGINT)
        assert bench.wait(timeout=60) == 128 + signal.SIGINT
        log = progress.read_text()
        assert f"stopped; logs kept in {work}" in log and "Traceback" not in log, log
        service_log = (Path(work) / "vidcache.log").read_text()
        assert "not a video" not in service_log, service_log


def _logged_path(log: Path, before: str) -> str:
    """The path the log names right after `before` ('' until it does)."""
    text = log.read_text()
    return text.partition(before)[2].partition(";")[0].strip() if before in text else ""


@contextlib.contextmanager
def _signal_after(seconds: float) -> Iterator[None]:
    """A real signal (SIGALRM) `seconds` into the block, handled as the harness handles SIGTERM
    (`bench.run`): by raising SystemExit wherever the main thread is."""
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sleeper(tmp_path: Path) -> list[str]:
    """A process that never mounts or serves; its command line names `tmp_path`."""
    return [sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path)]


def _signalled_while_starting(start: Callable[[], object], tmp_path: Path) -> None:
    """`start()`, signalled 0.3 s in, ends in SystemExit and leaves no process whose command
    line names `tmp_path`."""
    try:
        with pytest.raises(SystemExit), _signal_after(0.3):
            start()
        assert processes_using(tmp_path) == []
    finally:
        for pid in processes_using(tmp_path):  # only ours, should a check have failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_signal_while_a_mount_starts_stops_its_daemon(tmp_path: Path) -> None:
    """The window the signal test can hit: the daemon is started but not mounted yet, so the
    contender does not hold it; it must not outlive the harness (and mount later)."""
    mountpoint = tmp_path / "mnt"
    mount = Mount(_sleeper(tmp_path), mountpoint, tmp_path / "daemon.log",
                  probe=mountpoint / "by-hash")
    _signalled_while_starting(mount.start, tmp_path)
    assert mount.process is None


def test_a_signal_while_a_server_starts_stops_it(tmp_path: Path) -> None:
    class Sleeper(LoopbackServer):
        def start(self) -> Sleeper:
            self.process = subprocess.Popen(_sleeper(tmp_path))
            self._wait_ready(lambda: False, timeout=60, what="sleeper", log="-")
            return self

    server = Sleeper()
    _signalled_while_starting(server.start, tmp_path)
    assert server.process is not None and server.process.returncode is not None


def test_a_signal_while_a_proxy_starts_stops_it(tmp_path: Path) -> None:
    class Silent(ProxyProcess):  # reads its commands until EOF, never says its port
        def _argv(self) -> list[str]:
            return [sys.executable, "-c", "import sys; sys.stdin.read()", str(tmp_path)]

    _signalled_while_starting(Silent(upstream_port=1, profile=LOOPBACK).start, tmp_path)


@requires_fuse[0]
@requires_fuse[1]
def test_writes_json_with_every_figure_of_vcfs_and_the_floor(quick_run: tuple[Path, str]
                                                             ) -> None:
    out, _ = quick_run
    data = json.loads((out / "bench-quick.json").read_text())
    assert data["quick"] is True
    assert not [s for s in data["skipped"] if s["contender"] in ("vcfs", "local")]
    rows = {(r["contender"], r["figure"]): r for r in data["results"]}
    for contender in ("vcfs", "local"):
        for figure in ("seq_cold", "seq_warm", "ffprobe_faststart", "ffprobe_moov_end",
                       "seek", "random_128k", "concurrent"):
            row = rows[contender, figure]
            assert row["errors"] == 0, (contender, figure, row["notes"])
            assert row["median"] > 0
    vcfs_cold = rows["vcfs", "seq_cold"]
    assert vcfs_cold["server_mb"] > 0 and vcfs_cold["requests"] >= 1
    assert vcfs_cold["peak_rss_mb"] is not None
    assert data["targets"], "targets are evaluated even in a quick run"


@requires_fuse[0]
@requires_fuse[1]
def test_prints_a_markdown_table_and_draws_a_chart(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    assert "| figure | contender | median |" in stdout
    assert "### Targets" in stdout
    assert (out / "bench-quick.png").read_bytes().startswith(b"\x89PNG")


@requires_fuse[0]
@requires_fuse[1]
def test_the_tables_say_what_ran(quick_run: tuple[Path, str]) -> None:
    """`--quick` runs 2 concurrent readers, and its figure and targets say 2 (they said 8);
    the Markdown service table has the per-1000-requests column of the JSON (it had not)."""
    out, stdout = quick_run
    data = json.loads((out / "bench-quick.json").read_text())
    assert data["concurrent_readers"] == 2
    assert "| 2 concurrent readers, aggregate | vcfs |" in stdout
    assert "2 concurrent readers: zero errors (vcfs)" in [t["target"] for t in data["targets"]]
    assert "8 concurrent" not in stdout
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        pytest.skip("no nginx: the service throughput step is skipped")
    assert data["service_speed"]
    for row in data["service_speed"]:
        assert (f"| {row['server']} | {row['mode']} | {row['median']:.0f} "
                f"| {row['min']:.0f}-{row['max']:.0f} | {row['server_cpu_s_per_gb']:.2f} "
                f"| {row['server_cpu_s_per_1000_requests']:.2f} |") in stdout.splitlines()


@requires_fuse[0]
@requires_fuse[1]
def test_skipped_contenders_say_why(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    data = json.loads((out / "bench-quick.json").read_text())
    measured = {r["contender"] for r in data["results"]}
    for skip in data["skipped"]:
        assert skip["reason"], skip
    expected = {"local", "curl", "ffmpeg-url", "rclone", "httpfs2", "vcfs"}
    assert expected <= measured | {s["contender"] for s in data["skipped"]}


@requires_fuse[0]
@requires_fuse[1]
def test_runs_interleave_the_contenders_and_the_json_keeps_what_the_doc_says(
    tmp_path: Path,
) -> None:
    """docs/benchmarks.md: contenders are interleaved within each run (`--quick`: no warm-up);
    each sample records the proxy's counters and its first requests (40 at most), vcfs's
    `.vcfs/stats`, the daemon's peak RSS and CPU seconds; the RSS target's budget is the
    cache vcfs mounted with (was 256 MiB whatever --vcfs-options said); `--name` names the
    files; the work directory is removed."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--quick", "--runs", "2", "--contenders", "local",
         "vcfs", "--workloads", "random", "--no-service-speed", "--vcfs-options",
         "--cache-size 64M", "--out", str(tmp_path), "--name", "interleaved"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "BENCH_NO_INSTALL": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    rounds = re.findall(r"loopback · random · (\S+) · (.+)", result.stderr)
    assert rounds == [("local", "run 1/2"), ("vcfs", "run 1/2"),
                      ("local", "run 2/2"), ("vcfs", "run 2/2")], result.stderr
    work = result.stderr.partition("work directory ")[2].partition(";")[0]
    assert work.startswith("/tmp/") and not Path(work).exists()
    assert (tmp_path / "interleaved.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads((tmp_path / "interleaved.json").read_text())
    assert (data["quick"], data["runs"], data["vcfs_options"]) == (True, 2, "--cache-size 64M")
    assert list(data["profiles"]) == ["loopback"] and data["service_speed"] == []
    samples = {(s["contender"], s["run"]): s for s in data["samples"]}
    assert sorted(samples) == [("local", 0), ("local", 1), ("vcfs", 0), ("vcfs", 1)]
    for run in (0, 1):
        local, vcfs = samples["local", run], samples["vcfs", run]
        assert (local["requests"], local["request_log"], local["daemon_stats"]) == (None, [], None)
        assert vcfs["per_op"] == 8 and vcfs["errors"] == 0
        assert vcfs["requests"] >= 1 and vcfs["bytes_down"] > 0
        assert 1 <= len(vcfs["request_log"]) <= 40
        assert all(r["path"].startswith("/") for r in vcfs["request_log"])
        assert vcfs["rss_kib"] > 0 and set(vcfs["cpu_seconds"]) == {"daemon", "service", "proxy"}
        assert isinstance(vcfs["daemon_stats"], dict) and "raw" not in vcfs["daemon_stats"]
    rss_target = [t["target"] for t in data["targets"] if "peak RSS" in t["target"]]
    assert rss_target == ["daemon peak RSS <= cache budget + 80 MB (= 147 MB)"]


def test_a_service_variant_labels_its_rows_and_the_service_target(tmp_path: Path) -> None:
    """`--service-variant`: the service throughput rows of the run's service carry the
    variant's label, derived from its arguments, and the 0.8x-nginx target says it compares
    the variant (they said `vidcache serve (uvicorn, as shipped)`); that variant is not
    measured twice among the others (none with --quick)."""
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        pytest.skip("no nginx: the service throughput step is skipped")
    result = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--quick", "--contenders", "local", "--workloads",
         "sequential", "--service-variant", "--server uvicorn --chunk-size 65536",
         "--out", str(tmp_path), "--name", "variant"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "BENCH_NO_INSTALL": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((tmp_path / "variant.json").read_text())
    label = "vidcache, uvicorn, 64 KiB chunks"
    servers = [row["server"] for row in data["service_speed"]]
    assert servers.count(label) == 4 and "vidcache serve (uvicorn, as shipped)" not in servers
    [target] = [t for t in data["targets"] if t["target"].startswith("service GET")]
    assert target["target"] == ("service GET /video/{hash} >= 0.8x nginx (vidcache, uvicorn, "
                                "64 KiB chunks: the variant measured, not vidcache serve)")
    assert target["holds"] is not None and not target["measured"].startswith("n/a"), target
    assert "in place of `vidcache serve`" in result.stdout


# The latency proxy on its own: the reliability work builds its fault injection on its hooks.

BODY = bytes(range(256)) * 4096  # 1 MiB


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves BODY at any path, honouring `Range: bytes=a-b` (http.server does not)."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the real service

    def do_GET(self) -> None:
        first, last = 0, len(BODY) - 1
        asked = self.headers.get("Range")
        if asked:
            start, _, end = asked.removeprefix("bytes=").partition("-")
            first, last = int(start), int(end)
        self.send_response(206 if asked else 200)
        if asked:
            # lower case, as uvicorn sends it: CanonicalHeaderCase must restore the case
            self.send_header("content-range", f"bytes {first}-{last}/{len(BODY)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self.wfile.write(BODY[first : last + 1])

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _OriginServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client leaving mid-body is what some tests do


@pytest.fixture(scope="module")
def origin_port() -> Iterator[int]:
    with serving(_OriginServer(("127.0.0.1", 0), _RangeHandler)) as server:
        yield int(server.server_address[1])


def _proxy(port: int, *, hooks: Hooks | None = None, profile: LinkProfile = LOOPBACK
           ) -> ProxyThread:
    return ProxyThread(ProxyConfig(upstream_port=port, profile=profile), hooks=hooks)


def _relay(port: int) -> SpliceRelay:
    shims = HookChain(IndexShim(names=["abc"]), CanonicalHeaderCase())
    return SpliceRelay(ProxyConfig(upstream_port=port), answer=shims.on_request,
                       rewrite_head=CanonicalHeaderCase().rewrite_head)


def _counters(proxy: ProxyThread | SpliceRelay) -> dict[str, Any]:
    return proxy.snapshot() if isinstance(proxy, SpliceRelay) else proxy.counters()


@pytest.mark.parametrize("kind", ["asyncio", "splice"])
def test_proxy_forwards_and_counts_requests_and_bytes(origin_port: int, kind: str) -> None:
    proxy = _proxy(origin_port) if kind == "asyncio" else _relay(origin_port)
    with proxy, httpx.Client(base_url=proxy.url) as client:
        whole = client.get("/blob")
        part = client.get("/blob", headers={"Range": "bytes=10-19"})
        counters = _counters(proxy)
    assert whole.content == BODY
    assert part.status_code == 206 and part.content == BODY[10:20]
    assert counters["connections"] == 1 and counters["requests"] == 2
    assert [r["range"] for r in counters["request_log"]] == [None, "bytes=10-19"]
    # the bodies plus two response heads of a few hundred bytes each
    assert len(BODY) + 10 + 100 < counters["bytes_down"] < len(BODY) + 10 + 2000


@pytest.mark.parametrize(("head", "framing"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", (12, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", (0, True)),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n", (0, False)),
    # latin-1 '\u00b2' passes str.isdigit(), int() refuses it: was a ValueError in the proxy
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", (0, True)),
    (b"HTTP/1.1 \xb200 OK\r\nContent-Length: 12\r\n\r\n", (12, False)),
], ids=["length", "chunked", "304", "superscript-length", "superscript-status"])
def test_the_proxy_frames_an_answer_by_its_head(head: bytes, framing: tuple[int, bool]) -> None:
    """(body bytes, cannot be delimited): a length the proxy cannot read passes the rest of
    the connection on as it comes."""
    assert body_length(None, head) == framing


def test_proxy_delays_every_request_not_only_the_connection(origin_port: int) -> None:
    slow = LinkProfile(name="slow", one_way_delay_s=0.05)
    with _proxy(origin_port, profile=slow) as proxy, httpx.Client(base_url=proxy.url) as client:
        client.get("/blob", headers={"Range": "bytes=0-0"})  # connection set up
        started = time.monotonic()
        client.get("/blob", headers={"Range": "bytes=0-0"})
        second = time.monotonic() - started
    assert second >= 0.1  # a lower bound: one round trip of 2 x 50 ms on a kept-alive connection


def test_hooks_answer_requests_rewrite_heads_and_cut_responses(origin_port: int) -> None:
    class ResetAfterFirstChunk(Hooks):
        def on_response_data(self, conn: Connection, data: bytes) -> Verdict:
            return Verdict(data[:1000], end="reset") if conn.bytes_down == 0 else Verdict(data)

    shims = HookChain(IndexShim(names=["abc"]), CanonicalHeaderCase())
    with _proxy(origin_port, hooks=shims) as proxy:
        index = httpx.get(f"{proxy.url}/video/")
        raw = httpx.get(f"{proxy.url}/blob", headers={"Range": "bytes=0-9"})
        counters = proxy.counters()
    assert '<a href="abc">' in index.text and counters["answered_by_hooks"] == 1
    assert raw.content == BODY[:10]
    assert b"Content-Range" in [name for name, _ in raw.headers.raw]
    with _proxy(origin_port, hooks=ResetAfterFirstChunk()) as proxy, \
            pytest.raises(httpx.HTTPError):
        httpx.get(f"{proxy.url}/blob")


def test_an_answer_a_fault_delays_does_not_hold_back_the_one_before_it() -> None:
    """Pipelined answers often reach the proxy in one read of the server's stream: a stall of
    the second (as tests stall a lookup's `/chunks` behind its `/meta`) must not delay the
    first, which the proxy once sent with it, 60 s late. Through a chain of two hooks."""
    answers = b"".join(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body
                       for body in (b"first", b"later"))
    with socket.create_server(("127.0.0.1", 0)) as origin:

        def serve() -> None:  # both answers in one write, once both requests are in
            conn, _ = origin.accept()
            with conn:
                received = b""
                while received.count(b"\r\n\r\n") < 2 and (data := conn.recv(4096)):
                    received += data
                conn.sendall(answers)
                conn.recv(1)  # until the proxy leaves

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        faults = FaultInjector()
        faults.enable(Stall(seconds=60, match=path_prefix("/later")))
        hooks = HookChain(CanonicalHeaderCase(), faults)
        with (_proxy(origin.getsockname()[1], hooks=hooks) as proxy,
              socket.create_connection(("127.0.0.1", proxy.proxy.port), timeout=20) as client):
            client.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b"first" not in got and (data := client.recv(4096)):  # 20 s at most
                got += data
        thread.join(timeout=10)
    assert got.startswith(answers[: answers.index(b"first") + len(b"first")])
    assert b"later" not in got  # the stalled body (its head may pass: a stall acts on bodies)
    assert faults.injected() == {"stall": 1}


@pytest.mark.parametrize("asked", ["frf", "srf", "frrf", "rff"])
def test_a_refusal_comes_in_its_turn_among_pipelined_answers(origin_port: int,
                                                              asked: str) -> None:
    """Requests pipelined on one connection, `r` refused by the proxy, `f` forwarded, `s`
    forwarded and its answer delayed by a fault: the answers come in request order, as from
    a real server. The proxy once sent a refusal at once, ahead of the answers still owed
    (a cold lookup's `/meta` then got the refusal meant for its `/chunks`)."""
    faults = FaultInjector()
    faults.enable(Refuse(status=503, match=path_prefix("/refused")))
    faults.enable(Latency(seconds=0.3, match=path_prefix("/slow")))
    paths = {"f": "/forwarded", "r": "/refused", "s": "/slow"}
    ranges = [(1000 * number, 1000 * number + 99) for number in range(len(asked))]
    with (_proxy(origin_port, hooks=faults) as proxy,
          socket.create_connection(("127.0.0.1", proxy.proxy.port), timeout=20) as sock):
        sock.sendall(b"".join(f"GET {paths[kind]} HTTP/1.1\r\nHost: x\r\n"
                              f"Range: bytes={first}-{last}\r\n\r\n".encode()
                              for kind, (first, last) in zip(asked, ranges, strict=True)))
        answers = []
        with sock.makefile("rb") as stream:
            for _ in asked:
                status = int(stream.readline().split()[1])
                length = 0
                while (line := stream.readline()) != b"\r\n":
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                answers.append((status, stream.read(length)))
        counters = proxy.counters()
    assert answers == [(503, b'{"detail": "injected by the fault proxy"}') if kind == "r" else
                       (206, BODY[first : last + 1])
                       for kind, (first, last) in zip(asked, ranges, strict=True)]
    assert counters["answered_by_hooks"] == asked.count("r")
    assert faults.injected()["refuse"] == asked.count("r")


# The loopback profile's relay (bench/splice_relay.py): the same counting, bodies spliced.

def test_relay_answers_the_index_and_restores_header_case(origin_port: int) -> None:
    with _relay(origin_port) as relay:
        index = httpx.get(f"{relay.url}/video/")
        raw = httpx.get(f"{relay.url}/blob", headers={"Range": "bytes=0-9"})
        head = httpx.head(f"{relay.url}/blob")
        counters = relay.snapshot()
    assert '<a href="abc">' in index.text and counters["answered_by_hooks"] == 1
    assert raw.content == BODY[:10]
    assert b"Content-Range" in [name for name, _ in raw.headers.raw]
    assert head.status_code == 200 and head.headers["content-length"] == str(len(BODY))
    assert [r["method"] for r in counters["request_log"]] == ["GET", "GET", "HEAD"]


def test_relay_passes_pipelined_requests_in_order(origin_port: int) -> None:
    asked = [(0, 99_999), (100_000, 100_009), (5, 5)]
    with _relay(origin_port) as relay, socket.create_connection(("127.0.0.1", relay.port)) as sock:
        sock.sendall(b"".join(f"GET /blob HTTP/1.1\r\nHost: x\r\nRange: bytes={a}-{b}\r\n\r\n"
                              .encode() for a, b in asked))
        with sock.makefile("rb") as answers:
            for first, last in asked:
                head = []
                while (line := answers.readline()) != b"\r\n":
                    head.append(line.lower())
                assert head[0].startswith(b"http/1.1 206")
                assert answers.read(last - first + 1) == BODY[first : last + 1]
        assert relay.snapshot()["requests"] == 3


def test_relay_ends_a_link_whose_client_left_mid_body(origin_port: int) -> None:
    with _relay(origin_port) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as sock:
            sock.sendall(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(1000)  # the body is on its way; leave without reading it
        wait_until(lambda: relay.open_connections == 0, timeout=10,
                   what="the relay's connections closed")
        assert httpx.get(f"{relay.url}/blob").content == BODY  # and the relay serves on


def test_relay_refuses_a_profile_it_would_not_honour(origin_port: int) -> None:
    slow = LinkProfile(name="slow", one_way_delay_s=0.05)
    with pytest.raises(ValueError, match="neither delays nor caps"):
        SpliceRelay(ProxyConfig(upstream_port=origin_port, profile=slow))


def _video(local: Path) -> Video:
    size = local.stat().st_size
    return Video(name=local.name, content_hash="0" * 64, size=size, duration_s=1.0,
                 local_path=local, blob_path=local, file_path=local.name)


@pytest.mark.parametrize("damage", ["none", "one byte", "truncated"])
def test_concurrent_readers_compare_every_byte(tmp_path: Path, damage: str) -> None:
    """The concurrent workload's reads (reused buffers) still catch a wrong or missing byte,
    in a whole buffer, in a buffer's tail and in a last, partial buffer."""
    content = os.urandom(3 * READ_SIZE + 12345)
    local = tmp_path / "local.mp4"
    local.write_bytes(content)
    served = bytearray(content)
    if damage == "one byte":
        served[2 * READ_SIZE + 7] ^= 0xFF
    elif damage == "truncated":
        del served[-10:]
    target = tmp_path / "served.mp4"
    target.write_bytes(served)
    segments = [(0, len(content)), (READ_SIZE // 2, READ_SIZE)]

    done, bad = read_segments(str(target), _video(local), segments)

    if damage == "none":
        assert (done, bad) == (len(content) + READ_SIZE, None)
    else:
        at = 2 * READ_SIZE if damage == "one byte" else 3 * READ_SIZE
        assert bad == f"local.mp4: wrong or short read at {at}"
        assert done == at



def test_help_explains_every_option_of_the_harness() -> None:
    harness = subprocess.run([sys.executable, "-m", "bench.run", "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    options = set(re.findall(r"^  (--[a-z-]+)", harness, re.MULTILINE))
    assert "--workloads" in options and "--vcfs-options" in options
    script = subprocess.run([str(ROOT / "scripts" / "bench"), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert "set -" not in script  # the header comment only, not the code after it
    for option in options:
        assert re.search(rf"^  {option}\b.*\S", script, re.MULTILINE), option


def test_the_frame_check_corpus_prints_a_row_for_each_kind_of_pair(tmp_path: Path) -> None:
    """`python -m bench.frame_check_corpus` on its smallest slide: its videos made, each kind
    of pair compared (2 changes, their half-size re-upload, plain re-uploads, 4 watermarks)."""
    # Its own timeout under the 300 s hang guard: a hang then names the command and kills it.
    table = subprocess.run([sys.executable, "-m", "bench.frame_check_corpus", "--out",
                            str(tmp_path), "--slides", "g360-24"], cwd=ROOT,
                           capture_output=True, text=True, timeout=240, check=True).stdout
    rows = [line for line in table.splitlines() if re.match(r"\| \D.*\(\d+\) \| \d", line)]
    assert len(rows) == 9, table
    assert "| re-upload (7) |" in table
