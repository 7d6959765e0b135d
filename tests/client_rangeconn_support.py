"""The benchmark's loopback proxy with switchable faults (`bench.faults`), in front of a real
service, exposing what the range-reading tests check: connections and the Range of each
request."""

from __future__ import annotations

from bench.faults import FaultInjector
from bench.proxy import ProxyConfig, ProxyThread

KIB = 1024


class Link:
    def __init__(self, upstream_port: int) -> None:
        self.faults = FaultInjector()
        # Small chunks: stalls and bandwidth caps act close to where they are asked.
        self._proxy = ProxyThread(ProxyConfig(upstream_port=upstream_port, chunk_size=16 * KIB),
                                  hooks=self.faults)

    @property
    def url(self) -> str:
        return self._proxy.url

    def connections(self) -> int:
        return int(self._proxy.counters()["connections"])

    def ranges(self) -> list[str]:
        """The Range header of every request since the last reset, in order."""
        return [str(entry.get("range")) for entry in self._proxy.counters()["request_log"]]

    def reset(self) -> None:
        """No faults, counters at zero."""
        self.faults.clear()
        self._proxy.reset_counters()

    def __enter__(self) -> Link:
        self._proxy.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.faults.clear()
        self._proxy.stop()
