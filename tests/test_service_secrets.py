"""Secrets in the query of a source URL (a presigned URL's X-Amz-Signature, a token, a key),
also in a URL nested in it (a redirector's `?url=`): sent to the origin as given, shown
REDACTED by the real service (answers, error details, its log, the access log) and by
`vidcache` (ingest's errors, show, list), and kept in the index as a digest only, an older
index's aliases rewritten so at start (docs/service.md, Secrets in URLs)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.service_support import (
    ACCESS_KEY,
    OTHER_SESSION_TOKEN,
    SESSION_TOKEN,
    SIGNATURE,
    WRONG_SIGNATURE,
    Api,
    digest,
    files_holding_secrets,
    leaks,
    presigned,
    redirector,
    serve_origin,
    shown,
)
from tests.support import VidcacheServer, wait_until
from vidcache.store import url_alias
from vidcache_client._credentials import without_credentials

pytestmark = pytest.mark.timeout(120)

def vidcache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vidcache", *args], capture_output=True,
                          text=True, timeout=90)


@pytest.mark.parametrize(("url", "expected"), [
    ("https://b.s3.amazonaws.com/v.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK"
     "%2F2025&X-Amz-Date=2025&x-amz-security-token=t&X-Amz-Signature=abc",
     "https://b.s3.amazonaws.com/v.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
     "REDACTED&X-Amz-Date=2025&x-amz-security-token=REDACTED&X-Amz-Signature=REDACTED"),
    ("https://s.googleapis.com/b/v.mp4?X-Goog-Credential=a&X-Goog-Signature=b&X-Goog-Date=1",
     "https://s.googleapis.com/b/v.mp4?X-Goog-Credential=REDACTED&X-Goog-Signature=REDACTED"
     "&X-Goog-Date=1"),
    ("https://a.blob.core.windows.net/c/v.mp4?sv=2024&se=2025&sp=r&sig=a%2Bb%3D",
     "https://a.blob.core.windows.net/c/v.mp4?sv=2024&se=2025&sp=r&sig=REDACTED"),
    ("https://d.cloudfront.net/v.mp4?Expires=1&Signature=a~b&Key-Pair-Id=K2",
     "https://d.cloudfront.net/v.mp4?Expires=1&Signature=REDACTED&Key-Pair-Id=K2"),
    ("http://u:p@h.test/v?token=a&access_token=b&key=c&api_key=d&apiKey=e&id=5&keyframe=1",
     "http://h.test/v?token=REDACTED&access_token=REDACTED&key=REDACTED&api_key=REDACTED"
     "&apiKey=REDACTED&id=5&keyframe=1"),
    ("http://h.test/v?md5=a&expires=1&__token__=exp=1~hmac=b&password=c&client_secret=d",
     "http://h.test/v?md5=REDACTED&expires=1&__token__=REDACTED&password=REDACTED"
     "&client_secret=REDACTED"),
    ("http://h.test/a;token=path/v?sig&a=1;sig=b&token=&X%2DAmz%2DSignature=c"
     "#access_token=d&state=e",
     "http://h.test/a;token=path/v?sig&a=1;sig=REDACTED&token=&X%2DAmz%2DSignature=REDACTED"
     "#access_token=REDACTED&state=e"),
    ("https://proxy.example/fetch?url=https%3A%2F%2Fcdn.example%2Fv.mp4%3Ftoken%3Dabc%26"
     "X-Amz-Signature%3Dd%252Fef%26id%3D1&id=2",
     "https://proxy.example/fetch?url=https%3A%2F%2Fcdn.example%2Fv.mp4%3Ftoken%3DREDACTED%26"
     "X-Amz-Signature%3DREDACTED%26id%3D1&id=2"),
    ("https://proxy.example/?u=https%3A%2F%2Fuser%3Apw%40cdn.example%2Fv.mp4&to=+//u:p@h/v"
     "&next=/watch?sig=a#cb=https://app.example/%23access_token%3Db%26state%3Dc",
     "https://proxy.example/?u=https%3A%2F%2Fcdn.example%2Fv.mp4&to=+//h/v"
     "&next=/watch?sig=REDACTED#cb=https://app.example/%23access_token%3DREDACTED%26state%3Dc"),
    ("https://safe.example/?url=https%3A%2F%2Fr.example%2Fl%3Fq%3Dhttps%253A%252F%252Fcdn"
     "%252Fv%253Fsig%253Dabc%26key%3Dd&q=why%3Fkey%3D5&next=a%3Fkey%3D5",
     "https://safe.example/?url=https%3A%2F%2Fr.example%2Fl%3Fq%3Dhttps%253A%252F%252Fcdn"
     "%252Fv%253Fsig%253DREDACTED%26key%3DREDACTED&q=why%3Fkey%3D5&next=a%3Fkey%3D5"),
], ids=["s3", "gcs", "azure", "cloudfront", "generic", "cdn", "forms", "nested", "nested-forms",
        "nested-twice"])
def test_a_urls_secrets_are_shown_redacted(url: str, expected: str) -> None:
    """Each secret parameter's value, its name kept; the path, other parameters, a name
    without a value and an empty value unchanged. So in a URL in a parameter's value,
    percent-encoded (once or twice) or not, in the query or the fragment: its user info left
    out too; a value that is no URL (`q=why?key=5`) is left alone. (Shown whole before; the
    nested URLs' secrets and user info shown whole before this too.)"""
    assert without_credentials(url) == expected


def test_a_presigned_urls_secrets_are_sent_shown_redacted_and_kept_as_digests(
        tmp_path: Path, videos: dict[str, Path]) -> None:
    """An origin that wants the signature (403 otherwise): a wrong one is refused, the right
    one stored; the answers, aliases, /resolve and the log show the URL REDACTED, and no
    file of the index holds a secret. The query still tells videos apart: id=6 is another
    alias (a duplicate), and so is a token that names the file, a secret itself: two videos,
    two aliases; `aliases` lists two shown alike once. (Before: the secrets shown everywhere
    and stored in the index.)"""
    data = tmp_path / "data"
    answers: list[str] = []
    with VidcacheServer(data) as server, serve_origin(videos["b.mp4"].parent) as (origin, _):
        api = Api(server.url)
        refused = api.ingest(presigned(origin, "b.mp4", WRONG_SIGNATURE), "signed")
        assert refused.status_code == 502, refused.text
        assert refused.json()["detail"].startswith(f"{shown(origin, 'b.mp4')} answered 403")

        url = presigned(origin, "b.mp4", SIGNATURE)
        stored = api.ingest_ok(url, "signed")
        assert (stored["status"], stored["hash"]) == ("new", digest(videos["b.mp4"].read_bytes()))
        assert api.ingest_ok(url, "signed")["status"] == "url_alias"
        resolved = api.http.get("/resolve", params={"url": url})
        assert resolved.json() == {"hash": stored["hash"], "url": shown(origin, "b.mp4")}
        # signed otherwise, or the alias shown (REDACTED): a URL not ingested, and the 404,
        # which shows it as the alias of the one ingested, says why
        for other_url in (presigned(origin, "b.mp4", WRONG_SIGNATURE), shown(origin, "b.mp4")):
            unknown = api.http.get("/resolve", params={"url": other_url})
            assert (unknown.status_code, unknown.json()["detail"]) == (
                404, f"URL not ingested: {shown(origin, 'b.mp4')}; the secrets of its query, "
                "REDACTED here, are compared as given: resolve the URL itself, not an alias "
                "shown by /meta or /videos")
        other = api.ingest_ok(presigned(origin, "b.mp4", SIGNATURE, number=6), "signed")
        assert other["status"] == "duplicate"
        b_by_token = api.ingest_ok(f"{origin}/by-token?token=b.mp4", "signed")
        c_by_token = api.ingest_ok(f"{origin}/by-token?token=c.mkv", "signed")
        # another alias, shown as the one before it: listed once
        b_again = api.ingest_ok(f"{origin}/by-token?token=./b.mp4", "signed")
        assert b_by_token["status"] == b_again["status"] == "duplicate"
        assert (c_by_token["status"], c_by_token["hash"]) == (
            "new", digest(videos["c.mkv"].read_bytes()))

        assert api.meta(stored["hash"]).json()["aliases"] == [
            shown(origin, "b.mp4"), shown(origin, "b.mp4", number=6),
            f"{origin}/by-token?token=REDACTED"]
        listed = api.http.get("/videos", params={"bucket": "signed"})
        assert {item["hash"]: item["aliases"] for item in listed.json()["items"]} == {
            stored["hash"]: [shown(origin, "b.mp4"), shown(origin, "b.mp4", number=6),
                             f"{origin}/by-token?token=REDACTED"],
            c_by_token["hash"]: [f"{origin}/by-token?token=REDACTED"]}
        answers += [refused.text, resolved.text, unknown.text, listed.text]
        wait_until(lambda: "X-Amz-Signature%3DREDACTED" in server.log(), timeout=10,
                   what="the /resolve in the access log")
        log = server.log()
        assert f"ingest {shown(origin, 'b.mp4')} failed (502)" in log
        assert f"ingest {shown(origin, 'b.mp4')}: new {stored['hash']}" in log
        assert files_holding_secrets(data) == []
        api.close()
    assert leaks("".join(answers) + server.log()) == []
    assert files_holding_secrets(data) == []
    with contextlib.closing(sqlite3.connect(data / ".vidcache" / "index.sqlite3")) as index:
        aliases = [url for (url,) in index.execute("SELECT url FROM url_aliases")]
    assert len(aliases) == 5 and all("REDACTED-" in alias for alias in aliases), aliases


def test_the_secrets_in_an_older_index_are_cut_at_start(tmp_path: Path,
                                                         media_url: str) -> None:
    """An index of version 1 (aliases without user:password@, their queries whole) holds the
    signature: the service keeps only its digest from the first start (rewriting the file:
    a deleted alias's text gone too), finds the URL by it, and shows it REDACTED. (Before: the
    signature stayed in the index and was shown in `aliases`.) A start that stopped before
    setting the version (a crash in the VACUUM after the rewrite) rewrites the aliases again
    at the next: their digests stay as they are (they were digested again, and the URL was no
    longer found)."""
    data = tmp_path / "data"
    with VidcacheServer(data) as server:
        api = Api(server.url)
        b = api.ingest_ok(f"{media_url}/b.mp4", "old")["hash"]
        api.close()
    signed = f"http://h.test/v.mp4?sv=2024&sig={SIGNATURE}&id=1"
    index = sqlite3.connect(data / ".vidcache" / "index.sqlite3")
    index.execute("PRAGMA secure_delete = OFF")  # the default of SQLite's own builds
    with index:
        index.executemany("INSERT INTO url_aliases (url, hash, added_at) VALUES (?, ?, "
                          "'2025-01-31T12:00:00.000Z')",
                          [(signed, b), (f"http://h.test/gone.mp4?sig={ACCESS_KEY}", b)])
        # deleted (as a deleted video's aliases are): its text stays in the file's free space
        index.execute("DELETE FROM url_aliases WHERE url LIKE '%gone.mp4%'")
        index.execute("PRAGMA user_version = 1")
    index.close()
    assert files_holding_secrets(data) != []

    with VidcacheServer(data) as server:
        api = Api(server.url)
        assert api.meta(b).json()["aliases"] == [f"{media_url}/b.mp4",
                                                 "http://h.test/v.mp4?sv=2024&sig=REDACTED&id=1"]
        assert api.http.get("/resolve", params={"url": signed}).json()["hash"] == b
        # h.test does not resolve: nothing is downloaded
        assert api.ingest_ok(signed, "old")["status"] == "url_alias"
        assert files_holding_secrets(data) == []
        assert "removed the credentials from 1 URL aliases" in server.log()
        api.close()

    index = sqlite3.connect(data / ".vidcache" / "index.sqlite3")
    index.execute("PRAGMA user_version = 1")
    index.close()
    with VidcacheServer(data) as server:
        api = Api(server.url)
        assert api.http.get("/resolve", params={"url": signed}).json()["hash"] == b
        api.close()


def test_a_nested_urls_secrets_are_shown_redacted_and_kept_as_digests(
        tmp_path: Path, videos: dict[str, Path]) -> None:
    """A presigned URL behind a redirector (`/fetch?url=` and the presigned URL
    percent-encoded; the origin wants the signature): stored, and nothing of its secrets in
    the answers, /meta and /videos aliases, /resolve, GET /ingests (a stalled one), the
    service's log (the access log's /resolve too) or the index's files. The same link again
    is `url_alias`, and so with a nested `user:password@` (left out, as in the URL itself);
    one that differs only in the nested session token is another alias (`duplicate`).
    (Before: each secret shown and stored whole, but in the access log's `/resolve?url=`.)"""
    data = tmp_path / "data"
    answers: list[str] = []
    with VidcacheServer(data) as server, ThreadPoolExecutor(1) as pool:
        api = Api(server.url)
        with serve_origin(videos["b.mp4"].parent) as (origin, stalled):
            url = redirector(origin, presigned(origin, "b.mp4", SIGNATURE))
            shown_url = redirector(origin, shown(origin, "b.mp4"))
            stored = api.ingest_ok(url, "nested")
            assert (stored["status"], stored["hash"]) == (
                "new", digest(videos["b.mp4"].read_bytes()))
            with_user = redirector(origin, presigned(origin, "b.mp4", SIGNATURE).replace(
                "http://", f"http://user:{ACCESS_KEY}@"))
            again = [api.ingest_ok(url, "nested"), api.ingest_ok(with_user, "nested")]
            assert [result["status"] for result in again] == ["url_alias", "url_alias"]
            retoken = api.ingest_ok(redirector(origin, presigned(
                origin, "b.mp4", SIGNATURE, token=OTHER_SESSION_TOKEN)), "nested")
            assert retoken["status"] == "duplicate"
            via_web = api.ingest_ok(url.replace("&via=mail", "&via=web"), "nested")
            assert via_web["status"] == "duplicate"
            resolved = [api.http.get("/resolve", params={"url": each}) for each in (url, with_user)]
            assert [answer.json() for answer in resolved] == [
                {"hash": stored["hash"], "url": shown_url}] * 2
            # the session tokens told apart, shown alike: listed once
            aliases = [shown_url, shown_url.replace("&via=mail", "&via=web")]
            meta = api.meta(stored["hash"])
            assert meta.json()["aliases"] == aliases
            listed = api.http.get("/videos", params={"bucket": "nested"})
            assert [item["aliases"] for item in listed.json()["items"]] == [aliases]

            # a download through the redirector under way, stalled
            stalling = redirector(origin,
                                  f"{origin}/stall/b.mp4?X-Amz-Signature={WRONG_SIGNATURE}")
            failing = pool.submit(httpx.post, f"{server.url}/ingest", timeout=90,
                                  json={"url": stalling, "bucket": "nested"})
            assert stalled.wait(timeout=60)
            under_way = wait_until(lambda: api.http.get("/ingests").json()["items"],
                                   timeout=60, what="the stalled ingest listed")
            assert [item["url"] for item in under_way] == [
                redirector(origin, f"{origin}/stall/b.mp4?X-Amz-Signature=REDACTED")]
        # the origin gone, the stalled download ends short
        failed = failing.result(timeout=90)
        assert failed.status_code == 502, failed.text
        answers += [json.dumps([stored, *again, retoken, via_web, *under_way]), failed.text,
                    meta.text, listed.text, *(answer.text for answer in resolved)]
        wait_until(lambda: server.log().count("GET /resolve?url=") == 2, timeout=10,
                   what="the two /resolve in the access log")
        api.close()
    assert leaks("".join(answers) + server.log()) == []
    assert files_holding_secrets(data) == []
    with contextlib.closing(sqlite3.connect(data / ".vidcache" / "index.sqlite3")) as index:
        stored_aliases = [url for (url,) in index.execute("SELECT url FROM url_aliases")]
    assert len(stored_aliases) == 3 and all("REDACTED-" in alias for alias in stored_aliases)


def test_the_secrets_of_nested_urls_in_an_older_index_are_cut_at_start(
        tmp_path: Path, media_url: str) -> None:
    """An index of version 2 (the secrets of an alias's query as digests, those of a URL
    nested in it whole) holds a nested signature, token and password: from the first start
    the service keeps only their digests (rewriting the file: a deleted alias's text gone
    too), finds each URL by them, shows them REDACTED; started again with the version set
    back (a crash before it was set), its digests stay as they are. (Before: the secrets
    stayed in the index and were shown in `aliases`.)"""
    data = tmp_path / "data"
    with VidcacheServer(data) as server:
        api = Api(server.url)
        b = api.ingest_ok(f"{media_url}/b.mp4", "old")["hash"]
        api.close()
    nested = redirector("http://h.test", presigned("http://cdn.test", "v.mp4", SIGNATURE))
    with_user = redirector("http://h.test", f"http://user:{ACCESS_KEY}@cdn.test/w.mp4")
    query = nested.partition("?")[2]
    signed_too = f"http://h.test/fetch?sig={WRONG_SIGNATURE}&{query}"
    # as version 2 stored them: the secrets of their own query digested
    older = [nested, with_user,
             f"{url_alias(f'http://h.test/fetch?sig={WRONG_SIGNATURE}')}&{query}"]
    gone = redirector("http://h.test/gone", f"http://c.test/v.mp4?token={OTHER_SESSION_TOKEN}")
    index = sqlite3.connect(data / ".vidcache" / "index.sqlite3")
    index.execute("PRAGMA secure_delete = OFF")  # the default of SQLite's own builds
    with index:
        index.executemany("INSERT INTO url_aliases (url, hash, added_at) VALUES (?, ?, "
                          "'2025-01-31T12:00:00.000Z')", [(url, b) for url in (*older, gone)])
        # deleted (as a deleted video's aliases are): its text stays in the file's free space
        index.execute("DELETE FROM url_aliases WHERE url = ?", (gone,))
        index.execute("PRAGMA user_version = 2")
    index.close()
    assert files_holding_secrets(data) != []

    shown_nested = redirector("http://h.test", shown("http://cdn.test", "v.mp4"))
    for start in ("first", "repeated"):
        with VidcacheServer(data) as server:
            api = Api(server.url)
            assert api.meta(b).json()["aliases"] == [
                f"{media_url}/b.mp4", shown_nested,
                redirector("http://h.test", "http://cdn.test/w.mp4"),
                f"http://h.test/fetch?sig=REDACTED&{shown_nested.partition('?')[2]}"], start
            for url in (nested, with_user, signed_too):
                assert api.http.get("/resolve", params={"url": url}).json()["hash"] == b, url
            # h.test does not resolve: nothing is downloaded
            assert api.ingest_ok(nested, "old")["status"] == "url_alias"
            assert files_holding_secrets(data) == []
            api.close()
        # the log goes on across starts: the repeat found nothing to cut
        assert server.log().count("removed the credentials from") == 1
        index = sqlite3.connect(data / ".vidcache" / "index.sqlite3")
        index.execute("PRAGMA user_version = 2")
        index.close()


def test_the_command_shows_a_presigned_url_redacted(tmp_path: Path,
                                                    videos: dict[str, Path]) -> None:
    """`vidcache ingest`'s error for a refused signature and for a source that is no URL,
    `show` and `list --json`: the URL REDACTED, no secret. (Before: shown whole.)"""
    with VidcacheServer(tmp_path / "data") as server, \
            serve_origin(videos["b.mp4"].parent) as (origin, _):
        refused = vidcache("ingest", presigned(origin, "b.mp4", WRONG_SIGNATURE), "--bucket",
                           "cli", "--server", server.url)
        assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
        assert refused.stderr.startswith(
            f"vidcache ingest: error: ingest of {shown(origin, 'b.mp4')} into bucket 'cli': "
            f"HTTP 502 "), refused.stderr
        assert f"{shown(origin, 'b.mp4')} answered 403" in refused.stderr
        typo = vidcache("ingest", f"h.test/v.mp4?token={SESSION_TOKEN}", "--bucket", "cli",
                        "--server", server.url)
        assert (typo.returncode, typo.stderr) == (
            1, "vidcache ingest: error: h.test/v.mp4?token=REDACTED: no such file, and not a "
               "URL (http://, https:// or file://)\n")

        stored = vidcache("ingest", presigned(origin, "b.mp4", SIGNATURE), "--bucket", "cli",
                          "--server", server.url)
        assert stored.returncode == 0, stored.stderr
        content_hash = json.loads(stored.stdout)["hash"]
        show = vidcache("show", content_hash, "--server", server.url)
        assert json.loads(show.stdout)["aliases"] == [shown(origin, "b.mp4")], show.stderr
        listed = vidcache("list", "--json", "--server", server.url)
        assert [json.loads(line)["aliases"] for line in listed.stdout.splitlines()] == [
            [shown(origin, "b.mp4")]], listed.stderr
    outputs = [run.stdout + run.stderr for run in (refused, typo, stored, show, listed)]
    assert leaks("".join(outputs)) == []
