"""Typed, frozen configuration, validated once at start-up.

Sources, later ones win: embedded defaults < TOML file (``--config``) < ``SEGPROXY_*`` environment
variables. The environment name of a key is ``SEGPROXY_`` + its dotted path in upper case with
dots as underscores: ``upstream.api`` -> ``SEGPROXY_UPSTREAM_API``; lists are comma-separated.

Any invalid value stops start-up with a :class:`ConfigError` naming the key, the value and what
was expected (and the variable, when the value came from one). A ``SEGPROXY_*`` variable that
names no key is only a warning (:func:`env_warnings`): Kubernetes defines ``SEGPROXY_PORT``,
``SEGPROXY_SERVICE_HOST``... in every pod of a namespace with a Service named ``segproxy``, and a
proxy that refused to start there would crash-loop. docs/configuration.md is the reference for
every key here.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from segproxy.hosts import valid_authority, valid_name

Region = Literal["us", "eu"]
QueueBackend = Literal["sqlite", "none", "memory"]

REGION_PRESETS: dict[str, tuple[str, str]] = {
    # region: (cdn, api)
    "us": ("https://cdn.segment.com", "https://api.segment.io"),
    "eu": ("https://cdn.segment.com", "https://events.eu1.segmentapis.com"),
}

_WRITE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names key, value and expectation, and the
    environment variable the value came from, if it did (``variable``)."""

    def __init__(self, key: str, value: object, expected: str, variable: str | None = None) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        self.variable = variable
        if variable is None:
            message = f"config key {key!r}: got {value!r}, expected {expected}"
        else:
            # The operator looks for the variable they set, not for the key it maps to.
            what = "" if variable == key else f" (config key {key!r})"
            message = f"{variable}={value!r}: expected {expected}{what}"
        super().__init__(message)

    def from_variable(self, variable: str) -> ConfigError:
        """The same error, naming the environment variable the bad value came from."""
        return ConfigError(self.key, self.value, self.expected, variable)


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


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    region: Region = "us"
    cdn: Upstream = field(
        default_factory=lambda: parse_upstream("upstream.cdn", REGION_PRESETS["us"][0])
    )
    api: Upstream = field(
        default_factory=lambda: parse_upstream("upstream.api", REGION_PRESETS["us"][1])
    )
    connect_timeout: float = 5.0
    timeout: float = 15.0
    max_connections: int = 256


@dataclass(frozen=True, slots=True)
class SourcesConfig:
    write_keys: frozenset[str] = frozenset()


QUEUE_FILE = "queue.db"  # queue.path's default, under data_dir


