"""What ffprobe and ffmpeg may open and spend while the real service validates an ingest: a
download is attacker-controlled, and a playlist or description that ffmpeg detects by content
(HLS, DASH, ffconcat, SDP) names other files and streams, which its demuxer opened as it read
the header. Whether a file was opened is seen by a FIFO: a reader's open(2) waits for a
writer, and a writer's non-blocking open succeeds only once a reader has the FIFO open. Their
memory is capped (--media-memory): a video that needs more is refused naming the cap."""

from __future__ import annotations

import contextlib
import errno
import http.server
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_stress_support import programs_using
from tests.service_support import Api, api_fixture, blob_files, temp_files, unique
from tests.support import VidcacheServer, serve_directory, serving
from vidcache.chunks import MIB
from vidcache.config import GIB
from vidcache.errors import BadSetting, NotAVideo
from vidcache.tools import Tools

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    with VidcacheServer(tmp_path_factory.mktemp("svc-media") / "data") as running:
        yield running


api = api_fixture(upstream="server")


@pytest.fixture(scope="module")
def origin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media-origin")


@pytest.fixture(scope="module")
def origin(origin_dir: Path) -> Iterator[str]:
    with serve_directory(origin_dir) as url:
        yield url


@contextlib.contextmanager
def _counting_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server answering 404 to everything; yields (base URL, paths asked)."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as counting:
        yield f"http://127.0.0.1:{counting.server_address[1]}", asked


def _ingest_watching(api: Api, url: str, fifo: Path) -> tuple[httpx.Response, bool]:
    """Ingest `url` and whether anything opened `fifo` meanwhile (it is then given EOF)."""
    opened = False
    with ThreadPoolExecutor(1) as pool:
        answer: Future[httpx.Response] = pool.submit(api.ingest, url, unique("media"))
        # a reader blocks in open(2) until a writer comes: the old ffprobe waited for us here
        while not wait([answer], timeout=0.02).done:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                assert exc.errno == errno.ENXIO, exc  # no reader yet
                continue
            opened = True
        return answer.result(), opened


