"""Property tests of Range handling: random headers, built from a structure (a unit, a list of
range specs, some of them malformed) so the expected answer is computed from that structure
rather than by parsing the text again, against the pure parser (vidcache/ranges.py) and
against the real server over HTTP (status, Content-Range, bytes, multipart bodies)."""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service_support import digest, unique
from tests.support import VidcacheServer
from vidcache.ranges import MAX_RANGES, MalformedRange, UnsatisfiableRange, parse_range

pytestmark = pytest.mark.timeout(120)

# Specs the grammar refuses although int() or a lenient parser would read something in them.
JUNK_SPECS = ["abc", "-", "1-2-3", "+5-9", "1_0-2_0", "0x10-20", "5--3", "--5", "1 -2",
              "1.5-3", "1e3-", "-+5", "\u0663-\u0665", "\u00b2-9", "5-3"]


@dataclass(frozen=True)
class Spec:
    kind: str  # "int", "suffix" or "junk"
    first: int = 0
    last: int | None = None
    text: str = ""

    def render(self) -> str:
        if self.kind == "int":
            return f"{self.first}-{'' if self.last is None else self.last}"
        if self.kind == "suffix":
            return f"-{self.first}"
        return self.text


@dataclass(frozen=True)
class Header:
    unit: str
    specs: tuple[Spec, ...]
    separators: tuple[str, ...]

    def render(self) -> str:
        parts = [spec.render() for spec in self.specs]
        text = parts[0] + "".join(sep + part for sep, part in zip(self.separators, parts[1:],
                                                                  strict=False))
        return f"{self.unit}={text}"


def specs(size: int) -> st.SearchStrategy[Spec]:
    """Mostly well-formed specs around the file's end, some huge, some inverted, some junk."""
    position = st.integers(0, size + 64)
    near = st.one_of(position, position, position, st.integers(size, 10**30))
    length = st.integers(-3, size + 64)  # negative: a spec ending before it starts
    int_range = st.builds(lambda first, span, open_end: Spec(
        "int", first, None if open_end else first + span), near, length, st.booleans())
    suffix = st.builds(lambda n: Spec("suffix", n), near)
    junk = st.sampled_from(JUNK_SPECS).map(lambda text: Spec("junk", text=text))
    return st.one_of(int_range, int_range, int_range, suffix, suffix, junk)


def short_specs(size: int) -> st.SearchStrategy[Spec]:
    """Well-formed, mostly short and inside the file: several of them make a multipart answer."""
    inside = st.integers(0, max(size - 1, 0))
    return st.one_of(
        st.builds(lambda first, span: Spec("int", first, first + span), inside,
                  st.integers(0, max(size // 50, 1))),
        st.builds(lambda n: Spec("suffix", n), st.integers(1, max(size // 50, 1))))


def headers(size: int, *, latin1: bool = False) -> st.SearchStrategy[Header]:
    units = st.sampled_from(["bytes"] * 8 + ["BYTES", "Bytes", "items", "byte", "bytes "])
    separators = st.lists(st.sampled_from([",", ", ", " ,", ",\t", ",,"]), min_size=5,
                          max_size=5)

    def build(unit: str, items: list[Spec], seps: list[str]) -> Header:
        if latin1:  # all an HTTP header can carry
            items = [s for s in items if all(ord(c) < 256 for c in s.text)] or [Spec("int")]
        return Header(unit, tuple(items), tuple(seps))

    anything = st.builds(build, units, st.lists(specs(size), min_size=1, max_size=6),
                         separators)
    several = st.builds(build, st.just("bytes"),
                        st.lists(short_specs(size), min_size=2, max_size=6), separators)
    past_the_end = st.one_of(st.builds(lambda first: Spec("int", first), st.integers(size, 10**6)),
                             st.just(Spec("suffix", 0)))
    nothing = st.builds(build, st.just("bytes"), st.lists(past_the_end, min_size=1, max_size=3),
                        separators)
    return st.one_of(anything, anything, several, nothing)


def expected(header: Header, size: int) -> str | list[tuple[int, int]]:
    """"malformed", "unsatisfiable" or the merged (start, end_exclusive) ranges."""
    if header.unit.lower() != "bytes" or len(header.specs) > MAX_RANGES:
        return "malformed"
    selected = []
    for spec in header.specs:
        if spec.kind == "junk":
            return "malformed"
        if spec.kind == "int" and spec.last is not None and spec.last < spec.first:
            return "malformed"
        if spec.kind == "suffix":
            if spec.first > 0 and size > 0:
                selected.append((max(size - spec.first, 0), size))
        elif spec.first < size:
            end = size if spec.last is None else min(spec.last + 1, size)
            selected.append((spec.first, end))
    if not selected:
        return "unsatisfiable"
    selected.sort()
    merged = [selected[0]]
    for start, end in selected[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def parsed(header: str, size: int) -> str | list[tuple[int, int]]:
    try:
        return parse_range(header, size)
    except MalformedRange:
        return "malformed"
    except UnsatisfiableRange:
        return "unsatisfiable"


@given(st.integers(0, 5000).flatmap(lambda size: st.tuples(st.just(size), headers(size))))
@settings(max_examples=500, deadline=None)
def test_parser_matches_the_rfc_model(case: tuple[int, Header]) -> None:
    size, header = case
    assert parsed(header.render(), size) == expected(header, size)


@given(st.text(max_size=40))
@settings(max_examples=500, deadline=None)
def test_parser_never_fails_otherwise(text: str) -> None:
    result = parsed(text, 1000)
    if not isinstance(result, str):
        assert all(0 <= start < end <= 1000 for start, end in result)


@pytest.mark.parametrize(("header", "result"), [
    ("bytes=0-0", [(0, 1)]),
    ("bytes=10-", [(10, 100)]),
    ("bytes=-10", [(90, 100)]),
    ("bytes=-1000", [(0, 100)]),
    ("bytes=95-1000", [(95, 100)]),
    ("bytes=0-1,1-2", [(0, 3)]),
    ("bytes=0-1,2-3", [(0, 4)]),  # adjacent ranges are merged too
    ("bytes=200-,0-0", [(0, 1)]),  # an unsatisfiable spec among others is dropped
    ("bytes=0-1,,5-6", [(0, 2), (5, 7)]),  # empty list elements are allowed
    ("BYTES=0-0", [(0, 1)]),
    ("bytes=100-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=1_0-2_0", "malformed"),
    ("bytes=+5-9", "malformed"),
    ("bytes=0-5,junk", "malformed"),
    ("bytes=", "malformed"),
    ("bytes=" + ",".join(["0-0"] * (MAX_RANGES + 1)), "malformed"),
    ("bytes=0-" + "9" * 5000, "malformed"),  # over MAX_HEADER_LENGTH
])
def test_parser_examples(header: str, result: str | list[tuple[int, int]]) -> None:
    assert parsed(header, 100) == result


BIG = 5 * 2**30 + 12345  # a video past 4 GiB


@pytest.mark.parametrize(("header", "result"), [
    (f"bytes={2**31 - 1}-{2**31}", [(2**31 - 1, 2**31 + 1)]),
    (f"bytes={2**32 - 1}-{2**32}", [(2**32 - 1, 2**32 + 1)]),
    (f"bytes={2**32}-", [(2**32, BIG)]),
    (f"bytes={BIG - 1}-{2**64}", [(BIG - 1, BIG)]),
    ("bytes=-12346", [(BIG - 12346, BIG)]),
    (f"bytes=0-0,{2**32}-{2**32 + 9}", [(0, 1), (2**32, 2**32 + 10)]),
    (f"bytes={BIG}-", "unsatisfiable"),
])
def test_parser_examples_past_4_gib(header: str, result: str | list[tuple[int, int]]) -> None:
    assert parsed(header, BIG) == result


# --- the same properties against the real server ----------------------------------------------

@pytest.fixture(scope="module")
def http(vidcache_server: VidcacheServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vidcache_server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def video(vidcache_server: VidcacheServer, media_url: str,
          videos: dict[str, Path]) -> Iterator[tuple[str, bytes]]:
    data = videos["c.mkv"].read_bytes()
    response = httpx.post(f"{vidcache_server.url}/ingest", timeout=60,
                          json={"url": f"{media_url}/c.mkv", "bucket": unique("ranges")})
    assert response.json()["hash"] == digest(data)
    yield digest(data), data


_PART_RE = re.compile(rb"content-range: bytes (\d+)-(\d+)/(\d+)\r\n\r\n", re.IGNORECASE)


def _multipart(response: httpx.Response, size: int, data: bytes) -> list[tuple[int, int]]:
    """The (start, end_exclusive) of each part, after checking each part's bytes."""
    boundary = response.headers["content-type"].partition("boundary=")[2].encode()
    body = response.content
    assert body.endswith(b"--" + boundary + b"--")
    found = []
    for part in body.split(b"--" + boundary + b"\r\n")[1:]:
        match = _PART_RE.search(part)
        assert match is not None, part[:200]
        first, last, total = (int(n) for n in match.groups())
        assert total == size
        content = part[match.end():]
        content = content.removesuffix(b"--" + boundary + b"--").removesuffix(b"\r\n")
        assert content == data[first:last + 1]
        found.append((first, last + 1))
    return found


outcomes: collections.Counter[str] = collections.Counter()


@given(draw=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_server_answers_every_range_header_as_the_model_says(
        video: tuple[str, bytes], http: httpx.Client, draw: st.DataObject) -> None:
    content_hash, data = video
    size = len(data)
    header = draw.draw(headers(size, latin1=True))
    text = header.render()
    response = http.get(f"/video/{content_hash}",
                        headers=[(b"Range", text.encode("latin-1"))])
    want = expected(header, size)
    outcomes[want if isinstance(want, str) else f"{min(len(want), 2)} range(s)"] += 1
    if want == "malformed":
        assert response.status_code == 400, (text, response.status_code)
        assert "malformed Range header" in response.json()["detail"]
    elif want == "unsatisfiable":
        assert response.status_code == 416, (text, response.status_code)
        assert response.headers["content-range"] == f"bytes */{size}"
    else:
        assert response.status_code == 206, (text, response.status_code, response.text[:200])
        assert isinstance(want, list)
        if len(want) == 1:
            start, end = want[0]
            assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
            assert response.content == data[start:end]
        else:
            assert _multipart(response, size, data) == want


def test_server_range_answers_covered_every_outcome() -> None:
    """Runs after the property test: its random headers met every kind of answer."""
    assert set(outcomes) == {"malformed", "unsatisfiable", "1 range(s)", "2 range(s)"}, outcomes
    print(f"\nrange headers sent to the server: {sum(outcomes.values())} {dict(outcomes)}")
