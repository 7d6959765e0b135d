"""The ingest pipeline of the real vidcache service over HTTP: every status path, aliases,
delete, concurrent ingests and every kind of bad input.

Tests whose outcome depends on what is already stored run against services of this module's
own (`own`, `fresh`); stateless error paths use the session's `vidcache_server`. Note for other
modules: a_small.mp4 is a perceptual duplicate of a.mp4, so it is only ingested here, into
services of our own, never into the shared one (it would make a.mp4 a duplicate there).
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import os
import shutil
import socket
import ssl
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.service_support import (
    Api,
    api_fixture,
    blob_files,
    digest,
    keep_alive_origin,
    serve_origin,
    store_many,
    temp_files,
    unique,
)
from tests.support import (
    ESTABLISHED,
    VidcacheServer,
    free_port,
    self_signed_certificate,
    sockets_to_loopback,
    wait_until,
)
from vidcache.chunks import DEFAULT_CHUNK_SIZE
from vidcache.download import ORIGIN_KEEPALIVE, Downloader
from vidcache.hostguard import HostGuard
from vidcache.progress import IngestBoard

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    with VidcacheServer(tmp_path_factory.mktemp("svc-own") / "data") as server:
        yield server


own_api = api_fixture(upstream="own", name="own_api")


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[VidcacheServer, Api]]:
    """A service of this test's own, empty at the start."""
    with VidcacheServer(tmp_path / "data") as server:
        api = Api(server.url)
        yield server, api
        api.close()


api = api_fixture()


@pytest.fixture(scope="module")
def stored_a(own_api: Api, media_url: str) -> dict[str, Any]:
    """a.mp4 ingested first into `own` (bucket `status`), with client meta."""
    return own_api.ingest_ok(f"{media_url}/a.mp4", "status", meta={"title": "A", "n": 1})


@pytest.fixture(scope="module")
def stored_c(own_api: Api, media_url: str) -> dict[str, Any]:
    """c.mkv ingested into `own`, bucket `status`, prefix `p1`."""
    return own_api.ingest_ok(f"{media_url}/c.mkv", "status", prefix="p1")


# --- status paths -------------------------------------------------------------------------------

def test_new_video_is_stored_under_its_blake3_with_meta(
        stored_a: dict[str, Any], own: VidcacheServer, own_api: Api, media_url: str,
        videos: dict[str, Path]) -> None:
    source = videos["a.mp4"].read_bytes()
    h = digest(source)
    assert stored_a == {"hash": h, "status": "new",
                        "file_path": f"status/{h[:2]}/{h[2:4]}/{h}.mp4"}
    assert (own.data_dir / stored_a["file_path"]).read_bytes() == source

    meta = own_api.meta(h).json()
    first_seen = datetime.fromisoformat(meta.pop("first_seen"))
    assert first_seen.tzinfo is not None and first_seen.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - first_seen).total_seconds()) < 3600
    assert meta.pop("duration_s") == pytest.approx(6.0, abs=0.1)
    assert meta == {"hash": h, "size_bytes": len(source), "aliases": [f"{media_url}/a.mp4"],
                    "meta": {"title": "A", "n": 1}, "bucket": "status", "prefix": "",
                    "file_path": stored_a["file_path"], "mime_type": "video/mp4"}


def test_same_url_again_is_url_alias(stored_a: dict[str, Any], own_api: Api,
                                     media_url: str) -> None:
    again = own_api.ingest_ok(f"{media_url}/a.mp4", unique("other"), meta={"ignored": True})
    assert again == {**stored_a, "status": "url_alias"}
    assert own_api.meta(stored_a["hash"]).json()["meta"] == {"title": "A", "n": 1}


def test_same_bytes_from_a_new_url_is_exact_duplicate(stored_a: dict[str, Any], own_api: Api,
                                                      own: VidcacheServer,
                                                      media_url: str) -> None:
    url = f"{media_url}/a.mp4?copy={unique('q')}"
    result = own_api.ingest_ok(url, unique("other"))
    assert result == {**stored_a, "status": "duplicate"}  # no phash_distance for exact
    assert url in own_api.meta(stored_a["hash"]).json()["aliases"]
    assert own_api.http.get("/resolve", params={"url": url}).json() == {
        "hash": stored_a["hash"], "url": url}
    assert [p.name for p in blob_files(own.data_dir)].count(f"{stored_a['hash']}.mp4") == 1


