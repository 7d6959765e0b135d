"""A closer look at two videos whose frame hashes match (media.near_duplicate), for ingest to
tell apart still pictures that differ in a detail: slides differing by a word, a number or a
line. A 64-bit hash of a 32x32 image cannot see a word, and a false match loses a video.

Each video's frames at each of its sample times (media.sample_times) and AROUND_S before and
after are decoded at the size of the smaller of the two (at most MAX_PIXELS, keeping its
shape), grey, blurred by a pixel (codecs' ringing around text). Two frames differ by their
largest 8-px block (at a 4-px stride) of mean absolute difference, in grey levels, once the
first's brightness and contrast are fitted to the second's. A position is judged only where
both videos are still: the frames before and after within STILL of the one at the time.
Moving footage never is: its samples in a re-upload at another frame rate are other moments
(the best match among nearby frames was measured and left: a re-upload at 150 kb/s came
within 2x of a changed caption). Two videos differ if their frames at the time of a judged
position differ by more than THRESHOLD.

Measured (docs/service.md, "Frame check"): slides' re-uploads (another size at 150 kb/s, VP9,
MPEG-4, 15-30 fps, CRF 35, 150 kb/s at their size) 1.0-11.7, slides with a word, a number or a
line changed 74.5 and more, but a slide's re-upload at half its size and 150 kb/s against the
slide with a word changed (24-px type) 25.1-29.1; re-uploads with a watermark 7.9-170 (93 of
112 apart); slides' frames were within 5.2 of still (their re-uploads' up to 29, those
positions not judged), moving footage's 16.4 and more.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from vidcache import media
from vidcache.errors import MediaToolError
from vidcache.tools import Tools

AROUND_S = 0.2
BLOCK = 8
# a 1080p frame: a larger video's frames are compared at this many pixels
MAX_PIXELS = 1920 * 1080
# how far the frames before and after may be from the one at the time for a position to be
# still: slides' measured up to 5.2, moving footage's 16.4 and more
STILL = 8.0
# the most a judged position of a re-upload may differ: re-uploads of slides measured up to
# 11.7, a half-size 150 kb/s re-upload of a slide against the slide with a word changed 25.1
# and more (at 28, a re-upload of a 2023 slide was merged with the 2024 one)
THRESHOLD = 18.0

Frame = npt.NDArray[np.uint8]  # grey, blurred


def size(a: media.MediaInfo, b: media.MediaInfo) -> tuple[int, int]:
    """The size two videos are compared at: the smaller one's, at most MAX_PIXELS. A size
    media.probe could not find (0x0) is not the smaller: at it, the frames were compared at
    8x8, where a word is unseen. MediaToolError if neither is known: the check cannot be
    made."""
    known = [s for s in (a.size, b.size) if s[0] * s[1] > 0]
    if not known:
        raise MediaToolError("the size of neither video's frames is known")
    width, height = min(known, key=lambda s: s[0] * s[1])
    scale = min(1.0, math.sqrt(MAX_PIXELS / max(width * height, 1)))
    return max(BLOCK, round(width * scale)), max(BLOCK, round(height * scale))


def still_frames(path: Path, info: media.MediaInfo, tools: Tools, at: tuple[int, int], *,
                 work_dir: Path) -> list[Frame | None]:
    """At each of the video's sample times, its frame then, of size `at`, ready to be
    compared, if the video is still there (its frames AROUND_S before and after, within the
    sample's slice of a short video, within STILL of it); None where it is not, or where any
    of the three was not decoded. Only those are kept: a 1080p video's 24 frames would hold
    200 MB as numbers."""
    around = min(AROUND_S, info.duration_s / (2 * media.FRAMES))
    # the frame after no later than `around` before the end, where there is none: a video
    # under 3.2 s, whose last sample's slice ends there, had none for its last sample
    times = [round(time, 3) for t in media.sample_times(info)
             for time in (t - around, t, max(t, min(t + around, info.duration_s - around)))]
    frames = media.sample_frames(path, info, tools, times, at, work_dir=work_dir)
    still: list[Frame | None] = []
    for before, then, after in zip(frames[0::3], frames[1::3], frames[2::3], strict=True):
        if before is None or then is None or after is None:
            still.append(None)
            continue
        frame = _prepared(then, at)
        still.append(frame if all(_frame_difference(frame, _prepared(other, at)) <= STILL
                                  for other in (before, after)) else None)
    return still


def difference(a: list[Frame | None], b: list[Frame | None]) -> float | None:
    """How far apart the videos of still frames `a` and `b` are: the largest difference of
    their frames at a position both are still at, None if there is none."""
    judged = [_frame_difference(x, y) for x, y in zip(a, b, strict=True)
              if x is not None and y is not None]
    return max(judged, default=None)


def _prepared(frame: bytes, at: tuple[int, int]) -> Frame:
    image = Image.frombytes("L", at, frame).filter(ImageFilter.GaussianBlur(1))
    return np.asarray(image, dtype=np.uint8)


def _frame_difference(x: Frame, y: Frame) -> float:
    """The largest mean absolute difference of a BLOCK-px block (at a stride of half that) of
    `y` and `x`, `x`'s brightness and contrast fitted to `y`'s by least squares."""
    x, y = x.astype(np.float32), y.astype(np.float32)
    x_mean, y_mean = float(x.mean()), float(y.mean())
    x_centred = x - x_mean
    variance = float((x_centred * x_centred).mean())
    gain = float((x_centred * (y - y_mean)).mean()) / variance if variance > 1e-6 else 1.0
    error = np.abs(y - (x_centred * gain + y_mean))
    half = BLOCK // 2
    height, width = error.shape[0] // half * half, error.shape[1] // half * half
    quarters = error[:height, :width].reshape(height // half, half, width // half, half) \
        .sum(axis=(1, 3))
    blocks = quarters[:-1, :-1] + quarters[1:, :-1] + quarters[:-1, 1:] + quarters[1:, 1:]
    return float(blocks.max()) / (BLOCK * BLOCK) if blocks.size else 0.0
