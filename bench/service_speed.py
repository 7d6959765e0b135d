"""The service's own `GET /video/{hash}` throughput, next to nginx serving the same blob file.

Everything here is direct on loopback (no proxy) and read with curl into /dev/null. Servers:
the running `vidcache serve`, nginx (sendfile) over the service's data directory, and the
same vidcache app under the levers `bench.service_variants` offers (granian with `pathsend`,
a larger FileResponse chunk), each started in turn over the same data directory once the
running service is stopped (the service locks its data directory), so this step runs last.
Reads: the whole file in one GET, and the file as consecutive 1 MiB and 16 MiB Range requests
on one keep-alive connection (what vcfs's block fetches and readahead send). The loopback latency
proxy in front of nginx shows the proxy's own ceiling.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.proxy import LOOPBACK
from bench.proxy_process import ProxyProcess
from bench.stack import Nginx, Service, Video

MODES: dict[str, int | None] = {"full GET": None, "16 MiB ranges": 16 << 20,
                                "1 MiB ranges": 1 << 20}
# Servers beyond the running service: label -> bench.service_variants arguments.
VARIANTS: dict[str, list[str]] = {
    "vidcache, uvicorn, 1 MiB chunks": ["--server", "uvicorn", "--chunk-size", str(1 << 20)],
    "vidcache, granian (pathsend)": ["--server", "granian"],
    "vidcache, granian, 1 MiB chunks": ["--server", "granian", "--chunk-size", str(1 << 20)],
}
SERVICE_LABEL = "vidcache serve (uvicorn, as shipped)"
NGINX_LABEL = "nginx (sendfile)"
PROXY_LABEL = "nginx via loopback proxy"


@dataclass(frozen=True)
class Reading:
    server: str
    mode: str
    mb_per_s: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"server": self.server, "mode": self.mode, "runs_mb_per_s": self.mb_per_s,
                "median": statistics.median(self.mb_per_s), "min": min(self.mb_per_s),
                "max": max(self.mb_per_s)}


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
            variants: dict[str, list[str]], progress: Callable[[str], None]
            ) -> list[dict[str, Any]]:
    """Readings of every server and mode; stops `service` before starting `variants`."""
    readings: dict[tuple[str, str], list[float]] = {}

    def read(label: str, url: str) -> None:
        for mode, range_size in MODES.items():
            for _ in range(runs):
                value = curl_mb_per_s(url, video.size, range_size)
                readings.setdefault((label, mode), []).append(value)
            progress(f"service speed: {label}, {mode}: "
                     f"{statistics.median(readings[label, mode]):.0f} MB/s")

    video_path = f"/video/{video.content_hash}"
    with Nginx(service.data_dir, work_dir / "nginx") as nginx:
        blob_url = f"{nginx.url}/{video.file_path}"
        curl_mb_per_s(blob_url, video.size, None)  # the blob into the page cache
        for _ in range(2):  # alternate, so drift in machine load hits both alike
            read(SERVICE_LABEL, service.url + video_path)
            read(NGINX_LABEL, blob_url)
        with ProxyProcess(upstream_port=nginx.port, profile=LOOPBACK) as proxy:
            read(PROXY_LABEL, f"{proxy.url}/{video.file_path}")
    service.stop()
    for label, variant in variants.items():
        log = work_dir / f"variant-{label.split(',')[1].strip().split()[0]}.log"
        try:
            with Service(service.data_dir, log, variant=variant, label=label) as other:
                read(label, other.url + video_path)
        except (RuntimeError, TimeoutError) as exc:
            progress(f"service speed: {label} skipped: {exc}")
            print(f"{label}: {exc}", file=sys.stderr)
    return [Reading(server, mode, values).as_dict()
            for (server, mode), values in readings.items()]
