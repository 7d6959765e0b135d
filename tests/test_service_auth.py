"""The optional bearer token against real servers: `--token-file` guards ingest and delete,
`--token-reads` every route but /health and the API description; refusals are 401 with
`WWW-Authenticate: Bearer` and a detail saying what is wrong, never echoing the token; the
client and `vidcache ingest --token-file` send it; bad token files stop the server early."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service_support import digest, routes_error_body, unique
from tests.support import VidcacheServer, free_port
from vidcache_client import AuthError, VidCacheClient

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-Token_0123456789abcdef"
WRONG = "wrong-Token_0123456789abcdef"
NO_VIDEO = "0" * 64


def _token_file(folder: Path, text: str) -> Path:
    path = folder / "token"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def writes_guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    folder = tmp_path_factory.mktemp("auth-writes")
    token_file = _token_file(folder, TOKEN + "\r\n")  # the line ending is not part of it
    with VidcacheServer(folder / "data", "--token-file", str(token_file)) as server:
        yield server


@pytest.fixture(scope="module")
def all_guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    folder = tmp_path_factory.mktemp("auth-reads")
    token_file = _token_file(folder, TOKEN + "\n")
    with VidcacheServer(folder / "data", "--token-file", str(token_file),
                        "--token-reads") as server:
        yield server


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_refused(response: httpx.Response, *fragments: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    text = response.text + json.dumps(dict(response.headers))
    assert TOKEN not in text and WRONG not in text
    if response.request.method != "HEAD":
        detail = response.json()["detail"]
        for fragment in fragments:
            assert fragment in detail, detail
        # the routes' bytes form of an error body (the token check runs before them)
        assert response.content == routes_error_body(detail)


def test_writes_need_the_token(writes_guarded: VidcacheServer, media_url: str,
                               videos: dict[str, Path]) -> None:
    url, body = writes_guarded.url, {"url": f"{media_url}/b.mp4", "bucket": unique("auth")}
    _assert_refused(httpx.post(f"{url}/ingest", json=body),
                    "POST /ingest needs a bearer token", "Authorization: Bearer <token>")
    _assert_refused(httpx.post(f"{url}/ingest", json=body, headers=_bearer(WRONG)),
                    "wrong bearer token", "--token-file")
    wrong = httpx.post(f"{url}/ingest", json=body, headers=_bearer(WRONG))
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    _assert_refused(httpx.post(f"{url}/ingest", json=body,
                               headers={"Authorization": f"Basic {TOKEN}"}), "'Bearer <token>'")
    _assert_refused(httpx.post(f"{url}/ingest", json=body, headers={"Authorization": "Bearer"}),
                    "empty token")
    _assert_refused(httpx.delete(f"{url}/video/{NO_VIDEO}"), "DELETE /video/")
    # a refused request reads nothing: not even a body far over the size cap
    _assert_refused(httpx.post(f"{url}/ingest", content=b"x" * 1_000_000))

    stored = httpx.post(f"{url}/ingest", json=body, headers=_bearer(TOKEN), timeout=60)
    assert stored.status_code == 200, stored.text
    content_hash = stored.json()["hash"]
    assert content_hash == digest(videos["b.mp4"].read_bytes())
    # reads stay open without --token-reads
    assert httpx.get(f"{url}/video/{content_hash}").content == videos["b.mp4"].read_bytes()
    assert httpx.get(f"{url}/meta/{content_hash}").status_code == 200
    assert httpx.delete(f"{url}/video/{content_hash}", headers=_bearer(TOKEN)).status_code == 204


def test_token_reads_guards_every_read_but_health_and_docs(all_guarded: VidcacheServer) -> None:
    url = all_guarded.url
    for path in (f"/meta/{NO_VIDEO}", f"/video/{NO_VIDEO}", f"/video/{NO_VIDEO}/chunks",
                 "/videos", "/resolve?url=http://x/"):
        _assert_refused(httpx.get(url + path), "needs a bearer token")
        assert httpx.get(url + path, headers=_bearer(TOKEN)).status_code in (200, 404)
    _assert_refused(httpx.head(f"{url}/video/{NO_VIDEO}"))
    for path in ("/health", "/openapi.json", "/docs"):
        assert httpx.get(url + path).status_code == 200, path


def test_head_is_guarded_as_get(all_guarded: VidcacheServer) -> None:
    """HEAD answers as GET on every read (it was 405 with the token on the JSON routes): under
    --token-reads it needs the token as GET does, and /health stays open."""
    url = all_guarded.url
    for path in (f"/meta/{NO_VIDEO}", f"/video/{NO_VIDEO}/chunks", "/videos",
                 "/resolve?url=http://x/", "/ingests"):
        _assert_refused(httpx.head(url + path))
        _assert_refused(httpx.head(url + path, headers=_bearer(WRONG)))
        get = httpx.get(url + path, headers=_bearer(TOKEN))
        head = httpx.head(url + path, headers=_bearer(TOKEN))
        assert (head.status_code, head.headers["content-length"]) == (
            get.status_code, get.headers["content-length"]), path
    assert httpx.head(f"{url}/health").status_code == 200


def test_the_ingests_under_way_need_the_token_only_with_token_reads(
        writes_guarded: VidcacheServer, all_guarded: VidcacheServer) -> None:
    """GET /ingests shows the URLs being ingested: a read like any other. (No such route
    before: 404 with the token.)"""
    _assert_refused(httpx.get(f"{all_guarded.url}/ingests"), "GET /ingests needs a bearer token")
    with VidCacheClient(all_guarded.url, token=WRONG) as client, pytest.raises(AuthError):
        client.ingests()
    with VidCacheClient(all_guarded.url, token=TOKEN) as client:
        assert client.ingests() == []
    assert httpx.get(f"{writes_guarded.url}/ingests").json() == {"items": []}


def test_openapi_declares_the_token(all_guarded: VidcacheServer) -> None:
    spec = httpx.get(f"{all_guarded.url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearerToken"] == {
        "type": "http", "scheme": "bearer",
        "description": "the token in the file the server was started with (--token-file)"}
    assert spec["paths"]["/ingest"]["post"]["security"] == [{"bearerToken": []}]
    assert "401" in spec["paths"]["/videos"]["get"]["responses"]
    assert "security" not in spec["paths"]["/health"]["get"]


@given(value=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80).filter(
    lambda v: v == v.strip()))  # what HTTP lets a header carry
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_other_authorization_header_is_401(writes_guarded: VidcacheServer,
                                              value: str) -> None:
    if value.strip().removeprefix("Bearer").strip() == TOKEN:
        return
    response = httpx.delete(f"{writes_guarded.url}/video/{NO_VIDEO}",
                            headers={"Authorization": value})
    _assert_refused(response)


def test_client_sends_the_token_and_says_what_to_do_without_it(
        all_guarded: VidcacheServer, media_url: str, videos: dict[str, Path]) -> None:
    with VidCacheClient(all_guarded.url) as anonymous, \
            pytest.raises(AuthError) as missing:
        anonymous.get_meta(NO_VIDEO)
    assert missing.value.status_code == 401
    assert "requires a bearer token: pass VidCacheClient(..., token=...)" in str(missing.value)
    with VidCacheClient(all_guarded.url, token=WRONG) as wrong, \
            pytest.raises(AuthError) as refused:
        wrong.list_videos().__next__()
    assert ("refused the client's token: pass VidCacheClient(..., token=...) with the token "
            "of the server's --token-file") in str(refused.value)
    assert WRONG not in str(refused.value)

    with VidCacheClient(all_guarded.url, token=TOKEN) as client:
        result = client.ingest(f"{media_url}/c.mkv", unique("auth"))
        assert client.get_bytes(result["hash"]) == videos["c.mkv"].read_bytes()
        client.delete(result["hash"])
        assert client.get_meta(result["hash"]) is None


def _vidcache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vidcache", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_ingest_reads_the_token_file(writes_guarded: VidcacheServer, media_url: str,
                                         tmp_path: Path) -> None:
    url = f"{media_url}/c.mkv?{unique('cli')}"
    refused = _vidcache("ingest", url, "--bucket", "auth", "--server", writes_guarded.url)
    assert refused.returncode == 1
    assert "needs a bearer token" in refused.stderr
    assert "give the server's token with --token-file FILE" in refused.stderr
    token_file = _token_file(tmp_path, TOKEN + "\n")
    run = _vidcache("ingest", url, "--bucket", "auth", "--server", writes_guarded.url,
                    "--token-file", str(token_file))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"] in ("new", "duplicate")


@pytest.mark.parametrize(("content", "fragment"), [
    ("", "is empty"),
    ("\n", "is empty"),
    ("two words\n", "printable ASCII without spaces"),
    ("line1\nline2\n", "printable ASCII without spaces"),
    ("t\u00f6ken\n", "not ASCII"),
    (None, "cannot read token file"),
])
def test_unusable_token_file_stops_the_server(tmp_path: Path, content: str | None,
                                             fragment: str) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_bytes(content.encode())
    run = _vidcache("serve", "--data", str(tmp_path / "data"), "--port", str(free_port()),
                    "--token-file", str(token_file))
    assert run.returncode == 2, run.stderr
    assert "--token-file" in run.stderr and fragment in run.stderr, run.stderr
    assert not (tmp_path / "data").exists()


def test_unusable_token_file_stops_the_ingest_command(tmp_path: Path) -> None:
    run = _vidcache("ingest", "http://x/v.mp4", "--bucket", "b", "--token-file",
                    str(_token_file(tmp_path, "\n")))
    assert run.returncode == 2
    assert "--token-file" in run.stderr and "is empty" in run.stderr


def test_token_reads_without_token_file_is_a_usage_error(tmp_path: Path) -> None:
    run = _vidcache("serve", "--data", str(tmp_path / "data"), "--token-reads")
    assert run.returncode == 2
    assert "--token-reads needs --token-file" in run.stderr


@pytest.mark.parametrize("token", [f"{TOKEN}\n", "two words", "t\u00f6ken"])
def test_client_refuses_a_token_that_cannot_travel_in_a_header(token: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        VidCacheClient("http://127.0.0.1:8020", token=token)
