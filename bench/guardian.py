"""The guardian: stops what the harness started when the harness dies without doing so itself.

Ctrl-C, SIGTERM and SIGHUP end the run through the harness's own clean-up; SIGKILL (the OOM
killer's, or pytest's on an interrupted test) leaves it no chance to run. So the harness first
starts `python -m bench.guardian` in a session of its own (no terminal's signal reaches it)
and, as it starts each server, proxy and FUSE daemon, tells the guardian its PID and mount
point over the guardian's stdin, a pipe whose write end only the harness holds. Each PID is
acknowledged once the guardian holds a pidfd of it, so a PID reused after its process ended is
never signalled; only the processes and mount points it was told about are ever touched.

Protocol: one JSON line per request, echoed back once done: `{"pid": N}`, `{"mount": PATH}`,
`{}` (nothing: the echo says the guardian runs); `{"done": true}` (not echoed) says nothing is
left (the run ended normally), and the guardian exits at once.
EOF without it (the harness dead by any means, or ended by an exception) makes it stop every
told process still running (SIGTERM, SIGKILL after `STOP_TIMEOUT_S`), lazily unmount every told
mount point (`fusermount3 -u -z`, or `fusermount`), say so on stderr if anything was left, and
exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

STOP_TIMEOUT_S = 10.0  # as long as the harness's own stop_process waits before SIGKILL
KILL_TIMEOUT_S = 5.0
UNMOUNT_TIMEOUT_S = 10.0

Process = TypeVar("Process", bound="subprocess.Popen[Any]")


class Guardian:
    """Harness side: the guardian process and the pipe that tells it what to stop."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()  # one request and its echo at a time

    def start(self) -> Guardian:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.guardian"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        self._request({})  # answered once it runs: the first child waits no longer than later ones
        return self

    def watch(self, pid: int) -> None:
        self._request({"pid": pid})

    def watch_mount(self, path: Path) -> None:
        self._request({"mount": str(path)})

    def close(self, *, done: bool) -> None:
        """`done`: nothing is left to stop. Otherwise the guardian stops what still runs (the
        harness's clean-up failed somewhere) before it exits. Waits for it either way."""
        process = self._process
        assert process is not None and process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            if done:
                process.stdin.write(json.dumps({"done": True}) + "\n")
            process.stdin.close()
        process.wait(timeout=STOP_TIMEOUT_S + KILL_TIMEOUT_S + 60)

    def _request(self, request: dict[str, Any]) -> None:
        line = json.dumps(request) + "\n"
        with self._lock:
            process = self._process
            assert process is not None and process.stdin is not None
            assert process.stdout is not None
            process.stdin.write(line)
            process.stdin.flush()
            # An echo still unread from a request a signal interrupted comes first: skip it.
            while (echo := process.stdout.readline()) != line:
                if not echo:
                    raise RuntimeError(f"the guardian exited with {process.wait(timeout=10)}")


_current: Guardian | None = None


@contextlib.contextmanager
def guarding() -> Iterator[Guardian]:
    """A guardian for the block, which `guarded` and `guard_mount` tell; on a normal end it is
    told nothing is left, on an exception (after the harness's clean-up) it checks."""
    global _current
    guardian = Guardian().start()
    _current = guardian
    try:
        yield guardian
    except BaseException:
        _current = None
        guardian.close(done=False)
        raise
    _current = None
    guardian.close(done=True)


def guarded(process: Process) -> Process:
    """`process`, just started, told to the guardian (if one runs: not in tests of the parts).
    Killed if that fails or a signal ends the wait: the caller never gets it to stop."""
    if _current is not None:
        try:
            _current.watch(process.pid)
        except BaseException:
            process.kill()
            process.wait()
            raise
    return process


def guard_mount(path: Path) -> None:
    """Tell the guardian (if one runs) to unmount `path` should the harness die; before the
    daemon that mounts there starts."""
    if _current is not None:
        _current.watch_mount(path)


def _stop(pidfds: dict[int, int]) -> tuple[list[int], list[int]]:
    """SIGTERM to the processes still running, SIGKILL to those still running after
    STOP_TIMEOUT_S; waits (bounded) for them to end. The PIDs signalled, and those killed."""
    running = {fd: pid for pid, fd in pidfds.items() if not _ended([fd])}
    for fd in running:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGTERM)
    left = _wait_ended(list(running), STOP_TIMEOUT_S)
    for fd in left:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    _wait_ended(left, KILL_TIMEOUT_S)
    return sorted(running.values()), sorted(running[fd] for fd in left)


def _ended(fds: list[int], timeout: float = 0) -> list[int]:
    """Of `fds`, the pidfds whose process has ended (a pidfd turns readable then)."""
    return select.select(fds, [], [], timeout)[0] if fds else []


def _wait_ended(fds: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` for the processes of `fds` to end; the pidfds of those still
    running."""
    deadline = time.monotonic() + timeout
    left = list(fds)
    while left and (remaining := deadline - time.monotonic()) > 0:
        ended = _ended(left, remaining)
        left = [fd for fd in left if fd not in ended]
    return left


def _unmount(paths: list[str]) -> list[str]:
    """Lazily unmount those of `paths` still mounted (a daemon killed by SIGKILL leaves a dead
    mount); the ones unmounted. fusermount refuses paths where nothing is mounted."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        return []
    unmounted = []
    for path in paths:
        with contextlib.suppress(subprocess.TimeoutExpired):
            if subprocess.run([fusermount, "-u", "-z", path], capture_output=True,
                              timeout=UNMOUNT_TIMEOUT_S, check=False).returncode == 0:
                unmounted.append(path)
    return unmounted


def main() -> None:
    pidfds: dict[int, int] = {}
    mounts: list[str] = []
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("done"):
            return
        if "pid" in request:
            # The harness has not waited for its child yet, so the PID is still that child's.
            with contextlib.suppress(ProcessLookupError):
                pidfds[request["pid"]] = os.pidfd_open(request["pid"])
        elif "mount" in request and request["mount"] not in mounts:
            mounts.append(request["mount"])
        for pid, fd in list(pidfds.items()):  # ended ones need no stopping
            if _ended([fd]):
                os.close(fd)
                del pidfds[pid]
        sys.stdout.write(line)
        sys.stdout.flush()
    stopped, killed = _stop(pidfds)
    unmounted = _unmount(mounts)
    if stopped or unmounted:
        with contextlib.suppress(OSError):  # the harness's terminal may be gone
            print(f"bench guardian: the harness left these behind: stopped processes "
                  f"{stopped or 'none'} (SIGKILL after {STOP_TIMEOUT_S:g} s: {killed or 'none'}),"
                  f" unmounted {unmounted or 'nothing'}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
