"""vidcache_client against httpx.MockTransport: the answers a real vidcache never gives.

Wrong or missing Content-Range, 200 instead of 206, bodies that end short or run long, streams
cut mid-way, connection failures, error bodies that are not JSON. The real service is exercised
in test_client_e2e.py.
"""

from __future__ import annotations

import inspect
import json
import pickle
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import httpx
import pytest

import vidcache_client
from tests.support import free_port
from vidcache_client import (
    AuthError,
    IngestUnderWay,
    InvalidRequestError,
    NotFoundError,
    ProtocolError,
    RangeError,
    RangeNotSatisfiableError,
    RequestTimeout,
    ServerError,
    StatusError,
    TransportError,
    VidCacheClient,
    VidCacheError,
    VideoPage,
)

BASE = "http://vidcache.test"
HASH = "ab" * 32
OTHER_HASH = "cd" * 32
DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable modulo 256
SIZE = len(DATA)

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class Recorder:
    """A MockTransport handler that remembers the requests it answered."""

    handler: Handler
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)


class ChunkStream(httpx.SyncByteStream):
    """A response body sent in pieces, optionally failing after them; records close()."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.closed = True


def serve_video(request: httpx.Request) -> httpx.Response:
    """A correct /video/{HASH} answer, ranges clamped at EOF as RFC 9110 allows."""
    headers = {"ETag": f'"{HASH}"', "Accept-Ranges": "bytes"}
    spec = request.headers.get("Range")
    if spec is None:
        return httpx.Response(200, headers=headers, content=DATA)
    start_text, end_text = spec.removeprefix("bytes=").split("-")
    start, end = int(start_text), min(int(end_text), SIZE - 1)
    if start >= SIZE:
        return httpx.Response(416, headers={"Content-Range": f"bytes */{SIZE}"},
                              json={"detail": "range starts past the end"})
    headers["Content-Range"] = f"bytes {start}-{end}/{SIZE}"
    return httpx.Response(206, headers=headers, content=DATA[start:end + 1])


def partial(content_range: str | None, body: bytes, **headers: str | bytes) -> Handler:
    """A handler answering 206 with the given Content-Range and body, whatever was asked.

    The body is streamed, so httpx adds no Content-Length of its own.
    """
    def handler(request: httpx.Request) -> httpx.Response:
        all_headers = {name.encode(): value if isinstance(value, bytes) else value.encode()
                       for name, value in headers.items()}
        if content_range is not None:
            all_headers[b"Content-Range"] = content_range.encode()
        return httpx.Response(206, headers=all_headers, stream=ChunkStream([body]))
    return handler


def json_error(status: int, detail: object) -> Handler:
    return lambda request: httpx.Response(status, json={"detail": detail})


MakeClient = Callable[..., VidCacheClient]


# --- the exception hierarchy ---------------------------------------------------------------------

@pytest.mark.parametrize(("error_class", "parent", "transient"), [
    (TransportError, VidCacheError, True),
    (RequestTimeout, TransportError, True),
    (ProtocolError, VidCacheError, True),
    (RangeError, ProtocolError, True),
    (StatusError, VidCacheError, False),
    (NotFoundError, StatusError, False),
    (RangeNotSatisfiableError, StatusError, False),
    (InvalidRequestError, StatusError, False),
    (AuthError, StatusError, False),
    (ServerError, StatusError, True),
])
def test_hierarchy_and_transient_flags(error_class: type[VidCacheError], parent: type,
                                       transient: bool) -> None:
    assert issubclass(error_class, parent)
    assert error_class.transient is transient
    assert VidCacheError.transient is False


@pytest.mark.parametrize("error", [
    TransportError("connect to x: refused"),
    RequestTimeout("read from x: timed out"),
    ProtocolError("x: bad JSON"),
    RangeError("x: 200 instead of 206"),
    StatusError(500, "boom"),
    NotFoundError(404, "no such video", message="get_meta of h: HTTP 404", json_detail=True),
    RangeNotSatisfiableError(416, "past the end", size=10240),
    InvalidRequestError(None, "not a hash", message="get_meta of 'x': not a hash"),
    AuthError(401, "token missing"),
    ServerError(503, "stopping"),
], ids=lambda error: type(error).__name__)
def test_errors_survive_pickling(error: VidCacheError) -> None:
    """A worker process's error reaches its caller (ProcessPoolExecutor pickles it). Before,
    every StatusError failed to unpickle: its class was called with the message alone."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)


def test_public_names_are_exported() -> None:
    for name in vidcache_client.__all__:
        assert getattr(vidcache_client, name) is not None
    assert "VidCacheClient" in vidcache_client.__all__
    assert "RangeNotSatisfiableError" in vidcache_client.__all__


# --- construction --------------------------------------------------------------------------------

_REQUIRED = inspect.Parameter.empty

# The API reference of the seed README (/work/shared/seed/vidcache-client-README.md), which fixes
# the public API: each call's parameters in order with their defaults, and what it returns.
SEED_API: dict[str, tuple[list[tuple[str, object]], object]] = {
    "__init__": ([("base_url", _REQUIRED), ("timeout", 300.0), ("chunk_size", 1_048_576)],
                 type(None)),
    "ingest": ([("url", _REQUIRED), ("bucket", _REQUIRED), ("prefix", ""), ("meta", None)],
               dict[str, Any]),
    "resolve": ([("url", _REQUIRED)], dict[str, Any] | None),
    "get_meta": ([("content_hash", _REQUIRED)], dict[str, Any] | None),
    "get_bytes": ([("content_hash", _REQUIRED), ("byte_range", None)], bytes),
    "stream_video": ([("content_hash", _REQUIRED), ("byte_range", None)], None),
    "download_to_file": ([("content_hash", _REQUIRED), ("dest", _REQUIRED),
                          ("byte_range", None)], int),
    "delete": ([("content_hash", _REQUIRED)], type(None)),
    "close": ([], type(None)),
}


@pytest.mark.parametrize(("method", "parameters", "returns"),
                         [(name, *api) for name, api in SEED_API.items()], ids=SEED_API.keys())
