"""The Tracking API proxy: every endpoint, every way to get it wrong, and Segment's answers."""

from __future__ import annotations

import base64
import json
import re
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
        f"/v1/{endpoint}",
        body({"batch": batch, "sentAt": "2026-11-25T12:00:00.100Z"}),
        {"Authorization": BASIC},
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


# ---------------------------------------------------------------------------------------------
# Limits on the event as the forwarder will send it; what one request may cost


def durable(fake: FakeSegment, start: StartProxy, tmp_path: Any) -> Client:
    queue = {"backend": "sqlite", "path": str(tmp_path / "q.db")}
    return Client(start(base_config(fake, queue=queue, forward={"max_delay": 0.01})))


def compact_size(obj: Any) -> int:
    """Bytes of ``obj`` as compact JSON, as Segment (and the fake) measure an event."""
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def only_this_reaches_segment(client: Client, fake: FakeSegment, mid: str) -> None:
    """A good event posted after refusals arrives alone: nothing refused was stored or sent."""
    assert client.post("/v1/t", body(event(messageId=mid)), {"Authorization": BASIC}).status == 200
    (got,) = fake.wait_for_events(1)
    assert got.message_id == mid
    assert [e.message_id for e in fake.api_events(accepted_only=False)] == [mid]


def at_the_limit(shape: str, over: int) -> tuple[str, bytes, dict[str, Any]]:
    """A request whose one event, as it will reach Segment, is 32,768 + ``over`` bytes.

    Returns the path, the body, and the event as Segment will see it (sentAt moved forward
    keeps analytics.js's 24-character form)."""
    sent_at = "2026-11-25T12:00:00.100Z"
    ev = event(messageId="edge-1", properties={"pad": ""}, sentAt=sent_at)
    if shape == "single":  # context.ip is added into the event's own context
        path, doc = "/v1/t", ev
        seen = {**ev, "context": {**ev["context"], "ip": "127.0.0.1"}}
    else:  # batch-level context and sentAt are folded into the event, with context.ip
        del ev["context"], ev["sentAt"]
        shared = {"page": {"url": "https://shop.example/checkout"}, "locale": "de-DE"}
        path, doc = "/v1/batch", {"batch": [ev], "context": shared, "sentAt": sent_at}
        seen = {**ev, "context": {**shared, "ip": "127.0.0.1"}, "sentAt": sent_at}
    pad = 32 * 1024 + over - compact_size(seen)
    ev["properties"]["pad"] = seen["properties"]["pad"] = "x" * pad
    assert compact_size(seen) == 32 * 1024 + over
    return path, body(doc), seen


@pytest.mark.parametrize(
    ("shape", "backend"), [("single", "sqlite"), ("single", "none"), ("batch", "sqlite")]
)
def test_an_event_of_exactly_32_kb_as_sent_is_delivered_and_one_byte_more_is_refused(
    fake: FakeSegment, start: StartProxy, tmp_path: Any, shape: str, backend: str
) -> None:
    queue = {"backend": backend, "path": str(tmp_path / "q.db")}
    client = Client(start(base_config(fake, queue=queue, forward={"max_delay": 0.01})))
    headers = {"Authorization": BASIC}
    path, over, _ = at_the_limit(shape, 1)
    resp = client.post(path, over, headers)
    assert resp.status == 400
    assert resp.json()["code"] == "event_too_large"
    assert "32768" in resp.json()["message"]
    path, exact, seen = at_the_limit(shape, 0)
    assert client.post(path, exact, headers).status == 200
    (got,) = fake.wait_for_events(1)  # accepted by Segment's own 32 KB check
    assert compact_size(got.data) == 32 * 1024
    assert got.data["context"] == seen["context"]
    assert [r.status for r in fake.api_requests] == [200]  # the refused one never went


def test_a_write_key_longer_than_256_bytes_is_refused_from_the_body_or_basic_auth(
    fake: FakeSegment, start: StartProxy, tmp_path: Any
) -> None:
    client = durable(fake, start, tmp_path)
    huge = "k" * 100_000  # the reproduction: ~850 gzip bytes, 200 events
    doc = {"writeKey": huge, "batch": [event(messageId=f"m{i}") for i in range(200)]}
    zipped = gzip_bytes(body(doc))
    resp = client.post("/v1/batch", zipped, {"Content-Encoding": "gzip"})
    assert resp.status == 400
    assert resp.json()["code"] == "write_key_too_long"
    assert "256" in resp.json()["message"]
    long_basic = "Basic " + base64.b64encode(b"k" * 257 + b":").decode()
    resp = client.post("/v1/t", body(event()), {"Authorization": long_basic})
    assert (resp.status, resp.json()["code"]) == (400, "write_key_too_long")
    only_this_reaches_segment(client, fake, "after-long-keys")


