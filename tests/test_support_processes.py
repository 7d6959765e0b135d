"""The process-table helpers the tests poll with, against a process that exits mid-read.

The kernel answers a read of /proc/<pid>/stat, cmdline or status with ESRCH once the process
is gone, even when the open succeeded: a helper polling the table while a test's process ends
must count it as ended, not fail the test (it did, once in CI, in the demo's kill test)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import command_line, processes
from tests.vcfs_support import process_alive


def test_the_kernel_answers_a_read_of_an_ended_process_with_esrch() -> None:
    """The premise: opened while alive, read once reaped."""
    child = subprocess.Popen(["sleep", "0"])
    with contextlib.ExitStack() as files:
        opened = [files.enter_context(Path(f"/proc/{child.pid}/{name}").open("rb"))
                  for name in ("stat", "cmdline", "status")]
        child.wait()
        for file in opened:
            with pytest.raises(ProcessLookupError):
                file.read()


@pytest.fixture
def ending(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A live process whose /proc files now answer ESRCH, as one exiting during the read."""
    child = subprocess.Popen(["sleep", "60"])
    original_read_text, original_read_bytes = Path.read_text, Path.read_bytes

    def gone(path: Path) -> bool:
        return path.parent.name == str(child.pid)

    def read_text(path: Path, *args: object, **kwargs: object) -> str:
        if gone(path):
            raise ProcessLookupError(3, "No such process")
        return original_read_text(path, *args, **kwargs)  # type: ignore[arg-type]

    def read_bytes(path: Path) -> bytes:
        if gone(path):
            raise ProcessLookupError(3, "No such process")
        return original_read_bytes(path)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def test_a_process_ending_during_the_read_is_left_out_of_the_table(ending: int) -> None:
    table = processes()
    assert ending not in table
    assert table  # the others are still read


def test_a_process_ending_during_the_read_has_no_command_line(ending: int) -> None:
    assert command_line(ending) == ""


def test_a_process_ending_during_the_read_is_not_alive(ending: int) -> None:
    assert not process_alive(ending)
