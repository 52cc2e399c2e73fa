"""Rate limiting through the real proxy: per client IP, per write key, exemptions, defaults."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from tests.integration.conftest import WRITE_KEY, Client, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.rawhttp import RawResponse

OTHER_KEY = "wk_other_2"
SCRIPT = f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js"
ORIGIN = "https://shop.example"


def track(write_key: str = WRITE_KEY, **extra: Any) -> bytes:
    return json.dumps(
        {"type": "track", "event": "Viewed", "writeKey": write_key, "messageId": "m", **extra}
    ).encode()


def post(client: Client, write_key: str = WRITE_KEY, **headers: str) -> RawResponse:
    return client.post("/v1/t", track(write_key), {"Origin": ORIGIN, **headers})


def assert_limited(resp: RawResponse) -> int:
    assert resp.status == 429, (resp.status, resp.body)
    assert resp.json()["success"] is False
    assert resp.json()["code"] == "rate_limited"
    assert resp.json()["message"]
    retry_after = resp.header("retry-after")
    assert retry_after is not None
    assert retry_after.isdigit()
    assert int(retry_after) >= 1
    return int(retry_after)


def test_per_ip_limit_answers_429_with_retry_after_then_recovers(
    fake: FakeSegment, start: StartProxy
) -> None:
    client = Client(start(base_config(fake, rate_limit={"per_ip": 1.0, "per_ip_burst": 3.0})))
    assert [post(client).status for _ in range(3)] == [200, 200, 200]
    resp = post(client)
    assert assert_limited(resp) == 1
    assert resp.header("access-control-allow-origin") == ORIGIN
    assert "Retry-After" in (resp.header("access-control-expose-headers") or "")
    assert resp.header("cache-control") == "no-store"
    # CDN routes share the address's bucket and answer with their own CORS header.
    cdn = client.get(SCRIPT)
    assert_limited(cdn)
    assert cdn.header("access-control-allow-origin") == "*"
    # Health checks are never limited.
    assert client.get("/healthz").status == 200
    assert client.get("/readyz").status == 200
    assert len(fake.api_requests) == 3  # the refused requests never reached Segment
    assert fake.cdn_requests == []

    # A refused request takes no token: polling recovers once a token has refilled.
    deadline = time.monotonic() + 10.0
    while True:
        resp = post(client)
        if resp.status == 200:
            break
        assert_limited(resp)
        assert time.monotonic() < deadline, "the limit never recovered"
    assert len(fake.api_requests) == 4


def test_preflights_are_not_limited(fake: FakeSegment, start: StartProxy) -> None:
    client = Client(start(base_config(fake, rate_limit={"per_ip": 1.0, "per_ip_burst": 1.0})))
    assert post(client).status == 200
    assert_limited(post(client))
    pre = client.request(
        "OPTIONS",
        "/v1/t",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert pre.status == 204
    assert "Retry-After" in (pre.header("access-control-expose-headers") or "")


def test_per_write_key_limit_only_affects_that_key(fake: FakeSegment, start: StartProxy) -> None:
    config = base_config(fake, rate_limit={"per_write_key": 1.0, "per_write_key_burst": 2.0})
    client = Client(start(config))
    assert [post(client).status for _ in range(2)] == [200, 200]
    resp = post(client)
    assert assert_limited(resp) == 1
    assert resp.header("access-control-allow-origin") == ORIGIN
    assert "Retry-After" in (resp.header("access-control-expose-headers") or "")
    # Basic auth carries the same key: the same bucket.
    basic = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    assert_limited(client.post("/v1/t", track("ignored-body-key"), {"Authorization": basic}))
    # Another key, keyless metrics and the CDN are untouched by this key's limit.
    assert [post(client, OTHER_KEY).status for _ in range(2)] == [200, 200]
    assert client.post("/v1/m", b'{"series": []}').status == 200
    assert client.get(SCRIPT).status == 200
    users = [r.basic_auth_user for r in fake.api_requests if r.path == "/v1/t"]
    assert users == [WRITE_KEY, WRITE_KEY, OTHER_KEY, OTHER_KEY]


def test_exempt_ips_are_never_limited(fake: FakeSegment, start: StartProxy) -> None:
    config = base_config(
        fake, rate_limit={"per_ip": 1.0, "per_ip_burst": 1.0, "exempt_ips": ["127.0.0.1/32"]}
    )
    client = Client(start(config))
    assert {post(client).status for _ in range(20)} == {200}
    assert {client.get(SCRIPT).status for _ in range(20)} == {200}
    assert len(fake.api_requests) == 20


def test_exempt_write_keys_are_never_limited(fake: FakeSegment, start: StartProxy) -> None:
    config = base_config(
        fake,
        rate_limit={
            "per_write_key": 1.0,
            "per_write_key_burst": 1.0,
            "exempt_write_keys": [WRITE_KEY],
        },
    )
    client = Client(start(config))
    assert {post(client).status for _ in range(20)} == {200}
    assert post(client, OTHER_KEY).status == 200
    assert_limited(post(client, OTHER_KEY))
    assert len(fake.api_requests) == 21


def test_forwarded_clients_behind_a_trusted_proxy_are_limited_separately(
    fake: FakeSegment, start: StartProxy
) -> None:
    config = base_config(
        fake,
        trusted_proxies=["127.0.0.1/32"],
        rate_limit={"per_ip": 1.0, "per_ip_burst": 2.0, "exempt_ips": ["192.0.2.0/24"]},
    )
    client = Client(start(config))
    alice = {"X-Forwarded-For": "198.51.100.7"}
    bob = {"X-Forwarded-For": "198.51.100.8, 127.0.0.1"}
    health_checker = {"X-Forwarded-For": "192.0.2.10"}
    assert [post(client, **alice).status for _ in range(2)] == [200, 200]
    assert_limited(post(client, **alice))
    assert_limited(client.get(SCRIPT, alice))
    assert [post(client, **bob).status for _ in range(2)] == [200, 200]
    assert_limited(post(client, **bob))
    assert {post(client, **health_checker).status for _ in range(5)} == {200}
    ips = [r.json["context"]["ip"] for r in fake.api_requests]
    assert ips == ["198.51.100.7"] * 2 + ["198.51.100.8"] * 2 + ["192.0.2.10"] * 5


def test_an_ipv6_client_cannot_rotate_addresses_within_its_64_past_the_limit(
    fake: FakeSegment, start: StartProxy
) -> None:
    config = base_config(
        fake, trusted_proxies=["127.0.0.1/32"], rate_limit={"per_ip": 1.0, "per_ip_burst": 2.0}
    )
    client = Client(start(config))
    same_64 = [{"X-Forwarded-For": f"2001:db8:1:2::{n}"} for n in (1, 2, 3)]
    assert [post(client, **h).status for h in same_64[:2]] == [200, 200]
    assert_limited(post(client, **same_64[2]))
    neighbour = {"X-Forwarded-For": "2001:db8:1:3::1"}  # the next /64: someone else
    assert post(client, **neighbour).status == 200
    ips = [r.json["context"]["ip"] for r in fake.api_requests]
    assert ips == ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:3::1"]


def test_rejected_requests_never_reach_the_queue(fake: FakeSegment, start: StartProxy) -> None:
    config = base_config(
        fake,
        queue={"backend": "memory"},
        rate_limit={"per_write_key": 1.0, "per_write_key_burst": 2.0},
    )
    client = Client(start(config))
    statuses = [client.post("/v1/t", track(messageId=f"m{i}")).status for i in range(5)]
    assert statuses.count(200) == 2
    assert statuses.count(429) == 3
    events = fake.wait_for_events(2)
    assert {e.message_id for e in events} == {"m0", "m1"}
    # A bounded wait for anything more (none may come): the forwarder sends at once.
    assert not fake.api.state.wait_until(lambda: len(fake.api_events()) > 2, 0.5)


def test_defaults_never_answer_429(fake: FakeSegment, start: StartProxy) -> None:
    # The memory queue answers once events are queued, so 500 requests take no upstream time.
    client = Client(start(base_config(fake, queue={"backend": "memory"})))
    statuses = []
    for i in range(250):
        statuses.append(post(client).status)
        statuses.append(client.get(SCRIPT).status)
        assert statuses[-2:] == [200, 200], (i, statuses[-2:])
    assert len(statuses) == 500
