"""Strict parsing of `Range: bytes=...` headers (RFC 9110 section 14), pure.

Starlette's own parser is lenient in ways that serve bytes nobody asked for clearly: it takes
`int()` of each bound, so `bytes=1_0-2_0` or `bytes=+5-9` are honoured, and it silently drops
parts it cannot read (`bytes=0-9,junk` serves 0-9). Here the grammar is exact:

    Range     = "bytes" "=" range-spec *( OWS "," OWS range-spec )   (unit case-insensitive)
    range-spec = first-pos "-" [ last-pos ]  /  "-" suffix-length        (ASCII digits only)

and the semantics are RFC 9110's: a last-pos past the end is clamped, a suffix longer than the
file selects all of it, a spec starting at or past the end (or `-0`) is unsatisfiable and
dropped; only when nothing is left is the whole header unsatisfiable (416). Several ranges are
sorted and overlapping or adjacent ones merged. Anything else is malformed (400): a client that
sends it has a bug it should hear about, rather than getting the whole file back.
"""

from __future__ import annotations

import re

# More than any player sends; bounds the work per request (and keeps every number far below
# Python's int() digit limit).
MAX_HEADER_LENGTH = 4096
MAX_RANGES = 100

_SPEC_RE = re.compile(r"([0-9]*)-([0-9]*)")
_OWS = " \t"


class MalformedRange(ValueError):
    """The header does not follow the grammar; the message says where."""


class UnsatisfiableRange(ValueError):
    """No range of the header selects any byte of the file."""


def parse_range(header: str, size: int) -> list[tuple[int, int]]:
    """The byte ranges `header` selects in a file of `size` bytes, as sorted, disjoint
    (start, end_exclusive) pairs; raises MalformedRange or UnsatisfiableRange."""
    if len(header) > MAX_HEADER_LENGTH:
        raise MalformedRange(f"longer than {MAX_HEADER_LENGTH} characters")
    unit, equals, range_set = header.strip(_OWS).partition("=")
    if not equals or unit.lower() != "bytes":
        raise MalformedRange("expected 'bytes=first-last', 'bytes=first-' or 'bytes=-length'")
    specs = [part.strip(_OWS) for part in range_set.split(",")]
    if not any(specs):
        raise MalformedRange("no range given after 'bytes='")
    if len(specs) > MAX_RANGES:
        raise MalformedRange(f"more than {MAX_RANGES} ranges")
    ranges: list[tuple[int, int]] = []
    for spec in specs:
        if not spec:  # the list syntax allows empty elements ("0-1,,5-6")
            continue
        selected = _select(spec, size)
        if selected is not None:
            ranges.append(selected)
    if not ranges:
        raise UnsatisfiableRange(f"no range selects any of the file's {size} bytes")
    return _merge(ranges)


def _select(spec: str, size: int) -> tuple[int, int] | None:
    """(start, end_exclusive) of one range-spec, None if it selects nothing."""
    match = _SPEC_RE.fullmatch(spec)
    if match is None or match.group(0) == "-":
        raise MalformedRange(f"{spec!r} is not 'first-last', 'first-' or '-length' "
                             "(ASCII digits)")
    first_text, last_text = match.groups()
    if not first_text:  # suffix-range: the last N bytes
        length = int(last_text)
        return (max(size - length, 0), size) if length > 0 and size > 0 else None
    first = int(first_text)
    if last_text:
        last = int(last_text)
        if last < first:
            raise MalformedRange(f"{spec!r} ends before it starts")
        end = min(last + 1, size)
    else:
        end = size
    return (first, end) if first < size else None


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged
