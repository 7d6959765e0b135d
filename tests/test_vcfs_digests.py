"""vcfs.digests: a `/chunks` answer, whole or ranged, cut into pages of whole chunks (the
first and last of a ranged answer possibly in part), and the digests of a range found among
them."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pytest

from vcfs.digests import PAGE_BYTES, Digests, covering, pages_bytes, pages_of, parse

MIB = 1 << 20
HASH = "ab" * 32
PAGE = 64 * MIB
CHUNK = 16 * MIB  # four chunks per page: small lists with several pages
SIZE = 200 * MIB  # 13 chunks, the last one 8 MiB: pages 0-2 of 4 chunks, page 3 of 1


def digest_of(index: int) -> str:
    return hashlib.sha256(str(index).encode()).hexdigest()


def answer(first: int, count: int, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"hash": HASH, "chunk_size": CHUNK, "first_chunk": first,
                           "chunk_count": 13,
                           "digests": [digest_of(i) for i in range(first, first + count)]}
    doc.update(fields)
    return doc


def test_pages_of_a_range() -> None:
    assert pages_of(0, 1, CHUNK, PAGE) == range(0, 1)
    assert pages_of(0, PAGE, CHUNK, PAGE) == range(0, 1)
    assert pages_of(PAGE - 1, PAGE + 1, CHUNK, PAGE) == range(0, 2)
    assert pages_of(3 * PAGE, 5 * PAGE, CHUNK, PAGE) == range(3, 5)
    assert pages_of(0, 0, CHUNK, PAGE) == range(0, 1)  # an empty file's (empty) page
    assert pages_bytes(range(3, 5), CHUNK, PAGE) == (3 * PAGE, 5 * PAGE)


def test_pages_are_whole_chunks_whatever_their_size() -> None:
    assert pages_of(0, 4000, 1000, page_bytes=4096) == range(0, 1)  # 4 chunks a page
    assert pages_of(4000, 4001, 1000, page_bytes=4096) == range(1, 2)
    assert pages_bytes(range(1, 3), 1000, page_bytes=4096) == (4000, 12000)
    assert pages_of(0, 3 * MIB, 2 * MIB, page_bytes=MIB) == range(0, 2)  # a chunk a page
    doc = {"hash": HASH, "chunk_size": 1000, "digests": [digest_of(i) for i in range(11)]}
    pages = parse(HASH, 10_500, doc, page_bytes=4096)
    assert pages is not None
    assert [(n, p.first, len(p.packed) // 32) for n, p in pages.items()] == [
        (0, 0, 4), (1, 4, 4), (2, 8, 3)]


def test_a_whole_list_from_an_older_service_is_cut_into_pages() -> None:
    doc = answer(0, 13)
    del doc["first_chunk"], doc["chunk_count"]  # what a service without ranged lists sends
    pages = parse(HASH, SIZE, doc, PAGE)
    assert pages is not None and sorted(pages) == [0, 1, 2, 3]
    assert [(p.first, len(p.packed) // 32) for p in pages.values()] == [
        (0, 4), (4, 4), (8, 4), (12, 1)]
    for index in range(13):
        page = pages[index * CHUNK // PAGE]
        assert page.digest(index) == bytes.fromhex(digest_of(index))
    assert pages[3].bounds(12) == (12 * CHUNK, SIZE)  # the short last chunk


def test_a_ranged_answer_gives_its_pages_only() -> None:
    pages = parse(HASH, SIZE, answer(4, 8), PAGE)
    assert pages is not None and sorted(pages) == [1, 2]
    assert all(page.end - page.first == 4 for page in pages.values())
    assert pages[2].digest(11) == bytes.fromhex(digest_of(11))
    with pytest.raises(LookupError):
        pages[2].digest(7)  # page 1's
    with pytest.raises(LookupError):
        pages[2].digest(12)


def test_pages_cut_by_an_answer_are_kept_in_part() -> None:
    pages = parse(HASH, SIZE, answer(2, 7), PAGE)  # chunks 2-8: page 1 whole, pages 0 and 2 in part
    assert pages is not None
    assert [(n, p.first, p.end) for n, p in pages.items()] == [(0, 2, 4), (1, 4, 8), (2, 8, 9)]


def test_the_digests_of_a_range_across_pages() -> None:
    pages = parse(HASH, SIZE, answer(0, 13), PAGE)
    assert pages is not None
    both = covering([pages[1], pages[2]], 5 * CHUNK + 1, 10 * CHUNK)
    assert both is not None and both.first == 4
    assert [both.digest(i) for i in range(4, 12)] == [bytes.fromhex(digest_of(i))
                                                      for i in range(4, 12)]
    assert covering([pages[3]], 12 * CHUNK, SIZE) is pages[3]


def test_a_range_with_a_chunk_missing_has_no_digests() -> None:
    part = parse(HASH, SIZE, answer(2, 7), PAGE)
    assert part is not None
    assert covering([part[0]], 2 * CHUNK, 4 * CHUNK) is part[0]
    assert covering([part[0]], CHUNK, 3 * CHUNK) is None  # chunk 1 is not in the answer
    assert covering([part[2]], 8 * CHUNK, 10 * CHUNK) is None  # nor chunk 9
    assert covering([part[0], None], 3 * CHUNK, 5 * CHUNK) is None  # nor page 1
    later = parse(HASH, SIZE, answer(10, 2), PAGE)
    assert later is not None
    assert covering([part[2], later[2]], 8 * CHUNK, 11 * CHUNK) is None  # a gap: chunk 9
    assert covering([None], 0, CHUNK) is None


def test_an_empty_file_has_one_empty_page() -> None:
    doc = {"hash": HASH, "chunk_size": CHUNK, "digests": []}
    assert parse(HASH, 0, doc, PAGE) == {0: Digests(CHUNK, 0, 0, b"")}


@pytest.mark.parametrize("fields", [
    {"hash": "cd" * 32},
    {"chunk_size": 0},
    {"chunk_size": "16M"},
    {"first_chunk": -1},
    {"first_chunk": "4"},
    {"digests": ["xyz"]},
    {"digests": "ab" * 32},
    {"chunk_count": 12},  # not this file's count of chunks
])
def test_an_unusable_answer_is_none_with_a_warning(
    fields: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="vcfs.digests"):
        assert parse(HASH, SIZE, answer(4, 4, **fields), PAGE) is None
    assert HASH in caplog.text and "not used" in caplog.text


def test_more_digests_than_the_file_has_chunks_is_unusable() -> None:
    assert parse(HASH, SIZE, answer(8, 6), PAGE) is None


def test_pages_of_a_video_past_4_gib() -> None:
    """In the default 256 MiB pages of 256 KiB chunks: 2**31 begins page 8 (chunk 8192), 2**32
    page 16 (chunk 16384)."""
    chunk, size = 256 * 1024, 5 * (1 << 30) + 12345
    count = -(-size // chunk)
    assert pages_of(2**31 - 1, 2**31 + 1, chunk) == range(7, 9)
    assert pages_of(2**32 - 1, 2**32 + 1, chunk) == range(15, 17)
    assert pages_of(size - 1, size, chunk) == range(20, 21)
    assert pages_bytes(range(16, 17), chunk) == (2**32, 2**32 + PAGE_BYTES)
    # a ranged answer for bytes [2**32 - 1, 2**32 + 1): the last chunk of page 15, the first
    # of page 16
    doc = {"hash": HASH, "chunk_size": chunk, "first_chunk": 16383, "chunk_count": count,
           "digests": [digest_of(16383), digest_of(16384)]}
    pages = parse(HASH, size, doc)
    assert pages is not None
    assert [(n, p.first, p.end) for n, p in pages.items()] == [(15, 16383, 16384),
                                                               (16, 16384, 16385)]
    assert pages[16].digest(16384) == bytes.fromhex(digest_of(16384))
    assert pages[16].bounds(16384) == (2**32, 2**32 + chunk)
    both = covering([pages[15], pages[16]], 2**32 - 1, 2**32 + 1)
    assert both is not None and both.first == 16383 and both.end == 16385
    last = parse(HASH, size, {"hash": HASH, "chunk_size": chunk, "first_chunk": count - 1,
                              "chunk_count": count, "digests": [digest_of(count - 1)]})
    assert last is not None
    assert last[20].bounds(count - 1) == ((count - 1) * chunk, size)  # short: 12345 bytes
    assert covering([last[20]], size - 1, size) is last[20]
