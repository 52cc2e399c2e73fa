"""Events as they will be sent: Segment's 32 KB checked after everything the proxy adds,
the batch's fields folded into each event, and what one request may store."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from segproxy.config import LimitsConfig
from segproxy.forward.batcher import build_batches
from segproxy.ingest import prepare
from segproxy.ingest.parse import IngestError, decode_body, enrich, parse
from segproxy.queue.base import NewRow, queued_row

LIMITS = LimitsConfig()
KEY = "wk_live_123"
AUTH = b"Basic " + base64.b64encode(KEY.encode() + b":")
IP = "203.0.113.7"
NOW = 1_764_000_000.0
LIMIT = 32 * 1024


def stored(endpoint: str, doc: dict[str, Any], limits: LimitsConfig = LIMITS) -> list[NewRow]:
    """What ingest stores for a request: decoded, parsed, enriched, prepared."""
    return stored_from(endpoint, orjson.dumps(doc), limits)


def stored_from(endpoint: str, body: bytes, limits: LimitsConfig = LIMITS) -> list[NewRow]:
    data = decode_body(body, b"application/json", None, limits)
    payload = parse(endpoint, data, AUTH, limits, frozenset())
    enrich(payload, IP)
    return prepare.rows(payload, NOW, limits)


def refused(endpoint: str, doc: dict[str, Any], limits: LimitsConfig = LIMITS) -> IngestError:
    with pytest.raises(IngestError) as info:
        stored(endpoint, doc, limits)
    return info.value


def as_sent(rows: list[NewRow], waited: float) -> list[bytes]:
    """Each event as the real forwarder sends it after ``waited`` seconds in the queue."""
    leased = [
        queued_row(i, r.write_key, r.kind, r.received_at, 0, r.body, r.sent_at)
        for i, r in enumerate(rows)
    ]
    (batch,) = build_batches(leased, NOW + waited)
    return [orjson.dumps(event) for event in orjson.loads(batch.body())["batch"]]


def size(obj: Any) -> int:
    return len(orjson.dumps(obj))


# ---------------------------------------------------------------------------------------------
# Segment's 32 KB, on the event as sent


# A sentAt in analytics.js's form keeps its length when the forwarder moves it forward; a
# shorter one grows to that form (24 characters); a longer one is sent as it came when the
# event did not wait. Each is measured at its longest.
SENT_ATS = {
    "analytics.js": "2026-11-25T12:00:00.100Z",
    "whole second": "2026-11-25T12:00:00Z",
    "analytics-python": "2026-11-25T12:00:00.100000+00:00",
}


def at_limit(shape: str, sent_at: str, over: int) -> tuple[str, dict[str, Any]]:
    """A request whose event, as it may reach Segment at its longest, is 32,768 + ``over``
    bytes: its JSON with what the proxy adds, sentAt counted at its longest form."""
    event: dict[str, Any] = {"type": "track", "messageId": "m-1", "properties": {"pad": ""}}
    longest_sent_at = sent_at if len(sent_at) > 24 else "x" * 24
    if shape == "single, context.ip added":
        endpoint, doc = "t", {**event, "sentAt": sent_at}
        seen = {**event, "context": {"ip": IP}, "sentAt": longest_sent_at}
    elif shape == "single, messageId and type added":
        del event["messageId"], event["type"]
        endpoint, doc = "t", {**event, "context": {"ip": "198.51.100.1"}, "sentAt": sent_at}
        seen = {**doc, "messageId": "0" * 36, "type": "track", "sentAt": longest_sent_at}
    else:  # the batch's context, integrations and sentAt folded into the event
        shared = {"page": {"path": "/checkout"}, "locale": "de-DE"}
        integrations = {"All": True}
        endpoint = "batch"
        doc = {"batch": [event], "context": shared, "integrations": integrations}
        doc["sentAt"] = sent_at
        seen = {**event, "context": {**shared, "ip": IP}, "integrations": integrations}
        seen["sentAt"] = longest_sent_at
    event["properties"]["pad"] = "x" * (LIMIT + over - size(seen))
    seen["properties"] = event["properties"]
    assert size(seen) == LIMIT + over
    return endpoint, doc


SHAPES = ["single, context.ip added", "single, messageId and type added", "batch context"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", list(SENT_ATS))
def test_an_event_of_32_kb_as_sent_is_accepted_and_one_byte_more_refused(
    shape: str, form: str
) -> None:
    endpoint, doc = at_limit(shape, SENT_ATS[form], 1)
    error = refused(endpoint, doc)
    assert (error.status, error.code) == (400, "event_too_large")
    assert str(LIMIT + 1) in error.message
    assert str(LIMIT) in error.message
    endpoint, doc = at_limit(shape, SENT_ATS[form], 0)
    rows = stored(endpoint, doc)
    for waited in (0.0, 0.5, 3600.0):  # sent at once, moved within its second, much later
        (sent,) = as_sent(rows, waited)
        assert len(sent) <= LIMIT
        if form == "analytics.js" or (form == "analytics-python" and waited == 0.0):
            assert len(sent) == LIMIT  # the bound is exact, not a margin


def test_a_refused_batch_event_is_named_by_its_index() -> None:
    endpoint, doc = at_limit("batch context", SENT_ATS["analytics.js"], 1)
    doc["batch"].insert(0, {"type": "track"})
    assert "batch[1]" in refused(endpoint, doc).message


def test_an_event_without_sent_at_is_measured_as_it_is() -> None:
    event: dict[str, Any] = {"type": "track", "messageId": "m", "context": {"ip": IP}}
    event["properties"] = {"pad": "x" * (LIMIT - size({**event, "properties": {"pad": ""}}))}
    assert size(event) == LIMIT
    (row,) = stored("t", event)
    assert len(row.body) == LIMIT and row.sent_at is None
    event["properties"]["pad"] += "x"
    assert refused("t", event).code == "event_too_large"


# ---------------------------------------------------------------------------------------------
# The batch's fields, folded into each event


def test_a_batch_sent_at_goes_to_each_event_that_has_none() -> None:
    doc = {
        "sentAt": "2026-01-01T00:00:05.000Z",
        "batch": [
            {"type": "track", "messageId": "a"},
            {"type": "track", "messageId": "b", "sentAt": "2026-01-01T00:00:01.000Z"},
        ],
    }
    rows = stored("batch", doc)
    assert [r.sent_at for r in rows] == ["2026-01-01T00:00:05.000Z", "2026-01-01T00:00:01.000Z"]
    assert all(b"sentAt" not in r.body for r in rows)  # kept apart, for the forwarder


def test_the_batch_context_and_integrations_merge_under_each_events_own() -> None:
    doc = {
        "context": {"locale": "de-DE", "page": {"path": "/"}},
        "integrations": {"All": False},
        "batch": [
            {"type": "track", "messageId": "a"},
            {"type": "track", "messageId": "b", "context": {"locale": "fr-FR"}},
            {"type": "track", "messageId": "c", "integrations": {"Mixpanel": True}},
        ],
    }
    a, b, c = (orjson.loads(r.body) for r in stored("batch", doc))
    assert a["context"] == {"locale": "de-DE", "page": {"path": "/"}, "ip": IP}
    assert b["context"] == {"locale": "fr-FR", "page": {"path": "/"}, "ip": IP}
    assert a["integrations"] == b["integrations"] == {"All": False}
    assert c["integrations"] == {"All": False, "Mixpanel": True}


def test_each_event_gets_its_own_copy_of_the_batch_context() -> None:
    doc = {"context": {"locale": "de-DE"}, "batch": [{"type": "track"}, {"type": "page"}]}
    data = orjson.dumps(doc)
    payload = parse("batch", data, AUTH, LIMITS, frozenset())
    enrich(payload, IP)
    prepare.rows(payload, NOW, LIMITS)
    a, b = payload.events
    assert a["context"] is not b["context"]
    assert payload.doc["context"] == {"locale": "de-DE"}  # the batch's own is not changed


@pytest.mark.parametrize("shared", [["nope"], "x", 3])
def test_a_batch_context_that_is_not_an_object_is_not_folded(shared: object) -> None:
    (row,) = stored("batch", {"context": shared, "batch": [{"type": "track"}]})
    assert orjson.loads(row.body)["context"] == {"ip": IP}


def test_a_batch_context_ip_stands_for_its_events_and_an_events_own_wins() -> None:
    """The client's stated address, as on an event; the connection's only when neither has
    one. The same on both backends (Segment would merge the batch's into each event)."""
    doc = {
        "context": {"ip": "198.51.100.1"},
        "batch": [
            {"type": "track"},
            {"type": "track", "context": {"locale": "fr"}},
            {"type": "track", "context": {"ip": "198.51.100.2"}},
        ],
    }
    ips = [orjson.loads(r.body)["context"]["ip"] for r in stored("batch", doc)]
    assert ips == ["198.51.100.1", "198.51.100.1", "198.51.100.2"]
    sent = orjson.loads(forwarded("batch", doc))["batch"]
    assert [e["context"]["ip"] for e in sent] == ips


def test_a_single_event_gets_its_endpoints_type_unless_it_names_one() -> None:
    (implied,) = stored("t", {"messageId": "a"})
    assert orjson.loads(implied.body)["type"] == "track"
    (own,) = stored("t", {"messageId": "a", "type": "page"})
    assert orjson.loads(own.body)["type"] == "page"


# ---------------------------------------------------------------------------------------------
# What one request may store


def small_events(count: int) -> list[dict[str, Any]]:
    return [{"type": "track", "event": "e", "messageId": f"m{i}"} for i in range(count)]


def stored_bytes(rows: list[NewRow]) -> int:
    return sum(prepare.sent_size(r.body, r.sent_at) + len(r.write_key) for r in rows)


def test_a_large_batch_context_copied_into_many_events_is_refused() -> None:
    """The reproduction: 30 KB of batch-level context, 200 events: each is under 32 KB once
    merged, but together they would store ~6 MB for a 36 KB request."""
    doc = {"batch": small_events(200), "context": {"traits": {"blob": "c" * 30_000}}}
    error = refused("batch", doc)
    assert (error.status, error.code) == (400, "merged_too_large")
    assert "context" in error.message
    assert str(prepare.STORE_FACTOR) in error.message


def test_refusing_an_amplified_batch_stops_encoding_at_the_bound() -> None:
    """Work is bounded too: the events after the bound is reached are never encoded (these
    could not be: nested deeper than orjson writes, which would be a bad_event)."""
    events = [*small_events(20), *({"type": "track", "properties": "DEEP"} for _ in range(5))]
    doc = {"batch": events, "context": {"traits": {"blob": "c" * 30_000}}}
    deep = b"[" * 300 + b"0" + b"]" * 300
    body = orjson.dumps(doc).replace(b'"DEEP"', deep)
    with pytest.raises(IngestError) as info:
        stored_from("batch", body)
    assert info.value.code == "merged_too_large"
    without_context = orjson.dumps({"batch": events}).replace(b'"DEEP"', deep)
    with pytest.raises(IngestError) as info:
        stored_from("batch", without_context)
    assert info.value.code == "bad_event"  # they are refused when reached


def test_what_real_clients_send_stays_within_the_bound() -> None:
    """analytics.js batching (batch sentAt, per-event context), 2,500 minimal events (what the
    proxy adds dominates), and a batch-level device context as in Segment's HTTP API docs."""
    context = {"library": {"name": "analytics.js", "version": "next-1.84.3"}, "locale": "en"}
    browser = {
        "sentAt": "2026-11-25T12:00:00.100Z",
        "batch": [{**e, "context": context, "writeKey": KEY} for e in small_events(500)],
    }
    minimal = {"batch": [{"type": "t"}] * 2500, "sentAt": "2026-11-25T12:00:00.100000+00:00"}
    http_api = {
        "batch": small_events(2500),
        "context": {"device": {"type": "phone", "name": "Apple iPhone 6"}},
    }
    for doc in (browser, minimal, http_api):
        rows = stored("batch", doc)
        assert len(rows) == len(doc["batch"])
        sent = size(doc)
        assert stored_bytes(rows) <= prepare.STORE_FACTOR * sent + prepare.STORE_PER_EVENT * len(
            rows
        )


def test_a_request_stores_at_most_the_bound() -> None:
    """Just within the bound is accepted, and what it stores is within it."""
    events = small_events(100)
    for blob in range(0, 4000, 50):
        doc = {"batch": events, "context": {"traits": {"blob": "c" * blob}}}
        try:
            rows = stored("batch", doc)
        except IngestError as exc:
            assert exc.code == "merged_too_large"
            assert blob > 0
            break
        budget = prepare.STORE_FACTOR * size(doc) + prepare.STORE_PER_EVENT * len(events)
        assert stored_bytes(rows) <= budget
    else:
        pytest.fail("a growing batch context never reached the bound")


# ---------------------------------------------------------------------------------------------
# Passthrough: the request as it will be forwarded


def forwarded(endpoint: str, doc: dict[str, Any], limits: LimitsConfig = LIMITS) -> bytes:
    data = orjson.dumps(doc)
    payload = parse(endpoint, data, AUTH, limits, frozenset())
    enrich(payload, IP)
    return prepare.forwarded_body(payload, limits)


def test_passthrough_measures_the_event_with_its_context_ip() -> None:
    event: dict[str, Any] = {"type": "track", "messageId": "m", "properties": {"pad": ""}}
    with_ip = {**event, "context": {"ip": IP}}
    event["properties"] = {"pad": "x" * (LIMIT - size(with_ip))}
    assert len(forwarded("t", event)) == LIMIT
    event["properties"]["pad"] += "x"
    with pytest.raises(IngestError) as info:
        forwarded("t", event)
    assert info.value.code == "event_too_large"
    with pytest.raises(IngestError) as info:
        forwarded("batch", {"batch": [{"type": "track"}, event]})
    assert (info.value.code, "batch[1]" in info.value.message) == ("event_too_large", True)


def test_passthrough_measures_the_request_as_forwarded() -> None:
    limits = LimitsConfig(max_request_bytes=2000)
    doc = {"batch": [{"type": "t"}] * 40}
    assert len(orjson.dumps(doc)) < 2000  # as sent by the client; not once enriched
    with pytest.raises(IngestError) as info:
        forwarded("batch", doc, limits)
    assert info.value.code == "request_too_large"
