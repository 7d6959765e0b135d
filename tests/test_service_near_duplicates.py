"""Videos that only look alike to the perceptual hash are stored apart, through a real service
and a loopback origin: a false match loses a video (its bytes dropped, its URL an alias of
another). Each pair here was merged before (docs/service.md, "Perceptual hash"); a re-encode
still is."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.service_support import Api, unique
from tests.support import VidcacheServer, serve_directory

pytestmark = pytest.mark.timeout(180)

_X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
_SIZE = "s=160x120:r=25"


def _black(tone: int) -> list[str]:
    """8 s of black frames over a tone: an audio recording uploaded as a video."""
    return ["-f", "lavfi", "-i", f"color=c=black:{_SIZE}:d=8", "-f", "lavfi",
            "-i", f"sine=f={tone}:d=8", *_X264, "-c:a", "aac", "-shortest"]


def _concat(*parts: tuple[str, float]) -> list[str]:
    """Each (lavfi source, seconds) in turn."""
    graph = [f"{source},trim=duration={seconds},setpts=PTS-STARTPTS[p{i}]"
             for i, (source, seconds) in enumerate(parts)]
    labels = "".join(f"[p{i}]" for i in range(len(parts)))
    return ["-filter_complex", ";".join(graph) + f";{labels}concat=n={len(parts)}", *_X264]


_MANDELBROT = ["-f", "lavfi", "-i", f"mandelbrot={_SIZE}", "-t", "8", *_X264]
_TESTSRC = f"testsrc2={_SIZE}"
_BLACK = f"color=c=black:{_SIZE}"
_LIFE = f"life={_SIZE}:seed=3:mold=10"
# name -> ffmpeg arguments before the output; in this order ({dir}: the output folder)
_VIDEOS: dict[str, list[str]] = {
    "black-440.mp4": _black(440),
    "black-880.mp4": _black(880),
    # black but for 2 s of something else in the middle: 2 of the 8 samples
    "black-flash.mp4": _concat((_BLACK, 3), (_LIFE, 2), (_BLACK, 3)),
    "mandelbrot.mp4": _MANDELBROT,
    "mandelbrot-small.mp4": ["-i", "{dir}/mandelbrot.mp4", "-vf", "scale=120:90", *_X264,
                             "-b:v", "100k"],
    "mandelbrot-x2.mp4": ["-i", "{dir}/mandelbrot.mp4", "-vf", "setpts=0.5*PTS", *_X264],
    # the same 7 s, then 1 s of something else each: 7 of the 8 samples alike
    "intro-life.mp4": _concat((_TESTSRC, 7), (_LIFE, 1)),
    "intro-cells.mp4": _concat((_TESTSRC, 7), (f"cellauto={_SIZE}:rule=30:seed=5", 1)),
}


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A loopback origin serving _VIDEOS."""
    folder = tmp_path_factory.mktemp("lookalikes")
    for name, args in _VIDEOS.items():
        argv = [a.replace("{dir}", str(folder)) for a in args]
        subprocess.run(["ffmpeg", "-v", "error", "-y", *argv, str(folder / name)], check=True)
    with serve_directory(folder) as url:
        yield url


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A service of its own: near-duplicates are searched for across every bucket."""
    with VidcacheServer(tmp_path_factory.mktemp("near") / "data") as server:
        client = Api(server.url)
        try:
            yield client
        finally:
            client.close()


def _statuses(api: Api, origin: str, *names: str) -> list[tuple[str, str]]:
    """(status, hash) of ingesting each of `names` in turn."""
    bucket = unique("near")
    results = [api.ingest_ok(f"{origin}/{name}", bucket) for name in names]
    return [(result["status"], result["hash"]) for result in results]


def test_black_videos_with_other_sound_are_other_videos(api: Api, origin: str) -> None:
    """Every black frame hashes to 0: two black videos measured 0, and one with 2 s of
    something else in its middle 8 (2 samples 32 bits apart, 6 black): all three were one
    video."""
    results = _statuses(api, origin, "black-440.mp4", "black-880.mp4", "black-flash.mp4")
    assert [status for status, _ in results] == ["new"] * 3
    assert len({content_hash for _, content_hash in results}) == 3


def test_a_video_at_another_speed_is_another_video(api: Api, origin: str) -> None:
    """The same frames at twice the speed measured 1 (the samples are taken at the same
    relative positions); a re-encode (0) is still the same video."""
    (first, stored), (reencode, matched), (faster, _) = _statuses(
        api, origin, "mandelbrot.mp4", "mandelbrot-small.mp4", "mandelbrot-x2.mp4")
    assert (first, reencode, matched) == ("new", "duplicate", stored)
    assert faster == "new"


def test_videos_alike_but_for_their_end_are_two_videos(api: Api, origin: str) -> None:
    """7 of 8 samples alike and the 8th unrelated (26 bits apart) measured 4: the mean hid
    it."""
    results = _statuses(api, origin, "intro-life.mp4", "intro-cells.mp4")
    assert [status for status, _ in results] == ["new", "new"]
