"""The frame check's figures (docs/service.md, "Frame check") on a corpus of slides made here.

Each slide (6 s, 25 fps, x264) is paired with: the same slide with a number and with a word
changed; its re-uploads, plain (7 ways) and with a watermark (4 kinds, each 4 ways); and a
re-upload at half its size and 150 kb/s against each changed slide (the closest call: a
changed digit of 24-px type). Every pair is compared as ingest compares a candidate
(`frame_check.size`, `still_frames`, `difference`, no server), and the figures are printed per
kind of pair: the range of differences, how many are stored apart at the threshold (a
difference above it) and at another one given, and the fewest positions judged.

    .venv/bin/python -m bench.frame_check_corpus [--out DIR] [--slides NAME ...] [--against 28]

The videos are made once into DIR (kept, so a second run only compares); fonts-dejavu-core.
The whole corpus (7 slides, 189 pairs) took 21 minutes on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vidcache import frame_check, media
from vidcache.tools import Tools

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
X264 = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
LINES = ("Quarterly results 2023", "Revenue grew by 12 percent", "Costs fell in every region")
CHANGED = {"number": ("Quarterly results 2024", *LINES[1:]),
           "word": (*LINES[:2], "Costs rose in every region")}


@dataclass(frozen=True)
class Slide:
    name: str
    width: int
    height: int
    gradient: bool  # else white
    type_px: int


SLIDES = [Slide("w1080-24", 1920, 1080, False, 24), Slide("g1080-36", 1920, 1080, True, 36),
          Slide("w720-24", 1280, 720, False, 24), Slide("g720-36", 1280, 720, True, 36),
          Slide("w720-48", 1280, 720, False, 48), Slide("w360-24", 640, 360, False, 24),
          Slide("g360-24", 640, 360, True, 24)]

# name -> (at half the size, the encoder's arguments)
REUPLOADS: dict[str, tuple[bool, list[str]]] = {
    "crf23": (False, X264),
    "crf35": (False, [*X264, "-crf", "35"]),
    "half150k": (True, [*X264, "-b:v", "150k"]),
    "own150k": (False, [*X264, "-b:v", "150k"]),
    "vp9": (False, ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                    "-b:v", "0", "-crf", "40"]),
    "mpeg4": (False, ["-c:v", "mpeg4", "-q:v", "5"]),
    "15fps": (False, [*X264, "-r", "15"]),
}
WATERMARKED_REUPLOADS = ("crf23", "crf35", "half150k", "vp9")


def watermarks(slide: Slide) -> dict[str, str]:
    """name -> the filter a re-uploader adds a mark with."""
    small = max(10, slide.height // 40)
    tenth_w, tenth_h = slide.width // 10, slide.height // 10
    return {
        "logo 48x24, opaque, top right":
            "drawbox=x=w-64:y=16:w=48:h=24:color=0xd02020:t=fill,"
            f"drawtext=fontfile={FONT}:text='TV':fontsize=16:fontcolor=white:x=w-56:y=20",
        "box of a tenth, 35% opaque, bottom left":
            f"drawbox=x=16:y=h-{tenth_h}-16:w={tenth_w}:h={tenth_h}:color=0x2040c0@0.35:t=fill",
        "channel name, 1/40 of the height, 50% opaque, bottom right":
            f"drawtext=fontfile={FONT}:text='@slides_channel':fontsize={small}:"
            f"fontcolor=black@0.5:x=w-tw-{small}:y=h-th-{small}",
        "'SAMPLE', 1/6 of the height, 15% opaque, across the middle":
            f"drawtext=fontfile={FONT}:text='SAMPLE':fontsize={slide.height // 6}:"
            "fontcolor=gray@0.15:x=(w-tw)/2:y=(h-th)/2",
    }


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-threads", "1", *args], check=True)


def _source(slide: Slide, out: Path) -> list[str]:
    size = f"{slide.width}x{slide.height}"
    if not slide.gradient:
        return ["-f", "lavfi", "-i", f"color=c=white:s={size}:r=25:d=6"]
    # one picture looped: geq on every frame of 1080p takes minutes
    picture = out / f"gradient-{size}.png"
    if not picture.exists():
        _ffmpeg("-f", "lavfi", "-i", f"color=c=white:s={size}:d=1,format=rgb24,"
                "geq=r='240-80*X/W':g='240-60*Y/H':b='250'", "-frames:v", "1", str(picture))
    return ["-loop", "1", "-framerate", "25", "-t", "6", "-i", str(picture)]


def _text(slide: Slide, lines: tuple[str, ...]) -> str:
    step = int(slide.type_px * 1.7)
    return ",".join(f"drawtext=fontfile={FONT}:text='{line}':fontsize={slide.type_px}:x=100:"
                    f"y={slide.height // 8 + step * i}" for i, line in enumerate(lines))


def _make(job: tuple[list[str], Path]) -> None:
    args, path = job
    if not path.exists():
        _ffmpeg(*args, str(path))


def corpus(slides: list[Slide], out: Path) -> list[tuple[str, Path, Path]]:
    """Make the videos of `slides` into `out` (those not there yet); (kind, a, b) of each
    pair."""
    firsts: list[tuple[list[str], Path]] = []
    seconds: list[tuple[list[str], Path]] = []
    pairs: list[tuple[str, Path, Path]] = []
    for slide in slides:
        original = out / f"{slide.name}.mp4"
        half = f"scale={slide.width // 2}:{slide.height // 2}"
        firsts.append(([*_source(slide, out), "-vf", _text(slide, LINES), *X264], original))
        for change, lines in CHANGED.items():
            changed = out / f"{slide.name}-{change}.mp4"
            firsts.append(([*_source(slide, out), "-vf", _text(slide, lines), *X264], changed))
            pairs.append((f"{change} changed", original, changed))
            pairs.append((f"half-size 150 kb/s re-upload, {change} changed",
                          out / f"{slide.name}-re-half150k.mp4", changed))
        for way, (halved, encoder) in REUPLOADS.items():
            reupload = out / f"{slide.name}-re-{way}.mp4"
            seconds.append((["-i", str(original), *(["-vf", half] if halved else []),
                             *encoder], reupload))
            pairs.append(("re-upload", original, reupload))
        for number, (mark, graph) in enumerate(watermarks(slide).items()):
            for way in WATERMARKED_REUPLOADS:
                halved, encoder = REUPLOADS[way]
                reupload = out / f"{slide.name}-mark{number}-{way}.mp4"
                seconds.append((["-i", str(original), "-vf",
                                 f"{graph},{half}" if halved else graph, *encoder], reupload))
                pairs.append((f"re-upload with {mark}", original, reupload))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(_make, firsts))
        list(pool.map(_make, seconds))
    return pairs


def measure(pairs: list[tuple[str, Path, Path]]) -> dict[str, list[tuple[float | None, int]]]:
    """kind -> (difference, positions judged) of each of its pairs."""
    tools = Tools(timeout=300)
    infos: dict[Path, media.MediaInfo] = {}
    still: dict[tuple[Path, tuple[int, int]], list[frame_check.Frame | None]] = {}
    figures: dict[str, list[tuple[float | None, int]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="frame-check-") as work:

        def frames(path: Path, at: tuple[int, int]) -> list[frame_check.Frame | None]:
            if (path, at) not in still:
                still[path, at] = frame_check.still_frames(path, infos[path], tools, at,
                                                           work_dir=Path(work))
            return still[path, at]

        for kind, a, b in pairs:
            for path in (a, b):
                if path not in infos:
                    infos[path] = media.probe(path, tools)
            at = frame_check.size(infos[a], infos[b])
            ours, theirs = frames(a, at), frames(b, at)
            judged = sum(x is not None and y is not None
                         for x, y in zip(ours, theirs, strict=True))
            figures[kind].append((frame_check.difference(ours, theirs), judged))
    return figures


def report(figures: dict[str, list[tuple[float | None, int]]], against: float) -> str:
    threshold = frame_check.THRESHOLD
    rows = [f"| pair | largest difference | apart at {threshold:g} | apart at {against:g} "
            "| fewest positions judged |", "| --- | --- | --- | --- | --- |"]
    for kind, results in figures.items():
        differences = [d for d, _ in results if d is not None]
        unjudged = len(results) - len(differences)
        span = f"{min(differences):.1f}-{max(differences):.1f}" if differences else "-"
        if unjudged:
            span += f" ({unjudged} not judged)"
        rows.append(f"| {kind} ({len(results)}) | {span} "
                    f"| {sum(d > threshold for d in differences)} "
                    f"| {sum(d > against for d in differences)} "
                    f"| {min(judged for _, judged in results)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results/frame-check"),
                        help="where the videos are made and kept")
    parser.add_argument("--slides", nargs="+", choices=[s.name for s in SLIDES],
                        help="only these slides (default: all)")
    parser.add_argument("--against", type=float, default=28.0,
                        help="another threshold to count the pairs stored apart at")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    slides = [s for s in SLIDES if args.slides is None or s.name in args.slides]
    print(report(measure(corpus(slides, args.out)), args.against))


if __name__ == "__main__":
    main()