def test_the_seed_readme_signatures_hold(method: str, parameters: list[tuple[str, object]],
                                         returns: object) -> None:
    """Every call the seed README shows works as written, positionally or by keyword, with its
    defaults; what the client adds comes after, keyword-only with a default, so no seed call
    changes meaning. stream_video's context manager is pinned by the stream tests."""
    function = getattr(VidCacheClient, method)
    _, *actual = inspect.signature(function).parameters.values()  # without self
    seed, added = actual[:len(parameters)], actual[len(parameters):]
    assert [(parameter.name, parameter.default) for parameter in seed] == parameters
    assert [type(parameter.default) for parameter in seed] == [
        type(default) for _, default in parameters]  # 300.0, not 300
    assert all(parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for parameter in seed)
    assert all(parameter.kind is inspect.Parameter.KEYWORD_ONLY
               and parameter.default is not _REQUIRED for parameter in added)
    if returns is not None:
        assert get_type_hints(function)["return"] == returns


@pytest.mark.parametrize("base_url", ["", "ftp://host", "not a url", "http://",
                                      "http://host:99999", "http://host:0"])
def test_bad_base_url_is_refused(base_url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        VidCacheClient(base_url)


@pytest.mark.parametrize(("base_url", "shown"), [
    ("http://user:hunter2@host:99999", "'http://host:99999': port 99999"),
    ("ftp://user:hunter2@host", "'ftp://host': expected http(s)"),
])
def test_a_refused_base_url_is_shown_without_its_password(base_url: str, shown: str) -> None:
    with pytest.raises(ValueError, match="base_url") as refused:
        VidCacheClient(base_url)
    assert shown in str(refused.value)
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("options", [
    {"timeout": 0}, {"chunk_size": 0}, {"max_connections": 0}, {"token": " "},
])
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        VidCacheClient(BASE, **options)


@pytest.mark.parametrize("chunk_size", [64 * 1024 * 1024 + 1, 2**70])
def test_a_chunk_size_over_64_mib_is_refused(chunk_size: int) -> None:
    """httpx holds each chunk whole: 2**70 was taken, and stream_video then buffered the
    whole answer as one chunk."""
    with pytest.raises(ValueError, match=rf"^chunk_size must be from 1 byte to 64 MiB, got "
                                         rf"{chunk_size}$"):
        VidCacheClient(BASE, chunk_size=chunk_size)
    assert VidCacheClient(BASE, chunk_size=64 * 1024 * 1024).chunk_size == 64 * 1024 * 1024


@pytest.mark.parametrize("timeout", [None, "30", True])
def test_a_timeout_that_is_not_a_number_is_refused_by_name(timeout: Any) -> None:
    with pytest.raises(TypeError, match=r"timeout must be a number of seconds.*float\('inf'\)"):
        VidCacheClient(BASE, timeout=timeout)


@pytest.mark.parametrize("option", ["chunk_size", "max_connections"])
@pytest.mark.parametrize("value", [1.5, 1048576.0, "1M", True, None])
def test_a_size_or_count_that_is_not_an_int_is_refused_by_name(option: str, value: Any) -> None:
    """At once: a float was taken and failed only at a stream's first chunk (TypeError from
    httpx's chunker), far from the mistake."""
    with pytest.raises(TypeError, match=rf"^{option} must be a .* \(an int\), got {value!r}"):
        VidCacheClient(BASE, **{option: value})


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("transport", "http://127.0.0.1:8020", "an httpx.BaseTransport"),
    ("transport", httpx.HTTPTransport, "an httpx.BaseTransport"),  # the class, not one
    ("spare_connection", "no", "a bool"),
    ("spare_connection", None, "a bool"),
])
def test_a_transport_or_flag_of_another_type_is_refused_by_name(option: str, value: Any,
                                                                expected: str) -> None:
    """At once, as docs/client.md says of every option: a wrong transport was taken and failed
    at the first call with an AttributeError from httpx (not a VidCacheError), and "no" was
    taken as true."""
    with pytest.raises(TypeError, match=rf"^{option} must be {expected}"):
        VidCacheClient(BASE, **{option: value})


@pytest.mark.parametrize("token", [123456, b"s3cret"])
def test_a_token_that_is_not_a_str_is_refused_without_showing_it(token: Any) -> None:
    with pytest.raises(TypeError, match=r"^token must be a str \(or None\), got (int|bytes)$"):
        VidCacheClient(BASE, token=token)


def test_token_is_sent_as_bearer(make_client: MakeClient) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json={"status": "ok"}))
    make_client(recorder, token="s3cret").health()
    make_client(recorder).health()
    assert recorder.requests[0].headers["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in recorder.requests[1].headers


def test_closed_client_refuses_calls() -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json={"status": "ok"}))
    with VidCacheClient(BASE, transport=httpx.MockTransport(recorder)) as client:
        assert client.health() == {"status": "ok"}
    with pytest.raises(RuntimeError):
        client.health()
    assert len(recorder.requests) == 1


def test_leaving_the_block_by_an_exception_closes_the_client_and_lets_it_through() -> None:
    """The seed: close() is "called automatically when used as a context manager", however
    the block is left; the exception is not swallowed, and closing again is harmless."""
    recorder = Recorder(lambda request: httpx.Response(200, json={"status": "ok"}))
    with pytest.raises(KeyError, match="the caller's"), \
            VidCacheClient(BASE, transport=httpx.MockTransport(recorder)) as client:
        assert client.health() == {"status": "ok"}
        raise KeyError("the caller's")
    with pytest.raises(RuntimeError, match="closed"):
        client.health()
    client.close()  # again: harmless
    assert len(recorder.requests) == 1


# --- arguments refused before any request --------------------------------------------------------

BAD_HASHES = ["", "ab" * 31, "AB" * 32, "zz" * 32, "ab" * 32 + "\n", "../../etc/passwd", 42]


@pytest.mark.parametrize("bad_hash", BAD_HASHES)
@pytest.mark.parametrize("call", [
    lambda client, h: client.get_meta(h),
    lambda client, h: client.get_chunk_digests(h),
    lambda client, h: client.get_bytes(h),
    lambda client, h: client.stream_video(h).__enter__(),
    lambda client, h: client.delete(h),
], ids=["get_meta", "get_chunk_digests", "get_bytes", "stream_video", "delete"])
def test_malformed_hash_is_refused_locally(make_client: MakeClient, bad_hash: Any,
                                           call: Callable[[VidCacheClient, Any], object]) -> None:
    recorder = Recorder(serve_video)
    with pytest.raises(InvalidRequestError, match="invalid content hash") as caught:
        call(make_client(recorder), bad_hash)
    assert isinstance(caught.value, ValueError)
    assert caught.value.status_code is None
    assert "no request sent" in str(caught.value)
    assert recorder.requests == []


