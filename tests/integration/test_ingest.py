"""The Tracking API proxy: every endpoint, every way to get it wrong, and Segment's answers."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.integration.conftest import WRITE_KEY, Client, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.rawhttp import gzip_bytes

BASIC = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()


def event(**extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": "ajs-next-1",
        "properties": {"total": 42.5, "currency": "EUR"},
        "context": {"library": {"name": "analytics.js", "version": "next-1.84.3"}},
        "timestamp": "2026-11-25T12:00:00.000Z",
        "sentAt": "2026-11-25T12:00:00.100Z",
        **extra,
    }


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "endpoint",
    ["t", "p", "i", "g", "a", "s", "track", "identify", "page", "screen", "group", "alias"],
)
def test_single_event_endpoints_reach_the_same_path_with_context_ip(
    client: Client, fake: FakeSegment, endpoint: str
) -> None:
    resp = client.post(
        f"/v1/{endpoint}",
        body(event(writeKey=WRITE_KEY)),
        {"Content-Type": "text/plain", "Origin": "https://shop.example"},
    )
    assert resp.status == 200
    assert resp.json() == {"success": True}
    assert resp.header("access-control-allow-origin") == "https://shop.example"
    (seen,) = fake.api_requests
    assert seen.path == f"/v1/{endpoint}"
    assert seen.headers.get("host") == fake.api_authority
    assert seen.json["properties"] == {"total": 42.5, "currency": "EUR"}
    assert seen.json["context"]["ip"] == "127.0.0.1"
    assert seen.json["messageId"] == "ajs-next-1"
    assert seen.basic_auth_user == WRITE_KEY


@pytest.mark.parametrize("backend", ["none", "sqlite"])
def test_a_clients_repeated_events_reach_segment_exactly_like_its_first(
    fake: FakeSegment, start: StartProxy, tmp_path: Any, backend: str
) -> None:
    """The first request with a Basic header takes the general path, the next ones the fast
    lane: Segment cannot tell them apart (same event, same headers), on either backend."""
    queue = {"backend": backend, "path": str(tmp_path / "q.db")}
    client = Client(start(base_config(fake, queue=queue, forward={"max_delay": 0.01})))
    headers = {"Content-Type": "text/plain", "Authorization": BASIC}
    sent = [
        event(messageId=f"m-{i}", context={"ip": ""}, sentAt="2026-11-25T12:00:00.100Z")
        for i in range(3)
    ]
    sent[2].pop("type")  # the endpoint names it
    for doc in sent:
        assert client.post("/v1/t", body(doc), headers).status == 200
    got = fake.wait_for_events(3)
    assert [e.message_id for e in got] == ["m-0", "m-1", "m-2"]
    for e in got:
        assert e.data["context"]["ip"] == "127.0.0.1"
        assert e.data.get("type") == "track" or (backend == "none" and e.message_id == "m-2")
        assert e.write_key == WRITE_KEY
    # Each event as Segment received it, but for what tells them apart.
    strip = ("messageId", "sentAt")
    first, *rest = [{k: v for k, v in e.data.items() if k not in strip} for e in got[:2]]
    assert rest == [first]
    if backend == "none":  # passthrough: the same upstream request, headers included
        reqs = fake.api_requests
        assert {r.headers.get("authorization") for r in reqs} == {BASIC}
        assert {r.headers.get("content-type") for r in reqs} == {"application/json"}
        assert "type" not in reqs[2].json  # relayed as sent, like the general path does


@pytest.mark.parametrize("endpoint", ["b", "batch", "import"])
def test_batches_get_context_ip_per_event_and_keep_an_existing_one(
    client: Client, fake: FakeSegment, endpoint: str
) -> None:
    batch = [event(messageId="m1"), event(messageId="m2", context={"ip": "203.0.113.9"})]
    resp = client.post(
        f"/v1/{endpoint}", body({"batch": batch, "sentAt": "x"}), {"Authorization": BASIC}
    )
    assert resp.status == 200
    events = fake.wait_for_events(2)
    by_id = {e.message_id: e.data for e in events}
    assert by_id["m1"]["context"]["ip"] == "127.0.0.1"
    assert by_id["m2"]["context"]["ip"] == "203.0.113.9"


def test_metrics_are_forwarded_as_they_are(client: Client, fake: FakeSegment) -> None:
    metrics = {"series": [{"type": "Counter", "metric": "analytics_js.invoke", "value": 1}]}
    assert client.post("/v1/m", body(metrics)).status == 200
    (seen,) = fake.api_requests
    assert seen.path == "/v1/m"
    assert seen.json == metrics


def test_gzip_request_bodies_are_decoded(client: Client, fake: FakeSegment) -> None:
    payload = body({"batch": [event()], "writeKey": WRITE_KEY})
    resp = client.post(
        "/v1/batch",
        gzip_bytes(payload),
        {"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert resp.status == 200
    (seen,) = fake.api_requests
    assert seen.json["batch"][0]["event"] == "Order Completed"


@pytest.mark.parametrize(
    ("payload", "headers", "status", "code"),
    [
        (b'{"writeKey": "k", "event": ', {}, 400, "invalid_json"),
        (b'{"writeKey": "k", "event": "\xff\xfe"}', {}, 400, "invalid_utf8"),
        (b"[1, 2, 3]", {}, 400, "not_an_object"),
        (b'{"event": "no key"}', {}, 401, "missing_write_key"),
        (b'{"writeKey": "k"}', {"Authorization": "Basic !!!"}, 401, "bad_authorization"),
        (
            b'{"writeKey": "k"}',
            {"Content-Type": "multipart/form-data"},
            415,
            "unsupported_media_type",
        ),
        (b'{"writeKey": "k"}', {"Content-Encoding": "gzip"}, 400, "bad_gzip"),
        (b'{"writeKey": "k"}', {"Content-Encoding": "compress"}, 400, "bad_encoding"),
        (b'{"writeKey": "k", "context": "x"}', {}, 400, "bad_event"),
        (b'{"writeKey": "k", "p": ' + b"[" * 300 + b"]" * 300 + b"}", {}, 400, "bad_event"),
    ],
)
def test_invalid_bodies_get_a_named_error_and_never_reach_segment(
    client: Client,
    fake: FakeSegment,
    payload: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    resp = client.post("/v1/t", payload, headers)
    assert resp.status == status
    err = resp.json()
    assert err["code"] == code
    assert err["message"]
    assert resp.header("access-control-allow-origin")  # the browser can read the error
    assert fake.api_requests == []


def test_bad_batches_are_rejected_whole(client: Client, fake: FakeSegment) -> None:
    for batch_body in (
        {"writeKey": "k", "batch": "nope"},
        {"writeKey": "k", "batch": [event(), 3]},
        {"writeKey": "k", "batch": [{"event": "no type"}]},
    ):
        resp = client.post("/v1/batch", body(batch_body))
        assert resp.status == 400, batch_body
    assert fake.api_requests == []


def test_an_event_over_32_kb_is_refused_like_segment(client: Client, fake: FakeSegment) -> None:
    big = event(writeKey="k", properties={"blob": "x" * 33_000})
    resp = client.post("/v1/t", body(big))
    assert resp.status == 400
    assert resp.json()["code"] == "event_too_large"
    assert "32768" in resp.json()["message"]
    in_batch = {"writeKey": "k", "batch": [event(), big]}
    assert client.post("/v1/batch", body(in_batch)).json()["code"] == "event_too_large"
    assert fake.api_requests == []


def test_a_request_over_500_kb_is_refused(client: Client, fake: FakeSegment) -> None:
    batch = [event(messageId=str(i), properties={"p": "y" * 20_400}) for i in range(25)]
    resp = client.post("/v1/batch", body({"writeKey": "k", "batch": batch}))
    assert resp.status == 400
    assert resp.json()["code"] == "request_too_large"
    assert fake.api_requests == []


def test_a_gzip_bomb_stops_at_the_decompressed_limit(client: Client, fake: FakeSegment) -> None:
    bomb = gzip_bytes(b'{"writeKey":"k","pad":"' + b"0" * 50_000_000 + b'"}')
    assert len(bomb) < 512 * 1024
    resp = client.post("/v1/t", bomb, {"Content-Encoding": "gzip"})
    assert resp.status == 400
    assert resp.json()["code"] == "request_too_large"
    assert fake.api_requests == []


def test_write_key_allow_list(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake, sources={"write_keys": [WRITE_KEY]}))
    client = Client(proxy)
    refused = client.post("/v1/t", body(event(writeKey="someone_else")))
    assert refused.status == 403
    assert refused.json()["code"] == "write_key_not_allowed"
    assert client.post("/v1/t", body(event()), {"Authorization": BASIC}).status == 200
    assert len(fake.api_requests) == 1


def test_forwarded_for_is_trusted_only_from_configured_proxies(
    fake: FakeSegment, start: StartProxy
) -> None:
    untrusting = Client(start(base_config(fake)))
    untrusting.post("/v1/t", body(event(writeKey="k")), {"X-Forwarded-For": "198.51.100.7"})
    trusting = Client(start(base_config(fake, trusted_proxies=["127.0.0.0/8"])))
    trusting.post(
        "/v1/t", body(event(writeKey="k")), {"X-Forwarded-For": "198.51.100.7, 127.0.0.5"}
    )
    first, second = fake.api_requests
    assert first.json["context"]["ip"] == "127.0.0.1"
    assert second.json["context"]["ip"] == "198.51.100.7"


def test_segment_429_and_retry_after_reach_the_browser(client: Client, fake: FakeSegment) -> None:
    fake.api_status(429, retry_after=7)
    resp = client.post("/v1/t", body(event(writeKey="k")), {"Origin": "https://shop.example"})
    assert resp.status == 429
    assert resp.header("retry-after") == "7"
    assert "Retry-After" in (resp.header("access-control-expose-headers") or "")


def test_segment_unreachable_is_a_502_with_retry_after(client: Client, fake: FakeSegment) -> None:
    fake.api_down()
    resp = client.post("/v1/t", body(event(writeKey="k")))
    assert resp.status == 502
    assert resp.header("retry-after")
    assert resp.json()["code"] == "upstream_unavailable"


def test_segment_not_answering_is_a_503_with_retry_after(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, upstream={"timeout": 0.5}))
    fake.api_hang()
    resp = Client(proxy).post("/v1/t", body(event(writeKey="k")))
    assert resp.status == 503
    assert resp.header("retry-after")
    fake.api_ok()


def test_preflight_allows_what_analytics_next_sends(client: Client, fake: FakeSegment) -> None:
    resp = client.request(
        "OPTIONS",
        "/v1/t",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-retry-count",
        },
    )
    assert resp.status == 204
    assert resp.header("access-control-allow-origin") == "https://shop.example"
    allowed = {h.strip() for h in (resp.header("access-control-allow-headers") or "").split(",")}
    assert {"authorization", "content-type", "x-retry-count"} <= allowed
    assert "POST" in (resp.header("access-control-allow-methods") or "")
    assert resp.header("access-control-max-age")
    assert resp.header("access-control-allow-credentials") is None
    assert fake.api_requests == []


def test_get_on_an_api_path_is_405_with_allow(client: Client) -> None:
    resp = client.get("/v1/t")
    assert resp.status == 405
    assert resp.header("allow") == "POST, OPTIONS"
