"""The live event debugger's ring (dashboard/feed.py): what it shows of each event, how the
forwarder's outcomes find their event, and its bounds."""

from __future__ import annotations

import json

from segproxy.dashboard.feed import Feed
from segproxy.queue.base import NewRow, Row, new_row, queued_row
from segproxy.redact import mask

KEY = "wk_feed_unit_0123456789"


def stored(message_id: str, kind: str = "track", name: str = "Order Completed") -> bytes:
    doc: dict[str, object] = {"type": kind, "messageId": message_id}
    doc["event" if kind == "track" else "name"] = name
    return json.dumps(doc).encode()


def put(message_id: str, **kw: str) -> NewRow:
    return new_row(KEY, "event", 1000.0, stored(message_id, **kw), "2026-01-01T00:00:00.000Z")


def leased(row: NewRow, row_id: int = 1) -> Row:
    """The same event as the forwarder holds it (another object, the same bytes)."""
    return queued_row(row_id, row.write_key, "event", row.received_at, 0, bytes(row.body), None)


def test_the_latest_events_come_newest_first_with_type_name_and_a_masked_key() -> None:
    feed = Feed()
    feed.record([put("m1"), put("m2", kind="page", name="Pricing")])
    shown = feed.latest()
    assert [e["messageId"] for e in shown] == ["m2", "m1"]
    assert shown[0]["type"] == "page"
    assert shown[0]["name"] == "Pricing"
    assert shown[1]["name"] == "Order Completed"
    assert all(e["key"] == mask(KEY) and e["status"] == "queued" for e in shown)
    assert KEY not in json.dumps(shown)


def test_the_forwarders_outcome_finds_its_event_by_its_stored_bytes() -> None:
    feed = Feed()
    a, b = put("a"), put("b")
    feed.record([a, b])
    feed.mark([leased(a)], "delivered", "")
    feed.mark([leased(b)], "dead", "HTTP 400: invalid")
    feed.mark([leased(put("never-seen"))], "delivered", "")  # not watched: ignored
    by_id = {e["messageId"]: e for e in feed.latest()}
    assert by_id["a"]["status"] == "delivered"
    assert by_id["b"]["status"] == "dead"
    assert by_id["b"]["detail"] == "HTTP 400: invalid"
    feed.requeued([b.body])
    assert {e["messageId"]: e for e in feed.latest()}["b"]["status"] == "queued"


def test_segments_own_telemetry_is_not_recorded() -> None:
    feed = Feed()
    feed.record([new_row("", "metrics", 1000.0, b'{"series":[]}')])
    assert feed.latest() == []


def test_the_ring_keeps_only_the_newest_events_and_an_event_sent_twice_once() -> None:
    feed = Feed(size=3)
    rows = [put(f"m{i}") for i in range(5)]
    feed.record(rows)
    feed.record([rows[2]])  # a client's retry of the same event
    assert [e["messageId"] for e in feed.latest()] == ["m2", "m4", "m3"]


def test_an_event_opens_as_it_will_be_sent_its_sent_at_moved_forward_and_key_masked() -> None:
    feed = Feed()
    body = json.dumps({"type": "track", "event": "X", "messageId": "s1", "writeKey": KEY})
    feed.record([new_row(KEY, "event", 1000.0, body.encode(), "2026-01-01T00:00:00.000Z")])
    entry = feed.find(feed.latest()[0]["seq"])
    assert entry is not None
    sent = entry.as_sent(now=1002.5)  # it waited 2.5 s in the proxy
    assert sent["sentAt"] == "2026-01-01T00:00:02.500Z"
    assert sent["writeKey"] == mask(KEY)
    assert feed.find(12345) is None


def test_a_body_that_is_not_an_object_shows_no_type_or_name() -> None:
    feed = Feed()
    feed.record([new_row(KEY, "event", 1000.0, b"[1, 2]")])
    shown = feed.latest()[0]
    assert (shown["type"], shown["name"], shown["messageId"]) == ("", "", "")


def test_nothing_is_kept_once_cleared() -> None:
    feed = Feed()
    feed.record([put("m1")])
    feed.clear()
    assert feed.latest() == []
