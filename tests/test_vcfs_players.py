"""mpv and VLC, the players the README names, and ffplay play videos through a real vcfs mount
over the real vidcache service.

What mpv decoded is compared frame for frame with what it decodes from the local source file.
mpv's encoding mode (`--o=- --of=rawvideo --ovc=rawvideo`) writes the decoded frames to stdout
as raw yuv420p, in full and in order whatever the speed: playback with `--vo=null` follows the
clock and may drop frames, so it is used only where nothing but the outcome is checked. Every
mpv run is bounded by a timeout; `--no-config` keeps the user's mpv.conf out.

mpv takes a file on FUSE for a network stream (its fstatfs check) and turns its own cache on:
it reads ahead of the playing position as fast as it can, up to 150 MiB or the end. So what
vcfs fetches depends on mpv's options as much as on vcfs; the fraction test checks both modes.

VLC will not run as root ("VLC is not supposed to be run as root"), so it plays as uid/gid
65534 through a mount made with `-o allow_other`: what a desktop user does when root mounts
vcfs (root gets the kernel's 1 MiB reads). Its stream output transcodes the decoded frames to
raw I420 in a file (`--sout '#transcode{vcodec=I420}:std{...}'`), compared with what VLC
decodes from the start of a copy of the source the same user reads.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import VidcacheServer, wait_until
from tests.vcfs_fault_support import Source, ingest
from tests.vcfs_support import AS_NOBODY, VcfsMount, mount_factory, requires_fuse

pytestmark = requires_fuse

BUCKET = "vcfs-players"
CORPUS = ("a.mp4", "c.mkv", "big.mp4", "big_moov_end.mp4")
MPV_TIMEOUT = 120.0  # seconds; a hung read would otherwise hang the suite
MPV = ["mpv", "--no-config", "--no-input-terminal", "--term-status-msg=", "--no-audio"]
UNKNOWN_NAME = "0" * 64 + ".mp4"  # a well-formed name of a video the service does not have
VLC = [*AS_NOBODY, "cvlc", "--intf", "dummy", "--no-dbus", "--no-audio", "--no-sout-audio",
       "--no-sout-spu"]
VLC_TIMEOUT = 120.0  # seconds, as mpv's
VLC_BLOCK = 1 << 20  # the VLC tests' mount's block size: what VLC skipped is counted in it


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


def ffplay_checksums(target: Path, *options: str) -> tuple[list[str], str]:
    """The checksums of the frames ffplay shows of `target` (its `showinfo` filter logs one
    per frame), and its log. SDL's dummy drivers stand in for a screen and a sound card;
    without a sound card's clock `-nodisp -an` never ends, a dummy display does. Without
    audio to follow, ffplay may drop late frames before its filters (its `-framedrop`
    default); `-noframedrop` keeps what is logged independent of the machine's speed."""
    result = subprocess.run(
        ["ffplay", "-hide_banner", "-nostats", "-v", "info", "-autoexit", "-an", "-noframedrop",
         *options, "-vf", "showinfo", str(target)],
        capture_output=True, text=True, timeout=MPV_TIMEOUT, check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy"})
    return re.findall(r" checksum:([0-9A-F]{8})", result.stderr), result.stderr


@pytest.mark.parametrize("start", [0.0, 5.3])
def test_ffplay_shows_the_same_frames_through_the_mount(
    mount: VcfsMount, sources: dict[str, Source], videos: dict[str, Path], start: float,
) -> None:
    """ffplay, the player that ships with ffmpeg, from the start and after a jump: a second of
    playback shows the frames it shows of the local file, checksum for checksum."""
    options = ("-ss", str(start), "-t", "1")
    through_mount, log = ffplay_checksums(mount.video(sources["big.mp4"].file_name), *options)
    local, _ = ffplay_checksums(videos["big.mp4"], *options)
    assert len(local) >= 25, log  # a second at 25 frames/s
    assert through_mount == local, log


def test_ffplay_says_no_such_file_for_a_video_the_service_does_not_have(
        mount: VcfsMount) -> None:
    shown, log = ffplay_checksums(mount.video(UNKNOWN_NAME), "-t", "1")
    assert shown == []
    assert "No such file or directory" in log, log


@pytest.fixture(scope="module")
def vlc_place(vidcache_server: VidcacheServer, videos: dict[str, Path],
              sources: dict[str, Source]) -> Iterator[tuple[VcfsMount, Path]]:
    """(a mount made with `-o allow_other`, a directory uid 65534 can traverse and write
    holding copies of the source videos): pytest's own temporary directories are root's
    alone (0700)."""
    if os.geteuid() != 0:
        pytest.skip("VLC refuses root, so it plays as uid 65534: switching to it needs root")
    place = Path(tempfile.mkdtemp(prefix="vcfs-vlc-"))
    try:
        place.chmod(0o777)  # VLC's home (its cache and config) and its outputs
        for name in CORPUS:
            shutil.copyfile(videos[name], place / name)
            (place / name).chmod(0o644)
        with VcfsMount(vidcache_server.url, place / "mnt", "-o", "allow_other",
                       "--block-size", str(VLC_BLOCK)) as mounted:
            yield mounted, place
    finally:
        shutil.rmtree(place, ignore_errors=True)


def run_vlc(place: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`cvlc ARGS vlc://quit` as uid 65534 (vlc://quit ends it once the playlist is played)."""
    return subprocess.run([*VLC, *args, "vlc://quit"], capture_output=True, text=True,
                          errors="replace", timeout=VLC_TIMEOUT, check=False,
                          cwd=place, env={**os.environ, "HOME": str(place)})


def vlc_frames(place: Path, target: Path, *options: str) -> bytes:
    """The frames VLC decodes from `target`, raw I420 (yuv420p)."""
    out = place / "frames.yuv"
    out.unlink(missing_ok=True)
    result = run_vlc(place, *options, str(target),
                     "--sout", f"#transcode{{vcodec=I420}}:std{{access=file,mux=raw,dst={out}}}")
    assert result.returncode == 0, result.stderr
    assert out.exists(), result.stderr
    return out.read_bytes()


def logged_reads(mounted: VcfsMount, content_hash: str) -> list[tuple[int, int]]:
    """The `[start, end)` of every FUSE read of `content_hash` in the daemon's debug log."""
    pattern = re.compile(rf"read {content_hash[:12]} \[(\d+), \+(\d+)\)")
    return [(int(start), int(start) + int(size))
            for start, size in pattern.findall(mounted.log())]


def widest_gap(reads: list[tuple[int, int]], size: int) -> tuple[int, int]:
    """The widest `[start, end)` of a file of `size` bytes that none of `reads` covers."""
    widest, covered_to = (0, 0), 0
    for start, end in [*sorted(reads), (size, size)]:
        if start - covered_to > widest[1] - widest[0]:
            widest = (covered_to, start)
        covered_to = max(covered_to, end)
    return widest


def frame_indices(decoded: bytes, reference: bytes, size: int) -> list[int]:
    """Where each `size`-byte frame of `decoded` sits in `reference` (-1: nowhere)."""
    index = {reference[at:at + size]: at // size for at in range(0, len(reference), size)}
    return [index.get(decoded[at:at + size], -1) for at in range(0, len(decoded), size)]


@pytest.mark.parametrize(("name", "start", "jumps"), [
    ("c.mkv", None, False),
    # a seek: VLC reads the first ~5 MB, then jumps to the keyframe at 6 s (or, when the
    # machine is busy, at 4 s) and decodes a second
    ("big.mp4", 6, True),
], ids=["mkv-start", "mp4-seek"])
def test_vlc_as_a_user_decodes_the_same_frames_through_an_allow_other_mount(
    vlc_place: tuple[VcfsMount, Path], sources: dict[str, Source], name: str,
    start: int | None, jumps: bool,
) -> None:
    mounted, place = vlc_place
    source = sources[name]
    stop = f"--stop-time={2 if start is None else start + 1}"
    seek = () if start is None else (f"--start-time={start}",)
    before = mounted.stats()
    through_mount = vlc_frames(place, mounted.video(source.file_name), *seek, stop)
    # FUSE releases a closed file after close() returns
    wait_until(lambda: mounted.stats()["open_files"] == 0, timeout=10,
               what="VLC's files released")
    after = mounted.stats()
    # Every byte fetched once: VLC reads the last page first, which fetches the last block
    # whole where it is shorter than a chunk (big.mp4 ends 28 KB past 21 MiB), else its end
    # alone (a tail; another x264 may make a file ending below 21 MiB), and playback or
    # readahead reaching that block then fetches only what lies before the tail.
    fetched = after["remote"]["bytes_fetched"] - before["remote"]["bytes_fetched"]
    prefetched = after["fuse"]["readahead_blocks"] - before["fuse"]["readahead_blocks"]
    # Every frame up to the stop, from the local copy. Which frames a seek shows varies with
    # VLC's timing (the first frame before it jumps, a keyframe at 4 s or 6 s), so a seek is
    # checked against these: each frame it shows is one of the video's, in order, and the
    # last second is shown whole. Without a seek, exactly these frames.
    reference = vlc_frames(place, place / name, stop)
    size = frame_size(place / name)
    assert len(through_mount) % size == 0
    shown, every_frame = frame_indices(through_mount, reference, size), len(reference) // size
    if jumps:
        assert -1 not in shown, shown
        assert shown == sorted(set(shown)), shown
        assert shown[-20:] == list(range(every_frame - 20, every_frame)), shown  # 25 frames/s
    else:
        assert shown == list(range(every_frame))
    # What VLC skipped is not fetched: no block lying wholly in the widest stretch it did not
    # read, but those vcfs's readahead asked for after VLC's first reads ran on sequentially
    # (one, when the machine is busy). Where VLC lands varies with its timing, so the stretch
    # comes from what it read.
    gap_start, gap_end = widest_gap(logged_reads(mounted, source.content_hash), source.size)
    first_block_inside = -(-gap_start // VLC_BLOCK)
    skipped_blocks = max(0, gap_end // VLC_BLOCK - first_block_inside)
    unfetched = max(0, skipped_blocks - prefetched) * VLC_BLOCK
    assert fetched <= source.size - unfetched, (fetched, gap_start, gap_end, prefetched)
    if jumps:
        # VLC did jump, past what readahead asked for: the check above means something
        assert skipped_blocks - prefetched >= 3, (gap_start, gap_end, prefetched)


def test_vlc_says_no_such_file_for_a_video_the_service_does_not_have(
    vlc_place: tuple[VcfsMount, Path],
) -> None:
    mounted, place = vlc_place
    result = run_vlc(place, str(mounted.video(UNKNOWN_NAME)))
    assert "No such file or directory" in result.stderr, result.stderr


def test_a_root_mount_without_allow_other_is_roots_alone_and_its_log_says_so(
    vlc_place: tuple[VcfsMount, Path], vidcache_server: VidcacheServer,
    sources: dict[str, Source],
) -> None:
    shared, place = vlc_place
    name = sources["a.mp4"].file_name
    with VcfsMount(vidcache_server.url, place / "mnt-root-only") as roots:
        as_user = subprocess.run([*AS_NOBODY, "head", "-c", "1", str(roots.video(name))],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert as_user.returncode != 0
        assert "Permission denied" in as_user.stderr, as_user.stderr
        assert "mount with -o allow_other" in roots.log()
    assert "mount with -o allow_other" not in shared.log()
