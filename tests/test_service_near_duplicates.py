"""Videos that only look alike to the perceptual hash are stored apart, through a real service
and a loopback origin: a false match loses a video (its bytes dropped, its URL an alias of
another). Each pair here was merged before (docs/service.md, "Perceptual hash"); a re-encode
still is."""

from __future__ import annotations

import shutil
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


def _still(picture: str, sound: str) -> list[str]:
    """8 s of one picture (a music track's cover, a slide) over 8 s of `sound`, in AAC."""
    return ["-f", "lavfi", "-i", f"{picture}={_SIZE}:d=8", "-f", "lavfi", "-i", sound,
            *_X264, "-c:a", "aac", "-shortest"]


def _melody(step: int, start: int) -> str:
    """A note every third of a second, `step` semitones on from the last (mod an octave)."""
    pitch = f"220*pow(2\\,mod(floor(t*3)*{step}+{start}\\,12)/12)"
    return f"aevalsrc=0.4*sin(2*PI*t*{pitch}):s=44100:d=8"


def _speech(rhythm: float, seed: int) -> str:
    """Pink noise in bursts: a narration's rhythm."""
    return (f"anoisesrc=c=pink:seed={seed}:r=44100:a=0.5:d=8,"
            f"volume='gt(sin(2*PI*t*{rhythm})\\,0)':eval=frame")


def _chime(tone: int, when: str) -> list[str]:
    """2 s of one picture, a tone of `tone` Hz sounding where `when` (of t) holds."""
    return ["-f", "lavfi", "-i", f"smptehdbars={_SIZE}:d=2", "-f", "lavfi", "-i",
            f"aevalsrc=0.4*sin(2*PI*{tone}*t)*{when}:s=44100:d=2", *_X264, "-c:a", "aac",
            "-shortest"]


# fonts-dejavu-core (scripts/setup --tests)
_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
_SLIDE_LINES = ("Quarterly results 2023", "Revenue grew by 12 percent",
                "Costs fell in every region")
_REPORT_LINES = ("Annual report 2023", "Sales rose by 8 percent", "Staff grew in every office")


def _slide(*lines: str) -> list[str]:
    """6 s of a 1280x720 slide of `lines` in 24-px type."""
    text = ",".join(f"drawtext=fontfile={_FONT}:text='{line}':fontsize=24:x=100:y={90 + 40 * i}"
                    for i, line in enumerate(lines))
    return ["-f", "lavfi", "-i", "color=c=white:s=1280x720:r=25:d=6", "-vf", text, *_X264]


def _ending(year: str) -> list[str]:
    """2 s of a 1280x720 slide whose last quarter second adds a line naming `year`."""
    text = (f"drawtext=fontfile={_FONT}:text='Quarterly results':fontsize=24:x=100:y=90,"
            f"drawtext=fontfile={_FONT}:text='See you in {year}':fontsize=24:x=100:y=130"
            ":enable=gte(t\\,1.75)")
    return ["-f", "lavfi", "-i", "color=c=white:s=1280x720:r=25:d=2", "-vf", text, *_X264]


def _capture(year: str) -> list[str]:
    """40 s of a 1280x720 slide naming `year`, at 5 fps in 10 s GOPs, in an MPEG-TS."""
    text = f"drawtext=fontfile={_FONT}:text='Quarterly results {year}':fontsize=24:x=100:y=90"
    return ["-f", "lavfi", "-i", "color=c=white:s=1280x720:r=5:d=40", "-vf", text, *_X264,
            "-g", "50", "-f", "mpegts"]


