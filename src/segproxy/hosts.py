"""Pure: the one grammar of a host name, for the configuration and for requests alike.

A *name* is a DNS host name (RFC 1123): labels of letters, digits and ``-``, 1-63 characters,
never starting or ending with ``-``, joined by dots, at most 253 characters. A dotted IPv4
address is such a name. An *authority* is a name or a bracketed IPv6 literal, with an optional
port (1-65535): what a ``Host`` header holds.

The ``public_hosts`` entries (``config.py``) and the host a request names (``Host``,
``X-Forwarded-Host``, ``Forwarded: host=``; ``clients.py``) are read by this grammar, so an
entry is always one a request can match, and a request's host is either one of its words or
no host at all. Case is the caller's business (both lower-case first).
"""

from __future__ import annotations

import ipaddress
import re

MAX_NAME = 253  # characters of a DNS name (RFC 1035 section 2.3.4, without the final dot)
# An authority's characters at most: a longest name and ":65535". (An IPv6 literal is shorter.)
MAX_AUTHORITY = MAX_NAME + 6

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = rf"{_LABEL}(?:\.{_LABEL})*"
_NAME_RE = re.compile(_NAME)
_AUTHORITY_RE = re.compile(
    rf"(?:(?P<name>{_NAME})|\[(?P<v6>[0-9A-Fa-f:.]{{2,45}})\])(?::(?P<port>[0-9]{{1,5}}))?"
)


def valid_name(text: str) -> bool:
    """A DNS host name (or a dotted IPv4 address), without a port."""
    return len(text) <= MAX_NAME and _NAME_RE.fullmatch(text) is not None


def valid_authority(text: str) -> bool:
    """``host[:port]``: a name or ``[IPv6]``, and a port in 1-65535 if there is one."""
    if len(text) > MAX_AUTHORITY:  # before the pattern: a visitor's value may be long
        return False
    m = _AUTHORITY_RE.fullmatch(text)
    if m is None:
        return False
    name = m.group("name")
    if name is not None and len(name) > MAX_NAME:
        return False
    port = m.group("port")
    if port is not None and not 0 < int(port) < 65536:
        return False
    v6 = m.group("v6")
    if v6 is not None:
        try:
            ipaddress.IPv6Address(v6)
        except ValueError:
            return False
    return True
