"""CPython's refusal to start a thread, for the service (vidcache) and vcfs, which both start
threads as work comes: the kernel refuses one past the user's `ulimit -u` (RLIMIT_NPROC,
counted in threads; not enforced for root), the cgroup's `pids.max` or the system's
threads-max, and glibc when its stack cannot be mapped under `ulimit -d` / `-v`:
pthread_create's EAGAIN, which CPython raises as `RuntimeError("can't start new thread")`,
the class of its other misuses too."""

from __future__ import annotations

import threading

# What a refusal says: the limits to look at.
LIMITS = ("a limit on threads (ulimit -u, the cgroup's pids.max) or on the memory for their "
          "stacks (ulimit -d, ulimit -v) is reached")


def thread_refused(exc: BaseException) -> bool:
    """Whether `exc` is CPython's refusal to start a thread (its message, not only its class:
    a RuntimeError is also a bug, an executor shut down, a thread started twice)."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("can't start new thread")


def started(thread: threading.Thread) -> bool:
    """`thread` started; False if the start was refused (any other error is raised)."""
    try:
        thread.start()
    except RuntimeError as exc:
        if not thread_refused(exc):
            raise
        return False
    return True
