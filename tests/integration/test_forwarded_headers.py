"""Forwarded headers through the real proxy: a visitor behind a trusted load balancer cannot
choose the host the settings name, nor the address its events carry.

The balancer here is the test itself on 127.0.0.1 (listed in ``trusted_proxies``), writing the
headers as an appending balancer does (Envoy, HAProxy ``add-header``): the visitor's values
first, the balancer's last.
"""

from __future__ import annotations

import json
from typing import Any

from tests.integration.conftest import WRITE_KEY, Client, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.proxy import RunningProxy

SETTINGS = f"/v1/projects/{WRITE_KEY}/settings"
PUBLIC = "analytics.example.com"
EVENT = json.dumps({"writeKey": "k", "type": "track", "event": "e", "messageId": "m"}).encode()


def behind_balancer(fake: FakeSegment, start: StartProxy, **extra: Any) -> RunningProxy:
    return start(base_config(fake, trusted_proxies=["127.0.0.1"], **extra))


def segment_io(proxy: RunningProxy, headers: dict[str, str]) -> dict[str, Any]:
    resp = Client(proxy).get(SETTINGS, headers, host_header=PUBLIC)
    assert resp.status == 200, resp.body
    assert b"evil.example" not in resp.body
    sio: dict[str, Any] = resp.json()["integrations"]["Segment.io"]
    return sio


def test_a_forwarded_host_the_visitor_put_ahead_of_the_balancers_never_names_the_api_host(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = behind_balancer(fake, start)
    sio = segment_io(
        proxy,
        {
            "X-Forwarded-Host": f"evil.example, {PUBLIC}",
            "X-Forwarded-Proto": "http, https",
            "X-Forwarded-For": "198.51.100.66, 203.0.113.7",
        },
    )
    assert sio["apiHost"] == f"{PUBLIC}/v1"
    assert sio["protocol"] == "https"


def test_a_forwarded_element_the_visitor_put_ahead_of_the_balancers_is_ignored(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = behind_balancer(fake, start)
    # Two header lines (the dict keys differ in case): the visitor's, then the balancer's.
    sio = segment_io(
        proxy,
        {
            "Forwarded": 'for=198.51.100.66;host=evil.example;proto=http, for="_hidden"',
            "forwarded": f'for="[2001:db8::7]:4711";host="{PUBLIC}:443";proto=https',
        },
    )
    assert sio["apiHost"] == f"{PUBLIC}/v1"
    assert sio["protocol"] == "https"


def test_a_forwarded_header_the_visitor_adds_to_the_other_family_is_not_believed(
    fake: FakeSegment, start: StartProxy
) -> None:
    # The balancer writes X-Forwarded-* and passes on the visitor's Forwarded header: the two
    # disagree, so neither is believed and the Host header the balancer sent counts.
    proxy = behind_balancer(fake, start)
    sio = segment_io(
        proxy,
        {
            "Forwarded": "for=198.51.100.66;host=evil.example;proto=http",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
        },
    )
    assert sio["apiHost"] == f"{PUBLIC}/v1"
    # (the connection's own scheme: a visitor can make its own request fall back, not choose)
    assert sio["protocol"] == "http"


def test_events_carry_the_address_the_balancer_saw_not_one_the_visitor_wrote(
    fake: FakeSegment, start: StartProxy
) -> None:
    client = Client(behind_balancer(fake, start))
    for headers in (
        {"X-Forwarded-For": "198.51.100.66, 203.0.113.7"},
        {"Forwarded": "for=198.51.100.66", "forwarded": 'for="203.0.113.7:5123"'},
        {"Forwarded": 'for=198.51.100.66, for="[2001:DB8::7]:4711"'},
    ):
        assert client.post("/v1/t", EVENT, headers).status == 200
    ips = [r.json["context"]["ip"] for r in fake.api_requests]
    assert ips == ["203.0.113.7", "203.0.113.7", "2001:db8::7"]


def test_trusting_proxies_without_public_hosts_is_a_warning_at_start(
    fake: FakeSegment, start: StartProxy
) -> None:
    warned = behind_balancer(fake, start)
    warned.logged(r"WARNING segproxy: trusted_proxies is set and public_hosts is empty")
    quiet = behind_balancer(fake, start, public_hosts=[PUBLIC])
    # (the warning comes before the "listening" line, which start() waited for)
    assert "public_hosts is empty" not in quiet.logs()