@pytest.mark.parametrize("call", [
    lambda client: client.resolve(None),
    lambda client: client.ingest(b"http://x/a.mp4", "videos"),
    lambda client: client.ingest("http://x/a.mp4", "videos", meta="title"),
    lambda client: client.ingest("http://x/a.mp4", "videos", meta=[("title", "A")]),
    lambda client: client.ingest("http://x/a.mp4", None),
    lambda client: client.ingest("http://x/a.mp4", "videos", prefix=2024),
], ids=["resolve-none", "ingest-bytes", "meta-str", "meta-pairs", "bucket-none", "prefix-int"])
def test_a_url_or_meta_of_another_type_is_refused_locally(
        make_client: MakeClient, call: Callable[[VidCacheClient], object]) -> None:
    """The seed's url is a str and its meta a dict: a bare TypeError or ValueError naming no
    argument escaped ("expected string or bytes-like object"), and a list of pairs was sent as
    an object. Its bucket and prefix are strs: None or an int were sent for a 422."""
    recorder = Recorder(lambda request: httpx.Response(500))
    with pytest.raises(InvalidRequestError, match=r"^invalid (url|meta|bucket|prefix) .*: "
                   r"expected a (str|dict \(or None\)) \(no request sent\)$"):
        call(make_client(recorder))
    assert recorder.requests == []


@pytest.mark.parametrize("bad_range", [
    (-1, 5), (5, 4), (0,), (0, 1, 2), ("0", "1"), (True, 3), (0.0, 1.0), 7, "0-9",
])
def test_malformed_byte_range_is_refused_locally(make_client: MakeClient,
                                                 bad_range: Any, tmp_path: Path) -> None:
    recorder = Recorder(serve_video)
    client = make_client(recorder)
    with pytest.raises(InvalidRequestError, match="invalid byte_range"):
        client.get_bytes(HASH, byte_range=bad_range)
    with pytest.raises(InvalidRequestError, match="invalid byte_range"):
        client.download_to_file(HASH, tmp_path / "out", byte_range=bad_range)
    assert recorder.requests == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("call", "refused"), [
    (lambda client: client.read_range_into(HASH, 0, None), "invalid buffers NoneType"),
    (lambda client: client.open_video_into(HASH, None, on_meta=print), "invalid buffers"),
    (lambda client: client.read_range_into(HASH, 0, bytearray(4)),  # not in a list
     "invalid buffers bytearray: expected a list of buffers"),
    (lambda client: client.open_video_into(HASH, [bytearray(4)], on_meta=print, digests=5),
     "invalid digests 5"),
    (lambda client: client.open_video_into(HASH, [bytearray(4)], on_meta=print,
                                           digests=(0, 1, 2)), r"invalid digests \(0, 1, 2\)"),
    (lambda client: client.read_range_into(HASH, 0, [bytearray(4)], on_filled=True),
     "invalid on_filled True: expected a callable"),
    (lambda client: client.open_video_into(HASH, [bytearray(4)], on_meta=None),
     "invalid on_meta None: expected a callable"),
    (lambda client: client.open_video_into(HASH, [bytearray(4)], on_meta=print,
                                           on_progress="log"),
     "invalid on_progress 'log': expected a callable"),
], ids=["read-none", "open-none", "read-one-bytearray", "digests-int", "digests-triple",
        "on_filled-true", "on_meta-none", "on_progress-str"])
def test_buffers_digests_or_callbacks_of_another_shape_are_refused_locally(
        make_client: MakeClient, call: Callable[[VidCacheClient], object], refused: str) -> None:
    """Were bare TypeErrors ("not iterable", "argument after * must be an iterable"), a
    callback's ("object is not callable") only once the answer had come; one bytearray not in
    a list was taken for a list of ints ("invalid buffer int")."""
    recorder = Recorder(serve_video)
    with pytest.raises(InvalidRequestError, match=rf"^{refused}.* \(no request sent\)$"):
        call(make_client(recorder))
    assert recorder.requests == []


@pytest.mark.parametrize("options", [{"bucket": 123}, {"prefix": b"2024"}])
def test_a_listing_bucket_or_prefix_that_is_not_a_str_is_refused(
        make_client: MakeClient, options: dict[str, Any]) -> None:
    """Were sent: 123 as "123", b"2024" as whatever httpx makes of bytes."""
    recorder = Recorder(lambda request: httpx.Response(200, json={"items": [], "next": None}))
    client = make_client(recorder)
    with pytest.raises(InvalidRequestError, match=r"^invalid (bucket|prefix) .*: expected a str"):
        client.list_videos_page(**options)
    with pytest.raises(InvalidRequestError, match=r"^invalid (bucket|prefix) .*: expected a str"):
        client.list_videos(**options)
    assert recorder.requests == []


@pytest.mark.parametrize("page_size", [0, 1001, "10", None])
def test_bad_page_size_is_refused_when_called(make_client: MakeClient, page_size: Any) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json={"items": [], "next": None}))
    with pytest.raises(InvalidRequestError, match="page_size"):
        make_client(recorder).list_videos(page_size=page_size)
    assert recorder.requests == []


# --- byte ranges: what is accepted ---------------------------------------------------------------

@pytest.mark.parametrize(("byte_range", "expected"), [
    ((0, 0), DATA[:1]),
    ((0, 99), DATA[:100]),
    ((SIZE - 1, SIZE - 1), DATA[-1:]),
    ((0, SIZE - 1), DATA),
    ((SIZE - 5, SIZE + 1000), DATA[-5:]),  # the server clamps the end at EOF
])
def test_ranged_read_returns_exactly_the_range(make_client: MakeClient,
                                               byte_range: tuple[int, int],
                                               expected: bytes) -> None:
    recorder = Recorder(serve_video)
    assert make_client(recorder).get_bytes(HASH, byte_range=byte_range) == expected
    request = recorder.requests[0]
    assert request.url.path == f"/video/{HASH}"
    assert request.headers["Range"] == f"bytes={byte_range[0]}-{byte_range[1]}"
    assert request.headers["Accept-Encoding"] == "identity"


def test_whole_read_sends_no_range(make_client: MakeClient) -> None:
    recorder = Recorder(serve_video)
    assert make_client(recorder).get_bytes(HASH) == DATA
    assert "Range" not in recorder.requests[0].headers


def test_unknown_total_is_accepted_when_the_range_is_exact(make_client: MakeClient) -> None:
    client = make_client(partial("bytes 10-19/*", DATA[10:20]))
    assert client.get_bytes(HASH, byte_range=(10, 19)) == DATA[10:20]


