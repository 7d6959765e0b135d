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

Each tool may take at most `memory_cap` bytes (RLIMIT_DATA, set by util-linux prlimit on the
child alone: preexec_fn is unsafe in a threaded program): a hostile file must not make a
decoder allocate gigabytes, nor 8 ingests push the host into the OOM killer, which may pick the
service. RLIMIT_DATA counts the private writable memory (heap, mmap'd buffers and, since Linux
4.7, thread stacks), what a decoder can fill; RLIMIT_AS also counts the 230 MiB of shared
libraries ffmpeg maps and the 64 MiB glibc reserves for each thread's malloc arena (sampling a
4K video's frames: 1676 MiB of address space for 796 MiB of data). A tool refused memory
says so on stderr (ENOMEM, a thread's stack not mapped: EAGAIN) and fails or, worse, goes on
without a frame; either way the video needs more than the service allows: NotAVideo naming the
cap, never the line ffmpeg happened to print last.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from vidcache.errors import (
    BadSetting,
    MediaToolError,
    NotAVideo,
    OutOfThreads,
    ShuttingDown,
    ToolStopped,
)
from vidcache_client._arguments import signal_name, size_text

_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
# ffmpeg's exit status after it caught SIGINT or SIGTERM (it uses 1 for errors of its own)
_FFMPEG_SIGNALLED = 255
# What a tool says when the memory cap refused it memory (ffmpeg 5.1's words under caps from
# 16 MiB up to the need of 1080p and 4K videos): ENOMEM's text and other failed allocations
# ('Could not allocate', 'Error allocating', C++ bad_alloc), a frame buffer not had
# ('get_buffer() failed', the only sign near the need, where ffmpeg exits 0 without the
# frame), a thread whose stack could not be mapped (EAGAIN), a library's data the dynamic
# loader could not map.
_OUT_OF_MEMORY = re.compile(rb"(?i)(cannot|could not|failed to|error) allocat|bad_alloc|"
                            rb"get_buffer\(\) failed|resource temporarily unavailable|"
                            rb"failed to map segment")
# A frame buffer refused for a size -max_pixels refused (media.py says so) is not memory.
_SIZE_REFUSED = b"image parameters invalid"


# ffmpeg sizes its thread pools by the machine's cores: each decoder one per core (up to 16),
# each filter graph, scaler and encoder one per core. Sampling a 1080p video's frames started
# 1667 threads on 64 cores (-cpucount 64): 14 GiB of data segment (their stacks), 1.1 GiB
# resident, against 79 threads and 966 MiB / 358 MiB on 2. Set here, the tools start as many
# threads, and need as much memory, on any machine, so that one memory cap fits them all: one
# for the filters and encoders (a frame scaled to 64x64, seconds of audio resampled), 2 per
# decoder, the only parallel work (ffmpeg decodes every input in its main thread). Every run
# is spelled by ffprobe_argv or ffmpeg_argv, so none goes without them.
_ONE_CORE = ["-cpucount", "1"]  # first, for the whole run
_DECODER_THREADS = ["-threads", "2"]  # before each input


def ffprobe_argv(input_limits: Sequence[str], path: Path, *options: str) -> list[str]:
    """ffprobe reading `path` with `options`: on one core, saying only errors, the input
    opened under `input_limits` (what may open and decode it) and decoded in 2 threads."""
    return ["ffprobe", *_ONE_CORE, "-v", "error", *input_limits, *_DECODER_THREADS, *options,
            str(path)]


def ffmpeg_argv(input_limits: Sequence[str], path: Path, inputs: Sequence[Sequence[str]],
                outputs: Sequence[str]) -> list[str]:
    """ffmpeg opening `path` once for each of `inputs` (the options before its -i), then
    `outputs`: on one core, saying only errors, without stdin, each input opened under
    `input_limits` and decoded in 2 threads."""
    argv = ["ffmpeg", *_ONE_CORE, "-nostdin", "-v", "error"]
    for options in inputs:
        argv += [*input_limits, *_DECODER_THREADS, *options, "-i", str(path)]
    return [*argv, *outputs]


class Tools:
    """Runs the service's tools, each for at most `timeout` seconds and `memory_cap` bytes
    (None: no cap). Thread-safe."""

    def __init__(self, *, timeout: float, memory_cap: int | None = None) -> None:
        self._timeout = timeout
        self._memory_cap = memory_cap
        self._capped: list[str] = []
        if memory_cap is not None:
            if shutil.which("prlimit") is None:
                raise BadSetting(f"--media-memory {size_text(memory_cap)}: prlimit, which caps "
                                 "ffprobe/ffmpeg's memory, is not installed; install util-linux, "
                                 "or give --media-memory 0 to run them uncapped")
            # an unprivileged prlimit cannot raise the hard limit the service runs under
            # (systemd's LimitDATA=, ulimit -d): every tool would fail, each ingest refused as
            # 'not a video: ffprobe cannot read it (prlimit: failed to set ...)'
            hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
            if hard != resource.RLIM_INFINITY and hard < memory_cap:
                raise BadSetting(f"--media-memory {size_text(memory_cap)} is more than the "
                                 f"server's own hard data limit ({size_text(hard)}, ulimit -d), "
                                 "above which its tools cannot be given memory; give a smaller "
                                 "--media-memory, or raise the limit")
            self._capped = ["prlimit", f"--data={memory_cap}", "--"]
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._stopped = False

    def run(self, argv: list[str], *, what: str) -> subprocess.CompletedProcess[bytes]:
        """`argv` run to its end, its output captured; raises MediaToolError if the tool is
        missing, ShuttingDown after `stop`, OutOfThreads if it could not be started for a
        limit on threads, ToolStopped if a signal ended it, NotAVideo if it outran the timeout
        or the memory cap."""
        if shutil.which(argv[0]) is None:
            raise MediaToolError(f"{argv[0]} is not installed; install ffmpeg")
        with self._lock:
            if self._stopped:
                raise ShuttingDown()
            try:
                process = subprocess.Popen([*_DIE_WITH_PARENT, *self._capped, *argv],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, start_new_session=True)
            except FileNotFoundError as exc:
                raise MediaToolError(f"{argv[0]} is not installed; install ffmpeg") from exc
            except BlockingIOError as exc:  # fork's EAGAIN: the limits on threads count processes
                raise OutOfThreads() from exc
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
        signalled = status < 0 or (argv[0] == "ffmpeg" and status == _FFMPEG_SIGNALLED)
        if signalled and self._stopped:
            raise ShuttingDown()
        if self._memory_cap is not None and _OUT_OF_MEMORY.search(stderr) \
                and _SIZE_REFUSED not in stderr:
            # A broken file declaring a huge table (an mp4's sample count) makes the tool say
            # the same without a cap: the words alone cannot tell the two apart.
            raise NotAVideo(f"{what} ran out of memory under the server's --media-memory of "
                            f"{size_text(self._memory_cap)}: the video needs more (the operator "
                            "may raise the cap), or it is broken and declares sizes no memory "
                            "would hold")
        if signalled:
            how = f"killed by {signal_name(-status)}" if status < 0 else \
                f"stopped by a signal (exit status {status})"
            raise ToolStopped(f"{what} was {how}; the video was not judged, try again")
        return subprocess.CompletedProcess(argv, status, stdout, stderr)

    def stop(self) -> None:
        """Kill the tools running and refuse new ones: the server is shutting down."""
        with self._lock:
            self._stopped = True
            for process in self._running:
                process.kill()


