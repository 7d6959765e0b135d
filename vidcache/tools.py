"""ffprobe and ffmpeg as children of the service.

Each tool runs in a session of its own. A terminal's Ctrl-C goes to the whole foreground process
group, which holds the service when a shell or `scripts/bench` started it: it must stop the
service, whose shutdown then decides about the ingests in flight, and not their decoders, whose
death was answered as 422 "not a video" (ffprobe dies of SIGINT; ffmpeg catches it and exits
255, silently at `-v error`). At shutdown, once the grace period of the ingests is over, `stop`
kills the tools still running and refuses new ones (ShuttingDown), so the service ends then and
not when a decoder finishes.

The kernel kills a tool when the thread that started it dies (setpriv --pdeathsig, from
util-linux), so a killed service leaves no decoder running on and writing into tmp/ after the
restart has cleaned it. Where setpriv is missing, tools just run unguarded.

A tool ended by a signal (the shutdown's, an operator's kill, the OOM killer's) says nothing
about its input: ShuttingDown or ToolStopped (503), never NotAVideo.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading

from vidcache.errors import MediaToolError, NotAVideo, ShuttingDown, ToolStopped

_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
# ffmpeg's exit status after it caught SIGINT or SIGTERM (it uses 1 for errors of its own)
_FFMPEG_SIGNALLED = 255


class Tools:
    """Runs the service's tools, each for at most `timeout` seconds. Thread-safe."""

    def __init__(self, *, timeout: float) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._stopped = False

    def run(self, argv: list[str], *, what: str) -> subprocess.CompletedProcess[bytes]:
        """`argv` run to its end, its output captured; raises MediaToolError if the tool is
        missing, ShuttingDown after `stop`, ToolStopped if a signal ended it, NotAVideo if it
        outran the timeout."""
        if shutil.which(argv[0]) is None:
            raise MediaToolError(f"{argv[0]} is not installed; install ffmpeg")
        with self._lock:
            if self._stopped:
                raise ShuttingDown()
            try:
                process = subprocess.Popen([*_DIE_WITH_PARENT, *argv], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           start_new_session=True)
            except FileNotFoundError as exc:
                raise MediaToolError(f"{argv[0]} is not installed; install ffmpeg") from exc
            self._running.add(process)
        try:
            with process:
                try:
                    stdout, stderr = process.communicate(timeout=self._timeout)
                except BaseException:
                    process.kill()
                    raise
        except subprocess.TimeoutExpired as exc:
            raise NotAVideo(f"{what} did not finish within {self._timeout:g} s") from exc
        finally:
            with self._lock:
                self._running.discard(process)
        status = process.returncode
        if status < 0 or (argv[0] == "ffmpeg" and status == _FFMPEG_SIGNALLED):
            if self._stopped:
                raise ShuttingDown()
            how = f"killed by {_signal_name(-status)}" if status < 0 else \
                f"stopped by a signal (exit status {status})"
            raise ToolStopped(f"{what} was {how}; the video was not judged, try again")
        return subprocess.CompletedProcess(argv, status, stdout, stderr)

    def stop(self) -> None:
        """Kill the tools running and refuse new ones: the server is shutting down."""
        with self._lock:
            self._stopped = True
            for process in self._running:
                process.kill()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"
