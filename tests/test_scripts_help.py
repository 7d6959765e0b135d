"""`--help` of scripts/setup and scripts/test: their usage, and nothing installed or run (the
demo's and the benchmark's are in test_demo_script.py and test_bench_smoke.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize(("script", "usage"), [
    ("setup", "  scripts/setup [--tests]\n"),
    ("test", "  scripts/test [PYTEST_ARGUMENTS...]\n"),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_the_usage_and_runs_nothing(script: str, usage: str, flag: str) -> None:
    """setup refused --help as an unknown option (exit 2); test installed, linted and
    type-checked, then printed pytest's help."""
    result = subprocess.run([str(SCRIPTS / script), flag], capture_output=True, text=True,
                            timeout=120, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result
    assert result.stdout.endswith(usage), result.stdout
    assert "set -" not in result.stdout and "pytest [options]" not in result.stdout
