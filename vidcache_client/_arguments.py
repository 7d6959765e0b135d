"""Values that both command lines take, `vidcache` and `vcfs`: sizes, seconds, the service's URL
and a token file; the name both give a signal that ended a process of theirs; and how both wrap
their --help. They live here because both commands already depend on the client; one reading of
each keeps `--cache-size 1.5G` or a token file meaning the same to both.

The parsers raise argparse.ArgumentTypeError, so argparse names the option in its usage error.
"""

from __future__ import annotations

import argparse
import math
import re
import signal
import textwrap

from vidcache_client._validate import parse_base_url

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, wrapping at spaces only: an option a help text names (--media-memory) is
    never cut at one of its hyphens, which a reader copying it would paste broken."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """Descriptions and epilogs as written; the options' help wrapped as HelpFormatter does."""


class TokenFileError(ValueError):
    """The token file is missing, unreadable, empty or holds something that is not a token."""


def parse_size(text: str) -> int:
    """'256M' -> 268435456. K/M/G/T are powers of 1024 (an optional 'B' or 'iB' is ignored)."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use bytes or a number with K, M, G or T (e.g. 256M)")
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.lower()]
    if value == math.inf:  # hundreds of digits: int() would end in a traceback
        raise argparse.ArgumentTypeError(f"size too large: {text!r}")
    if value != int(value):  # `1.5` would be 1 byte without a word
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}")
    return int(value)


def size_text(size: int, *, largest: int = 1 << 30) -> str:
    """`size` in the largest unit, up to `largest` (1 << 30, 1 << 20 or 1 << 10), it is a
    whole number of (`3 GiB`, `1536 KiB`, `1000000 bytes`): as an option gave it, not rounded
    (128K shown as `0 MiB`)."""
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if unit <= largest and size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


# The longest wait a command-line option may ask for: far beyond any use, and far below what
# overflows a wait (a socket timeout or a lock's wait past ~9.2e9 s: OverflowError, which was
# a 500 for every ingest of `vidcache serve --download-timeout 1e12`).
MAX_SECONDS = 365 * 24 * 3600


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # nan and inf are floats too: nan is no number of seconds, and inf overflows as above
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0, at most {MAX_SECONDS} (a year), "
            f"not {text!r}")
    return value


def service_url(text: str) -> str:
    """The service's base URL as given, if the client takes it."""
    try:
        parse_base_url(text)  # the client's own check: it takes whatever passes here
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"must be an http:// or https:// URL with a host, like http://127.0.0.1:8020 "
            f"({exc})") from exc
    return text.rstrip("/")


def read_token_file(path: str, *, label: str = "token file") -> str:
    """The bearer token in `path`: its line without the line break; TokenFileError, whose
    message starts with `label`, if unusable."""
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except UnicodeDecodeError as exc:
        raise TokenFileError(f"{label} {path} is not ASCII text") from exc
    except OSError as exc:
        raise TokenFileError(f"cannot read {label} {path}: {exc.strerror}") from exc
    token = text.rstrip("\r\n")
    if not token:
        raise TokenFileError(f"{label} {path} is empty: put the service's token in it (one line)")
    if not all(33 <= ord(char) <= 126 for char in token):
        raise TokenFileError(f"{label} {path}: the token must be one line of printable ASCII "
                             "without spaces (it travels in an HTTP header)")
    return token


def signal_name(number: int) -> str:
    """`SIGKILL` for 9; `signal 34` for a real-time signal, which has no name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