# a capture's first second cut off, mid-GOP: its size, in the parameter sets of its first
# keyframe 9 s on, is past what ffprobe looks at (it says 0x0)
_CUT = ["-ss", "1", "-c", "copy", "-copyinkf"]


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
    # the same frames, their times 5 s on: an MP4 with an empty edit first, an MKV whose
    # segment begins 5 s before its first frame
    **{f"mandelbrot-offset.{ext}": ["-i", "{dir}/mandelbrot.mp4", "-c", "copy",
                                    "-output_ts_offset", "5"] for ext in ("mp4", "mkv")},
    # and a WMV (an ASF's duration counts from 0 too), re-encoded: ASF takes no H.264 copy
    "mandelbrot-offset.wmv": ["-i", "{dir}/mandelbrot.mp4", "-c:v", "wmv2", "-q:v", "2",
                              "-output_ts_offset", "5"],
    # the same 7 s, then 1 s of something else each: 7 of the 8 samples alike
    "intro-life.mp4": _concat((_TESTSRC, 7), (_LIFE, 1)),
    "intro-cells.mp4": _concat((_TESTSRC, 7), (f"cellauto={_SIZE}:rule=30:seed=5", 1)),
    # one cover picture over two melodies of the same length, and a re-upload of each: smaller
    # at 100 kb/s with Opus at 32 kb/s in MKV; MP3 at 64 kb/s, 22 kHz, 2 dB quieter
    "cover-a.mp4": _still("smptebars", _melody(7, 3)),
    "cover-b.mp4": _still("smptebars", _melody(5, 1)),
    "cover-b-opus.mkv": ["-i", "{dir}/cover-b.mp4", "-vf", "scale=120:90", *_X264,
                         "-b:v", "100k", "-c:a", "libopus", "-b:a", "32k"],
    "cover-a-mp3.mkv": ["-i", "{dir}/cover-a.mp4", "-c:v", "copy", "-af", "volume=0.8",
                        "-c:a", "libmp3lame", "-b:a", "64k", "-ar", "22050"],
    # one slide over two narrations, and one of them re-encoded to Opus at 24 kb/s
    "slide-a.mp4": _still("rgbtestsrc", _speech(1.3, 1)),
    "slide-b.mp4": _still("rgbtestsrc", _speech(1.7, 2)),
    "slide-b-opus.mkv": ["-i", "{dir}/slide-b.mp4", "-c:v", "copy", "-c:a", "libopus",
                         "-b:a", "24k"],
    # 2 s of one picture: a chime in its first half second, another at its end; a re-upload
    # of the first in MP3
    "chime-start.mp4": _chime(880, "lt(t\\,0.5)"),
    "chime-end.mp4": _chime(1320, "gt(t\\,1.5)"),
    "chime-start-mp3.mkv": ["-i", "{dir}/chime-start.mp4", "-c:v", "copy",
                            "-c:a", "libmp3lame", "-b:a", "64k"],
    # a slide, the same with another year, and a re-upload of the first: half the size at
    # 150 kb/s
    "slide-2023.mp4": _slide(*_SLIDE_LINES),
    "slide-2024.mp4": _slide("Quarterly results 2024", *_SLIDE_LINES[1:]),
    "slide-2023-small.mp4": ["-i", "{dir}/slide-2023.mp4", "-vf", "scale=640:360", *_X264,
                             "-b:v", "150k"],
    # another slide, the same with another year, and a re-upload of the first at half the size
    "report-2023.mp4": _slide(*_REPORT_LINES),
    "report-2024.mp4": _slide("Annual report 2024", *_REPORT_LINES[1:]),
    "report-2023-small.mp4": ["-i", "{dir}/report-2023.mp4", "-vf", "scale=640:360", *_X264,
                              "-b:v", "150k"],
    # two short clips differing in their last eighth only, and a re-encode of the first
    "ending-2023.mp4": _ending("2023"),
    "ending-2024.mp4": _ending("2024"),
    "ending-2023-crf35.mp4": ["-i", "{dir}/ending-2023.mp4", *_X264, "-crf", "35"],
    # captures of a slide and of the same with another year, begun mid-GOP, and a re-upload
    # of the first at half its size and 150 kb/s (its first frame repeated from its start)
    "capture-2023-whole.ts": _capture("2023"),
    "capture-2024-whole.ts": _capture("2024"),
    "capture-2023.ts": ["-i", "{dir}/capture-2023-whole.ts", *_CUT],
    "capture-2024.ts": ["-i", "{dir}/capture-2024-whole.ts", *_CUT],
    "capture-2023-small.mp4": ["-i", "{dir}/capture-2023.ts", "-vf", "scale=640:360",
                               "-fps_mode", "cfr", *_X264, "-b:v", "150k"],
    # moving footage and its re-encode at 15 fps: its samples are other moments
    "testsrc.mp4": ["-f", "lavfi", "-i", "testsrc2=s=320x240:r=25:d=8", *_X264],
    "testsrc-15fps.mp4": ["-i", "{dir}/testsrc.mp4", "-r", "15", *_X264],
    # a silent video, then the same frames with a sound track: the frames alone decide
    "cells.mkv": ["-f", "lavfi", "-i", f"cellauto={_SIZE}:rule=110:seed=9", "-t", "8", *_X264],
    "cells-sound.mp4": ["-i", "{dir}/cells.mkv", "-f", "lavfi", "-i", "sine=f=440:d=8",
                        "-c:v", "copy", "-c:a", "aac", "-shortest"],
}


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A loopback origin serving _VIDEOS."""
    folder = tmp_path_factory.mktemp("lookalikes")
    for name, args in _VIDEOS.items():
        argv = [a.replace("{dir}", str(folder)) for a in args]
        subprocess.run(["ffmpeg", "-v", "error", "-y", *argv, str(folder / name)], check=True)
    if shutil.which("mkvmerge"):  # its remux keeps the 5 s offset
        subprocess.run(["mkvmerge", "-q", "-o", str(folder / "mandelbrot-offset-mkvmerge.mkv"),
                        str(folder / "mandelbrot-offset.mkv")], check=True)
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


@pytest.mark.parametrize("name", ["mandelbrot-offset.mp4", "mandelbrot-offset.mkv",
                                  "mandelbrot-offset.wmv"])
def test_a_video_whose_first_frame_comes_later_is_the_same_video(api: Api, origin: str,
                                                                  name: str) -> None:
    """Their durations count from 0, so the 8 s video offset by 5 s measured 13 s, was sampled
    as long, its last 3 samples past its end without a frame, and stored again."""
    (_, stored), (status, matched) = _statuses(api, origin, "mandelbrot.mp4", name)
    assert (status, matched) == ("duplicate", stored)


def test_an_mkvmerge_remux_of_a_video_whose_first_frame_comes_later_is_the_same_video(
        api: Api, origin: str) -> None:
    """mkvmerge's segment duration counts from the first frame, not from 0 as ffmpeg's does:
    the 8 s video offset by 5 s, remuxed by mkvmerge, lasts 8 s; less its start it measured
    3 s, its samples all in its first 3 s, and it was stored again."""
    if not shutil.which("mkvmerge"):
        pytest.skip("needs mkvmerge (mkvtoolnix)")
    (_, stored), (status, matched) = _statuses(api, origin, "mandelbrot.mp4",
                                               "mandelbrot-offset-mkvmerge.mkv")
    assert (status, matched) == ("duplicate", stored)


def test_videos_alike_but_for_their_end_are_two_videos(api: Api, origin: str) -> None:
    """7 of 8 samples alike and the 8th unrelated (26 bits apart) measured 4: the mean hid
    it."""
    results = _statuses(api, origin, "intro-life.mp4", "intro-cells.mp4")
    assert [status for status, _ in results] == ["new", "new"]


def test_one_picture_over_other_music_is_two_videos(api: Api, origin: str) -> None:
    """The frames of two music tracks under one cover measure 0 apart: the second track was
    merged into the first. A re-upload of each (other codec, bitrate, sample rate, volume) is
    still its own track's duplicate, the second's found past the first's nearer frames."""
    (a, a_hash), (b, b_hash), (b_again, b_match), (a_again, a_match) = _statuses(
        api, origin, "cover-a.mp4", "cover-b.mp4", "cover-b-opus.mkv", "cover-a-mp3.mkv")
    assert (a, b) == ("new", "new")
    assert a_hash != b_hash
    assert (b_again, b_match) == ("duplicate", b_hash)
    assert (a_again, a_match) == ("duplicate", a_hash)


