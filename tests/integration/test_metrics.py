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
from tests.support.fakes import FakeSegment, Mode
from tests.support.load import Client as KeepAlive
from tests.support.load import track, wait_for
from tests.support.proxy import RunningProxy
from tests.support.rawhttp import Conn, exchange

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
    proxy: RunningProxy,
    check: Callable[[Samples], bool],
    what: str,
    timeout: float = 15,
    port: int | None = None,
    token: str | None = None,
) -> Samples:
    """Scrape until ``check`` holds (the forwarder works in the background)."""
    last: list[Samples] = []

    def ok() -> bool:
        last[:] = [scrape(proxy, port, token)]
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


def series(samples: Samples, name: str) -> set[frozenset[tuple[str, str]]]:
    return {labels for n, labels in samples if n == name}


def test_retries_dead_letters_and_the_queue_gauges_move_as_they_happen(
    fake: FakeSegment, durable: RunningProxy
) -> None:
    fake.api_status(503, retry_after="0", times=2)  # two failed deliveries, then accepted
    post_track(durable, track("r-1"))
    s = eventually(
        durable, lambda s: value(s, "segproxy_events_forwarded_total") == 1, "r-1 delivered"
    )
    assert value(s, "segproxy_events_retried_total") == 2
    assert value(s, "segproxy_upstream_responses_total", upstream="api", status="503") == 2
    assert value(s, "segproxy_upstream_responses_total", upstream="api", status="200") == 1
    assert value(s, "segproxy_upstream_duration_seconds_count", upstream="api") == 3

    fake.api_refuse(lambda event: event.get("messageId") == "r-dead", 400)
    post_track(durable, track("r-dead"))
    s = eventually(durable, lambda s: value(s, "segproxy_events_dead_total") == 1, "a dead letter")
    assert value(s, "segproxy_upstream_responses_total", upstream="api", status="400") == 1
    assert value(s, "segproxy_events_accepted_total") == 2
    assert value(s, "segproxy_queue_events") == 0

    fake.api_mode(Mode(kind="hang"))  # Segment stops answering: the queue holds the event
    post_track(durable, track("r-held"))
    s = eventually(
        durable,
        lambda s: (
            value(s, "segproxy_queue_events") == 1
            and value(s, "segproxy_queue_oldest_age_seconds") > 0
        ),
        "a queued event, getting older",
    )
    assert value(s, "segproxy_queue_bytes") > 0
    older = eventually(
        durable,
        lambda o: (
            value(o, "segproxy_queue_oldest_age_seconds")
            > value(s, "segproxy_queue_oldest_age_seconds")
        ),
        "the oldest event's age to grow",
    )
    assert value(older, "segproxy_queue_events") == 1
    fake.api_ok()
    eventually(
        durable,
        lambda s: (
            value(s, "segproxy_queue_events") == 0
            and value(s, "segproxy_queue_oldest_age_seconds") == 0
        ),
        "the queue to empty once Segment answers again",
        timeout=40,
    )


def test_metrics_live_on_the_admin_listener_behind_the_token(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, admin={"listen": "127.0.0.1:0", "token": TOKEN}))
    port = int(proxy.logged(r"segproxy admin listening on http://127\.0\.0\.1:(\d+)").group(1))
    assert Client(proxy).get("/metrics").status == 404  # not on the public listener
    refused = exchange(proxy.host, port, "GET", "/metrics")
    assert refused.status == 401
    assert refused.json()["code"] == "unauthorized"
    assert refused.header("www-authenticate") == "Bearer"
    wrong = exchange(proxy.host, port, "GET", "/metrics", {"Authorization": "Bearer nope-nope"})
    assert wrong.status == 401
    assert exchange(proxy.host, port, "POST", "/v1/t", body=b"{}").status == 404
    s = scrape(proxy, port, TOKEN)
    assert value(s, "segproxy_requests_total", route="rejected", status="404") == 1
    assert value(s, "segproxy_requests_total", route="operator", status="401") == 2
    # (asked on the public listener: an operator request, answered 404 there)
    assert value(s, "segproxy_requests_total", route="operator", status="404") == 1
    s = scrape(proxy, port, TOKEN)
    assert value(s, "segproxy_requests_total", route="operator", status="200") == 1
    assert value(s, "process_resident_memory_bytes") > 0  # prometheus-client's, for free


