"""`scripts/bench`: vcfs and its peers on the same files, server and machine, in one run.

Steps: generate (or reuse) the test videos; start a vidcache service on loopback and ingest
them from a loopback origin; for each network profile, start the latency proxy in front of the
service and run every workload against every contender that supports it, interleaving the
contenders within each run so drifting machine load hits them alike; last, measure the
service's own GET throughput next to nginx. Progress goes to stderr; the Markdown table to
stdout; JSON and a PNG chart to the output directory (default bench-results/).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import media, report, service_speed, service_variants
from bench.contenders import CONTENDERS, Contender, ContenderUnavailable, Vcfs
from bench.guardian import guarding
from bench.proxy import LOOPBACK, WAN, LinkProfile
from bench.proxy_process import ProxyProcess
from bench.report import Sample
from bench.service_speed import positive_runs, tree_cpu_seconds
from bench.stack import Nginx, Service, Video, ingest, origin
from bench.workloads import WORKLOADS, Corpus, Measure, Settings
from vcfs.cli import build_parser as vcfs_parser
from vidcache_client._arguments import RawDescriptionHelpFormatter

QUIESCE_STABLE_S = 0.3  # no new bytes for this long: background fetching has stopped
QUIESCE_MAX_S = 5.0
REQUEST_LOG_KEPT = 40  # requests of each sample kept in the JSON, to see a contender's pattern


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What one run measures: profiles -> workloads, and how often."""

    quick: bool
    runs: int
    contenders: tuple[str, ...]
    profiles: dict[str, tuple[LinkProfile, tuple[str, ...], Settings]]
    service_runs: int


def make_plan(*, quick: bool, runs: int | None, contenders: list[str] | None,
              profiles: list[str] | None, workloads: list[str] | None = None) -> Plan:
    """The default plan narrowed to the chosen profiles and workloads, less the workloads
    none of the chosen contenders runs (curl runs "sequential" only); a profile left with no
    workload is dropped (the WAN profile has no "concurrent", --quick no WAN profile)."""
    plan = _default_plan(quick=quick, runs=runs, contenders=contenders)
    chosen = {}
    for name, (profile, names, settings) in plan.profiles.items():
        kept = tuple(w for w in names if (not workloads or w in workloads)
                     and any(CONTENDERS[c].supports(w) for c in plan.contenders))
        if kept and (not profiles or name in profiles):
            chosen[name] = (profile, kept, settings)
    return dataclasses.replace(plan, profiles=chosen)


def _default_plan(*, quick: bool, runs: int | None, contenders: list[str] | None) -> Plan:
    names = tuple(contenders or CONTENDERS)
    if quick:
        settings = Settings(seek_fractions=(0.517,), random_reads=8, seeker_segments=2,
                            seeker_segment_bytes=256 << 10)
        return Plan(quick=True, runs=runs or 1, contenders=names, service_runs=1,
                    profiles={"loopback": (LOOPBACK, tuple(WORKLOADS), settings)})
    full = {
        "loopback": (LOOPBACK, tuple(WORKLOADS), Settings()),
        # Under the 200 Mbit/s cap only the first 64 MiB is read sequentially (2.7 s at line
        # rate); the concurrency target is a loopback ratio.
        "wan": (WAN, ("sequential", "ffprobe", "seek", "random"),
                Settings(sequential_limit=64 << 20, random_reads=32)),
    }
    return Plan(quick=False, runs=runs or 3, contenders=names, service_runs=3, profiles=full)


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr,
              flush=True)