def test_reencode_is_perceptual_duplicate(stored_a: dict[str, Any], own_api: Api,
                                          own: VidcacheServer, media_url: str,
                                          videos: dict[str, Path]) -> None:
    url = f"{media_url}/a_small.mp4?{unique('q')}"
    result = own_api.ingest_ok(url, unique("small"))
    assert result["status"] == "duplicate"
    assert result["hash"] == stored_a["hash"]
    assert result["file_path"] == stored_a["file_path"]
    assert isinstance(result["phash_distance"], int)
    assert 0 <= result["phash_distance"] <= 10
    assert url in own_api.meta(stored_a["hash"]).json()["aliases"]
    small_hash = digest(videos["a_small.mp4"].read_bytes())
    assert own_api.meta(small_hash).status_code == 404
    assert not any(small_hash in p.name for p in blob_files(own.data_dir))
    assert temp_files(own.data_dir) == []


def test_different_video_stays_new(stored_a: dict[str, Any], stored_c: dict[str, Any],
                                   own_api: Api, videos: dict[str, Path]) -> None:
    h = digest(videos["c.mkv"].read_bytes())
    assert stored_c == {"hash": h, "status": "new",
                        "file_path": f"status/p1/{h[:2]}/{h[2:4]}/{h}.mkv"}
    meta = own_api.meta(h).json()
    assert (meta["mime_type"], meta["prefix"], meta["meta"]) == ("video/x-matroska", "p1", {})


def test_delete_removes_blob_record_and_aliases(own: VidcacheServer, own_api: Api,
                                                media_url: str, videos: dict[str, Path]) -> None:
    bucket = unique("del")
    urls = [f"{media_url}/b.mp4", f"{media_url}/b.mp4?{unique('q')}"]
    first = own_api.ingest_ok(urls[0], bucket)
    assert own_api.ingest_ok(urls[1], bucket)["status"] == "duplicate"
    h = first["hash"]
    assert h == digest(videos["b.mp4"].read_bytes())
    blob = own.data_dir / first["file_path"]
    assert blob.is_file()

    response = own_api.http.delete(f"/video/{h}")
    assert (response.status_code, response.content) == (204, b"")
    assert not blob.exists()
    assert not (own.data_dir / bucket).exists()  # emptied directories go too
    for path in (f"/meta/{h}", f"/video/{h}", f"/video/{h}/chunks"):
        assert own_api.http.get(path).status_code == 404, path
    for url in urls:
        assert own_api.http.get("/resolve", params={"url": url}).status_code == 404
    assert h not in [item["hash"] for item in own_api.http.get("/videos").json()["items"]]
    second = own_api.http.delete(f"/video/{h}")
    assert second.status_code == 404 and h in second.json()["detail"]

    # nothing of it is remembered: the same URL is ingested afresh
    again = own_api.ingest_ok(urls[0], bucket)
    assert (again["status"], again["hash"]) == ("new", h)
    assert own_api.meta(h).json()["aliases"] == [urls[0]]


def test_listing_filters_and_paginates(stored_a: dict[str, Any], stored_c: dict[str, Any],
                                       own_api: Api) -> None:
    def listing(**params: Any) -> dict[str, Any]:
        response = own_api.http.get("/videos", params=params)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    expected = sorted([stored_a["hash"], stored_c["hash"]])
    in_bucket = listing(bucket="status")
    assert [item["hash"] for item in in_bucket["items"]] == expected
    assert in_bucket["next"] is None
    assert in_bucket["items"][0] == own_api.meta(expected[0]).json()

    assert [i["hash"] for i in listing(bucket="status", prefix="p1")["items"]] == [
        stored_c["hash"]]
    assert [i["hash"] for i in listing(bucket="status", prefix="")["items"]] == [
        stored_a["hash"]]
    assert listing(bucket=unique("empty"))["items"] == []

    page1 = listing(bucket="status", limit=1)
    assert [i["hash"] for i in page1["items"]] == expected[:1]
    assert page1["next"] == expected[0]
    page2 = listing(bucket="status", limit=1, after=page1["next"])
    assert [i["hash"] for i in page2["items"]] == expected[1:]
    assert page2["next"] is None

    everything = listing(limit=1000)["items"]
    assert [i["hash"] for i in everything] == sorted(i["hash"] for i in everything)
    for params in ({"limit": 0}, {"limit": 1001}, {"after": "xyz"}, {"bucket": "../x"},
                   {"bucket": ""}, {"prefix": "a/b"}):
        response = own_api.http.get("/videos", params=params)
        assert response.status_code == 422, params
        assert isinstance(response.json()["detail"], str)


