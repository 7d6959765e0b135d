"""VidCacheClient.get_chunk_digests with digest pages (`start`/`end`): against the real
service, and against httpx.MockTransport for what a real current service never answers (a
server from before pages that ignores the parameters, a wrong page, malformed fields)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from blake3 import blake3

from tests.support import VidcacheServer
from vidcache_client import InvalidRequestError, ProtocolError, VidCacheClient

pytestmark = pytest.mark.timeout(120)

HASH = "ab" * 32
CHUNK = 1000
SIZE = 4500  # five chunks, the last one short
DIGESTS = [f"{i:064x}" for i in range(1, 6)]
Handler = Callable[[httpx.Request], httpx.Response]


def page_of(start: int, end: int | None, size: int, chunk_size: int) -> tuple[int, int]:
    """(first chunk, digest count) of the chunks overlapping [start, min(end, size))."""
    count = math.ceil(size / chunk_size)
    first = min(start // chunk_size, count)
    stop = size if end is None else min(end, size)
    return first, (math.ceil(stop / chunk_size) - first if start < stop else 0)


def paging_server(requests: list[httpx.Request]) -> Handler:
    """GET /video/HASH/chunks as the service answers it, pages included."""
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        params = request.url.params
        end = params.get("end")
        first, count = page_of(int(params.get("start", 0)), None if end is None else int(end),
                               SIZE, CHUNK)
        return httpx.Response(200, json={
            "hash": HASH, "chunk_size": CHUNK, "first_chunk": first,
            "chunk_count": len(DIGESTS), "digests": DIGESTS[first:first + count]})
    return handler


def answering(document: dict[str, Any]) -> Handler:
    return lambda request: httpx.Response(200, json=document)


MakeClient = Callable[[Handler], VidCacheClient]


# --- against MockTransport -----------------------------------------------------------------------

@pytest.mark.parametrize(("start", "end", "first", "count"), [
    (None, None, 0, 5), (0, None, 0, 5), (None, 2000, 0, 2), (1000, 3000, 1, 2),
    (999, 1001, 0, 2), (4000, None, 4, 1), (4499, 10**9, 4, 1), (4500, None, 4, 0),
    (4999, 6000, 4, 0), (5000, None, 5, 0), (10**12, None, 5, 0), (2500, 2500, 2, 0),
    (0, 0, 0, 0),
])
def test_the_asked_page_is_returned_as_sent(make_client: MakeClient, start: int | None,
                                            end: int | None, first: int, count: int) -> None:
    requests: list[httpx.Request] = []
    answer = make_client(paging_server(requests)).get_chunk_digests(HASH, start=start, end=end)
    assert answer == {"hash": HASH, "chunk_size": CHUNK, "first_chunk": first,
                      "chunk_count": 5, "digests": DIGESTS[first:first + count]}
    # only the parameters given are sent
    sent = dict(requests[0].url.params)
    assert sent == {name: str(value) for name, value in (("start", start), ("end", end))
                    if value is not None}


@pytest.mark.parametrize(("start", "end"), [(None, None), (2000, 3000), (4700, None)])
def test_a_server_from_before_pages_answers_the_whole_list(make_client: MakeClient,
                                                          start: int | None,
                                                          end: int | None) -> None:
    old = {"hash": HASH, "chunk_size": CHUNK, "digests": DIGESTS}
    answer = make_client(answering(old)).get_chunk_digests(HASH, start=start, end=end)
    assert answer == {**old, "first_chunk": 0, "chunk_count": 5}


@pytest.mark.parametrize(("start", "end", "first", "count"), [
    (2000, 3000, 1, 1),     # starts a chunk early
    (2000, 3000, 2, 2),     # one digest too many
    (2000, 3001, 2, 1),     # one digest too few
    (2000, None, 2, 2),     # the rest of the file asked, a part answered
    (None, None, 0, 4),     # the whole list asked, a part answered
    (None, None, 1, 4),
    (3000, 3000, 3, 1),     # an empty range answered with a chunk
    (3500, None, 3, 0),     # a range inside the file answered with no chunk
    (10**9, None, 4, 0),    # start past every chunk: first_chunk must be the chunk count
])
def test_a_wrong_page_is_a_protocol_error(make_client: MakeClient, start: int | None,
                                          end: int | None, first: int, count: int) -> None:
    document = {"hash": HASH, "chunk_size": CHUNK, "first_chunk": first, "chunk_count": 5,
                "digests": DIGESTS[first:first + count]}
    with pytest.raises(ProtocolError, match=f"chunk digests of video {HASH}.*not the asked "
                                            "page") as caught:
        make_client(answering(document)).get_chunk_digests(HASH, start=start, end=end)
    assert caught.value.transient


def test_a_start_past_the_end_inside_the_last_chunk_may_get_either_answer(
        make_client: MakeClient) -> None:
    """The client does not know the size: 4700 may lie in the last chunk (size 5000) or past
    the end (size 4500), so both pages are right."""
    for count in (0, 1):
        document = {"hash": HASH, "chunk_size": CHUNK, "first_chunk": 4, "chunk_count": 5,
                    "digests": DIGESTS[4:4 + count]}
        answer = make_client(answering(document)).get_chunk_digests(HASH, start=4700)
        assert answer is not None and len(answer["digests"]) == count
    # but at the last chunk's first byte the file certainly has a byte there
    document = {"hash": HASH, "chunk_size": CHUNK, "first_chunk": 4, "chunk_count": 5,
                "digests": []}
    with pytest.raises(ProtocolError, match="not the asked page"):
        make_client(answering(document)).get_chunk_digests(HASH, start=4000)


@pytest.mark.parametrize(("fields", "complaint"), [
    ({"first_chunk": "0", "chunk_count": 5}, "bad 'first_chunk' '0'"),
    ({"first_chunk": 0, "chunk_count": 5.0}, "bad 'first_chunk' 0 or 'chunk_count' 5.0"),
    ({"first_chunk": True, "chunk_count": 5}, "bad 'first_chunk' True"),
    ({"first_chunk": -1, "chunk_count": 5}, "bad 'first_chunk' -1"),
    ({"first_chunk": 0, "chunk_count": -5}, "'chunk_count' -5"),
    ({"first_chunk": None, "chunk_count": 5}, "bad 'first_chunk' None"),
    ({"first_chunk": 0}, "'chunk_count' None"),          # one field without the other
    ({"chunk_count": 5}, "bad 'first_chunk' None"),
    ({"first_chunk": 0, "chunk_count": 4}, "5 digests from chunk 0 run past the video's 4"),
    ({"first_chunk": 3, "chunk_count": 5}, "5 digests from chunk 3 run past"),
])
def test_malformed_page_fields_are_a_protocol_error(make_client: MakeClient,
                                                    fields: dict[str, Any],
                                                    complaint: str) -> None:
    document = {"hash": HASH, "chunk_size": CHUNK, "digests": DIGESTS, **fields}
    with pytest.raises(ProtocolError, match=f"chunk digests of video {HASH}: .*{complaint}"):
        make_client(answering(document)).get_chunk_digests(HASH)


def test_the_existing_checks_still_apply_to_a_page(make_client: MakeClient) -> None:
    document = {"hash": HASH, "chunk_size": 0, "first_chunk": 0, "chunk_count": 0,
                "digests": []}
    with pytest.raises(ProtocolError, match="bad 'chunk_size' 0"):
        make_client(answering(document)).get_chunk_digests(HASH, start=0, end=10)
    document = {"hash": HASH, "chunk_size": CHUNK, "first_chunk": 0, "chunk_count": 5,
                "digests": ["AB" * 32]}
    with pytest.raises(ProtocolError, match="not a list of 64-hex"):
        make_client(answering(document)).get_chunk_digests(HASH, start=0, end=10)


def test_an_unknown_video_is_none_with_a_range(make_client: MakeClient) -> None:
    client = make_client(lambda request: httpx.Response(404, json={"detail": "no video"}))
    assert client.get_chunk_digests(HASH, start=0, end=CHUNK) is None


@pytest.mark.parametrize(("start", "end"), [
    (-1, None), (None, -1), (5, 4), (True, None), (None, 1.5), ("0", None), (0, "10"),
])
def test_a_bad_range_is_refused_before_any_request(make_client: MakeClient, start: Any,
                                                   end: Any) -> None:
    requests: list[httpx.Request] = []
    with pytest.raises(InvalidRequestError, match="invalid digest range") as caught:
        make_client(paging_server(requests)).get_chunk_digests(HASH, start=start, end=end)
    assert isinstance(caught.value, ValueError)
    assert "no request sent" in str(caught.value)
    assert requests == []


# --- against the real service --------------------------------------------------------------------

def chunk_digests(data: bytes, chunk_size: int) -> list[str]:
    return [str(blake3(data[i:i + chunk_size]).hexdigest())
            for i in range(0, len(data), chunk_size)]


@pytest.fixture(scope="module")
def real(vidcache_server: VidcacheServer, media_url: str,
         videos: dict[str, Path]) -> Iterator[tuple[VidCacheClient, str, bytes]]:
    """big.mp4 on the session's service (its hash is its own: see test_client_e2e.py)."""
    with VidCacheClient(vidcache_server.url, timeout=120) as client:
        content_hash = client.ingest(f"{media_url}/big.mp4", "client-digests")["hash"]
        yield client, content_hash, videos["big.mp4"].read_bytes()


