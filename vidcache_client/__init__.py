"""Python client of the vidcache REST API (a content-addressed video cache).

    from vidcache_client import VidCacheClient

    with VidCacheClient("http://127.0.0.1:8020") as client:
        video_hash = client.ingest("https://example.com/a.mp4", bucket="videos")["hash"]
        header = client.get_bytes(video_hash, byte_range=(0, 65_535))

See docs/client.md for the full API and the exception hierarchy.
"""

from vidcache_client._client import IngestUnderWay, VidCacheClient, VideoPage
from vidcache_client._exceptions import (
    AuthError,
    InvalidRequestError,
    NotFoundError,
    ProtocolError,
    RangeError,
    RangeNotSatisfiableError,
    RequestTimeout,
    ServerError,
    StatusError,
    TransportError,
    VidCacheError,
)
from vidcache_client._validate import ByteRange

__all__ = [
    "AuthError",
    "ByteRange",
    "IngestUnderWay",
    "InvalidRequestError",
    "NotFoundError",
    "ProtocolError",
    "RangeError",
    "RangeNotSatisfiableError",
    "RequestTimeout",
    "ServerError",
    "StatusError",
    "TransportError",
    "VidCacheClient",
    "VidCacheError",
    "VideoPage",
]
