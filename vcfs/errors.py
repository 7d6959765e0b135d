"""The errors vcfs raises: a small hierarchy rooted at `VcfsError`, and what each one becomes.

vcfs.remote raises them, translating the errors of vidcache_client into these with the client's
error as the cause (`raise ... from exc`). vcfs.fs turns them into errno values in one place,
its `_fuse_operation` decorator:

- `NotFound` (the service has no such video: HTTP 404) -> ENOENT;
- `AccessDenied` (HTTP 401/403: vcfs's token is missing or wrong, or a proxy in front of the
  service refused the URL's credentials) -> EACCES;
- any other `VcfsError` -> EIO: a `RemoteError` (a refusal retrying will not change, such as
  another 4xx, or metadata or digests that are unusable), `RemoteUnavailable` (transient
  failures outlasted the deadline) and its `Stopping` (vcfs is unmounted or signalled).

`CorruptData` and `Overdue` are failures of one attempt: `Remote` retries them while the
deadline allows, then raises `RemoteUnavailable` (or `Stopping`). Before mounting, `vcfs mount`
checks the service, and stops with a message on `RemoteUnavailable` or `AccessDenied`
(vcfs.cli).

Not of this hierarchy: vcfs.blocks's `FetchStopped` (a prefetch ended early, not an error) and
vcfs.threads's `NoThread` (no thread could be started: ENOMEM).
"""


class VcfsError(Exception):
    """Root of the errors vcfs raises."""


class NotFound(VcfsError):
    """The service has no video with this hash (HTTP 404)."""


class RemoteError(VcfsError):
    """The service gave no usable answer, and retrying will not help (e.g. a 4xx)."""


class AccessDenied(RemoteError):
    """The service refused vcfs's bearer token (HTTP 401/403): missing or wrong; or a proxy in
    front of it refused the URL's credentials."""


class RemoteUnavailable(RemoteError):
    """Transient failures (network, timeouts, 5xx, bad data) outlasted the deadline."""


class Stopping(RemoteUnavailable):
    """vcfs is stopping (unmounted or signalled): the request was given up unanswered."""


class CorruptData(RemoteError):
    """Bytes that are not the asked range or do not match the recorded digest (retried)."""


class Overdue(RemoteError):
    """An attempt was still running at the operation's cutoff (retried if time is left)."""
