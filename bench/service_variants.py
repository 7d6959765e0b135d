"""The unchanged vidcache app under other server settings, to measure the service's levers.

`vidcache serve` runs `create_app(config)` under uvicorn; Starlette's `FileResponse` streams
the blob in `chunk_size` pieces, each one a hop to a worker thread (64 KiB by default; the
service sets 1 MiB since commit 11a1aa6). This runs the very same app over the same data
directory with one variable changed, so the benchmark can put figures on each lever:

    python -m bench.service_variants --data DIR --port P --server granian --chunk-size 65536

`--server granian` uses granian's embedded server, which offers the ASGI `pathsend` extension
(Starlette then hands whole-file responses to the server, which sends them from Rust); but
the service's fast path (vidcache/serving.py) answers whole-file and single-range GETs before
Starlette under either server, so only what it leaves to the route can use `pathsend`.
`--chunk-size` sets `FileResponse.chunk_size`, and with it the fast path's read size."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from starlette.responses import FileResponse

from vidcache import app as vidcache_app
from vidcache.config import ServiceConfig
from vidcache_client._arguments import parse_size, size_text


def lever_parser() -> argparse.ArgumentParser:
    """The levers alone: what `scripts/bench --service-variant` may pass (the harness gives
    --data and --port)."""
    parser = argparse.ArgumentParser(prog="bench.service_variants", add_help=False)
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn")
    parser.add_argument("--chunk-size", type=parse_size, default=0,
                        help="FileResponse chunk size (bytes, or 64K, 1M), the fast path's "
                             "read size too (default 0: unchanged, the service's 1 MiB; "
                             "Starlette's own default is 64 KiB)")
    return parser


def describe(levers: list[str]) -> str:
    """The label of the variant these lever arguments run, for the benchmark's rows:
    `vidcache, granian`, `vidcache, uvicorn, 64 KiB chunks` (SystemExit, argparse's message
    on stderr, for arguments that are not levers)."""
    args = lever_parser().parse_args(levers)
    if not args.chunk_size:
        return f"vidcache, {args.server}"
    size = size_text(args.chunk_size).replace(" bytes", "-byte")
    return f"vidcache, {args.server}, {size} chunks"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, parents=[lever_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.chunk_size:
        # Starlette's base class, and the service's subclass in case it sets its own.
        FileResponse.chunk_size = args.chunk_size
        video_response = getattr(vidcache_app, "VideoFileResponse", None)
        if isinstance(video_response, type) and issubclass(video_response, FileResponse):
            video_response.chunk_size = args.chunk_size
    config = ServiceConfig(data_dir=args.data.resolve(), port=args.port, log_level="warning",
                           ingest_allow=("127.0.0.1",))
    app = vidcache_app.create_app(config)
    if args.server == "uvicorn":
        import uvicorn

        uvicorn.run(app, host=config.host, port=config.port, log_level="warning",
                    log_config=None)
        return
    from granian.constants import Interfaces
    from granian.server.embed import Server

    server = Server(app, address=config.host, port=config.port, interface=Interfaces.ASGI,
                    log_access=False)
    asyncio.run(server.serve())


if __name__ == "__main__":
    main()
