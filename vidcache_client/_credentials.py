"""A URL's credentials: its `user:password@`, sent as HTTP Basic credentials
(`basic_authorization`, by the client to its base URL and by the service to an origin), and
the secrets of a signed URL's query (`X-Amz-Signature=`, `sig=`, `token=`, ...), sent as they
are. Wherever the URL is shown (`without_credentials`) the first are left out and the second's
values are REDACTED, and so in a URL nested in its query (a redirector's `?url=https%3A...`,
the access log's `/resolve?url=`). The service shows the URLs it is given so too, in its
answers, its log and `GET /ingests`, where a client finds its own ingest by its URL shown alike.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from urllib.parse import unquote_plus

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

# How deep URLs in parameters' values are looked into: a redirector's or a proxy's
# `?url=` holding the signed URL, percent-encoded (one level, what real ones use), wrapped
# again by a link checker, and that in the access log's `/resolve?url=`.
_NESTING = 3
# A value taken for a URL (decoded): one with a scheme (or an empty one, as _USER_INFO) and a
# slash, or a path (`?next=/watch%3Ftoken%3D...`).
_URL_START = re.compile(r"[\x00-\x20]*(?:(?:[A-Za-z][A-Za-z0-9+.-]*)?:)?[/\\]")
_ASCII_ESCAPE = re.compile(r"%([0-7][0-9A-Fa-f])|\+")

REDACTED = "REDACTED"


def without_credentials(url: str) -> str:
    """`url` as it is shown: without its `user:password@`, the value of each secret parameter
    of its query REDACTED (the name kept), and so for the URLs nested in its query; otherwise
    unchanged, so a client can find its own ingest by the URL it sent, shown alike."""
    return with_secrets_replaced(url, lambda _value: REDACTED)


def has_secrets(url: str) -> bool:
    """Whether `url` holds a (non-empty) secret parameter's value, in its query or fragment or
    in a URL nested there: shown, it has REDACTED in its place."""
    return any(secret for _start, _end, secret in _credential_spans(url, _NESTING))


def with_secrets_replaced(url: str, replace: Callable[[str], str]) -> str:
    """`url` without its `user:password@`, the (non-empty) value of each secret parameter of
    its query and fragment replaced by `replace(value)`, and so for a URL in the value of a
    parameter (a redirector's `?url=https%3A...`), to _NESTING levels: there, a user info is
    left out and a secret's value replaced as it is written in `url` (percent-encoded)."""
    pieces: list[str] = []
    written = 0
    for start, end, secret in _credential_spans(url, _NESTING):
        pieces += url[written:start], replace(url[start:end]) if secret else ""
        written = end
    return "".join(pieces) + url[written:]


def _credential_spans(url: str, nesting: int) -> Iterator[tuple[int, int, bool]]:
    """Where `url`'s credentials are, in order: (start, end, is it a secret's value (else
    the user info))."""
    user_info = _USER_INFO.match(url)
    if user_info:
        yield user_info.end(1), user_info.end(), False
    query = re.search(r"[?#]", url)
    if query is None:
        return
    for parameter in _PARAMETER.finditer(url, query.start()):
        start, end = parameter.span(3)
        if start == end:
            continue
        if _is_secret(parameter[2]):
            yield start, end, True
        elif nesting:
            value, offsets = _decoded(parameter[3])
            if _URL_START.match(value):
                for inner_start, inner_end, secret in _credential_spans(value, nesting - 1):
                    yield start + offsets[inner_start], start + offsets[inner_end], secret


def _decoded(value: str) -> tuple[str, list[int]]:
    """`value` with its escapes of ASCII characters and its '+' decoded, as a server reads
    the parameter (other escapes are no delimiter of a URL: left as they are), and where each
    of its characters, and its end, is in `value`."""
    decoded: list[str] = []
    offsets: list[int] = []
    done = 0
    for escape in _ASCII_ESCAPE.finditer(value):
        decoded += value[done:escape.start()]
        offsets += range(done, escape.start())
        decoded.append(chr(int(escape[1], 16)) if escape[1] else " ")
        offsets.append(escape.start())
        done = escape.end()
    decoded += value[done:]
    offsets += range(done, len(value) + 1)
    return "".join(decoded), offsets


def _is_secret(name: str) -> bool:
    plain = re.sub(r"[-_.]", "", unquote_plus(name).lower())
    return plain in _SECRET_NAMES or plain.endswith(_SECRET_ENDINGS)


def basic_authorization(url: httpx.URL) -> str:
    """The `Authorization` header value for `url`'s user info (percent-decoded, as httpx
    sends it)."""
    credentials = f"{url.username}:{url.password}".encode()
    return f"Basic {base64.b64encode(credentials).decode('ascii')}"
