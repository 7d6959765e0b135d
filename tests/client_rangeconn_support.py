"""For the range-reading tests: the big video stored and checked, and a tiny socket server for
what the service never does. Their faulty link in front of the service (connections and the
Range of each request) is `vcfs_fault_support.FaultyLink`."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3

from vidcache_client import VidCacheClient


@dataclass(frozen=True)
class StoredVideo:
    hash: str
    data: bytes


def ingest_big(server_url: str, videos: dict[str, Path], media_url: str,
               bucket_prefix: str) -> StoredVideo:
    """big.mp4 ingested into its own bucket, its hash checked against its bytes."""
    data = videos["big.mp4"].read_bytes()
    with VidCacheClient(server_url, timeout=120) as client:
        content_hash = client.ingest(f"{media_url}/big.mp4",
                                     f"{bucket_prefix}-{uuid.uuid4().hex[:8]}")["hash"]
    assert content_hash == blake3(data).hexdigest()
    return StoredVideo(content_hash, data)


class SocketServer:
    """A one-thread-per-connection TCP server on 127.0.0.1 running `handle(connection)`;
    counts connections."""

    def __init__(self, handle: Callable[[socket.socket], None],
                 tls: ssl.SSLContext | None = None) -> None:
        self._handle = handle
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> SocketServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(10)
        with contextlib.suppress(OSError), contextlib.closing(connection):
            if self._tls is not None:
                connection = self._tls.wrap_socket(connection, server_side=True)
            self._handle(connection)
