"""Service settings (built by the CLI, passed to `create_app`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vidcache.chunks import DEFAULT_CHUNK_SIZE, check_chunk_size

GIB = 1024**3
# ffprobe alone needs 56 MiB; under a smaller cap it fails without saying why
MIN_MEDIA_MEMORY = 128 * 1024**2
DEFAULT_PORT = 8020


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    data_dir: Path
    # loopback unless asked otherwise: without a token the API has no authentication
    host: str = "127.0.0.1"
    # the vidcache 1.x protocol's default port
    port: int = DEFAULT_PORT
    # larger than any video we expect to cache, small enough to protect the disk
    max_size: int = 4 * GIB
    # seconds without progress (connecting, or between two reads) before a download is dropped
    download_timeout: float = 30.0
    # seconds a whole download may take: 4 GiB at ~10 Mb/s; a trickling origin must not hold
    # an ingest slot forever
    max_download_time: float = 3600.0
    # of 64 bits: re-encodes of one video measure 0-2, different videos around 30
    phash_threshold: int = 10
    # digests recorded per chunk of this size at ingest (chunks.py says why this default)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # file:// URLs are refused unless the file lies in one of these directories
    allow_file_dirs: tuple[Path, ...] = ()
    # hosts / IPs / CIDRs ingest may fetch from although they are loopback or private addresses
    ingest_allow: tuple[str, ...] = ()
    log_level: str = "info"
    # seconds an idle client connection stays open: a player paused for a minute seeks without
    # a new TCP handshake (nginx's default; uvicorn's own, 5 s, closes them between seeks)
    keep_alive: int = 75
    # wall-clock cap on one ffprobe/ffmpeg run; a hung decoder must not hold an ingest forever
    media_timeout: float = 300.0
    # bytes one ffprobe/ffmpeg run may take (RLIMIT_DATA; None: no cap): sampling the frames of
    # a 4K AV1 or 10-bit HEVC video needs 2 GiB, 8 such runs fit in 24 GiB (docs/service.md)
    media_memory: int | None = 3 * GIB
    # downloads + decodes running at once; the rest queue, keeping threads free for reads
    max_concurrent_ingests: int = 8
    # no request needs more (ingest: URL <= 8 KiB, meta <= 64 KiB); bounds buffering and parsing
    max_body_bytes: int = 128 * 1024
    # meta is a label stored with the video, not a payload
    max_meta_bytes: int = 64 * 1024
    # deeper than any sensible label; refused before a deep value can strain a JSON encoder
    max_meta_depth: int = 32
    # bearer token required for ingest and delete (None: no authentication); kept out of repr
    token: str | None = field(default=None, repr=False)
    # require the token for reads too (all but /health and the API description)
    token_reads: bool = False

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
