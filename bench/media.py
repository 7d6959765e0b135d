"""The benchmark's test videos, generated with ffmpeg once and cached.

Every video comes from a different lavfi source so that each one is perceptually distinct (the
service folds near-duplicates into one stored video). Temporal noise on top makes the encoder
spend real bits, so sizes and bitrates are those of camera footage, not of flat test cards.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_NOISE = "noise=alls=40:allf=t"


@dataclass(frozen=True, kw_only=True)
class VideoSpec:
    name: str
    source: str  # lavfi video source name
    size: str
    seconds: float
    video_args: tuple[str, ...]
    with_audio: bool = False
    faststart: bool = False
    min_bytes: int = 0  # a workload depends on at least this much data

    def argv(self, out: Path) -> list[str]:
        argv = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi",
                "-i", f"{self.source}=size={self.size}:rate=25"]
        if self.with_audio:
            argv += ["-f", "lavfi", "-i", "sine=frequency=440", "-c:a", "aac", "-b:a", "128k"]
        # -t after the inputs is an output option: it bounds the (endless) lavfi sources.
        argv += ["-t", str(self.seconds), "-vf", _NOISE, "-pix_fmt", "yuv420p",
                 *self.video_args]
        if self.faststart:
            argv += ["-movflags", "+faststart"]
        return [*argv, "-f", "mp4", str(out)]


# Near-lossless ultrafast x264 of a noisy source: ~35 MB per second of 720p, cheap to encode.
_BULK = ("-c:v", "libx264", "-preset", "ultrafast", "-qp", "6")
# A 20 Mb/s stream with a 2 s GOP (keyint 50 at 25 fps), what streaming encoders produce.
_STREAM_20M = ("-c:v", "libx264", "-preset", "ultrafast", "-b:v", "20M", "-maxrate", "20M",
               "-bufsize", "20M", "-g", "50", "-keyint_min", "50", "-sc_threshold", "0")
_READER_SOURCES = ("cellauto", "life", "gradients", "rgbtestsrc", "sierpinski",
                   "colorspectrum", "mandelbrot", "yuvtestsrc")


@dataclass(frozen=True)
class Corpus:
    """Which generated file plays which role in the workloads."""

    sequential: VideoSpec  # the large file read end to end
    probe_faststart: VideoSpec  # 20 Mb/s, moov atom first
    probe_moov_end: VideoSpec  # 20 Mb/s, moov atom last
    readers: tuple[VideoSpec, ...]  # one per concurrent reader

    def all(self) -> list[VideoSpec]:
        return [self.sequential, self.probe_faststart, self.probe_moov_end, *self.readers]


def corpus(*, quick: bool) -> Corpus:
    if quick:
        return Corpus(
            sequential=VideoSpec(name="seq.mp4", source="testsrc", size="640x360",
                                 seconds=1, video_args=_BULK, min_bytes=4 << 20),
            probe_faststart=VideoSpec(name="probe_faststart.mp4", source="testsrc2",
                                      size="640x360", seconds=4, video_args=_STREAM_20M,
                                      with_audio=True, faststart=True),
            probe_moov_end=VideoSpec(name="probe_moov_end.mp4", source="smptehdbars",
                                     size="640x360", seconds=4, video_args=_STREAM_20M,
                                     with_audio=True),
            readers=tuple(VideoSpec(name=f"reader{i}.mp4", source=source, size="320x180",
                                    seconds=0.5, video_args=_BULK)
                          for i, source in enumerate(_READER_SOURCES[:2])),
        )
    return Corpus(
        sequential=VideoSpec(name="seq.mp4", source="testsrc", size="1280x720", seconds=9,
                             video_args=_BULK, min_bytes=256 << 20),
        probe_faststart=VideoSpec(name="probe_faststart.mp4", source="testsrc2",
                                  size="1280x720", seconds=40, video_args=_STREAM_20M,
                                  with_audio=True, faststart=True),
        probe_moov_end=VideoSpec(name="probe_moov_end.mp4", source="smptehdbars",
                                 size="1280x720", seconds=40, video_args=_STREAM_20M,
                                 with_audio=True),
        readers=tuple(VideoSpec(name=f"reader{i}.mp4", source=source, size="640x360",
                                seconds=4, video_args=_BULK)
                      for i, source in enumerate(_READER_SOURCES)),
    )


def generate(spec: VideoSpec, directory: Path) -> Path:
    """The video for `spec` in `directory`, encoded now unless an earlier run left it there."""
    path = directory / spec.name
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{spec.name}.partial"
    subprocess.run(spec.argv(partial), check=True, timeout=600)
    size = partial.stat().st_size
    if size < spec.min_bytes:
        partial.unlink()
        raise RuntimeError(f"{spec.name}: ffmpeg made {size} bytes, the workload needs "
                           f">= {spec.min_bytes}; raise its duration in bench/media.py")
    partial.rename(path)
    return path
