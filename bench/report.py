"""Turning samples into the results: summaries, the issue's targets, Markdown, JSON and a chart.

Units are decimal: MB = 10^6 bytes, GB/s = 10^9 bytes/s. A figure's value is its median over
the runs, shown with the min-max range; server-side figures (requests, bytes the server sent)
are medians too, and the daemon's peak RSS is the largest VmHWM seen.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20
# Rows of bench.service_speed that the service target compares (a variant's label replaces
# the first under `scripts/bench --service-variant`).
SERVICE_LABEL = "vidcache serve (uvicorn, as shipped)"
NGINX_LABEL = "nginx (sendfile)"


@dataclass(frozen=True)
class Figure:
    title: str
    unit: str
    higher_is_better: bool


FIGURES: dict[str, Figure] = {
    "seq_cold": Figure("sequential read, cold", "MB/s", True),
    "seq_warm": Figure("sequential read, warm (2nd read after close)", "MB/s", True),
    "ffprobe_faststart": Figure("ffprobe, moov first (faststart)", "s", False),
    "ffprobe_moov_end": Figure("ffprobe, moov at the end", "s", False),
    "seek": Figure("seek to frame (ffmpeg -ss T -frames:v 1), cold", "s", False),
    "random_128k": Figure("random 128 KiB reads, cold", "ms/read", False),
    "concurrent": Figure("{readers} concurrent readers, aggregate", "MB/s", True),
}


def title(figure: str, readers: int) -> str:
    """A figure's title; the concurrent one says how many readers ran (`--quick`: 2)."""
    return FIGURES[figure].title.format(readers=readers)


@dataclass
class Sample:
    profile: str
    figure: str
    contender: str
    run: int
    seconds: float
    bytes_read: int
    errors: int
    notes: list[str] = field(default_factory=list)
    requests: int | None = None
    connections: int | None = None
    bytes_down: int | None = None
    rss_kib: int | None = None
    daemon_stats: dict[str, Any] | None = None
    request_log: list[dict[str, Any]] = field(default_factory=list)  # first requests only
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # daemon, service, proxy
    per_op: int = 1  # operations the seconds cover (ms/read divides by it)

    def value(self) -> float:
        unit = FIGURES[self.figure].unit
        if unit == "MB/s":
            return self.bytes_read / self.seconds / 1e6 if self.seconds > 0 else 0.0
        if unit == "ms/read":
            return 1000 * self.seconds / self.per_op
        return self.seconds


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.profile, sample.figure, sample.contender), []).append(sample)
    rows = []
    for (profile, figure, contender), group in groups.items():
        values = [s.value() for s in group]
        requests = [float(s.requests) for s in group if s.requests is not None]
        down = [float(s.bytes_down) for s in group if s.bytes_down is not None]
        rss = [s.rss_kib for s in group if s.rss_kib is not None]
        rows.append({
            "profile": profile, "figure": figure, "contender": contender,
            "unit": FIGURES[figure].unit, "runs": len(group),
            "median": statistics.median(values), "min": min(values), "max": max(values),
            "requests": _median(requests), "server_mb": _median([d / 1e6 for d in down]),
            "peak_rss_mb": max(rss) * 1024 / 1e6 if rss else None,
            "daemon_cpu_s": _median([s.cpu_seconds.get("daemon", 0.0) for s in group]),
            "service_cpu_s": _median([s.cpu_seconds.get("service", 0.0) for s in group]),
            "proxy_cpu_s": _median([s.cpu_seconds.get("proxy", 0.0) for s in group]),
            "errors": sum(s.errors for s in group),
            "notes": sorted({note for s in group for note in s.notes})[:5],
        })
    return rows


class _Lookup:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self._rows = {(r["profile"], r["figure"], r["contender"]): r for r in rows}

    def get(self, profile: str, figure: str, contender: str, key: str = "median"
            ) -> float | None:
        row = self._rows.get((profile, figure, contender))
        if row is None or row["errors"]:
            return None
        value = row[key]
        return None if value is None else float(value)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{text} {unit}".strip()


