"""From a flat ``{dotted.key: value}`` mapping to a :class:`Config`: one builder per section.

The builders run in a fixed order (top-level keys, upstream, sources, queue, forward, rate
limit, limits and cache, admin, TLS), so that of several bad values the same one is always
reported first. Checks that relate two keys of a section run once both are parsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

from segproxy.config.schema import (
    KNOWN_KEYS,
    MAX_JOURNAL_SEGMENT,
    MIN_JOURNAL_SEGMENT,
    QUEUE_FILE,
    REGION_PRESETS,
    AdminConfig,
    CacheConfig,
    Config,
    ForwardConfig,
    LimitsConfig,
    QueueBackend,
    QueueConfig,
    RateLimitConfig,
    Region,
    SourcesConfig,
    TlsConfig,
    UpstreamConfig,
)
from segproxy.config.values import (
    ConfigError,
    _choice,
    _hosts,
    _networks,
    _number,
    _numbers,
    _prefix,
    _str,
    _write_keys,
    parse_listen,
    parse_upstream,
    queue_path,
)


def build(flat: Mapping[str, object]) -> Config:
    """Validate a flat ``{dotted.key: value}`` mapping into a :class:`Config`."""
    unknown = sorted(set(flat) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(unknown[0], flat[unknown[0]], "a known key (see docs/configuration.md)")
    top = _top(flat)
    upstream = _upstream(flat)
    sources = SourcesConfig(
        write_keys=_write_keys("sources.write_keys", flat.get("sources.write_keys", []))
    )
    queue = _queue(flat)
    forward = ForwardConfig(**_numbers("forward", ForwardConfig(), flat))
    rate_limit = _rate_limit(flat)
    limits = _limits(flat)
    cache = CacheConfig(**_numbers("cache", CacheConfig(), flat))
    admin = _admin(flat)
    tls = _tls(flat)
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


def _top(flat: Mapping[str, object]) -> dict[str, Any]:
    """The keys outside any table that ``flat`` sets, as :class:`Config` fields."""
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
    if "log_format" in flat:
        top["log_format"] = _choice("log_format", flat["log_format"], ("text", "json"))
    if "access_log" in flat:
        data_dir = _str("data_dir", flat.get("data_dir", Config().data_dir))
        top["access_log"] = _access_log("access_log", flat["access_log"], data_dir)
    return top


def _access_log(key: str, value: object, data_dir: str) -> str:
    """ "off", "stdout", "stderr", or a file: a relative one is under ``data_dir``."""
    text = _str(key, value).strip()
    if not text or "\0" in text:
        raise ConfigError(key, value, '"off", "stdout", "stderr" or a file path')
    if text in ("off", "stdout", "stderr"):
        return text
    return str(Path(data_dir) / text)


def _upstream(flat: Mapping[str, object]) -> UpstreamConfig:
    """[upstream]: the region picks the default origins; cdn and api override them."""
    region = cast(
        Region, _choice("upstream.region", flat.get("upstream.region", "us"), ("us", "eu"))
    )
    cdn_default, api_default = REGION_PRESETS[region]
    d_up = UpstreamConfig()
    return UpstreamConfig(
        region=region,
        cdn=parse_upstream("upstream.cdn", flat.get("upstream.cdn", cdn_default)),
        api=parse_upstream("upstream.api", flat.get("upstream.api", api_default)),
        connect_timeout=_number(
            "upstream.connect_timeout", flat.get("upstream.connect_timeout", d_up.connect_timeout)
        ),
        timeout=_number("upstream.timeout", flat.get("upstream.timeout", d_up.timeout)),
        max_connections=int(
            _number(
                "upstream.max_connections",
                flat.get("upstream.max_connections", d_up.max_connections),
                minimum=1,
                integer=True,
            )
        ),
    )


def _queue(flat: Mapping[str, object]) -> QueueConfig:
    """[queue]: ``path`` is resolved under ``data_dir`` here, once, for every reader."""
    backend = cast(
        QueueBackend,
        _choice("queue.backend", flat.get("queue.backend", "sqlite"), ("sqlite", "none", "memory")),
    )
    sync = _choice("queue.synchronous", flat.get("queue.synchronous", "normal"), ("full", "normal"))
    segment = flat.get("queue.journal_segment_bytes", MIN_JOURNAL_SEGMENT)
    # (another type: _numbers names the problem)
    if type(segment) is int and not MIN_JOURNAL_SEGMENT <= segment <= MAX_JOURNAL_SEGMENT:
        raise ConfigError(
            "queue.journal_segment_bytes",
            segment,
            f"an integer from {MIN_JOURNAL_SEGMENT} to {MAX_JOURNAL_SEGMENT}",
        )
    return QueueConfig(
        backend=backend,
        path=queue_path(
            _str("data_dir", flat.get("data_dir", Config().data_dir)),
            _str("queue.path", flat.get("queue.path", QUEUE_FILE)),
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


def _rate_limit(flat: Mapping[str, object]) -> RateLimitConfig:
    """[rate_limit]: a rate of 0 is allowed (the limit is off)."""
    rl_numbers = {
        k: v
        for k, v in flat.items()
        if k not in ("rate_limit.exempt_ips", "rate_limit.exempt_write_keys")
    }
    return RateLimitConfig(
        exempt_ips=_networks("rate_limit.exempt_ips", flat.get("rate_limit.exempt_ips", [])),
        exempt_write_keys=_write_keys(
            "rate_limit.exempt_write_keys", flat.get("rate_limit.exempt_write_keys", [])
        ),
        **_numbers("rate_limit", RateLimitConfig(), rl_numbers, float_minimum=0.0),
    )


def _limits(flat: Mapping[str, object]) -> LimitsConfig:
    """[limits], then the checks between its sizes (both values read first)."""
    limits = LimitsConfig(**_numbers("limits", LimitsConfig(), flat))
    if limits.max_request_bytes > limits.max_decompressed_bytes:
        raise ConfigError(
            "limits.max_request_bytes",
            limits.max_request_bytes,
            f"at most limits.max_decompressed_bytes ({limits.max_decompressed_bytes})",
            related=("limits.max_decompressed_bytes",),
        )
    if limits.max_buffered_bytes < limits.max_body_bytes:
        raise ConfigError(
            "limits.max_buffered_bytes",
            limits.max_buffered_bytes,
            f"at least limits.max_body_bytes ({limits.max_body_bytes}): else no body that size "
            "could ever be received",
            related=("limits.max_body_bytes",),
        )
    return limits


def _admin(flat: Mapping[str, object]) -> AdminConfig:
    """[admin]: a token is never shown in an error, only its length is judged."""
    admin_listen = flat.get("admin.listen", "")
    token = _str("admin.token", flat.get("admin.token", ""))
    if token and len(token) < 16:
        raise ConfigError("admin.token", "(hidden)", "at least 16 characters, or empty for none")
    admin = AdminConfig(
        listen=parse_listen("admin.listen", admin_listen) if admin_listen else None,
        token=token,
        dashboard=_choice(
            "admin.dashboard", flat.get("admin.dashboard", "auto"), ("auto", "on", "off")
        ),
    )
    if admin.dashboard_public and not admin.token:
        raise ConfigError(
            "admin.dashboard",
            admin.dashboard,
            "admin.token set too: without admin.listen the dashboard is served on the public"
            ' listener, which needs the token (or set admin.listen, or "auto" / "off")',
        )
    return admin


def _tls(flat: Mapping[str, object]) -> TlsConfig:
    """[tls]: both PEM files or neither, and each one readable when named."""
    tls = TlsConfig(
        cert=_str("tls.cert", flat.get("tls.cert", "")),
        key=_str("tls.key", flat.get("tls.key", "")),
    )
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError(
            "tls.key" if tls.cert else "tls.cert",
            "",
            "both tls.cert and tls.key, or neither",
            related=("tls.cert" if tls.cert else "tls.key",),
        )
    for name, value in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        if value and not Path(value).is_file():
            raise ConfigError(name, value, "a readable PEM file")
    return tls
