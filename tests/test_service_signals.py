"""The service's decoders and signals: a decoder ended by a signal is the server's failure
(503), never a verdict on the video; a Ctrl-C to the process group the server runs in stops the
server, not the decoders of the ingests it still gives its grace period; the shutdown ends the
ingests still running when that is over (decoding, downloading, or past both) with a 503 in the
service's error shape, stores nothing half and exits. Real server, real ffmpeg, real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest

from tests.service_stress_support import (
    PausingServer,
    SilentDnsServer,
    assert_consistent,
    can_run_a_silent_dns,
    processes_using,
    programs_using,
)
from tests.service_support import Api, blob_files, serve_origin, temp_files
from tests.support import (
    SYN_SENT,
    VidcacheServer,
    sighup_in_children,
    sockets_to_loopback,
    wait_until,
)
from vidcache.download import Downloader
from vidcache.errors import ShuttingDown
from vidcache.hostguard import HostGuard
from vidcache.origin_sockets import StoppableBackend
from vidcache.progress import IngestBoard
from vidcache.tools import Tools

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def slow_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A video whose frame sampling keeps ffmpeg busy for seconds: one keyframe in 180 s, so
    the samples are decoded from the start, once, up to 168 s of 720p (~3 s here; cheap to
    encode: a flat picture). At 90 s it was ~1.5 s once sampling decoded the run once, a
    short window for the tests to find ffmpeg running and signal it."""
    path = tmp_path_factory.mktemp("slow") / "slow.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "color=c=gray:size=1280x720:rate=25:duration=180", "-c:v", "libx264",
                    "-preset", "ultrafast", "-g", "100000", "-pix_fmt", "yuv420p", str(path)],
                   check=True, timeout=120)
    return path


class _Ingest:
    """POST /ingest of `url` in a thread; `answer` is the response, or the error."""

    def __init__(self, server_url: str, url: str) -> None:
        self.answer: httpx.Response | httpx.HTTPError | None = None
        self._thread = threading.Thread(target=self._run, args=(server_url, url), daemon=True)
        self._thread.start()

    def _run(self, server_url: str, url: str) -> None:
        try:
            self.answer = httpx.post(f"{server_url}/ingest", timeout=120,
                                     json={"url": url, "bucket": "signals"})
        except httpx.HTTPError as exc:
            self.answer = exc

    def result(self) -> httpx.Response | httpx.HTTPError | None:
        self._thread.join(timeout=120)
        return self.answer


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
def test_a_decoder_ended_by_a_signal_is_503_not_a_verdict(tmp_path: Path, slow_video: Path,
                                                          signum: signal.Signals) -> None:
    """SIGKILL (the OOM killer) kills ffmpeg; SIGTERM (an operator's kill) makes it exit 255.
    Either way the video was not judged: 503 naming what happened, and the same URL ingests
    afterwards. Was 422 'not a video: cannot decode frames (no diagnostic)'."""
    url = slow_video.as_uri()
    with VidcacheServer(tmp_path / "data", "--allow-file-dir", str(slow_video.parent)) as server:
        ingest = _Ingest(server.url, url)
        [pid] = wait_until(lambda: programs_using(server.data_dir, "ffmpeg"), timeout=60,
                           what="ffmpeg sampling frames")
        os.kill(pid, signum)
        answer = ingest.result()
        assert isinstance(answer, httpx.Response), answer
        assert answer.status_code == 503, answer.text
        detail = answer.json()["detail"]
        # ffmpeg catches SIGTERM once it has set up (exit 255); before that it dies of it
        assert detail in [f"ffmpeg (frame sampling) was {how}; the video was not judged, "
                          "try again" for how in (f"killed by {signum.name}",
                                                  "stopped by a signal (exit status 255)")]
        assert f"failed (503): {detail}" in server.log()
        assert "not a video" not in server.log()
        again = httpx.post(f"{server.url}/ingest", timeout=120,
                           json={"url": url, "bucket": "signals"})
        assert again.status_code == 200 and again.json()["status"] == "new", again.text