def _assert_refused(api: Api, server: VidcacheServer, url: str, response: httpx.Response,
                    blobs: list[Path], *words: str) -> None:
    """Refused as not a video, its detail naming `words`; nothing stored (`blobs` before)."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("not a video: "), detail
    for word in words:
        assert word in detail, detail
    assert api.http.get("/resolve", params={"url": url}).status_code == 404
    assert blob_files(server.data_dir) == blobs
    assert temp_files(server.data_dir) == []


def _hls(segment: str) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{segment}\n#EXT-X-ENDLIST\n"


def _dash(base_url: str) -> str:
    return ('<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
            'mediaPresentationDuration="PT2S" '
            'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"><Period>'
            '<AdaptationSet mimeType="video/mp4"><Representation id="1" bandwidth="100000" '
            'codecs="avc1.64000d" width="160" height="120">'
            f"<BaseURL>{base_url}</BaseURL></Representation></AdaptationSet></Period></MPD>\n")


# name -> (the file's text for a FIFO at an absolute path, what the refusal calls it). An
# ffconcat list may only name files beside it (its demuxer's `safe` mode): the service's tmp/.
_LOCAL_INDIRECTIONS: dict[str, tuple[Callable[[Path], str], str]] = {
    "hls-path": (lambda fifo: _hls(str(fifo)), "an HLS playlist (hls)"),
    "hls-file-url": (lambda fifo: _hls(f"file:{fifo}"), "an HLS playlist (hls)"),
    "dash-path": (lambda fifo: _dash(str(fifo)), "a DASH manifest (dash)"),
    "concat-beside": (lambda fifo: f"ffconcat version 1.0\nfile {fifo.name}\n",
                      "an ffconcat list (concat)"),
}


@pytest.mark.parametrize("kind", _LOCAL_INDIRECTIONS)
def test_a_playlist_naming_a_local_file_is_refused_without_opening_it(
        api: Api, server: VidcacheServer, origin: str, origin_dir: Path, tmp_path: Path,
        kind: str) -> None:
    """Was: ffprobe opened the file named (an .mp4 FIFO here: it waited for a writer until
    the 300 s media timeout), and the answer told whether it was a readable video ('unsupported
    container 'hls'') or not ('ffprobe cannot read it (Invalid data found ...)')."""
    text, called = _LOCAL_INDIRECTIONS[kind]
    folder = server.data_dir / ".vidcache" / "tmp" if kind == "concat-beside" else tmp_path
    fifo = folder / f"target-{unique(kind)}.mp4"
    os.mkfifo(fifo)
    blobs = blob_files(server.data_dir)
    try:
        (origin_dir / f"{kind}.txt").write_text(text(fifo))
        url = f"{origin}/{kind}.txt"
        response, opened = _ingest_watching(api, url, fifo)
    finally:
        fifo.unlink()
    assert not opened, f"{fifo.name} was opened; the service answered {response.text}"
    _assert_refused(api, server, url, response, blobs, called, "none was opened")


@pytest.mark.parametrize("kind", ["hls", "dash"])
def test_a_playlist_naming_a_loopback_url_is_refused_without_a_request(
        api: Api, server: VidcacheServer, origin: str, origin_dir: Path, kind: str) -> None:
    """ffmpeg 5.1 made no request before either (a file input's nested opens may use only the
    protocols file, crypto and data), but the answer said only 'ffprobe cannot read it
    (Invalid data found when processing input)'."""
    blobs = blob_files(server.data_dir)
    with _counting_server() as (counting, asked):
        segment = f"{counting}/segment.mp4"
        (origin_dir / f"{kind}-http.txt").write_text(_hls(segment) if kind == "hls"
                                                     else _dash(segment))
        url = f"{origin}/{kind}-http.txt"
        response = api.ingest(url, unique("media"))
    assert asked == []
    _assert_refused(api, server, url, response, blobs, f"({kind})", "none was opened")


def test_an_sdp_description_is_refused_as_such(api: Api, server: VidcacheServer, origin: str,
                                               origin_dir: Path) -> None:
    """Was: 'ffprobe cannot read it (Invalid data found when processing input)', after its
    demuxer tried to open RTP on the port named (refused by ffmpeg's default whitelist)."""
    (origin_dir / "stream.sdp.txt").write_text(
        "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
        "m=video 5004 RTP/AVP 96\na=rtpmap:96 H264/90000\n")
    url = f"{origin}/stream.sdp.txt"
    blobs = blob_files(server.data_dir)
    _assert_refused(api, server, url, api.ingest(url, unique("media")), blobs,
                    "an SDP description (sdp)")


# extension -> ffmpeg's output codec arguments; every container the service accepts
_CONTAINERS: dict[str, list[str]] = {
    **{ext: ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
       for ext in ("mp4", "mov", "3gp", "3g2", "mkv", "ts")},
    "webm": ["-c:v", "libvpx", "-b:v", "200k"], "avi": ["-c:v", "mpeg4"],
    "mpg": ["-c:v", "mpeg2video"], "flv": ["-c:v", "flv"], "ogv": ["-c:v", "libtheora"],
    "wmv": ["-c:v", "wmv2"], "mxf": ["-c:v", "mpeg2video"],
}


@pytest.mark.parametrize("extension", _CONTAINERS)
def test_a_video_of_every_supported_container_is_stored(
        api: Api, origin: str, origin_dir: Path, extension: str) -> None:
    """The demuxer allowlist keeps every container the service supports (passed before)."""
    name = f"clip.{extension}"
    # a random pattern of its own (seed): no clip is a perceptual duplicate of another. A
    # keyframe a second, as in real footage: from an MPEG-TS whose only keyframe is its first,
    # ffmpeg decodes no frame after a seek (422 'no frame could be decoded', before too).
    seed = list(_CONTAINERS).index(extension) + 1
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"cellauto=size=176x144:rate=25:rule=30:seed={seed}", "-t", "2", "-g", "25",
                    *_CONTAINERS[extension], str(origin_dir / name)], check=True)
    result: dict[str, Any] = api.ingest_ok(f"{origin}/{name}", unique("media"))
    assert result["status"] == "new", result
    assert result["file_path"].endswith(f".{extension}"), result


