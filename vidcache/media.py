"""What ffprobe/ffmpeg tell us about a downloaded file: is it a video, and what does it look like.

`probe` validates the file and reads duration, container, mime type and file extension.

`perceptual_hash` samples FRAMES frames, one at the middle of each of FRAMES equal slices of the
video, shrinks each to a FRAME_SIZE² grey image in ffmpeg and takes its 64-bit DCT hash
(imagehash.phash). Two videos are compared frame by frame at the same relative positions; the
distance is the mean Hamming distance of those pairs, so it stays on the 0-64 scale of a single
hash while a chance match of one frame (a black title card) cannot make two videos equal.
`near_duplicate` says whether two videos count as the same by their frames: see its docstring
and docs/service.md ("Perceptual hash") for the measurements behind each of its conditions;
audio.py then tells apart those whose sound differs.
One ffmpeg process decodes all samples. A sample is decoded from the keyframe before it (the
only frame a decoder can start from), so where keyframes are dense each sample is an input of
its own, opened with an input-side -ss: the cost does not grow with the video's length. Where
several samples follow one keyframe (a stream with a single keyframe, or very long GOPs), they
share one input decoded once from that keyframe (a seek per sample decoded the stream up to
each sample again: 4 times its length for 8 samples), and the frames decoded are capped
(MAX_DECODED_PIXELS); a sample past the cap has no frame. MPEG-TS and MPEG-PS have no index:
ffmpeg seeks them to any packet near the time and the decoder drops frames up to the next
keyframe (a sample came out up to a GOP late, or none after a stream's only keyframe), so
their keyframes are read from a scan of the packets and each input is opened just before one.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
from PIL import Image

from vidcache.errors import NotAVideo, StorageError
from vidcache.tools import Tools, ffmpeg_argv, ffprobe_argv

FRAMES = 8
FRAME_SIZE = 64

# A frame's hash, or None where no frame could be decoded at that position.
PerceptualHash = tuple[int | None, ...]


@dataclass(frozen=True, kw_only=True)
class MediaInfo:
    duration_s: float
    container: str  # ffprobe's format_name
    mime_type: str
    extension: str
    video_stream: int  # index of the stream the perceptual hash is taken from
    audio_stream: int | None  # index of the stream the audio check listens to, if any
    start_s: float  # the first timestamp; ffmpeg's -ss counts from it
    pixel_rate: float  # pixels decoded per second of the video stream
    size: tuple[int, int]  # the video stream's width and height


# ffprobe format_name -> (mime type, extension); mp4/mov and matroska/webm are refined below.
_MP4 = "mov,mp4,m4a,3gp,3g2,mj2"
_CONTAINERS: dict[str, tuple[str, str]] = {
    _MP4: ("video/mp4", "mp4"),
    "matroska,webm": ("video/x-matroska", "mkv"),
    "avi": ("video/x-msvideo", "avi"),
    "mpegts": ("video/mp2t", "ts"),
    "mpeg": ("video/mpeg", "mpg"),
    "flv": ("video/x-flv", "flv"),
    "ogg": ("video/ogg", "ogv"),
    "asf": ("video/x-ms-asf", "wmv"),
    "mxf": ("application/mxf", "mxf"),
}
_WEBM_CODECS = {"vp8", "vp9", "av1", "vorbis", "opus"}

# The demuxers of _CONTAINERS: the only ones ffprobe and ffmpeg may use on a download. Others
# that ffmpeg picks by content open what the file names as they read its header: an HLS
# playlist or DASH manifest its segments (absolute paths, file: URLs), an ffconcat list its
# files (beside the temp file), an SDP description RTP sockets. A demuxer off this list is
# refused once probed, before it reads a header, so nothing but the temp file is opened; an
# allowlist also covers such demuxers of later ffmpeg versions. (-protocol_whitelist would not:
# local files are the file protocol's, the one protocol the input needs.)
_DEMUXERS = ",".join(name.split(",")[0] for name in _CONTAINERS)
_REFUSED_DEMUXER = re.compile(r"\[(\w+) @ 0x[0-9a-f]+\] Format not on whitelist")
# what those that name other files or streams are, for the refusal
_INDIRECTIONS = {"hls": "an HLS playlist", "dash": "a DASH manifest",
                 "concat": "an ffconcat list", "sdp": "an SDP description"}

# DCI 8K. A decoder refuses larger frames: a 750 KB H.264 file of 16000x16000 frames took
# 20 GB and 78 s to sample, as each of the FRAMES inputs holds several such frames.
MAX_PIXELS = 8192 * 4320
_TOO_LARGE = re.compile(r"Picture size (\d+)x(\d+) exceeds specified max pixel count")

# what may open and decode each input (tools.ffprobe_argv and ffmpeg_argv add their threads)
INPUT_LIMITS = ["-format_whitelist", _DEMUXERS, "-max_pixels", str(MAX_PIXELS)]


def last_error_line(stderr: bytes, path: Path) -> str:
    """ffmpeg's final complaint, without our temp file's name in it."""
    text = stderr.decode(errors="replace").replace(f"{path}: ", "").replace(str(path), "input")
    lines = [line.strip() for line in text.splitlines()]
    return next((line for line in reversed(lines) if line), "no diagnostic")


def _refusal(stderr: bytes, path: Path, failing: str) -> NotAVideo:
    """NotAVideo for a tool that failed on `path`: the input limit it hit, or else `failing`
    and its last word."""
    text = stderr.decode(errors="replace")
    if (refused := _REFUSED_DEMUXER.search(text)) is not None:
        name = refused.group(1)
        if name in _INDIRECTIONS:
            return NotAVideo(f"{_INDIRECTIONS[name]} ({name}), naming other files or streams; "
                             "none was opened")
        return _unsupported(name)
    if (large := _TOO_LARGE.search(text)) is not None:
        return NotAVideo(f"frames of {large.group(1)}x{large.group(2)}, more than the "
                         f"{MAX_PIXELS} pixels (8192x4320) the service decodes")
    return NotAVideo(f"{failing} ({last_error_line(stderr, path)})")


def _unsupported(format_name: str) -> NotAVideo:
    return NotAVideo(f"unsupported container {format_name!r}; supported: "
                     + ", ".join(ext for _, ext in _CONTAINERS.values()))


def probe(path: Path, tools: Tools) -> MediaInfo:
    """Validate `path` as a video; NotAVideo says what is wrong with it."""
    result = tools.run(ffprobe_argv(INPUT_LIMITS, path, "-show_format", "-show_streams",
                                    "-of", "json"), what="ffprobe")
    if result.returncode != 0:
        raise _refusal(result.stderr, path, "ffprobe cannot read it")
    info: dict[str, Any] = json.loads(result.stdout or b"{}")
    fmt: dict[str, Any] = info.get("format", {})
    streams: list[dict[str, Any]] = info.get("streams", [])
    videos = [s for s in streams if s.get("codec_type") == "video"
              and not s.get("disposition", {}).get("attached_pic")]
    format_name = str(fmt.get("format_name", "unknown"))
    if not videos:
        kinds = sorted({str(s.get("codec_type")) for s in streams}) or ["no streams"]
        raise NotAVideo(f"{format_name} file without a video stream ({', '.join(kinds)})")
    if format_name not in _CONTAINERS:
        raise _unsupported(format_name)
    mime_type, extension = _CONTAINERS[format_name]
    if extension == "mp4":
        brand = str(fmt.get("tags", {}).get("major_brand", "")).strip()
        if brand == "qt":
            mime_type, extension = "video/quicktime", "mov"
        elif brand.startswith("3g2"):
            mime_type, extension = "video/3gpp2", "3g2"
        elif brand.startswith("3g"):
            mime_type, extension = "video/3gpp", "3gp"
    elif extension == "mkv" and {str(s.get("codec_name")) for s in streams} <= _WEBM_CODECS:
        mime_type, extension = "video/webm", "webm"
    duration = _duration(fmt, videos[0])
    if duration is None:
        raise NotAVideo(f"{format_name} file whose duration ffprobe cannot tell")
    start = _number(fmt.get("start_time")) or 0.0
    if start > 0:
        duration = _from_start(path, tools, format_name, streams, start, duration)
    audios = [s for s in streams if s.get("codec_type") == "audio"]
    video = videos[0]
    size = (int(video.get("width") or 0), int(video.get("height") or 0))
    if 0 in size:
        size = _decoded_size(path, tools, int(video["index"]))
    return MediaInfo(duration_s=duration, container=format_name, mime_type=mime_type,
                     extension=extension, video_stream=int(video["index"]),
                     audio_stream=int(audios[0]["index"]) if audios else None,
                     start_s=start, pixel_rate=size[0] * size[1] * _frame_rate(video),
                     size=size)


# packets of a video stream read for its first keyframe when ffprobe's own look did not find
# its size: 400 s at 25 fps
_SIZE_PACKETS = 10_000


def _decoded_size(path: Path, tools: Tools, stream: int) -> tuple[int, int]:
    """The size of the first keyframe of video stream `stream` in its first _SIZE_PACKETS
    packets, (0, 0) if none decodes (or ffprobe fails: such a video was not refused before).
    For a stream whose size ffprobe did not find in the 5 s it looks at: a capture begun
    mid-GOP, whose first keyframe (in H.264 the first parameter sets, which hold the size)
    comes later, as in an MPEG-TS cut 1 s into 10 s GOPs. Reported 0x0, its frames were
    compared at 8x8 by the frame check (a changed word unseen) and its decoding was not
    capped."""
    result = tools.run(ffprobe_argv(INPUT_LIMITS, path, "-select_streams", str(stream),
                                    "-skip_frame", "nokey", "-read_intervals",
                                    f"%+#{_SIZE_PACKETS}", "-show_entries",
                                    "frame=width,height", "-of", "csv"),
                       what="ffprobe (size)")
    for line in result.stdout.decode(errors="replace").splitlines():
        section, *fields = line.split(",")
        if section == "frame" and len(fields) == 2 and fields[0].isdigit() \
                and fields[1].isdigit() and int(fields[0]) * int(fields[1]) > 0:
            return int(fields[0]), int(fields[1])
    return 0, 0


def _duration(fmt: dict[str, Any], stream: dict[str, Any]) -> float | None:
    for source in (fmt, stream):
        value = _number(source.get("duration"))
        if value is not None and value > 0:
            return value
    return None


def _from_start(path: Path, tools: Tools, format_name: str, streams: list[dict[str, Any]],
                start_s: float, duration_s: float) -> float:
    """The time from `start_s`, the first timestamp, to the end, of a file whose `duration_s`
    may count from 0: ffmpeg's Matroska segment's and ASF file's do, and an MP4 movie's when
    an empty edit puts off its first frame (written with -output_ts_offset, a video-only
    re-encode of a capture begun mid-GOP keeping its first frame's time). Taken as the time
    from the start, it put the last samples past the end, without a frame, and the video was
    stored again (offset by 5 s: 15 s for 10, 3 samples of 8 missing)."""
    if format_name in ("matroska,webm", "asf") and duration_s > start_s:
        # mkvmerge's counts from the first timestamp, which its remux of such a file keeps
        # (8 s offset by 5: a duration of 8, less the start 3 s sampled, and stored again):
        # told apart by the packets, which run on past mkvmerge's duration (an ASF of another
        # muxer's is asked the same)
        if _packets_end(path, tools, start_s + duration_s) < duration_s + start_s / 2:
            return round(duration_s - start_s, 6)
        return duration_s
    if format_name == _MP4:
        # its streams' durations count from their start (and so does the movie's without an
        # edit list, where the start is the delay of B-frames)
        ends = [start + length for stream in streams
                if (start := _number(stream.get("start_time"))) is not None
                and (length := _number(stream.get("duration"))) is not None]
        if ends and max(ends) > start_s:
            return round(max(ends) - start_s, 6)
    return duration_s


# packets read from a Matroska file's last keyframe to find its end: a longer last GOP is
# taken to end within them
_END_PACKETS = 10_000


def _packets_end(path: Path, tools: Tools, at_s: float) -> float:
    """The latest end of the packets of every stream from the keyframe a seek to `at_s` lands
    on (the last before it), at most _END_PACKETS of them."""
    result = tools.run(ffprobe_argv(INPUT_LIMITS, path, "-read_intervals",
                                    f"{at_s:.6f}%+#{_END_PACKETS}", "-show_entries",
                                    "packet=pts_time,duration_time", "-of", "csv"),
                       what="ffprobe (end)")
    if result.returncode != 0:
        raise _refusal(result.stderr, path, "ffprobe cannot read its packets")
    end = 0.0
    for line in result.stdout.decode(errors="replace").splitlines():
        section, *fields = line.split(",")
        if section == "packet" and len(fields) == 2 and (pts := _number(fields[0])) is not None:
            end = max(end, pts + (_number(fields[1]) or 0.0))
    return end


def _number(text: object) -> float | None:
    """ffprobe's number (or "N/A", or nothing) as a finite float, else None."""
    try:
        value = float(str(text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# what the decode cap assumes of a stream that states no frame rate
_UNKNOWN_FRAME_RATE = 60.0


def _frame_rate(stream: dict[str, Any]) -> float:
    for key in ("avg_frame_rate", "r_frame_rate"):
        numerator, _, denominator = str(stream.get(key, "")).partition("/")
        rate = _number(numerator)
        per = _number(denominator or "1")
        if rate and per and rate / per > 0:
            return rate / per
    return _UNKNOWN_FRAME_RATE


# The most the frame samples of one video may decode: 11 minutes of 1080p at 25 fps (25 of
# 720p, 5 hours of 320x240), 60-130 s here (2 busy cores decoded H.264 at 0.26-0.6 Gpixel/s:
# 1080p from x264 veryfast at 125 frames/s, 720p from ultrafast at 640).
# A single-keyframe hour of 1080p decoded once would take ~720 s, past the tools' timeout
# (300 s): the samples past the cap go without a frame instead of the video being refused.
MAX_DECODED_PIXELS = 2**35
# how far before a keyframe's decoding time an input is opened to start at the keyframe before
# it, or, in an MPEG-TS/PS, at this one: ffmpeg seeks those to the last packet at or before
# the time, which must come before the keyframe
_BEFORE_KEYFRAME_S = 0.001


@dataclass(frozen=True)
class _Start:
    """Where decoding must start for a sample to be decoded."""

    key_s: float  # the keyframe's time (0: the start of the file)
    seek_s: float | None  # the input-side -ss that gets there; None: no seek


@dataclass
class _Run:
    """Samples decoded by one input, from one keyframe on."""

    start: _Start
    samples: list[int]


def perceptual_hash(path: Path, info: MediaInfo, tools: Tools, *,
                    work_dir: Path) -> PerceptualHash:
    """FRAMES frame hashes sampled evenly across the video (see the module docstring)."""
    frames = sample_frames(path, info, tools, sample_times(info), (FRAME_SIZE, FRAME_SIZE),
                           work_dir=work_dir)
    return tuple(None if frame is None else _frame_hash(frame) for frame in frames)


def sample_times(info: MediaInfo) -> list[float]:
    """The time of each of the FRAMES samples: the middle of each equal slice of the video."""
    return [round(info.duration_s * (i + 0.5) / FRAMES, 3) for i in range(FRAMES)]


def sample_frames(path: Path, info: MediaInfo, tools: Tools, times: list[float],
                  size: tuple[int, int], *, work_dir: Path) -> list[bytes | None]:
    """The first frame at or after each of `times` (ascending, from the start), grey, of
    `size` (width x height bytes, a row after another); None where none was decoded or the
    decoding cap left it out. NotAVideo if those decoded gave no frame."""
    doing = "write the sampled frames"
    try:
        # cleanup errors ignored: a folder left on a file system turned read-only is removed
        # at the next start
        frames = tempfile.TemporaryDirectory(dir=work_dir, prefix="frames-",
                                             ignore_cleanup_errors=True)
    except OSError as exc:
        raise StorageError.from_os_error(doing, work_dir, exc) from exc
    with frames as frames_dir:
        runs = _runs(times, _starts(path, info, tools, times, Path(frames_dir) / "packets.csv"),
                     budget_s=MAX_DECODED_PIXELS / max(info.pixel_rate, 1.0))
        outputs = [Path(frames_dir) / f"{i}.gray" for i in range(len(times))]
        if runs:
            result = tools.run(_sampling_argv(path, info, times, runs, outputs, size),
                               what="ffmpeg (frame sampling)")
            if (trouble := _output_error(result.stderr, frames_dir)) is not None:
                raise StorageError.from_strerror(doing, work_dir, trouble)
            if result.returncode != 0:
                raise _refusal(result.stderr, path, "cannot decode frames")
        sampled = [_frame(output, size[0] * size[1]) for output in outputs]
    if runs and all(frame is None for frame in sampled):
        raise NotAVideo("no frame could be decoded")
    return sampled


def _starts(path: Path, info: MediaInfo, tools: Tools, times: list[float],
            listing: Path) -> list[_Start]:
    """Where decoding starts for each sample time. ffprobe seeks to each as ffmpeg will; if
    every seek lands on a keyframe, ffmpeg's seek finds them (an index: mp4, mkv, ...); if not
    (MPEG-TS/PS), the keyframes are found by reading every packet of the stream.

    A keyframe may be a recovery point (intra refresh: a wave of intra blocks in place of
    keyframes), whose frames are whole only once the wave has crossed the picture, about at
    the next one; decoded from it, a sample came out that late. So where a keyframe decoded
    alone gives no frame, decoding starts at the one before it; in a TS, whose keyframes are
    not decoded to find them, always at the one before. `listing`: where the scan's list of
    packets is written."""
    landed = _packets(path, info, tools, times)
    if len(landed) == len(times) and all(packet.key for packet in landed):
        partial = [packet for packet in landed if not packet.whole]
        # a seek to just before such a keyframe (its decoding time: an index may hold those)
        # lands on the one before
        before = iter(_packets(path, info, tools, [_just_before(p) for p in partial])
                      if partial else [])
        return [_Start(key_s=packet.pts_s, seek_s=t) if packet.whole else
                _Start(key_s=next(before, packet).pts_s, seek_s=max(_just_before(packet), 0.0))
                for packet, t in zip(landed, times, strict=True)]
    keys = _keyframes(path, info, tools, listing)
    starts = []
    for t in times:
        up_to = [packet for packet in keys if packet.pts_s <= t]
        if not up_to:  # none yet (a capture begun mid-GOP): from the start
            starts.append(_Start(key_s=0.0, seek_s=None))
            continue
        key = up_to[-2] if len(up_to) > 1 else up_to[-1]
        seek_s = _just_before(key)
        starts.append(_Start(key_s=key.pts_s, seek_s=seek_s if seek_s > 0 else None))
    return starts


def _just_before(key: _Packet) -> float:
    return round(key.dts_s - _BEFORE_KEYFRAME_S, 3)


@dataclass
class _Packet:
    pts_s: float  # from the start
    dts_s: float
    key: bool
    whole: bool = False  # decoded alone, it gave a frame (asked only after seeks)


def _packets(path: Path, info: MediaInfo, tools: Tools, at: list[float]) -> list[_Packet]:
    """The video stream's first packet after a seek to each time of `at`, each decoded alone."""
    result = tools.run(_packet_probe(path, info, "packet=pts_time,dts_time,flags:frame=pts_time",
                                     "-read_intervals",
                                     ",".join(f"{info.start_s + t:.6f}%+#1" for t in at)),
                       what="ffprobe (keyframes)")
    if result.returncode != 0:
        raise _refusal(result.stderr, path, "ffprobe cannot read its packets")
    packets: list[_Packet] = []
    for line in result.stdout.decode(errors="replace").splitlines():
        if line.startswith("frame,") and packets:
            packets[-1].whole = True
        elif (packet := _packet(line, info)) is not None:
            packets.append(packet)
    return packets


def _keyframes(path: Path, info: MediaInfo, tools: Tools, listing: Path) -> list[_Packet]:
    """The video stream's keyframes, from a read of all its packets. ffprobe writes their list
    to `listing`, read a line at a time: taken whole from its output, the list cost the
    service ~300 bytes per packet, and a TS may have one per 188 bytes (15 MiB for a 9.6 MB
    file, ~7 GiB for a 4 GB one), where a few keyframes are all that is needed."""
    result = tools.run(_packet_probe(path, info, "packet=pts_time,dts_time,flags",
                                     "-o", str(listing)), what="ffprobe (keyframes)")
    if (trouble := _output_error(result.stderr, str(listing))) is not None:
        raise StorageError.from_strerror("list the packets", listing.parent, trouble)
    if result.returncode != 0:
        raise _refusal(result.stderr, path, "ffprobe cannot read its packets")
    try:
        with listing.open(errors="replace") as lines:
            keys = [packet for line in lines
                    if (packet := _packet(line, info)) is not None and packet.key]
    except OSError as exc:
        raise StorageError.from_os_error("list the packets", listing, exc) from exc
    return keys


def _packet_probe(path: Path, info: MediaInfo, entries: str, *options: str) -> list[str]:
    """ffprobe listing `entries` of the video stream's packets as CSV (`_packet` reads them)."""
    return ffprobe_argv(INPUT_LIMITS, path, "-select_streams", str(info.video_stream),
                        "-show_entries", entries, "-of", "csv", *options)


def _packet(line: str, info: MediaInfo) -> _Packet | None:
    """A `packet,PTS,DTS,FLAGS` line of ffprobe's, else None."""
    section, *fields = line.rstrip("\n").split(",")
    if section != "packet" or len(fields) < 3:
        return None
    pts, dts = _number(fields[0]), _number(fields[1])
    pts, dts = (pts if pts is not None else dts), (dts if dts is not None else pts)
    if pts is None or dts is None:
        return None
    return _Packet(pts_s=pts - info.start_s, dts_s=dts - info.start_s,
                   key=fields[2].startswith("K"))


def _runs(times: list[float], starts: list[_Start], *, budget_s: float) -> list[_Run]:
    """The inputs that decode the samples: a sample whose keyframe is not after the sample
    before it is decoded on from that one, in its input; a sample that would take the
    seconds of video decoded past `budget_s` is left out."""
    runs: list[_Run] = []
    spent = 0.0
    for i, (t, start) in enumerate(zip(times, starts, strict=True)):
        last = times[runs[-1].samples[-1]] if runs else None
        follows = last is not None and start.key_s <= last
        cost = t - (last if follows and last is not None else min(start.key_s, t))
        if spent + cost > budget_s:
            continue
        spent += cost
        if follows:
            runs[-1].samples.append(i)
        else:
            runs.append(_Run(start=start, samples=[i]))
    return runs


def _sampling_argv(path: Path, info: MediaInfo, times: list[float], runs: list[_Run],
                   outputs: list[Path], size: tuple[int, int]) -> list[str]:
    """One ffmpeg: an input per run; each sample's frame is the first at or after its time,
    scaled to a grey image of `size`, written to its output."""
    inputs = []
    graph = []
    for number, run in enumerate(runs):
        inputs.append([] if run.start.seek_s is None else ["-ss", f"{run.start.seek_s:.3f}"])
        source = f"[{number}:{info.video_stream}]"
        branches = [source]
        if len(run.samples) > 1:
            branches = [f"[r{number}s{i}]" for i in run.samples]
            graph.append(f"{source}split={len(branches)}{''.join(branches)}")
        origin = run.start.seek_s or 0.0  # the input's time 0
        for branch, i in zip(branches, run.samples, strict=True):
            # a µs early: a frame at the very time is taken, as a seek takes it; and that
            # frame alone: the frames after it, passed on to be dropped at the output, were
            # each scaled (a sample of 1280x720 frames took 2.2 s for 24 samples, 0.4 s so)
            graph.append(f"{branch}select=gte(t\\,{times[i] - origin - 1e-6:.6f})"
                         "*eq(selected_n\\,0),"
                         f"scale={size[0]}:{size[1]}:flags=area,format=gray[f{i}]")
    outputs_argv = ["-filter_complex", ";".join(graph)]
    for run in runs:
        for i in run.samples:
            outputs_argv += ["-map", f"[f{i}]", "-frames:v", "1", "-f", "rawvideo",
                             str(outputs[i])]
    return ffmpeg_argv(INPUT_LIMITS, path, inputs, outputs_argv)


def _output_error(stderr: bytes, frames_dir: str) -> str | None:
    """Why ffmpeg could not write a frame, if it says so: the end of a line naming one of
    the outputs ('Error writing trailer of DIR/0.gray: No space left on device'). It exits 0
    all the same, and such a frame would look undecodable."""
    for line in stderr.decode(errors="replace").splitlines():
        if frames_dir in line:
            return line.rpartition(": ")[2].strip() or line.strip()
    return None


def _frame(raw: Path, frame_bytes: int) -> bytes | None:
    """The frame ffmpeg wrote to `raw`, if it did."""
    data = raw.read_bytes() if raw.exists() else b""
    return data if len(data) == frame_bytes else None


def _frame_hash(frame: bytes) -> int:
    image = Image.frombytes("L", (FRAME_SIZE, FRAME_SIZE), frame)
    return int(str(imagehash.phash(image)), 16)


# What every frame of one shade of grey hashes to: 0 if black (its DCT is all zero), the DC bit
# alone otherwise. Two such frames look alike in any two videos (black videos carrying other
# sound, fades, blank cards, a colour gradient of even brightness), so they are not compared.
# A frame with any structure hashes to neither (32 of its 63 low-frequency DCT terms would have
# to be equal), so hashes stored before this rule need no mark: theirs are known by value too.
UNIFORM_FRAMES = (0, 1 << 63)
# The fewest frame pairs compared for two videos to match: fewer say too little (an otherwise
# black video whose one sampled picture is a common end card).
MIN_COMPARED = FRAMES // 2


def frame_distances(a: PerceptualHash, b: PerceptualHash) -> list[int]:
    """Hamming distance at each position compared: where both have a frame and they are not
    both uniform."""
    return [(x ^ y).bit_count() for x, y in zip(a, b, strict=False)
            if x is not None and y is not None
            and not (x in UNIFORM_FRAMES and y in UNIFORM_FRAMES)]


# How far apart two durations of one video may be: this or this fraction of the longer,
# whichever is more. Re-encodes, remuxes and other frame rates measured 0-0.13 s apart; the
# same frames sped up, or a part of them, are not one video.
DURATION_SLACK_S = 0.5
DURATION_SLACK = 0.005


def durations_alike(a_s: float, b_s: float) -> bool:
    return abs(a_s - b_s) <= max(DURATION_SLACK_S, DURATION_SLACK * max(a_s, b_s))


def near_duplicate(a: PerceptualHash, a_duration_s: float, b: PerceptualHash,
                   b_duration_s: float, threshold: int) -> int | None:
    """The distance of two videos (the mean of `frame_distances`, 0-64, rounded) if they count
    as the same video, else None. They do if their durations are alike, at least MIN_COMPARED
    positions are compared, the mean is at most `threshold` and no position is more than
    twice `threshold` apart: a mean alone let 2 frames of 8 differ entirely (videos sharing
    their first 9 s of 12 measured 9)."""
    distances = frame_distances(a, b)
    if len(distances) < MIN_COMPARED or not durations_alike(a_duration_s, b_duration_s):
        return None
    distance = round(sum(distances) / len(distances))
    if distance > threshold or max(distances) > 2 * threshold:
        return None
    return distance


def encode_phash(value: PerceptualHash) -> str:
    return ",".join("-" if h is None else f"{h:016x}" for h in value)


def decode_phash(text: str) -> PerceptualHash:
    return tuple(None if part == "-" else int(part, 16) for part in text.split(","))
