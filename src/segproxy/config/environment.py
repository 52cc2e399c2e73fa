"""The ``SEGPROXY_*`` environment: which variable sets which key, and warnings for the others.

The environment name of a key is ``SEGPROXY_`` + its dotted path in upper case with dots as
underscores (``upstream.api`` -> ``SEGPROXY_UPSTREAM_API``). A ``SEGPROXY_*`` variable that names
no key is only a warning (:func:`env_warnings`): Kubernetes defines ``SEGPROXY_PORT``,
``SEGPROXY_SERVICE_HOST``... in every pod of a namespace with a Service named ``segproxy``, and a
proxy that refused to start there would crash-loop.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping

from segproxy.config.schema import KNOWN_KEYS, LIST_KEYS
from segproxy.config.values import ConfigError, split_list


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
            key = by_name[name]
            out[key] = split_list(value) if key in LIST_KEYS else value
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
