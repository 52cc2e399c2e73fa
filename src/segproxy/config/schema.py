"""The schema: every section and key, as frozen dataclasses whose defaults are the defaults.

A key's dotted name is its section and field (``upstream.api``); the top-level keys are
:class:`Config`'s own fields, except ``listen``, which is parsed into ``listen_host`` and
``listen_port``. docs/configuration.md describes each key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from segproxy.config.values import Upstream, parse_upstream

Region = Literal["us", "eu"]
QueueBackend = Literal["sqlite", "none", "memory"]

REGION_PRESETS: dict[str, tuple[str, str]] = {
    # region: (cdn, api)
    "us": ("https://cdn.segment.com", "https://api.segment.io"),
    "eu": ("https://cdn.segment.com", "https://events.eu1.segmentapis.com"),
}


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
MIN_JOURNAL_SEGMENT = 1024**2  # room for a full request's commit besides the release reserve
MAX_JOURNAL_SEGMENT = 1024**3  # a start and `queue stats` read a whole segment at a time


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
    journal_segment_bytes: int = 8 * 1024**2  # each preallocated file of the journal


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
    # The live dashboard: "auto" (on the admin listener when there is one, else off), "on"
    # (also on the main listener when there is no admin listener: needs the token), "off".
    dashboard: str = "auto"

    @property
    def dashboard_public(self) -> bool:
        """The dashboard is served on the main (public) listener."""
        return self.dashboard == "on" and self.listen is None

    @property
    def dashboard_served(self) -> bool:
        """The dashboard is served somewhere (the admin listener, or the main one)."""
        return self.dashboard != "off" and (self.listen is not None or self.dashboard == "on")


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
    log_format: Literal["text", "json"] = "text"
    # "off", "stdout", "stderr" or a file (a relative one under data_dir): see logs.py
    access_log: str = "off"
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


# The file's tables ([upstream], ...) and the keys outside any table; the environment names the
# same keys (env_name).
SECTIONS = (
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
TOP_KEYS = (
    "listen",
    "prefix",
    "public_hosts",
    "trusted_proxies",
    "data_dir",
    "log_level",
    "log_format",
    "access_log",
)


# The keys whose value is a list: an array in the file (a string there is an error, see
# values._str_list), comma-separated in the environment.
LIST_KEYS = (
    "public_hosts",
    "trusted_proxies",
    "sources.write_keys",
    "rate_limit.exempt_ips",
    "rate_limit.exempt_write_keys",
)


def _known_keys() -> list[str]:
    keys = list(TOP_KEYS)
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