@dataclass
class Runner:
    """Runs workloads and records samples; it is the `Context` the workloads see."""

    corpus: Corpus
    progress: Progress
    settings: Settings = field(default_factory=Settings)
    run_index: int = 0
    samples: list[Sample] = field(default_factory=list)
    profile: str = ""
    proxy: ProxyProcess | None = None
    contender: Contender | None = None
    service_pid: int = 0

    @contextlib.contextmanager
    def measure(self, figure: str) -> Iterator[Measure]:
        contender = self.contender
        assert contender is not None
        networked = contender.networked and self.proxy is not None
        if networked:
            assert self.proxy is not None
            self.proxy.reset()
        cpu_before = self._cpu(contender)
        m = Measure()
        try:
            yield m
        except ContenderUnavailable:
            raise
        except Exception as exc:  # a failed figure is a result, not the end of the run
            m.fail(f"{type(exc).__name__}: {exc}")
        m.stop()
        counters = self._quiesced_counters() if networked else None
        cpu = {name: after - cpu_before[name] for name, after in self._cpu(contender).items()}
        stats = contender.stats() if isinstance(contender, Vcfs) else None
        sample = Sample(
            profile=self.profile, figure=figure, contender=contender.name, run=self.run_index,
            seconds=m.seconds, bytes_read=m.bytes_read, errors=m.errors, notes=m.notes,
            requests=None if counters is None else counters["requests"],
            connections=None if counters is None else counters["connections"],
            bytes_down=None if counters is None else counters["bytes_down"],
            rss_kib=_peak_rss_kib(contender.pids()), daemon_stats=_parse_stats(stats),
            request_log=[] if counters is None else counters["request_log"][:REQUEST_LOG_KEPT],
            cpu_seconds=cpu,
            per_op=self.settings.random_reads if figure == "random_128k" else 1)
        if self.run_index >= 0:
            self.samples.append(sample)
        traffic = "" if counters is None else (
            f", {counters['requests']} req, {counters['bytes_down'] / 1e6:.1f} MB from server")
        failed = f", {m.errors} ERRORS: {m.notes[:1]}" if m.errors else ""
        self.progress(f"    {figure}: {sample.value():.4g} {report.FIGURES[figure].unit}"
                      f"{traffic}{failed}")

    def _cpu(self, contender: Contender) -> dict[str, float]:
        """CPU seconds so far of the daemon(s), the service and the proxy."""
        return {"daemon": sum(tree_cpu_seconds(pid) for pid in contender.pids()),
                "service": tree_cpu_seconds(self.service_pid) if self.service_pid else 0.0,
                "proxy": tree_cpu_seconds(self.proxy.pid) if self.proxy is not None else 0.0}

    def _quiesced_counters(self) -> dict[str, Any]:
        """Counters once the contender stopped fetching (readahead may still be running)."""
        assert self.proxy is not None
        deadline = time.monotonic() + QUIESCE_MAX_S
        last = self.proxy.counters()
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.proxy.counters()
            if now["bytes_down"] != last["bytes_down"] or now["requests"] != last["requests"]:
                stable_since = time.monotonic()
                last = now
            elif time.monotonic() - stable_since >= QUIESCE_STABLE_S:
                break
        return last


def _peak_rss_kib(pids: list[int]) -> int | None:
    peaks = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]))
    return max(peaks) if peaks else None


