"""Tracking API request validation: media type, gzip, JSON, write key, Segment's size limits."""

from __future__ import annotations

import base64
import gzip
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.config import LimitsConfig
from segproxy.ingest import prepare
from segproxy.ingest.parse import (
    MAX_GZIP_MEMBERS,
    IngestError,
    Payload,
    decode_body,
    enrich,
    parse,
    parse_single,
    write_key_from_auth,
)
from segproxy.queue.base import NewRow

LIMITS = LimitsConfig()
KEY = "wk_live_123"
NO_ALLOW_LIST: frozenset[str] = frozenset()


def basic(key: str) -> bytes:
    return b"Basic " + base64.b64encode(key.encode() + b":")


def body(doc: object) -> bytes:
    return orjson.dumps(doc)


def accept(
    endpoint: str,
    data: bytes,
    *,
    content_type: bytes | None = b"application/json",
    encoding: bytes | None = None,
    auth: bytes | None = None,
    limits: LimitsConfig = LIMITS,
    allowed: frozenset[str] = NO_ALLOW_LIST,
) -> Payload:
    decoded = decode_body(data, content_type, encoding, limits)
    return parse(endpoint, decoded, auth, limits, allowed)


def refused(endpoint: str, data: bytes, **kwargs: Any) -> IngestError:
    with pytest.raises(IngestError) as info:
        accept(endpoint, data, **kwargs)
    return info.value


def stored(endpoint: str, data: bytes, **kwargs: Any) -> list[NewRow]:
    """The whole of ingest's pure part: the queue rows a request becomes, as they will be sent."""
    payload = accept(endpoint, data, **kwargs)
    enrich(payload, "203.0.113.7")
    return prepare.rows(payload, 1_700_000_000.0, kwargs.get("limits", LIMITS))


def refused_when_stored(endpoint: str, data: bytes, **kwargs: Any) -> IngestError:
    with pytest.raises(IngestError) as info:
        stored(endpoint, data, **kwargs)
    return info.value


def track(**extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Order Completed", "messageId": "m-1", **extra}


# ---------------------------------------------------------------------------------------------
# Media types and content encodings


def test_browser_text_plain_json_is_accepted() -> None:
    payload = accept("t", body(track(writeKey=KEY)), content_type=b"text/plain")
    assert payload.write_key == KEY
    assert payload.events == [payload.doc]


@pytest.mark.parametrize(
    "ctype",
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"Application/JSON;charset=UTF-8",
        b"text/plain;charset=UTF-8",
        b"",
        None,
    ],
)
def test_json_media_types_with_or_without_charset_are_accepted(ctype: bytes | None) -> None:
    assert accept("t", body(track(writeKey=KEY)), content_type=ctype).write_key == KEY


@pytest.mark.parametrize(
    "ctype",
    [
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=xyz",
        b"text/html",
        b"application/xml",
    ],
)
def test_form_and_other_media_types_are_refused_with_415(ctype: bytes) -> None:
    error = refused("t", body(track(writeKey=KEY)), content_type=ctype)
    assert (error.status, error.code) == (415, "unsupported_media_type")


@pytest.mark.parametrize("coding", [b"gzip", b"x-gzip", b"GZIP"])
def test_gzip_body_is_decoded_like_analytics_python_sends_it(coding: bytes) -> None:
    doc = {"batch": [track(), track(messageId="m-2")], "sentAt": "2026-01-01T00:00:00Z"}
    payload = accept("batch", gzip.compress(body(doc)), encoding=coding, auth=basic(KEY))
    assert payload.doc == doc
    assert len(payload.events) == 2


@pytest.mark.parametrize("coding", [b"", b"identity"])
def test_identity_encoding_is_the_body_as_sent(coding: bytes) -> None:
    assert accept("t", body(track(writeKey=KEY)), encoding=coding).doc == track(writeKey=KEY)


