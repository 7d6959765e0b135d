"""Fixtures shared by the test modules: the generated corpus, the loopback media server that
ingest downloads from, one running vidcache service, a faulty link in front of it, and clients
of a fake service (httpx.MockTransport)."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import VidcacheServer, make_videos, serve_directory
from tests.vcfs_fault_support import link_fixture
from vidcache_client import VidCacheClient


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


_CORPUS = pytest.StashKey[dict[str, Path]]()
_CORPUS_DIRECTORY = pytest.StashKey[Path]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """The corpus is made here, before the first test, when a test to run needs it. Made by
    the `videos` fixture, it was timed by the hang guard of whichever test asked first
    (pytest-timeout times a test's fixtures too): that set-up took 43-76 s of a 120 s guard
    on 2 cores under load 6-8, and test_client_digests' 14 s instead of 43 without it."""
    if session.config.option.collectonly or not any(
            isinstance(item, pytest.Function) and "videos" in item.fixturenames
            for item in session.items):
        return
    # Not under pytest's basetemp: no public hook reaches its factory before the first test.
    directory = Path(tempfile.mkdtemp(prefix="vcfs-test-videos-"))
    session.config.stash[_CORPUS_DIRECTORY] = directory
    session.config.stash[_CORPUS] = make_videos(directory)


def pytest_sessionfinish(session: pytest.Session) -> None:
    directory = session.config.stash.get(_CORPUS_DIRECTORY, None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def videos(request: pytest.FixtureRequest) -> dict[str, Path]:
    """name -> path of the generated test videos (see tests/support.py VIDEO_SPECS)."""
    return request.config.stash[_CORPUS]


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


@pytest.fixture
def make_client() -> Iterator[Callable[..., VidCacheClient]]:
    """make_client(handler, **options) -> a client of http://vidcache.test over
    httpx.MockTransport(handler), closed at teardown: answers a real service never gives."""
    clients: list[VidCacheClient] = []

    def make(handler: Callable[[httpx.Request], httpx.Response],
             **options: Any) -> VidCacheClient:
        client = VidCacheClient("http://vidcache.test", transport=httpx.MockTransport(handler),
                                **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


# A fresh faulty link for each test in front of the session's service. Modules whose
# module-scoped mount or client goes through a link declare their own with link_fixture.
link = link_fixture()
