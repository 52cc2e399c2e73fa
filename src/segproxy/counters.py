"""The proxy's counters: plain integers the request path bumps, read only when someone looks.

Every number ``/metrics`` and the operator's dashboard show is either one of these counters or
a gauge read from its owner at that moment (the queue's depth, a certificate's expiry). The
request path pays a few integer increments on attributes and list slots of objects made once:
no locks (one event loop runs the proxy: nothing else writes them), no label lookups, no
allocation beyond the integers themselves. Turning them into labelled series is
``exposition.py``'s work, at scrape time.

Bounded by construction: a request's route class is one of :data:`ROUTE_CLASSES` (fixed
here, never taken from a path), and a status is an HTTP status code from 100 to 599 or
``"other"``; a hostile request can move a counter but never add a series.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

# What a request was, as the proxy routed it: a small fixed set (the `route` label).
REJECTED: Final = 0  # refused by routing: no such route, bad path, method not allowed
EDGE: Final = 1  # refused by the edge before routing: malformed, too large, too slow
SCRIPT: Final = 2  # analytics.js from the CDN
SETTINGS: Final = 3  # a source's settings from the CDN
BUNDLE: Final = 4  # analytics-next bundles from the CDN
INTEGRATION: Final = 5  # next-integrations from the CDN
TRACK: Final = 6  # the Tracking API: /v1/t, /v1/batch, ...
TELEMETRY: Final = 7  # analytics-next's own telemetry, /v1/m
HEALTH: Final = 8  # /healthz
OPERATOR: Final = 9  # /readyz, /metrics and the other operator endpoints

# (Plain module constants, not Final: compiled, a Final tuple read by the module's own code at
# import raised NameError, "value for final name was not set". The hot path reads the bounds
# from an attribute of its own object, not from the module.)
ROUTE_CLASSES: tuple[str, ...] = (
    "rejected",
    "edge",
    "script",
    "settings",
    "bundle",
    "integration",
    "track",
    "telemetry",
    "health",
    "operator",
)

# Request and upstream latency buckets, in seconds: the proxy answers in well under a
# millisecond from memory, a few ms after a commit, tens of ms after a CDN fetch.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BUCKETS: Final = 15  # len(LATENCY_BOUNDS) and +Inf (tests/unit/test_counters.py holds it)
_STATUSES: Final = 600  # a status's slot is the status itself; 0 is "other"
_ROUTES: Final = 10  # len(ROUTE_CLASSES)

# Why an upstream exchange failed without an answer (upstream.UpstreamError.kind).
UPSTREAM_ERRORS: tuple[str, ...] = ("connect", "timeout", "protocol")


def status_label(slot: int) -> str:
    return str(slot) if slot else "other"


def bucket_labels() -> list[str]:
    """The ``le`` of each bucket, as Prometheus writes them, +Inf last."""
    return [repr(b) for b in LATENCY_BOUNDS] + ["+Inf"]


class Latency:
    """One histogram per route class (or upstream): counts per bucket (not cumulative: one
    increment per observation), and the sum of the observed seconds."""

    __slots__ = ("bounds", "counts", "sums")

    def __init__(self, series: int) -> None:
        self.bounds = LATENCY_BOUNDS
        self.counts = [0] * (series * _BUCKETS)
        self.sums = [0.0] * series

    def observe(self, series: int, seconds: float) -> None:
        self.counts[series * _BUCKETS + bisect_left(self.bounds, seconds)] += 1
        self.sums[series] += seconds

    def read(self, series: int) -> dict[str, object]:
        """``{"buckets": {le: cumulative count}, "count": n, "sum": seconds}``."""
        first = series * _BUCKETS
        running = 0
        buckets: dict[str, int] = {}
        for le, n in zip(bucket_labels(), self.counts[first : first + _BUCKETS], strict=True):
            running += n
            buckets[le] = running
        return {"buckets": buckets, "count": running, "sum": self.sums[series]}


def _by_status(counts: list[int], first: int) -> dict[str, int]:
    return {status_label(s): n for s, n in enumerate(counts[first : first + _STATUSES]) if n}


class RequestCounters:
    """What the edge answered: per route class and status, with the time each answer took
    (from the first byte of the request to its answer being written). Shared by the public
    and the operator listener."""

    __slots__ = ("connections_refused", "latency", "statuses")

    def __init__(self) -> None:
        self.statuses = [0] * (_ROUTES * _STATUSES)
        self.latency = Latency(_ROUTES)
        # Connections answered 503 at accept: over limits.max_connections.
        self.connections_refused = 0

    def answered(self, route_class: int, status: int, seconds: float) -> None:
        """(hot path: once per request) Two list increments, one bisect, one float add."""
        if status < 100 or status >= _STATUSES:
            status = 0
        self.statuses[route_class * _STATUSES + status] += 1
        self.latency.observe(route_class, seconds)

    def refused(self, status: int) -> None:
        """A request the edge refused before routing (its time is not observed: the edge
        may not have read its start)."""
        if status < 100 or status >= _STATUSES:
            status = 0
        self.statuses[EDGE * _STATUSES + status] += 1

    def read(self) -> dict[str, dict[str, int]]:
        """``{route class: {status: count}}``, classes and statuses seen only."""
        out = {}
        for i, name in enumerate(ROUTE_CLASSES):
            seen = _by_status(self.statuses, i * _STATUSES)
            if seen:
                out[name] = seen
        return out

    def read_latency(self) -> dict[str, dict[str, object]]:
        return {
            name: self.latency.read(i)
            for i, name in enumerate(ROUTE_CLASSES)
            if any(self.latency.counts[i * _BUCKETS : (i + 1) * _BUCKETS])
        }


class UpstreamCounters:
    """One upstream origin's exchanges: answers per status, failures per kind, and the time
    from the request written on a connection to its whole answer (answers only)."""

    __slots__ = ("errors", "latency", "statuses")

    def __init__(self) -> None:
        self.statuses = [0] * _STATUSES
        self.errors = [0] * len(UPSTREAM_ERRORS)
        self.latency = Latency(1)

    def answered(self, status: int, seconds: float) -> None:
        if status < 100 or status >= _STATUSES:
            status = 0
        self.statuses[status] += 1
        self.latency.observe(0, seconds)

    def failed(self, kind: str) -> None:
        self.errors[UPSTREAM_ERRORS.index(kind) if kind in UPSTREAM_ERRORS else 2] += 1

    def read(self) -> dict[str, object]:
        return {
            "responses": _by_status(self.statuses, 0),
            "errors": dict(zip(UPSTREAM_ERRORS, self.errors, strict=True)),
            "latency": self.latency.read(0),
        }
