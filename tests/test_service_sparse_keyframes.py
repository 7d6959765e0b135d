"""Videos whose keyframes are few or that ffmpeg cannot seek to a keyframe in, through a real
service and a loopback origin: an MPEG-TS with one keyframe was refused (422 `not a video: no
frame could be decoded`: each sample's seek landed after the only keyframe), one with GOPs was
sampled up to a GOP late and missed its re-encode, and a single-keyframe mp4 was decoded from
its start again for each sample. Each is now stored, served as it was, and its re-encode with
short GOPs found as its duplicate."""

from __future__ import annotations

import re
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_support import Api, unique
from tests.support import VidcacheServer, serve_directory
from vidcache import media
from vidcache.tools import Tools

pytestmark = pytest.mark.timeout(180)

_X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
# 10 s of quick motion: a sample a few frames off measures 10-30 bits apart
_CLIP = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=10"]
_WIDE_CLIP = ["-f", "lavfi", "-i", "testsrc2=size=640x480:rate=25:duration=10"]
_ONE_KEYFRAME = [*_X264, "-g", "100000"]
_INTRA_REFRESH = [*_X264, "-x264-params", "intra-refresh=1"]
# a live broadcast: a TS with audio and a keyframe every 2 s, of which a capture begins about
# 6 s in, at a packet that is no keyframe (_cut_mid_gop)
_LIVE = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=16", "-f", "lavfi",
         "-i", "sine=f=440:d=16", *_X264, "-g", "50", "-c:a", "aac", "-f", "mpegts"]

# name -> ffmpeg arguments before the output
_VIDEOS: dict[str, list[str]] = {
    "one-keyframe.ts": [*_CLIP, *_ONE_KEYFRAME, "-f", "mpegts"],
    "one-keyframe.mp4": [*_CLIP, *_ONE_KEYFRAME],
    "one-keyframe.mkv": [*_CLIP, *_ONE_KEYFRAME],
    # a refresh wave in place of keyframes (the default -g: one wave in 10 s), and one every
    # 2 s, each starting at a recovery point, which ffmpeg marks as a keyframe; a wave takes
    # a frame per column of macroblocks to cross the picture (40 frames at 640 pixels wide)
    "intra-refresh.ts": [*_CLIP, *_INTRA_REFRESH, "-f", "mpegts"],
    "intra-refresh-2s.ts": [*_WIDE_CLIP, *_INTRA_REFRESH, "-g", "50", "-f", "mpegts"],
    "intra-refresh-2s.mp4": [*_WIDE_CLIP, *_INTRA_REFRESH, "-g", "50"],
    "open-gop.ts": [*_CLIP, *_X264, "-g", "50", "-x264-params", "open-gop=1", "-f", "mpegts"],
}
# the capture cut from _LIVE
_CUT = "capture.ts"


def _reencode(name: str) -> str:
    return f"{Path(name).stem}-reencoded.mp4"


def _make(folder: Path, name: str, args: list[str]) -> Path:
    path = folder / name
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args, str(path)], check=True)
    return path


def _cut_mid_gop(source: Path, target: Path) -> None:
    """`source` from the first TS packet at 3/8 of its bytes on, which starts no keyframe."""
    packets = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "packet=pos,flags", "-of", "csv=p=0", str(source)],
        check=True, capture_output=True, text=True).stdout.split()
    data = source.read_bytes()
    offset = len(data) * 3 // 8 // 188 * 188
    after = [line.split(",") for line in packets if line.count(",") >= 1]
    first = min((int(pos), flags) for pos, flags, *_ in after if int(pos) >= offset)
    assert not first[1].startswith("K")
    target.write_bytes(data[offset:])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """_VIDEOS, the capture, and each one's re-encode with a keyframe every second, at
    another size and bitrate (audio kept)."""
    folder = tmp_path_factory.mktemp("sparse")
    for name, args in _VIDEOS.items():
        _make(folder, name, args)
    _cut_mid_gop(_make(folder, "live.ts", _LIVE), folder / _CUT)
    for name in [*_VIDEOS, _CUT]:
        _make(folder, _reencode(name), ["-i", str(folder / name), "-vf", "scale=240:180",
                                        *_X264, "-g", "25", "-b:v", "150k"])
    return folder


@pytest.fixture(scope="module")
def origin(folder: Path) -> Iterator[str]:
    with serve_directory(folder) as url:
        yield url


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    """A service of its own per test: every video here shows the same picture."""
    with VidcacheServer(tmp_path / "data") as server:
        client = Api(server.url)
        try:
            yield client
        finally:
            client.close()