@pytest.fixture
def server_in_its_own_group(tmp_path: Path, slow_video: Path) -> Iterator[VidcacheServer]:
    """`vidcache serve` leading a process group of its own, as a shell's foreground job."""
    data = tmp_path / "data"
    try:
        with VidcacheServer(data, "--allow-file-dir", str(slow_video.parent),
                            new_session=True) as server:
            yield server
    finally:
        for pid in processes_using(data):  # only ours: their command line names our tmp_path
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_stops_the_server_not_its_decoders(server_in_its_own_group: VidcacheServer,
                                                  slow_video: Path) -> None:
    """Ctrl-C (SIGINT to the server's whole process group) while ffmpeg samples frames: the
    server shuts down gracefully, the ingest either finishes in the grace period or is ended by
    the shutdown, and nothing calls the video invalid; no decoder outlives the server. Was:
    ffmpeg got the SIGINT too, exited 255, and the ingest answered 422 'not a video'."""
    server = server_in_its_own_group
    process, data = server.process, server.data_dir
    assert process is not None
    ingest = _Ingest(server.url, slow_video.as_uri())
    wait_until(lambda: programs_using(data, "ffmpeg"), timeout=60, what="ffmpeg sampling frames")
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 0
    assert processes_using(data) == []
    answer = ingest.result()
    log = server.log()
    assert "not a video" not in log, log
    finished = isinstance(answer, httpx.Response) and answer.status_code == 200
    assert finished or "failed (503): the server is shutting down; try again" in log, (
        answer, log)


def test_stop_ends_the_tools_running_and_refuses_new_ones(tmp_path: Path) -> None:
    """What the shutdown does once uvicorn's grace period is over: the decoders still running
    are killed at once (not after the media timeout) and no new one starts."""
    marker = tmp_path / "tool-is-running"
    tools = Tools(timeout=150)
    outcome: list[Any] = []

    def run() -> None:
        try:
            tools.run(["sh", "-c", f"touch {marker}; while :; do sleep 0.1; done",
                       str(tmp_path)], what="test tool")
        except ShuttingDown as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(marker.exists, timeout=30, what="the tool started")
    tools.stop()
    thread.join(timeout=30)
    assert [str(exc) for exc in outcome] == ["the server is shutting down; try again"]
    assert processes_using(tmp_path) == []
    with pytest.raises(ShuttingDown):
        tools.run(["true"], what="another tool")


_SHUTTING_DOWN = "the server is shutting down; try again"
# uvicorn re-raises SIGTERM once shut down, and vidcache SIGHUP
_EXIT_STATUS = {signal.SIGTERM: -signal.SIGTERM, signal.SIGINT: 0, signal.SIGHUP: -signal.SIGHUP}


def _assert_answered_shutting_down(answer: httpx.Response | httpx.HTTPError | None,
                                   log: str, url: str) -> None:
    """A 503 in the service's error shape, logged as one line without a traceback."""
    assert isinstance(answer, httpx.Response), (answer, log)
    assert (answer.status_code, answer.headers["content-type"]) == (503, "application/json"), (
        answer.text, log)
    assert answer.json() == {"detail": _SHUTTING_DOWN}
    assert f"ingest {url} failed (503): {_SHUTTING_DOWN}" in log, log
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["TERM", "INT", "HUP"])
def test_shutdown_answers_a_download_in_flight_503(tmp_path: Path, videos: dict[str, Path],
                                                    signum: signal.Signals) -> None:
    """SIGTERM, Ctrl-C or SIGHUP (the terminal closed) while a download waits on a silent
    origin: once the grace period is over the download is cut and answered 503 'the server is
    shutting down', logged once; the server exits at once; no temp file is left; the video
    stored before stays. Was: a plain-text 500 and a traceback ('CancelledError'); with Ctrl-C
    the server waited for the download to time out and then logged 'failed (502): ... Bad file
    descriptor', blaming the origin; with SIGTERM the download's temp file was left for the
    next start to clean; SIGHUP killed the server, the ingest's connection cut unanswered."""
    data = tmp_path / "data"
    with (serve_origin(videos["c.mkv"].parent) as (origin, stalled),
          sighup_in_children(ignored=False),  # whether or not the tests run under nohup
          VidcacheServer(data, "--download-timeout", "120") as server):
        assert server.process is not None
        kept = Api(server.url).ingest_ok(f"{origin}/b.mp4", "kept")
        url = f"{origin}/stall/c.mkv"
        ingest = _Ingest(server.url, url)
        assert stalled.wait(timeout=60)
        server.process.send_signal(signum)
        assert server.process.wait(timeout=60) == _EXIT_STATUS[signum]
        answer = ingest.result()
    log = server.log()
    _assert_answered_shutting_down(answer, log, url)
    assert sum(url in line for line in log.splitlines()) == 1, log  # one line, no 502
    assert temp_files(data) == []
    with VidcacheServer(data) as again:
        served = httpx.get(f"{again.url}/video/{kept['hash']}", timeout=30).content
        assert served == videos["b.mp4"].read_bytes()
        assert_consistent(data, again.url)
    assert "start-up recovery" not in again.log()


