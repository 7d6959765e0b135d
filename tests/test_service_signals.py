"""The service's decoders and signals: a decoder ended by a signal is the server's failure
(503), never a verdict on the video; a Ctrl-C to the process group the server runs in stops the
server, not the decoders of the ingests it still gives its grace period; the shutdown ends the
decoders still running. Real server, real ffmpeg, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_stress_support import processes_using
from tests.support import VidcacheServer, free_port, wait_until
from vidcache.errors import ToolStopped
from vidcache.tools import Tools

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def slow_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A video whose frame sampling keeps ffmpeg busy for seconds: one keyframe in 90 s, so
    each sample decodes from the start (cheap to encode: a flat picture)."""
    path = tmp_path_factory.mktemp("slow") / "slow.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "color=c=gray:size=1280x720:rate=25:duration=90", "-c:v", "libx264",
                    "-preset", "ultrafast", "-g", "100000", "-pix_fmt", "yuv420p", str(path)],
                   check=True, timeout=120)
    return path


def _frame_samplers(data_dir: Path) -> list[int]:
    """PIDs of the ffmpeg processes sampling frames of a download in `data_dir`."""
    found = []
    for pid in processes_using(data_dir):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().partition(b"\0")[0]
        except OSError:
            continue
        if Path(os.fsdecode(argv0)).name == "ffmpeg":
            found.append(pid)
    return found


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
        [pid] = wait_until(lambda: _frame_samplers(server.data_dir), timeout=60,
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
def server_in_its_own_group(tmp_path: Path, slow_video: Path) -> Iterator[tuple[
        subprocess.Popen[bytes], str, Path]]:
    """`vidcache serve` leading a process group of its own, as a shell's foreground job:
    (process, URL, data directory)."""
    data, port = tmp_path / "data", free_port()
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "vidcache", "serve", "--data", str(data), "--port", str(port),
             "--allow-file-dir", str(slow_video.parent)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, (tmp_path / "server.log").read_text()
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=30, what="vidcache serve")
        yield process, url, data
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        for pid in processes_using(data):  # only ours: their command line names our tmp_path
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_stops_the_server_not_its_decoders(
        server_in_its_own_group: tuple[subprocess.Popen[bytes], str, Path], slow_video: Path,
        tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the server's whole process group) while ffmpeg samples frames: the
    server shuts down gracefully, the ingest either finishes in the grace period or is ended by
    the shutdown, and nothing calls the video invalid; no decoder outlives the server. Was:
    ffmpeg got the SIGINT too, exited 255, and the ingest answered 422 'not a video'."""
    process, url, data = server_in_its_own_group
    ingest = _Ingest(url, slow_video.as_uri())
    wait_until(lambda: _frame_samplers(data), timeout=60, what="ffmpeg sampling frames")
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 0
    assert processes_using(data) == []
    answer = ingest.result()
    log = (tmp_path / "server.log").read_text()
    assert "not a video" not in log, log
    finished = isinstance(answer, httpx.Response) and answer.status_code == 200
    assert finished or "ffmpeg (frame sampling) stopped: the server is shutting down" in log, (
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
        except ToolStopped as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(marker.exists, timeout=30, what="the tool started")
    tools.stop()
    thread.join(timeout=30)
    assert [str(exc) for exc in outcome] == ["test tool stopped: the server is shutting down"]
    assert processes_using(tmp_path) == []
    with pytest.raises(ToolStopped, match="not started: the server is shutting down"):
        tools.run(["true"], what="another tool")
