"""The workloads: what a user does with a video, run against one contender.

A workload prepares outside the clock (mounting happens in `contender.target()`), then times
each figure inside `ctx.measure(figure)`, which also collects the server-side counters and the
daemon's peak RSS. Every read is checked: byte counts always, and the bytes themselves against
the local copy where a workload reads them in-process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from bench.contenders import Contender
from bench.stack import Video, warm_page_cache

READ_SIZE = 1 << 20  # what dd bs=1M (and the kernel's FUSE max_read) ask for
RANDOM_READ_SIZE = 128 << 10
COMMAND_TIMEOUT_S = 300.0


@dataclass
class Measure:
    """Filled in by a workload inside `ctx.measure()`. The clock runs from entering the block
    until `stop()` (or the end of the block): checks after `stop()` are not timed."""

    bytes_read: int = 0
    errors: int = 0
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    stopped: float | None = None

    def stop(self) -> None:
        if self.stopped is None:
            self.stopped = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.stopped or time.perf_counter()) - self.started

    def fail(self, note: str) -> None:
        self.errors += 1
        if len(self.notes) < 5:
            self.notes.append(note)


@dataclass(frozen=True)
class Corpus:
    sequential: Video
    probe_faststart: Video
    probe_moov_end: Video
    readers: tuple[Video, ...]


@dataclass(frozen=True, kw_only=True)
class Settings:
    seek_fractions: tuple[float, ...] = (0.233, 0.517, 0.788)  # arbitrary, not on keyframes
    random_reads: int = 64
    sequential_limit: int | None = None  # bytes read by "sequential"; None = the whole file
    seeker_segments: int = 8  # segments each seeking reader of "concurrent" reads
    seeker_segment_bytes: int = 4 << 20


class Context(Protocol):
    corpus: Corpus
    settings: Settings
    run_index: int

    def measure(self, figure: str) -> AbstractContextManager[Measure]: ...


def sequential(c: Contender, ctx: Context) -> None:
    """Read the large file start to end, cold; then again after close, warm (same mount)."""
    video = ctx.corpus.sequential
    limit = min(video.size, ctx.settings.sequential_limit or video.size)
    _cold(c, video)
    target = c.target(video)
    if not c.capabilities.files:
        with ctx.measure("seq_cold") as m:
            _curl(target, limit, m)
        return
    for figure in ("seq_cold", "seq_warm"):
        with ctx.measure(figure) as m:
            m.bytes_read = _read_file(target, limit, m)


def _cold(c: Contender, *videos: Video) -> None:
    """Outside the clock: the service's and the local copies of `videos` in the page cache
    (see `warm_page_cache`), then the contender cold."""
    warm_page_cache([path for video in videos for path in (video.blob_path, video.local_path)])
    c.cold()


def _read_file(path: str, limit: int, m: Measure) -> int:
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    done = 0
    with open(path, "rb", buffering=0) as file:
        while done < limit:
            n = file.readinto(view[: min(READ_SIZE, limit - done)])
            if not n:
                m.fail(f"short read: {done} of {limit} bytes")
                break
            done += n
    return done


def _curl(url: str, limit: int, m: Measure) -> None:
    argv = ["curl", "-s", "-S", "-f", "-o", "/dev/null", "-w", "%{size_download}",
            "-r", f"0-{limit - 1}", url]
    result = _run(argv, m)
    if result is not None:
        m.bytes_read = int(result.stdout or 0)
        if m.bytes_read != limit:
            m.fail(f"curl got {m.bytes_read} of {limit} bytes")


def _run(argv: list[str], m: Measure) -> subprocess.CompletedProcess[str] | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=COMMAND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        m.fail(f"{argv[0]} timed out after {COMMAND_TIMEOUT_S:.0f} s")
        return None
    if result.returncode != 0:
        m.fail(f"{argv[0]} exited {result.returncode}: {result.stderr.strip()[-300:]}")
        return None
    return result


def ffprobe(c: Contender, ctx: Context) -> None:
    """`ffprobe -show_format -show_streams` of the 20 Mb/s file, moov first and moov last."""
    for figure, video in (("ffprobe_faststart", ctx.corpus.probe_faststart),
                          ("ffprobe_moov_end", ctx.corpus.probe_moov_end)):
        _cold(c, video)
        target = c.target(video)
        with ctx.measure(figure) as m:
            result = _run(["ffprobe", "-v", "error", "-show_format", "-show_streams",
                           "-of", "json", target], m)
            m.stop()
            if result is not None:
                streams = json.loads(result.stdout).get("streams", [])
                if len(streams) != 2:  # one video and one audio stream were encoded
                    m.fail(f"ffprobe found {len(streams)} streams, expected 2")


def seek(c: Contender, ctx: Context) -> None:
    """`ffmpeg -ss T -i FILE -frames:v 1 -f null -` at several positions, each from cold."""
    video = ctx.corpus.probe_faststart
    for fraction in ctx.settings.seek_fractions:
        _cold(c, video)
        target = c.target(video)
        position = f"{video.duration_s * fraction:.3f}"
        with ctx.measure("seek") as m:
            _run(["ffmpeg", "-nostdin", "-v", "error", "-ss", position, "-i", target,
                  "-frames:v", "1", "-f", "null", "-"], m)


def random_reads(c: Contender, ctx: Context) -> None:
    """128 KiB preads at random offsets of the large file, from cold; the figure is per read."""
    video = ctx.corpus.sequential
    rng = random.Random(ctx.run_index)
    offsets = [rng.randrange(0, video.size - RANDOM_READ_SIZE)
               for _ in range(ctx.settings.random_reads)]
    _cold(c, video)
    target = c.target(video)
    chunks: list[bytes] = []
    with ctx.measure("random_128k") as m:
        fd = os.open(target, os.O_RDONLY)
        try:
            chunks = [os.pread(fd, RANDOM_READ_SIZE, offset) for offset in offsets]
        finally:
            os.close(fd)
        m.stop()
        m.bytes_read = sum(len(chunk) for chunk in chunks)
        with open(video.local_path, "rb") as local:
            for offset, chunk in zip(offsets, chunks, strict=True):
                local.seek(offset)
                if chunk != local.read(RANDOM_READ_SIZE):
                    m.fail(f"wrong bytes at offset {offset}")


def concurrent(c: Contender, ctx: Context) -> None:
    """One reader per file at once: even ones read their file sequentially, odd ones seek to
    random offsets and read segments. Every byte is compared with the local copy."""
    videos = ctx.corpus.readers
    _cold(c, *videos)
    targets = [c.target(video) for video in videos]
    lock = threading.Lock()
    with ctx.measure("concurrent") as m:
        def reader(index: int) -> None:
            video, target = videos[index], targets[index]
            rng = random.Random(1000 * ctx.run_index + index)
            if index % 2 == 0:
                segments = [(0, video.size)]
            else:
                length = min(ctx.settings.seeker_segment_bytes, video.size)
                segments = [(rng.randrange(0, video.size - length + 1), length)
                            for _ in range(ctx.settings.seeker_segments)]
            try:
                done, bad = read_segments(target, video, segments)
            except OSError as exc:
                done, bad = 0, f"{video.name}: {exc}"
            with lock:
                m.bytes_read += done
                if bad:
                    m.fail(bad)

        _in_threads(reader, len(videos))


def read_segments(path: str, video: Video, segments: list[tuple[int, int]]
                  ) -> tuple[int, str | None]:
    """Read `segments` of `path` and compare every byte with the local copy. Both reads go
    into buffers reused from one read to the next, as `_read_file`'s do: a new 1 MiB `bytes`
    per read (memory malloc takes from the kernel and gives back every time) costs ~1 CPU-s
    per GB, against ~0.25 here, which on two cores would be taken from the contender being
    measured."""
    done = 0
    data, expected = bytearray(READ_SIZE), bytearray(READ_SIZE)
    data_view, expected_view = memoryview(data), memoryview(expected)
    fd = os.open(path, os.O_RDONLY)
    local = os.open(video.local_path, os.O_RDONLY)
    try:
        for start, length in segments:
            offset = start
            while offset < start + length:
                size = min(READ_SIZE, start + length - offset)
                got = os.preadv(fd, [data_view[:size]], offset)
                want = os.preadv(local, [expected_view[:size]], offset)
                same = data == expected if got == READ_SIZE else data[:got] == expected[:got]
                if got != want or not same:
                    return done, f"{video.name}: wrong or short read at {offset}"
                done += got
                offset += size
    finally:
        os.close(fd)
        os.close(local)
    return done, None


def _in_threads(function: Callable[[int], None], count: int) -> None:
    threads = [threading.Thread(target=function, args=(i,), name=f"reader-{i}")
               for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


WORKLOADS: dict[str, Callable[[Contender, Context], None]] = {
    "sequential": sequential,
    "ffprobe": ffprobe,
    "seek": seek,
    "random": random_reads,
    "concurrent": concurrent,
}
"""Workload name -> function; a contender runs the names its capabilities support."""
