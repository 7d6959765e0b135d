"""`scripts/bench --quick` runs end to end: media, service, proxy, mounts, JSON, chart, table.

The benchmark itself never runs in the test suite (its figures are not assertions); this only
checks the harness works. Peers that are not installed are skipped by the harness, which
records why; the test does not install them (BENCH_NO_INSTALL=1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from bench.proxy import (
    LOOPBACK,
    Connection,
    HookChain,
    Hooks,
    LinkProfile,
    ProxyConfig,
    ProxyThread,
    Verdict,
)
from bench.shims import CanonicalHeaderCase, IndexShim

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3 for the FUSE contenders")
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "BENCH_NO_INSTALL": "1"})
    assert result.returncode == 0, f"scripts/bench --quick failed:\n{result.stderr[-4000:]}"
    return out, result.stdout


@pytest.mark.fuse
def test_writes_json_with_every_figure_of_vcfs_and_the_floor(quick_run: tuple[Path, str]
                                                             ) -> None:
    out, _ = quick_run
    data = json.loads((out / "bench-quick.json").read_text())
    assert data["quick"] is True
    assert not [s for s in data["skipped"] if s["contender"] in ("vcfs", "local")]
    rows = {(r["contender"], r["figure"]): r for r in data["results"]}
    for contender in ("vcfs", "local"):
        for figure in ("seq_cold", "seq_warm", "ffprobe_faststart", "ffprobe_moov_end",
                       "seek", "random_128k", "concurrent"):
            row = rows[contender, figure]
            assert row["errors"] == 0, (contender, figure, row["notes"])
            assert row["median"] > 0
    vcfs_cold = rows["vcfs", "seq_cold"]
    assert vcfs_cold["server_mb"] > 0 and vcfs_cold["requests"] >= 1
    assert vcfs_cold["peak_rss_mb"] is not None
    assert data["targets"], "targets are evaluated even in a quick run"


@pytest.mark.fuse
def test_prints_a_markdown_table_and_draws_a_chart(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    assert "| figure | contender | median |" in stdout
    assert "### Targets" in stdout
    assert (out / "bench-quick.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.fuse
def test_skipped_contenders_say_why(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    data = json.loads((out / "bench-quick.json").read_text())
    measured = {r["contender"] for r in data["results"]}
    for skip in data["skipped"]:
        assert skip["reason"], skip
    expected = {"local", "curl", "ffmpeg-url", "rclone", "httpfs2", "vcfs"}
    assert expected <= measured | {s["contender"] for s in data["skipped"]}


# The latency proxy on its own: the reliability work builds its fault injection on its hooks.

BODY = bytes(range(256)) * 4096  # 1 MiB


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves BODY at any path, honouring `Range: bytes=a-b` (http.server does not)."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the real service

    def do_GET(self) -> None:
        first, last = 0, len(BODY) - 1
        asked = self.headers.get("Range")
        if asked:
            start, _, end = asked.removeprefix("bytes=").partition("-")
            first, last = int(start), int(end)
        self.send_response(206 if asked else 200)
        if asked:
            # lower case, as uvicorn sends it: CanonicalHeaderCase must restore the case
            self.send_header("content-range", f"bytes {first}-{last}/{len(BODY)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self.wfile.write(BODY[first : last + 1])

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def origin_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _proxy(port: int, *, hooks: Hooks | None = None, profile: LinkProfile = LOOPBACK
           ) -> ProxyThread:
    return ProxyThread(ProxyConfig(upstream_port=port, profile=profile), hooks=hooks)


def test_proxy_forwards_and_counts_requests_and_bytes(origin_port: int) -> None:
    with _proxy(origin_port) as proxy, httpx.Client(base_url=proxy.url) as client:
        whole = client.get("/blob")
        part = client.get("/blob", headers={"Range": "bytes=10-19"})
        counters = proxy.counters()
    assert whole.content == BODY
    assert part.status_code == 206 and part.content == BODY[10:20]
    assert counters["connections"] == 1 and counters["requests"] == 2
    assert [r["range"] for r in counters["request_log"]] == [None, "bytes=10-19"]
    # the bodies plus two response heads of a few hundred bytes each
    assert len(BODY) + 10 + 100 < counters["bytes_down"] < len(BODY) + 10 + 2000


def test_proxy_delays_every_request_not_only_the_connection(origin_port: int) -> None:
    slow = LinkProfile(name="slow", one_way_delay_s=0.05)
    with _proxy(origin_port, profile=slow) as proxy, httpx.Client(base_url=proxy.url) as client:
        client.get("/blob", headers={"Range": "bytes=0-0"})  # connection set up
        started = time.monotonic()
        client.get("/blob", headers={"Range": "bytes=0-0"})
        second = time.monotonic() - started
    assert second >= 0.1  # a lower bound: one round trip of 2 x 50 ms on a kept-alive connection


def test_hooks_answer_requests_rewrite_heads_and_cut_responses(origin_port: int) -> None:
    class ResetAfterFirstChunk(Hooks):
        def on_response_data(self, conn: Connection, data: bytes) -> Verdict:
            return Verdict(data[:1000], end="reset") if conn.bytes_down == 0 else Verdict(data)

    shims = HookChain(IndexShim(names=["abc"]), CanonicalHeaderCase())
    with _proxy(origin_port, hooks=shims) as proxy:
        index = httpx.get(f"{proxy.url}/video/")
        raw = httpx.get(f"{proxy.url}/blob", headers={"Range": "bytes=0-9"})
        counters = proxy.counters()
    assert '<a href="abc">' in index.text and counters["answered_by_hooks"] == 1
    assert raw.content == BODY[:10]
    assert b"Content-Range" in [name for name, _ in raw.headers.raw]
    with _proxy(origin_port, hooks=ResetAfterFirstChunk()) as proxy, \
            pytest.raises(httpx.HTTPError):
        httpx.get(f"{proxy.url}/blob")
