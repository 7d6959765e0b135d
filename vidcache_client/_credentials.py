"""A URL's `user:password@`: sent as HTTP Basic credentials (`basic_authorization`, by the
client to its base URL and by the service to an origin), and left out wherever the URL is
shown (`without_credentials`). The service shows the URLs it is given so too, in its answers,
its log and `GET /ingests`, where a client finds its own ingest by its URL cut alike.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qsl, urlencode

import httpx

# Up to the authority's last '@', where httpx (which parses the URL for the download) ends
# the user info: whatever it would send as credentials is cut, even after an empty scheme
# ('://u:p@host', which httpx reads so). Also where a browser would read credentials in a URL
# that is refused, its refusal showing it: after leading spaces, or backslashes for slashes.
_USER_INFO = re.compile(r"^([\x00-\x20]*(?:(?:[A-Za-z][A-Za-z0-9+.-]*)?:)?[/\\]{2})[^/?#]*@")


def without_credentials(url: str) -> str:
    """`url` without its `user:password@`, as an ingest's URL is shown; otherwise unchanged,
    so a client can find its own ingest by the URL it sent."""
    return _USER_INFO.sub(r"\1", url, count=1)


def target_without_credentials(target: str) -> str:
    """A request's URL or target (`/resolve?url=...`) without its own credentials nor those
    of the URLs in its query; unchanged if it had none."""
    shown = without_credentials(target)
    base, mark, query = shown.partition("?")
    fields = parse_qsl(query, keep_blank_values=True)
    cut = [(name, without_credentials(value)) for name, value in fields]
    return f"{base}?{urlencode(cut)}" if mark and cut != fields else shown


def basic_authorization(url: httpx.URL) -> str:
    """The `Authorization` header value for `url`'s user info (percent-decoded, as httpx
    sends it)."""
    credentials = f"{url.username}:{url.password}".encode()
    return f"Basic {base64.b64encode(credentials).decode('ascii')}"
