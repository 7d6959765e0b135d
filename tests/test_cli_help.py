"""The --help of `vidcache`, `vcfs` and `scripts/bench` at any terminal width: wrapped at
spaces only, so that an option a help text names is never cut at one of its hyphens (argparse
cut `--media-` / `memory`, `--token-` / `file`, `--block-` / `size` at some widths)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from bench.run import main as bench_main
from vcfs.cli import build_parser as vcfs_parser
from vidcache.cli import build_parser as vidcache_parser


def vidcache(argv: list[str]) -> Any:
    return vidcache_parser().parse_args(argv)


def vcfs(argv: list[str]) -> Any:
    return vcfs_parser().parse_args(argv)


COMMANDS: list[tuple[Callable[[list[str]], Any], list[str]]] = [
    (vidcache, []), (vidcache, ["serve"]), (vidcache, ["ingest"]), (vidcache, ["list"]),
    (vidcache, ["show"]), (vidcache, ["delete"]), (vidcache, ["resolve"]), (vidcache, ["get"]),
    (vidcache, ["ingests"]),
    (vcfs, []), (vcfs, ["mount"]), (vcfs, ["unmount"]),
    (bench_main, []),  # scripts/bench: it parses its options before anything else
]
# A word cut at a hyphen: a line ending in a letter and '-', the next going on with a letter.
CUT = re.compile(r"[A-Za-z]-\n\s*[A-Za-z]")


def help_text(parse: Callable[[list[str]], Any], command: list[str],
              capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        parse([*command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("columns", range(60, 161, 2))
def test_help_never_cuts_a_word_at_a_hyphen(columns: int, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    for parse, command in COMMANDS:
        text = help_text(parse, command, capsys)
        cut = CUT.search(text)
        assert cut is None, (command, columns, cut and cut.group())


def test_the_help_still_wraps_to_the_terminal(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Wrapped lines fit the width as before (serve's help has no hand-made lines)."""
    monkeypatch.setenv("COLUMNS", "80")
    text = help_text(vidcache, ["serve"], capsys)
    assert "--media-memory" in text and "--ingest-allow 10.0.0.0/8." in " ".join(text.split())
    assert max(map(len, text.splitlines())) <= 80


def test_mount_help_says_a_vidcache_1x_lists_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """`by-hash/` lists every video only where the service has a listing to ask for."""
    text = " ".join(help_text(vcfs, ["mount"], capsys).split())
    assert "vidcache 1.x" in text
    assert "by-hash/ lists nothing, though each video opens by name" in text