def test_a_page_of_large_meta_ends_early(tmp_path: Path) -> None:
    """`meta` may be 64 KiB a video: a page of 1000 such was one 64 MB answer (and several
    times that in the server's memory while it was built). A page now ends once its items'
    meta passes 4 MiB, and `next` goes on from there: every video once, in order."""
    data = tmp_path / "data"
    notes = json.dumps({"notes": "n" * 60_000})
    hashes = store_many(data, 200, meta=notes)
    with VidcacheServer(data) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        pages: list[list[str]] = []
        after: str | None = None
        while len(pages) < 10:
            answer = http.get("/videos", params={"limit": 1000, **({"after": after} if after
                                                                   else {})})
            assert answer.status_code == 200, answer.text
            assert len(answer.content) < 5 << 20, len(answer.content)  # 12 MB in one before
            page = answer.json()
            pages.append([item["hash"] for item in page["items"]])
            assert all(item["meta"] == {"notes": "n" * 60_000} for item in page["items"])
            after = page["next"]
            if after is None:
                break
            assert after == pages[-1][-1]
        assert [h for page in pages for h in page] == sorted(hashes)
        assert len(pages) == 3, [len(page) for page in pages]  # 4 MiB: 69 of 60 KB each


# --- concurrency ----------------------------------------------------------------------------------

def _parallel(count: int, task: Any) -> list[dict[str, Any]]:
    barrier = threading.Barrier(count)

    def run(i: int) -> dict[str, Any]:
        barrier.wait(timeout=30)
        result: dict[str, Any] = task(i)
        return result

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_ingests_of_one_url_store_one_video(
        fresh: tuple[VidcacheServer, Api], media_url: str) -> None:
    server, api = fresh
    url = f"{media_url}/a.mp4"
    results = _parallel(6, lambda _i: api.ingest_ok(url, "race"))
    assert collections.Counter(r["status"] for r in results) == {"new": 1, "url_alias": 5}
    assert len({r["hash"] for r in results}) == 1
    assert [p.name for p in blob_files(server.data_dir)] == [f"{results[0]['hash']}.mp4"]
    assert len(api.http.get("/videos").json()["items"]) == 1
    assert api.meta(results[0]["hash"]).json()["aliases"] == [url]


def test_concurrent_ingests_of_the_same_bytes_store_one_video(
        fresh: tuple[VidcacheServer, Api], media_url: str) -> None:
    server, api = fresh
    urls = [f"{media_url}/b.mp4?n={i}" for i in range(6)]
    results = _parallel(6, lambda i: api.ingest_ok(urls[i], "race"))
    assert collections.Counter(r["status"] for r in results) == {"new": 1, "duplicate": 5}
    assert len({r["hash"] for r in results}) == 1
    assert len(blob_files(server.data_dir)) == 1
    assert sorted(api.meta(results[0]["hash"]).json()["aliases"]) == sorted(urls)


def test_concurrent_reencodes_store_one_video(fresh: tuple[VidcacheServer, Api],
                                              media_url: str) -> None:
    server, api = fresh
    urls = [f"{media_url}/a.mp4", f"{media_url}/a_small.mp4"] * 2
    urls = [f"{url}?n={i}" for i, url in enumerate(urls)]
    results = _parallel(4, lambda i: api.ingest_ok(urls[i], "race"))
    assert collections.Counter(r["status"] for r in results) == {"new": 1, "duplicate": 3}
    assert len({r["hash"] for r in results}) == 1
    assert len(blob_files(server.data_dir)) == 1


# --- bad input ------------------------------------------------------------------------------------

