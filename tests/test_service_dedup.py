"""Ingest's near-duplicate search: the in-memory index of perceptual hashes answers exactly what
comparing with every stored video one by one (the search it replaced) answered, stays in step
with the store across restarts and deletes, and never holds up a read while it runs; and
videos that only look alike to the hash (uniform frames, another speed, a shared intro) are
stored apart."""

from __future__ import annotations

import logging
import random
import subprocess
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidcache import audio
from vidcache.app import create_app
from vidcache.config import ServiceConfig
from vidcache.errors import MediaToolError, ToolStopped
from vidcache.ingest import Ingestor
from vidcache.media import FRAMES, UNIFORM_FRAMES, PerceptualHash, near_duplicate
from vidcache.phash_index import PhashIndex

with warnings.catch_warnings():  # Starlette's notice that it prefers httpx2 for TestClient
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.timeout(120)


Stored = list[tuple[str, PerceptualHash, float]]


def _one_by_one(stored: Stored, phash: PerceptualHash, duration_s: float,
                threshold: int) -> list[tuple[str, int]]:
    """The search before the index: every stored video in the order stored, those that match
    nearest first, the first stored first among equals (the search kept the first of them)."""
    found = []
    for content_hash, other, other_duration_s in stored:
        distance = near_duplicate(phash, duration_s, other, other_duration_s, threshold)
        if distance is not None:
            found.append((content_hash, distance))
    return sorted(found, key=lambda match: match[1])  # stable: stored order among equals


# Few distinct frame values, so equal distances (ties) and exact halves are common; the
# uniform frames' hashes among them.
_FRAME = st.one_of(st.none(), st.sampled_from([*UNIFORM_FRAMES, 1, 3, 7, 0xFF, 0xF0F0,
                                               2**64 - 1]),
                   st.integers(0, 2**64 - 1))
_PHASH = st.lists(_FRAME, min_size=1, max_size=FRAMES).map(tuple)
_STORED_PHASH = st.lists(_FRAME, min_size=1, max_size=FRAMES + 2).map(tuple)
# durations at and about the bounds of what is alike (0.5 s; 0.5 % of 200 s is 1 s)
_DURATION = st.sampled_from([10.0, 10.25, 10.5, 10.51, 200.0, 200.5, 201.0, 201.01])
_STEP = st.one_of(st.tuples(st.just("add"), _STORED_PHASH, _DURATION),
                  st.tuples(st.just("remove"), st.integers(0, 50)),
                  st.tuples(st.just("search"), _PHASH, _DURATION, st.integers(0, 64)))


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP, max_size=40))
def test_the_index_finds_what_the_one_by_one_search_found(steps: list[Any]) -> None:
    index = PhashIndex(FRAMES)
    stored: Stored = []
    for number, step in enumerate(steps):
        if step[0] == "add":
            stored.append((f"video{number}", step[1], step[2]))
            index.add(*stored[-1])
        elif step[0] == "remove" and stored:
            content_hash, _, _ = stored.pop(step[1] % len(stored))
            index.remove(content_hash)
        elif step[0] == "search":
            _, phash, duration_s, threshold = step
            assert index.matches(phash, duration_s, threshold, len(stored) + 1) == \
                _one_by_one(stored, phash, duration_s, threshold)
        assert len(index) == len(stored)


def test_the_index_grows_and_shrinks_like_the_store() -> None:
    """Thousands of videos (the arrays grow several times), a third deleted, ties resolved to
    the earliest stored: the same answers as the one-by-one search."""
    rng = random.Random(7)
    near = (0x1234_5678_9ABC_DEF0, 0x0F0F_0F0F_0F0F_0F0F, None, 2**63, 5, 6, 7, 8)

    def variant() -> PerceptualHash:  # 0-3 bits off `near` per frame: many equal distances
        return tuple(None if h is None else h ^ (rng.choice([0, 1, 3, 7]) << rng.randrange(60))
                     for h in near)

    index = PhashIndex(FRAMES)
    stored: Stored = []
    for number in range(3000):
        phash = variant() if number % 5 == 0 else tuple(rng.getrandbits(64) for _ in near)
        stored.append((f"{number:064x}", phash, rng.choice([60.0, 60.3, 61.0])))
        index.add(*stored[-1])
        if number % 3 == 2:
            content_hash, _, _ = stored.pop(rng.randrange(len(stored)))
            index.remove(content_hash)
    for threshold in (0, 1, 2, 10, 64):
        for phash in (near, variant(), (None,) * FRAMES, (near[0], None)):
            nearest = _one_by_one(stored, phash, 60.0, threshold)
            assert index.matches(phash, 60.0, threshold, 5) == nearest[:5]


def test_distances_round_halves_to_even_as_near_duplicate_does() -> None:
    index = PhashIndex(4)  # media.MIN_COMPARED frames
    base = (0x10, 0x20, 0x40, 0x80)
    bits = {"half": (0b1, 0b1, 0, 0), "one-and-half": (0b11, 0b11, 0b1, 0b1),
            "two-and-half": (0b111, 0b111, 0b11, 0b11)}
    distances = []
    for name, off in bits.items():
        frames = tuple(b ^ o for b, o in zip(base, off, strict=True))
        index.add(name, frames, 10.0)
        distances.append(near_duplicate(base, 10.0, frames, 10.0, 64))
        assert index.matches(base, 10.0, 64, 1) == [(name, distances[-1])]
        index.remove(name)
    assert distances == [0, 2, 2]


# --- in the service -------------------------------------------------------------------------

