"""The counters the request path bumps: bounded slots, histogram buckets, what a read shows,
and the route class each route is counted under."""

from __future__ import annotations

import pytest

from segproxy import counters as rc
from segproxy.counters import LATENCY_BOUNDS, RequestCounters, UpstreamCounters
from segproxy.routes import Kind, Reject, Route, match


def test_each_answer_is_counted_under_its_route_class_and_status() -> None:
    c = RequestCounters()
    c.answered(rc.TRACK, 200, 0.001)
    c.answered(rc.TRACK, 200, 0.002)
    c.answered(rc.TRACK, 503, 0.002)
    c.answered(rc.SCRIPT, 304, 0.0001)
    assert c.read() == {"track": {"200": 2, "503": 1}, "script": {"304": 1}}


@pytest.mark.parametrize("status", [0, 42, 600, 999, -1, 10**6])
def test_a_status_outside_http_s_range_is_other_never_a_new_slot(status: int) -> None:
    c = RequestCounters()
    c.answered(rc.EDGE, status, 0.0)
    c.refused(status)
    assert c.read() == {"edge": {"other": 2}}


def test_the_edge_s_refusals_are_counted_without_a_duration() -> None:
    c = RequestCounters()
    c.refused(413)
    assert c.read() == {"edge": {"413": 1}}
    assert c.read_latency() == {}


def test_latency_buckets_are_cumulative_and_a_bound_belongs_to_its_own_bucket() -> None:
    c = RequestCounters()
    c.answered(rc.TRACK, 200, 0.0005)  # exactly a bound: le="0.0005"
    c.answered(rc.TRACK, 200, 0.0007)
    c.answered(rc.TRACK, 200, 60.0)  # past the last bound: only +Inf
    h = c.read_latency()["track"]
    buckets = h["buckets"]
    assert isinstance(buckets, dict)
    assert list(buckets) == [*(repr(b) for b in LATENCY_BOUNDS), "+Inf"]
    assert buckets["0.0005"] == 1
    assert buckets["0.001"] == 2
    assert buckets["10.0"] == 2
    assert buckets["+Inf"] == 3
    assert h["count"] == 3
    assert h["sum"] == pytest.approx(60.0012)


def test_upstream_answers_errors_and_latency() -> None:
    u = UpstreamCounters()
    u.answered(200, 0.01)
    u.answered(503, 0.02)
    u.failed("timeout")
    u.failed("connect")
    u.failed("something new")  # an unknown kind still counts, under "protocol"
    read = u.read()
    assert read["responses"] == {"200": 1, "503": 1}
    assert read["errors"] == {"connect": 1, "timeout": 1, "protocol": 1}
    latency = read["latency"]
    assert isinstance(latency, dict)
    assert latency["count"] == 2


def test_route_class_constants_name_their_place_in_the_label_list() -> None:
    assert rc.ROUTE_CLASSES[rc.REJECTED] == "rejected"
    assert rc.ROUTE_CLASSES[rc.EDGE] == "edge"
    assert rc.ROUTE_CLASSES[rc.TRACK] == "track"
    assert rc.ROUTE_CLASSES[rc.TELEMETRY] == "telemetry"
    assert rc.ROUTE_CLASSES[rc.OPERATOR] == "operator"
    assert len(set(rc.ROUTE_CLASSES)) == len(rc.ROUTE_CLASSES)


def test_the_sizes_the_compiled_code_is_given_as_literals_match_the_lists() -> None:
    assert len(LATENCY_BOUNDS) + 1 == rc._BUCKETS
    assert len(rc.ROUTE_CLASSES) == rc._ROUTES


@pytest.mark.parametrize(
    ("method", "target", "route_class"),
    [
        ("POST", "/v1/t", rc.TRACK),
        ("POST", "/v1/batch", rc.TRACK),
        ("OPTIONS", "/v1/t", rc.TRACK),
        ("POST", "/v1/m", rc.TELEMETRY),
        ("GET", "/analytics.js/v1/wk_1/analytics.min.js", rc.SCRIPT),
        ("GET", "/v1/projects/wk_1/settings", rc.SETTINGS),
        ("GET", "/analytics-next/bundles/ajs-destination.bundle.abc.js", rc.BUNDLE),
        ("GET", "/next-integrations/actions/amplitude-plugins/dist/standard.js", rc.INTEGRATION),
        ("GET", "/healthz", rc.HEALTH),
        ("GET", "/readyz", rc.OPERATOR),
        ("GET", "/metrics", rc.OPERATOR),
        ("HEAD", "/metrics", rc.OPERATOR),
    ],
)
def test_every_route_knows_its_class(method: str, target: str, route_class: int) -> None:
    route = match(method, target)
    assert isinstance(route, Route)
    assert route.route_class == route_class


def test_prometheus_metrics_are_their_own_kind_apart_from_segment_s_telemetry() -> None:
    metrics = match("GET", "/metrics")
    telemetry = match("POST", "/v1/m")
    assert isinstance(metrics, Route) and isinstance(telemetry, Route)
    assert metrics.kind is Kind.PROMETHEUS
    assert telemetry.kind is Kind.METRICS
    for target in ("/metrics", "/seg/metrics"):
        under_prefix = match("GET", target, "/seg")
        assert isinstance(under_prefix, Route) and under_prefix.kind is Kind.PROMETHEUS
    refused = match("POST", "/metrics")
    assert isinstance(refused, Reject) and refused.status == 405
    assert refused.allow == "GET, HEAD"