def _assert_error(response: Any, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for fragment in fragments:
        assert fragment in detail, detail


@pytest.mark.parametrize(("url", "fragment"), [
    ("", "malformed URL"),
    ("not a url", "malformed URL"),
    ("example.com/video.mp4", "absolute"),
    ("/srv/videos/v.mp4", "a file on the server: file:///srv/videos/v.mp4"),
    ("ftp://example.com/v.mp4", "unsupported URL scheme 'ftp'"),
    ("http:///v.mp4", "no host"),
    ("http://[::1/v.mp4", "malformed URL"),
])
def test_malformed_url_is_422(api: Api, url: str, fragment: str) -> None:
    _assert_error(api.ingest(url, unique("bad")), 422, fragment)


@pytest.mark.parametrize(("bucket", "prefix"), [
    ("", ""), ("..", ""), (".", ""), ("a/b", ""), ("/abs", ""), (".hidden", ""), ("x" * 129, ""),
    ("ok", ".."), ("ok", "a/b"), ("ok", "/abs"), ("ok", "../up"), ("ok", "sp ace"),
    ("-opt", ""), ("ok", "-opt"),
])
def test_bad_bucket_or_prefix_is_422_and_fetches_nothing(
        api: Api, vidcache_server: VidcacheServer, bucket: str, prefix: str) -> None:
    before = blob_files(vidcache_server.data_dir)
    # the URL would fail differently (connection refused) if it were fetched
    response = api.ingest(f"http://127.0.0.1:{free_port()}/v.mp4", bucket, prefix)
    _assert_error(response, 422, "bucket" if prefix == "" else "prefix")
    assert blob_files(vidcache_server.data_dir) == before


def test_missing_fields_and_bad_json_are_422(api: Api) -> None:
    _assert_error(api.http.post("/ingest", json={"url": "http://x/"}), 422, "bucket")
    _assert_error(api.http.post("/ingest", content=b"{nope",
                                headers={"Content-Type": "application/json"}), 422, "JSON")
    _assert_error(api.http.post("/ingest", json={"url": "http://x/", "bucket": "b",
                                                 "meta": [1]}), 422, "meta")


def test_unreachable_host_is_502(api: Api) -> None:
    url = f"http://127.0.0.1:{free_port()}/v.mp4"
    _assert_error(api.ingest(url, unique("bad")), 502, "cannot connect", url)


def test_unresolvable_host_is_502(api: Api) -> None:
    _assert_error(api.ingest("http://no-such-host.invalid/v.mp4", unique("bad")), 502,
                  "cannot resolve", "no-such-host.invalid")


def test_origin_error_status_is_502(api: Api, media_url: str) -> None:
    _assert_error(api.ingest(f"{media_url}/missing.mp4", unique("bad")), 502, "answered 404")


def test_non_video_is_422_and_leaves_nothing(api: Api, vidcache_server: VidcacheServer,
                                             media_url: str) -> None:
    url = f"{media_url}/notvideo.bin"
    _assert_error(api.ingest(url, unique("bad")), 422, "not a video: ")
    assert api.http.get("/resolve", params={"url": url}).status_code == 404
    assert temp_files(vidcache_server.data_dir) == []


@pytest.mark.parametrize("host", ["127.0.0.2", "[::1]", "169.254.169.254", "10.1.2.3"])
def test_loopback_private_and_link_local_hosts_are_refused(api: Api, host: str) -> None:
    response = api.ingest(f"http://{host}:{free_port()}/v.mp4", unique("ssrf"))
    _assert_error(response, 403, "refusing to download", "--ingest-allow",
                  "VIDCACHE_INGEST_ALLOW")


def test_file_urls_are_refused_by_default(api: Api, videos: dict[str, Path]) -> None:
    _assert_error(api.ingest(videos["c.mkv"].as_uri(), unique("file")), 403, "--allow-file-dir")


def test_redirects_are_followed_and_checked(api: Api, videos: dict[str, Path]) -> None:
    with serve_origin(videos["b.mp4"].parent) as (origin, _stalled):
        result = api.ingest_ok(f"{origin}/redirect/3/b.mp4", unique("redir"))
        assert result["hash"] == digest(videos["b.mp4"].read_bytes())
        _assert_error(api.ingest(f"{origin}/redirect/9/b.mp4", unique("redir")), 502,
                      "redirects")
        to_private = f"http://127.0.0.2:{free_port()}/b.mp4"
        _assert_error(api.ingest(f"{origin}/redirect-to?{to_private}", unique("redir")), 403,
                      "127.0.0.2")
        to_file = videos["b.mp4"].as_uri()
        _assert_error(api.ingest(f"{origin}/redirect-to?{to_file}", unique("redir")), 403,
                      "file://")


@pytest.mark.parametrize(("location", "fragment"), [
    ("http://user:l0cated@h.test:abc/b.mp4", "a malformed URL 'http://h.test:abc/b.mp4': "),
    ("http://user:l0cated@127.0.0.1:99999/b.mp4", "a URL ingest refuses: malformed URL "
                                                  "'http://127.0.0.1:99999/b.mp4': port "),
    ("ftp://user:l0cated@127.0.0.1/b.mp4", "a URL ingest refuses: unsupported URL scheme"),
], ids=["unjoinable", "port", "scheme"])
def test_a_redirect_to_a_url_ingest_cannot_fetch_is_the_origins_fault(
        api: Api, videos: dict[str, Path], location: str, fragment: str) -> None:
    """502 naming the Location without its credentials; was 500 (httpx's InvalidURL, from
    joining it, escaped) or 422, as if the request's URL were malformed."""
    with serve_origin(videos["b.mp4"].parent) as (origin, _stalled):
        answer = api.ingest(f"{origin}/redirect-to?{location}", unique("redir"))
    _assert_error(answer, 502, f"{origin}/redirect-to?", f" redirects to {fragment}")
    assert answer.text.count("l0cated") == 1, answer.text  # in the query of the URL given


def test_a_gzip_encoded_body_is_stored_decoded(api: Api, videos: dict[str, Path]) -> None:
    """An origin that gzips the body whatever the client accepts (S3 serves an object stored
    with Content-Encoding: gzip so): the video is what is stored, as httpx decoded it before
    downloads went to httpcore directly (then the gzip bytes were stored: 422 'not a video')."""
    with serve_origin(videos["b.mp4"].parent) as (origin, _stalled):
        result = api.ingest_ok(f"{origin}/gzip/b.mp4", unique("gzip"))
    assert result["hash"] == digest(videos["b.mp4"].read_bytes())


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _gzip_members(data: bytes) -> bytes:
    return gzip.compress(data[:len(data) // 2]) + gzip.compress(data[len(data) // 2:])


# An object stored encoded: (its Content-Encoding, its bytes from the video's)
_ENCODED: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "deflate": ("deflate", zlib.compress),
    "raw-deflate": ("deflate", _raw_deflate),
    "gzip-members": ("gzip", _gzip_members),
    "gzip-padded": ("gzip", lambda data: gzip.compress(data) + bytes(70_000)),
    "x-gzip": ("x-gzip", gzip.compress),
    "gzip-of-deflate": ("deflate, gzip", lambda data: gzip.compress(zlib.compress(data))),
}


@pytest.mark.parametrize("how", list(_ENCODED))
def test_an_encoded_body_is_stored_decoded(api: Api, videos: dict[str, Path], tmp_path: Path,
                                           how: str) -> None:
    """deflate (zlib's format or raw) as httpx decoded it; gzip members one after another, as
    `gzip -d` does (httpx stored the first alone: a video cut in half), and zero bytes after
    the last skipped as padding, as `gzip -d` skips them; x-gzip (RFC 9110's alias, stored
    encoded by httpx: 422 'not a video') and two codings in a row."""
    coding, encode = _ENCODED[how]
    (tmp_path / "b.enc").write_bytes(encode(videos["b.mp4"].read_bytes()))
    with serve_origin(tmp_path) as (origin, _stalled):
        result = api.ingest_ok(f"{origin}/stored-as/{quote(coding)}/b.enc", unique("coded"))
    assert result["hash"] == digest(videos["b.mp4"].read_bytes())


@pytest.mark.parametrize(("coding", "encode", "fragment"), [
    ("br", bytes, "Content-Encoding 'br' is not decoded by the service"),
    ("zstd", bytes, "Content-Encoding 'zstd' is not decoded by the service"),
    ("compress", bytes, "Content-Encoding 'compress' is not decoded by the service"),
    ("gzip", lambda data: gzip.compress(data)[:-16], "the gzip stream ends early"),
    ("deflate", lambda data: zlib.compress(data) + b"junk",
     "data after the end of the deflate stream"),
], ids=["br", "zstd", "compress", "gzip-cut", "deflate-trailing"])
def test_a_body_the_service_cannot_decode_whole_is_the_origins_fault(
        api: Api, videos: dict[str, Path], tmp_path: Path, coding: str,
        encode: Callable[[bytes], bytes], fragment: str) -> None:
    """502 naming the coding or what is wrong with its data, nothing stored. Was: a coding httpx
    does not decode (br and zstd without their packages) stored encoded as if it were the
    video (here the video itself, labelled so: stored); a gzip body cut short (its Content-
    Length that of the cut body) taken as far as it went, and bytes after a deflate stream
    ignored: 200 all three."""
    (tmp_path / "b.enc").write_bytes(encode(videos["b.mp4"].read_bytes()))
    with serve_origin(tmp_path) as (origin, _stalled):
        answer = api.ingest(f"{origin}/stored-as/{coding}/b.enc", unique("undecoded"))
    _assert_error(answer, 502, f"download of {origin}/stored-as/{coding}/b.enc failed: "
                  f"{fragment}")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "deflate, gzip"])
