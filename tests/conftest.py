"""Session fixtures shared by every test module: the generated corpus, the loopback media
server that ingest downloads from, and one running vidcache service."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import VidcacheServer, make_videos, serve_directory


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_children() -> Iterator[None]:
    """Commands the tests Ctrl-C (SIGINT) start with SIGINT's default action, as from a
    terminal. A run started in the background by a shell without job control (`cmd &`,
    nohup) ignores SIGINT, and its children inherit that: vcfs then waited out its own
    timeout instead of saying 'interrupted'. A handler of ours is reset at exec, an ignored
    signal is not."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


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
