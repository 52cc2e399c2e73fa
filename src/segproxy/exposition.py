"""``/metrics``: the app's snapshot (``App.snapshot``) as Prometheus metric families.

The request path only bumps plain counters (``counters.py``); prometheus-client's own
``Counter``/``Histogram`` take a lock on every ``inc``, so none is used. Instead one custom
collector turns the snapshot taken for this scrape into metric families, and
prometheus-client writes them in the format the scraper asked for (its ``Accept`` header:
Prometheus's text format, or OpenMetrics). Its process collector adds the process's CPU,
memory, file descriptors and start time. docs/metrics.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry


def _counter(name: str, doc: str, labels: list[str], values: Mapping[str, Any]) -> Metric:
    """One counter family from ``{label value: count}`` (one label) or a plain count."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for value, count in values.items():
        family.add_metric([value], count)
    return family


def _histogram(name: str, doc: str, label: str, series: Mapping[str, Any]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, h in series.items():
        family.add_metric([value], list(h["buckets"].items()), h["sum"])
    return family


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


def families(snap: Mapping[str, Any]) -> Iterator[Metric]:
    """The snapshot's numbers as metric families, named by docs/metrics.md's convention."""
    info = GaugeMetricFamily(
        "segproxy_build_info",
        "The running segproxy: its version, and whether it runs compiled with mypyc",
        labels=["version", "native"],
    )
    info.add_metric([snap["version"], "true" if snap["native"] else "false"], 1.0)
    yield info
    yield from _requests(snap)
    events = snap["events"]
    for what, doc in (
        ("accepted", "Events accepted: stored in the queue (passthrough: relayed, 2xx)"),
        ("forwarded", "Events delivered to Segment (answered 2xx)"),
        ("retried", "Event deliveries that failed and will be retried"),
        ("dead", "Events Segment refused for good, kept as dead letters"),
    ):
        yield CounterMetricFamily(f"segproxy_events_{what}", doc, value=events[what])
    yield from _queue(snap["queue"])
    yield from _upstream(snap["upstream"])
    yield _counter(
        "segproxy_cdn_cache_lookups",
        "CDN files served: fresh from the cache (hit), fetched (miss) or stale",
        ["result"],
        snap["cdn_cache"],
    )
    yield _counter(
        "segproxy_rate_limited",
        "Requests refused 429 by a rate limit, per limit (ip, write_key)",
        ["limit"],
        snap["rate_limited"],
    )
    yield CounterMetricFamily(
        "segproxy_connections_refused",
        "Connections answered 503 at once: over limits.max_connections",
        value=snap["connections_refused"],
    )
    yield _gauge("segproxy_ready", "1 when /readyz would answer ready", float(snap["ready"]))
    expiry = snap["tls_cert_expiry_seconds"]
    if expiry is not None:
        yield _gauge(
            "segproxy_tls_certificate_expiry_seconds",
            "Seconds until the configured TLS certificate expires (negative: expired)",
            expiry,
        )


def _requests(snap: Mapping[str, Any]) -> Iterator[Metric]:
    family = CounterMetricFamily(
        "segproxy_requests",
        "Requests answered, per route class and HTTP status",
        labels=["route", "status"],
    )
    for route, statuses in snap["requests"].items():
        for status, count in statuses.items():
            family.add_metric([route, status], count)
    yield family
    yield _histogram(
        "segproxy_request_duration_seconds",
        "From a request's first byte to its answer being written, per route class",
        "route",
        snap["request_duration_seconds"],
    )


def _queue(queue: Mapping[str, Any] | None) -> Iterator[Metric]:
    if queue is None:  # passthrough: no queue
        return
    yield _gauge("segproxy_queue_events", "Events queued for delivery", queue["events"])
    yield _gauge(
        "segproxy_queue_bytes", "Bytes the queued events count against the cap", queue["bytes"]
    )
    yield _gauge(
        "segproxy_queue_oldest_age_seconds",
        "Age of the oldest queued event (0 when the queue is empty)",
        queue["oldest_age_seconds"],
    )
    yield _gauge("segproxy_queue_max_events", "queue.max_rows", queue["max_events"])
    yield _gauge("segproxy_queue_max_bytes", "queue.max_bytes", queue["max_bytes"])


def _upstream(upstream: Mapping[str, Any]) -> Iterator[Metric]:
    answers = CounterMetricFamily(
        "segproxy_upstream_responses",
        "Answers from an upstream (cdn, api), per HTTP status",
        labels=["upstream", "status"],
    )
    errors = CounterMetricFamily(
        "segproxy_upstream_errors",
        "Upstream exchanges that got no answer, per upstream and why (connect, timeout, protocol)",
        labels=["upstream", "kind"],
    )
    latency = HistogramMetricFamily(
        "segproxy_upstream_duration_seconds",
        "From a request written to an upstream to its whole answer, per upstream",
        labels=["upstream"],
    )
    for name, up in upstream.items():
        for status, count in up["responses"].items():
            answers.add_metric([name, status], count)
        for kind, count in up["errors"].items():
            errors.add_metric([name, kind], count)
        h = up["latency"]
        latency.add_metric([name], list(h["buckets"].items()), h["sum"])
    yield answers
    yield errors
    yield latency


class _SnapshotCollector(Collector):
    """Yields the families of the snapshot set just before the registry is rendered (on the
    event loop: no other scrape can run in between)."""

    def __init__(self) -> None:
        self.snap: Mapping[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.snap is not None:
            yield from families(self.snap)


_COLLECTOR = _SnapshotCollector()
_REGISTRY = CollectorRegistry(auto_describe=False)
_REGISTRY.register(_COLLECTOR)
ProcessCollector(registry=_REGISTRY)
PlatformCollector(registry=_REGISTRY)


def render(snap: Mapping[str, Any], accept: str) -> tuple[bytes, str]:
    """The exposition body and its content type, in the format ``accept`` asks for."""
    try:
        encoder, content_type = choose_encoder(accept)
    except (TypeError, ValueError):  # a version it cannot compare ("version=abc"): the classic
        encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
    _COLLECTOR.snap = snap
    try:
        return encoder(_REGISTRY), content_type
    finally:
        _COLLECTOR.snap = None