def test_one_slide_over_other_narration_is_two_videos(api: Api, origin: str) -> None:
    results = _statuses(api, origin, "slide-a.mp4", "slide-b.mp4", "slide-b-opus.mkv")
    assert [status for status, _ in results] == ["new", "new", "duplicate"]
    assert results[0][1] != results[1][1]
    assert results[2][1] == results[1][1]


def test_a_sound_track_added_is_the_same_video(api: Api, origin: str) -> None:
    """Without sound in one of the two there is nothing to compare: the frames decide."""
    results = _statuses(api, origin, "cells.mkv", "cells-sound.mp4")
    assert [status for status, _ in results] == ["new", "duplicate"]
    assert results[1][1] == results[0][1]


def test_short_clips_sounding_at_opposite_ends_are_two_videos(api: Api, origin: str) -> None:
    """Two 2 s clips of one picture, one chiming in its first half second, the other another
    tone in its last: compared at an offset of 0.5 s, the frames left to compare were the
    silence between the two chimes, 0 apart, and the second was merged into the first. A
    re-upload of the first is still its duplicate."""
    (first, first_hash), (second, _), (again, matched) = _statuses(
        api, origin, "chime-start.mp4", "chime-end.mp4", "chime-start-mp3.mkv")
    assert (first, second) == ("new", "new")
    assert (again, matched) == ("duplicate", first_hash)