def evaluate_targets(rows: list[dict[str, Any]], service: list[dict[str, Any]], *,
                     cache_budget: int, readers: int,
                     service_label: str = SERVICE_LABEL) -> list[dict[str, Any]]:
    """The issue's targets against this run: each with measured figures and holds (None =
    not measured in this run). `service_label`: the service-speed rows of the run's service,
    a variant's under `--service-variant` (the service target, named so, is then its)."""
    at = _Lookup(rows)
    targets: list[dict[str, Any]] = []

    def add(name: str, holds: bool | None, measured: str) -> None:
        targets.append({"target": name, "holds": holds, "measured": measured})

    def ratio_target(name: str, value: float | None, other: float | None, factor: float,
                     unit: str, *, at_least: bool) -> None:
        if value is None or other is None:
            add(name, None, f"{_fmt(value, unit)} vs {_fmt(other, unit)}")
            return
        holds = value >= factor * other if at_least else value <= factor * other
        add(name, holds, f"{_fmt(value, unit)} vs {_fmt(other, unit)} "
                         f"(ratio {value / other:.2f})" if other else _fmt(value, unit))

    lo, wan = "loopback", "wan"
    vcfs_seq = at.get(lo, "seq_cold", "vcfs")
    ratio_target("sequential cold: vcfs >= 1.5x rclone mount", vcfs_seq,
                 at.get(lo, "seq_cold", "rclone"), 1.5, "MB/s", at_least=True)
    ratio_target("sequential cold: vcfs >= 0.8x curl", vcfs_seq,
                 at.get(lo, "seq_cold", "curl"), 0.8, "MB/s", at_least=True)
    warm = at.get(lo, "seq_warm", "vcfs")
    rclone_warm_mb = at.get(lo, "seq_warm", "rclone", "server_mb")
    add("sequential warm: vcfs >= 5 GB/s (memory speed)",
        None if warm is None else warm >= 5000,
        f"{_fmt(warm, 'MB/s')}; rclone's warm read fetched {_fmt(rclone_warm_mb, 'MB')} "
        "from the server again")
    for figure, label in (("ffprobe_faststart", "ffprobe (faststart)"),
                          ("ffprobe_moov_end", "ffprobe (moov at end)"),
                          ("seek", "seek-to-frame")):
        mine = at.get(wan, figure, "vcfs")
        ratio_target(f"WAN {label}: vcfs <= ffmpeg reading the URL", mine,
                     at.get(wan, figure, "ffmpeg-url"), 1.0, "s", at_least=False)
        ratio_target(f"WAN {label}: vcfs <= 0.7x rclone", mine,
                     at.get(wan, figure, "rclone"), 0.7, "s", at_least=False)
    for figure, label, limit in (("ffprobe_faststart", "ffprobe (faststart)", 2.0),
                                 ("ffprobe_moov_end", "ffprobe (moov at end)", 2.0),
                                 ("seek", "seek", 4.0)):
        fetched = at.get(wan, figure, "vcfs", "server_mb")
        add(f"WAN bytes per {label}: vcfs <= {limit:g} MB",
            None if fetched is None else fetched <= limit, _fmt(fetched, "MB"))
    for figure, label in (("ffprobe_faststart", "faststart"), ("ffprobe_moov_end", "moov end")):
        mine_req = at.get(wan, figure, "vcfs", "requests")
        direct_req = at.get(wan, figure, "ffmpeg-url", "requests")
        add(f"WAN requests per ffprobe ({label}): vcfs <= ffmpeg direct + 2",
            None if mine_req is None or direct_req is None else mine_req <= direct_req + 2,
            f"{_fmt(mine_req)} vs {_fmt(direct_req)}")
    ratio_target(f"{readers} concurrent readers: aggregate >= 0.8x single-stream sequential "
                 "(vcfs)",
                 at.get(lo, "concurrent", "vcfs"), vcfs_seq, 0.8, "MB/s", at_least=True)
    errors = [r["errors"] for r in rows if r["figure"] == "concurrent"
              and r["contender"] == "vcfs"]
    add(f"{readers} concurrent readers: zero errors (vcfs)",
        None if not errors else sum(errors) == 0, f"{sum(errors)} errors" if errors else "n/a")
    rss = [r["peak_rss_mb"] for r in rows if r["contender"] == "vcfs" and r["peak_rss_mb"]]
    limit_mb = cache_budget / 1e6 + 80
    add(f"daemon peak RSS <= cache budget + 80 MB (= {limit_mb:.0f} MB)",
        None if not rss else max(rss) <= limit_mb, _fmt(max(rss) if rss else None, "MB"))
    full = {(r["server"], r["mode"]): r["median"] for r in service}
    ours = full.get((service_label, "full GET"))
    nginx = full.get((NGINX_LABEL, "full GET"))
    name = "service GET /video/{hash} >= 0.8x nginx"
    if service_label != SERVICE_LABEL:
        name += f" ({service_label}: the variant measured, not vidcache serve)"
    ratio_target(name, ours, nginx, 0.8, "MB/s", at_least=True)
    return targets


