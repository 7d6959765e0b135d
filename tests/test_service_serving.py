"""Reading from the real vidcache service: bytes, every Range form, HEAD, headers, 416, strict
hash validation and JSON errors everywhere (chunk digests: test_service_chunks.py).

Uses the session's service with b.mp4, c.mkv and big.mp4, which are perceptually distinct from
every other generated video: whoever ingested them first, they are stored under the BLAKE3 of
their own bytes.

The hot path for whole files and single ranges (vidcache/serving.py) must answer exactly as
the route; it is also tested with a deleted or vanished blob, bytes not in the page cache, a
client that leaves mid-body, a shutdown cancelling reads that wait for a slow disk and a token,
each on a server of the test's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import random
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service_support import CHUNK, Api, api_fixture, digest, read_until_closed, unique
from tests.support import VidcacheServer, open_descriptors, preload_library, wait_until

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

pytestmark = pytest.mark.timeout(120)

CACHE_CONTROL = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Stored:
    hash: str
    data: bytes
    mime_type: str


api = api_fixture()


@pytest.fixture(scope="module")
def stored(api: Api, media_url: str, videos: dict[str, Path]) -> dict[str, Stored]:
    bucket = unique("serve")
    mime = {"b.mp4": "video/mp4", "c.mkv": "video/x-matroska", "big.mp4": "video/mp4"}
    result = {}
    for name, mime_type in mime.items():
        data = videos[name].read_bytes()
        assert api.ingest_ok(f"{media_url}/{name}", bucket)["hash"] == digest(data)
        result[name] = Stored(digest(data), data, mime_type)
    return result


def _assert_video_headers(response: httpx.Response, video: Stored) -> None:
    assert response.headers["etag"] == f'"{video.hash}"'
    assert response.headers["cache-control"] == CACHE_CONTROL
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-type"] == video.mime_type


@pytest.mark.parametrize("name", ["b.mp4", "c.mkv", "big.mp4"])
def test_whole_video_equals_source_with_headers(api: Api, stored: dict[str, Stored],
                                                name: str) -> None:
    video = stored[name]
    response = api.http.get(f"/video/{video.hash}")
    assert response.status_code == 200
    assert response.content == video.data
    assert response.headers["content-length"] == str(len(video.data))
    _assert_video_headers(response, video)


def test_head_gives_the_headers_without_body(api: Api, stored: dict[str, Stored]) -> None:
    video = stored["b.mp4"]
    full = api.http.head(f"/video/{video.hash}")
    assert (full.status_code, full.content) == (200, b"")
    assert full.headers["content-length"] == str(len(video.data))
    _assert_video_headers(full, video)
    part = api.http.head(f"/video/{video.hash}", headers={"Range": "bytes=-100"})
    assert (part.status_code, part.content) == (206, b"")
    size = len(video.data)
    assert part.headers["content-range"] == f"bytes {size - 100}-{size - 1}/{size}"
    assert part.headers["content-length"] == "100"
    _assert_video_headers(part, video)
    missing = api.http.head(f"/video/{'0' * 64}")
    assert (missing.status_code, missing.content) == (404, b"")


def _range_cases(size: int) -> list[tuple[str, int, int]]:
    """(Range header, first byte, last byte) for every form, at the edges and inside."""
    return [
        ("bytes=0-0", 0, 0),
        ("bytes=0-9", 0, 9),
        ("bytes=1000-4999", 1000, 4999),
        (f"bytes={size - 1}-{size - 1}", size - 1, size - 1),
        (f"bytes={size - 10}-{size + 100}", size - 10, size - 1),  # end clamped
        ("bytes=0-", 0, size - 1),
        (f"bytes={size // 2}-", size // 2, size - 1),
        ("bytes=-1", size - 1, size - 1),
        ("bytes=-500", size - 500, size - 1),
        (f"bytes=-{size + 5}", 0, size - 1),  # suffix longer than the file: all of it
    ]


@pytest.mark.parametrize("name", ["b.mp4", "big.mp4"])
def test_every_range_form_equals_the_source(api: Api, stored: dict[str, Stored],
                                            name: str) -> None:
    video = stored[name]
    size = len(video.data)
    rng = random.Random(name)
    cases = _range_cases(size)
    for _ in range(20):
        start = rng.randrange(size)
        end = rng.randrange(start, min(size, start + 3 * CHUNK))
        cases.append((f"bytes={start}-{end}", start, end))
    for header, first, last in cases:
        response = api.http.get(f"/video/{video.hash}", headers={"Range": header})
        assert response.status_code == 206, header
        assert response.headers["content-range"] == f"bytes {first}-{last}/{size}", header
        assert response.content == video.data[first:last + 1], header
        assert response.headers["content-length"] == str(last - first + 1)
        _assert_video_headers(response, video)


@pytest.mark.parametrize("header_for", [
    lambda size: f"bytes={size}-",
    lambda size: f"bytes={size + 1000}-{size + 2000}",
    lambda size: "bytes=-0",
])
def test_unsatisfiable_range_is_416_with_size(api: Api, stored: dict[str, Stored],
                                              header_for: object) -> None:
    video = stored["c.mkv"]
    size = len(video.data)
    header = header_for(size)  # type: ignore[operator]
    for method in ("GET", "HEAD"):
        response = api.http.request(method, f"/video/{video.hash}", headers={"Range": header})
        assert response.status_code == 416, (method, header)
        assert response.headers["content-range"] == f"bytes */{size}"
        assert response.headers["accept-ranges"] == "bytes"
        if method == "GET":
            assert str(size) in response.json()["detail"]


@pytest.mark.parametrize("header", ["bytes=5-3", "bytes=abc", "items=0-10"])
def test_malformed_range_is_400_json(api: Api, stored: dict[str, Stored], header: str) -> None:
    response = api.http.get(f"/video/{stored['c.mkv'].hash}", headers={"Range": header})
    assert response.status_code == 400
    assert header in response.json()["detail"]


def test_multiple_ranges_come_as_multipart(api: Api, stored: dict[str, Stored]) -> None:
    video = stored["b.mp4"]
    response = api.http.get(f"/video/{video.hash}", headers={"Range": "bytes=0-9,100-109"})
    assert response.status_code == 206
    assert response.headers["content-type"].startswith("multipart/byteranges; boundary=")
    body = response.content
    assert video.data[0:10] in body and video.data[100:110] in body


def test_if_range_uses_the_etag(api: Api, stored: dict[str, Stored]) -> None:
    video = stored["b.mp4"]
    same = api.http.get(f"/video/{video.hash}",
                        headers={"Range": "bytes=0-9", "If-Range": f'"{video.hash}"'})
    assert (same.status_code, same.content) == (206, video.data[:10])
    other = api.http.get(f"/video/{video.hash}",
                         headers={"Range": "bytes=0-9", "If-Range": '"something-else"'})
    assert (other.status_code, other.content) == (200, video.data)


def test_if_range_with_the_last_modified_date_keeps_the_range(api: Api,
                                                               stored: dict[str, Stored]) -> None:
    video = stored["b.mp4"]
    date = api.http.head(f"/video/{video.hash}").headers["last-modified"]
    same = api.http.get(f"/video/{video.hash}", headers={"Range": "bytes=0-9", "If-Range": date})
    assert (same.status_code, same.content) == (206, video.data[:10])


def _conditional_cases(etag: str, date: str) -> list[tuple[dict[str, str], int]]:
    """(request headers, status of GET and HEAD) for every precondition, true and false."""
    earlier, later = "Sat, 01 Jan 2000 00:00:00 GMT", "Fri, 01 Jan 2100 00:00:00 GMT"
    return [
        ({"If-None-Match": etag}, 304),
        ({"If-None-Match": f"W/{etag}"}, 304),  # weak comparison
        ({"If-None-Match": f'"other", {etag}'}, 304),
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": '"other"'}, 200),
        ({"If-None-Match": etag, "Range": "bytes=0-9"}, 304),  # before the Range
        ({"If-Modified-Since": date}, 304),
        ({"If-Modified-Since": later}, 304),
        ({"If-Modified-Since": earlier}, 200),
        ({"If-Modified-Since": "yesterday"}, 200),  # not a date: ignored
        ({"If-None-Match": '"other"', "If-Modified-Since": later}, 200),  # the tag decides
        ({"If-Match": etag}, 200),
        ({"If-Match": "*"}, 200),
        ({"If-Match": '"other"'}, 412),
        ({"If-Match": f"W/{etag}"}, 412),  # strong comparison
        ({"If-Unmodified-Since": date}, 200),
        ({"If-Unmodified-Since": earlier}, 412),
        ({"If-Match": etag, "If-Unmodified-Since": earlier}, 200),  # the tag decides
        ({"If-Match": '"other"', "If-None-Match": etag}, 412),
    ]


def test_conditional_requests_are_evaluated(api: Api, stored: dict[str, Stored]) -> None:
    """RFC 9110 13.2.1: an origin server must evaluate the preconditions it receives; they
    were ignored (200 with the whole video every time, a DELETE with a failing If-Match
    went ahead)."""
    video = stored["c.mkv"]
    etag = f'"{video.hash}"'
    date = api.http.head(f"/video/{video.hash}").headers["last-modified"]
    for headers, status in _conditional_cases(etag, date):
        for method in ("GET", "HEAD"):
            response = api.http.request(method, f"/video/{video.hash}", headers=headers)
            assert response.status_code == status, (method, headers)
            if status == 304:  # what a cache needs to refresh its copy, and nothing else
                assert response.content == b""
                assert response.headers["etag"] == etag
                assert response.headers["cache-control"] == CACHE_CONTROL
                assert "content-length" not in response.headers
            elif status == 412 and method == "GET":
                assert "does not match" in response.json()["detail"] or \
                    "modified after" in response.json()["detail"]
            elif status == 200 and method == "GET":
                assert response.content == video.data
    for headers in ({"If-Match": '"other"'}, {"If-None-Match": etag},
                    {"If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}):
        assert api.http.delete(f"/video/{video.hash}", headers=headers).status_code == 412
    assert api.http.get(f"/video/{video.hash}").content == video.data  # not deleted
    unknown = api.http.get(f"/video/{'0' * 64}", headers={"If-None-Match": "*"})
    assert unknown.status_code == 404  # a precondition is no reason to answer otherwise


def test_meta_and_resolve(api: Api, stored: dict[str, Stored], media_url: str) -> None:
    video = stored["c.mkv"]
    meta = api.meta(video.hash).json()
    assert meta["hash"] == video.hash
    assert meta["size_bytes"] == len(video.data)
    assert meta["mime_type"] == "video/x-matroska"
    assert meta["file_path"].endswith(f"/{video.hash[:2]}/{video.hash[2:4]}/{video.hash}.mkv")
    assert f"{media_url}/c.mkv" in meta["aliases"]
    resolved = api.http.get("/resolve", params={"url": f"{media_url}/c.mkv"})
    assert resolved.json() == {"hash": video.hash, "url": f"{media_url}/c.mkv"}
    unknown = api.http.get("/resolve", params={"url": f"{media_url}/{unique('never')}"})
    assert unknown.status_code == 404 and "not ingested" in unknown.json()["detail"]


@pytest.mark.parametrize("bad", [
    "abc",
    "A" * 64,  # hashes are lowercase
    "g" * 64,
    "0" * 63,
    "0" * 65,
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2E%2E",
    "0" * 64 + ".mp4",
])
def test_malformed_hash_is_refused_before_any_lookup(api: Api, bad: str) -> None:
    for method, path in (("GET", f"/video/{bad}"), ("HEAD", f"/video/{bad}"),
                         ("DELETE", f"/video/{bad}"), ("GET", f"/meta/{bad}"),
                         ("GET", f"/video/{bad}/chunks")):
        response = api.http.request(method, path)
        assert response.status_code in (404, 422), (method, path)
        if method != "HEAD":
            detail = response.json()["detail"]
            assert "malformed hash" in detail or "no such endpoint" in detail


def test_unknown_hash_is_404_everywhere(api: Api) -> None:
    unknown = "0" * 64
    for method, path in (("GET", f"/video/{unknown}"), ("DELETE", f"/video/{unknown}"),
                         ("GET", f"/meta/{unknown}"), ("GET", f"/video/{unknown}/chunks")):
        response = api.http.request(method, path)
        assert response.status_code == 404
        assert unknown in response.json()["detail"]


def test_framework_errors_are_json_too(api: Api) -> None:
    missing = api.http.get("/no/such/endpoint")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no such endpoint: GET /no/such/endpoint"}
    wrong = api.http.put("/health")
    assert wrong.status_code == 405
    assert "GET" in wrong.json()["detail"] and "GET" in wrong.headers["allow"]
    missing_query = api.http.get("/resolve")
    assert missing_query.status_code == 422
    assert "url" in missing_query.json()["detail"]


def test_a_trailing_slash_is_no_such_endpoint(api: Api) -> None:
    """Not a redirect to the path without it (Starlette's default): its Location was built from
    the Host header, so behind a TLS proxy it sent clients to plain http://."""
    for method, path in (("GET", "/videos/"), ("GET", "/health/"), ("POST", "/ingest/")):
        response = api.http.request(method, path, headers={"Host": "cache.example"})
        assert response.status_code == 404, (path, response.headers)
        assert "location" not in response.headers
        assert response.json() == {"detail": f"no such endpoint: {method} {path}"}


def test_405_allows_every_method_of_the_path(api: Api) -> None:
    """Starlette named the methods of the first route whose path matched: PUT /video/{hash}
    said `Allow: GET`, though HEAD and DELETE are served there too (RFC 9110 15.5.6)."""
    for method, path, allowed in (("PUT", f"/video/{'0' * 64}", {"GET", "HEAD", "DELETE"}),
                                  ("POST", f"/video/{'0' * 64}", {"GET", "HEAD", "DELETE"}),
                                  ("PUT", f"/meta/{'0' * 64}", {"GET", "HEAD"}),
                                  ("HEAD", "/ingest", {"POST"}),
                                  ("GET", "/ingest", {"POST"})):
        response = api.http.request(method, path)
        assert response.status_code == 405, (method, path)
        assert set(response.headers["allow"].split(", ")) == allowed, (method, path)
        if method != "HEAD":
            assert response.json()["detail"].endswith(response.headers["allow"])


def _exchange(port: int, method: str, target: str,
              accept_encoding: str) -> tuple[bytes, list[tuple[str, str]], bytes]:
    """(status line, header fields but Date, body) of one request alone on a connection,
    everything the server sent: read to the end (Connection: close), so a body sent to a HEAD
    would show."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: "
                     f"{accept_encoding}\r\nConnection: close\r\n\r\n".encode())
        answer = read_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = [(name.strip().lower(), value.strip()) for name, _, value in
              (line.decode("latin-1").partition(":") for line in lines)]
    return status, [(name, value) for name, value in fields if name != "date"], body


def test_head_answers_as_get_on_every_json_route(vidcache_server: VidcacheServer,
                                                 stored: dict[str, Stored],
                                                 media_url: str) -> None:
    """RFC 9110 9.1: HEAD wherever GET. FastAPI's routes answer only the methods they name, so
    HEAD /health, /meta, /resolve, /videos, /chunks and /ingests were 405 `Allow: GET`. Now the
    GET's status and headers (Content-Length of the body GET sends, gzip for the digests when
    accepted), errors included, and no byte of body on the wire."""
    video, unknown = stored["b.mp4"], "0" * 64
    targets = ["/health", f"/meta/{video.hash}", f"/meta/{unknown}", "/meta/xyz",
               f"/resolve?url={media_url}/b.mp4", "/resolve?url=http://nowhere.test/a.mp4",
               "/videos?limit=2", "/videos?limit=0", f"/video/{video.hash}/chunks",
               f"/video/{video.hash}/chunks?start=-1", f"/video/{unknown}/chunks", "/ingests"]
    for target in targets:
        for accept_encoding in ("identity", "gzip"):
            status, fields, body = _exchange(vidcache_server.port, "GET", target,
                                             accept_encoding)
            assert body and dict(fields)["content-length"] == str(len(body)), target
            assert _exchange(vidcache_server.port, "HEAD", target,
                             accept_encoding) == (status, fields, b""), (target, accept_encoding)
    for accept_encoding, coding in (("identity", None), ("gzip", "gzip")):
        _, fields, _ = _exchange(vidcache_server.port, "HEAD", f"/video/{video.hash}/chunks",
                                 accept_encoding)
        assert dict(fields).get("content-encoding") == coding
    statuses = {_exchange(vidcache_server.port, "HEAD", target, "identity")[0].split()[1]
                for target in targets}
    assert statuses == {b"200", b"404", b"422"}
    # HEAD stays implied by GET in the API description: no operation doubled
    paths = httpx.get(f"{vidcache_server.url}/openapi.json").json()["paths"]
    assert {path for path, operations in paths.items() if "head" in operations} == {
        "/video/{content_hash}"}


def test_health_and_openapi(api: Api) -> None:
    health = api.http.get("/health").json()
    assert health["status"] == "ok"
    assert isinstance(health["videos"], int)
    spec = api.http.get("/openapi.json").json()
    for path in ("/ingest", "/resolve", "/meta/{content_hash}", "/video/{content_hash}",
                 "/video/{content_hash}/chunks", "/videos", "/health"):
        assert path in spec["paths"], path


def test_openapi_lists_the_error_statuses_each_operation_answers(api: Api) -> None:
    """As docs/service.md has them: an ingest answers 500 for an index it cannot read or
    update and a missing ffprobe, a delete 500 or 507 for an index or a data directory that
    cannot take it; a listing looks up no hash, so never answers 404."""
    paths = api.http.get("/openapi.json").json()["paths"]
    assert "500" in paths["/ingest"]["post"]["responses"]
    assert {"500", "507"} <= set(paths["/video/{content_hash}"]["delete"]["responses"])
    assert set(paths["/videos"]["get"]["responses"]) == {"200", "422", "500"}


def test_openapi_lists_the_500_of_an_unreadable_index_on_every_read(api: Api) -> None:
    """Every operation that reads the index answers 500 `cannot read the index ...` when it
    cannot (tests/test_service_index_errors.py), as a JSON error; the list of ingests under way
    reads none."""
    paths = api.http.get("/openapi.json").json()["paths"]
    reads = [("/health", "get"), ("/resolve", "get"), ("/meta/{content_hash}", "get"),
             ("/video/{content_hash}", "get"), ("/video/{content_hash}", "head"),
             ("/video/{content_hash}/chunks", "get"), ("/videos", "get")]
    for path, method in reads:
        answer = paths[path][method]["responses"].get("500")
        assert answer is not None, (path, method)
        assert answer["description"] == "the index cannot be read", (path, method)
        assert answer["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}, (path, method)
    assert "500" not in paths["/ingests"]["get"]["responses"]


# --- the hot path (vidcache/serving.py) -------------------------------------------------------

def _answer(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k != "date"}
    return response.status_code, headers, response.content


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_hot_path_answers_exactly_as_the_route(api: Api, stored: dict[str, Stored],
                                               method: str) -> None:
    """An If-Range with the ETag sends a request past the hot path to the route, which answers
    the same range: the two answers must not differ in anything but the date."""
    video = stored["big.mp4"]
    size = len(video.data)
    headers = [None, "bytes=0-0", "bytes=0-1048575", f"bytes={CHUNK - 10}-{3 * CHUNK + 10}",
               f"bytes={size - 5}-", "bytes=-300", f"bytes=-{size + 1}", f"bytes={size // 3}-"]
    for header in headers:
        ranged = {"Range": header} if header else {}
        fast = api.http.request(method, f"/video/{video.hash}", headers=ranged)
        routed = api.http.request(method, f"/video/{video.hash}",
                                  headers={**ranged, "If-Range": f'"{video.hash}"'})
        assert _answer(fast) == _answer(routed), header
        assert fast.status_code == (206 if header else 200)


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    """A server whose blobs these tests may delete, evict or remove."""
    with VidcacheServer(tmp_path_factory.mktemp("hot-path") / "data") as server:
        yield server


@pytest.fixture(scope="module")
def own_big(own_server: VidcacheServer, media_url: str) -> dict[str, str]:
    """big.mp4 stored in `own_server`: its ingest result."""
    with contextlib.closing(Api(own_server.url)) as api:
        return {k: str(v) for k, v in api.ingest_ok(f"{media_url}/big.mp4", "big").items()}


def test_cached_video_deleted_or_vanished_is_404(own_server: VidcacheServer,
                                                 media_url: str) -> None:
    with contextlib.closing(Api(own_server.url)) as api:
        first = api.ingest_ok(f"{media_url}/b.mp4", "hot")
        second = api.ingest_ok(f"{media_url}/c.mkv", "hot")
        for result in (first, second):  # served once: known to the hot path
            assert api.http.get(f"/video/{result['hash']}",
                                headers={"Range": "bytes=0-99"}).status_code == 206
        assert api.http.delete(f"/video/{first['hash']}").status_code == 204
        (own_server.data_dir / second["file_path"]).unlink()  # gone behind the service's back
        for content_hash in (first["hash"], second["hash"]):
            for ranged in ({}, {"Range": "bytes=0-99"}):
                response = api.http.get(f"/video/{content_hash}", headers=ranged)
                assert response.status_code == 404
                assert response.json() == {"detail": f"no video with hash {content_hash}"}
            assert api.http.head(f"/video/{content_hash}").status_code == 404
        again = api.ingest_ok(f"{media_url}/b.mp4", "elsewhere")  # stored at another path
        assert again["hash"] == first["hash"] and again["file_path"] != first["file_path"]
        response = api.http.get(f"/video/{first['hash']}", headers={"Range": "bytes=10-19"})
        assert response.content == (own_server.data_dir / again["file_path"]).read_bytes()[10:20]


def _in_page_cache(path: Path, offset: int) -> bool:
    """Whether the page of `path` holding byte `offset` is in the page cache, by mincore(2)
    on a mapping never touched. A read with RWF_NOWAIT cannot tell: on a miss, Linux 6.x
    starts reading that page in, so a second look may find it there."""
    page_start = offset - offset % mmap.PAGESIZE
    vector = ctypes.create_string_buffer(1)
    # ACCESS_COPY: ctypes needs a writable buffer; a private mapping never written copies nothing
    with path.open("rb") as file, mmap.mmap(file.fileno(), mmap.PAGESIZE, offset=page_start,
                                            access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        failed = _LIBC.mincore(ctypes.byref(start), ctypes.c_size_t(mmap.PAGESIZE), vector)
        del start  # the mapping cannot close while ctypes points into it
    if failed:
        raise OSError(ctypes.get_errno(), "mincore")
    return bool(vector.raw[0] & 1)


def _drop_from_page_cache(path: Path, start: int) -> bool:
    """Evict `path` from `start` on from the page cache; whether its page at `start` is out.
    A page someone holds for a moment is not dropped: try again for up to a second."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        deadline = time.monotonic() + 1
        while True:
            os.posix_fadvise(fd, start, 0, os.POSIX_FADV_DONTNEED)
            if not _in_page_cache(path, start):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no preadv(RWF_NOWAIT) here")
