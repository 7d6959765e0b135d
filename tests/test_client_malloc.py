"""vidcache_client._malloc.set_malloc_options and its two callers, the service's
`keep_buffers_in_heap` and vcfs's `tune_malloc`.

What an option does is seen in a child Python (so this process's malloc is left alone) through
glibc's mallinfo2(): how many allocations glibc made as mappings of their own.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import sys

import pytest

from vidcache_client import _malloc
from vidcache_client._malloc import set_malloc_options

MIB = 1 << 20

needs_glibc = pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                 reason="needs glibc >= 2.33 (mallinfo2)")

# Prints how many mappings of its own a 3 MiB buffer took (0 or 1) after `setup`, having first
# checked that one did before `setup` (glibc's default threshold is 128 KiB). Buffers are kept:
# freeing a mapped one would raise glibc's adaptive threshold by itself.
_MAPPINGS_OF_A_BUFFER = """
import ctypes

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped():
    return libc.mallinfo2().hblks

{imports}
before = mapped()
control = bytearray(3 << 20)
assert mapped() == before + 1, "a 3 MiB buffer was not mapped by default"
{setup}
before = mapped()
kept = bytearray(3 << 20)
print(mapped() - before)
"""


def mappings_of_a_buffer(imports: str, setup: str) -> int:
    script = _MAPPINGS_OF_A_BUFFER.format(imports=imports, setup=setup)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@needs_glibc
def test_the_control_buffer_is_mapped_without_options() -> None:
    assert mappings_of_a_buffer("", "") == 1


@needs_glibc
def test_a_raised_mmap_threshold_keeps_a_buffer_in_the_heap() -> None:
    setup = "assert set_malloc_options({'M_MMAP_THRESHOLD': 4 << 20, 'M_ARENA_MAX': 2})"
    imports = "from vidcache_client._malloc import set_malloc_options"
    assert mappings_of_a_buffer(imports, setup) == 0


@needs_glibc
@pytest.mark.parametrize(("imports", "setup"), [
    ("from vidcache.serving import keep_buffers_in_heap", "keep_buffers_in_heap()"),
    ("from vcfs.cli import tune_malloc", f"tune_malloc(arenas=2, block_size={MIB})"),
], ids=["service", "vcfs"])
def test_both_callers_keep_their_buffers_in_the_heap(imports: str, setup: str) -> None:
    assert mappings_of_a_buffer(imports, setup) == 0


class FakeMallopt:
    """A mallopt that records its calls and refuses one parameter (glibc 2.36 takes any value
    of the three options, so a refusal is made up here)."""

    def __init__(self, refused: int) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refused = refused
        self.argtypes: tuple[type, ...] = ()

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return int(parameter != self.refused)


class FakeLibrary:
    def __init__(self, refused: int) -> None:
        self.mallopt = FakeMallopt(refused)


def test_the_options_go_to_mallopt_in_order_a_refusal_logged_at_debug_level(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    library = FakeLibrary(refused=-3)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: library)
    with caplog.at_level(logging.DEBUG, logger=_malloc.__name__):
        assert not set_malloc_options({"M_ARENA_MAX": 2, "M_MMAP_THRESHOLD": 4 * MIB,
                                       "M_TRIM_THRESHOLD": 64 * MIB})
    # malloc.h's numbers: M_ARENA_MAX -8, M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1
    assert library.mallopt.calls == [(-8, 2), (-3, 4 * MIB), (-1, 64 * MIB)]
    assert caplog.messages == [f"mallopt(M_MMAP_THRESHOLD, {4 * MIB}) refused"]


def test_all_options_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibrary(refused=0))
    assert set_malloc_options({"M_ARENA_MAX": 2, "M_TRIM_THRESHOLD": 64 * MIB})


def test_an_unknown_option_is_refused_before_anything_is_set() -> None:
    with pytest.raises(ValueError, match=r"unknown malloc options \['M_TOP_PAD'\]"):
        set_malloc_options({"M_MMAP_THRESHOLD": 1 << 30, "M_TOP_PAD": 0})


class NoMallopt:
    """A C library without mallopt (musl has none)."""


@pytest.mark.parametrize("library", [NoMallopt, OSError], ids=["no mallopt", "no C library"])
def test_without_glibc_nothing_is_set_and_nothing_raised(
    monkeypatch: pytest.MonkeyPatch, library: type[object],
) -> None:
    def load(name: str | None) -> object:
        if issubclass(library, BaseException):
            raise library("cannot load the C library")
        return library()

    monkeypatch.setattr(ctypes, "CDLL", load)
    assert not set_malloc_options({"M_MMAP_THRESHOLD": 4 * MIB})