@pytest.mark.parametrize("coding", [b"br", b"deflate", b"zstd", b"gzip, gzip"])
def test_unsupported_content_encoding_is_refused(coding: bytes) -> None:
    error = refused("t", body(track(writeKey=KEY)), encoding=coding)
    assert (error.status, error.code) == (400, "bad_encoding")


def test_gzip_bomb_is_stopped_at_max_decompressed_bytes() -> None:
    limits = LimitsConfig(max_decompressed_bytes=64 * 1024, max_request_bytes=32 * 1024)
    bomb = gzip.compress(b'{"a":"' + b"0" * (8 * 1024 * 1024) + b'"}')
    assert len(bomb) < 16 * 1024
    error = refused("t", bomb, encoding=b"gzip", auth=basic(KEY), limits=limits)
    assert (error.status, error.code) == (400, "request_too_large")
    assert str(64 * 1024) in error.message


def test_gzip_body_just_within_the_decompressed_limit_is_accepted() -> None:
    limits = LimitsConfig(max_decompressed_bytes=4096, max_request_bytes=4096)
    doc = track(writeKey=KEY, pad="x" * 3000)
    assert accept("t", gzip.compress(body(doc)), encoding=b"gzip", limits=limits).doc == doc


def test_truncated_gzip_is_refused() -> None:
    data = gzip.compress(body(track(writeKey=KEY, pad="y" * 2000)))
    error = refused("t", data[: len(data) // 2], encoding=b"gzip")
    assert (error.status, error.code) == (400, "bad_gzip")


def test_body_that_is_not_gzip_but_says_so_is_refused() -> None:
    error = refused("t", body(track(writeKey=KEY)), encoding=b"gzip")
    assert (error.status, error.code) == (400, "bad_gzip")


def test_multi_member_gzip_body_is_decoded_whole() -> None:
    data = body(track(writeKey=KEY))
    members = gzip.compress(data[:10]) + gzip.compress(data[10:])
    assert accept("t", members, encoding=b"gzip").doc == track(writeKey=KEY)


def in_members(data: bytes, count: int) -> bytes:
    """``data`` as ``count`` gzip members (the first holds it all, the others are empty)."""
    return gzip.compress(data) + gzip.compress(b"") * (count - 1)


def test_a_body_of_up_to_16_gzip_members_is_decoded() -> None:
    data = body(track(writeKey=KEY))
    doc = accept("t", in_members(data, MAX_GZIP_MEMBERS), encoding=b"gzip").doc
    assert doc == track(writeKey=KEY)


def test_many_empty_gzip_members_are_refused_without_decoding_them_all() -> None:
    """The reproduction: 26,214 empty members in 512 KB. Work is bounded: after 16 members
    nothing more is decoded, so a 17th member that is not even gzip is never looked at."""
    data = body(track(writeKey=KEY))
    error = refused("t", in_members(data, 26_214), encoding=b"gzip")
    assert (error.status, error.code) == (400, "too_many_gzip_members")
    assert "16" in error.message
    never_read = in_members(data, MAX_GZIP_MEMBERS) + b"not gzip at all"
    assert refused("t", never_read, encoding=b"gzip").code == "too_many_gzip_members"
    assert refused("t", in_members(data, MAX_GZIP_MEMBERS + 1), encoding=b"gzip").code == (
        "too_many_gzip_members"
    )


# ---------------------------------------------------------------------------------------------
# JSON


@pytest.mark.parametrize("data", [b"", b"{", b"{'a': 1}", b'{"a":1}{"b":2}', b"NaN", b'{"a":}'])
def test_invalid_json_is_refused_with_400(data: bytes) -> None:
    error = refused("t", data)
    assert (error.status, error.code) == (400, "invalid_json")


def test_invalid_utf8_is_refused_with_its_own_code() -> None:
    error = refused("t", b'{"type":"track","event":"caf\xe9","writeKey":"k"}')
    assert (error.status, error.code) == (400, "invalid_utf8")


@pytest.mark.parametrize("data", [b"[]", b"[{}]", b"1", b'"track"', b"null", b"true"])
def test_json_that_is_not_an_object_is_refused(data: bytes) -> None:
    error = refused("t", data)
    assert (error.status, error.code) == (400, "not_an_object")


# ---------------------------------------------------------------------------------------------
# Write key


def test_basic_auth_user_is_the_write_key_and_wins_over_the_body() -> None:
    payload = accept("t", body(track(writeKey="wk_body")), auth=basic(KEY))
    assert payload.write_key == KEY


def test_basic_scheme_is_case_insensitive() -> None:
    auth = b"basic " + base64.b64encode(KEY.encode() + b":")
    assert accept("t", body(track()), auth=auth).write_key == KEY


def test_basic_auth_without_the_colon_still_names_the_key() -> None:
    auth = b"Basic " + base64.b64encode(KEY.encode())
    assert accept("t", body(track()), auth=auth).write_key == KEY


def test_bearer_auth_falls_back_to_the_write_key_in_the_body() -> None:
    payload = accept("t", body(track(writeKey=KEY)), auth=b"Bearer some-token")
    assert payload.write_key == KEY


def test_body_write_key_is_used_without_authorization() -> None:
    payload = accept("b", body({"writeKey": KEY, "batch": [track()]}))
    assert payload.write_key == KEY


@pytest.mark.parametrize("auth", [b"Basic !!!not-base64!!!", b"Basic a", b"Basic " + b"\xff\xfe"])
def test_basic_auth_that_is_not_base64_is_refused_with_401(auth: bytes) -> None:
    error = refused("t", body(track(writeKey=KEY)), auth=auth)
    assert (error.status, error.code) == (401, "bad_authorization")


def test_basic_auth_that_is_not_utf8_is_refused_with_401() -> None:
    auth = b"Basic " + base64.b64encode(b"\xff\xfe:")
    error = refused("t", body(track()), auth=auth)
    assert (error.status, error.code) == (401, "bad_authorization")


@pytest.mark.parametrize("key", [None, "", 123, ["wk"]])
def test_missing_write_key_is_refused_with_401(key: object) -> None:
    doc = track() if key is None else track(writeKey=key)
    error = refused("t", body(doc))
    assert (error.status, error.code) == (401, "missing_write_key")


def test_empty_basic_user_and_no_body_key_is_missing_write_key() -> None:
    error = refused("t", body(track()), auth=b"Basic " + base64.b64encode(b":"))
    assert (error.status, error.code) == (401, "missing_write_key")


def test_a_write_key_of_256_bytes_is_accepted_from_basic_auth_or_the_body() -> None:
    key = "k" * 256
    assert accept("t", body(track()), auth=basic(key)).write_key == key
    assert accept("t", body(track(writeKey=key))).write_key == key
    wide = "\u00e9" * 128  # 128 characters, 256 bytes in UTF-8
    assert accept("t", body(track(writeKey=wide))).write_key == wide


@pytest.mark.parametrize("key", ["k" * 257, "\u00e9" * 129, "k" * 100_000])
def test_a_write_key_over_256_bytes_is_refused_from_basic_auth_or_the_body(key: str) -> None:
    error = refused("t", body(track()), auth=basic(key))
    assert (error.status, error.code) == (400, "write_key_too_long")
    assert "256" in error.message
    error = refused("b", body({"writeKey": key, "batch": [track()]}))
    assert (error.status, error.code) == (400, "write_key_too_long")


def test_a_refused_long_basic_key_never_reaches_the_fast_lane() -> None:
    auth = basic("k" * 300)
    with pytest.raises(IngestError):
        write_key_from_auth(auth)
    assert parse_single(body(track()), auth, LIMITS, NO_ALLOW_LIST, "::1") is None


def test_write_key_outside_the_allow_list_is_refused_with_403() -> None:
    error = refused("t", body(track()), auth=basic("wk_other"), allowed=frozenset({KEY}))
    assert (error.status, error.code) == (403, "write_key_not_allowed")
    error = refused("t", body(track(writeKey="wk_other")), allowed=frozenset({KEY}))
    assert error.status == 403


def test_write_key_in_the_allow_list_is_accepted() -> None:
    payload = accept("t", body(track()), auth=basic(KEY), allowed=frozenset({KEY, "wk_2"}))
    assert payload.write_key == KEY


def test_metrics_endpoint_needs_no_write_key() -> None:
    doc = {"series": [{"type": "Counter", "metric": "analytics_js.invoke", "value": 1}]}
    payload = accept("m", body(doc), content_type=b"text/plain", allowed=frozenset({KEY}))
    assert payload.write_key is None
    assert payload.doc == doc
    assert payload.events == []


def test_metrics_endpoint_still_needs_a_json_object() -> None:
    assert refused("m", b"[]").code == "not_an_object"


# ---------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("endpoint", ["b", "batch", "import"])
def test_batch_endpoints_return_every_event(endpoint: str) -> None:
    events = [track(messageId=f"m{i}") for i in range(3)]
    payload = accept(endpoint, body({"batch": events}), auth=basic(KEY))
    assert payload.events == events
    assert payload.events[0] is payload.doc["batch"][0]  # enrich edits the forwarded doc


@pytest.mark.parametrize("batch", [None, {}, "[]", 3])
def test_batch_that_is_not_a_list_is_refused(batch: object) -> None:
    doc: dict[str, object] = {"writeKey": KEY}
    if batch is not None:
        doc["batch"] = batch
    error = refused("batch", body(doc))
    assert (error.status, error.code) == (400, "bad_batch")


def test_batch_item_that_is_not_an_object_is_refused_by_index() -> None:
    error = refused("batch", body({"writeKey": KEY, "batch": [track(), "track"]}))
    assert (error.status, error.code) == (400, "bad_event")
    assert "batch[1]" in error.message


@pytest.mark.parametrize("event_type", [None, 1, ["track"]])
def test_batch_item_without_a_string_type_is_refused(event_type: object) -> None:
    event: dict[str, object] = {"event": "x"}
    if event_type is not None:
        event["type"] = event_type
    error = refused("batch", body({"writeKey": KEY, "batch": [track(), event]}))
    assert (error.status, error.code) == (400, "bad_event")
    assert "batch[1]" in error.message


def test_batch_of_2500_events_is_accepted_and_2501_refused() -> None:
    events = [{"type": "track", "event": "e"}] * 2500
    assert len(accept("batch", body({"batch": events}), auth=basic(KEY)).events) == 2500
    error = refused("batch", body({"batch": [*events, events[0]]}), auth=basic(KEY))
    assert (error.status, error.code) == (400, "too_many_events")
    assert "2500" in error.message


def test_event_context_must_be_an_object() -> None:
    assert refused("t", body(track(writeKey=KEY, context="web"))).code == "bad_event"
    error = refused("b", body({"writeKey": KEY, "batch": [track(context=[1])]}))
    assert (error.status, error.code) == (400, "bad_event")


# ---------------------------------------------------------------------------------------------
# Size limits: 32 KB per event, 500 KB per request (measured decompressed)


def padded_event(size: int) -> dict[str, Any]:
    """A track event whose compact JSON is exactly ``size`` bytes."""
    event = track(properties={"pad": ""})
    event["properties"]["pad"] = "x" * (size - len(body(event)))
    assert len(body(event)) == size
    return event


def test_event_over_32_kb_in_a_batch_is_refused_by_index() -> None:
    batch = [track(), padded_event(32 * 1024 + 1)]
    error = refused_when_stored("batch", body({"batch": batch}), auth=basic(KEY))
    assert (error.status, error.code) == (400, "event_too_large")
    assert "batch[1]" in error.message
    assert str(32 * 1024) in error.message


def test_single_event_over_32_kb_is_refused() -> None:
    error = refused_when_stored("t", body(padded_event(40 * 1024)), auth=basic(KEY))
    assert (error.status, error.code) == (400, "event_too_large")


def test_single_event_with_insignificant_whitespace_is_measured_compactly() -> None:
    event = padded_event(30 * 1024)
    spaced = orjson.dumps(event, option=orjson.OPT_INDENT_2) + b" " * (4 * 1024)
    assert len(spaced) > 32 * 1024
    (row,) = stored("t", spaced, auth=basic(KEY))
    assert orjson.loads(row.body)["properties"] == event["properties"]


def test_batch_of_many_large_events_under_500_kb_is_accepted() -> None:
    batch = [padded_event(30 * 1024) for _ in range(15)]  # ~450 KB, like a browser flush
    assert len(accept("b", body({"batch": batch}), auth=basic(KEY)).events) == 15


def test_request_over_500_kb_is_refused() -> None:
    batch = [padded_event(30 * 1024) for _ in range(17)]  # ~510 KB
    data = body({"batch": batch})
    assert len(data) > 500 * 1024
    error = refused("b", data, auth=basic(KEY))
    assert (error.status, error.code) == (400, "request_too_large")
    assert str(500 * 1024) in error.message


def test_request_limit_applies_to_the_decompressed_gzip_body() -> None:
    batch = [padded_event(30 * 1024) for _ in range(17)]
    data = gzip.compress(body({"batch": batch}))
    assert len(data) < 500 * 1024
    error = refused("b", data, encoding=b"gzip", auth=basic(KEY))
    assert (error.status, error.code) == (400, "request_too_large")


def test_configured_limits_are_the_ones_applied() -> None:
    limits = LimitsConfig(max_event_bytes=100, max_batch_events=2)
    error = refused_when_stored("t", body(padded_event(101)), auth=basic(KEY), limits=limits)
    assert error.code == "event_too_large"
    three = {"batch": [track(), track(), track()]}
    assert refused("b", body(three), auth=basic(KEY), limits=limits).code == "too_many_events"


def test_deeply_nested_batch_event_is_refused_with_400_not_a_crash() -> None:
    nested = b"[" * 300 + b"]" * 300
    data = b'{"writeKey":"k","batch":[{"type":"track","properties":{"x":' + nested + b"}}]}"
    error = refused_when_stored("batch", data)
    assert error.status == 400


# ---------------------------------------------------------------------------------------------
# enrich: context.ip from the real client


def test_enrich_creates_context_with_the_client_ip() -> None:
    payload = accept("t", body(track(writeKey=KEY)))
    enrich(payload, "203.0.113.7")
    assert payload.doc["context"] == {"ip": "203.0.113.7"}


@pytest.mark.parametrize("context", [{}, {"ip": ""}, {"ip": None}, None])
def test_enrich_fills_an_absent_or_empty_ip(context: dict[str, Any] | None) -> None:
    payload = accept("t", body(track(writeKey=KEY, context=context)))
    enrich(payload, "203.0.113.7")
    assert payload.doc["context"]["ip"] == "203.0.113.7"


def test_enrich_keeps_an_ip_the_event_already_has_and_other_context() -> None:
    context = {"ip": "198.51.100.9", "library": {"name": "analytics.js", "version": "next-1"}}
    payload = accept("t", body(track(writeKey=KEY, context=context)))
    enrich(payload, "203.0.113.7")
    assert payload.doc["context"] == context


def test_enrich_sets_the_ip_on_every_batch_event_that_lacks_one() -> None:
    batch = [track(), track(context={"ip": "198.51.100.9"}), track(context={"locale": "en"})]
    payload = accept("b", body({"batch": batch}), auth=basic(KEY))
    enrich(payload, "2001:db8::7")
    ips = [event["context"]["ip"] for event in payload.doc["batch"]]
    assert ips == ["2001:db8::7", "198.51.100.9", "2001:db8::7"]
    assert payload.doc["batch"][2]["context"]["locale"] == "en"
    assert "context" not in payload.doc  # the envelope is not an event


@pytest.mark.parametrize("batch_ip", ["198.51.100.1", 5, ["x"], {"v": 6}])
def test_a_batchs_own_context_ip_stands_for_its_events_as_the_client_sent_it(
    batch_ip: object,
) -> None:
    doc = {"batch": [track(), track(context={"ip": "10.0.0.1"})], "context": {"ip": batch_ip}}
    payload = accept("b", body(doc), auth=basic(KEY))
    enrich(payload, "203.0.113.7")
    assert [event["context"]["ip"] for event in payload.doc["batch"]] == [batch_ip, "10.0.0.1"]


def test_enrich_leaves_metrics_untouched() -> None:
    doc = {"series": [{"type": "Counter", "metric": "m", "value": 1, "tags": {}}]}
    payload = accept("m", body(doc))
    enrich(payload, "203.0.113.7")
    assert payload.doc == doc


# ---------------------------------------------------------------------------------------------
# Property: any request is a payload or a 400/401/403/415, never another exception.

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
events = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.one_of(st.sampled_from(["track", "identify"]), json_values),
            "context": st.one_of(st.dictionaries(st.text(max_size=4), json_values), json_values),
            "properties": json_values,
        },
    ),
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "writeKey": st.one_of(st.just(KEY), json_values),
        "batch": st.one_of(st.lists(events, max_size=4), json_values),
        "type": st.text(max_size=6),
        "context": json_values,
    },
)