def test_frames_too_large_to_decode_are_refused(api: Api, server: VidcacheServer, origin: str,
                                                origin_dir: Path) -> None:
    """A 105 KB H.264 file of 8208x4320 frames (just over DCI 8K). Was: stored, sampling it
    took 1.6 GB; at 16000x16000 (750 KB) 20 GB and 78 s, with no bound but the machine's."""
    name = "large-frames.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "color=gray:size=8208x4320:rate=1:duration=2", "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(origin_dir / name)],
                   check=True)
    url = f"{origin}/{name}"
    blobs = blob_files(server.data_dir)
    _assert_refused(api, server, url, api.ingest(url, unique("media")), blobs,
                    "frames of 8208x4320, more than the 35389440 pixels (8192x4320)")


@pytest.fixture(scope="module")
def video_4k(origin_dir: Path) -> str:
    """A 2 s 3840x2160 H.264 video with a keyframe before each sample (every 0.2 s), so that
    its 8 samples are 8 inputs, 8 decoders: sampling its frames takes 800 MiB of data segment
    (with a keyframe a second, 2 inputs decode them, and 256 MiB is enough)."""
    name = "uhd.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=3840x2160:rate=25", "-t", "2", "-g", "5", "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(origin_dir / name)],
                   check=True)
    return name


def test_a_video_needing_more_memory_than_the_cap_is_refused_naming_it(
        tmp_path: Path, origin: str, video_4k: str) -> None:
    """Was: no cap, a decoder took whatever a file made it allocate. Under a cap alone, the
    answer was the line ffmpeg printed last: 'not a video: cannot decode frames (Last message
    repeated 4 times)' or '(Error while filtering: Cannot allocate memory)'."""
    url = f"{origin}/{video_4k}"
    with VidcacheServer(tmp_path / "data", "--media-memory", "256M") as capped:
        api = Api(capped.url)
        try:
            response = api.ingest(url, unique("memory"))
            detail = ("not a video: ffmpeg (frame sampling) ran out of memory under the "
                      "server's --media-memory of 256 MiB: the video needs more (the operator "
                      "may raise the cap), or it is broken and declares sizes no memory would "
                      "hold")
            assert (response.status_code, response.json()) == (422, {"detail": detail})
            assert api.http.get("/resolve", params={"url": url}).status_code == 404
        finally:
            api.close()
        assert blob_files(capped.data_dir) == []
        assert temp_files(capped.data_dir) == []
        assert programs_using(capped.data_dir, "ffprobe", "ffmpeg") == []
        assert f"failed (422): {detail}" in capped.log()


def test_the_default_memory_cap_leaves_room_for_a_4k_video(api: Api, origin: str,
                                                            video_4k: str) -> None:
    result: dict[str, Any] = api.ingest_ok(f"{origin}/{video_4k}", unique("memory"))
    assert result["status"] == "new", result


def test_the_memory_cap_is_the_tools_alone(tmp_path: Path) -> None:
    """The child's RLIMIT_DATA is the cap (ulimit -d counts KiB); the service's stays."""
    ours = resource.getrlimit(resource.RLIMIT_DATA)
    result = Tools(timeout=30, memory_cap=64 * MIB).run(["sh", "-c", "ulimit -d"],
                                                        what="test tool")
    assert result.stdout.decode().strip() == str(64 * 1024)
    assert resource.getrlimit(resource.RLIMIT_DATA) == ours
    assert Tools(timeout=30).run(["sh", "-c", "ulimit -d"], what="test tool").stdout \
        .decode().strip() == "unlimited"


# what ffmpeg 5.1 printed under caps from 16 MiB up to the need of 1080p and 4K videos, and
# its exit status; some of these runs went on without the frames it could not allocate
_OUT_OF_MEMORY = [
    ("Error while decoding stream #7:0: Cannot allocate memory", 1),
    ("[h264 @ 0x55d2] get_buffer() failed\n[h264 @ 0x55d2] thread_get_buffer() failed", 0),
    ("[h264 @ 0x55d2] Could not allocate memory", 0),
    ("Error allocating the decoder context.", 1),
    ("pthread_create failed: Resource temporarily unavailable. Try to increase `ulimit -v` or "
     "decrease `ulimit -s`.", 1),
    ("ffprobe: error while loading shared libraries: libgsm.so.1: failed to map segment from "
     "shared object", 127),
]


