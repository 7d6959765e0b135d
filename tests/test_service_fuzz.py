"""Bad input from schemathesis: requests generated from the service's own OpenAPI document,
both schema-valid (positive) and schema-violating (negative), sent to the real server (with a
bearer token, so the authenticated paths are the ones exercised).

Every answer must pass schemathesis's checks (documented status, content type and response
schema; negative data rejected; valid data not refused without reason) and ours: no 5xx
except the documented upstream outcomes of ingest (502 the origin's host cannot be resolved or
reached, 504 it stalled: a random URL names no real origin), and every 4xx a JSON `detail` a
person can read. Bounded: MAX_EXAMPLES (VIDCACHE_FUZZ_EXAMPLES, default 30) per operation and
mode.

Schemathesis's own pytest plugin does not work with pytest 9 (it reads `node._nodeid`), so the
cases are drawn from its strategies inside plain hypothesis tests.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error

from tests.support import VidcacheServer

pytestmark = pytest.mark.timeout(180)

TOKEN = "fuzz-0123456789abcdef"
MAX_EXAMPLES = int(os.environ.get("VIDCACHE_FUZZ_EXAMPLES", "30"))
OPERATIONS = [("/ingest", "POST"), ("/resolve", "GET"), ("/meta/{content_hash}", "GET"),
              ("/video/{content_hash}", "GET"), ("/video/{content_hash}", "HEAD"),
              ("/video/{content_hash}", "DELETE"), ("/video/{content_hash}/chunks", "GET"),
              ("/videos", "GET"), ("/ingests", "GET"), ("/health", "GET")]
PARAMETERLESS = {("/health", "GET"), ("/ingests", "GET")}  # nothing to violate: no negative cases
UPSTREAM_FAILURES = ("cannot resolve host", "cannot connect to", "stalled", "answered")

statuses: collections.Counter[int] = collections.Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "token").write_text(TOKEN + "\n")
    with VidcacheServer(folder / "data", "--token-file", str(folder / "token"),
                        "--download-timeout", "2") as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(server: VidcacheServer) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def _assert_clear_answer(case: Case[Any], status: int, body: Any) -> None:
    if status >= 500:
        upstream = (case.operation.path == "/ingest" and status in (502, 504)
                    and any(reason in body["detail"] for reason in UPSTREAM_FAILURES))
        assert upstream, f"server error {status} for {case.method} {case.formatted_path}: {body}"
    if status >= 400 and case.method != "HEAD":
        assert isinstance(body, dict) and isinstance(body.get("detail"), str), body
        assert body["detail"].strip(), body
        assert TOKEN not in body["detail"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["positive", "negative"])
@pytest.mark.parametrize(("path", "method"), OPERATIONS,
                         ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_generated_requests_get_clear_answers(api_schema: Any, server: VidcacheServer,
                                             path: str, method: str,
                                             mode: GenerationMode) -> None:
    if mode is GenerationMode.NEGATIVE and (path, method) in PARAMETERLESS:
        pytest.skip("no parameters to violate")

    @given(case=api_schema[path][method].as_strategy(mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Case[Any]) -> None:
        response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=30)
        statuses[response.status_code] += 1
        case.validate_response(response, excluded_checks=[not_a_server_error])
        body = response.json() if response.content else None
        _assert_clear_answer(case, response.status_code, body)

    check()


def test_the_server_survived_the_fuzzing(server: VidcacheServer) -> None:
    """Runs last in this module: the service still answers, and nothing was stored."""
    import httpx

    assert httpx.get(f"{server.url}/health").json()["videos"] == 0
    assert sum(statuses.values()) > 0
    data = Path(server.data_dir)
    assert not [p for p in data.rglob("*") if p.is_file() and ".vidcache" not in p.parts]
    print(f"\nfuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
