"""What a video sounds like, for ingest to tell apart videos whose frames match
(media.near_duplicate) but whose sound differs: one cover picture over other music, the same
slides with another narration. The frame hash cannot hear them, and a false match loses a
video.

ffmpeg decodes a few windows of the audio (the whole of it up to WINDOWS * WINDOW_S seconds,
else WINDOWS windows of WINDOW_S seconds at the middle of each equal slice; input-side seeks,
so the cost does not grow with the video's length) to mono 8 kHz PCM. Each 128 ms frame, every
32 ms, becomes how its spectrum's magnitude is spread over BANDS log-spaced bands (20 Hz-4 kHz),
summing to 1, so the volume does not count; a frame about SILENT_DBFS or below is silence, a
band of its own. Two windows are compared frame by frame at the best of the offsets up to
MAX_OFFSET and to 1/OFFSET_SHARE of a short window's frames (codecs delay the sound by a few
ms, and a seek lands on a frame of audio); a frame's distance is the total variation of the
two spreads (0 alike - 1 disjoint, sound against silence 1), a window's the mean over its
frames, two videos' the largest of their windows'.

Measured on generated clips (docs/service.md, "Audio check"): re-uploads (AAC, MP3, Opus, AC-3,
Vorbis; 22-48 kHz; mono; ±3 dB) 0-0.09, other melodies, tones and noises from 0.11 up.
Chromaprint (ffmpeg's fingerprint muxer) was measured too and left: two tones an octave apart
were 0 bits in 100 apart, a tone and silence 6, pink and brown noise 9, re-uploads up to 10 (its
features are the spectrum folded onto one octave and their changes over time, so steady sounds
look alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vidcache.errors import MediaToolError
from vidcache.media import INPUT_LIMITS, last_error_line
from vidcache.tools import Tools, ffmpeg_argv

RATE = 8000
FRAME = 1024
HOP = 256
BANDS = 32
# silence from SILENT_DBFS - SILENCE_RAMP_DB / 2 down, sound from as much up, a mix between:
# a frame at a sound's edge measures a few dB apart in two encodes
SILENT_DBFS = -60.0
SILENCE_RAMP_DB = 20.0
MAX_OFFSET = 16  # frames: 0.5 s
OFFSET_SHARE = 8  # and at most this share of a window's frames
WINDOWS = 4
WINDOW_S = 8.0
# the largest distance of two videos with the same sound: re-uploads measured up to 0.07,
# 0.09 for noise through Opus at 24 kb/s; other sound from 0.11 (two white noises), 0.14
# (pink and brown noise), 0.47 (melodies, narrations)
THRESHOLD = 0.10

_EDGES = np.concatenate([[20.0], np.geomspace(150.0, 3800.0, BANDS - 1), [RATE / 2 + 1]])
# bins x BANDS: 1 where a bin lies in a band (bins below 20 Hz in none)
_BAND_OF_BIN = (np.digitize(np.fft.rfftfreq(FRAME, 1 / RATE), _EDGES) - 1)[:, None] \
    == np.arange(BANDS)[None, :]
_WINDOW = np.hanning(FRAME)
# a frame's mean square from its one-sided power spectrum (Parseval, with the window's power)
_POWER_SCALE = 2.0 / (FRAME * float(np.sum(_WINDOW ** 2)))

# Each window's frames: BANDS spreads and a last column, 1 for silence.
Window = npt.NDArray[np.float64]


@dataclass(frozen=True)
class AudioPrint:
    windows: tuple[Window, ...]


def windows(a_duration_s: float, b_duration_s: float) -> tuple[tuple[float, float], ...]:
    """(start, seconds) of each window two videos are compared over, placed on the shorter
    one, so both are sampled at the same times."""
    shorter = min(a_duration_s, b_duration_s)
    if shorter <= WINDOWS * WINDOW_S:
        return ((0.0, shorter),)
    return tuple((shorter * (i + 0.5) / WINDOWS - WINDOW_S / 2, WINDOW_S)
                 for i in range(WINDOWS))


def fingerprint(path: Path, stream: int, times: tuple[tuple[float, float], ...],
                tools: Tools) -> AudioPrint:
    """The print of audio stream `stream` of `path` over `times`; MediaToolError if ffmpeg
    cannot decode it."""
    prints = []
    for start, seconds in times:
        argv = ffmpeg_argv(INPUT_LIMITS, path, [["-ss", f"{start:.3f}", "-t", f"{seconds:.3f}"]],
                           ["-map", f"0:{stream}", "-ac", "1", "-ar", str(RATE), "-f", "s16le",
                            "-"])
        result = tools.run(argv, what="ffmpeg (audio sampling)")
        if result.returncode != 0:
            raise MediaToolError("ffmpeg cannot decode the audio "
                                 f"({last_error_line(result.stderr, path)})")
        pcm = np.frombuffer(result.stdout[: len(result.stdout) // 2 * 2], dtype="<i2")
        prints.append(_spreads(pcm.astype(np.float64) / 32768))
    return AudioPrint(tuple(prints))


def _spreads(samples: npt.NDArray[np.float64]) -> Window:
    count = max(0, 1 + (len(samples) - FRAME) // HOP)
    frames = samples[np.arange(FRAME)[None, :] + HOP * np.arange(count)[:, None]]
    bands = (np.abs(np.fft.rfft(frames * _WINDOW, axis=1)) ** 2) @ _BAND_OF_BIN
    level_dbfs = 10 * np.log10(bands.sum(axis=1) * _POWER_SCALE + 1e-30)
    silence = np.clip((SILENT_DBFS - level_dbfs) / SILENCE_RAMP_DB + 0.5, 0.0, 1.0)
    magnitude = np.sqrt(bands)
    total = magnitude.sum(axis=1, keepdims=True)
    spread = np.zeros((count, BANDS + 1))
    spread[:, :BANDS] = (1 - silence[:, None]) * magnitude / np.where(total > 0, total, 1.0)
    spread[:, BANDS] = silence
    return spread


def distance(a: AudioPrint, b: AudioPrint) -> float:
    """0 (the same sound) to 1: the largest of the windows' distances."""
    return max(_window_distance(x, y) for x, y in zip(a.windows, b.windows, strict=True))


def _window_distance(x: Window, y: Window) -> float:
    # audio that ends sooner in one is silence there
    length = max(len(x), len(y))
    if not length:
        return 0.0
    x, y = _padded(x, length), _padded(y, length)
    # within an eighth of a short window (a clip of a few seconds) too: the frames an offset
    # leaves out are not compared, and two 2 s clips chiming at opposite ends measured 0 at
    # 0.5 s, the silence between the chimes all that was left
    reach = min(MAX_OFFSET, length // OFFSET_SHARE)
    best = 1.0
    for offset in range(-reach, reach + 1):
        u, v = x[max(offset, 0):], y[max(-offset, 0):]
        overlap = length - abs(offset)
        best = min(best, float(0.5 * np.abs(u[:overlap] - v[:overlap]).sum(axis=1).mean()))
    return best


def _padded(window: Window, length: int) -> Window:
    silence = np.zeros((length - len(window), BANDS + 1))
    silence[:, BANDS] = 1.0
    return np.concatenate([window, silence])
