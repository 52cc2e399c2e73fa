"""Pure rewrites of what the CDN serves, so the browser talks to the proxy by construction.

Settings: ``integrations["Segment.io"].apiHost`` and ``metrics.host`` become
``<public host><prefix>/v1`` and ``integrations["Segment.io"].protocol`` the public scheme
(analytics-next builds ``${protocol}://${apiHost}/<t|p|...>``, PROTOCOL.md). Every other key is
kept as it came. The upstream's own apiHost is returned so the caller can check it against the
configured API upstream (an EU workspace's settings name the EU host).

Script: one line is prepended that tells analytics-next where its CDN is (``analytics._cdn``),
derived in the browser from the script's own URL. analytics-next only infers the CDN from an
``https`` script tag, and falls back to Segment's CDN otherwise; this makes lazy bundles load
through the proxy on http, on a path prefix, and behind any host, with the same bytes for every
visitor (so it is cached and compressed once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

CDN_PRELUDE = (
    b"/* segproxy: load analytics.js bundles through this proxy */"
    b"!function(){try{var s=document.currentScript,a=window.analytics,"
    b"m=s&&/^(.*)\\/analytics\\.js\\/v1\\//.exec(s.src);"
    b"if(a&&m&&!a._cdn)a._cdn=m[1]}catch(e){}}();\n"
)


class RewriteError(ValueError):
    """The upstream settings are not a JSON object: serve them as they are, not rewritten."""


@dataclass(frozen=True, slots=True)
class RewrittenSettings:
    body: bytes
    upstream_api_host: str | None


def rewrite_settings(raw: bytes, api_host: str, protocol: str) -> RewrittenSettings:
    """``api_host`` is ``host[:port]<prefix>/v1`` (no scheme), ``protocol`` http or https."""
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RewriteError(f"settings are not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RewriteError("settings are not a JSON object")
    integrations = doc.get("integrations")
    if not isinstance(integrations, dict):
        integrations = {}
        doc["integrations"] = integrations
    sio = integrations.get("Segment.io")
    if not isinstance(sio, dict):
        sio = {}
        integrations["Segment.io"] = sio
    upstream = sio.get("apiHost")
    sio["apiHost"] = api_host
    sio["protocol"] = protocol
    metrics = doc.get("metrics")
    if not isinstance(metrics, dict):
        metrics = {}
        doc["metrics"] = metrics
    metrics["host"] = api_host
    return RewrittenSettings(
        orjson.dumps(doc), upstream if isinstance(upstream, str) and upstream else None
    )


def rewrite_script(raw: bytes) -> bytes:
    return CDN_PRELUDE + raw