def _two_videos_and_a_reupload_of_the_first(api: Api, origin: str, first_name: str,
                                            second_name: str, reupload: str) -> None:
    """Ingested in turn: the first two are new, two videos, and `reupload` is the first's."""
    (first, first_hash), (second, second_hash), (again, matched) = _statuses(
        api, origin, first_name, second_name, reupload)
    assert (first, second) == ("new", "new")
    assert second_hash != first_hash
    assert (again, matched) == ("duplicate", first_hash)


def test_slides_differing_by_a_number_are_two_videos(api: Api, origin: str) -> None:
    """A 64-bit hash of a 32x32 image cannot see a digit: two 1280x720 slides differing by one
    (2023, 2024) measured 0 apart and were one video. Their still frames compared at their
    size tell them apart; a re-upload at half the size and 150 kb/s is still the first's."""
    _two_videos_and_a_reupload_of_the_first(api, origin, "slide-2023.mp4", "slide-2024.mp4",
                                            "slide-2023-small.mp4")


def test_moving_footage_at_another_frame_rate_is_the_same_video(api: Api, origin: str) -> None:
    """Moving footage re-encoded at 15 fps: its frames at the sample times are other moments,
    which the frame check does not judge (it looks only where both are still)."""
    (_, stored), (status, matched) = _statuses(api, origin, "testsrc.mp4", "testsrc-15fps.mp4")
    assert (status, matched) == ("duplicate", stored)


def test_short_clips_differing_in_their_last_eighth_are_two_videos(api: Api,
                                                                   origin: str) -> None:
    """Two 2 s clips whose last quarter second differs by a year: the frame after the last
    sample (0.125 s after it) fell at the clip's end, where there is no frame, so the one
    sample showing the difference was never judged and the two were one video. A re-encode
    of the first at CRF 35 is still the first's."""
    _two_videos_and_a_reupload_of_the_first(api, origin, "ending-2023.mp4", "ending-2024.mp4",
                                            "ending-2023-crf35.mp4")


def test_a_half_size_reupload_of_a_slide_is_not_the_slide_with_another_year(
        api: Api, origin: str) -> None:
    """A slide's re-upload at half its size and 150 kb/s, compared at its 640x360 with the
    slide with another year stored before it, measured 26.8 apart (its own slide 3.4): under
    the threshold of 28 it was merged with the other year's, its own video lost."""
    (_, stored), (status, content_hash) = _statuses(
        api, origin, "report-2024.mp4", "report-2023-small.mp4")
    assert status == "new" and content_hash != stored


def test_captures_whose_size_ffprobe_does_not_find_are_compared_at_their_size(
        api: Api, origin: str) -> None:
    """Captures of two slides differing by a year, begun mid-GOP: ffprobe said 0x0 (their
    size is in their first keyframe's parameter sets, 9 s on), so the frame check compared
    them at 8x8 and the second was merged with the first. Their first keyframe's size is
    theirs; a re-upload of the first at half its size and 150 kb/s is still the first's."""
    _two_videos_and_a_reupload_of_the_first(api, origin, "capture-2023.ts", "capture-2024.ts",
                                            "capture-2023-small.mp4")
