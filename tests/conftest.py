"""Session fixtures shared by every test module: the generated corpus, the loopback media
server that ingest downloads from, and one running vidcache service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import VidcacheServer, make_videos, serve_directory


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> path of the generated test videos (see tests/support.py VIDEO_SPECS)."""
    return make_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def media_url(videos: dict[str, Path]) -> Iterator[str]:
    """Base URL of a loopback HTTP server serving the generated videos by name."""
    with serve_directory(next(iter(videos.values())).parent) as url:
        yield url


@pytest.fixture(scope="session")
def vidcache_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    """One real vidcache service for the session (tests use their own buckets)."""
    server = VidcacheServer(tmp_path_factory.mktemp("vidcache") / "data")
    with server:
        yield server