def _document_bytes(doc: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(doc)
    except TypeError:  # e.g. a lone surrogate in generated text
        return b"{}"


bodies = st.one_of(
    st.binary(max_size=200),
    documents.map(_document_bytes),
    st.binary(max_size=100).map(gzip.compress),
    documents.map(_document_bytes).map(gzip.compress),
    documents.map(_document_bytes).map(lambda b: gzip.compress(b)[:-3]),
)
auths = st.one_of(
    st.none(),
    st.binary(max_size=30),
    st.sampled_from([basic(KEY), basic("wk_other"), b"Basic ", b"Basic ===", b"Bearer x"]),
    st.binary(max_size=20).map(lambda b: b"Basic " + base64.b64encode(b)),
)


@settings(max_examples=200, deadline=None)
@given(
    endpoint=st.sampled_from(["t", "p", "track", "b", "batch", "import", "m"]),
    data=bodies,
    content_type=st.one_of(
        st.none(),
        st.binary(max_size=20),
        st.sampled_from([b"text/plain", b"application/json; charset=utf-8", b"text/html"]),
    ),
    encoding=st.one_of(st.none(), st.sampled_from([b"gzip", b"identity", b"br"])),
    auth=auths,
    allowed=st.sampled_from([NO_ALLOW_LIST, frozenset({KEY})]),
)
def test_any_request_is_a_payload_or_a_client_error(
    endpoint: str,
    data: bytes,
    content_type: bytes | None,
    encoding: bytes | None,
    auth: bytes | None,
    allowed: frozenset[str],
) -> None:
    limits = LimitsConfig(max_event_bytes=64, max_batch_events=3)
    try:
        payload = accept(
            endpoint,
            data,
            content_type=content_type,
            encoding=encoding,
            auth=auth,
            limits=limits,
            allowed=allowed,
        )
    except IngestError as exc:
        assert exc.status in {400, 401, 403, 415}
        assert exc.code
        return
    assert isinstance(payload.doc, dict)
    if endpoint == "m":
        assert payload.write_key is None
        return
    assert payload.write_key
    assert not allowed or payload.write_key in allowed
    assert all(isinstance(event, dict) for event in payload.events)
    enrich(payload, "203.0.113.7")
    for event in payload.events:
        assert event["context"]["ip"]
        assert event["messageId"]
    # Then as forwarded (passthrough) or stored (queue): rows, or a named 400.
    try:
        prepare.forwarded_body(payload, limits)
        rows = prepare.rows(payload, 0.0, limits)
    except IngestError as exc:
        assert exc.status == 400
        assert exc.code in {"event_too_large", "merged_too_large", "request_too_large", "bad_event"}
        return
    assert len(rows) == len(payload.events)
    for row in rows:
        assert prepare.sent_size(row.body, row.sent_at) <= limits.max_event_bytes


# ---------------------------------------------------------------------------------------------
# The fast lane: a single event from a client seen before, in one call


_CONTEXTS = st.one_of(
    st.none(),
    st.just({}),
    st.fixed_dictionaries({"ip": st.sampled_from(["", None, "198.51.100.4", 0])}),
    st.fixed_dictionaries({"library": st.just({"name": "analytics.js"})}),
    st.sampled_from(["not an object", 3, ["ip"]]),
)


_ABSENT = object()


@settings(max_examples=300, deadline=None)
@given(
    context=_CONTEXTS,
    with_context=st.booleans(),
    padding=st.text(max_size=90),
    auth=st.sampled_from([basic(KEY), basic("other_key"), b"Bearer abc", None]),
    allowed=st.sampled_from([NO_ALLOW_LIST, frozenset({KEY})]),
    garbage=st.sampled_from([b"", b"{", b"[1]", b"\xff"]),
    message_id=st.sampled_from([_ABSENT, "m-1", "", 5, None]),
    sent_at=st.sampled_from([_ABSENT, "2026-11-25T19:11:13.967Z", "2026-11-25T19:11:13Z", "x", 3]),
)
def test_fast_lane_reads_a_single_event_exactly_like_the_general_path(
    context: object,
    with_context: bool,
    padding: str,
    auth: bytes | None,
    allowed: frozenset[str],
    garbage: bytes,
    message_id: object,
    sent_at: object,
) -> None:
    limits = LimitsConfig(max_event_bytes=200)
    doc: dict[str, Any] = {"type": "track", "event": "Order Completed"}
    for name, value in (("messageId", message_id), ("sentAt", sent_at)):
        if value is not _ABSENT:
            doc[name] = value
    doc["properties"] = {"p": padding}
    if with_context:
        doc["context"] = context
    data = garbage or body(doc)
    if auth is not None and auth.startswith(b"Basic"):
        write_key_from_auth(auth)  # the header was seen before: the lane knows it
    lane = parse_single(data, auth, limits, allowed, "203.0.113.7")
    try:
        general = stored("track", data, auth=auth, limits=limits, allowed=allowed)
    except IngestError as exc:
        # A refusal is the general path's to name, or the lane's own row says the same.
        if lane is not None:
            with pytest.raises(IngestError) as info:
                prepare.single_row(lane[1], lane[0], "track", 0.0, limits)
            assert (info.value.code, info.value.message) == (exc.code, exc.message)
        return
    if lane is None:  # taken only by what the lane leaves to the general path
        assert auth is None or not auth.startswith(b"Basic") or len(data) > 200
        return
    doc, key = lane
    row = prepare.single_row(key, doc, "track", 1_700_000_000.0, limits)
    # The same row but for the messageId a missing one was given (random, on each path).
    assert _without_generated_id(row) == _without_generated_id(general[0])


def _without_generated_id(row: NewRow) -> tuple[object, ...]:
    event = orjson.loads(row.body)
    mid = event.get("messageId")
    assert isinstance(mid, str) and mid  # every event leaves with one
    if UUID4.match(mid):
        event["messageId"] = "generated"
    return (row.write_key, row.kind, row.received_at, event, row.sent_at)


def test_fast_lane_takes_the_usual_browser_event() -> None:
    auth = basic(KEY)
    write_key_from_auth(auth)
    lane = parse_single(body(track(context={"page": {}})), auth, LIMITS, NO_ALLOW_LIST, "::1")
    assert lane == (track(context={"page": {}, "ip": "::1"}), KEY)


# ---------------------------------------------------------------------------------------------
# sentAt: a timestamp of the shape clients write, or nothing


@pytest.mark.parametrize(
    "sent_at",
    [
        "2026-11-25T19:11:13.967Z",  # analytics.js, analytics-node, analytics-swift/kotlin
        "2026-11-25T19:11:13.967123+00:00",  # analytics-python (isoformat)
        "2026-11-25T19:11:13+00:00",  # analytics-python at a whole second, PHP date("c")
        "2026-11-25T19:11:13.9671234Z",  # .NET "o"
        "2026-11-25T19:11:13.967123456+01:00",  # Go RFC 3339 nano, with an offset
        "2026-11-25T19:11:13.967+0000",  # Java SimpleDateFormat "Z"
        "2026-11-25T19:11:13Z",
        "2026-11-25 19:11:13.967Z",  # RFC 3339's space
        "2026-11-25T19:11:13",  # no offset: read as UTC
        "2026-11-25T19:11Z",
        None,
    ],
)
def test_sent_at_in_every_shape_real_clients_send_is_accepted(sent_at: str | None) -> None:
    assert accept("t", body(track(writeKey=KEY, sentAt=sent_at))).events
    doc = {"batch": [track(sentAt=sent_at)], "sentAt": sent_at}
    assert accept("b", body(doc), auth=basic(KEY)).events


@pytest.mark.parametrize(
    "sent_at",
    [
        "x",
        "",
        "yesterday",
        "1700000000",
        "2026-13-01T00:00:00Z",
        "2026-11-25T24:00:00Z",
        "2026-11-25T19:11:13.967z",
        "2026-11-25T19:11:13.1234567890Z",
        "9999-12-31T23:59:59.999Z",
        "2026-11-25T19:11:13.967Z\n",
        "2026-01-01T00:00:00.\u00b2\u00b2\u00b2Z",
        "2026-11-25T19:11:13.967Z" + "0" * 5000,
        1700000000,
        {"at": "2026-11-25T19:11:13.967Z"},
    ],
)
def test_a_malformed_sent_at_is_refused_wherever_it_is(sent_at: object) -> None:
    error = refused("t", body(track(writeKey=KEY, sentAt=sent_at)))
    assert (error.status, error.code) == (400, "bad_sent_at")
    assert "the event's sentAt" in error.message
    assert len(error.message) < 200  # a long value is not echoed whole
    error = refused("b", body({"batch": [track()], "sentAt": sent_at}), auth=basic(KEY))
    assert (error.code, "the batch's sentAt" in error.message) == ("bad_sent_at", True)
    error = refused("b", body({"batch": [track(), track(sentAt=sent_at)]}), auth=basic(KEY))
    assert (error.code, "batch[1].sentAt" in error.message) == ("bad_sent_at", True)


# ---------------------------------------------------------------------------------------------
# messageId: set at accept time when the event has none


UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.mark.parametrize("message_id", [None, "", 7, ["m"]])
def test_an_event_without_a_usable_message_id_gets_a_uuid4(message_id: object) -> None:
    event: dict[str, object] = {"type": "track", "event": "e"}
    if message_id is not None:
        event["messageId"] = message_id
    payload = accept("b", body({"batch": [event, track(messageId="kept")]}), auth=basic(KEY))
    enrich(payload, "203.0.113.7")
    given, kept = payload.events
    assert UUID4.match(given["messageId"])
    assert kept["messageId"] == "kept"
    rows = stored("t", body({k: v for k, v in event.items()}), auth=basic(KEY))
    assert UUID4.match(orjson.loads(rows[0].body)["messageId"])


def test_events_without_a_message_id_each_get_their_own() -> None:
    payload = accept("b", body({"batch": [{"type": "track"}] * 3}), auth=basic(KEY))
    enrich(payload, "203.0.113.7")
    assert len({e["messageId"] for e in payload.events}) == 3


@pytest.mark.parametrize("odd", ["\u00b2\u00b2\u00b2", "1a3", "+12", " 12"])
def test_a_sent_at_in_a_second_seen_before_is_still_checked_whole(odd: str) -> None:
    second = "2026-11-25T19:11:13"
    assert accept("t", body(track(writeKey=KEY, sentAt=f"{second}.967Z"))).events
    error = refused("t", body(track(writeKey=KEY, sentAt=f"{second}.{odd}Z")))
    assert error.code == "bad_sent_at"
