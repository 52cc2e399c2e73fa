"""Settings and script rewrites: the browser is pointed at the proxy, everything else is kept."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.cdn.rewrite import (
    CDN_PRELUDE,
    RewriteError,
    rewrite_script,
    settings_template,
)

PROXY_API = "shop.example.com:8443/seg/v1"

EU_SETTINGS: dict[str, Any] = {
    "integrations": {
        "Segment.io": {
            "apiKey": "wk_eu",
            "apiHost": "events.eu1.segmentapis.com/v1",
            "retryQueue": True,
            "addBundledMetadata": True,
            "unbundledIntegrations": [],
            "maybeBundledConfigIds": {},
            "versionSettings": {"version": "4.4.7", "componentTypes": ["browser"]},
            "deliveryStrategy": {"strategy": "batching", "config": {"size": 10, "timeout": 5000}},
        },
        "Google Analytics": {"trackingId": "UA-1", "anonymizeIp": False},
    },
    "plan": {"track": {"__default": {"enabled": True, "integrations": {}}}},
    "edgeFunction": {},
    "analyticsNextEnabled": True,
    "middlewareSettings": {},
    "enabledMiddleware": {},
    "metrics": {"sampleRate": 0.1, "host": "api.segment.io/v1", "flushTimer": 30000},
    "legacyVideoPluginsEnabled": False,
    "remotePlugins": [
        {
            "name": "Braze Web Mode (Actions)",
            "creationName": "Braze Web Mode (Actions)",
            "url": "https://cdn.segment.com/next-integrations/actions/braze/abc.js",
            "libraryName": "brazeDestination",
            "settings": {"api_key": "x", "versionSettings": {"componentTypes": []}},
        }
    ],
    "consentSettings": {"allCategories": []},
    "autoInstrumentationSettings": {"sampleRate": 0},
    "someFutureKey": {"nested": [1, 2.5, None, "x"]},
}


@dataclass(frozen=True)
class RewrittenSettings:
    body: bytes
    upstream_api_host: str | None


def rewrite_settings(raw: bytes, api_host: str, protocol: str) -> RewrittenSettings:
    """One rendering, as the CDN service makes it: a template per fill, rendered per origin."""
    template = settings_template(raw)
    return RewrittenSettings(template.render(api_host, protocol), template.upstream_api_host)


def rewritten(doc: object, api_host: str = PROXY_API, protocol: str = "https") -> Any:
    return orjson.loads(rewrite_settings(orjson.dumps(doc), api_host, protocol).body)


def test_api_host_metrics_host_and_protocol_point_at_the_proxy() -> None:
    out = rewritten(EU_SETTINGS, protocol="http")
    sio = out["integrations"]["Segment.io"]
    assert sio["apiHost"] == PROXY_API
    assert sio["protocol"] == "http"
    assert out["metrics"]["host"] == PROXY_API


def test_upstream_api_host_is_read_from_the_settings_not_assumed() -> None:
    result = rewrite_settings(orjson.dumps(EU_SETTINGS), PROXY_API, "https")
    assert result.upstream_api_host == "events.eu1.segmentapis.com/v1"


def test_us_api_host_is_reported_as_such() -> None:
    doc = {"integrations": {"Segment.io": {"apiHost": "api.segment.io/v1"}}}
    result = rewrite_settings(orjson.dumps(doc), PROXY_API, "https")
    assert result.upstream_api_host == "api.segment.io/v1"


@pytest.mark.parametrize("api_host", [None, "", 42, ["api.segment.io/v1"]])
def test_missing_or_unusable_upstream_api_host_is_reported_as_none(api_host: object) -> None:
    sio: dict[str, object] = {"apiKey": "k"}
    if api_host is not None:
        sio["apiHost"] = api_host
    result = rewrite_settings(
        orjson.dumps({"integrations": {"Segment.io": sio}}), PROXY_API, "https"
    )
    assert result.upstream_api_host is None
    assert orjson.loads(result.body)["integrations"]["Segment.io"]["apiHost"] == PROXY_API


def test_every_other_setting_is_kept_exactly() -> None:
    out = rewritten(EU_SETTINGS)
    for key, value in EU_SETTINGS.items():
        if key not in ("integrations", "metrics"):
            assert out[key] == value, key
    assert (
        out["integrations"]["Google Analytics"] == EU_SETTINGS["integrations"]["Google Analytics"]
    )
    sio_in = EU_SETTINGS["integrations"]["Segment.io"]
    sio_out = out["integrations"]["Segment.io"]
    assert {k: v for k, v in sio_out.items() if k not in ("apiHost", "protocol")} == {
        k: v for k, v in sio_in.items() if k != "apiHost"
    }
    assert out["metrics"]["sampleRate"] == 0.1
    assert out["metrics"]["flushTimer"] == 30000


def test_missing_integrations_and_metrics_are_created() -> None:
    out = rewritten({"plan": {}})
    assert out["integrations"] == {"Segment.io": {"apiHost": PROXY_API, "protocol": "https"}}
    assert out["metrics"] == {"host": PROXY_API}
    assert out["plan"] == {}


def test_missing_segment_io_integration_is_created_beside_the_others() -> None:
    out = rewritten({"integrations": {"Mixpanel": {"token": "t"}}})
    assert out["integrations"]["Mixpanel"] == {"token": "t"}
    assert out["integrations"]["Segment.io"]["apiHost"] == PROXY_API


@pytest.mark.parametrize("bad", [None, [], "x", 3])
def test_non_object_integrations_segment_io_or_metrics_are_replaced(bad: object) -> None:
    out = rewritten({"integrations": bad, "metrics": bad})
    assert out["integrations"]["Segment.io"]["apiHost"] == PROXY_API
    assert out["metrics"]["host"] == PROXY_API
    out = rewritten({"integrations": {"Segment.io": bad}})
    assert out["integrations"]["Segment.io"] == {"apiHost": PROXY_API, "protocol": "https"}


@pytest.mark.parametrize(
    "raw", [b"[]", b'"settings"', b"null", b"42", b"not json", b"", b'{"a":', b"\xff\xfe"]
)
def test_settings_that_are_not_a_json_object_cannot_be_rewritten(raw: bytes) -> None:
    with pytest.raises(RewriteError):
        rewrite_settings(raw, PROXY_API, "https")


def test_rewritten_settings_are_compact_json_without_a_bom() -> None:
    body = rewrite_settings(orjson.dumps(EU_SETTINGS), PROXY_API, "https").body
    assert body.startswith(b"{")
    assert json.loads(body.decode("utf-8"))["integrations"]["Segment.io"]["protocol"] == "https"


# ---------------------------------------------------------------------------------------------
# Property: arbitrary settings objects keep every key they came with.

keys = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)
objects = st.dictionaries(keys, json_values, max_size=6)
# The three places the rewrite touches, sometimes absent, sometimes objects, sometimes junk.
sections = st.one_of(st.none(), json_values, objects)


@settings(max_examples=100, deadline=None)
@given(
    extra=objects,
    integrations=sections,
    segment_io=sections,
    metrics=sections,
    protocol=st.sampled_from(["http", "https"]),
)
def test_any_settings_object_keeps_unknown_keys_and_points_at_the_proxy(
    extra: dict[str, Any],
    integrations: Any,
    segment_io: Any,
    metrics: Any,
    protocol: str,
) -> None:
    doc: dict[str, Any] = {k: v for k, v in extra.items() if k not in ("integrations", "metrics")}
    if isinstance(integrations, dict) and segment_io is not None:
        integrations = {**integrations, "Segment.io": segment_io}
    if integrations is not None:
        doc["integrations"] = integrations
    if metrics is not None:
        doc["metrics"] = metrics
    raw = orjson.dumps(doc)

    result = rewrite_settings(raw, PROXY_API, protocol)
    out = json.loads(result.body)  # valid JSON for any parser, not only orjson

    assert isinstance(out, dict)
    for key, value in doc.items():
        if key not in ("integrations", "metrics"):
            assert out[key] == value
    assert out["integrations"]["Segment.io"]["apiHost"] == PROXY_API
    assert out["integrations"]["Segment.io"]["protocol"] == protocol
    assert out["metrics"]["host"] == PROXY_API
    if isinstance(integrations, dict):
        for key, value in integrations.items():
            if key != "Segment.io":
                assert out["integrations"][key] == value
        sio = integrations.get("Segment.io")
        if isinstance(sio, dict):
            for key, value in sio.items():
                if key not in ("apiHost", "protocol"):
                    assert out["integrations"]["Segment.io"][key] == value
            upstream = sio.get("apiHost")
            expected = upstream if isinstance(upstream, str) and upstream else None
            assert result.upstream_api_host == expected
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            if key != "host":
                assert out["metrics"][key] == value
    assert set(out) == set(doc) | {"integrations", "metrics"}


# ---------------------------------------------------------------------------------------------
# Script


BUNDLE = b'!function(){var t="__WRITE_KEY__";window.x=t}();\n//# sourceMappingURL=standalone.js.map'


def test_script_gets_the_cdn_prelude_first_and_the_original_bytes_intact_after_it() -> None:
    out = rewrite_script(BUNDLE)
    assert out.startswith(CDN_PRELUDE)
    assert out[len(CDN_PRELUDE) :] == BUNDLE


def test_prelude_is_one_ascii_line_that_sets_analytics_cdn_from_the_script_url() -> None:
    assert CDN_PRELUDE.isascii()
    assert CDN_PRELUDE.endswith(b"\n")
    assert CDN_PRELUDE.count(b"\n") == 1
    assert b"a._cdn=m[1]" in CDN_PRELUDE
    assert b"document.currentScript" in CDN_PRELUDE
    assert b"!a._cdn" in CDN_PRELUDE  # an explicitly configured _cdn is never overridden


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_script_bytes_survive_the_rewrite_unchanged(raw: bytes) -> None:
    assert rewrite_script(raw) == CDN_PRELUDE + raw


# ---------------------------------------------------------------------------------------------
# Templates: the settings are parsed once per fill, then rendered per origin by joining bytes


def direct_rewrite(doc: dict[str, Any], api_host: str, protocol: str) -> bytes:
    """What a fresh parse-and-rewrite gives: the reference a template must match byte for byte."""
    out = json.loads(json.dumps(doc))
    integrations = out.get("integrations")
    if not isinstance(integrations, dict):
        integrations = out["integrations"] = {}
    sio = integrations.get("Segment.io")
    if not isinstance(sio, dict):
        sio = integrations["Segment.io"] = {}
    sio["apiHost"] = api_host
    sio["protocol"] = protocol
    metrics = out.get("metrics")
    if not isinstance(metrics, dict):
        metrics = out["metrics"] = {}
    metrics["host"] = api_host
    return orjson.dumps(out)


def test_a_template_renders_every_origin_like_a_fresh_rewrite() -> None:
    template = settings_template(orjson.dumps(EU_SETTINGS))
    for api_host, protocol in [(PROXY_API, "https"), ("a.example/v1", "http")]:
        rendered = template.render(api_host, protocol)
        assert rendered == direct_rewrite(EU_SETTINGS, api_host, protocol)
    assert template.upstream_api_host == "events.eu1.segmentapis.com/v1"
    assert template.size < len(orjson.dumps(EU_SETTINGS)) + 100


def test_settings_that_already_hold_the_placeholder_text_are_rendered_right() -> None:
    doc = {
        "segproxy-slot-0-api-host": "segproxy-slot-0-protocol",
        "note": "segproxy-slot-1-x",
        "integrations": {"Segment.io": {"apiHost": "segproxy-slot-0-api-host"}},
    }
    rendered = settings_template(orjson.dumps(doc)).render(PROXY_API, "https")
    assert rendered == direct_rewrite(doc, PROXY_API, "https")


def test_a_rendered_value_is_escaped_as_json() -> None:
    rendered = settings_template(b"{}").render('a"b\\c/v1', "https")
    assert json.loads(rendered)["integrations"]["Segment.io"]["apiHost"] == 'a"b\\c/v1'


@settings(max_examples=50, deadline=None)
@given(
    extra=objects,
    integrations=sections,
    metrics=sections,
    api_host=st.text(max_size=30),
    protocol=st.sampled_from(["http", "https"]),
)
def test_a_template_renders_exactly_what_a_fresh_rewrite_gives(
    extra: dict[str, Any], integrations: Any, metrics: Any, api_host: str, protocol: str
) -> None:
    doc: dict[str, Any] = {k: v for k, v in extra.items() if k not in ("integrations", "metrics")}
    if integrations is not None:
        doc["integrations"] = integrations
    if metrics is not None:
        doc["metrics"] = metrics
    template = settings_template(orjson.dumps(doc))
    assert template.render(api_host, protocol) == direct_rewrite(doc, api_host, protocol)