def test_an_empty_encoded_body_is_refused_as_an_empty_one(api: Api, tmp_path: Path,
                                                          coding: str) -> None:
    """An empty body labelled with a coding (Content-Length: 0) holds no stream to be cut
    short: 422 'not a video', as the same body unlabelled. (Was 502 'the gzip stream ends
    early: the body is cut short' since the service decodes bodies itself; httpx's decoder
    gave the empty file the validation refused.)"""
    (tmp_path / "empty.mp4").write_bytes(b"")
    with serve_origin(tmp_path) as (origin, _stalled):
        plain = api.ingest(f"{origin}/empty.mp4", unique("empty"))
        labelled = api.ingest(f"{origin}/stored-as/{quote(coding)}/empty.mp4", unique("empty"))
    _assert_error(plain, 422, "not a video: ")
    assert (labelled.status_code, labelled.json()) == (plain.status_code, plain.json())


def _peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_a_gzip_bomb_stops_at_max_size_without_taking_the_memory(
        tmp_path: Path, videos: dict[str, Path]) -> None:
    """255 KiB of gzip inflating to 256 MiB of zeros, onto --max-size 2 MiB: 413, and the
    service's peak RSS grows by less than 16 MiB (the body is decoded 256 KiB at a time, each
    piece checked before the next). Was: httpx inflated each piece received whole before the
    size check saw a byte, ~64 MiB from one 64 KiB piece: the peak grew by 100 MiB or more."""
    origin_dir = tmp_path / "origin"
    origin_dir.mkdir()
    (origin_dir / "bomb.gz").write_bytes(gzip.compress(bytes(256 * 1024 * 1024)))
    (origin_dir / "b.gz").write_bytes(gzip.compress(videos["b.mp4"].read_bytes()))
    assert videos["b.mp4"].stat().st_size < 2 * 1024 * 1024
    with (VidcacheServer(tmp_path / "data", "--max-size", str(2 * 1024 * 1024)) as server,
          serve_origin(origin_dir) as (origin, _stalled)):
        assert server.process is not None
        api = Api(server.url)
        try:
            # a gzip ingest first: what any ingest needs in memory is in the peak already
            api.ingest_ok(f"{origin}/stored-as/gzip/b.gz", unique("bomb"))
            before = _peak_rss(server.process.pid)
            _assert_error(api.ingest(f"{origin}/stored-as/gzip/bomb.gz", unique("bomb")), 413,
                          "larger than the server's --max-size of 2 MiB (2097152 bytes)")
            growth = _peak_rss(server.process.pid) - before
        finally:
            api.close()
    assert growth < 16 * 1024 * 1024, f"the peak RSS grew by {growth / 1024 / 1024:.1f} MiB"


