"""Starting a thread when the process may not get one.

vcfs starts threads as work comes (the block cache's fetch threads, the HTTP workers, a digest
thread per fetch needing a digest page, readahead's, the client's spare-connection opener):
~200 when busy. Past a limit on threads, a start is refused (vidcache_client._threads, which
tells that refusal apart for the service too).

So a start that vcfs cannot do without raises `NoThread`, which vcfs.fs answers with ENOMEM (a
limit the mounting user sets, not the service's fault), and one it can do without (a prefetch,
a spare connection, a first block sent along with a lookup) is left out, its work done on the
caller's thread or not at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from vidcache_client._threads import LIMITS
from vidcache_client._threads import thread_refused as _cpython_refused

T = TypeVar("T")


class NoThread(Exception):
    """A thread could not be started (see module docstring) for `what`, which the message
    names."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: no thread could be started: {LIMITS}")


def thread_refused(exc: BaseException) -> bool:
    """Whether `exc` is a refused start: CPython's own, or vcfs's NoThread."""
    return isinstance(exc, NoThread) or _cpython_refused(exc)


def start_thread(thread: threading.Thread, what: str) -> None:
    """`thread.start()`; `NoThread` naming `what` if it was refused."""
    try:
        thread.start()
    except RuntimeError as exc:
        if not thread_refused(exc):
            raise
        raise NoThread(what) from exc


def submit(executor: Executor, what: str, call: Callable[..., T], *args: Any) -> Future[T]:
    """`executor.submit(call, *args)`, but `NoThread` naming `what` if the executor needed a
    thread for it and could not start one: `call` is then never run. (A ThreadPoolExecutor
    queues a call before it starts a thread for it, and leaves it queued when the start fails:
    a busy worker would run it later, its caller told it failed, and with no worker it would
    wait until some later submit started one.) Cancelling the future returned stops a call
    not yet begun, as an executor's does; so does `shutdown(cancel_futures=True)`. (The second
    future costs ~10-20 us a call over `executor.submit`, measured: a few ms per 300 MB read,
    which makes ~100-200 calls; not seen in the benchmark.) The call's result or exception is
    freed once the caller lets go of the future, as an executor's is: in no reference cycle
    (see `_run`) that would keep it until the garbage collector ran."""
    answer: Future[T] = Future()
    pending = [answer]  # the executor's only way to `answer`: `_run` takes it out
    try:
        queued = executor.submit(_run, pending, call, args)
    except RuntimeError as exc:
        if not thread_refused(exc):
            raise
        if answer.cancel():  # no worker has taken it: none ever runs it
            raise NoThread(what) from exc
        return answer  # a worker took it meanwhile
    # Cancelled together: either way the call is not run, nor left queued. (`queued` is
    # cancelled only before `_run`: `pending` still holds `answer` then.)
    queued.add_done_callback(lambda done: _cancel_too(done, pending))
    answer.add_done_callback(lambda done: _cancel_too(done, [queued]))
    return answer


def _run(pending: list[Future[T]], call: Callable[..., T], args: tuple[Any, ...]) -> None:
    """`call(*args)` into the future in `pending` (for `submit`), unless it was cancelled.

    The future is taken out of `pending` first, and let go of once it has the exception: a
    failure's traceback holds this frame and, through it, the executor's frames that called it
    (their locals: the work item, holding `pending` and the executor's future, whose callback
    holds `pending`), kept once they return. Led back to the future, they would be a cycle
    (future, exception, traceback, frames) keeping the exception and every frame's locals
    until the garbage collector ran; CPython's `_WorkItem.run` breaks its own the same way.
    The caller's future still has the exception and its traceback."""
    answer = pending.pop()
    if not answer.set_running_or_notify_cancel():  # cancelled, or given up by `submit`
        return
    try:
        result = call(*args)
    except BaseException as exc:  # the caller's to handle, as an executor's future
        answer.set_exception(exc)
        del answer
    else:
        answer.set_result(result)


def _cancel_too(done: Future[Any], others: list[Future[T]]) -> None:
    """Cancel `others` if `done` was cancelled."""
    if done.cancelled():
        for other in others:
            other.cancel()
