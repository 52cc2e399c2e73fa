"""Pure: the real client address and the host/scheme the browser used.

``X-Forwarded-For``/``-Host``/``-Proto`` are believed only when the TCP peer is one of the
configured ``trusted_proxies``; from anyone else they are ignored, so a visitor cannot forge
``context.ip`` or make the settings name a host of their choosing. (uvicorn's
``middleware/proxy_headers.py`` makes the same choice for the same reason.)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# host[:port] per RFC 3986 reg-name (letters, digits, '-', '.') or an IPv6 literal.
_HOST_RE = re.compile(
    r"^(?:(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)|\[(?P<v6>[0-9A-Fa-f:.]{2,45})\])"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)


def is_trusted(addr: str, trusted: Sequence[Network]) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_ip(peer: str, forwarded_for: bytes | None, trusted: Sequence[Network]) -> str:
    """The first address, from the right, that is not a trusted proxy."""
    if forwarded_for is None or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",")]
    for hop in reversed(hops):
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed chain: trust nothing in it
        if not any(ip in net for net in trusted):
            return str(ip)
    return hops[0] if hops and hops[0] else peer


def valid_host(value: str) -> bool:
    m = _HOST_RE.fullmatch(value)
    if not m:
        return False
    port = m.group("port")
    if port is not None and not 0 < int(port) < 65536:
        return False
    if m.group("v6") is not None:
        try:
            ipaddress.IPv6Address(m.group("v6"))
        except ValueError:
            return False
    return True


@dataclass(frozen=True, slots=True)
class PublicOrigin:
    scheme: str  # "http" | "https"
    host: str  # host[:port], lower-case, validated

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}"


def public_origin(
    peer: str,
    scheme: str,
    host: bytes | None,
    forwarded_host: bytes | None,
    forwarded_proto: bytes | None,
    trusted: Sequence[Network],
) -> PublicOrigin | None:
    """The origin the browser used to reach us, or None if it cannot be told safely."""
    trusted_peer = is_trusted(peer, trusted)
    chosen = host
    if trusted_peer and forwarded_host:
        chosen = forwarded_host.split(b",", 1)[0].strip()
    if trusted_peer and forwarded_proto:
        proto = forwarded_proto.split(b",", 1)[0].strip().lower()
        if proto in (b"http", b"https"):
            scheme = proto.decode()
    if not chosen:
        return None
    text = chosen.decode("latin-1").lower()
    if not valid_host(text):
        return None
    # Drop a default port so the same site gives the same origin either way.
    if (scheme == "https" and text.endswith(":443")) or (scheme == "http" and text.endswith(":80")):
        text = text.rsplit(":", 1)[0]
    return PublicOrigin(scheme, text)


def host_allowed(origin: PublicOrigin, public_hosts: frozenset[str]) -> bool:
    """An empty allow-list allows any host; entries match with or without the port."""
    if not public_hosts:
        return True
    if origin.host in public_hosts:
        return True
    bare = origin.host.rsplit(":", 1)[0] if not origin.host.endswith("]") else origin.host
    return bare in public_hosts
