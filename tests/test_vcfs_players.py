"""mpv, the player the README names, plays videos through a real vcfs mount over the real
vidcache service.

What mpv decoded is compared frame for frame with what it decodes from the local source file.
mpv's encoding mode (`--o=- --of=rawvideo --ovc=rawvideo`) writes the decoded frames to stdout
as raw yuv420p, in full and in order whatever the speed: playback with `--vo=null` follows the
clock and may drop frames, so it is used only where nothing but the outcome is checked. Every
mpv run is bounded by a timeout; `--no-config` keeps the user's mpv.conf out.

mpv takes a file on FUSE for a network stream (its fstatfs check) and turns its own cache on:
it reads ahead of the playing position as fast as it can, up to 150 MiB or the end. So what
vcfs fetches depends on mpv's options as much as on vcfs; the fraction test checks both modes.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import VidcacheServer
from tests.vcfs_fault_support import Source, ingest
from tests.vcfs_support import VcfsMount, mount_factory, requires_fuse

pytestmark = requires_fuse

BUCKET = "vcfs-players"
CORPUS = ("a.mp4", "c.mkv", "big.mp4", "big_moov_end.mp4")
MPV_TIMEOUT = 120.0  # seconds; a hung read would otherwise hang the suite
MPV = ["mpv", "--no-config", "--no-input-terminal", "--term-status-msg=", "--no-audio"]
UNKNOWN_NAME = "0" * 64 + ".mp4"  # a well-formed name of a video the service does not have


@pytest.fixture(scope="module")
def sources(videos: dict[str, Path], media_url: str,
            vidcache_server: VidcacheServer) -> dict[str, Source]:
    return ingest(vidcache_server.url, media_url, videos, CORPUS, bucket=BUCKET)


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory, vidcache_server: VidcacheServer,
          sources: dict[str, Source]) -> Iterator[VcfsMount]:
    with VcfsMount(vidcache_server.url, tmp_path_factory.mktemp("players") / "mnt") as mounted:
        yield mounted


@pytest.fixture
def fresh_mount(tmp_path: Path, vidcache_server: VidcacheServer,
                sources: dict[str, Source]) -> Iterator[Callable[..., VcfsMount]]:
    """Factory: a new daemon (cold caches, counters at zero) per call; all unmounted."""
    with mount_factory(vidcache_server.url, tmp_path) as start:
        yield start


def run_mpv(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*MPV, *args], capture_output=True, timeout=MPV_TIMEOUT, check=False)


def mpv_frames(target: str | Path, *options: str) -> bytes:
    """The frames mpv decodes from `target` (a path or an edl:// URL), raw yuv420p."""
    result = run_mpv("--msg-level=all=error", *options,
                     "--o=-", "--of=rawvideo", "--ovc=rawvideo", str(target))
    assert result.returncode == 0, f"mpv exited with {result.returncode}: {result.stderr!r}"
    return result.stdout


def ffmpeg_frames(path: Path, *, frames: int, start: float = 0.0) -> bytes:
    """The same frames decoded by ffmpeg: an independent check that mpv's are the right ones."""
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-ss", str(start), "-i", str(path), "-frames:v", str(frames),
         "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"],
        capture_output=True, check=True, timeout=MPV_TIMEOUT,
    ).stdout


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def frame_size(path: Path) -> int:
    """Bytes of one yuv420p frame of the video at `path`."""
    width, height = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "stream=width,height", "-of", "csv=p=0", str(path)],
        capture_output=True, check=True, timeout=60, text=True,
    ).stdout.strip().split(",")
    return int(width) * int(height) * 3 // 2


def edl(path: Path, segments: list[tuple[float, float]]) -> str:
    """An mpv EDL playing (start, length) segments of `path` in order: seeks within one run."""
    return "edl://" + ";".join(f"%{len(str(path))}%{path},{start},{length}"
                               for start, length in segments)


@pytest.mark.parametrize("name", ["a.mp4", "c.mkv", "big_moov_end.mp4"])
def test_mpv_decodes_the_same_first_frames_through_the_mount(
    mount: VcfsMount, sources: dict[str, Source], videos: dict[str, Path], name: str,
) -> None:
    frames = 25
    through_mount = mpv_frames(mount.video(sources[name].file_name), f"--frames={frames}")
    local = mpv_frames(videos[name], f"--frames={frames}")
    assert len(through_mount) == frames * frame_size(videos[name])
    assert digest(through_mount) == digest(local)
    assert digest(local) == digest(ffmpeg_frames(videos[name], frames=frames))


@pytest.mark.parametrize(("start", "cache"), [
    # mpv's own cache is on (mpv treats FUSE as a network filesystem): from the keyframe at
    # 6 s it reads on to the end, but nothing between the header and the keyframe
    (6.0, "--cache=auto"),
    # without its cache mpv reads only around what it decodes: neither the start nor the end
    (2.0, "--cache=no"),
], ids=["mpv-cache", "no-mpv-cache"])
def test_mpv_starting_mid_video_decodes_the_same_frames_and_fetches_a_fraction(
    fresh_mount: Callable[..., VcfsMount], sources: dict[str, Source],
    videos: dict[str, Path], start: float, cache: str,
) -> None:
    source, local_path, frames = sources["big.mp4"], videos["big.mp4"], 5
    options = (f"--start={start}", f"--frames={frames}", cache)
    mounted = fresh_mount()
    through_mount = mpv_frames(mounted.video(source.file_name), *options)
    stats = mounted.stats()
    local = mpv_frames(local_path, *options)
    assert len(through_mount) == frames * frame_size(local_path)
    assert digest(through_mount) == digest(local)
    assert digest(local) == digest(ffmpeg_frames(local_path, frames=frames, start=start))
    assert stats["remote"]["bytes_fetched"] < source.size // 2, stats


def test_mpv_jumping_back_and_forth_decodes_the_same_frames(
    mount: VcfsMount, sources: dict[str, Source], videos: dict[str, Path],
) -> None:
    segments = [(6.0, 0.4), (1.0, 0.4), (4.0, 0.4)]
    through_mount = mpv_frames(edl(mount.video(sources["big.mp4"].file_name), segments))
    local = mpv_frames(edl(videos["big.mp4"], segments))
    assert len(through_mount) >= 30 * frame_size(videos["big.mp4"])  # 10 frames a segment
    assert digest(through_mount) == digest(local)


def test_mpv_plays_a_video_to_its_end_through_the_mount(
    mount: VcfsMount, sources: dict[str, Source],
) -> None:
    # real playback, unclocked; errors (a failed read, a corrupt packet) would be printed
    result = run_mpv("--msg-level=all=error,cplayer=info", "--vo=null", "--untimed",
                     str(mount.video(sources["big_moov_end.mp4"].file_name)))
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert output.strip().endswith("Exiting... (End of file)"), output
    assert "error" not in output.lower(), output


def test_mpv_fails_cleanly_on_a_video_the_service_does_not_have(mount: VcfsMount) -> None:
    result = run_mpv("--msg-level=all=error", "--vo=null", str(mount.video(UNKNOWN_NAME)))
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 2, output  # mpv's code for "a file could not be played"
    assert "No such file or directory" in output