def test_a_write_key_of_256_bytes_is_accepted(
    fake: FakeSegment, start: StartProxy, tmp_path: Any
) -> None:
    client = durable(fake, start, tmp_path)
    key = "k" * 256
    assert client.post("/v1/t", body(event(writeKey=key))).status == 200
    assert fake.wait_for_events(1)[0].request.basic_auth_user == key


@pytest.mark.parametrize("sent_at", ["x", "yesterday", "2026-13-01T00:00:00Z", "1" * 5000, 17])
def test_a_malformed_sent_at_is_refused_with_a_named_400(
    fake: FakeSegment, start: StartProxy, tmp_path: Any, sent_at: object
) -> None:
    client = durable(fake, start, tmp_path)
    resp = client.post("/v1/t", body(event(sentAt=sent_at)), {"Authorization": BASIC})
    assert resp.status == 400
    assert resp.json()["code"] == "bad_sent_at"
    assert "sentAt" in resp.json()["message"]
    batch = {"batch": [event(messageId="b1")], "sentAt": sent_at}
    resp = client.post("/v1/batch", body(batch), {"Authorization": BASIC})
    assert (resp.status, resp.json()["code"]) == (400, "bad_sent_at")
    only_this_reaches_segment(client, fake, "after-bad-sent-at")


def test_a_large_batch_level_context_merged_into_many_events_is_refused(
    fake: FakeSegment, start: StartProxy, tmp_path: Any
) -> None:
    """The reproduction: 30 KB of batch-level context for 200 small events (each under 32 KB
    once merged) would store ~6 MB of JSON for a 36 KB request."""
    client = durable(fake, start, tmp_path)
    shared = {"traits": {"blob": "c" * 30_000}}
    events = [{"type": "track", "event": "e", "messageId": f"m{i}"} for i in range(200)]
    doc = {"batch": events, "context": shared}
    resp = client.post("/v1/batch", body(doc), {"Authorization": BASIC})
    assert resp.status == 400
    assert resp.json()["code"] == "merged_too_large"
    assert "context" in resp.json()["message"]
    only_this_reaches_segment(client, fake, "after-merged")


def test_a_small_batch_level_context_is_merged_into_every_event(
    fake: FakeSegment, start: StartProxy, tmp_path: Any
) -> None:
    client = durable(fake, start, tmp_path)
    shared = {"device": {"type": "phone", "name": "Apple iPhone 6"}}
    events = [{"type": "track", "event": "e", "messageId": f"m{i}"} for i in range(200)]
    resp = client.post(
        "/v1/batch", body({"batch": events, "context": shared}), {"Authorization": BASIC}
    )
    assert resp.status == 200
    got = fake.wait_for_events(200)
    assert all(e.data["context"]["device"] == shared["device"] for e in got)


# ---------------------------------------------------------------------------------------------
# messageId: every event has one, fixed at accept time


UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_an_event_without_message_id_gets_one_that_every_retry_repeats(
    fake: FakeSegment, start: StartProxy, tmp_path: Any
) -> None:
    client = durable(fake, start, tmp_path)
    fake.api_status(500, times=1)
    single = event()
    del single["messageId"]
    assert client.post("/v1/t", body(single), {"Authorization": BASIC}).status == 200
    assert fake.api.state.wait_until(lambda: len(fake.api_requests) >= 2, 10)
    first, second = fake.api_requests[:2]
    assert (first.status, second.status) == (500, 200)
    (mid,) = {e["messageId"] for e in first.json["batch"]}
    assert UUID4.match(mid)
    assert [e["messageId"] for e in second.json["batch"]] == [mid]


def test_batch_events_with_a_missing_or_empty_message_id_each_get_their_own(
    fake: FakeSegment, start: StartProxy, tmp_path: Any
) -> None:
    client = durable(fake, start, tmp_path)
    missing = event()
    del missing["messageId"]
    batch = [missing, event(messageId=""), event(messageId=7), event(messageId="keep-1")]
    resp = client.post("/v1/batch", body({"batch": batch}), {"Authorization": BASIC})
    assert resp.status == 200
    ids = [e.message_id for e in fake.wait_for_events(4)]
    assert ids[3] == "keep-1"
    assert all(i is not None and UUID4.match(i) for i in ids[:3])
    assert len(set(ids)) == 4