def test_credentials_in_the_url_are_sent_as_basic_auth(api: Api,
                                                       videos: dict[str, Path]) -> None:
    """http://user:password@host/...: sent as HTTP Basic credentials, as httpx sent them before
    downloads went to httpcore directly (then the origin's 401: 502). The video's alias is the
    URL without them: ingesting it again, with them, other ones or none, is `url_alias`, and
    /resolve finds it either way (was: stored as given, so the URL without them downloaded
    again, the origin's 401, and /resolve found only the URL with them); the aliases shown to
    readers, by /meta and /videos, leave them out (they were shown whole)."""
    with serve_origin(videos["b.mp4"].parent) as (origin, _stalled):
        _assert_error(api.ingest(f"{origin}/auth/b.mp4", unique("auth")), 502, "401")
        url = origin.replace("http://", "http://user:secret@") + "/auth/b.mp4"
        result = api.ingest_ok(url, unique("auth"))
        assert result["hash"] == digest(videos["b.mp4"].read_bytes())
        for again in (url, f"{origin}/auth/b.mp4", url.replace("user:secret", "other:pw")):
            assert api.ingest_ok(again, unique("auth"))["status"] == "url_alias", again
    for lookup in (url, f"{origin}/auth/b.mp4"):
        resolved = api.http.get("/resolve", params={"url": lookup})
        assert resolved.json() == {"hash": result["hash"], "url": f"{origin}/auth/b.mp4"}
    before = f"{int(result['hash'], 16) - 1:064x}"
    listed = api.http.get("/videos", params={"after": before, "limit": 1}).json()["items"]
    for shown in (api.meta(result["hash"]).json(), *listed):
        assert shown["hash"] == result["hash"]
        assert f"{origin}/auth/b.mp4" in shown["aliases"], shown["aliases"]
        assert not any("secret" in alias for alias in shown["aliases"]), shown["aliases"]


def test_credentials_in_the_url_are_never_shown(api: Api, vidcache_server: VidcacheServer,
                                                videos: dict[str, Path]) -> None:
    """An ingest refused with the URL in its reason (the origin's 401, a port out of range, an
    empty scheme, a leading space) names the URL without its `user:password@`, in the answer
    and in the server's log; so does the access log line of a /resolve of such a URL."""
    with serve_origin(videos["b.mp4"].parent) as (origin, _stalled):
        refused = api.ingest(origin.replace("http://", "http://user:hunter2@") + "/auth/b.mp4",
                             unique("auth"))
        _assert_error(refused, 502, f"{origin}/auth/b.mp4 answered 401")
    malformed = api.ingest("http://user:hunter2@127.0.0.1:99999/b.mp4", unique("auth"))
    _assert_error(malformed, 422, "'http://127.0.0.1:99999/b.mp4'")
    # refused for an empty scheme (httpx reads the credentials) or a leading space
    no_scheme = api.ingest("://user:hunter2@127.0.0.1/b.mp4", unique("auth"))
    _assert_error(no_scheme, 422, "'://127.0.0.1/b.mp4'")
    spaced = api.ingest(" http://user:hunter2@127.0.0.1/b.mp4", unique("auth"))
    _assert_error(spaced, 422, "' http://127.0.0.1/b.mp4'")
    assert "hunter2" not in refused.text + malformed.text + no_scheme.text + spaced.text
    # /resolve's 404 and its access log line name the URL without them (the 404 named it whole)
    unknown = api.http.get("/resolve", params={"url": "http://user:hunter2@h.test/v"})
    _assert_error(unknown, 404, "URL not ingested: http://h.test/v")
    assert "hunter2" not in unknown.text
    wait_until(lambda: "127.0.0.1:99999/b.mp4" in vidcache_server.log(), timeout=10,
               what="the refusal in the server's log")
    wait_until(lambda: '"GET /resolve?url=http%3A%2F%2Fh.test%2Fv HTTP/1.1" 404'
               in vidcache_server.log(), timeout=10, what="the lookup in the access log")
    assert "hunter2" not in vidcache_server.log()