def test_bytes_not_in_the_page_cache_are_read_in_a_thread(
        own_server: VidcacheServer, own_big: dict[str, str], videos: dict[str, Path]) -> None:
    data = videos["big.mp4"].read_bytes()
    with contextlib.closing(Api(own_server.url)) as api:
        blob = own_server.data_dir / own_big["file_path"]
        url = f"/video/{own_big['hash']}"
        # half a chunk in the page cache, the rest not: one read is partly each
        start = 3 * CHUNK // 2
        if not _drop_from_page_cache(blob, 2 * CHUNK):
            pytest.skip("this file system keeps the pages (tmpfs?)")
        response = api.http.get(url, headers={"Range": f"bytes={start}-{start + CHUNK - 1}"})
        assert response.content == data[start:start + CHUNK]
        assert _drop_from_page_cache(blob, 0)
        assert api.http.get(url).content == data


def test_reading_stops_when_the_client_leaves(own_server: VidcacheServer,
                                               own_big: dict[str, str],
                                               videos: dict[str, Path]) -> None:
    size = videos["big.mp4"].stat().st_size
    assert size > 16 * CHUNK
    server, content_hash = own_server, own_big["hash"]
    assert server.process is not None
    io_file = Path(f"/proc/{server.process.pid}/io")

    def bytes_read_when_settled() -> int:
        """The server's rchar (what its read(2)/pread(2)/preadv(2) calls returned) once
        it stayed the same for 0.2 s."""
        seen: list[int] = []

        def settled() -> bool:
            seen.append(int(io_file.read_text().split("rchar:")[1].split()[0]))
            return len(seen) >= 3 and seen[-1] == seen[-3]

        wait_until(settled, timeout=30, interval=0.1, what="the server's reads settle")
        return seen[-1]

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET /video/{content_hash} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # the server has filled the socket's buffers and waits for the reader
        waiting = bytes_read_when_settled()
        # the reader leaves with a reset, as a player that was closed does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    left = bytes_read_when_settled()
    assert left - waiting <= 2 * CHUNK, "kept reading the file for a client that left"
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.fixture(scope="module")
def stalled_reads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/stalled_reads.c built with cc: the LD_PRELOAD library of a disk that does not
    answer the reads of the blobs while a gate file exists. Skips the test without cc."""
    return preload_library("stalled_reads", tmp_path_factory.mktemp("stalled-reads"))


class _StalledDiskServer(VidcacheServer):
    """The real service over stalled_reads.c: while `stall_dir`/gate exists, its reads of
    .mp4 blobs wait (each waiting thread leaves `stall_dir`/stalled-TID)."""

    def __init__(self, data_dir: Path, library: Path, stall_dir: Path) -> None:
        super().__init__(data_dir)
        self.library, self.stall_dir = library, stall_dir

    def environment(self) -> dict[str, str]:
        return {**os.environ, "LD_PRELOAD": str(self.library),
                "VIDCACHE_STALL_DIR": str(self.stall_dir), "VIDCACHE_STALL_SUFFIX": ".mp4"}


def test_a_shutdown_cancelling_reads_that_wait_for_a_thread_leaves_no_descriptor(
        tmp_path: Path, media_url: str, stalled_reads: Path) -> None:
    """A slow disk and more readers than worker threads: some reads of a cold page run in the
    threads, the others wait for one. uvicorn's shutdown cancels the requests still running
    when its grace period is over; a read cancelled while waiting never runs. Was: the
    duplicate of the blob's descriptor made for that read was left open, one per such request;
    now only the reads that are running hold one, each its own. After Ctrl-C the
    process waits for those before it exits, which is when this looks (after SIGTERM it ends
    at once, taking any descriptor with it)."""
    readers = 40  # more than asyncio's default executor ever has threads (32)
    stall_dir = tmp_path / "stall"
    stall_dir.mkdir()
    server = _StalledDiskServer(tmp_path / "data", stalled_reads, stall_dir)
    with server, contextlib.ExitStack() as stack:
        assert server.process is not None
        pid = server.process.pid
        with contextlib.closing(Api(server.url)) as api:
            stored = api.ingest_ok(f"{media_url}/big.mp4", "stalled")
            url = f"/video/{stored['hash']}"
            assert api.http.get(url, headers={"Range": "bytes=0-9"}).status_code == 206
        blob = server.data_dir / stored["file_path"]
        (stall_dir / "gate").touch()
        for _ in range(readers):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port)))
            sock.sendall(f"GET {url} HTTP/1.1\r\nHost: v\r\nRange: bytes=0-{4 * CHUNK - 1}"
                         f"\r\n\r\n".encode())
        # each request holds the blob open, and a duplicate lent to its first read
        wait_until(lambda: open_descriptors(pid).count(str(blob)) == 2 * readers, timeout=30,
                   what="every request's first read begun or waiting for a thread")
        server.process.send_signal(signal.SIGINT)

        def only_running_reads_hold_the_blob() -> bool:
            running = len(list(stall_dir.glob("stalled-*")))
            return 0 < running < readers and open_descriptors(pid).count(str(blob)) == running

        try:
            wait_until(only_running_reads_hold_the_blob, timeout=30,
                       what="the cancelled requests' descriptors closed")
        finally:
            (stall_dir / "gate").unlink()
        assert f"Cancel {readers} running task(s)" in server.log()
        server.process.wait(timeout=30)


def test_a_known_video_still_needs_the_token(tmp_path: Path, media_url: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    server = VidcacheServer(tmp_path / "data", "--token-file", str(token_file), "--token-reads")
    bearer = {"Authorization": "Bearer s3cret-token"}
    with server, httpx.Client(base_url=server.url, timeout=60) as http:
        result = http.post("/ingest", headers=bearer,
                           json={"url": f"{media_url}/b.mp4", "bucket": "guarded"}).json()
        url = f"/video/{result['hash']}"
        assert http.get(url, headers={**bearer, "Range": "bytes=0-9"}).status_code == 206
        for method in ("GET", "HEAD"):
            for extra in ({}, {"Range": "bytes=0-9"}, {"Authorization": "Bearer wrong"}):
                refused = http.request(method, url, headers=extra)
                assert refused.status_code == 401, (method, extra)
                if method == "GET":
                    assert "bearer token" in refused.json()["detail"]