def test_range_past_eof_raises_416_with_size(make_client: MakeClient) -> None:
    with pytest.raises(RangeNotSatisfiableError, match=HASH) as caught:
        make_client(serve_video).get_bytes(HASH, byte_range=(SIZE, SIZE + 10))
    assert caught.value.status_code == 416
    assert caught.value.size == SIZE
    assert "range starts past the end" in str(caught.value)
    assert not caught.value.transient


# --- byte ranges: what is refused ----------------------------------------------------------------

@pytest.mark.parametrize(("handler", "complaint"), [
    (lambda request: httpx.Response(200, content=DATA), "ignored the Range header"),
    (partial(None, DATA[100:200]), "missing or malformed Content-Range"),
    (partial("bytes 100-199", DATA[100:200]), "missing or malformed"),
    (partial("items 100-199/10240", DATA[100:200]), "missing or malformed"),
    (partial("bytes 199-100/10240", DATA[100:200]), "missing or malformed"),
    (partial("bytes 100-199/150", DATA[100:200]), "missing or malformed"),  # end past total
    (partial("bytes 101-200/10240", DATA[101:201]), "not the asked bytes"),
    (partial("bytes 100-149/10240", DATA[100:150]), "not the asked bytes"),  # short, not EOF
    (partial("bytes 100-299/10240", DATA[100:300]), "not the asked bytes"),  # longer
    (partial("bytes 100-149/*", DATA[100:150]), "not the asked bytes"),  # clamp unprovable
    (partial("bytes 100-199/10240", DATA[100:200], **{"Content-Length": "99"}),
     "Content-Length 99 disagrees"),
    # str.isdigit() takes it, int() does not: was a bare ValueError
    (partial("bytes 100-199/10240", DATA[100:200], **{"Content-Length": b"\xb2"}),
     "malformed Content-Length"),
    (partial("bytes 100-199/10240", DATA[100:150]), "ended short: got 50 bytes, expected 100"),
    (partial("bytes 100-199/10240", DATA[100:201]), "ran long"),
])
def test_answer_that_is_not_the_asked_range_raises_range_error(
        make_client: MakeClient, handler: Handler, complaint: str) -> None:
    with pytest.raises(RangeError, match=complaint) as caught:
        make_client(handler).get_bytes(HASH, byte_range=(100, 199))
    assert HASH in str(caught.value)
    assert "bytes 100-199" in str(caught.value)
    assert caught.value.transient


def test_fake_eof_clamp_is_refused(make_client: MakeClient) -> None:
    """A shorter answer is only a clamp if it ends on the video's last byte."""
    client = make_client(partial(f"bytes {SIZE - 10}-{SIZE - 2}/{SIZE}", DATA[-10:-1]))
    with pytest.raises(RangeError, match="not the asked bytes"):
        client.get_bytes(HASH, byte_range=(SIZE - 10, SIZE + 10))


def test_partial_answer_to_a_whole_read_is_a_protocol_error(make_client: MakeClient) -> None:
    client = make_client(partial(f"bytes 0-99/{SIZE}", DATA[:100]))
    with pytest.raises(ProtocolError, match="expected 200 with the whole video") as caught:
        client.get_bytes(HASH)
    assert not isinstance(caught.value, RangeError)


def test_short_whole_body_is_a_protocol_error(make_client: MakeClient) -> None:
    client = make_client(lambda request: httpx.Response(
        200, headers={"Content-Length": str(SIZE)}, content=DATA[:-1]))
    with pytest.raises(ProtocolError, match=f"ended short: got {SIZE - 1} bytes"):
        client.get_bytes(HASH)


def test_etag_naming_other_content_is_refused(make_client: MakeClient) -> None:
    client = make_client(lambda request: httpx.Response(
        200, headers={"ETag": f'"{OTHER_HASH}"'}, content=DATA))
    with pytest.raises(ProtocolError, match="ETag"):
        client.get_bytes(HASH)


# --- stream_video --------------------------------------------------------------------------------

def test_stream_yields_chunks_of_chunk_size(make_client: MakeClient) -> None:
    client = make_client(serve_video, chunk_size=1000)
    with client.stream_video(HASH) as chunks:
        pieces = list(chunks)
    assert b"".join(pieces) == DATA
    assert [len(piece) for piece in pieces] == [1000] * 10 + [240]
    with client.stream_video(HASH, byte_range=(5, 2004)) as chunks:
        pieces = list(chunks)
    assert b"".join(pieces) == DATA[5:2005]
    assert [len(piece) for piece in pieces] == [1000, 1000]


def test_stream_chunks_are_a_mib_by_default(make_client: MakeClient) -> None:
    """The seed's default chunk_size, 1_048_576: a body of 2.5 MiB comes in 1, 1 and 0.5 MiB."""
    body = bytes(5 << 19)
    client = make_client(lambda request: httpx.Response(200, content=body))
    with client.stream_video(HASH) as chunks:
        assert [len(chunk) for chunk in chunks] == [1 << 20, 1 << 20, 1 << 19]


def test_stream_checks_headers_before_yielding(make_client: MakeClient) -> None:
    client = make_client(lambda request: httpx.Response(200, content=DATA))
    with pytest.raises(RangeError, match="expected 206"), \
            client.stream_video(HASH, byte_range=(0, 9)):
        pytest.fail("entered the block despite a 200 answer to a range request")


def test_stream_that_ends_short_raises_after_the_last_chunk(make_client: MakeClient) -> None:
    body = ChunkStream([DATA[:100], DATA[100:150]])
    client = make_client(lambda request: httpx.Response(
        206, headers={"Content-Range": f"bytes 0-199/{SIZE}"}, stream=body))
    received: list[bytes] = []
    with pytest.raises(RangeError, match="ended short: got 150 bytes, expected 200"), \
            client.stream_video(HASH, byte_range=(0, 199)) as chunks:
        received.extend(chunks)
    assert b"".join(received) == DATA[:150]
    assert body.closed


def test_stream_cut_by_the_network_raises_transport_error(make_client: MakeClient) -> None:
    body = ChunkStream([DATA[:100]], error=httpx.ReadError("connection reset by peer"))
    client = make_client(lambda request: httpx.Response(200, stream=body))
    with pytest.raises(TransportError, match="connection reset by peer") as caught, \
            client.stream_video(HASH) as chunks:
        list(chunks)
    assert caught.value.transient
    assert HASH in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.ReadError)
    assert body.closed


def test_leaving_a_stream_early_closes_the_response(make_client: MakeClient) -> None:
    body = ChunkStream([DATA[:100], DATA[100:]])
    client = make_client(lambda request: httpx.Response(200, stream=body), chunk_size=100)
    with client.stream_video(HASH) as chunks:
        assert next(iter(chunks)) == DATA[:100]
    assert body.closed