def machine_info(extra_versions: dict[str, str]) -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        if shutil.which(argv[0]) is None:
            return "not installed"
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        text = (result.stdout or result.stderr).strip()
        return text.splitlines()[0] if text else "?"

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                   .splitlines() if line.startswith("MemTotal:"))
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "versions": {
            "ffmpeg": first_line(["ffmpeg", "-version"]),
            "curl": first_line(["curl", "--version"]),
            "rclone": first_line(["rclone", "version"]),
            "httpfs2": first_line(["dpkg-query", "-W", "-f", "${Version}", "httpfs2"]),
            "nginx": first_line(["nginx", "-v"]),
            "fuse3": first_line(["fusermount3", "--version"]),
            **extra_versions,
        },
    }


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    machine = report["machine"]
    lines.append(f"Machine: {machine['nproc']} cores ({machine['cpu']}), "
                 f"{machine['ram_gib']} GiB RAM, kernel {machine['kernel']}; load average "
                 f"{report['load_before']} before, {report['load_after']} after; "
                 f"{report['runs']} runs per figure{' (quick)' if report['quick'] else ''}.")
    if report.get("vcfs_options") or report.get("service_variant"):
        variant = report["service_variant"]
        lines.append(f"Experiment: vcfs mount options `{report['vcfs_options']}`, service "
                     f"variant `{variant or 'none'}`" + (
                         " in place of `vidcache serve`: every figure reads from it, and the "
                         "service throughput rows and target measure it, under its label."
                         if variant else "."))
    for profile, description in report["profiles"].items():
        lines += ["", f"### {description}", "",
                  "| figure | contender | median | min-max | requests | server MB "
                  "| daemon peak RSS MB | CPU s daemon/service/proxy | errors |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for figure in FIGURES:
            for row in report["results"]:
                if row["profile"] != profile or row["figure"] != figure:
                    continue
                lines.append(
                    f"| {title(figure, report['concurrent_readers'])} | {row['contender']} "
                    f"| {_fmt(row['median'], row['unit'])} "
                    f"| {_fmt(row['min'])}-{_fmt(row['max'])} | {_fmt(row['requests'])} "
                    f"| {_fmt(row['server_mb'])} | {_fmt(row['peak_rss_mb'])} "
                    f"| {_cpu(row)} | {row['errors']} |")
    if report["service_speed"]:
        lines += ["", "### Service GET throughput (loopback, curl to /dev/null, no proxy)", "",
                  service_table(report["service_speed"])]
    lines += ["", "### Targets", "", "| target | measured | holds |", "|---|---|---|"]
    verdict = {True: "yes", False: "**no**", None: "not measured"}
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {target['measured']} "
                     f"| {verdict[target['holds']]} |")
    if report["skipped"]:
        lines += ["", "Skipped:"]
        lines += [f"- {name} ({profile}): {why.splitlines()[0]}"
                  for (name, profile), why in _skips(report)]
    return "\n".join(lines) + "\n"


def service_table(rows: list[dict[str, Any]]) -> str:
    """The service throughput readings, with the server's CPU time per GB and per 1000
    requests (what a range size costs beyond the bytes)."""
    lines = ["| server | read | median MB/s | min-max | server CPU s/GB "
             "| server CPU s per 1000 requests |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {row['server']} | {row['mode']} | {row['median']:.0f} "
              f"| {row['min']:.0f}-{row['max']:.0f} | {row['server_cpu_s_per_gb']:.2f} "
              f"| {row['server_cpu_s_per_1000_requests']:.2f} |" for row in rows]
    return "\n".join(lines)


def _cpu(row: dict[str, Any]) -> str:
    return "/".join(f"{row[key] or 0:.2f}" for key in ("daemon_cpu_s", "service_cpu_s",
                                                      "proxy_cpu_s"))


def _skips(report: dict[str, Any]) -> list[tuple[tuple[str, str], str]]:
    return [((item["contender"], item["profile"]), item["reason"])
            for item in report["skipped"]]


def chart(report: dict[str, Any], path: Path) -> None:
    """One bar chart per (profile, figure): median per contender, min-max as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(profile, figure) for profile in report["profiles"] for figure in FIGURES
              if any(r["profile"] == profile and r["figure"] == figure
                     for r in report["results"])]
    columns = 4
    rows_n = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 3.2 * rows_n),
                             squeeze=False)
    colour: Callable[[int], Any] = plt.get_cmap("tab10")
    contenders = sorted({r["contender"] for r in report["results"]})
    for ax, (profile, figure) in zip(axes.flat, panels, strict=False):
        rows = [r for r in report["results"] if r["profile"] == profile
                and r["figure"] == figure]
        rows.sort(key=lambda r: contenders.index(r["contender"]))
        medians = [r["median"] for r in rows]
        low = [r["median"] - r["min"] for r in rows]
        high = [r["max"] - r["median"] for r in rows]
        ax.bar([r["contender"] for r in rows], medians, yerr=[low, high], capsize=3,
               color=[colour(contenders.index(r["contender"])) for r in rows])
        better = "higher" if FIGURES[figure].higher_is_better else "lower"
        ax.set_title(f"{profile}: {title(figure, report['concurrent_readers'])}\n"
                     f"({better} is better)", fontsize=8)
        ax.set_ylabel(FIGURES[figure].unit, fontsize=8)
        ax.tick_params(labelsize=7)
        if medians and min(medians) > 0 and max(medians) / min(medians) > 50:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
