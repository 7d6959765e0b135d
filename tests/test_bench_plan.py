"""What `scripts/bench` measures and how often, as docs/benchmarks.md states it: the plan of a
full and of a `--quick` run, the narrowing by --profiles and --workloads, the options it
refuses, the warm-up round and the cache budget of the RSS target. The end-to-end run is in
test_bench_smoke.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.contenders import CONTENDERS
from bench.proxy import LOOPBACK, WAN
from bench.run import Progress, Runner, make_plan, run_profile, vcfs_cache_budget
from bench.stack import Service, Video
from bench.workloads import Corpus

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def test_a_full_run_measures_both_profiles_three_times() -> None:
    """docs/benchmarks.md, "Workloads and figures": the seeks at 23 %, 52 %, 79 %; 64 random
    reads (WAN: 32); the WAN profile reads the first 64 MiB and has no concurrent readers."""
    plan = make_plan(quick=False, runs=None, contenders=None, profiles=None)
    assert (plan.quick, plan.runs, plan.service_runs) == (False, 3, 3)
    assert plan.contenders == ("local", "curl", "ffmpeg-url", "rclone", "httpfs2", "vcfs")
    assert list(plan.profiles) == ["loopback", "wan"]
    profile, workloads, settings = plan.profiles["loopback"]
    assert profile == LOOPBACK
    assert workloads == ("sequential", "ffprobe", "seek", "random", "concurrent")
    assert [round(100 * f) for f in settings.seek_fractions] == [23, 52, 79]
    assert (settings.random_reads, settings.sequential_limit) == (64, None)
    assert (settings.seeker_segments, settings.seeker_segment_bytes) == (8, 4 * MIB)
    profile, workloads, settings = plan.profiles["wan"]
    assert profile == WAN and profile.describe() == "wan: +20 ms RTT, 200 Mbit/s"
    assert workloads == ("sequential", "ffprobe", "seek", "random")
    assert (settings.random_reads, settings.sequential_limit) == (32, 64 * MIB)


def test_a_quick_run_is_one_run_on_loopback_with_fewer_reads() -> None:
    plan = make_plan(quick=True, runs=None, contenders=["vcfs"], profiles=None)
    assert (plan.quick, plan.runs, plan.service_runs, plan.contenders) == (True, 1, 1, ("vcfs",))
    assert list(plan.profiles) == ["loopback"]
    _, workloads, settings = plan.profiles["loopback"]
    assert workloads == ("sequential", "ffprobe", "seek", "random", "concurrent")
    assert (len(settings.seek_fractions), settings.random_reads) == (1, 8)


def test_profiles_left_without_a_workload_are_dropped() -> None:
    """Was: `--workloads concurrent` kept the WAN profile with nothing to run, which still
    started its proxy and listed it in the JSON."""
    plan = make_plan(quick=False, runs=2, contenders=None, profiles=None,
                     workloads=["concurrent", "seek"])
    assert {name: workloads for name, (_, workloads, _) in plan.profiles.items()} == {
        "loopback": ("seek", "concurrent"), "wan": ("seek",)}
    plan = make_plan(quick=False, runs=None, contenders=None, profiles=None,
                     workloads=["concurrent"])
    assert list(plan.profiles) == ["loopback"]
    plan = make_plan(quick=False, runs=None, contenders=None, profiles=["wan"],
                     workloads=["concurrent"])
    assert plan.profiles == {}


def test_workloads_no_chosen_contender_runs_are_dropped() -> None:
    """Was: `--contenders curl` kept every workload, and `--contenders curl --workloads seek`
    made the corpus, started the service and its proxy, and measured nothing."""
    plan = make_plan(quick=False, runs=None, contenders=["curl", "ffmpeg-url"], profiles=None)
    assert {name: workloads for name, (_, workloads, _) in plan.profiles.items()} == {
        "loopback": ("sequential", "ffprobe", "seek"), "wan": ("sequential", "ffprobe", "seek")}
    plan = make_plan(quick=True, runs=None, contenders=["curl"], profiles=None,
                     workloads=["seek", "concurrent"])
    assert plan.profiles == {}


def test_the_service_speed_steps_runs_must_be_at_least_one(tmp_path: Path) -> None:
    """`python -m bench.service_speed --runs 0` made the 315 MB media, then failed on the
    median of no readings; now a usage error before anything starts."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.service_speed", "--runs", "0", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result
    assert "argument --runs: must be a whole number of at least 1, not '0'" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("arguments", "why"), [
    (["--quick", "--profiles", "wan"], "nothing to measure"),
    (["--profiles", "wan", "--workloads", "concurrent"], "nothing to measure"),
    (["--contenders", "curl", "--workloads", "seek"], "nothing to measure"),
    (["--runs", "0"], "argument --runs: must be a whole number of at least 1, not '0'"),
    # str.isdigit() takes it and int() does not: was argparse's "invalid _positive_int value"
    (["--runs", "\N{SUPERSCRIPT TWO}"], "must be a whole number of at least 1, not '\u00b2'"),
    (["--vcfs-options", "--cache-size lots"], "not options of `vcfs mount`"),
    (["--quick", "--service-variant", "--server nginx"],
     "--service-variant '--server nginx': not options of bench.service_variants"),
    (["--quick", "--service-variant", "--chunk-size -1"],
     "--service-variant '--chunk-size -1': not options of bench.service_variants"),
], ids=["quick-wan", "wan-concurrent", "curl-seek", "runs-0", "runs-superscript",
        "bad-vcfs-options", "bad-service-variant", "negative-chunk-size"])