def test_stream_error_status_carries_the_detail(make_client: MakeClient) -> None:
    client = make_client(json_error(404, "no video with that hash"))
    with pytest.raises(NotFoundError, match="no video with that hash"), \
            client.stream_video(HASH):
        pytest.fail("entered the block despite a 404")


# --- download_to_file ----------------------------------------------------------------------------

def test_download_writes_the_file_and_returns_its_size(make_client: MakeClient,
                                                       tmp_path: Path) -> None:
    client = make_client(serve_video, chunk_size=4096)
    dest = tmp_path / "video.mp4"
    assert client.download_to_file(HASH, dest) == SIZE
    assert dest.read_bytes() == DATA
    assert client.download_to_file(HASH, str(dest), byte_range=(10, 19)) == 10
    assert dest.read_bytes() == DATA[10:20]
    assert list(tmp_path.iterdir()) == [dest]


FAILING_DOWNLOADS: list[tuple[Handler, type[VidCacheError]]] = [
    (partial(f"bytes 0-{SIZE - 1}/{SIZE}", DATA[:5000]), RangeError),
    (lambda request: httpx.Response(
        206, headers={"Content-Range": f"bytes 0-{SIZE - 1}/{SIZE}"},
        stream=ChunkStream([DATA[:5000]], error=httpx.ReadError("reset"))), TransportError),
    (lambda request: httpx.Response(200, content=DATA), RangeError),
    (json_error(404, "no such video"), NotFoundError),
    (json_error(500, "disk on fire"), ServerError),
]


@pytest.mark.parametrize(("handler", "error_class"), FAILING_DOWNLOADS)
def test_failed_download_leaves_no_file(make_client: MakeClient, tmp_path: Path,
                                        handler: Handler,
                                        error_class: type[VidCacheError]) -> None:
    dest = tmp_path / "video.mp4"
    with pytest.raises(error_class):
        make_client(handler, chunk_size=1000).download_to_file(HASH, dest, (0, SIZE - 1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("handler", "error_class"), FAILING_DOWNLOADS)
def test_failed_download_keeps_the_previous_file(make_client: MakeClient, tmp_path: Path,
                                                 handler: Handler,
                                                 error_class: type[VidCacheError]) -> None:
    dest = tmp_path / "video.mp4"
    dest.write_bytes(b"previous content")
    with pytest.raises(error_class):
        make_client(handler, chunk_size=1000).download_to_file(HASH, dest, (0, SIZE - 1))
    assert dest.read_bytes() == b"previous content"
    assert list(tmp_path.iterdir()) == [dest]


class BytesPath:
    def __fspath__(self) -> bytes:
        return b"video.mp4"


@pytest.mark.parametrize("dest", [None, 3, b"video.mp4", "", "video\0.mp4", BytesPath(), 1.5])
def test_a_dest_that_is_not_a_file_path_is_refused_before_any_request(
        make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        dest: Any) -> None:
    """As a url or meta of another type: None, a bytes path, a file descriptor ended in a bare
    TypeError naming no argument, and "" only after the whole download."""
    monkeypatch.chdir(tmp_path)
    recorder = Recorder(serve_video)
    with pytest.raises(InvalidRequestError, match=r"^invalid dest .*: expected a file path.* "
                                                  r"\(no request sent\)$") as refused:
        make_client(recorder).download_to_file(HASH, dest)
    assert refused.value.status_code is None
    assert recorder.requests == []
    assert list(tmp_path.iterdir()) == []


def test_download_into_missing_directory_fails_before_any_request(
        make_client: MakeClient, tmp_path: Path) -> None:
    recorder = Recorder(serve_video)
    with pytest.raises(FileNotFoundError):
        make_client(recorder).download_to_file(HASH, tmp_path / "nope" / "video.mp4")
    assert recorder.requests == []


@pytest.mark.parametrize("name", ["new/", "new/.", "new/.."])
def test_download_to_a_directorys_name_fails_before_any_request(
        make_client: MakeClient, tmp_path: Path, name: str) -> None:
    """A path that names a directory (a trailing '/'), one that does not exist, is refused as
    open() refuses it, not written as a file named by the path without its '/' (`new`), or
    renamed over the directory a '..' names."""
    recorder = Recorder(serve_video)
    with pytest.raises(IsADirectoryError):
        make_client(recorder).download_to_file(HASH, f"{tmp_path}/{name}")
    assert recorder.requests == []
    assert list(tmp_path.iterdir()) == []


# --- status errors -------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "error_class"), [
    (400, InvalidRequestError), (401, AuthError), (403, AuthError), (404, NotFoundError),
    (409, InvalidRequestError), (413, InvalidRequestError), (416, RangeNotSatisfiableError),
    (422, InvalidRequestError), (500, ServerError), (502, ServerError), (503, ServerError),
    (302, StatusError),
])
def test_status_maps_to_its_error_class(make_client: MakeClient, status: int,
                                        error_class: type[StatusError]) -> None:
    with pytest.raises(StatusError) as caught:
        make_client(json_error(status, "what went wrong")).delete(HASH)
    assert type(caught.value) is error_class
    assert caught.value.status_code == status
    assert caught.value.detail == "what went wrong"
    assert caught.value.json_detail
    message = str(caught.value)
    assert HASH in message and "what went wrong" in message and str(status) in message
    assert caught.value.transient is (status >= 500)


def test_non_json_error_body_still_explains(make_client: MakeClient) -> None:
    html = "<html><body><h1>502 Bad Gateway</h1>\n<p>upstream is down</p></body></html>"
    client = make_client(lambda request: httpx.Response(
        502, text=html, headers={"Content-Type": "text/html"}))
    with pytest.raises(ServerError, match="upstream is down") as caught:
        client.get_meta(HASH)
    assert caught.value.transient
    assert "Bad Gateway" in caught.value.detail
    assert not caught.value.json_detail  # not how a vidcache explains itself


def test_empty_error_body_gives_the_reason_phrase(make_client: MakeClient) -> None:
    with pytest.raises(ServerError, match=r"503 Service Unavailable: \(empty body\)"):
        make_client(lambda request: httpx.Response(503)).get_meta(HASH)


def test_json_error_without_detail_is_quoted(make_client: MakeClient) -> None:
    # the body as sent, not json=: httpx 0.27 encodes that with spaces, 0.28 without
    client = make_client(lambda request: httpx.Response(
        500, content=b'{"error":"oops"}', headers={"Content-Type": "application/json"}))
    with pytest.raises(ServerError, match=re.escape('{"error":"oops"}')) as caught:
        client.get_meta(HASH)
    assert not caught.value.json_detail