@pytest.fixture
def client_factory(tmp_path: Path, videos: dict[str, Path]) -> Iterator[Any]:
    """Opens TestClients of the app over one data directory that may ingest the test videos
    as file:// URLs; closes them at the end."""
    config = ServiceConfig(data_dir=tmp_path / "data",
                           allow_file_dirs=(videos["a.mp4"].parent,))
    opened: list[TestClient] = []

    def open_client() -> TestClient:
        client = TestClient(create_app(config))
        client.__enter__()
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.__exit__(None, None, None)


def _ingest(client: TestClient, path: Path, query: str = "") -> dict[str, Any]:
    response = client.post("/ingest", json={"url": f"file://{path}{query}", "bucket": "dedup"})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_the_index_follows_restarts_and_deletes(client_factory: Any,
                                                videos: dict[str, Path]) -> None:
    first = client_factory()
    stored = _ingest(first, videos["a.mp4"])
    first.__exit__(None, None, None)  # the data directory is free for the next app

    again = client_factory()  # its index comes from the store
    reencode = _ingest(again, videos["a_small.mp4"])
    assert (reencode["status"], reencode["hash"]) == ("duplicate", stored["hash"])
    assert again.delete(f"/video/{stored['hash']}").status_code == 204
    alone = _ingest(again, videos["a_small.mp4"], "?after-delete")
    assert alone["status"] == "new"
    assert alone["hash"] != stored["hash"]


def test_reads_are_answered_while_a_search_runs(client_factory: Any, videos: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The search used to run under the store's lock, which every read takes: at 100 000
    videos reads waited up to 1.75 s per ingest. Here the search is held until the reads came
    back (or their deadline passed)."""
    client = client_factory()
    stored = _ingest(client, videos["b.mp4"])
    searching, release = threading.Event(), threading.Event()
    search = Ingestor._candidates

    def held_search(self: Ingestor, phash: PerceptualHash,
                    duration_s: float) -> list[tuple[str, int]]:
        searching.set()
        release.wait(timeout=60)
        return search(self, phash, duration_s)

    monkeypatch.setattr(Ingestor, "_candidates", held_search)
    with ThreadPoolExecutor(4) as pool:
        try:
            ingest = pool.submit(_ingest, client, videos["a.mp4"])
            assert searching.wait(timeout=60), "the ingest never reached its search"
            reads = [pool.submit(client.get, path) for path in (
                f"/meta/{stored['hash']}", "/videos?bucket=dedup", "/health")]
            for read in reads:
                assert read.result(timeout=20).status_code == 200
            assert not ingest.done()  # the search was still held while they were answered
        finally:
            release.set()
        assert ingest.result(timeout=60)["status"] == "new"


def _tone_and_reupload(folder: Path) -> tuple[Path, Path]:
    """4 s of a test picture over a tone (AAC in MP4), and its re-upload (Opus in MKV)."""
    folder.mkdir()
    original, reupload = folder / "tone.mp4", folder / "tone.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=160x120:r=25:d=4",
                    "-f", "lavfi", "-i", "sine=f=440:d=4", "-c:v", "libx264", "-preset",
                    "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(original)], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(original), "-c:v", "copy",
                    "-c:a", "libopus", str(reupload)], check=True)
    return original, reupload


def test_a_sound_that_cannot_be_compared_is_not_merged(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The frames of a re-upload match, and ffmpeg fails on the audio (made to here: a real
    one decodes what ffprobe accepted): storing both loses nothing, merging might lose one."""
    folder = tmp_path / "media"
    original, reupload = _tone_and_reupload(folder)

    def failing(*args: object) -> audio.AudioPrint:
        raise MediaToolError("ffmpeg cannot decode the audio (the test's)")

    monkeypatch.setattr(audio, "fingerprint", failing)
    config = ServiceConfig(data_dir=tmp_path / "data", allow_file_dirs=(folder,))
    with TestClient(create_app(config)) as client, \
            caplog.at_level(logging.WARNING, logger="vidcache.ingest"):
        stored = _ingest(client, original)
        again = _ingest(client, reupload)
    assert (stored["status"], again["status"]) == ("new", "new")
    assert f"its frames match stored {stored['hash']}, whose sound could not be compared " \
           "(ffmpeg cannot decode the audio (the test's)): not merged with it" in caplog.text


def test_an_audio_decoder_ended_by_a_signal_is_a_503(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ffmpeg killed while it samples the audio (the OOM killer; made to here, as a real one
    cannot be timed): nothing is known about the sound, as for ffprobe or the frames' ffmpeg
    ended by a signal, so the ingest is 503 'try again' and nothing is stored; tried again,
    the re-upload is the original's duplicate. (Was stored apart, for good, as a sound that
    cannot be compared.)"""
    folder = tmp_path / "media"
    original, reupload = _tone_and_reupload(folder)
    fingerprint = audio.fingerprint

    def killed(*args: object) -> audio.AudioPrint:
        raise ToolStopped("ffmpeg (audio sampling) was killed by SIGKILL; the video was not "
                          "judged, try again")

    config = ServiceConfig(data_dir=tmp_path / "data", allow_file_dirs=(folder,))
    with TestClient(create_app(config)) as client:
        stored = _ingest(client, original)
        monkeypatch.setattr(audio, "fingerprint", killed)
        answer = client.post("/ingest", json={"url": f"file://{reupload}", "bucket": "dedup"})
        assert answer.status_code == 503, answer.text
        assert client.get("/videos").json()["items"] == [client.get(
            f"/meta/{stored['hash']}").json()]
        monkeypatch.setattr(audio, "fingerprint", fingerprint)
        again = _ingest(client, reupload)
    assert (again["status"], again["hash"]) == ("duplicate", stored["hash"])