def test_options_that_would_measure_nothing_are_refused(tmp_path: Path, arguments: list[str],
                                                        why: str) -> None:
    """Usage errors (exit 2) before anything starts. Was: `--quick --profiles wan` made the
    corpus, started the service, measured nothing and exited 0 (so did a contender with none
    of the chosen workloads, `--contenders curl --workloads seek`); `--runs 0` ran the warm-up
    alone and recorded nothing; a bad --vcfs-options failed every vcfs mount, a bad
    --service-variant the service's start, once the corpus was made."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", *arguments, "--no-service-speed", "--out",
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "BENCH_NO_INSTALL": "1"})
    assert result.returncode == 2, result
    assert why in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_rss_targets_budget_is_the_cache_size_vcfs_mounts_with() -> None:
    assert vcfs_cache_budget([]) == 256 * MIB  # vcfs mount's default
    assert vcfs_cache_budget(["--block-size", "256K", "--cache-size", "64M"]) == 64 * MIB
    assert vcfs_cache_budget(["--cache-size=1G"]) == 1024 * MIB


def _corpus(directory: Path) -> Corpus:
    path = directory / "seq.mp4"
    path.write_bytes(os.urandom(4 * MIB))
    video = Video(name=path.name, content_hash="0" * 64, size=4 * MIB, duration_s=1.0,
                  local_path=path, blob_path=path, file_path=path.name)
    return Corpus(sequential=video, probe_faststart=video, probe_moov_end=video,
                  readers=(video,))


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_a_warm_up_round_comes_first_and_is_not_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quick: bool
) -> None:
    """docs/benchmarks.md: the runs come after one warm-up round per workload, run the same
    way and not recorded; `--quick` has none. The local file's random reads, for real."""
    corpus = _corpus(tmp_path)
    plan = make_plan(quick=quick, runs=2, contenders=["local"], profiles=["loopback"],
                     workloads=["random"])
    runner = Runner(corpus=corpus, progress=Progress())
    # Never started: the proxy in front of it is only there for networked contenders.
    service = Service(tmp_path / "store", tmp_path / "service.log")
    skipped: list[dict[str, str]] = []

    run_profile(runner, plan, "loopback", service=service, work=tmp_path / "work",
                videos=[corpus.sequential], skipped=skipped)

    assert skipped == [] and CONTENDERS["local"].missing() is None
    assert [(s.contender, s.figure, s.run, s.errors) for s in runner.samples] == [
        ("local", "random_128k", 0, 0), ("local", "random_128k", 1, 0)]
    rounds = [line.rpartition("· ")[2] for line in capsys.readouterr().err.splitlines()
              if "loopback · random · local · " in line]
    assert rounds == ["run 1/2", "run 2/2"] if quick else ["warm-up", "run 1/2", "run 2/2"]
