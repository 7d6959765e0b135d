"""Two small compatibility shims, answered or applied by the benchmark's proxy, so that the
peers can read from the same vidcache service as everyone else.

- `IndexShim`: `rclone mount :http:` lists a directory by parsing the HTML page at its URL for
  links. vidcache serves `/video/{hash}` but no page listing them, so the proxy answers
  `GET /video/` (and HEAD) itself with `<a href="HASH">` links to the benchmark's videos. Every
  other request, including rclone's HEADs and ranged GETs of `/video/HASH`, goes on to the
  service. The listing is counted as a request like any other.
- `CanonicalHeaderCase`: httpfs2 0.1.4 looks for the exact text `Accept-Ranges: bytes` in a
  HEAD answer and refuses to mount otherwise ("server must Accept-Range: bytes"), but uvicorn
  sends header names in lower case, as HTTP allows (field names are case-insensitive, RFC 9110
  section 5.1). The proxy rewrites response header names to their usual capitalisation, which
  changes nothing for a conforming client.
"""

from __future__ import annotations

import html

from bench.proxy import Connection, Hooks, Request, ResponseHeadHook


class IndexShim(Hooks):
    """Answers GET/HEAD of exactly `prefix` with an HTML page linking `names` (relative)."""

    def __init__(self, *, prefix: str = "/video/", names: list[str] | None = None) -> None:
        self.prefix = prefix
        self.names = list(names or [])

    def on_request(self, conn: Connection, request: Request) -> bytes | None:
        del conn
        if request.path != self.prefix or request.method not in ("GET", "HEAD"):
            return None
        links = "".join(f'<a href="{html.escape(name)}">{html.escape(name)}</a>\n'
                        for name in self.names)
        body = f"<html><body><pre>\n{links}</pre></body></html>\n".encode()
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        return head if request.method == "HEAD" else head + body


class CanonicalHeaderCase(ResponseHeadHook):
    """Rewrites response header names to Title-Case (`accept-ranges` -> `Accept-Ranges`)."""

    def rewrite_head(self, conn: Connection, request: Request | None, head: bytes) -> bytes:
        del conn, request
        lines = head.split(b"\r\n")
        for i, line in enumerate(lines[1:], start=1):
            name, sep, value = line.partition(b":")
            if sep:
                lines[i] = b"-".join(part.capitalize() for part in name.split(b"-")) + sep + value
        return b"\r\n".join(lines)
