"""The latency proxy in its own process, driven over stdin/stdout JSON lines.

The harness runs each proxy as `python -m bench.proxy_process` so that relaying bytes gets its
own interpreter (and core) instead of sharing the harness's GIL. Protocol: the child prints
`{"port": N}` once listening, then answers each command line on stdin with one JSON line:
`{"cmd": "counters"}`, `{"cmd": "reset"}`, `{"cmd": "index", "names": [...]}` (serve the
rclone index at /video/). EOF on stdin stops it. Both shims of bench/shims.py are always on.
A profile with neither delay nor cap (loopback) runs `bench.splice_relay.SpliceRelay`, which
counts the same way at a fraction of the CPU; the others run the asyncio `LatencyProxy`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import IO, Any

from bench.guardian import guarded
from bench.proxy import HookChain, LatencyProxy, LinkProfile, ProxyConfig, new_event_loop
from bench.shims import CanonicalHeaderCase, IndexShim
from bench.splice_relay import SpliceRelay


class ProxyProcess:
    """Parent side: start a proxy child in front of `upstream_port` with `profile`."""

    def __init__(self, *, upstream_port: int, profile: LinkProfile) -> None:
        self.upstream_port = upstream_port
        self.profile = profile
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def start(self) -> ProxyProcess:
        self._process = guarded(subprocess.Popen(self._argv(), stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, text=True, bufsize=1))
        try:
            self.port = int(self._read()["port"])
        except BaseException:  # a signal while it starts too: the child must not outlive it
            self.stop()
            raise
        return self

    def _argv(self) -> list[str]:
        rate = self.profile.rate_bytes_per_s
        return [sys.executable, "-m", "bench.proxy_process", "--name", self.profile.name,
                "--upstream-port", str(self.upstream_port),
                "--delay-ms", str(self.profile.one_way_delay_s * 1000),
                "--rate-mbit", str(0 if rate is None else rate * 8 / 1e6)]

    def counters(self) -> dict[str, Any]:
        return self._command({"cmd": "counters"})

    def reset(self) -> None:
        self._command({"cmd": "reset"})

    def set_index(self, names: list[str]) -> None:
        self._command({"cmd": "index", "names": names})

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

    def _command(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"proxy process exited with {self._process.wait(timeout=10)}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def _serve(config: ProxyConfig, out: IO[str]) -> None:
    shim = IndexShim()
    proxy = LatencyProxy(config, hooks=HookChain(shim, CanonicalHeaderCase()))
    port = await proxy.start()
    _answer(out, {"port": port})
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    try:
        while line := await commands.readline():
            _answer(out, _execute(json.loads(line), proxy.counters.snapshot,
                                  proxy.reset_counters, shim))
    finally:
        await proxy.close()


def _relay(config: ProxyConfig, out: IO[str]) -> None:
    shim = IndexShim()
    relay = SpliceRelay(config, answer=shim.on_request,
                        rewrite_head=CanonicalHeaderCase().rewrite_head).start()
    _answer(out, {"port": relay.port})
    try:
        for line in sys.stdin:
            _answer(out, _execute(json.loads(line), relay.snapshot, relay.reset_counters, shim))
    finally:
        relay.close()


def _execute(command: dict[str, Any], snapshot: Callable[[], dict[str, Any]],
             reset: Callable[[], None], shim: IndexShim) -> dict[str, Any]:
    if command["cmd"] == "counters":
        return snapshot()
    if command["cmd"] == "reset":
        reset()
        return {"ok": True}
    if command["cmd"] == "index":
        shim.names = list(command["names"])
        return {"ok": True}
    return {"error": f"unknown command {command['cmd']!r}"}


def _answer(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="proxy")
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument("--rate-mbit", type=float, default=0.0, help="0 = uncapped")
    args = parser.parse_args(argv)
    profile = LinkProfile(name=args.name, one_way_delay_s=args.delay_ms / 1000,
                          rate_bytes_per_s=args.rate_mbit * 1e6 / 8 or None)
    config = ProxyConfig(upstream_port=args.upstream_port, listen_port=args.port,
                         profile=profile)
    if profile.shapes_traffic:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(config, sys.stdout))
    else:
        _relay(config, sys.stdout)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the harness reports it
        sys.exit(128 + signal.SIGINT)