def _takes_sighup(pid: int) -> bool | None:
    """Whether the process catches SIGHUP (True), ignores it (False), or neither (None)."""
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGHUP - 1)
    if int(status["SigCgt"], 16) & bit:
        return True
    return False if int(status["SigIgn"], 16) & bit else None


def test_sighup_is_taken_except_under_nohup(tmp_path: Path) -> None:
    """Started from a terminal, the ready service catches SIGHUP (a graceful stop, tested
    above); started under nohup, it leaves SIGHUP ignored, so the terminal's closing does not
    stop it (the first version of the SIGHUP handling caught it there too)."""
    for ignored in (False, True):
        with sighup_in_children(ignored=ignored):
            server = VidcacheServer(tmp_path / f"data-{ignored}").start()
        try:
            assert server.process is not None
            assert _takes_sighup(server.process.pid) is (not ignored)
        finally:
            server.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_shutdown_answers_an_ingest_decoding_503(tmp_path: Path, slow_video: Path,
                                                 signum: signal.Signals) -> None:
    """SIGTERM or Ctrl-C while ffmpeg samples frames, held by SIGSTOP so it cannot finish in
    the grace period: its decoder is killed and the ingest answered 503 'the server is
    shutting down', logged once; no decoder or temp file is left. Was: a plain-text 500 and a
    traceback (uvicorn cancelled the request while the ingest went on)."""
    url = slow_video.as_uri()
    data = tmp_path / "data"
    with VidcacheServer(data, "--allow-file-dir", str(slow_video.parent)) as server:
        assert server.process is not None
        ingest = _Ingest(server.url, url)
        [pid] = wait_until(lambda: programs_using(data, "ffmpeg"), timeout=60,
                           what="ffmpeg sampling frames")
        try:
            os.kill(pid, signal.SIGSTOP)
            server.process.send_signal(signum)
            assert server.process.wait(timeout=60) == _EXIT_STATUS[signum]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # our server's decoder, should it have outlived it
        answer = ingest.result()
    _assert_answered_shutting_down(answer, server.log(), url)
    assert "not a video" not in server.log()
    assert processes_using(data) == []
    assert temp_files(data) == [] and blob_files(data) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_an_ingest_past_decoding_at_shutdown_stores_nothing_half(
        tmp_path: Path, videos: dict[str, Path], signum: signal.Signals) -> None:
    """An ingest that cannot end when stopped (held right after its frames were sampled, before
    it decides) is still answered 503 when uvicorn gives up on it; the store closes under it,
    and when it goes on it moves nothing into the bucket and says so; the next start finds a
    consistent directory and the URL ingests. Was: a plain-text 500 and a traceback; after
    Ctrl-C the ingest went on against the closed store, renamed its blob into the bucket,
    failed ('store is not open'), removed it again and logged nothing."""
    video = videos["c.mkv"]
    url = video.as_uri()
    data = tmp_path / "data"
    server = PausingServer(data, ("shutil.rmtree", "frames-"),
                           "--allow-file-dir", str(video.parent))
    with server:
        assert server.process is not None
        ingest = _Ingest(server.url, url)
        wait_until(server.paused, timeout=60, what="the ingest held after sampling frames")
        server.process.send_signal(signum)
        wait_until(lambda: "Application shutdown complete" in server.log(), timeout=60,
                   what="the store closed")
        server.release()
        assert server.process.wait(timeout=60) == _EXIT_STATUS[signum]
        answer = ingest.result()
    log = server.log()
    _assert_answered_shutting_down(answer, log, url)
    assert not [target for target in server.renamed_to() if "/signals/" in target]
    if signum == signal.SIGINT:  # the process lived on until the ingest ended: it said how
        assert f"vidcache.ingest: ingest {url} failed (503): {_SHUTTING_DOWN}" in log, log
    with VidcacheServer(data, "--allow-file-dir", str(video.parent)) as again:
        assert assert_consistent(data, again.url) == []
        api = Api(again.url)
        assert api.ingest_ok(url, "signals")["status"] == "new"


