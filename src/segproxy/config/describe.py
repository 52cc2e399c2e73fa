"""The resolved configuration as ``segproxy check --config`` prints it: every key, by section,
with the value segproxy will use (defaults, the file and ``SEGPROXY_*`` applied; paths made
absolute; the queue file where it will be opened).

Secrets stay secret: the admin token is only said to be set or not, write keys are masked,
TLS files are named by path (never read here). Only the CLI imports this module.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable

from segproxy.config.schema import KNOWN_KEYS, Config
from segproxy.config.values import Upstream
from segproxy.redact import mask

# What an empty value means, where that is not obvious.
_EMPTY = {
    "prefix": "(none: served at the root)",
    "public_hosts": "(any host)",
    "trusted_proxies": "(none: X-Forwarded-* and Forwarded are ignored)",
    "sources.write_keys": "(any write key)",
    "rate_limit.exempt_ips": "(none)",
    "rate_limit.exempt_write_keys": "(none)",
    "tls.cert": "(none: plain http)",
    "tls.key": "(none: plain http)",
}
_MASKED = ("sources.write_keys", "rate_limit.exempt_write_keys")
_ZERO_MEANS = {
    "rate_limit.per_ip": "0 (off)",
    "rate_limit.per_write_key": "0 (off)",
    "rate_limit.per_ip_burst": "0 (twice the rate)",
    "rate_limit.per_write_key_burst": "0 (twice the rate)",
}


def _raw(config: Config, key: str) -> object:
    if key == "listen":
        return config.listen
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section), name) if section else getattr(config, key)


def _text(value: object) -> str:
    if isinstance(value, Upstream):
        return value.origin
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, frozenset | tuple | list):
        return "[" + ", ".join(sorted(_text(v) for v in value)) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _special(config: Config, key: str, raw: object) -> str | None:
    """The keys printed otherwise than their value: secrets, addresses, paths."""
    if key == "admin.token":
        return "(set)" if raw else "(not set: operator endpoints need none)"
    if key == "admin.listen":
        if not isinstance(raw, tuple):
            return "(the main listener)"
        host = str(raw[0])
        return f"[{host}]:{raw[1]}" if ":" in host else f"{host}:{raw[1]}"
    if key in ("data_dir", "queue.path"):
        path = os.path.abspath(os.path.expanduser(str(raw)))
        if key == "queue.path" and config.queue.backend != "sqlite":
            return f"{path} (not used: queue.backend is {config.queue.backend!r})"
        return path
    return None


def value_of(config: Config, key: str) -> str:
    """One key's resolved value, as printed."""
    raw = _raw(config, key)
    special = _special(config, key, raw)
    if special is not None:
        return special
    if key in _EMPTY and not raw:
        return _EMPTY[key]
    if key in _MASKED and isinstance(raw, Iterable):
        return _text([mask(k) for k in raw])
    if key in _ZERO_MEANS and raw == 0:
        return _ZERO_MEANS[key]
    return _text(raw)


def describe(config: Config) -> list[str]:
    """Every known key and its value, top-level keys first, then ``[section]`` by section."""
    lines: list[str] = []
    section = ""
    for key in KNOWN_KEYS:
        head, _, name = key.rpartition(".")
        if head != section:
            section = head
            lines.append(f"[{section}]")
        label = f"  {name}" if head else key
        lines.append(f"{label:<26} {value_of(config, key)}")
    return lines
