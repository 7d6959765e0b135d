"""What `vidcache ingest` shows on a terminal while it waits for the service, which answers an
ingest only once the video is stored: once a second it asks the service for the ingests under
way (`GET /ingests`, progress.py), finds its own by URL, and redraws one line with the phase
and, while downloading, the bytes so far, of how many, the rate and the time waited, as curl
or wget show a download. A service without that route, or a failed poll, leaves the time
waited alone. Off a terminal nothing is shown: scripts read stdout, and stderr stays quiet.
`vidcache get` draws its download's line the same way, from the bytes it has written.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from vidcache.chunks import KIB, MIB
from vidcache_client import IngestUnderWay, VidCacheClient, VidCacheError
from vidcache_client._threads import started as thread_started

# seconds of polls a download's rate is measured over: recent enough to show a stall soon
_RATE_WINDOW = 5.0
# seconds a poll's answer is shown for: a poll waiting longer leaves the time waited alone
_FRESH = 3.0
# columns left free after the line: a Ctrl-C's '^C', echoed where the line ends, must not wrap
_ECHO = 3
_PHASES = {"queued": "queued behind other ingests", "validating": "validating (ffprobe)",
           "phash": "perceptual hash (ffmpeg)", "frames": "comparing the frames (ffmpeg)",
           "audio": "comparing the audio (ffmpeg)",
           "storing": "storing"}


def own_ingest(client: VidCacheClient, url: str) -> IngestUnderWay | None:
    """The oldest ingest of `url` (shown without credentials, as the service shows it) that
    the service says it runs; None if it says nothing."""
    try:
        return next((ingest for ingest in client.ingests() if ingest.url == url), None)
    except (VidCacheError, RuntimeError):
        # a service without the route (404) or a failed poll: the time waited alone;
        # RuntimeError: the client was closed under a last poll, the ingest having ended
        return None


@contextlib.contextmanager
def progress_on_terminal(poll: Callable[[], IngestUnderWay | None],
                         stream: TextIO = sys.stderr) -> Iterator[None]:
    """On a terminal, a line on `stream` redrawn every second until the block ends, then
    erased: what `poll` last said of the ingest, or how long it has waited for the service.

    `poll` runs in a thread of its own, once a second: one waiting for a service that does
    not answer (up to the client's timeout) must not stop the line, whose seconds then go on
    as `waiting for the service`."""
    if not stream.isatty():
        yield
        return
    done = threading.Event()
    started = time.monotonic()
    heard = _Heard(started, None, None)  # the latest poll's answer

    def keep_polling() -> None:
        nonlocal heard
        rate = _Rate()
        pause = 0.5  # then 1 s: each poll half a second ahead of a redraw
        while not done.wait(pause):
            ingest = poll()
            now = time.monotonic()
            heard = _Heard(now, ingest, rate.update(ingest, now))
            pause = 1.0

    def line(now: float) -> str:
        latest = heard
        if now - latest.at >= _FRESH:
            latest = _Heard(now, None, None)
        return describe(latest.ingest, latest.rate, now - started)

    # Not joined: a poll may be waiting for a service that no longer answers (the reason for
    # a Ctrl-C).
    # Without a thread (a limit on threads) the command goes on without its line.
    if not thread_started(threading.Thread(target=keep_polling, name="vidcache-poll", daemon=True)):
        yield
        return
    try:
        with _redrawn(line, stream):
            yield
    finally:
        done.set()


@contextlib.contextmanager
def download_on_terminal(received: Callable[[], int], expected: int | None,
                         stream: TextIO = sys.stderr) -> Iterator[None]:
    """`vidcache get`'s line on a terminal, redrawn every second until the block ends, then
    erased: the bytes `received()` so far, of `expected` if known, the rate and the time."""
    if not stream.isatty():
        yield
        return
    started = time.monotonic()
    rate = _Rate()

    def line(now: float) -> str:
        got = received()
        speed = rate.add(now, got)
        shown = "" if speed is None else f", {_speed(speed)}"
        so_far = amount(got, expected)
        return f"vidcache get: downloading {so_far}{shown}, {now - started:.0f} s"

    with _redrawn(line, stream):
        yield


@contextlib.contextmanager
def _redrawn(line: Callable[[float], str], stream: TextIO) -> Iterator[None]:
    """`line(time.monotonic())` drawn on the terminal `stream` every second, in place, until
    the block ends; then erased, and nothing drawn after."""
    done = threading.Event()
    drawing = threading.Lock()

    def show() -> None:
        while not done.wait(1.0):
            text = _fitted(line(time.monotonic()), stream)
            with drawing:
                if done.is_set():
                    return
                stream.write(f"\r{text}\033[K")
                stream.flush()

    if not thread_started(threading.Thread(target=show, name="vidcache-progress", daemon=True)):
        yield
        return
    try:
        yield
    finally:
        with drawing:
            done.set()
            stream.write("\r\033[K")
            stream.flush()


def _fitted(line: str, stream: TextIO) -> str:
    """`line` cut to fit the terminal's width with room left for the echo of a Ctrl-C ('^C'):
    '\r' goes back to the start of a wrapped line's last row only, so each redraw would leave
    a row behind, and the erasing all rows but that one. On a terminal of unknown width (0
    columns: a pseudo-terminal never sized) as it is."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):  # no such file descriptor, or not a terminal any more
        return line
    return line[:columns - _ECHO] if columns > _ECHO else line


def describe(ingest: IngestUnderWay | None, rate: float | None, waited: float) -> str:
    """The line for `ingest` (None: unknown), downloading at `rate` bytes/s if known, after
    `waited` seconds."""
    seconds = f"{waited:.0f} s"
    if ingest is None:
        return f"vidcache ingest: waiting for the service ({seconds})"
    if ingest.phase == "downloading":
        received = amount(ingest.bytes_received, ingest.bytes_expected)
        speed = "" if rate is None else f", {_speed(rate)}"
        return f"vidcache ingest: downloading {received}{speed}, {seconds}"
    return f"vidcache ingest: {_PHASES.get(ingest.phase, ingest.phase)}, {seconds}"


def amount(received: int, expected: int | None) -> str:
    """`412.3 of 1,024.0 MiB (40%)`, or `412.3 MiB` if the total is unknown."""
    unit, size = ("KiB", KIB) if (expected or received) < MIB else ("MiB", MIB)
    if expected is None:
        return f"{received / size:,.1f} {unit}"
    percent = received * 100 // expected if expected else 100
    return f"{received / size:,.1f} of {expected / size:,.1f} {unit} ({percent}%)"


def _speed(rate: float) -> str:
    unit, size = ("KiB/s", KIB) if rate < MIB else ("MiB/s", MIB)
    return f"{rate / size:,.1f} {unit}"


@dataclass(frozen=True)
class _Heard:
    at: float  # time.monotonic() of the answer
    ingest: IngestUnderWay | None
    rate: float | None


class _Rate:
    """A download's bytes per second over the samples of the last _RATE_WINDOW seconds."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()  # (time, bytes received)
        self._of: tuple[str, str] | None = None  # the download's (url, started)

    def update(self, ingest: IngestUnderWay | None, now: float) -> float | None:
        """The rate with this poll's `ingest` counted; None until two polls saw it download."""
        if ingest is None or ingest.phase != "downloading":
            self._samples.clear()
            return None
        download = (ingest.url, ingest.started)
        if download != self._of or (self._samples
                                    and ingest.bytes_received < self._samples[-1][1]):
            self._samples.clear()  # another download: the next ingest of the URL
            self._of = download
        return self.add(now, ingest.bytes_received)

    def add(self, now: float, received: int) -> float | None:
        """The rate with `received` bytes at `now` counted; None until the second sample."""
        self._samples.append((now, received))
        while len(self._samples) > 2 and now - self._samples[1][0] >= _RATE_WINDOW:
            self._samples.popleft()
        then, before = self._samples[0]
        return (received - before) / (now - then) if now > then else None
