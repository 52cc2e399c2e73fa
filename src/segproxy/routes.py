"""Pure routing: (method, request target) -> what to do, or why not.

Only the CDN and Tracking API paths that real Segment clients use are routed; everything else
is a 404 (docs/threat-model.md, "Routing"). The target is never decoded: a path with ``%``, ``\\``,
``//`` or a ``.``/``..`` segment is refused outright, so no spelling of a path can reach a file
or host other than the one its route names. Upstream paths are rebuilt from validated parts,
not copied from the request. The query string is dropped (never forwarded, never a cache key).
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

from segproxy import counters as rc


class Kind(enum.Enum):
    HEALTHZ = "healthz"
    READYZ = "readyz"
    SCRIPT = "script"
    SETTINGS = "settings"
    BUNDLE = "bundle"
    INTEGRATION = "integration"
    TRACK = "track"
    METRICS = "metrics"  # analytics-next's telemetry, /v1/m (relayed to Segment)
    PROMETHEUS = "prometheus"  # the proxy's own metrics for Prometheus, /metrics
    DASHBOARD = "dashboard"  # the operator's live dashboard: its page, files and data


CDN_KINDS = frozenset({Kind.SCRIPT, Kind.SETTINGS, Kind.BUNDLE, Kind.INTEGRATION})

# Single-event endpoints and the event type each implies; "b", "batch" and "import" carry a batch.
API_ENDPOINTS: dict[str, str | None] = {
    "t": "track",
    "p": "page",
    "i": "identify",
    "g": "group",
    "a": "alias",
    "s": "screen",
    "track": "track",
    "page": "page",
    "identify": "identify",
    "group": "group",
    "alias": "alias",
    "screen": "screen",
    "b": None,
    "batch": None,
    "import": None,
}

_KEY = r"[A-Za-z0-9_-]{1,128}"
_SEG = r"[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,127}"
_SCRIPT_RE = re.compile(rf"/analytics\.js/v1/({_KEY})/(analytics\.min\.js|analytics\.classic\.js)")
_SETTINGS_RE = re.compile(rf"(?:/v1)?/projects/({_KEY})/settings")
_BUNDLE_RE = re.compile(
    r"/analytics-next/bundles/([A-Za-z0-9_-][A-Za-z0-9._-]{0,200}\.js(?:\.map)?)"
)
_INTEGRATION_RE = re.compile(rf"/next-integrations(?:/{_SEG}){{1,6}}\.js(?:\.gz)?")
_API_RE = re.compile(r"/v1/([a-z]{1,8})")
_PRINTABLE = re.compile(r"[\x21-\x7e]*")
_BAD_SEGMENT = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    upstream_path: str = ""
    write_key: str | None = None
    endpoint: str = ""  # API: the endpoint name ("t", "batch", ...)
    route_class: int = rc.REJECTED  # what the counters call it (counters.ROUTE_CLASSES)


@dataclass(frozen=True, slots=True)
class Reject:
    status: int
    code: str
    message: str
    allow: str = ""


_HEALTHZ = Route(Kind.HEALTHZ, route_class=rc.HEALTH)
_READYZ = Route(Kind.READYZ, route_class=rc.OPERATOR)
_PROMETHEUS = Route(Kind.PROMETHEUS, route_class=rc.OPERATOR)


def _reject_target(target: str) -> Reject | None:
    if not target.startswith("/"):
        if target == "*":
            return Reject(400, "bad_target", "asterisk-form request targets are not served")
        return Reject(
            400, "bad_target", "only origin-form request targets (/path) are served, not URLs"
        )
    if "%" in target:
        return Reject(400, "bad_path", "percent-encoded paths are not accepted")
    if "\\" in target or "//" in target or _BAD_SEGMENT.search(target):
        return Reject(400, "bad_path", "paths with '.', '..', '//' or '\\' segments are refused")
    if not _PRINTABLE.fullmatch(target):
        return Reject(400, "bad_path", "the path has characters that are not allowed")
    return None


def split_target(raw: str) -> tuple[str, Reject | None]:
    """Return (path, reject) for a raw request target; the query and fragment are dropped."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    return path, _reject_target(path if raw.startswith("/") else raw)


