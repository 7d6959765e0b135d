"""Which addresses ingest may download from.

An ingest URL is chosen by the caller, so without a check it could make the server fetch from
itself or from the private network behind it (SSRF). Ingest resolves the host once, keeps only
public addresses plus those the operator allowed (`--ingest-allow` / VIDCACHE_INGEST_ALLOW:
host names, IPs or CIDR networks), and then connects to exactly the address it checked, so a
second DNS answer cannot redirect it (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

from vidcache.errors import IngestRefused, InvalidRequest, UpstreamError
from vidcache.resolver import Lookup, system_lookup

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
ALLOW_SETTING = "--ingest-allow (or VIDCACHE_INGEST_ALLOW)"


def _category(address: IPAddress) -> str | None:
    """Why an address is not public, or None when it is."""
    checks = (("loopback", address.is_loopback), ("link-local", address.is_link_local),
              ("multicast", address.is_multicast), ("unspecified", address.is_unspecified),
              ("private", address.is_private), ("reserved", address.is_reserved),
              ("non-public", not address.is_global))
    return next((name for name, hit in checks if hit), None)


def _unmapped(address: IPAddress) -> IPAddress:
    """::ffff:127.0.0.1 is 127.0.0.1 for the purpose of the check."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class HostGuard:
    def __init__(self, allow: Iterable[str]) -> None:
        """`allow` entries are host names, IP addresses or CIDR networks; ValueError if not."""
        self._networks: list[IPNetwork] = []
        self._names: set[str] = set()
        for raw in allow:
            entry = raw.strip()
            if not entry:
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not _HOSTNAME_RE.fullmatch(entry):
                    raise ValueError(f"not a host name, IP address or CIDR: {entry!r}") from None
                self._names.add(entry.lower().rstrip("."))

    def address_for(self, host: str, port: int, resolve: Lookup = system_lookup) -> str:
        """An address of `host` (as `resolve` finds them) that ingest may connect to; raises
        IngestRefused if none."""
        try:
            infos = resolve(host, port)
        except UnicodeError as exc:  # the IDNA codec refuses the name: empty or long label
            raise InvalidRequest(f"malformed host name {host!r}: {exc}") from exc
        except socket.gaierror as exc:
            raise UpstreamError(f"cannot resolve host {host!r}: {exc}") from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if host.lower().rstrip(".") in self._names:
            return str(addresses[0])
        refused: list[tuple[IPAddress, str]] = []
        for address in addresses:
            plain = _unmapped(address)
            category = _category(plain)
            if category is None or any(plain in network for network in self._networks):
                return str(address)
            refused.append((plain, category))
        shown = ", ".join(f"{address} is {category}" for address, category in refused)
        raise IngestRefused(
            f"refusing to download from {host}: {shown}; an operator can allow it by starting "
            f"the server with {ALLOW_SETTING} {refused[0][0]}")
