"""Batching queued rows into /v1/batch bodies, and preparing events at accept time."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.forward.batcher import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    Batch,
    build_batches,
    sent_at_field,
    shift_sent_at,
    shifted,
)
from segproxy.queue.base import Row, RowKind

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
ENVELOPE = len(b'{"batch":[]}')

_ids = itertools.count(1)


def row(
    key: str,
    event: dict[str, Any] | None = None,
    *,
    received_at: float = NOW,
    pad: int = 0,
) -> Row:
    i = next(_ids)
    doc = event if event is not None else {"type": "track", "messageId": f"m-{i}"}
    if pad:
        doc = {**doc, "properties": {"pad": "x" * pad}}
    return Row(i, key, "event", received_at, 0, orjson.dumps(doc))


def ids(batch: Batch) -> list[int]:
    return [r.id for r in batch.rows]


def decoded(batch: Batch) -> list[dict[str, Any]]:
    doc = json.loads(batch.body())
    assert list(doc) == ["batch"]  # no batch-level sentAt or writeKey
    events = doc["batch"]
    assert isinstance(events, list)
    return events


# ---------------------------------------------------------------------------------------------
# shift_sent_at: clock correction


def test_sent_at_moves_forward_by_the_wait_in_ms_with_z() -> None:
    event = {"sentAt": "2026-01-01T00:00:00.000Z", "timestamp": "2025-12-31T23:59:59.000Z"}
    shift_sent_at(event, 12.3456)
    assert event["sentAt"] == "2026-01-01T00:00:12.345Z"
    assert event["timestamp"] == "2025-12-31T23:59:59.000Z"


@pytest.mark.parametrize(
    ("sent", "waited", "expected"),
    [
        ("2026-01-01T00:00:00Z", 1.0, "2026-01-01T00:00:01.000Z"),
        ("2026-01-01T00:00:00+00:00", 0.5, "2026-01-01T00:00:00.500Z"),
        ("2026-01-01T01:00:00+01:00", 2.0, "2026-01-01T00:00:02.000Z"),
        ("2026-01-01T00:00:00.123456Z", 0.0005, "2026-01-01T00:00:00.123Z"),
        ("2026-12-31T23:59:59.900Z", 0.2, "2027-01-01T00:00:00.100Z"),
        ("2026-01-01T00:00:00", 60.0, "2026-01-01T00:01:00.000Z"),  # naive: taken as UTC
    ],
)
def test_sent_at_shift_formats(sent: str, waited: float, expected: str) -> None:
    event: dict[str, Any] = {"sentAt": sent}
    shift_sent_at(event, waited)
    assert event["sentAt"] == expected


@pytest.mark.parametrize("sent", ["yesterday", "", "2026-13-01T00:00:00Z", 1767225600, None])
def test_unparsable_sent_at_is_left_untouched(sent: object) -> None:
    event: dict[str, Any] = {"sentAt": sent, "timestamp": "2026-01-01T00:00:00Z"}
    shift_sent_at(event, 30.0)
    assert event == {"sentAt": sent, "timestamp": "2026-01-01T00:00:00Z"}


def test_missing_sent_at_is_not_invented() -> None:
    event: dict[str, Any] = {"timestamp": "2026-01-01T00:00:00Z"}
    shift_sent_at(event, 30.0)
    assert event == {"timestamp": "2026-01-01T00:00:00Z"}


@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    st.floats(min_value=0.0005, max_value=86_400 * 3),
)
@settings(max_examples=300)
def test_analytics_js_timestamps_shift_like_full_iso_parsing(when: datetime, waited: float) -> None:
    # analytics.js's "...T19:11:13.967Z" takes a fast path; it must agree with datetime's.
    when = when.replace(microsecond=when.microsecond // 1000 * 1000)
    short = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    long = when.replace(tzinfo=UTC).isoformat()
    expected = when.replace(tzinfo=UTC) + timedelta(seconds=waited)
    for sent in (short, long):  # the same result, to the millisecond both are written to
        got = datetime.fromisoformat(shifted(sent, waited).replace("Z", "+00:00"))
        assert abs((got - expected).total_seconds()) < 0.0011


@pytest.mark.parametrize("waited", [0.0, -5.0])
def test_no_wait_no_shift(waited: float) -> None:
    event: dict[str, Any] = {"sentAt": "2026-01-01T00:00:00Z"}
    shift_sent_at(event, waited)
    assert event["sentAt"] == "2026-01-01T00:00:00Z"


def test_build_batches_shifts_sent_at_by_the_rows_wait() -> None:
    sent = "2026-01-01T00:00:00.000Z"
    waited = row("k", {"type": "track", "messageId": "w", "sentAt": sent}, received_at=NOW - 42.5)
    fresh = row("k", {"type": "track", "messageId": "f", "sentAt": sent}, received_at=NOW)
    ts = row("k", {"type": "track", "messageId": "t", "timestamp": sent}, received_at=NOW - 10)
    (batch,) = build_batches([waited, fresh, ts], NOW)
    events = decoded(batch)
    assert events[0]["sentAt"] == "2026-01-01T00:00:42.500Z"
    assert events[1]["sentAt"] == sent
    assert events[2] == {"type": "track", "messageId": "t", "timestamp": sent}
    # the queued row itself is not modified (a retry shifts from the original again)
    assert orjson.loads(waited.body)["sentAt"] == sent


def test_shift_is_relative_to_received_at_so_retries_do_not_accumulate() -> None:
    r = row("k", {"messageId": "m", "sentAt": "2026-01-01T00:00:00.000Z"}, received_at=NOW)
    first = decoded(build_batches([r], NOW + 5)[0])[0]["sentAt"]
    second = decoded(build_batches([r], NOW + 65)[0])[0]["sentAt"]
    expected = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=65)
    assert first == "2026-01-01T00:00:05.000Z"
    assert second == expected.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Rows stored with sentAt beside the body (ingest keeps it out of the stored event)


def split_row(
    key: str, event: dict[str, Any], sent_at: str | None, *, received_at: float = NOW
) -> Row:
    return Row(next(_ids), key, "event", received_at, 0, orjson.dumps(event), sent_at)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", b'{"sentAt":"2026-01-01T00:00:00Z"}'),
        (b'{"a":1}', b'{"a":1,"sentAt":"2026-01-01T00:00:00Z"}'),
        (b'{"a":{"b":[]}}', b'{"a":{"b":[]},"sentAt":"2026-01-01T00:00:00Z"}'),
    ],
)
def test_the_restored_sent_at_closes_the_stored_event(body: bytes, expected: bytes) -> None:
    stored = Row(next(_ids), "k", "event", NOW, 0, body, "2026-01-01T00:00:00Z")
    (batch,) = build_batches([stored], NOW)  # no wait: sentAt as it came
    assert batch.body() == b'{"batch":[' + expected + b"]}"


def test_the_restored_sent_at_is_escaped() -> None:
    stored = Row(next(_ids), "k", "event", NOW - 5, 0, b'{"a":1}', 'x"},"evil":"')
    (batch,) = build_batches([stored], NOW)
    assert decoded(batch) == [{"a": 1, "sentAt": 'x"},"evil":"'}]


@pytest.mark.parametrize(
    ("sent", "waited", "expected"),
    [
        ("2026-01-01T00:00:00.000Z", 2.5, "2026-01-01T00:00:02.500Z"),
        ("2026-01-01T00:00:00Z", 0.0, "2026-01-01T00:00:00Z"),  # no wait: verbatim
        ("2026-01-01T00:00:00Z", -1.0, "2026-01-01T00:00:00Z"),
        ("garbage", 10.0, "garbage"),
    ],
)
def test_shifted(sent: str, waited: float, expected: str) -> None:
    assert shifted(sent, waited) == expected


@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    st.floats(min_value=-1.0, max_value=86_400 * 3),
)
@settings(max_examples=300)
def test_the_restored_sent_at_field_holds_the_shifted_value(when: datetime, waited: float) -> None:
    # The forwarder writes the field from cached halves once a second has been seen: the
    # first and every later event of that second get what shifted() gives.
    sent = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    for _ in range(3):
        field = sent_at_field(sent, waited)
        assert field.startswith(b',"sentAt":"') and field.endswith(b'"}')
        assert json.loads(b"{" + field[1:]) == {"sentAt": shifted(sent, waited)}


@pytest.mark.parametrize(
    "sent",
    [
        "2026-01-01T00:00:00.\u00b2\u00b2\u00b2Z",  # digits str.isdigit() takes, int() refuses
        "2026-01-01T00:00:01.\u0663\u0663\u0663Z",  # Arabic-Indic digits
        'x"},"evil":"',
        "2026-01-01T00:00:00.12Z ",
    ],
)
def test_an_odd_sent_at_is_sent_as_it_came_and_never_stops_a_batch(sent: str) -> None:
    for received_at in (NOW, NOW - 2):  # twice: once from a second already seen
        odd = split_row("k", {"messageId": "odd"}, sent, received_at=received_at)
        fine = split_row("k", {"messageId": "fine"}, "2026-01-01T00:00:00.000Z")
        (batch,) = build_batches([odd, fine], NOW)
        events = decoded(batch)
        assert events[0] == {"messageId": "odd", "sentAt": sent}
        assert events[1] == {"messageId": "fine", "sentAt": "2026-01-01T00:00:00.000Z"}


def test_row_sent_at_is_put_back_shifted_by_the_wait() -> None:
    a = split_row(
        "k", {"type": "track", "messageId": "a"}, "2026-01-01T00:00:00.000Z", received_at=NOW - 3.25
    )
    b = split_row("k", {"type": "track", "messageId": "b"}, "2026-01-01T00:00:00.000Z")
    c = split_row("k", {"type": "track", "messageId": "c"}, "not a time", received_at=NOW - 9)
    d = split_row(
        "k",
        {"type": "track", "messageId": "d", "timestamp": "2026-01-01T00:00:00Z"},
        None,
        received_at=NOW - 9,
    )
    (batch,) = build_batches([a, b, c, d], NOW)
    events = decoded(batch)
    assert events[0] == {"type": "track", "messageId": "a", "sentAt": "2026-01-01T00:00:03.250Z"}
    assert events[1] == {"type": "track", "messageId": "b", "sentAt": "2026-01-01T00:00:00.000Z"}
    assert events[2]["sentAt"] == "not a time"
    assert events[3] == {"type": "track", "messageId": "d", "timestamp": "2026-01-01T00:00:00Z"}
    assert a.body == b'{"type":"track","messageId":"a"}'  # the stored row is untouched


def test_batch_size_counts_the_restored_sent_at() -> None:
    sent = "2026-01-01T00:00:00.000Z"
    rows = [split_row("k", {"messageId": f"m{i}"}, sent) for i in range(10)]
    one = len(build_batches(rows[:1], NOW)[0].body()) - ENVELOPE  # one restored event
    limit = ENVELOPE + 3 * one + 2 + 1  # room for exactly three restored events
    batches = build_batches(rows, NOW, max_bytes=limit)
    assert [len(b.rows) for b in batches] == [3, 3, 3, 1]
    assert all(len(b.body()) <= limit for b in batches)


# ---------------------------------------------------------------------------------------------
# build_batches


def test_rows_are_grouped_per_write_key_in_order() -> None:
    rows = [row("a"), row("b"), row("a"), row("c"), row("b"), row("a")]
    batches = build_batches(rows, NOW)
    assert [b.write_key for b in batches] == ["a", "b", "c"]
    for b in batches:
        assert all(r.write_key == b.write_key for r in b.rows)
        assert ids(b) == sorted(ids(b))
        assert [e["messageId"] for e in decoded(b)] == [
            orjson.loads(r.body)["messageId"] for r in b.rows
        ]
    assert sorted(i for b in batches for i in ids(b)) == sorted(r.id for r in rows)


def test_body_is_the_rows_bytes_verbatim() -> None:
    bodies = [b'{"type":"track","messageId":"x","properties":{"n":1.5,"u":"\\u00e9"}}', b"{}"]
    rows = [Row(i, "k", "event", NOW, 0, b) for i, b in enumerate(bodies)]
    (batch,) = build_batches(rows, NOW)
    assert batch.body() == b'{"batch":[' + b",".join(bodies) + b"]}"


def test_empty_input_gives_no_batches() -> None:
    assert build_batches([], NOW) == []


def test_event_count_limit_is_exact() -> None:
    rows = [row("k") for _ in range(MAX_BATCH_EVENTS * 2 + 1)]
    batches = build_batches(rows, NOW)
    assert [len(b.rows) for b in batches] == [MAX_BATCH_EVENTS, MAX_BATCH_EVENTS, 1]
    assert [len(decoded(b)) for b in batches] == [MAX_BATCH_EVENTS, MAX_BATCH_EVENTS, 1]


def test_byte_limit_is_respected_with_the_real_segment_limit() -> None:
    # ~30 KB events (just under Segment's 32 KB per-event limit)
    rows = [row("k", pad=30_000) for _ in range(40)]
    batches = build_batches(rows, NOW)
    assert len(batches) > 1
    for b in batches:
        assert len(b.body()) <= MAX_BATCH_BYTES == 500 * 1024
        decoded(b)
    # every batch but the last is full: the next row would not have fitted
    for b, nxt in itertools.pairwise(batches):
        assert len(b.body()) + 1 + len(nxt.rows[0].body) > MAX_BATCH_BYTES - 1


def test_byte_limit_boundary() -> None:
    # Three parts of 10 bytes: body = 12 + 10 + 1 + 10 = 33 bytes for two, 44 for three.
    parts = [b'{"a":"12"}'] * 3
    assert all(len(p) == 10 for p in parts)
    rows = [Row(i, "k", "event", NOW, 0, p) for i, p in enumerate(parts)]
    assert [len(b.rows) for b in build_batches(rows, NOW, max_bytes=45)] == [3]
    # A body of exactly max_bytes may be split (the batcher counts one byte conservatively).
    assert [len(b.rows) for b in build_batches(rows, NOW, max_bytes=44)] in ([3], [2, 1])
    two_then_one = build_batches(rows, NOW, max_bytes=43)
    assert [len(b.rows) for b in two_then_one] == [2, 1]
    assert all(len(b.body()) <= 43 for b in two_then_one)


def test_one_oversized_row_still_goes_alone() -> None:
    rows = [row("k"), row("k", pad=200), row("k")]
    batches = build_batches(rows, NOW, max_bytes=150)
    assert [len(b.rows) for b in batches] == [1, 1, 1]


def test_limits_are_per_key() -> None:
    rows = [row(k) for _ in range(5) for k in ("a", "b")]
    batches = build_batches(rows, NOW, max_events=3)
    assert sorted((b.write_key, len(b.rows)) for b in batches) == [
        ("a", 2),
        ("a", 3),
        ("b", 2),
        ("b", 3),
    ]


def test_full_batch_is_emitted_before_later_open_ones() -> None:
    rows = [row("a"), row("a"), row("b"), row("a")]
    batches = build_batches(rows, NOW, max_events=2)
    assert [(b.write_key, len(b.rows)) for b in batches] == [("a", 2), ("a", 1), ("b", 1)]


def replayed(key: str, sent_at: str | None = None, *, received_at: float = NOW) -> Row:
    """A dead letter put back by ``segproxy queue replay``."""
    i = next(_ids)
    body = orjson.dumps({"type": "track", "messageId": f"replayed-{i}"})
    return Row(i, key, "replay", received_at, 0, body, sent_at)


def test_a_replayed_dead_letter_goes_in_a_batch_of_its_own() -> None:
    # So that Segment's answer is about it alone: refused again, it is the only dead letter;
    # accepted, nothing else rode on it.
    first, again, last = row("k"), replayed("k"), row("k")
    other = row("j")
    batches = build_batches([first, again, other, last], NOW)
    by_ids = sorted(ids(b) for b in batches)
    assert by_ids == sorted([[first.id, last.id], [again.id], [other.id]])
    (alone,) = [b for b in batches if ids(b) == [again.id]]
    assert alone.write_key == "k"
    assert [e["messageId"] for e in decoded(alone)] == [orjson.loads(again.body)["messageId"]]


def test_replayed_dead_letters_each_go_alone_with_their_sent_at_restored() -> None:
    rows = [replayed("k", "2026-01-01T00:00:00.000Z", received_at=NOW - 2.5) for _ in range(3)]
    batches = build_batches(rows, NOW)
    assert [ids(b) for b in batches] == [[r.id] for r in rows]
    for b in batches:
        (event,) = decoded(b)
        assert event["sentAt"] == "2026-01-01T00:00:02.500Z"  # moved by its 2.5 s wait


keys = st.sampled_from(["wk_a", "wk_b", "wk_c", ""])
events = st.fixed_dictionaries(
    {"type": st.just("track"), "messageId": st.uuids().map(str)},
    optional={
        "sentAt": st.sampled_from(["2026-01-01T00:00:00.000Z", "not a date"]),
        "properties": st.dictionaries(st.text(max_size=5), st.text(max_size=40), max_size=3),
    },
)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            keys,
            events,
            st.floats(min_value=NOW - 100, max_value=NOW),
            st.none() | st.sampled_from(["2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00Z", "?"]),
            st.sampled_from(["event", "event", "event", "replay"]),
        ),
        max_size=60,
    ),
    st.integers(min_value=700, max_value=3000),
    st.integers(min_value=1, max_value=7),
)
def test_every_row_lands_in_exactly_one_valid_batch(
    specs: list[tuple[str, dict[str, Any], float, str | None, RowKind]],
    max_bytes: int,
    max_events: int,
) -> None:
    rows: list[Row] = []
    for i, (key, ev, received, sent_at, kind) in enumerate(specs):
        if sent_at is not None:
            ev = {k: v for k, v in ev.items() if k != "sentAt"}  # as ingest stores it
        rows.append(Row(i, key, kind, received, 0, orjson.dumps(ev), sent_at))
    batches = build_batches(rows, NOW, max_bytes=max_bytes, max_events=max_events)
    seen = [r.id for b in batches for r in b.rows]
    assert sorted(seen) == [r.id for r in rows]  # each row exactly once
    for b in batches:
        assert b.rows
        assert {r.write_key for r in b.rows} == {b.write_key}
        assert len(b.rows) <= max_events
        body = b.body()
        assert len(body) <= max_bytes  # rows are far below the limit: always splittable
        sent = decoded(b)
        assert [e["messageId"] for e in sent] == [orjson.loads(r.body)["messageId"] for r in b.rows]
        for e, r in zip(sent, b.rows, strict=True):
            if r.sent_at is not None:
                assert e["sentAt"] == shifted(r.sent_at, NOW - r.received_at)
        if any(r.kind == "replay" for r in b.rows):
            assert len(b.rows) == 1  # a replayed dead letter goes alone
    for key in {r.write_key for r in rows}:
        in_order = [
            r.id for b in batches if b.write_key == key for r in b.rows if r.kind == "event"
        ]
        assert in_order == [r.id for r in rows if r.write_key == key and r.kind == "event"]
