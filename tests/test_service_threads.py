"""The service when no thread can be started (vidcache/thread_refusals.py): a real service in a
cgroup whose pids.max leaves it none. A request that needs a new thread is answered 503 saying
the server is out of threads, one that finds a thread idle is served, nothing is answered 500
or logged with a traceback, and once the limit is lifted everything is served again. And a
download whose idle-connection timer cannot start keeps its bytes."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from pathlib import Path

import httpx
import pytest

from tests.service_support import digest, keep_alive_origin, serve_origin
from tests.support import ESTABLISHED, VidcacheServer, new_cgroup, sockets_to_loopback, wait_until
from vidcache.chunks import DEFAULT_CHUNK_SIZE
from vidcache.download import Downloader
from vidcache.hostguard import HostGuard
from vidcache.progress import IngestBoard

DETAIL = ("the server is out of threads: a limit on threads (ulimit -u, the cgroup's pids.max) "
          "or on the memory for their stacks (ulimit -d, ulimit -v) is reached; try again")
OUT_OF_THREADS = (503, {"detail": DETAIL})
STALLED = ("b.mp4?stalled=1", "b.mp4?stalled=2", "b.mp4?stalled=3")
FIRST, LAST = 1000, 200_999  # the range read of a.mp4


def _answer(response: httpx.Response) -> tuple[int, object]:
    """Its status and JSON body (uvicorn's own 500 is plain text)."""
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def test_a_service_out_of_threads_answers_503_and_serves_again_once_it_has_some(
        tmp_path: Path, videos: dict[str, Path], media_url: str) -> None:
    """pids.max 1: no thread nor process can be started. With the anyio worker thread the
    server has started so far idle (the requests came one at a time), a range read is served
    (the fast path, whose lookup needs a thread of the event loop's executor, hands it to the
    route) and ingests fail 503 at their host-name lookup (http) or at ffprobe (file://).
    With every worker busy (three ingests stalled by their origin), a health check, a range
    read and an ingest fail 503. Once the limit is lifted, the same ingests store their
    videos and the stalled ones fail 502. Was: 500 and a traceback for each."""
    source = videos["a.mp4"].read_bytes()
    local = f"file://{videos['c.mkv']}"
    with new_cgroup("pids") as (cgroup, _, in_cgroup):
        server = VidcacheServer(tmp_path / "data", "--allow-file-dir",
                                str(videos["c.mkv"].parent))
        server.prefix = in_cgroup
        limit = cgroup / "pids.max"
        with server, httpx.Client(base_url=server.url, timeout=60) as http:
            assert server.process is not None

            def ingest(url: str) -> httpx.Response:
                return http.post("/ingest", json={"url": url, "bucket": "threads"})

            def read_range() -> httpx.Response:
                return http.get(f"/video/{stored}", headers={"Range": f"bytes={FIRST}-{LAST}"})

            stored = ingest(f"{media_url}/a.mp4").json()["hash"]
            # leaving the origin first lets the stalled downloads end, which the pool waits for
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(STALLED)) as pool, \
                    serve_origin(videos["b.mp4"].parent) as (stalling, _):
                try:
                    limit.write_text("1")
                    assert _answer(ingest(f"{media_url}/b.mp4")) == OUT_OF_THREADS
                    assert _answer(ingest(local)) == OUT_OF_THREADS
                    assert http.get("/health").status_code == 200
                    # last: its worker closes the file after the answer, and may be busy yet
                    ranged = read_range()
                    assert ranged.status_code == 206, ranged.text
                    assert ranged.content == source[FIRST : LAST + 1]

                    limit.write_text("max")
                    stalled = [pool.submit(ingest, f"{stalling}/stall/{name}")
                               for name in STALLED]
                    wait_until(lambda: sum(item["bytes_received"] > 0 for item in
                                           http.get("/ingests").json()["items"]) == len(STALLED),
                               timeout=60, what="the ingests stalled by their origin")
                    limit.write_text("1")
                    assert _answer(http.get("/health")) == OUT_OF_THREADS
                    assert _answer(read_range()) == OUT_OF_THREADS
                    assert _answer(ingest(local)) == OUT_OF_THREADS
                    assert server.process.poll() is None
                finally:
                    limit.write_text("max")
            assert [answer.result().status_code for answer in stalled] == [502] * len(STALLED)
            assert ingest(f"{media_url}/b.mp4").json()["status"] == "new"
            assert ingest(local).json()["status"] == "new"
            assert read_range().content == source[FIRST : LAST + 1]
            assert http.get("/health").status_code == 200
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    assert f"ingest {media_url}/b.mp4 failed (503): {DETAIL}" in log, log
    assert f"GET /health failed (503): {DETAIL}" in log, log


def test_downloads_whose_idle_timer_cannot_start_keep_their_bytes_and_close_their_connection(
        tmp_path: Path, videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """No thread can be started for the timer that closes the origin connections once idle
    (origin_sockets.IdleClosingPool; the test makes its start fail as CPython's does: a real
    limit would refuse the download's own threads first). The downloads have their bytes,
    their connection is closed at once, and one line says so for both; once timers start
    again, downloads close together share a connection again. Was: a download that had its
    bytes failed with RuntimeError (a 500 and a traceback for its ingest)."""
    refused = threading.Event()
    refused.set()
    start = threading.Timer.start

    def start_unless_refused(timer: threading.Timer) -> None:
        if refused.is_set():
            raise RuntimeError("can't start new thread")
        start(timer)

    monkeypatch.setattr(threading.Timer, "start", start_unless_refused)
    downloader = Downloader(tmp_dir=tmp_path, max_size=1 << 30, timeout=30, max_time=60,
                            guard=HostGuard(["127.0.0.1"]), chunk_size=DEFAULT_CHUNK_SIZE)

    def fetch(origin: str, name: str) -> None:
        url = f"{origin}/{name}"
        with IngestBoard().track(url, "timer", "") as progress, \
                downloader.fetch(url, progress) as download:
            assert download.content_hash == digest(videos[name].read_bytes())

    try:
        with caplog.at_level(logging.WARNING, logger="vidcache.origin_sockets"), \
                keep_alive_origin(videos["b.mp4"].parent) as (origin, accepted):
            port = int(origin.rpartition(":")[2])
            for count, name in enumerate(("b.mp4", "c.mkv"), start=1):
                fetch(origin, name)
                assert sockets_to_loopback(port, ESTABLISHED, pid=os.getpid()) == 0
                assert accepted() == count
            refused.clear()
            for name in ("b.mp4", "c.mkv"):
                fetch(origin, name)
            assert accepted() == 3
    finally:
        downloader.close()
    assert caplog.messages == [
        "no thread could be started to close idle origin connections after 5 s (a limit on "
        "threads (ulimit -u, the cgroup's pids.max) or on the memory for their stacks (ulimit "
        "-d, ulimit -v) is reached): closing them at once, until a thread can be started"]
