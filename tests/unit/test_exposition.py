"""The snapshot as Prometheus metric families: names by the convention, parsed back by
prometheus-client's own parser, every family documented in docs/metrics.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from segproxy import counters as rc
from segproxy.counters import RequestCounters, UpstreamCounters
from segproxy.exposition import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def snapshot(queue: bool = True, tls: bool = True) -> dict[str, Any]:
    requests = RequestCounters()
    requests.answered(rc.TRACK, 200, 0.001)
    requests.answered(rc.SETTINGS, 304, 0.0002)
    upstream = UpstreamCounters()
    upstream.answered(200, 0.03)
    upstream.failed("timeout")
    return {
        "time": 1.0,
        "uptime_seconds": 1.0,
        "version": "9.9.9",
        "native": True,
        "ready": True,
        "requests": requests.read(),
        "request_duration_seconds": requests.read_latency(),
        "connections_refused": 3,
        "rate_limited": {"ip": 1, "write_key": 2},
        "events": {"accepted": 10, "forwarded": 7, "retried": 2, "dead": 1},
        "queue": {
            "events": 2,
            "bytes": 300,
            "oldest_age_seconds": 1.5,
            "max_events": 100,
            "max_bytes": 1000,
        }
        if queue
        else None,
        "upstream": {"cdn": UpstreamCounters().read(), "api": upstream.read()},
        "cdn_cache": {"hit": 5, "miss": 1, "stale": 0},
        "tls_cert_expiry_seconds": 86400.0 if tls else None,
    }


def scraped(snap: dict[str, Any]) -> dict[str, Any]:
    body, content_type = render(snap, "")
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == name and s.labels == labels:
            return float(s.value)
    raise AssertionError(f"no {name}{labels}")


def test_the_snapshot_s_numbers_come_back_from_the_parser() -> None:
    f = scraped(snapshot())
    assert sample(f, "segproxy_requests", "segproxy_requests_total", route="track", status="200")
    assert sample(f, "segproxy_events_accepted", "segproxy_events_accepted_total") == 10
    assert sample(f, "segproxy_events_dead", "segproxy_events_dead_total") == 1
    assert (
        sample(f, "segproxy_queue_oldest_age_seconds", "segproxy_queue_oldest_age_seconds") == 1.5
    )
    assert (
        sample(
            f,
            "segproxy_upstream_errors",
            "segproxy_upstream_errors_total",
            upstream="api",
            kind="timeout",
        )
        == 1
    )
    assert (
        sample(
            f,
            "segproxy_request_duration_seconds",
            "segproxy_request_duration_seconds_bucket",
            route="track",
            le="0.001",
        )
        == 1
    )
    assert sample(f, "segproxy_build_info", "segproxy_build_info", version="9.9.9", native="true")
    assert sample(f, "segproxy_rate_limited", "segproxy_rate_limited_total", limit="write_key") == 2


def test_without_a_queue_or_tls_their_gauges_are_absent_not_zero() -> None:
    f = scraped(snapshot(queue=False, tls=False))
    assert not [name for name in f if name.startswith("segproxy_queue_")]
    assert "segproxy_tls_certificate_expiry_seconds" not in f


def test_names_follow_the_convention() -> None:
    for name, family in scraped(snapshot()).items():
        if not name.startswith("segproxy_"):
            assert name.startswith(("process_", "python_")), name  # prometheus-client's
            continue
        assert re.fullmatch(r"segproxy_[a-z0-9_]+", name)
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "gauge" and not name.endswith("_info") and name != "segproxy_ready":
            assert name.endswith(("_seconds", "_bytes", "_events")), name


def test_every_metric_is_in_docs_metrics_md() -> None:
    doc = DOC.read_text()
    for name, family in scraped(snapshot()).items():
        if name.startswith("segproxy_"):
            shown = name + "_total" if family.type == "counter" else name
            assert f"`{shown}`" in doc, f"{shown} is missing from docs/metrics.md"


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text;version=abc",
        "text/plain;version=zzz",
        "text/plain;version=1.0.0;escaping=nonsense",
        "*/*",
        "\x00\xff",
    ],
)
def test_any_accept_header_gets_an_answer_never_an_error(accept: str) -> None:
    body, content_type = render(snapshot(), accept)
    assert content_type.startswith(("text/plain", "application/openmetrics-text"))
    assert b"segproxy_requests_total" in body