@pytest.mark.parametrize(("stderr", "status"), _OUT_OF_MEMORY)
def test_a_tool_refused_memory_is_not_a_video_naming_the_cap(stderr: str, status: int) -> None:
    """The tool failed, or went on without what it could not allocate; without a cap such a
    line is the tool's own business (the callers judge it as before)."""
    argv = ["sh", "-c", f"printf '%s\\n' '{stderr}' >&2; exit {status}"]
    with pytest.raises(NotAVideo, match=r"^not a video: test tool ran out of memory under "
                                        r"the server's --media-memory of 200 MiB: the video "):
        Tools(timeout=30, memory_cap=200 * MIB).run(argv, what="test tool")
    assert Tools(timeout=30).run(argv, what="test tool").returncode == status


@pytest.mark.parametrize(("cap", "shown"), [(1500 * MIB, "1500 MiB"), (3 * 1024 * MIB, "3 GiB")])
def test_the_cap_is_named_as_it_was_given(cap: int, shown: str) -> None:
    """Was '1.46484 GiB' for --media-memory 1500M."""
    argv = ["sh", "-c", "echo 'Cannot allocate memory' >&2; exit 1"]
    with pytest.raises(NotAVideo, match=rf"--media-memory of {shown}: "):
        Tools(timeout=30, memory_cap=cap).run(argv, what="test tool")


def test_a_frame_larger_than_max_pixels_is_not_memory() -> None:
    """Its buffer is refused too ('get_buffer() failed'), for its size: media.py says so."""
    stderr = ("[h264 @ 0x55] [IMGUTILS @ 0x7f] Picture size 8208x4320 exceeds specified max "
              "pixel count 35389440, see the documentation if you wish to increase it\n"
              "[h264 @ 0x55] video_get_buffer: image parameters invalid\n"
              "[h264 @ 0x55] get_buffer() failed")
    result = Tools(timeout=30, memory_cap=200 * MIB).run(
        ["sh", "-c", f"printf '%s\\n' '{stderr}' >&2; exit 1"], what="test tool")
    assert result.returncode == 1


def test_without_prlimit_a_memory_cap_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BadSetting, match="prlimit, which caps ffprobe/ffmpeg's memory, is not "
                                         "installed; install util-linux, or give "
                                         "--media-memory 0"):
        Tools(timeout=30, memory_cap=GIB)
    Tools(timeout=30)


def test_a_memory_cap_above_the_servers_own_hard_limit_is_refused(tmp_path: Path) -> None:
    """A server started under a hard data limit (systemd's LimitDATA=, ulimit -d) cannot give
    its tools more: it refused every ingest, 'not a video: ffprobe cannot read it (prlimit:
    failed to set the DATA resource limit: Operation not permitted)'. Now it does not start,
    and leaves no data directory behind (it made one); a cap under the limit is the tools'."""
    limited = ["prlimit", f"--data={GIB}", "--", sys.executable]
    with socket.socket() as probe:  # a port nothing listens on, should the server start
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = subprocess.run([*limited, "-m", "vidcache", "serve", "--data",
                              str(tmp_path / "data"), "--port", str(port)],
                             capture_output=True, text=True, timeout=30)
    assert (started.returncode, started.stderr) == (
        1, "vidcache serve: error: --media-memory 3 GiB is more than the server's own hard data "
           "limit (1 GiB, ulimit -d), above which its tools cannot be given memory; give a "
           "smaller --media-memory, or raise the limit\n")
    assert not (tmp_path / "data").exists()  # refused before the data directory is made
    under = subprocess.run([*limited, "-c", "from vidcache.tools import Tools; print(Tools("
                            f"timeout=30, memory_cap={512 * MIB}).run(['sh', '-c', 'ulimit -d'], "
                            "what='test tool').stdout.decode().strip())"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert under.stdout.strip() == str(512 * 1024)
