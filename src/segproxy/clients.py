"""Pure: the real client address and the host/scheme the browser used (client-address policy).

Used by the services and the app alike (ingest's ``context.ip``, the CDN's settings origin, the
rate limit's buckets, ``public_hosts``), so it lives beside them, not in the edge. Host values
are read by the one host grammar (``hosts.py``), the one ``public_hosts`` entries are read by.

Forwarded headers (``X-Forwarded-For``/``-Host``/``-Proto`` and RFC 7239 ``Forwarded``) are
believed only when the TCP peer is one of the configured ``trusted_proxies``; from anyone else
they are ignored, so a visitor cannot forge ``context.ip`` or make the settings name a host of
their choosing. (uvicorn's ``middleware/proxy_headers.py`` makes the same choice for the same
reason.)

Even from a trusted peer, most of a forwarded header is the visitor's: a proxy appends its value
to whatever the visitor sent (Envoy, HAProxy ``add-header``, nginx
``$proxy_add_x_forwarded_for``), so only values on the right were written by our own hops. Hence
(issue 11, "no settings poisoning"):

- **Client address.** ``X-Forwarded-For``, or the ``for=`` of each ``Forwarded`` element, is
  walked from the right, skipping trusted addresses: the first untrusted address is the client.
  A hop that is not an address (garbage, ``unknown``, an obfuscated ``_name``, a missing
  ``for=``) ends the walk with no answer: what lies left of it cannot be vouched for, so the
  peer is the client. When every hop is trusted, the leftmost is.
- **Host and scheme.** The rightmost ``X-Forwarded-Host`` / ``X-Forwarded-Proto`` value, or the
  ``host=`` / ``proto=`` of the rightmost ``Forwarded`` element: the value the nearest hop (the
  trusted peer itself) wrote. Not the value at the position of the first untrusted address: that
  lines up only if every hop in between appended a host too, and one that passes the header on
  unchanged (or one that appends only to ``X-Forwarded-For``) lines a visitor's value up with
  that position instead.
- **Both families.** A proxy writes one family and passes the other on from the visitor, and
  nothing tells which. When a request holds a ``Forwarded`` header and any ``X-Forwarded-*``
  header, a value (the address, the host, the scheme, each on its own) is believed only if both
  families give the same one; otherwise the connection's own is used. A visitor can then only
  make their own request fall back, never choose its values.
- **Malformed values** are no value: the connection's own peer address, ``Host`` header or
  scheme is used. Nothing here raises on any input.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from segproxy.hosts import valid_authority

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 7239 section 4: forwarded-pair = token "=" value; value = token / quoted-string
# (RFC 9110 5.6.2 and 5.6.4). One pair (or none: empty pairs and elements are allowed), with the
# optional whitespace around it.
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"((?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*)"'  # qdtext / quoted-pair
_PAIR = re.compile(rf"[ \t]*(?:({_TCHARS})=(?:({_TCHARS})|{_QUOTED}))?[ \t]*")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
# RFC 7239 section 6: node-port = port / obfport
_NODE_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")


def is_trusted(addr: str, trusted: Sequence[Network]) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


# -- parsing ------------------------------------------------------------------------------------


def parse_forwarded(value: bytes) -> list[dict[str, str]] | None:
    """The elements of a ``Forwarded`` header (several lines joined with ", "), left to right,
    each a dict of lower-case parameter names to unquoted values; None if it is malformed (an
    unbalanced quote, a pair without a value, a parameter twice in one element)."""
    text = value.decode("latin-1")
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    pos = 0
    end = len(text)
    while True:
        m = _PAIR.match(text, pos)
        if m is None:  # (the pattern matches the empty string: never)
            return None
        name = m.group(1)
        if name is not None:
            key = name.lower()
            if key in pairs:
                return None
            token = m.group(2)
            pairs[key] = token if token is not None else _QUOTED_PAIR.sub(r"\1", m.group(3))
        pos = m.end()
        if pos == end:
            break
        sep = text[pos]
        if sep == ",":
            if pairs:  # an empty list element does not count (RFC 9110 5.6.1)
                elements.append(pairs)
                pairs = {}
        elif sep != ";":
            return None
        pos += 1
    if pairs:
        elements.append(pairs)
    return elements


def _xff_address(hop: str) -> Address | None:
    try:
        return ipaddress.ip_address(hop.strip(" \t"))
    except ValueError:
        return None


def _node_address(node: str) -> Address | None:
    """The address in a ``for=`` node (``1.2.3.4``, ``"1.2.3.4:80"``, ``"[2001:db8::1]:80"``);
    None for ``unknown``, an obfuscated ``_name`` or anything malformed."""
    if node.startswith("["):
        close = node.find("]")
        if close < 0:
            return None
        addr, rest = node[1:close], node[close + 1 :]
    else:
        addr, colon, port = node.partition(":")
        rest = colon + port
    if rest and (rest[0] != ":" or _NODE_PORT.fullmatch(rest, 1) is None):
        return None
    try:
        ip: Address = (
            ipaddress.IPv6Address(addr) if node.startswith("[") else ipaddress.IPv4Address(addr)
        )
    except ValueError:
        return None
    return ip


def _walk(
    hops: Sequence[str], address: Callable[[str], Address | None], trusted: Sequence[Network]
) -> str | None:
    """From the right: the first hop that is not trusted; None if a hop is not an address."""
    for hop in reversed(hops):
        ip = address(hop)
        if ip is None:
            return None  # a malformed chain: trust nothing in it
        if not any(ip in net for net in trusted):
            return str(ip)
    first = address(hops[0]) if hops else None  # every hop trusted: the leftmost
    return None if first is None else str(first)


def _forwarded_for(value: bytes, trusted: Sequence[Network]) -> str | None:
    elements = parse_forwarded(value)
    if not elements:
        return None
    return _walk([e.get("for", "") for e in elements], _node_address, trusted)


def _has_x_forwarded(headers: Mapping[bytes, bytes]) -> bool:
    return (
        b"x-forwarded-for" in headers
        or b"x-forwarded-host" in headers
        or b"x-forwarded-proto" in headers
    )


# -- the client address -------------------------------------------------------------------------


def client_ip(peer: str, headers: Mapping[bytes, bytes], trusted: Sequence[Network]) -> str:
    """The client's address: the peer's, or from a trusted peer the forwarded one (see above)."""
    xff = headers.get(b"x-forwarded-for")
    fwd = headers.get(b"forwarded")
    if (xff is None and fwd is None) or not is_trusted(peer, trusted):
        return peer
    from_xff = (
        None if xff is None else _walk(xff.decode("latin-1").split(","), _xff_address, trusted)
    )
    if fwd is None:
        return peer if from_xff is None else from_xff
    from_fwd = _forwarded_for(fwd, trusted)
    if xff is None and not _has_x_forwarded(headers):
        return peer if from_fwd is None else from_fwd
    return from_xff if from_xff is not None and from_xff == from_fwd else peer


# -- the public origin --------------------------------------------------------------------------


def _host_value(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.lower()
    return text if valid_authority(text) else None


def _scheme_value(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.lower()
    return text if text in ("http", "https") else None


def _rightmost(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.rsplit(b",", 1)[-1].strip(b" \t").decode("latin-1")


def forwarded_host_and_scheme(headers: Mapping[bytes, bytes]) -> tuple[str | None, str | None]:
    """The host and scheme the nearest hop reports (lower-case, validated), each None when
    there is none to believe. Call only for a trusted peer."""
    xfh = headers.get(b"x-forwarded-host")
    xfp = headers.get(b"x-forwarded-proto")
    xf_host = _host_value(_rightmost(xfh))
    xf_scheme = _scheme_value(_rightmost(xfp))
    fwd = headers.get(b"forwarded")
    if fwd is None:
        return xf_host, xf_scheme
    elements = parse_forwarded(fwd)
    last = elements[-1] if elements else {}
    f_host = _host_value(last.get("host"))
    f_scheme = _scheme_value(last.get("proto"))
    if xfh is None and xfp is None and b"x-forwarded-for" not in headers:
        return f_host, f_scheme
    # Both families: only what they agree on (a visitor can fake one, never both).
    return (
        xf_host if xf_host == f_host else None,
        xf_scheme if xf_scheme == f_scheme else None,
    )


@dataclass(frozen=True, slots=True)
class PublicOrigin:
    scheme: str  # "http" | "https"
    host: str  # host[:port], lower-case, validated

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}"


def public_origin(
    peer: str, scheme: str, headers: Mapping[bytes, bytes], trusted: Sequence[Network]
) -> PublicOrigin | None:
    """The origin the browser used to reach us, or None if it cannot be told safely."""
    host = headers.get(b"host")
    text = "" if host is None else host.decode("latin-1").lower()
    if is_trusted(peer, trusted):
        fwd_host, fwd_scheme = forwarded_host_and_scheme(headers)
        if fwd_host is not None:
            text = fwd_host
        if fwd_scheme is not None:
            scheme = fwd_scheme
    if not text or not valid_authority(text):
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