def test_the_real_service_answers_the_whole_list(
        real: tuple[VidCacheClient, str, bytes]) -> None:
    client, content_hash, data = real
    answer = client.get_chunk_digests(content_hash)
    assert answer is not None
    whole = chunk_digests(data, answer["chunk_size"])
    assert answer == {"hash": content_hash, "chunk_size": answer["chunk_size"],
                      "first_chunk": 0, "chunk_count": len(whole), "digests": whole}
    assert len(whole) > 4 and len(data) % answer["chunk_size"]


def test_the_real_service_answers_pages(real: tuple[VidCacheClient, str, bytes]) -> None:
    client, content_hash, data = real
    whole = client.get_chunk_digests(content_hash)
    assert whole is not None
    size, chunk = len(data), whole["chunk_size"]
    ranges: list[tuple[int | None, int | None]] = [
        (0, chunk), (chunk, 3 * chunk), (chunk - 1, chunk + 1), (5, None), (None, 2 * chunk + 1),
        (size - 1, None), (size - 1, size + 10 * chunk), (size, None), (size + 1, size + 2),
        (10 * size, None), (2 * chunk, 2 * chunk)]
    for start, end in ranges:
        answer = client.get_chunk_digests(content_hash, start=start, end=end)
        assert answer is not None
        first, count = page_of(start or 0, end, size, chunk)
        assert (answer["first_chunk"], answer["chunk_count"]) == (first, whole["chunk_count"])
        assert answer["digests"] == whole["digests"][first:first + count], (start, end)
        assert answer["digests"] == chunk_digests(data, chunk)[first:first + count]