def test_an_https_origins_certificate_is_checked_for_each_host_name(
        tmp_path: Path, videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An https origin whose certificate names 127.0.0.1 only, trusted through SSL_CERT_FILE
    (as a company's own CA would be): ingest by that address works, and ingest by `localhost`
    right after, the same address, is refused on the certificate. Before: the first download's
    kept-alive connection, verified for 127.0.0.1, served `localhost` unchecked (stored)."""
    if "127.0.0.1" not in {info[4][0] for info in socket.getaddrinfo("localhost", 443)}:
        pytest.skip("localhost is not 127.0.0.1 on this machine")
    cert, key = self_signed_certificate(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the server inherits it
    with (serve_origin(videos["b.mp4"].parent, tls=tls) as (origin, _stalled),
          VidcacheServer(tmp_path / "data") as server):
        api = Api(server.url)
        try:
            by_address = api.ingest_ok(f"{origin}/a.mp4", "tls")
            port = origin.rpartition(":")[2]
            by_name = api.ingest(f"https://localhost:{port}/b.mp4", "tls")
        finally:
            api.close()
    assert by_address["hash"] == digest(videos["a.mp4"].read_bytes())
    _assert_error(by_name, 502, "CERTIFICATE_VERIFY_FAILED")

# --- connections to origins -----------------------------------------------------------------------

def test_downloads_close_together_share_a_connection_that_then_closes(
        tmp_path: Path, videos: dict[str, Path]) -> None:
    """Downloads from one origin one right after the other reuse one kept-alive connection;
    once none has come for its keep-alive time (ORIGIN_KEEPALIVE), it is closed. Was: kept
    until the next download, however late."""
    downloader = Downloader(tmp_dir=tmp_path, max_size=1 << 30, timeout=30, max_time=60,
                            guard=HostGuard(["127.0.0.1"]), chunk_size=DEFAULT_CHUNK_SIZE)
    try:
        with keep_alive_origin(videos["b.mp4"].parent) as (origin, accepted):
            port = int(origin.rpartition(":")[2])
            for name in ("b.mp4", "c.mkv", "b.mp4"):
                url = f"{origin}/{name}"
                with IngestBoard().track(url, "kept", "") as progress, \
                        downloader.fetch(url, progress) as download:
                    assert download.content_hash == digest(videos[name].read_bytes())
            assert accepted() == 1
            wait_until(lambda: sockets_to_loopback(port, ESTABLISHED, pid=os.getpid()) == 0,
                       timeout=ORIGIN_KEEPALIVE + 25, what="the idle connection closed")
    finally:
        downloader.close()


def test_the_services_idle_connection_to_an_origin_closes_after_its_keep_alive(
        tmp_path: Path, videos: dict[str, Path]) -> None:
    """The real service after an ingest: its connection to the origin, kept for a next
    download, is closed once none has come for ORIGIN_KEEPALIVE seconds; a download after that
    makes a new one, closed the same way. Was: kept until the next download, however late (a
    descriptor in the service; a connection, and here a thread, at the origin)."""
    with keep_alive_origin(videos["b.mp4"].parent) as (origin, accepted), \
            VidcacheServer(tmp_path / "data") as server, \
            contextlib.closing(Api(server.url)) as api:
        assert server.process is not None
        pid, port = server.process.pid, int(origin.rpartition(":")[2])
        for count, name in enumerate(("b.mp4", "c.mkv"), start=1):
            api.ingest_ok(f"{origin}/{name}", "kept")
            assert accepted() == count
            wait_until(lambda: sockets_to_loopback(port, ESTABLISHED, pid=pid) == 0,
                       timeout=ORIGIN_KEEPALIVE + 25,
                       what="the service's idle connection to the origin closed")


# --- a service with tight limits ------------------------------------------------------------------

@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path]) -> Path:
    """The folder `restricted` allows file:// URLs from, holding a copy of c.mkv."""
    folder = tmp_path_factory.mktemp("svc-allowed")
    shutil.copy(videos["c.mkv"], folder / "c.mkv")
    return folder


@pytest.fixture(scope="module")
def size_cap(videos: dict[str, Path]) -> int:
    """A --max-size that c.mkv fits and a.mp4 does not (their sizes vary a little per run)."""
    small, large = videos["c.mkv"].stat().st_size, videos["a.mp4"].stat().st_size
    assert small < large
    return (small + large) // 2


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory, allowed_dir: Path, size_cap: int,
               monkeymodule: pytest.MonkeyPatch) -> Iterator[tuple[VidcacheServer, Api]]:
    """--max-size `size_cap`, --download-timeout 2, file:// allowed from `allowed_dir`, and
    127.0.0.2 allowed through VIDCACHE_INGEST_ALLOW."""
    monkeymodule.setenv("VIDCACHE_INGEST_ALLOW", "127.0.0.2")
    data = tmp_path_factory.mktemp("svc-restricted") / "data"
    args = ["--max-size", str(size_cap), "--download-timeout", "2", "--allow-file-dir",
            str(allowed_dir)]
    with VidcacheServer(data, *args) as server:
        api = Api(server.url)
        yield server, api
        api.close()


@pytest.fixture(scope="module")
def monkeymodule() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_too_large_is_413_whether_announced_or_not(restricted: tuple[VidcacheServer, Api],
                                                   size_cap: int,
                                                   videos: dict[str, Path]) -> None:
    server, api = restricted
    with serve_origin(videos["a.mp4"].parent) as (origin, _stalled):
        for url in (f"{origin}/a.mp4", f"{origin}/nolength/a.mp4"):
            _assert_error(api.ingest(url, unique("big")), 413, "--max-size", str(size_cap))
        # below the cap, a body without Content-Length is fine
        result = api.ingest_ok(f"{origin}/nolength/c.mkv", unique("small"))
        assert result["hash"] == digest(videos["c.mkv"].read_bytes())
    assert [p.name for p in blob_files(server.data_dir)] == [f"{result['hash']}.mkv"]
    assert temp_files(server.data_dir) == []


def test_stalled_download_times_out_with_504(restricted: tuple[VidcacheServer, Api],
                                             videos: dict[str, Path]) -> None:
    server, api = restricted
    with serve_origin(videos["c.mkv"].parent) as (origin, _stalled):
        _assert_error(api.ingest(f"{origin}/stall/c.mkv", unique("slow")), 504, "stalled")
    assert temp_files(server.data_dir) == []


def test_ingest_allow_env_lets_a_private_host_through(
        restricted: tuple[VidcacheServer, Api]) -> None:
    _server, api = restricted
    # allowed, so the server tries to connect (and finds nobody) instead of refusing
    response = api.ingest(f"http://127.0.0.2:{free_port()}/v.mp4", unique("env"))
    _assert_error(response, 502, "cannot connect")
    _assert_error(api.ingest(f"http://127.0.0.3:{free_port()}/v.mp4", unique("env")), 403)


def test_credentials_in_a_file_url_are_never_shown(allowed_dir: Path, tmp_path: Path) -> None:
    """A file:// URL with `user:password@` refused for its remote host, or for taking longer
    than --max-download-time: the answer and the log name it without them (both showed the
    URL whole)."""
    with VidcacheServer(tmp_path / "data", "--allow-file-dir", str(allowed_dir),
                        "--max-download-time", "1e-9") as server:
        api = Api(server.url)
        remote = api.ingest("file://user:hunter2@remote.test/c.mkv", unique("file"))
        _assert_error(remote, 422, "remote host 'remote.test': file://remote.test/c.mkv")
        local = f"file://user:hunter2@localhost{allowed_dir}/c.mkv"
        slow = api.ingest(local, unique("file"))
        _assert_error(slow, 504, f"file://localhost{allowed_dir}/c.mkv took longer")
        api.close()
        assert "hunter2" not in remote.text + slow.text
        wait_until(lambda: "took longer" in server.log(), timeout=10,
                   what="the refusal in the server's log")
        assert "hunter2" not in server.log()


def test_file_urls_from_allowed_dirs_only(restricted: tuple[VidcacheServer, Api],
                                          allowed_dir: Path, videos: dict[str, Path],
                                          tmp_path: Path) -> None:
    _server, api = restricted
    result = api.ingest_ok((allowed_dir / "c.mkv").as_uri(), unique("file"))
    assert result["hash"] == digest(videos["c.mkv"].read_bytes())
    outside = tmp_path / "outside.mkv"
    shutil.copy(videos["c.mkv"], outside)
    _assert_error(api.ingest(outside.as_uri(), unique("file")), 403, "--allow-file-dir")
    escape = allowed_dir / "escape.mkv"
    escape.symlink_to(outside)
    _assert_error(api.ingest(escape.as_uri(), unique("file")), 403, "--allow-file-dir")
    _assert_error(api.ingest((allowed_dir / "missing.mkv").as_uri(), unique("file")), 422,
                  "missing.mkv")
    _assert_error(api.ingest("file:///etc/passwd", unique("file")), 403)
