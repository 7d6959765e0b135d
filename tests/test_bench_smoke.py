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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.fuse


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


def test_prints_a_markdown_table_and_draws_a_chart(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    assert "| figure | contender | median |" in stdout
    assert "### Targets" in stdout
    assert (out / "bench-quick.png").read_bytes().startswith(b"\x89PNG")


def test_skipped_contenders_say_why(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    data = json.loads((out / "bench-quick.json").read_text())
    measured = {r["contender"] for r in data["results"]}
    for skip in data["skipped"]:
        assert skip["reason"], skip
    expected = {"local", "curl", "ffmpeg-url", "rclone", "httpfs2", "vcfs"}
    assert expected <= measured | {s["contender"] for s in data["skipped"]}
