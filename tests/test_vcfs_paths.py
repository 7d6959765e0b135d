"""Unit tests of the vcfs namespace (vcfs.paths): pure, no FUSE, no service."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vcfs.paths import (
    FALLBACK_EXT,
    PathKind,
    VcfsPath,
    VideoName,
    ext_for,
    parse_path,
    parse_video_name,
    video_inode,
    video_name,
)

HASH = "0123456789abcdef" * 4
OTHER_HASH = "f" * 64


def parsed(path: str) -> VcfsPath:
    result = parse_path(path)
    assert result is not None, path
    return result


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/", PathKind.ROOT),
        ("/by-hash", PathKind.BY_HASH),
        ("/.vcfs", PathKind.CONTROL),
        ("/.vcfs/stats", PathKind.STATS),
    ],
)
def test_fixed_paths(path: str, kind: PathKind) -> None:
    result = parsed(path)
    assert result == VcfsPath(kind)
    assert result.video is None
    assert result.is_dir == (kind is not PathKind.STATS)


def test_video_path() -> None:
    result = parsed(f"/by-hash/{HASH}.mp4")
    assert result == VcfsPath(PathKind.VIDEO, VideoName(HASH, "mp4"))
    assert not result.is_dir
    assert str(result.video) == f"{HASH}.mp4"


@pytest.mark.parametrize(
    "path",
    [
        "",
        "by-hash",
        "/by-hash/",
        "//",
        "/.vcfs/",
        "/.vcfs/other",
        "/.vcfs/stats/x",
        "/by-hash/x",
        f"/{HASH}.mp4",  # videos live under /by-hash only
        f"/by-hash/{HASH}",  # no extension
        f"/by-hash/{HASH}.",  # empty extension
        f"/by-hash/{HASH}.MP4",  # extension must be lowercase
        f"/by-hash/{HASH}.mp4.part",  # one extension only
        f"/by-hash/{HASH}.toolongext",  # 9 characters
        f"/by-hash/{HASH}.m-4",
        f"/by-hash/{HASH.upper()}.mp4",  # hash must be lowercase
        f"/by-hash/{HASH[:-1]}.mp4",  # 63 hex digits
        f"/by-hash/{HASH}0.mp4",  # 65 hex digits
        f"/by-hash/{HASH[:-1]}g.mp4",  # not hex
        f"/by-hash/{HASH}.mp4/x",
        f"/by-hash/.{HASH}.mp4",
        f"/by-hash/{HASH}.mp4\n",
    ],
)
def test_impossible_paths_are_none(path: str) -> None:
    assert parse_path(path) is None


def test_extension_limits() -> None:
    assert parse_video_name(f"{HASH}.a") == VideoName(HASH, "a")
    assert parse_video_name(f"{HASH}.3gp") == VideoName(HASH, "3gp")
    assert parse_video_name(f"{HASH}.abcdefgh") == VideoName(HASH, "abcdefgh")
    assert parse_video_name(f"{HASH}.abcdefghi") is None


@given(st.text(max_size=80))
def test_parse_video_name_accepts_exactly_the_grammar(name: str) -> None:
    result = parse_video_name(name)
    head, dot, ext = name.partition(".")
    valid = (
        dot == "."
        and len(head) == 64
        and all(c in "0123456789abcdef" for c in head)
        and 1 <= len(ext) <= 8
        and all(c in "0123456789abcdefghijklmnopqrstuvwxyz" for c in ext)
    )
    assert (result is not None) == valid
    if result is not None:
        assert str(result) == name


@pytest.mark.parametrize(
    ("file_path", "ext"),
    [
        ("bucket/prefix/clip.mp4", "mp4"),
        ("clip.MKV", "mkv"),
        ("a.b.webm", "webm"),
        ("dir.d/noext", FALLBACK_EXT),
        ("", FALLBACK_EXT),
        (None, FALLBACK_EXT),
        ("clip.", FALLBACK_EXT),
        ("clip.toolongext", FALLBACK_EXT),
        ("clip.m-4", FALLBACK_EXT),
        (".hidden", FALLBACK_EXT),
    ],
)
def test_ext_for(file_path: str | None, ext: str) -> None:
    assert ext_for(file_path) == ext


def test_video_name_round_trips_through_parse_path() -> None:
    name = video_name(HASH, "videos/x/clip.mp4")
    assert name == f"{HASH}.mp4"
    assert parse_path(f"/by-hash/{name}") == VcfsPath(PathKind.VIDEO, VideoName(HASH, "mp4"))
    fallback = video_name(HASH, "videos/x/clip")
    assert parse_path(f"/by-hash/{fallback}") is not None


def test_video_name_rejects_bad_hash() -> None:
    with pytest.raises(ValueError, match="content hash"):
        video_name(HASH.upper(), "clip.mp4")


def test_inodes_are_stable_distinct_and_clear_of_fixed_ones() -> None:
    fixed = {parsed(p).inode for p in ("/", "/by-hash", "/.vcfs", "/.vcfs/stats")}
    assert len(fixed) == 4
    assert parsed("/").inode == 1
    assert parsed(f"/by-hash/{HASH}.mp4").inode == video_inode(HASH) == video_inode(HASH)
    assert video_inode(HASH) != video_inode(OTHER_HASH)
    assert video_inode(HASH) not in fixed
    assert video_inode("0" * 64) not in fixed
    assert 0 < video_inode(OTHER_HASH) < 2**63
    with pytest.raises(ValueError):
        video_inode("xyz")