@pytest.mark.parametrize("name", ["one-keyframe.ts", "intra-refresh.ts", "open-gop.ts",
                                  "intra-refresh-2s.ts", _CUT, "intra-refresh-2s.mp4",
                                  "one-keyframe.mp4", "one-keyframe.mkv"])
def test_a_video_with_few_keyframes_is_stored_and_its_reencode_matched(
        api: Api, origin: str, folder: Path, name: str) -> None:
    """The first two were refused (422, no frame decoded); the other TS were stored, but
    sampled up to a GOP late (the last samples without a frame), and so was the mp4 with
    refresh waves (decoded from the recovery point before the sample, whose frames are whole
    only at the next): their re-encodes measured 12-32 apart and were stored again. The
    single-keyframe mp4 and mkv were sampled right, decoding from the start once per sample
    (see the next test)."""
    bucket = unique("sparse")
    stored = api.ingest_ok(f"{origin}/{name}", bucket)
    assert stored["status"] == "new"
    served = api.http.get(f"/video/{stored['hash']}")
    assert served.status_code == 200
    assert served.content == (folder / name).read_bytes()
    again = api.ingest_ok(f"{origin}/{_reencode(name)}", bucket)
    assert (again["status"], again["hash"]) == ("duplicate", stored["hash"])
    assert again["phash_distance"] <= 2


class _CountingTools(Tools):
    """Tools that also count the frames each frame sampling decodes (ffmpeg says so at
    `-v verbose`: `Input stream #0:0 (video): ... 152 frames decoded;`)."""

    def __init__(self) -> None:
        super().__init__(timeout=120)
        self.decoded: list[int] = []

    def run(self, argv: list[str], *, what: str) -> subprocess.CompletedProcess[bytes]:
        result = super().run(argv, what=what)
        if what.startswith("ffmpeg (frame sampling)"):
            # again, over the outputs written
            verbose = ["ffmpeg", "-y", *("verbose" if arg == "error" else arg
                                         for arg in argv[1:])]
            log = subprocess.run(verbose, capture_output=True, check=True).stderr.decode()
            self.decoded.append(sum(int(n) for n in re.findall(r"(\d+) frames decoded", log)))
        return result


@pytest.mark.parametrize("name", ["one-keyframe.mp4", "one-keyframe.ts"])
def test_a_single_keyframe_video_is_decoded_once(folder: Path, tmp_path: Path,
                                                 name: str) -> None:
    """All 8 samples follow the one keyframe, so one input decodes them, each frame once, up
    to the last sample (at 15/16): a seek per sample decoded the 250 frames up to 4 times
    over (1 020 frames for the mp4; the TS gave none)."""
    tools = _CountingTools()
    path = folder / name
    info = media.probe(path, tools)
    hashes = media.perceptual_hash(path, info, tools, work_dir=tmp_path)
    assert None not in hashes
    assert tools.decoded and 200 <= tools.decoded[0] <= 250


def test_the_samples_past_the_decode_cap_have_no_frame(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single-keyframe hour of 1080p, decoded once, would outrun the tools' timeout: the
    frames decoded are capped, here at 4 s of the 10 s clip. The samples at 0.6, 1.9 and
    3.1 s are taken, the later ones left without a frame, and no more than the cap is
    decoded."""
    path = folder / "one-keyframe.mp4"
    tools = _CountingTools()
    info = media.probe(path, tools)
    monkeypatch.setattr(media, "MAX_DECODED_PIXELS", int(4 * info.pixel_rate))
    hashes = media.perceptual_hash(path, info, tools, work_dir=tmp_path)
    assert [h is not None for h in hashes] == [True] * 3 + [False] * 5
    assert tools.decoded and tools.decoded[0] <= 4 * 25


def test_the_packets_a_ts_is_scanned_for_are_not_held_by_the_service(tmp_path: Path) -> None:
    """A TS's keyframes are found by listing every packet: ffprobe's list was taken whole into
    the service, ~300 bytes per packet, and a TS of one small packet per 188 bytes is the
    worst (14.7 MiB held here for 50 000 packets, a 9.6 MB file; 7 GiB for a 4 GB upload).
    Now ffprobe writes it to a file, read a line at a time, and only the keyframes are kept."""
    path = _make(tmp_path, "tiny-packets.ts",
                 ["-f", "lavfi", "-i", "color=c=gray:size=64x64:rate=1000", "-t", "50",
                  *_X264, "-g", "1000", "-f", "mpegts"])
    tools = Tools(timeout=120)
    info = media.probe(path, tools)
    expected = media.perceptual_hash(path, info, tools, work_dir=tmp_path)  # imports done
    tracemalloc.start()
    try:
        hashes = media.perceptual_hash(path, info, tools, work_dir=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert hashes == expected and None not in hashes
    assert peak < 2 * 2**20
