"""One value at a time: the error every bad value raises, and the parsers (validators).

Each parser takes the dotted key it reads (for its error message) and the raw value, as the TOML
file gives it (a string, a number, a list) or as the environment does (a string: numbers in
text; lists arrive split, from comma-separated text). It returns the typed value or raises
:class:`ConfigError`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from segproxy.hosts import valid_authority, valid_name

_WRITE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names key, value and expectation, and the
    environment variable the value came from, if it did (``variable``).

    A check between keys (``tls.cert`` needs ``tls.key``) names the other keys that decide it
    (``related``): when one of those came from the environment, the message names its variable
    too (``set_by``), since that is the line the operator wrote."""

    def __init__(
        self,
        key: str,
        value: object,
        expected: str,
        variable: str | None = None,
        *,
        related: tuple[str, ...] = (),
        set_by: tuple[str, ...] = (),
    ) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        self.variable = variable
        self.related = related
        if variable is None:
            message = f"config key {key!r}: got {value!r}, expected {expected}"
        else:
            # The operator looks for the variable they set, not for the key it maps to.
            what = "" if variable == key else f" (config key {key!r})"
            message = f"{variable}={value!r}: expected {expected}{what}"
        if set_by:
            message += f" (see {', '.join(set_by)} in the environment)"
        super().__init__(message)

    def from_variable(self, variable: str) -> ConfigError:
        """The same error, naming the environment variable the bad value came from."""
        return ConfigError(self.key, self.value, self.expected, variable, related=self.related)

    def set_by(self, variables: tuple[str, ...]) -> ConfigError:
        """The same error, naming the variables that set the keys it relates to."""
        return ConfigError(
            self.key, self.value, self.expected, related=self.related, set_by=variables
        )


@dataclass(frozen=True, slots=True)
class Upstream:
    """An origin we forward to: scheme, host and port, nothing else."""

    scheme: Literal["http", "https"]
    host: str
    port: int

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.authority}"


def parse_upstream(key: str, value: object) -> Upstream:
    expected = "an http(s) URL with a host and no path, e.g. https://api.segment.io"
    if not isinstance(value, str):
        raise ConfigError(key, value, expected)
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, value, expected)
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(key, value, expected)
    host = parts.hostname.lower()
    if not valid_name(host):
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise ConfigError(key, value, expected) from exc
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(key, value, expected) from exc
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    elif port == 0:
        raise ConfigError(key, value, "a URL with a real port (1-65535), not 0")
    scheme = cast(Literal["http", "https"], parts.scheme)
    return Upstream(scheme, host, port)


def parse_listen(key: str, value: object) -> tuple[str, int]:
    expected = "HOST:PORT, e.g. 127.0.0.1:8080 or [::]:8080"
    if not isinstance(value, str):
        raise ConfigError(key, value, expected)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", value.strip())
    if not m:
        raise ConfigError(key, value, expected)
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ConfigError(key, value, expected)
    return host, port


def _str(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, value, "a string")
    return value


def _str_list(key: str, value: object) -> list[str]:
    """A list of strings. The environment's comma-separated text is split before it gets here
    (environment.py): a string here came from a file, where it is a mistake to name with its
    fix, not a one-item list to guess (``trusted_proxies = "10.0.0.0/8"``)."""
    if isinstance(value, str):
        items = ", ".join(f'"{v.strip()}"' for v in value.split(",") if v.strip())
        section, _, name = key.rpartition(".")
        where = f" in [{section}]" if section else ""
        raise ConfigError(key, value, f"a list of strings: {name} = [{items}]{where}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, value, "a list of strings")
    return [v.strip() for v in value]


def split_list(text: str) -> list[str]:
    """An environment variable's list: comma-separated, items trimmed, empty items dropped."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _number(key: str, value: object, *, minimum: float = 0.0, integer: bool = False) -> float:
    what = "an integer" if integer else "a number"
    if isinstance(value, str):  # from the environment
        try:
            value = int(value) if integer else float(value)
        except ValueError as exc:
            raise ConfigError(key, value, what) from exc
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, value, "an integer" if integer else "a number")
    if integer and not isinstance(value, int):
        raise ConfigError(key, value, "an integer")
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(key, value, f"{what} >= {minimum:g}")
    return float(value)


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def _prefix(key: str, value: object) -> str:
    text = _str(key, value).rstrip("/")
    if text and (
        not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", text)
        or any(seg in (".", "..") for seg in text.split("/"))
    ):
        raise ConfigError(key, value, "an empty string or a path like /seg (letters, digits, ._~-)")
    return text


def _hosts(key: str, value: object) -> frozenset[str]:
    hosts = set()
    for h in _str_list(key, value):
        name = h.lower().removesuffix(":443").removesuffix(":80")  # default ports never show
        if not valid_authority(name):  # the grammar a request's Host is read by (hosts.py)
            raise ConfigError(key, h, "host names like analytics.example.com (optional :port)")
        hosts.add(name)
    return frozenset(hosts)


def _networks(key: str, value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in _str_list(key, value):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ConfigError(key, item, "IP addresses or CIDR networks") from exc
    return tuple(nets)


def _write_keys(key: str, value: object) -> frozenset[str]:
    keys = _str_list(key, value)
    for k in keys:
        if not _WRITE_KEY_RE.match(k):
            raise ConfigError(key, k, "write keys of letters, digits, '_' or '-'")
    return frozenset(keys)


def _numbers(
    section: str, defaults: object, flat: Mapping[str, object], float_minimum: float = 0.001
) -> dict[str, Any]:
    """The numeric keys of one section that ``flat`` sets, parsed; minimum 1 for integers."""
    out: dict[str, Any] = {}
    for name in defaults.__dataclass_fields__:  # type: ignore[attr-defined]
        key = f"{section}.{name}"
        default = getattr(defaults, name)
        if key not in flat or isinstance(default, str):
            continue
        integer = isinstance(default, int)
        minimum = 1.0 if integer else float_minimum
        value = _number(key, flat[key], minimum=minimum, integer=integer)
        out[name] = int(value) if integer else value
    return out


def queue_path(data_dir: str, path: str) -> str:
    """``queue.path``, relative to ``data_dir`` unless absolute (``~`` is the home directory)."""
    p = os.path.expanduser(path)
    return p if os.path.isabs(p) else os.path.join(os.path.expanduser(data_dir), p)
