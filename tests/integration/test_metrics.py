"""``/metrics`` scraped from the real proxy and read with prometheus-client's own parser.

Each test makes something happen (traffic, a retry, a dead letter, a refusal) and polls the
scrape until the counter or gauge that should say so does; every wait has a deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import segproxy
from tests.integration.conftest import WRITE_KEY, Client, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.load import Client as KeepAlive
from tests.support.load import track, wait_for
from tests.support.proxy import RunningProxy
from tests.support.rawhttp import exchange

TOKEN = "metrics-operator-token-0123"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(proxy: RunningProxy, port: int | None = None, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    resp = exchange(proxy.host, port or proxy.port, "GET", "/metrics", headers)
    assert resp.status == 200, resp.body
    assert (resp.header("content-type") or "").startswith("text/plain; version=0.0.4")
    return parse(resp.body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(
    proxy: RunningProxy, check: Callable[[Samples], bool], what: str, timeout: float = 15
) -> Samples:
    """Scrape until ``check`` holds (the forwarder works in the background)."""
    last: list[Samples] = []

    def ok() -> bool:
        last[:] = [scrape(proxy)]
        return check(last[0])

    wait_for(ok, timeout=timeout, what=what)
    return last[0]


@pytest.fixture
def durable(fake: FakeSegment, start: StartProxy, tmp_path: Path) -> RunningProxy:
    return start(
        base_config(
            fake,
            queue={"backend": "sqlite", "path": str(tmp_path / "data" / "queue.db")},
            forward={"max_delay": 0.05, "backoff_base": 0.05, "backoff_cap": 0.3},
        )
    )


def post_track(proxy: RunningProxy, *events: dict[str, Any]) -> None:
    client = KeepAlive(proxy.host, proxy.port)
    try:
        for event in events:
            resp = client.post_json("/v1/t", event, WRITE_KEY)
            assert resp.status == 200, resp.body
    finally:
        client.close()


def test_requests_and_accepted_events_are_counted_by_route_class_and_status(
    fake: FakeSegment, durable: RunningProxy
) -> None:
    post_track(durable, track("m-1"), track("m-2"), track("m-3"))
    client = Client(durable)
    assert client.get("/no/such/route").status == 404
    assert client.get("/healthz").status == 200
    s = eventually(
        durable, lambda s: value(s, "segproxy_events_forwarded_total") == 3, "3 forwarded"
    )
    assert value(s, "segproxy_requests_total", route="track", status="200") == 3
    assert value(s, "segproxy_requests_total", route="rejected", status="404") == 1
    assert value(s, "segproxy_requests_total", route="health", status="200") == 1
    assert value(s, "segproxy_events_accepted_total") == 3
    assert value(s, "segproxy_request_duration_seconds_count", route="track") == 3
    assert value(s, "segproxy_request_duration_seconds_bucket", route="track", le="+Inf") == 3
    assert value(s, "segproxy_request_duration_seconds_sum", route="track") > 0
    assert value(s, "segproxy_upstream_responses_total", upstream="api", status="200") >= 1
    assert value(s, "segproxy_queue_events") == 0
    assert value(s, "segproxy_queue_oldest_age_seconds") == 0
    info = [dict(labels) for name, labels in s if name == "segproxy_build_info"]
    assert info == [{"version": segproxy.__version__, "native": info[0]["native"]}]
    assert info[0]["native"] in ("true", "false")
