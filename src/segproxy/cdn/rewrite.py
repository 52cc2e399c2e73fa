"""Pure rewrites of what the CDN serves, so the browser talks to the proxy by construction.

Settings: ``integrations["Segment.io"].apiHost`` and ``metrics.host`` become
``<public host><prefix>/v1`` and ``integrations["Segment.io"].protocol`` the public scheme
(analytics-next builds ``${protocol}://${apiHost}/<t|p|...>``). Every other key is
kept as it came. The upstream's own apiHost is returned so the caller can check it against the
configured API upstream (an EU workspace's settings name the EU host).

Script: one line is prepended that tells analytics-next where its CDN is (``analytics._cdn``),
derived in the browser from the script's own URL. analytics-next only infers the CDN from an
``https`` script tag, and falls back to Segment's CDN otherwise; this makes lazy bundles load
through the proxy on http, on a path prefix, and behind any host, with the same bytes for every
visitor (so it is cached and compressed once).
"""

from __future__ import annotations

import re
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
class SettingsTemplate:
    """Settings rewritten once per fill, with the three values that name the proxy left open.

    Every public origin (each host a visitor may use) needs its own rendering; with the JSON
    parsed and rewritten once, a rendering is a join of bytes, so a new ``Host`` value costs a
    copy of the settings, not a parse and a re-encode (issue 11, item 7).
    """

    parts: tuple[bytes, ...]  # the JSON text around the open values, in order
    slots: tuple[int, ...]  # which value fills each gap: 0 the API host, 1 the protocol
    upstream_api_host: str | None

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)

    def render(self, api_host: str, protocol: str) -> bytes:
        """``api_host`` is ``host[:port]<prefix>/v1`` (no scheme), ``protocol`` http or https."""
        values = (orjson.dumps(api_host), orjson.dumps(protocol))  # JSON strings, escaped
        out = [self.parts[0]]
        for slot, part in zip(self.slots, self.parts[1:], strict=True):
            out.append(values[slot])
            out.append(part)
        return b"".join(out)


def settings_template(raw: bytes) -> SettingsTemplate:
    """Rewrite ``raw`` with placeholders in the values that name the proxy, then cut the JSON
    text at them. A placeholder is a string the settings do not already contain, so the only
    places it appears are the ones put there."""
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RewriteError(f"settings are not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RewriteError("settings are not a JSON object")
    text = orjson.dumps(doc)
    n = 0
    while b"segproxy-slot-%d-" % n in text:
        n += 1
    marks = (f"segproxy-slot-{n}-api-host", f"segproxy-slot-{n}-protocol")
    upstream = _point_at_proxy(doc, marks[0], marks[1])
    # orjson writes these ASCII strings verbatim: split the text at each one, quotes included.
    pattern = re.compile(b'"(' + marks[0].encode() + b"|" + marks[1].encode() + b')"')
    pieces = pattern.split(orjson.dumps(doc))
    return SettingsTemplate(
        parts=tuple(pieces[0::2]),
        slots=tuple(0 if p == marks[0].encode() else 1 for p in pieces[1::2]),
        upstream_api_host=upstream,
    )


def _point_at_proxy(doc: dict[str, Any], api_host: str, protocol: str) -> str | None:
    """Set the three values in ``doc``; return the upstream's own apiHost, if it named one."""
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
    return upstream if isinstance(upstream, str) and upstream else None


def rewrite_script(raw: bytes) -> bytes:
    return CDN_PRELUDE + raw