@dataclass(frozen=True, slots=True)
class QueueConfig:
    backend: QueueBackend = "sqlite"
    # The path to open, wherever the process runs (the CLI included): ``build`` resolves a
    # relative ``queue.path`` (default QUEUE_FILE) under ``data_dir``; this default is that for
    # the default data_dir.
    path: str = "./segproxy-data/queue.db"
    max_rows: int = 5_000_000
    max_bytes: int = 2 * 1024**3  # every byte stored: key, body, sentAt, per-row overhead
    max_dead_bytes: int = 64 * 1024**2  # dead letters, apart; the oldest go past it
    min_free_disk_bytes: int = 64 * 1024**2
    synchronous: Literal["full", "normal"] = "normal"


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    max_delay: float = 0.2
    concurrency: int = 8
    per_key_concurrency: int = 2
    backoff_base: float = 0.5
    backoff_cap: float = 60.0
    max_retry_after: float = 3600.0
    retry_after: int = 5  # seconds we ask clients to wait when the queue is full


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_count: int = 100
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 512 * 1024
    max_decompressed_bytes: int = 2 * 1024 * 1024
    max_event_bytes: int = 32 * 1024
    max_request_bytes: int = 500 * 1024
    max_batch_events: int = 2500
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_pipelined: int = 16
    shutdown_grace: float = 10.0
    max_connections: int = 10_000  # open client connections; more are refused at accept
    # Request bodies held in memory across all connections (declared or received, until each
    # is handed to its handler); a body that would take the total over it is answered 503.
    max_buffered_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Token buckets; a rate of 0 turns that limit off (the default: opt in, see docs)."""

    per_ip: float = 0.0  # requests per second per client IP
    per_ip_burst: float = 0.0  # bucket size; 0 = twice the rate
    per_write_key: float = 0.0  # events API requests per second per write key
    per_write_key_burst: float = 0.0
    exempt_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    exempt_write_keys: frozenset[str] = frozenset()
    max_tracked: int = 100_000  # buckets kept per table, at most (least recently used dropped)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS on the main listener: PEM files; both or neither."""

    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Operator endpoints: everything beyond /healthz (today /readyz)."""

    listen: tuple[str, int] | None = None  # a separate listener; None: the main one
    token: str = ""  # when set, operator endpoints need "Authorization: Bearer <token>"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    script_ttl: float = 60.0
    settings_ttl: float = 60.0
    bundle_ttl: float = 365 * 86400.0
    integration_ttl: float = 3600.0
    stale_while_revalidate: float = 86400.0
    stale_if_error: float = 7 * 86400.0
    max_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    prefix: str = ""
    public_hosts: frozenset[str] = frozenset()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    data_dir: str = "./segproxy-data"
    log_level: str = "info"
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


# ---------------------------------------------------------------------------------------------
# Parsing helpers: each takes the dotted key for its error message.


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
    if isinstance(value, str):  # from the environment: comma-separated
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, value, "a list of strings")
    return [v.strip() for v in value]


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


# The schema: dotted key -> (setter-name, parser). One table, used by the file and the env.
_SECTIONS = (
    "upstream",
    "sources",
    "queue",
    "forward",
    "rate_limit",
    "admin",
    "tls",
    "limits",
    "cache",
)
_TOP_KEYS = (
    "listen",
    "prefix",
    "public_hosts",
    "trusted_proxies",
    "data_dir",
    "log_level",
)


def _flatten(raw: Mapping[str, Any]) -> dict[str, object]:
    flat: dict[str, object] = {}
    for k, v in raw.items():
        if k in _SECTIONS:
            if not isinstance(v, Mapping):
                raise ConfigError(k, v, f"a [{k}] table")
            for sk, sv in v.items():
                flat[f"{k}.{sk}"] = sv
        else:
            flat[k] = v
    return flat


def _known_keys() -> list[str]:
    keys = list(_TOP_KEYS)
    for section, cls in (
        ("upstream", UpstreamConfig),
        ("sources", SourcesConfig),
        ("queue", QueueConfig),
        ("forward", ForwardConfig),
        ("rate_limit", RateLimitConfig),
        ("admin", AdminConfig),
        ("tls", TlsConfig),
        ("limits", LimitsConfig),
        ("cache", CacheConfig),
    ):
        keys.extend(f"{section}.{name}" for name in cls.__dataclass_fields__)
    return keys


KNOWN_KEYS: tuple[str, ...] = tuple(_known_keys())


def env_name(key: str) -> str:
    return "SEGPROXY_" + key.upper().replace(".", "_")


# SEGPROXY_* variables that are not configuration keys, and the values each takes.
NOT_CONFIG: dict[str, tuple[str, str]] = {
    # read by segproxy/native.py, before any configuration
    "SEGPROXY_NATIVE": ("01", "0 (run as plain Python) or 1 (the compiled build, the default)"),
}

# The variables Kubernetes defines for a Service named "segproxy" in every pod of its namespace
# ("service links": SEGPROXY_SERVICE_HOST, SEGPROXY_SERVICE_PORT[_<port name>], SEGPROXY_PORT,
# SEGPROXY_PORT_<port>_<PROTO>[_ADDR|_PORT|_PROTO]).
_SERVICE_LINK = re.compile(
    r"SEGPROXY_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_(?:ADDR|PORT|PROTO))?)?)"
)


def _env_names() -> dict[str, str]:
    return {env_name(k): k for k in KNOWN_KEYS}


def _from_env(env: Mapping[str, str]) -> dict[str, object]:
    """The configuration keys set in ``env``; unknown SEGPROXY_* variables are skipped here
    and reported by :func:`env_warnings`. A bad SEGPROXY_NATIVE stops start-up."""
    by_name = _env_names()
    out: dict[str, object] = {}
    for name, value in env.items():
        if name in NOT_CONFIG:
            allowed, what = NOT_CONFIG[name]
            if len(value) != 1 or value not in allowed:
                raise ConfigError(name, value, what, variable=name)
        elif name in by_name:
            out[by_name[name]] = value
    return out


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """The ``SEGPROXY_*`` variables in ``env`` that segproxy does not read, sorted."""
    by_name = _env_names()
    return sorted(
        name
        for name in env
        if name.startswith("SEGPROXY_") and name not in by_name and name not in NOT_CONFIG
    )


def closest_variable(name: str) -> str | None:
    """The known variable ``name`` most likely meant (a typo, a missing section), or None.

    Compared without the common ``SEGPROXY_`` prefix, which would make every name look close.
    """
    known = [*_env_names(), *NOT_CONFIG]
    suffixes = {k.removeprefix("SEGPROXY_"): k for k in known}
    match = difflib.get_close_matches(name.removeprefix("SEGPROXY_"), suffixes, n=1)
    return suffixes[match[0]] if match else None


def env_warnings(env: Mapping[str, str]) -> list[str]:
    """One warning per unknown ``SEGPROXY_*`` variable (Kubernetes' service links together).

    Never fatal, and never showing a value: a misspelled variable may hold a secret.
    """
    unknown = unknown_variables(env)
    links = [name for name in unknown if _SERVICE_LINK.fullmatch(name)]
    warnings = []
    if links:
        warnings.append(
            f"ignoring {', '.join(links)}: Kubernetes sets these for a Service named segproxy "
            "(they are no segproxy settings; `enableServiceLinks: false` in the pod spec drops "
            "them; the listen address is SEGPROXY_LISTEN)"
        )
    for name in unknown:
        if name in links:
            continue
        closest = closest_variable(name)
        hint = f"did you mean {closest}?" if closest else "no known variable is close"
        warnings.append(
            f"ignoring {name}: not a segproxy setting; {hint} "
            "(docs/configuration.md lists them all)"
        )
    return warnings


def build(flat: Mapping[str, object]) -> Config:
    """Validate a flat ``{dotted.key: value}`` mapping into a :class:`Config`."""
    unknown = sorted(set(flat) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(unknown[0], flat[unknown[0]], "a known key (see docs/configuration.md)")

    def get(key: str, default: object) -> object:
        return flat.get(key, default)

    top: dict[str, Any] = {}
    if "listen" in flat:
        top["listen_host"], top["listen_port"] = parse_listen("listen", flat["listen"])
    if "prefix" in flat:
        top["prefix"] = _prefix("prefix", flat["prefix"])
    if "public_hosts" in flat:
        top["public_hosts"] = _hosts("public_hosts", flat["public_hosts"])
    if "trusted_proxies" in flat:
        top["trusted_proxies"] = _networks("trusted_proxies", flat["trusted_proxies"])
    if "data_dir" in flat:
        top["data_dir"] = _str("data_dir", flat["data_dir"])
    if "log_level" in flat:
        top["log_level"] = _choice(
            "log_level", flat["log_level"], ("debug", "info", "warning", "error")
        )

    region = cast(Region, _choice("upstream.region", get("upstream.region", "us"), ("us", "eu")))
    cdn_default, api_default = REGION_PRESETS[region]
    d_up = UpstreamConfig()
    upstream = UpstreamConfig(
        region=region,
        cdn=parse_upstream("upstream.cdn", get("upstream.cdn", cdn_default)),
        api=parse_upstream("upstream.api", get("upstream.api", api_default)),
        connect_timeout=_number(
            "upstream.connect_timeout", get("upstream.connect_timeout", d_up.connect_timeout)
        ),
        timeout=_number("upstream.timeout", get("upstream.timeout", d_up.timeout)),
        max_connections=int(
            _number(
                "upstream.max_connections",
                get("upstream.max_connections", d_up.max_connections),
                minimum=1,
                integer=True,
            )
        ),
    )
    sources = SourcesConfig(
        write_keys=_write_keys("sources.write_keys", get("sources.write_keys", []))
    )
    backend = cast(
        QueueBackend,
        _choice("queue.backend", get("queue.backend", "sqlite"), ("sqlite", "none", "memory")),
    )
    sync = _choice("queue.synchronous", get("queue.synchronous", "normal"), ("full", "normal"))
    queue = QueueConfig(
        backend=backend,
        path=queue_path(
            _str("data_dir", get("data_dir", Config().data_dir)),
            _str("queue.path", get("queue.path", QUEUE_FILE)),
        ),
        synchronous=cast(Literal["full", "normal"], sync),
        **_numbers(
            "queue",
            QueueConfig(),
            {
                k: v
                for k, v in flat.items()
                if k not in ("queue.backend", "queue.path", "queue.synchronous")
            },
        ),
    )
    forward = ForwardConfig(**_numbers("forward", ForwardConfig(), flat))
    rl_numbers = {
        k: v
        for k, v in flat.items()
        if k not in ("rate_limit.exempt_ips", "rate_limit.exempt_write_keys")
    }
    rate_limit = RateLimitConfig(
        exempt_ips=_networks("rate_limit.exempt_ips", get("rate_limit.exempt_ips", [])),
        exempt_write_keys=_write_keys(
            "rate_limit.exempt_write_keys", get("rate_limit.exempt_write_keys", [])
        ),
        **_numbers("rate_limit", RateLimitConfig(), rl_numbers, float_minimum=0.0),
    )
    limits = LimitsConfig(**_numbers("limits", LimitsConfig(), flat))
    cache = CacheConfig(**_numbers("cache", CacheConfig(), flat))
    if limits.max_request_bytes > limits.max_decompressed_bytes:
        raise ConfigError(
            "limits.max_request_bytes",
            limits.max_request_bytes,
            f"at most limits.max_decompressed_bytes ({limits.max_decompressed_bytes})",
        )
    if limits.max_buffered_bytes < limits.max_body_bytes:
        raise ConfigError(
            "limits.max_buffered_bytes",
            limits.max_buffered_bytes,
            f"at least limits.max_body_bytes ({limits.max_body_bytes}): else no body that size "
            "could ever be received",
        )
    admin_listen = get("admin.listen", "")
    token = _str("admin.token", get("admin.token", ""))
    if token and len(token) < 16:
        raise ConfigError("admin.token", "(hidden)", "at least 16 characters, or empty for none")
    admin = AdminConfig(
        listen=parse_listen("admin.listen", admin_listen) if admin_listen else None,
        token=token,
    )
    tls = TlsConfig(
        cert=_str("tls.cert", get("tls.cert", "")), key=_str("tls.key", get("tls.key", ""))
    )
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError(
            "tls.key" if tls.cert else "tls.cert", "", "both tls.cert and tls.key, or neither"
        )
    for name, value in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        if value and not Path(value).is_file():
            raise ConfigError(name, value, "a readable PEM file")
    return Config(
        admin=admin,
        tls=tls,
        upstream=upstream,
        sources=sources,
        queue=queue,
        forward=forward,
        rate_limit=rate_limit,
        limits=limits,
        cache=cache,
        **top,
    )


def queue_path(data_dir: str, path: str) -> str:
    """``queue.path``, relative to ``data_dir`` unless absolute (``~`` is the home directory)."""
    p = os.path.expanduser(path)
    return p if os.path.isabs(p) else os.path.join(os.path.expanduser(data_dir), p)


def _numbers(
    section: str, defaults: object, flat: Mapping[str, object], float_minimum: float = 0.001
) -> dict[str, Any]:
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


def load(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Embedded defaults, then the TOML file (if any), then ``SEGPROXY_*`` variables."""
    flat: dict[str, object] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError as exc:
            raise ConfigError("--config", str(p), "an existing TOML file") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", str(p), f"valid TOML ({exc})") from exc
        flat.update(_flatten(raw))
    from_env = _from_env(os.environ if env is None else env)
    flat.update(from_env)
    try:
        return build(flat)
    except ConfigError as exc:
        if exc.key in from_env:
            raise exc.from_variable(env_name(exc.key)) from None
        raise
