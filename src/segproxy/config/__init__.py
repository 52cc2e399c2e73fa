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

The package, by concern (everything is imported from here, ``segproxy.config``):

- ``values``: :class:`ConfigError`, the :class:`Upstream` value and the parsers of one value;
- ``schema``: the sections and keys as frozen dataclasses, their defaults, ``KNOWN_KEYS``;
- ``assemble``: :func:`build`, a flat ``{dotted.key: value}`` mapping to a :class:`Config`;
- ``environment``: ``SEGPROXY_*`` names, and the warnings for variables that name no key;
- ``loading``: :func:`load`, the TOML file and the environment over the defaults.
"""

from __future__ import annotations

from segproxy.config.assemble import build
from segproxy.config.environment import (
    NOT_CONFIG,
    closest_variable,
    env_name,
    env_warnings,
    unknown_variables,
)
from segproxy.config.loading import load
from segproxy.config.schema import (
    KNOWN_KEYS,
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
from segproxy.config.values import ConfigError, Upstream, parse_listen, parse_upstream, queue_path

__all__ = [
    "KNOWN_KEYS",
    "NOT_CONFIG",
    "QUEUE_FILE",
    "REGION_PRESETS",
    "AdminConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "ForwardConfig",
    "LimitsConfig",
    "QueueBackend",
    "QueueConfig",
    "RateLimitConfig",
    "Region",
    "SourcesConfig",
    "TlsConfig",
    "Upstream",
    "UpstreamConfig",
    "build",
    "closest_variable",
    "env_name",
    "env_warnings",
    "load",
    "parse_listen",
    "parse_upstream",
    "queue_path",
    "unknown_variables",
]
