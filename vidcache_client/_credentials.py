"""A URL's credentials: its `user:password@`, sent as HTTP Basic credentials
(`basic_authorization`, by the client to its base URL and by the service to an origin), and
the secrets of a signed URL's query (`X-Amz-Signature=`, `sig=`, `token=`, ...), sent as they
are. Wherever the URL is shown (`without_credentials`) the first are left out and the second's
values are REDACTED. The service shows the URLs it is given so too, in its answers, its log and
`GET /ingests`, where a client finds its own ingest by its URL shown alike.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from urllib.parse import parse_qsl, unquote_plus, urlencode

import httpx

# Up to the authority's last '@', where httpx (which parses the URL for the download) ends
# the user info: whatever it would send as credentials is cut, even after an empty scheme
# ('://u:p@host', which httpx reads so). Also where a browser would read credentials in a URL
# that is refused, its refusal showing it: after leading spaces, or backslashes for slashes.
_USER_INFO = re.compile(r"^([\x00-\x20]*(?:(?:[A-Za-z][A-Za-z0-9+.-]*)?:)?[/\\]{2})[^/?#]*@")

# A parameter of the query, or of the fragment (where OAuth puts an access_token): its name
# and its value, up to the next parameter or the fragment. ';' ends it too, as some servers
# read it, so the value after `a=1;token=` is not shown (no signature or token holds one).
_PARAMETER = re.compile(r"([?&;#])([^=&;#]*)=([^&;#]*)")
# Names of parameters whose value is a secret (compared in lowercase without '-', '_', '.'):
# a signed URL's signature or credential (S3, GCS, Azure SAS, CloudFront, nginx's
# secure_link, Akamai), an API key, a token, a password; the whole name, or how it ends.
_SECRET_NAMES = frozenset({"sig", "key", "auth", "pass", "passwd", "pwd", "hmac", "md5", "jwt",
                           "hdnts", "hdnea"})
_SECRET_ENDINGS = ("signature", "token", "tokenhash", "secret", "password", "credential",
                   "credentials", "apikey", "accesskey", "accesskeyid", "secretkey",
                   "privatekey")

REDACTED = "REDACTED"


def without_credentials(url: str) -> str:
    """`url` as it is shown: without its `user:password@`, the value of each secret parameter
    of its query REDACTED (the name kept); otherwise unchanged, so a client can find its own
    ingest by the URL it sent, shown alike."""
    return with_secrets_replaced(url, lambda _value: REDACTED)


def with_secrets_replaced(url: str, replace: Callable[[str], str]) -> str:
    """`url` without its `user:password@`, the (non-empty) value of each secret parameter of
    its query and fragment replaced by `replace(value)`."""
    url = _USER_INFO.sub(r"\1", url, count=1)
    query = re.search(r"[?#]", url)
    if query is None:
        return url

    def parameter(match: re.Match[str]) -> str:
        mark, name, value = match.groups()
        return f"{mark}{name}={replace(value)}" if value and _is_secret(name) else match[0]

    return url[:query.start()] + _PARAMETER.sub(parameter, url[query.start():])


def _is_secret(name: str) -> bool:
    plain = re.sub(r"[-_.]", "", unquote_plus(name).lower())
    return plain in _SECRET_NAMES or plain.endswith(_SECRET_ENDINGS)


def target_without_credentials(target: str) -> str:
    """A request's URL or target (`/resolve?url=...`) shown without its own credentials nor
    those of the URLs in its query; unchanged if it had none."""
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
