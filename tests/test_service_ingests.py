"""`GET /ingests`, the ingests under way, against real services: a download held half-way by a
stalling origin shows its bytes, an ingest held at a later step of the pipeline its phase, an
ingest behind another of the same URL is queued, credentials in a URL are never shown, and an
ingest leaves the list once answered, failed or stored. And `vidcache ingest`'s progress line
on a terminal (a pseudo-terminal here), which polls that route; off a terminal it says nothing.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_stress_support import PausingServer
from tests.service_support import SIGNATURE, on_terminal, serve_origin, unique
from tests.support import VidcacheServer, wait_until
from vidcache_client import IngestUnderWay, VidCacheClient

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    with VidcacheServer(tmp_path_factory.mktemp("ingests") / "data",
                        "--download-timeout", "10") as running:
        yield running


def _under_way(server_url: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{server_url}/ingests", timeout=10)
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def _when_listing(server_url: str, count: int) -> list[dict[str, Any]]:
    """The ingests under way if there are `count` of them, else none."""
    items = _under_way(server_url)
    return items if len(items) == count else []


class _Ingest:
    """POST /ingest in a thread; `result()` is the response."""

    def __init__(self, server_url: str, url: str, bucket: str, prefix: str = "") -> None:
        self.answer: httpx.Response | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        args=(server_url, url, bucket, prefix))
        self._thread.start()

    def _run(self, server_url: str, url: str, bucket: str, prefix: str) -> None:
        self.answer = httpx.post(f"{server_url}/ingest", timeout=90,
                                 json={"url": url, "bucket": bucket, "prefix": prefix})

    def result(self) -> httpx.Response:
        self._thread.join(timeout=90)
        assert self.answer is not None, "no answer to the ingest"
        return self.answer


def test_a_stalled_download_shows_its_bytes_and_no_credentials(
        server: VidcacheServer, videos: dict[str, Path]) -> None:
    """The origin sends half of the video and stalls: the ingest is listed downloading, with
    half the bytes received of the Content-Length, under its URL without `user:secret@`; a
    second ingest of the URL waits behind it, queued, listed after it. Once the origin goes,
    both fail and the list is empty. (No such route before: 404.)"""
    size = videos["big.mp4"].stat().st_size
    bucket, other = unique("ingests"), unique("ingests")
    with serve_origin(videos["big.mp4"].parent) as (origin, stalled):
        shown = f"{origin}/stall/big.mp4"
        url = shown.replace("http://", "http://user:secret@")
        first = _Ingest(server.url, url, bucket, "p")
        assert stalled.wait(timeout=60)
        [listed] = wait_until(
            lambda: [item for item in _under_way(server.url)
                     if item["bytes_received"] == size // 2], timeout=60,
            what="half of the video received")
        assert listed == {"url": shown, "bucket": bucket, "prefix": "p", "phase": "downloading",
                          "bytes_received": size // 2, "bytes_expected": size,
                          "started": listed["started"]}
        assert listed["started"].endswith("Z")
        datetime.fromisoformat(listed["started"])

        second = _Ingest(server.url, url, other)
        both = wait_until(lambda: _when_listing(server.url, 2), timeout=60,
                          what="the second ingest listed")
        assert both[0] == listed
        assert both[1] == {"url": shown, "bucket": other, "prefix": "", "phase": "queued",
                           "bytes_received": 0, "bytes_expected": None,
                           "started": both[1]["started"]}
        raw = httpx.get(f"{server.url}/ingests").text
        assert "secret" not in raw and "user" not in raw, raw
        with VidCacheClient(server.url, timeout=30) as client:
            assert client.ingests()[0] == IngestUnderWay(
                shown, bucket, "p", "downloading", size // 2, size, listed["started"])
    # leaving the origin ends the stall: the body ends short, and the origin is gone
    assert first.result().status_code == 502
    assert second.result().status_code == 502
    assert _under_way(server.url) == []


@pytest.mark.parametrize(("point", "phase"), [
    (("subprocess.Popen", "'ffprobe'"), "validating"),
    (("subprocess.Popen", "'ffmpeg'"), "phash"),
    (("os.rename", "/{bucket}/"), "storing"),
], ids=["validating", "phash", "storing"])
def test_each_step_after_the_download_is_shown_and_a_stored_ingest_leaves(
        tmp_path: Path, media_url: str, videos: dict[str, Path], point: tuple[str, str],
        phase: str) -> None:
    """The ingest held as ffprobe starts, as ffmpeg starts sampling frames, as its blob is
    moved into the bucket: each listed in its phase, the whole video received; once stored
    it is gone. (No such route before: 404.)"""
    size = videos["b.mp4"].stat().st_size
    bucket = unique("phase")
    event, match = point
    url = f"{media_url}/b.mp4"
    paused = PausingServer(tmp_path / "data", (event, match.format(bucket=bucket)))
    with paused:
        ingest = _Ingest(paused.url, url, bucket)
        wait_until(paused.paused, timeout=60, what=f"the ingest held at {point}")
        assert _under_way(paused.url) == [
            {"url": url, "bucket": bucket, "prefix": "", "phase": phase,
             "bytes_received": size, "bytes_expected": size,
             "started": _under_way(paused.url)[0]["started"]}]
        paused.release()
        answer = ingest.result()
        assert answer.status_code == 200 and answer.json()["status"] == "new", answer.text
        assert _under_way(paused.url) == []


# --- vidcache ingest on a terminal ---------------------------------------------------------------

def test_ingest_on_a_terminal_shows_the_bytes_of_its_stalled_download(
        server: VidcacheServer, videos: dict[str, Path]) -> None:
    """Half of the video received, the origin stalled: the line says downloading, how much of
    how much, and the percentage, found by the URL without its credentials, which it does not
    show; erased before the error once the download fails. (Before: only the seconds waited.)"""
    size = videos["big.mp4"].stat().st_size
    half = size // 2
    expected = (f"vidcache ingest: downloading {half / MIB:,.1f} of {size / MIB:,.1f} MiB "
                f"({half * 100 // size}%), ")
    with contextlib.ExitStack() as running:  # the command outlives the origin
        with serve_origin(videos["big.mp4"].parent) as (origin, _stalled):
            terminal = running.enter_context(on_terminal(
                "ingest", f"{origin}/stall/big.mp4".replace("http://", "http://user:secret@"),
                "--bucket", unique("tty"), "--server", server.url))
            terminal.wait_drawn(expected)
        status, out, shown = terminal.finish()
    assert (status, out) == (1, ""), shown
    drawn = [line for line in shown.split("\r") if "downloading" in line]
    assert drawn and not [line for line in drawn if "secret" in line or "user" in line], drawn
    assert "\r\x1b[Kvidcache ingest: error: " in shown, shown  # erased before the error


def test_a_presigned_url_under_way_is_shown_with_its_signature_redacted(
        server: VidcacheServer, videos: dict[str, Path]) -> None:
    """GET /ingests lists the stalled download of a presigned URL with its X-Amz-Signature
    REDACTED; `vidcache ingest` on a terminal finds its own ingest by the URL shown so (the
    line says downloading) and shows the signature neither there nor in its error. (GET
    /ingests and the error showed it before.)"""
    with contextlib.ExitStack() as running:  # the command outlives the origin
        with serve_origin(videos["big.mp4"].parent) as (origin, _stalled):
            url = (f"{origin}/stall/big.mp4?X-Amz-Date=20250131T120000Z"
                   f"&X-Amz-Signature={SIGNATURE}&id=5")
            shown = url.replace(SIGNATURE, "REDACTED")
            terminal = running.enter_context(on_terminal(
                "ingest", url, "--bucket", unique("tty"), "--server", server.url))
            terminal.wait_drawn("vidcache ingest: downloading ")
            listed = httpx.get(f"{server.url}/ingests").text
            assert [item["url"] for item in json.loads(listed)["items"]] == [shown], listed
        status, out, drawn = terminal.finish()
    assert (status, out) == (1, ""), drawn
    assert f"vidcache ingest: error: ingest of {shown} into bucket" in drawn, drawn
    assert SIGNATURE not in listed + drawn


def test_the_line_fits_a_narrow_terminal() -> None:
    """On a terminal 40 columns wide, each redraw of the line is cut to 37 characters (room
    for the echo of the Ctrl-C): one that wraps cannot be redrawn in place ('\r' goes back to
    its last row only), so each second left a row behind. (Before: 'vidcache ingest: waiting
    for the service (1 s)', 47.) A service that never answers, the command interrupted."""
    with (socket.create_server(("127.0.0.1", 0)) as silent,
          on_terminal("ingest", "http://o.test/v.mp4", "--bucket", unique("narrow"),
                      "--server", f"http://127.0.0.1:{silent.getsockname()[1]}",
                      columns=40) as terminal):
        wait_until(lambda: terminal.text().count("\x1b[K") >= 2, timeout=60,
                   what="two redraws of the line")
        terminal.process.send_signal(signal.SIGINT)
        status, _out, shown = terminal.finish()
    assert status == 130, shown
    drawn = [piece.removesuffix("\x1b[K") for piece in shown.split("\r")
             if piece.endswith("\x1b[K") and len(piece) > len("\x1b[K")]
    assert len(drawn) >= 2, shown
    assert set(drawn) == {"vidcache ingest: waiting for the service"[:37]}, drawn


def test_ingest_shows_a_later_phase_on_a_terminal_and_nothing_off_it(
        tmp_path: Path, media_url: str) -> None:
    """An ingest held at ffprobe: the one run without a terminal prints its JSON result and
    nothing on stderr, while one of the same URL run on a terminal meanwhile (queued behind
    it: the oldest ingest of its URL is the one it shows) draws `validating (ffprobe)`.
    (Before: no such route, so only the seconds waited.)"""
    url = f"{media_url}/c.mkv"
    bucket = unique("quiet")
    paused = PausingServer(tmp_path / "data", ("subprocess.Popen", "'ffprobe'"))
    with paused:
        piped = subprocess.Popen(
            [sys.executable, "-m", "vidcache", "ingest", url, "--bucket", bucket,
             "--server", paused.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(paused.paused, timeout=60, what="the ingest held at ffprobe")
            with on_terminal("ingest", url, "--bucket", bucket, "--server",
                             paused.url) as terminal:
                terminal.wait_drawn("vidcache ingest: validating (ffprobe), ")
                paused.release()
                status, out, shown = terminal.finish()
            piped_out, piped_err = piped.communicate(timeout=90)
        finally:
            if piped.poll() is None:
                piped.kill()
                piped.wait()
    assert (piped.returncode, piped_err) == (0, "")
    assert json.loads(piped_out)["status"] == "new"
    assert status == 0, shown
    assert json.loads(out)["status"] == "url_alias"
    assert shown.endswith("\r\x1b[K"), shown  # the line erased
