"""The client's exception hierarchy: one root, one class per way a call can fail.

Every class carries `transient`, a class attribute telling a caller whether retrying the same
call may succeed (a dropped connection or a 5xx may heal; a 404 or a malformed hash never
will). Messages name what the call was about (hash or URL), the request and, for HTTP errors,
the server's `detail`. httpx's exceptions and non-2xx statuses become these in one place
(`vidcache_client._translate`); the underlying httpx exception, if any, is the `__cause__`.

    VidCacheError
      TransportError            connect/read failure, reset, timeout    transient
        RequestTimeout          a timeout                                transient
      ProtocolError             malformed or unexpected response         transient
        RangeError              response is not exactly the asked range  transient
      StatusError               any other non-2xx answer
        NotFoundError           404
        RangeNotSatisfiableError 416
        InvalidRequestError     other 4xx; also bad arguments refused locally (a ValueError)
        AuthError               401 / 403
        ServerError             5xx                                      transient
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

__all__ = [
    "AuthError",
    "InvalidRequestError",
    "NotFoundError",
    "ProtocolError",
    "RangeError",
    "RangeNotSatisfiableError",
    "RequestTimeout",
    "ServerError",
    "StatusError",
    "TransportError",
    "VidCacheError",
]


class VidCacheError(Exception):
    """Root of every error the client raises about a call."""

    transient: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by message and attributes, not by calling the class again with `args`
        # (Exception's way), which subclasses with more parameters cannot take: an error
        # raised in a ProcessPoolExecutor's worker must reach the caller as itself.
        return _restored, (type(self), self.message), self.__dict__


_Error = TypeVar("_Error", bound="VidCacheError")


def _restored(cls: type[_Error], message: str) -> _Error:
    error = cls.__new__(cls)
    Exception.__init__(error, message)  # the attributes follow from the pickled __dict__
    return error


class TransportError(VidCacheError):
    """The request or its response did not get through: refused, reset, cut short, DNS..."""

    transient = True
    # `refused` of a pickled error, whose copy has no `__cause__` to find it in (a slot: the
    # copy's attributes, `vars()`, are the original's).
    __slots__ = ("_refused_when_pickled",)
    _refused_when_pickled: bool

    @property
    def refused(self) -> bool:
        """Whether the connection was refused: nothing listens on that host and port (the
        advice differs from a reset or a timeout: start the server, or check the URL)."""
        pickled: bool | None = getattr(self, "_refused_when_pickled", None)
        if pickled is not None:
            return pickled
        cause, seen = self.__cause__ or self.__context__, set()
        while cause is not None and id(cause) not in seen:  # chains may loop
            if isinstance(cause, ConnectionRefusedError):
                return True
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        return False

    def __reduce__(self) -> tuple[Any, ...]:
        return _restored_transport_error, (type(self), self.message, self.refused), self.__dict__


def _restored_transport_error(cls: type[TransportError], message: str,
                              refused: bool) -> TransportError:
    error = _restored(cls, message)
    error._refused_when_pickled = refused
    return error


class RequestTimeout(TransportError):
    """Connecting, sending or reading took longer than the client's timeout."""

    transient = True


class ProtocolError(VidCacheError):
    """The server answered, but not with what the protocol promises (bad JSON, wrong length).

    Transient because the usual cause is a proxy or a server restart mid-answer.
    """

    transient = True


class RangeError(ProtocolError):
    """A ranged read was answered with anything but exactly the asked bytes."""

    transient = True


class StatusError(VidCacheError):
    """The server answered with a non-2xx status the call does not expect.

    `status_code` is the HTTP status, or None when the client refused the call itself before
    sending anything (see InvalidRequestError). `detail` is the server's explanation (its JSON
    `detail`, or the start of a non-JSON body); `json_detail` says which: True when the body
    was a JSON object with a `detail`, as every vidcache error is (a 404 from another kind of
    web server usually is not).
    """

    def __init__(self, status_code: int | None, detail: str, *, message: str | None = None,
                 json_detail: bool = False) -> None:
        super().__init__(message or f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.json_detail = json_detail


class NotFoundError(StatusError):
    """404: no such video (or URL, or endpoint)."""


class RangeNotSatisfiableError(StatusError):
    """416: the asked range starts at or past the end of the video.

    `size` is the video's size from the answer's `Content-Range: bytes */size`, if it had one.
    """

    def __init__(
        self, status_code: int | None, detail: str, *, message: str | None = None,
        json_detail: bool = False, size: int | None = None,
    ) -> None:
        super().__init__(status_code, detail, message=message, json_detail=json_detail)
        self.size = size


class InvalidRequestError(StatusError, ValueError):
    """The request is wrong and resending it will not help: a 4xx other than 401/403/404/416.

    Also raised, with `status_code` None and before any request is sent, for arguments that
    can never be valid (a malformed hash, an inverted byte range). It is a ValueError too, so
    both `except VidCacheError` and `except ValueError` catch those.
    """


class AuthError(StatusError):
    """401 / 403: the token is missing, wrong, or not allowed to do this."""


class ServerError(StatusError):
    """5xx: the server (or a proxy in front of it) failed; retrying may help."""

    transient = True