def test_huge_error_body_is_truncated(make_client: MakeClient) -> None:
    client = make_client(lambda request: httpx.Response(500, text="x" * 100_000))
    with pytest.raises(ServerError) as caught:
        client.get_meta(HASH)
    assert len(caught.value.detail) < 400


def test_validation_error_list_is_flattened(make_client: MakeClient) -> None:
    detail = [{"loc": ["body", "url"], "msg": "Field required", "type": "missing"},
              {"loc": ["body", "bucket"], "msg": "String should match pattern"}]
    flattened = re.escape("body.url: Field required; body.bucket: String should")
    with pytest.raises(InvalidRequestError, match=flattened) as caught:
        make_client(json_error(422, detail)).ingest("http://media.test/a.mp4", "videos")
    assert "http://media.test/a.mp4" in str(caught.value)


@pytest.mark.parametrize("call", [
    lambda client: client.get_meta(HASH),
    lambda client: client.get_chunk_digests(HASH),
    lambda client: client.resolve("http://media.test/unknown.mp4"),
], ids=["get_meta", "get_chunk_digests", "resolve"])
def test_lookups_return_none_on_404(make_client: MakeClient,
                                    call: Callable[[VidCacheClient], object]) -> None:
    assert call(make_client(json_error(404, "not found"))) is None


def test_resolve_error_names_the_url(make_client: MakeClient) -> None:
    expected = re.escape("resolve of http://media.test/a.mp4: HTTP 500")
    with pytest.raises(ServerError, match=expected):
        make_client(json_error(500, "db locked")).resolve("http://media.test/a.mp4")


# --- JSON answers --------------------------------------------------------------------------------

def test_ingest_sends_the_documented_payload(make_client: MakeClient) -> None:
    answer = {"hash": HASH, "status": "new", "file_path": "videos/ab/ab/x.mp4"}
    recorder = Recorder(lambda request: httpx.Response(200, json=answer))
    client = make_client(recorder)
    assert client.ingest("http://media.test/a.mp4", "videos") == answer
    assert client.ingest("http://media.test/a.mp4", "videos", "p/q", {"k": 1}) == answer
    payloads = [json.loads(request.content) for request in recorder.requests]
    assert payloads == [
        {"url": "http://media.test/a.mp4", "bucket": "videos", "prefix": "", "meta": {}},
        {"url": "http://media.test/a.mp4", "bucket": "videos", "prefix": "p/q",
         "meta": {"k": 1}},
    ]
    assert all(request.method == "POST" and request.url.path == "/ingest"
               for request in recorder.requests)


def test_resolve_passes_the_url_as_query(make_client: MakeClient) -> None:
    url = "http://media.test/a b.mp4?x=1&y=2"
    recorder = Recorder(lambda request: httpx.Response(200, json={"hash": HASH, "url": url}))
    assert make_client(recorder).resolve(url) == {"hash": HASH, "url": url}
    assert recorder.requests[0].url.params["url"] == url