def _parse_stats(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return {"raw": text[:2000]}
    return parsed if isinstance(parsed, dict) else {"raw": parsed}


def prepare_corpus(out: Path, *, quick: bool, service: Service, origin_url: str,
                   progress: Progress) -> Corpus:
    specs = media.corpus(quick=quick)
    directory = out / "media" / ("quick" if quick else "full")
    videos: dict[str, Video] = {}
    for spec in specs.all():
        path = media.generate(spec, directory)
        videos[spec.name] = ingest(service, origin_url, path)
        progress(f"ingested {spec.name}: {videos[spec.name].size / 1e6:.1f} MB, "
                 f"{videos[spec.name].duration_s:.1f} s, {videos[spec.name].content_hash[:12]}")
    # The ingests left ~800 MB of dirty pages, which the kernel writes back ~30 s later: in
    # the middle of the first measurements, had they not been written out here.
    progress("writing the ingested files out to disk (sync)")
    os.sync()
    return Corpus(sequential=videos[specs.sequential.name],
                  probe_faststart=videos[specs.probe_faststart.name],
                  probe_moov_end=videos[specs.probe_moov_end.name],
                  readers=tuple(videos[spec.name] for spec in specs.readers))


def run_profile(runner: Runner, plan: Plan, name: str, *, service: Service, work: Path,
                videos: list[Video], skipped: list[dict[str, str]]) -> None:
    profile, workloads, settings = plan.profiles[name]
    runner.profile, runner.settings = name, settings
    runner.progress(f"== profile {profile.describe()}")
    with ProxyProcess(upstream_port=service.port, profile=profile) as proxy:
        runner.proxy = proxy
        proxy.set_index([video.content_hash for video in videos])
        contenders: list[Contender] = []
        for cname in plan.contenders:
            cls = CONTENDERS[cname]
            why = cls.missing()
            if why is not None:
                skipped.append({"contender": cname, "profile": name, "reason": why})
                runner.progress(f"skipping {cname}: {why}")
                continue
            contenders.append(cls(base_url=proxy.url, work_dir=work / name, videos=videos))
        (work / name).mkdir(parents=True, exist_ok=True)
        try:
            for workload in workloads:
                # Run 0 is a warm-up, not recorded (not in --quick): on this VM the first round
                # of a workload ran slow for every FUSE contender, whose page cache and heap
                # landed on guest memory the hypervisor had taken back (free page reporting).
                for run in range(0 if plan.quick else -1, plan.runs):
                    runner.run_index = run
                    for contender in list(contenders):
                        if not contender.supports(workload):
                            continue
                        runner.progress(f"{name} · {workload} · {contender.name} · " + (
                            "warm-up" if run < 0 else f"run {run + 1}/{plan.runs}"))
                        runner.contender = contender
                        try:
                            WORKLOADS[workload](contender, runner)
                        except ContenderUnavailable as exc:
                            contender.close()
                            contenders.remove(contender)
                            skipped.append({"contender": contender.name, "profile": name,
                                            "reason": str(exc)})
                            runner.progress(f"dropping {contender.name}: {exc}")
        finally:
            for contender in contenders:
                contender.close()
            runner.proxy = None


def _exit_on_signals() -> None:
    """SIGTERM and SIGHUP (`kill`, `timeout`, a closed terminal) end the run as Ctrl-C does,
    through the cleanup in `main` and `run_profile` (mounts unmounted, servers and proxies
    stopped), instead of killing the harness and leaving those behind."""
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                     formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny files, one run without a warm-up, loopback only, fewer "
                             "reads (one seek, 8 random reads, 2 concurrent readers, the "
                             "seeking one 2 segments of 256 KiB); the service throughput in "
                             "one run per reading, without the variants (the smoke test)")
    parser.add_argument("--runs", type=positive_runs, metavar="N",
                        help="measured runs per figure, after a warm-up round that is not "
                             "recorded (default 3; --quick: 1, no warm-up)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), metavar="DIR",
                        help="where JSON, PNG and the media cache go (default bench-results)")
    parser.add_argument("--contenders", nargs="+", choices=sorted(CONTENDERS), metavar="NAME",
                        help="only these contenders (default all: "
                             f"{' '.join(CONTENDERS)})")
    parser.add_argument("--profiles", nargs="+", choices=("loopback", "wan"), metavar="P",
                        help="only these network profiles (default both: loopback wan; "
                             "--quick: loopback only)")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), metavar="W",
                        help=f"only these workloads (default all: {' '.join(WORKLOADS)}; "
                             "concurrent runs on loopback only)")
    parser.add_argument("--no-service-speed", action="store_true",
                        help="skip the service-vs-nginx GET throughput step")
    parser.add_argument("--name", metavar="STEM",
                        help="file name stem of the JSON and PNG (default bench, or "
                             "bench-quick with --quick)")
    parser.add_argument("--vcfs-options", default="", metavar="'OPTS'",
                        help="experiment: extra `vcfs mount` options, e.g. '--block-size 256K' "
                             "(a --cache-size there is the RSS target's cache budget)")
    parser.add_argument("--service-variant", default="", metavar="'ARGS'",
                        help="experiment: run the service as `python -m "
                             "bench.service_variants ARGS` (--server, --chunk-size) instead "
                             "of `vidcache serve`; the service throughput rows and target "
                             "are then the variant's, under a label made of ARGS")
    args = parser.parse_args(argv)
    plan = make_plan(quick=args.quick, runs=args.runs, contenders=args.contenders,
                     profiles=args.profiles, workloads=args.workloads)
    if not plan.profiles:
        parser.error("nothing to measure: --quick measures the loopback profile only, "
                     "concurrent runs on loopback only, curl runs sequential only and "
                     "ffmpeg-url ffprobe and seek only")
    try:
        cache_budget = vcfs_cache_budget(args.vcfs_options.split())
    except SystemExit:  # vcfs's parser has said what it cannot parse
        parser.error(f"--vcfs-options {args.vcfs_options!r}: not options of `vcfs mount`")
    try:
        service_label = (service_variants.describe(args.service_variant.split())
                         if args.service_variant else report.SERVICE_LABEL)
    except SystemExit:  # the variants' parser has said what it cannot parse
        parser.error(f"--service-variant {args.service_variant!r}: not options of "
                     "bench.service_variants (--server, --chunk-size)")
    _exit_on_signals()
    with guarding():  # a SIGKILLed harness leaves nothing running or mounted either
        return _run(args, plan, cache_budget=cache_budget, service_label=service_label)


