"""The service's own `GET /video/{hash}` throughput, next to nginx serving the same blob file.

Everything here is direct on loopback (no proxy) and read with curl into /dev/null. Servers:
the running `vidcache serve`, nginx (sendfile) over the service's data directory, and the
same vidcache app under the levers `bench.service_variants` offers (Starlette's 64 KiB chunk,
as before the service's fix; granian), each started in turn over the same
data directory once the running service is stopped (the service locks its data directory),
so this step runs last. Reads: the whole file in one GET, and the file as consecutive 1, 4 and
16 MiB Range requests on one keep-alive connection (what vcfs's block fetches and readahead
send). The loopback latency proxy in front of nginx shows the proxy's own ceiling. Each
reading also gives the server's CPU seconds per GB sent and per 1000 requests (its process and
children, from /proc), the cost that competes with the FUSE daemon and the proxy for the same
two cores in the contender runs; per request it is what each of vcfs's on-demand block
fetches costs beyond the bytes.

Run on its own (the running service, nginx and the proxy only; no variants unless asked):

    .venv/bin/python -m bench.service_speed [--runs 2] [--variants] [--out bench-results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import media, report
from bench.proxy import LOOPBACK
from bench.proxy_process import ProxyProcess
from bench.report import NGINX_LABEL, SERVICE_LABEL
from bench.service_variants import describe
from bench.stack import Nginx, Service, Video, ingest, origin
from vidcache_client._validate import is_decimal

MODES: dict[str, int | None] = {"full GET": None, "16 MiB ranges": 16 << 20,
                                "4 MiB ranges": 4 << 20, "1 MiB ranges": 1 << 20}
# Servers beyond the running service: label -> bench.service_variants arguments. granian's
# `pathsend` goes unused here: the service's fast path answers every read this step makes.
VARIANTS: dict[str, list[str]] = {describe(levers): levers for levers in (
    # Starlette's default chunk (the service sent 64 KiB chunks before commit 11a1aa6)
    ["--server", "uvicorn", "--chunk-size", str(64 << 10)],
    ["--server", "granian"],
)}
PROXY_LABEL = "nginx via loopback proxy"


@dataclass
class Reading:
    server: str
    mode: str
    mb_per_s: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0  # of the server's processes, over all runs
    bytes_total: int = 0
    requests: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"server": self.server, "mode": self.mode, "runs_mb_per_s": self.mb_per_s,
                "median": statistics.median(self.mb_per_s), "min": min(self.mb_per_s),
                "max": max(self.mb_per_s),
                "server_cpu_s_per_gb": round(self.cpu_seconds / (self.bytes_total / 1e9), 3),
                "server_cpu_s_per_1000_requests":
                    round(self.cpu_seconds / self.requests * 1000, 3)}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants (nginx's worker, say)."""
    ticks = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
    return ticks / os.sysconf("SC_CLK_TCK")


def curl_mb_per_s(url: str, size: int, range_size: int | None) -> float:
    """MB/s (10^6) of reading `size` bytes of `url` with curl, whole or as Range requests."""
    common = ["-s", "-S", "-f", "-w", "%{size_download} %{time_total}\n", "-o", "/dev/null"]
    argv = ["curl", *common, url]
    if range_size is not None:  # `-:` starts the next transfer (same connection), options reset
        argv = ["curl"]
        for i, start in enumerate(range(0, size, range_size)):
            end = min(start + range_size, size) - 1
            argv += [*(["-:"] if i else []), *common, "-r", f"{start}-{end}", url]
    result = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300)
    pairs = [line.split() for line in result.stdout.splitlines()]
    got = sum(int(n) for n, _ in pairs)
    if got != size:
        raise RuntimeError(f"curl read {got} of {size} bytes from {url}")
    return size / sum(float(t) for _, t in pairs) / 1e6


def measure(service: Service, video: Video, *, work_dir: Path, runs: int,
            variants: dict[str, list[str]], progress: Callable[[str], None],
            service_label: str = SERVICE_LABEL) -> list[dict[str, Any]]:
    """Readings of every server and mode; stops `service` before starting `variants`.
    `service_label` names `service`'s rows: a variant's label when the run's service is one
    (`scripts/bench --service-variant`), which is then not measured again among `variants`."""
    readings: dict[tuple[str, str], Reading] = {}

    def read(label: str, url: str, pid: int) -> None:
        for mode, range_size in MODES.items():
            reading = readings.setdefault((label, mode), Reading(label, mode))
            for _ in range(runs):
                before = tree_cpu_seconds(pid)
                reading.mb_per_s.append(curl_mb_per_s(url, video.size, range_size))
                reading.cpu_seconds += tree_cpu_seconds(pid) - before
                reading.bytes_total += video.size
                reading.requests += -(-video.size // range_size) if range_size else 1
            progress(f"service speed: {label}, {mode}: "
                     f"{statistics.median(reading.mb_per_s):.0f} MB/s")

    video_path = f"/video/{video.content_hash}"
    with Nginx(service.data_dir, work_dir / "nginx") as nginx:
        blob_url = f"{nginx.url}/{video.file_path}"
        curl_mb_per_s(blob_url, video.size, None)  # the blob into the page cache
        for _ in range(2):  # alternate, so drift in machine load hits both alike
            read(service_label, service.url + video_path, service.pid)
            read(NGINX_LABEL, blob_url, nginx.pid)
        with ProxyProcess(upstream_port=nginx.port, profile=LOOPBACK) as proxy:
            read(PROXY_LABEL, f"{proxy.url}/{video.file_path}", proxy.pid)
    service.stop()
    for i, (label, variant) in enumerate(variants.items()):
        if label == service_label:
            continue
        log = work_dir / f"variant-{i}.log"
        try:
            with Service(service.data_dir, log, variant=variant, label=label) as other:
                read(label, other.url + video_path, other.pid)
        except (RuntimeError, TimeoutError) as exc:
            progress(f"service speed: {label} skipped: {exc}")
            print(f"{label}: {exc}", file=sys.stderr)
    return [reading.as_dict() for reading in readings.values()]


def positive_runs(text: str) -> int:
    """--runs, here and in bench.run: 0 recorded nothing (the harness ran its warm-up alone;
    this step made its media, then failed on the median of no readings)."""
    if not is_decimal(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=positive_runs, default=2, metavar="N",
                        help="runs per reading (default 2)")
    parser.add_argument("--variants", action="store_true",
                        help="also the service variants (granian, 64 KiB chunks)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory holding the media cache (default bench-results)")
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    spec = media.corpus(quick=False).sequential
    video_path = media.generate(spec, args.out.resolve() / "media" / "full")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vcfs-service-speed-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's worker (user nobody) reads the service's blobs in here
        with Service(work / "store", work / "vidcache.log") as service:
            with origin(video_path.parent) as origin_url:
                video = ingest(service, origin_url, video_path)
            rows = measure(service, video, work_dir=work, runs=args.runs, progress=progress,
                           variants=VARIANTS if args.variants else {})
    print(f"{video.size / 1e6:.0f} MB file, {args.runs} runs per reading; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    sys.stdout.write(report.service_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