def test_metrics_on_the_main_listener_need_the_token_and_answer_under_the_prefix(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, prefix="/seg", admin={"token": TOKEN}))
    client = Client(proxy)
    assert client.get("/metrics").status == 401
    assert client.get("/seg/metrics").status == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/seg/metrics", headers).status == 200
    assert client.request("POST", "/metrics", headers=headers).status == 405
    s = scrape(proxy, token=TOKEN)
    assert value(s, "segproxy_requests_total", route="operator", status="200") == 1


def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(proxy: RunningProxy) -> None:
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    resp = Client(proxy).get("/metrics", {"Accept": accept})
    assert resp.status == 200
    assert (resp.header("content-type") or "").startswith("application/openmetrics-text")
    assert resp.body.rstrip().endswith(b"# EOF")


def test_hostile_paths_and_methods_move_counters_but_never_add_series(
    proxy: RunningProxy,
) -> None:
    client = Client(proxy)
    assert client.get("/nothing-here").status == 404
    before = scrape(proxy)
    hostile = [
        *(f"/{i}/{'x' * i}" for i in range(1, 40)),
        "/v1/../../etc/passwd",
        "/%2e%2e/secret",
        "/analytics.js/v1/not a key/analytics.min.js",
        "/v1/zzz",
        "/metrics/../healthz",
    ]
    for path in hostile:
        assert client.get(path).status in (400, 404)
    for method in ("DELETE", "PUT", "PATCH", "BREW"):
        assert client.request(method, "/v1/t").status in (400, 405, 501)
    after = scrape(proxy)
    classes = {"rejected", "edge", "health", "operator", "track"}
    for labels in series(after, "segproxy_requests_total"):
        route, status = dict(labels)["route"], dict(labels)["status"]
        assert route in classes
        assert status.isdigit() or status == "other"
    added = series(after, "segproxy_requests_total") - series(before, "segproxy_requests_total")
    assert len(added) <= 4  # a few statuses (400, 405, ...), never one per path
    assert value(after, "segproxy_requests_total", route="rejected", status="404") > value(
        before, "segproxy_requests_total", route="rejected", status="404"
    )


def test_cdn_cache_hits_and_misses_are_counted(fake: FakeSegment, proxy: RunningProxy) -> None:
    script = f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js"
    client = Client(proxy)
    assert client.get(script).status == 200  # fetched
    assert client.get(script).status == 200  # from the cache
    s = scrape(proxy)
    assert value(s, "segproxy_cdn_cache_lookups_total", result="miss") == 1
    assert value(s, "segproxy_cdn_cache_lookups_total", result="hit") == 1
    assert value(s, "segproxy_requests_total", route="script", status="200") == 2
    assert value(s, "segproxy_upstream_responses_total", upstream="cdn", status="200") == 1


def test_rate_limit_refusals_and_refused_connections_are_counted(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(
        base_config(
            fake,
            rate_limit={"per_ip": 0.01, "per_ip_burst": 1.0},
            limits={"max_connections": 1},
            admin={"listen": "127.0.0.1:0"},
        )
    )
    port = int(proxy.logged(r"segproxy admin listening on http://127\.0\.0\.1:(\d+)").group(1))
    client = Client(proxy)
    script = f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js"
    assert client.get(script).status == 200
    assert client.get(script).status == 429
    with Conn(proxy.host, proxy.port):  # holds the one connection allowed
        wait_for(
            lambda: client.get("/healthz").status == 503, timeout=10, what="a refused connection"
        )
    s = scrape(proxy, port)
    assert value(s, "segproxy_rate_limited_total", limit="ip") == 1
    assert value(s, "segproxy_rate_limited_total", limit="write_key") == 0
    assert value(s, "segproxy_connections_refused_total") >= 1
    assert value(s, "segproxy_requests_total", route="script", status="429") == 1


def test_passthrough_counts_events_segment_accepted(fake: FakeSegment, proxy: RunningProxy) -> None:
    post_track(proxy, track("p-1"), track("p-2"))
    s = scrape(proxy)
    assert value(s, "segproxy_events_accepted_total") == 2
    assert series(s, "segproxy_queue_events") == set()  # no queue, no queue gauges