def vcfs_cache_budget(options: list[str]) -> int:
    """The cache size the vcfs mounts get with `options`: the RSS target's budget. Parsed by
    vcfs's own parser, so every spelling it accepts counts (SystemExit if it refuses them)."""
    return int(vcfs_parser().parse_args(["mount", "http://127.0.0.1", "/", *options])
               .cache_size)


def _run(args: argparse.Namespace, plan: Plan, *, cache_budget: int, service_label: str) -> int:
    progress = Progress()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="vcfs-bench-"))
    work.chmod(0o755)  # nginx's workers (user nobody) read the service's blobs in here
    progress(f"work directory {work}; load average {load_before[0]:.2f}")
    skipped: list[dict[str, str]] = []
    speed: list[dict[str, Any]] = []
    Vcfs.options = tuple(args.vcfs_options.split())
    variant = args.service_variant.split() or None
    service = Service(work / "store", work / "vidcache.log", variant=variant,
                      label=f"service variant {service_label}" if variant else
                      "vidcache serve (uvicorn)")
    runner: Runner | None = None
    try:
        media_dir = out / "media" / ("quick" if plan.quick else "full")
        media_dir.mkdir(parents=True, exist_ok=True)
        with origin(media_dir) as origin_url:
            service.start()
            progress(f"vidcache on {service.url}")
            corpus = prepare_corpus(out, quick=plan.quick, service=service,
                                    origin_url=origin_url, progress=progress)
        videos = [corpus.sequential, corpus.probe_faststart, corpus.probe_moov_end,
                  *corpus.readers]
        runner = Runner(corpus=corpus, progress=progress, service_pid=service.pid)
        for name in plan.profiles:
            run_profile(runner, plan, name, service=service, work=work, videos=videos,
                        skipped=skipped)
        if not args.no_service_speed and not Nginx.available():
            skipped.append({"contender": "nginx", "profile": "service GET throughput",
                            "reason": "nginx is not installed"})
        elif not args.no_service_speed:
            variants = service_speed.VARIANTS if not plan.quick else {}
            speed = service_speed.measure(service, corpus.sequential, work_dir=work,
                                          runs=plan.service_runs, progress=progress,
                                          variants=variants, service_label=service_label)
    except BaseException as exc:
        service.stop()
        ended = "stopped" if isinstance(exc, (SystemExit, KeyboardInterrupt)) else "failed"
        progress(f"{ended}; logs kept in {work}")
        raise
    service.stop()
    _remove_work_dir(work, progress)
    samples = runner.samples if runner is not None else []
    rows = report.summarize(samples)
    result = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - progress.started, 1),
        "quick": plan.quick, "runs": plan.runs, "concurrent_readers": len(corpus.readers),
        "vcfs_options": args.vcfs_options, "service_variant": args.service_variant,
        "load_before": " ".join(f"{x:.2f}" for x in load_before),
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "machine": report.machine_info(_package_versions()),
        "profiles": {name: value[0].describe() for name, value in plan.profiles.items()},
        "results": rows,
        "service_speed": speed,
        "targets": report.evaluate_targets(rows, speed, cache_budget=cache_budget,
                                           service_label=service_label,
                                           readers=len(corpus.readers)),
        "skipped": skipped,
        "samples": [dataclasses.asdict(s) for s in samples],
    }
    stem = args.name or ("bench-quick" if plan.quick else "bench")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    report.chart(result, out / f"{stem}.png")
    sys.stdout.write(report.markdown(result))
    progress(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("vcfs", "uvicorn", "starlette", "fastapi", "httpx", "mfusepy", "granian"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _remove_work_dir(work: Path, progress: Progress) -> None:
    mounted = [p for p in work.glob("*/mnt-*") if os.path.ismount(p)]
    if mounted:
        progress(f"left {work} in place: still mounted: {mounted}")
        return
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: main has cleaned up and said where the logs are
        sys.exit(128 + signal.SIGINT)