@pytest.mark.parametrize(("response", "complaint"), [
    (httpx.Response(200, text="<html>ok</html>"), "expected a JSON object"),
    (httpx.Response(200, json=[1, 2]), "expected a JSON object, got list"),
    (httpx.Response(200, json={"size_bytes": 1}), "no 'hash'"),
    (httpx.Response(200, json={"hash": OTHER_HASH}), "another video"),
])
def test_malformed_json_answer_is_a_protocol_error(make_client: MakeClient,
                                                   response: httpx.Response,
                                                   complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        make_client(lambda request: response).get_meta(HASH)


@pytest.mark.parametrize(("document", "complaint"), [
    ({"hash": HASH, "digests": []}, "bad 'chunk_size' None"),
    ({"hash": HASH, "chunk_size": 0, "digests": []}, "bad 'chunk_size' 0"),
    ({"hash": HASH, "chunk_size": "1M", "digests": []}, "bad 'chunk_size' '1M'"),
    ({"hash": HASH, "chunk_size": True, "digests": []}, "bad 'chunk_size' True"),
    ({"hash": HASH, "chunk_size": 1024}, "'digests' is not a list"),
    ({"hash": HASH, "chunk_size": 1024, "digests": [HASH, HASH.upper()]}, "not a list of 64-hex"),
    ({"hash": HASH, "chunk_size": 1024, "digests": [HASH[:-1]]}, "not a list of 64-hex"),
    ({"hash": OTHER_HASH, "chunk_size": 1024, "digests": []}, "another video"),
])
def test_malformed_chunk_digests_are_a_protocol_error(make_client: MakeClient,
                                                      document: dict[str, Any],
                                                      complaint: str) -> None:
    client = make_client(lambda request: httpx.Response(200, json=document))
    with pytest.raises(ProtocolError, match=f"chunk digests of video {HASH}: .*{complaint}"):
        client.get_chunk_digests(HASH)


def test_chunk_digests_of_any_chunk_size(make_client: MakeClient) -> None:
    for chunk_size in (1000, 256 * 1024, 1024 * 1024):
        document = {"hash": HASH, "chunk_size": chunk_size, "digests": [HASH, OTHER_HASH]}
        def answer(request: httpx.Request, doc: dict[str, Any] = document) -> httpx.Response:
            return httpx.Response(200, json=doc)

        recorder = Recorder(answer)
        # a server from before digest pages: the client fills in the whole list's page
        assert make_client(recorder).get_chunk_digests(HASH) == {
            **document, "first_chunk": 0, "chunk_count": 2}
        assert recorder.requests[0].url.path == f"/video/{HASH}/chunks"


def test_delete_sends_delete(make_client: MakeClient) -> None:
    recorder = Recorder(lambda request: httpx.Response(204))
    make_client(recorder).delete(HASH)
    assert recorder.requests[0].method == "DELETE"
    assert recorder.requests[0].url.path == f"/video/{HASH}"


# --- list_videos ---------------------------------------------------------------------------------

def paged_listing(hashes: list[str]) -> Handler:
    """GET /videos over `hashes` (sorted), honouring limit and after like the service."""
    def handler(request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params["limit"])
        after = request.url.params.get("after", "")
        rest = [h for h in sorted(hashes) if h > after]
        page = rest[:limit]
        cursor = page[-1] if len(rest) > limit else None
        return httpx.Response(200, json={"items": [{"hash": h} for h in page], "next": cursor})
    return handler


def test_list_videos_follows_next(make_client: MakeClient) -> None:
    hashes = [f"{i:02x}" * 32 for i in range(5)]
    recorder = Recorder(paged_listing(hashes))
    listing = make_client(recorder).list_videos(bucket="videos", prefix="2024", page_size=2)
    assert recorder.requests == []  # lazy: nothing sent until iterated
    assert [item["hash"] for item in listing] == hashes
    assert [dict(request.url.params) for request in recorder.requests] == [
        {"limit": "2", "bucket": "videos", "prefix": "2024"},
        {"limit": "2", "bucket": "videos", "prefix": "2024", "after": hashes[1]},
        {"limit": "2", "bucket": "videos", "prefix": "2024", "after": hashes[3]},
    ]


def test_list_videos_without_filters_sends_only_limit(make_client: MakeClient) -> None:
    recorder = Recorder(paged_listing([]))
    assert list(make_client(recorder).list_videos()) == []
    assert dict(recorder.requests[0].url.params) == {"limit": "100"}


@pytest.mark.parametrize(("page", "complaint"), [
    ({"items": [{"hash": HASH}], "next": HASH}, "bad 'next' cursor"),  # never advances
    ({"items": "nope", "next": None}, "no list of records"),
    ({"items": [1, 2], "next": None}, "no list of records"),
    ({"items": [], "next": 7}, "bad 'next' cursor"),
])
def test_list_videos_refuses_a_broken_page(make_client: MakeClient, page: dict[str, Any],
                                           complaint: str) -> None:
    client = make_client(lambda request: httpx.Response(200, json=page))
    with pytest.raises(ProtocolError, match=complaint):
        for _ in client.list_videos(page_size=1):
            pass


def test_list_videos_page_sends_the_cursor_and_filters(make_client: MakeClient) -> None:
    hashes = [f"{i:02x}" * 32 for i in range(5)]
    recorder = Recorder(paged_listing(hashes))
    page = make_client(recorder).list_videos_page(after=hashes[1], bucket="videos",
                                                  prefix="2024", page_size=2)
    assert page == VideoPage([{"hash": hashes[2]}, {"hash": hashes[3]}], hashes[3])
    assert [dict(request.url.params) for request in recorder.requests] == [
        {"limit": "2", "bucket": "videos", "prefix": "2024", "after": hashes[1]},
    ]


@pytest.mark.parametrize("options", [
    {"after": "nope"}, {"after": "AB" * 32}, {"after": 7}, {"page_size": 0},
    {"page_size": 1001},
])
def test_list_videos_page_refuses_bad_options_before_sending(
    make_client: MakeClient, options: dict[str, Any]
) -> None:
    recorder = Recorder(paged_listing([]))
    with pytest.raises(InvalidRequestError, match="no request sent"):
        make_client(recorder).list_videos_page(**options)
    assert recorder.requests == []


@pytest.mark.parametrize(("after", "page", "complaint"), [
    (HASH, {"items": [], "next": HASH}, "bad 'next' cursor"),  # never advances
    (OTHER_HASH, {"items": [{"hash": HASH}], "next": HASH}, "bad 'next' cursor"),  # goes back
    (None, {"items": [], "next": 7}, "bad 'next' cursor"),
    (HASH, {"items": None, "next": None}, "no list of records"),
])
def test_list_videos_page_refuses_a_broken_page(
    make_client: MakeClient, after: str | None, page: dict[str, Any], complaint: str
) -> None:
    client = make_client(lambda request: httpx.Response(200, json=page))
    with pytest.raises(ProtocolError, match=complaint):
        client.list_videos_page(after=after)


INGEST = {"url": "http://o.test/v.mp4", "bucket": "b", "prefix": "", "phase": "downloading",
          "bytes_received": 10, "bytes_expected": None, "started": "2025-01-31T12:00:00.123Z"}


def test_ingests_lists_the_ingests_under_way(make_client: MakeClient) -> None:
    later = {**INGEST, "phase": "a later phase", "bytes_expected": 20, "more": "ignored"}
    recorder = Recorder(lambda request: httpx.Response(200, json={"items": [INGEST, later]}))
    assert make_client(recorder).ingests() == [
        IngestUnderWay("http://o.test/v.mp4", "b", "", "downloading", 10, None,
                       "2025-01-31T12:00:00.123Z"),
        IngestUnderWay("http://o.test/v.mp4", "b", "", "a later phase", 10, 20,
                       "2025-01-31T12:00:00.123Z")]
    assert [(r.method, r.url.path) for r in recorder.requests] == [("GET", "/ingests")]


def test_ingests_of_a_service_without_the_route_is_not_found(make_client: MakeClient) -> None:
    client = make_client(json_error(404, "no such endpoint: GET /ingests"))
    with pytest.raises(NotFoundError, match="list of ingests under way: HTTP 404"):
        client.ingests()


@pytest.mark.parametrize(("answer", "complaint"), [
    ([INGEST], "expected a JSON object"),
    ({"ingests": [INGEST]}, "no list of ingests"),
    ({"items": [7]}, "malformed ingest 7"),
    ({"items": [{**INGEST, "url": None}]}, "malformed ingest"),
    ({"items": [{**INGEST, "bytes_received": -1}]}, "malformed ingest"),
    ({"items": [{**INGEST, "bytes_received": True}]}, "malformed ingest"),
    ({"items": [{**INGEST, "bytes_expected": "10"}]}, "malformed ingest"),
    ({"items": [{key: v for key, v in INGEST.items() if key != "started"}]},
     "malformed ingest"),
])
def test_ingests_refuses_a_malformed_answer(make_client: MakeClient, answer: object,
                                            complaint: str) -> None:
    client = make_client(lambda request: httpx.Response(200, json=answer))
    with pytest.raises(ProtocolError, match=complaint):
        client.ingests()


# --- transport failures --------------------------------------------------------------------------

@pytest.mark.parametrize(("raised", "error_class"), [
    (httpx.ConnectError("connection refused"), TransportError),
    (httpx.ReadTimeout("timed out"), RequestTimeout),
    (httpx.ConnectTimeout("timed out"), RequestTimeout),
    (httpx.RemoteProtocolError("peer closed connection"), TransportError),
])
def test_transport_failure_is_translated(make_client: MakeClient, raised: Exception,
                                         error_class: type[VidCacheError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    with pytest.raises(error_class) as caught:
        make_client(handler).get_bytes(HASH, byte_range=(0, 9))
    assert type(caught.value) is error_class
    assert caught.value.transient
    assert caught.value.__cause__ is raised
    assert HASH in str(caught.value)


@pytest.mark.parametrize(("call", "what", "request_line"), [
    (lambda client: client.get_meta(HASH), f"metadata of video {HASH}", f"GET {{url}}/meta/{HASH}"),
    (lambda client: client.health(), "health check", "GET {url}/health"),
    (lambda client: next(client.list_videos()), "listing of videos", "GET {url}/videos?limit=100"),
    (lambda client: client.read_range_into(HASH, 0, [bytearray(10)]), f"bytes 0-9 of video {HASH}",
     f"GET {{url}}/video/{HASH}"),
    (lambda client: client.get_bytes(HASH, byte_range=(0, 9)), f"bytes 0-9 of video {HASH}",
     f"GET {{url}}/video/{HASH}"),
], ids=["meta", "health", "listing", "read_range_into", "get_bytes"])
def test_connection_refused_by_a_real_socket_names_the_request(
    call: Callable[[VidCacheClient], object], what: str, request_line: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with VidCacheClient(url, timeout=5) as client, pytest.raises(TransportError) as caught:
        call(client)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert caught.value.refused  # nothing listens there: vidcache and vcfs say so
    message = str(caught.value)
    assert message.startswith(f"{what}: request failed [{request_line.format(url=url)}]"), message


@pytest.mark.parametrize(("call", "what", "request_line"), [
    (lambda client: client.ingest("http://user:hunter2@o.test/v.mp4", "videos"),
     "ingest of http://o.test/v.mp4 into bucket 'videos'", "POST {url}/ingest"),
    (lambda client: client.resolve("http://user:hunter2@o.test/v.mp4"),
     "resolve of http://o.test/v.mp4", "GET {url}/resolve?url=http%3A%2F%2Fo.test%2Fv.mp4"),
], ids=["ingest", "resolve"])
def test_a_failure_names_no_credentials(call: Callable[[VidCacheClient], object], what: str,
                                        request_line: str) -> None:
    """Neither those of the URL ingested or resolved nor the service's (a base_url with
    user:password@), which httpx sends as Basic auth: a message is printed and logged. (Was:
    "ingest of http://user:hunter2@o.test/v.mp4 ... [POST http://admin:hunter2@...]".)"""
    url = f"http://127.0.0.1:{free_port()}"
    with (VidCacheClient(url.replace("http://", "http://admin:hunter2@"), timeout=5) as client,
          pytest.raises(TransportError) as caught):
        call(client)
    message = str(caught.value)
    assert message.startswith(f"{what}: request failed [{request_line.format(url=url)}]"), message
    assert "hunter2" not in message


def test_a_refusal_names_no_credentials() -> None:
    """The service's 422 for an ingest, the base_url and the URL with user:password@."""
    transport = httpx.MockTransport(json_error(422, "bucket: bad"))
    with (VidCacheClient("http://admin:hunter2@vidcache.test", transport=transport) as client,
          pytest.raises(InvalidRequestError) as caught):
        client.ingest("http://user:hunter2@o.test/v.mp4", "videos")
    assert str(caught.value) == ("ingest of http://o.test/v.mp4 into bucket 'videos': HTTP 422 "
                                 "Unprocessable Entity: bucket: bad "
                                 "[POST http://vidcache.test/ingest]")


def test_timeout_against_a_real_silent_socket() -> None:
    """A listening socket never accept()ed: the kernel completes the handshake, nobody answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with VidCacheClient(url, timeout=0.2) as client, \
                pytest.raises(RequestTimeout, match="timed out") as caught:
            client.get_bytes(HASH, byte_range=(0, 9))
        assert not caught.value.refused


def test_a_refusal_is_found_down_a_looping_chain_of_causes() -> None:
    """`TransportError.refused` follows `__cause__`/`__context__`, which may loop."""
    refused, reset = ConnectionRefusedError(111, "refused"), ConnectionResetError(104, "reset")
    inner = httpx.ConnectError("connect")
    inner.__cause__ = refused
    error = TransportError("x")
    error.__cause__ = inner
    assert error.refused
    first, second = OSError("a"), OSError("b")
    first.__context__, second.__context__ = second, first
    looping = TransportError("y")
    looping.__cause__ = first
    assert not looping.refused
    looping.__cause__ = reset
    assert not looping.refused


def test_a_refusal_survives_pickling() -> None:
    """A ProcessPoolExecutor worker's error reaches its caller pickled, without `__cause__`,
    where `refused` is found: a refused connection came back as not refused, and the advice
    vidcache and vcfs give for it was lost."""
    url = f"http://127.0.0.1:{free_port()}"
    with VidCacheClient(url, timeout=5) as client, pytest.raises(TransportError) as caught:
        client.health()
    assert caught.value.refused
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.__cause__ is None and copy.refused
    assert vars(copy) == vars(caught.value)
    assert not pickle.loads(pickle.dumps(RequestTimeout("read from x: timed out"))).refused


@pytest.mark.parametrize("call", [
    lambda client: client.resolve("http://x/" + "a" * 70_000),  # too long for a URL
    lambda client: client.resolve("http://x/\ud800"),  # not Unicode
    lambda client: list(client.list_videos(bucket="a" * 70_000)),
    lambda client: client.list_videos_page(prefix="\ud800"),
    lambda client: client.ingest("http://x/\ud800.mp4", "videos"),
    lambda client: client.ingest("http://x/a.mp4", "videos", meta={"n": float("nan")}),
    lambda client: client.ingest("http://x/a.mp4", "videos", meta={"o": object()}),
], ids=["long-url", "surrogate-url", "long-bucket", "surrogate-prefix", "surrogate-ingest",
        "nan-meta", "object-meta"])
@pytest.mark.parametrize("over", ["httpx", "sockets"])
def test_arguments_no_request_can_carry_are_refused_locally(
        make_client: MakeClient, call: Callable[[VidCacheClient], object], over: str) -> None:
    """httpx's InvalidURL (neither a VidCacheError nor a ValueError) and bare encoding errors
    ('Out of range float values are not JSON compliant') escaped, naming no call."""
    recorder = Recorder(lambda request: httpx.Response(500))
    client = (make_client(recorder) if over == "httpx"  # the sockets' GETs connect to nothing
              else VidCacheClient(f"http://127.0.0.1:{free_port()}", timeout=5))
    with client, pytest.raises(InvalidRequestError, match=r"cannot be sent: .*no request sent"):
        call(client)
    assert recorder.requests == []