@functools.cache
def _api_table(prefix: str) -> dict[str, Route]:
    """Exact API targets -> routes: the hot path is one dict lookup."""
    table = {}
    for endpoint in (*API_ENDPOINTS, "m"):
        kind, group = (Kind.METRICS, rc.TELEMETRY) if endpoint == "m" else (Kind.TRACK, rc.TRACK)
        table[f"{prefix}/v1/{endpoint}"] = Route(kind, f"/v1/{endpoint}", None, endpoint, group)
    return table


def match(method: str, raw_target: str, prefix: str = "") -> Route | Reject:
    """Route one request. ``prefix`` is where the proxy is mounted ("" or like "/seg")."""
    fast = _api_table(prefix).get(raw_target)
    if fast is not None and method == "POST":
        return fast
    if method == "CONNECT":
        return Reject(405, "method_not_allowed", "CONNECT is not supported: this is not a proxy")
    path, bad = split_target(raw_target)
    if bad is not None:
        return bad
    if path in ("/healthz", prefix + "/healthz"):
        return _methods(method, _HEALTHZ, ("GET", "HEAD"))
    if path in ("/readyz", prefix + "/readyz"):
        return _methods(method, _READYZ, ("GET", "HEAD"))
    if path in ("/metrics", prefix + "/metrics"):
        return _methods(method, _PROMETHEUS, ("GET", "HEAD"))
    if dash := _dashboard_path(path, prefix):
        route = Route(Kind.DASHBOARD, dash, route_class=rc.OPERATOR)
        return _methods(method, route, ("GET", "HEAD", "POST"))
    if prefix:
        if not path.startswith(prefix + "/"):
            return _not_found(path)
        path = path[len(prefix) :]

    if m := _API_RE.fullmatch(path):
        endpoint = m.group(1)
        if endpoint == "m":
            route = Route(Kind.METRICS, "/v1/m", None, "m", rc.TELEMETRY)
            return _methods(method, route, ("POST", "OPTIONS"))
        if endpoint in API_ENDPOINTS:
            route = Route(Kind.TRACK, f"/v1/{endpoint}", None, endpoint, rc.TRACK)
            return _methods(method, route, ("POST", "OPTIONS"))
        return _not_found(path)
    if m := _SCRIPT_RE.fullmatch(path):
        path = f"/analytics.js/v1/{m.group(1)}/{m.group(2)}"
        route = Route(Kind.SCRIPT, path, m.group(1), route_class=rc.SCRIPT)
        return _methods(method, route, ("GET", "HEAD", "OPTIONS"))
    if m := _SETTINGS_RE.fullmatch(path):
        path = f"/v1/projects/{m.group(1)}/settings"
        route = Route(Kind.SETTINGS, path, m.group(1), route_class=rc.SETTINGS)
        return _methods(method, route, ("GET", "HEAD", "OPTIONS"))
    if m := _BUNDLE_RE.fullmatch(path):
        path = f"/analytics-next/bundles/{m.group(1)}"
        route = Route(Kind.BUNDLE, path, route_class=rc.BUNDLE)
        return _methods(method, route, ("GET", "HEAD", "OPTIONS"))
    if _INTEGRATION_RE.fullmatch(path):
        route = Route(Kind.INTEGRATION, path, route_class=rc.INTEGRATION)
        return _methods(method, route, ("GET", "HEAD", "OPTIONS"))
    return _not_found(path)


def _dashboard_path(path: str, prefix: str) -> str:
    """The dashboard's own path ("/dashboard/...") if ``path`` names it (also under the
    prefix, like /healthz), else ""."""
    if prefix and path.startswith(prefix + "/dashboard"):
        path = path[len(prefix) :]
    if path == "/dashboard" or path.startswith("/dashboard/"):
        return path
    return ""


def _methods(method: str, route: Route, allowed: tuple[str, ...]) -> Route | Reject:
    if method in allowed:
        return route
    return Reject(
        405,
        "method_not_allowed",
        f"{method} is not allowed here; use {', '.join(allowed)}",
        allow=", ".join(allowed),
    )


def _not_found(path: str) -> Reject:
    return Reject(404, "not_found", "no such route: segproxy serves only Segment CDN and API paths")