@contextlib.contextmanager
def _silent_origin() -> Iterator[tuple[int, Callable[[], bytes]]]:
    """A loopback origin that accepts a connection and never answers it; yields (port,
    received), `received()` being what the connection has sent so far (it never blocks)."""
    with socket.create_server(("127.0.0.1", 0)) as origin, contextlib.ExitStack() as stack:
        origin.setblocking(False)
        connection: list[socket.socket] = []
        sent = bytearray()

        def received() -> bytes:
            with contextlib.suppress(BlockingIOError):
                if not connection:
                    accepted = stack.enter_context(origin.accept()[0])
                    accepted.setblocking(False)
                    connection.append(accepted)
                sent.extend(connection[0].recv(65536))
            return bytes(sent)

        yield origin.getsockname()[1], received


@contextlib.contextmanager
def _origin_waiting(how: str) -> Iterator[tuple[str, Callable[[], bool]]]:
    """A loopback origin an ingest waits on; yields (URL, `waiting`: true once the ingest
    waits). 'silent': it accepts the connection and never answers the request; 'unreachable':
    its listen queue (length 0) is already full, so the connection's SYNs are dropped and it
    stays in SYN_SENT."""
    if how == "silent":
        with _silent_origin() as (port, received):
            yield f"http://127.0.0.1:{port}/never.mp4", lambda: b"\r\n\r\n" in received()
        return
    with socket.socket() as origin:
        origin.bind(("127.0.0.1", 0))
        origin.listen(0)
        port = origin.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10):  # fills the queue
            yield (f"http://127.0.0.1:{port}/never.mp4",
                   lambda: sockets_to_loopback(port, SYN_SENT) > 0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("origin", ["silent", "unreachable"])
def test_an_ingest_waiting_for_its_origin_is_cut_at_shutdown(
        tmp_path: Path, origin: str, signum: signal.Signals) -> None:
    """SIGTERM or Ctrl-C while an ingest waits for its origin's first answer (connected, the
    request sent) or is still connecting (SYNs dropped): the shutdown cuts the download like
    any other, so the ingest is answered 503 'the server is shutting down', logged once, and
    the server exits then, long before the --download-timeout of 120 s; no temp file is left
    and nothing is stored. Was: only uvicorn's cancel answered it (logged '... (still running
    1 s after it was stopped)'); after Ctrl-C the process then waited for the download's
    thread until the --download-timeout, and SIGTERM left its temp file behind."""
    data = tmp_path / "data"
    with _origin_waiting(origin) as (url, waiting):
        _signal_while_the_ingest_waits(
            VidcacheServer(data, "--download-timeout", "120", new_session=True), url, signum,
            waiting, f"the ingest waiting for its {origin} origin")
    with VidcacheServer(data) as again:
        assert assert_consistent(data, again.url) == []


def _signal_while_the_ingest_waits(server: VidcacheServer, url: str, signum: signal.Signals,
                                   waiting: Callable[[], bool], what: str) -> None:
    """Start `server`, ingest `url`, send `signum` once `waiting()`: the server exits at once,
    the ingest answered 503 'shutting down' and logged once, no temp file or blob left."""
    with server:
        assert server.process is not None
        ingest = _Ingest(server.url, url)
        wait_until(waiting, timeout=60, what=what)
        if signum == signal.SIGINT:
            os.killpg(server.process.pid, signal.SIGINT)  # a terminal's Ctrl-C
        else:
            server.process.send_signal(signum)
        assert server.process.wait(timeout=30) == _EXIT_STATUS[signum]
        answer = ingest.result()
        assert temp_files(server.data_dir) == [] and blob_files(server.data_dir) == []
    log = server.log()
    _assert_answered_shutting_down(answer, log, url)
    assert sum(url in line for line in log.splitlines()) == 1, log
    assert "still running" not in log, log


@pytest.mark.skipif(not can_run_a_silent_dns(),
                    reason="needs port 53 (root) and user and mount namespaces")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_an_ingest_resolving_its_origin_is_cut_at_shutdown(tmp_path: Path,
                                                           signum: signal.Signals) -> None:
    """SIGTERM or Ctrl-C while an ingest waits for the system resolver, whose DNS server does
    not answer: the shutdown cuts that wait like any other, so the ingest is answered 503 'the
    server is shutting down', logged once, and the server exits then, its lookup still
    waiting; no temp file is left. Was: only uvicorn's cancel answered it ('... (still
    running 1 s after it was stopped)'), and the process then waited for the lookup's thread
    (the resolver's own timeouts)."""
    server = SilentDnsServer(tmp_path / "data", "--download-timeout", "120", new_session=True)
    _signal_while_the_ingest_waits(server, "http://origin.test/never.mp4", signum, server.asked,
                                   "the ingest asking the DNS server")

def test_stop_cuts_a_download_in_its_tls_handshake(tmp_path: Path) -> None:
    """What the shutdown does to a download whose https origin accepted the connection and
    never answers the TLS handshake: the stop cuts it at once (not at the timeout), as
    ShuttingDown, and its temp file is gone."""
    downloader = Downloader(tmp_dir=tmp_path, max_size=1 << 20, timeout=120, max_time=600,
                            guard=HostGuard(["127.0.0.1"]), chunk_size=1 << 20)
    outcome: list[Exception] = []
    with _silent_origin() as (port, received):

        def fetch() -> None:
            url = f"https://127.0.0.1:{port}/never.mp4"
            try:
                with IngestBoard().track(url, "b", "") as progress, \
                        downloader.fetch(url, progress):
                    pass
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()
        wait_until(lambda: received()[:1] == b"\x16", timeout=30,  # a TLS handshake record
                   what="the TLS handshake started")
        downloader.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the download still waits for its TLS handshake"
    downloader.close()
    assert [type(exc) for exc in outcome] == [ShuttingDown], outcome
    assert list(tmp_path.iterdir()) == []


class _StoppedOnceTracked(StoppableBackend):
    """Stops right after it has tracked a new socket, before that socket connects: the
    moment when shutting the socket down does nothing (it is not connecting yet)."""

    def _track(self, sock: socket.socket, *, replacing: socket.socket | None = None) -> None:
        super()._track(sock, replacing=replacing)
        self.stop()


def test_a_stop_just_before_a_socket_connects_refuses_the_connection() -> None:
    """The stop came after the backend tracked the socket and before it connected: the
    connect went ahead (here to a listening origin: connected, as if no stop had come; to a
    silent one it would wait for the download timeout)."""
    backend = _StoppedOnceTracked()
    with (socket.create_server(("127.0.0.1", 0)) as listener,
          pytest.raises(httpcore.ConnectError, match="shutting down")):
        backend.connect_tcp("127.0.0.1", listener.getsockname()[1], timeout=30)
