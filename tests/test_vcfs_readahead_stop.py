"""A reader that closes the file (or seeks elsewhere) stops its readahead's fetches in flight.

Real service, the benchmark's proxy in between with a bandwidth cap (so a readahead run is still
arriving when the reader leaves), a real mount, bytes compared with the source.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.faults import Bandwidth, video_range_requests
from tests.support import VidcacheServer, wait_until
from tests.vcfs_fault_support import FaultyLink, Source, ingest
from tests.vcfs_support import VcfsMount, requires_fuse

pytestmark = requires_fuse

MIB = 1 << 20
RATE = 4 * MIB  # bytes per second: a 4-block readahead task takes a second to arrive


@pytest.fixture(scope="module")
def source(videos: dict[str, Path], media_url: str,
           vidcache_server: VidcacheServer) -> Source:
    return ingest(vidcache_server.url, media_url, videos, ("big.mp4",),
                  bucket="vcfs-readahead-stop")["big.mp4"]


def test_closing_the_file_stops_the_readahead_in_flight(
    tmp_path: Path, link: FaultyLink, source: Source,
) -> None:
    assert source.size > 14 * MIB
    with VcfsMount(link.url, tmp_path / "mnt") as mount:
        path = mount.video(source.file_name)
        link.faults.enable(Bandwidth(bytes_per_s=RATE, match=video_range_requests))
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, 10 * MIB, MIB):  # past the 8 MiB that establish a run
                assert os.pread(fd, MIB, offset) == source.data[offset : offset + MIB]
        finally:
            os.close(fd)
        wait_until(lambda: mount.stats()["remote"]["stopped"] >= 1, timeout=30,
                   what="the readahead fetch in flight to stop")
        stats = mount.stats()
        asked = 10 * MIB + stats["fuse"]["readahead_blocks"] * MIB
        assert stats["remote"]["bytes_fetched"] < asked  # what it asked for did not all come
        assert stats["remote"]["errors"] == 0 and stats["cache"]["fetch_errors"] == 0
        link.faults.clear()
        assert path.read_bytes() == source.data  # what was stopped is fetched when read
