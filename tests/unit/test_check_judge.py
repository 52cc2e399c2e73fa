"""`segproxy check URL`'s judgement, from answers to verdicts: each mistake named from the answers
that show it, without a server (the probe itself is tested end to end in
tests/integration/test_check_url.py)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from segproxy.check import judge
from segproxy.check.faults import FAULTS, Verdict, refusal
from segproxy.check.probe import Answer, Certificate, Origin, parse_origin
from segproxy.check.report import as_json, as_text
from segproxy.check.run import Options, Report, event_body

ROOT = Path(__file__).resolve().parents[2]
STANDALONE = ROOT / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd"
PRELUDE = (
    b"/* segproxy: load analytics.js bundles through this proxy */"
    b"!function(){try{var s=document.currentScript,a=window.analytics,"
    b"m=s&&/^(.*)\\/analytics\\.js\\/v1\\//.exec(s.src);"
    b"if(a&&m&&!a._cdn)a._cdn=m[1]}catch(e){}}();\n"
)
HTTPS = parse_origin("https://analytics.example.com")
HTTP = parse_origin("http://127.0.0.1:8080/seg")


def answer(
    status: int = 200,
    body: bytes | str = b"",
    method: str = "GET",
    path: str = "/x",
    **headers: str,
) -> Answer:
    raw = body.encode() if isinstance(body, str) else body
    named = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    return Answer(method, path, status, named, raw)


def standalone() -> bytes:
    return (STANDALONE / "standalone.js").read_bytes()


# ---------------------------------------------------------------------------------------------
# Refusals: what an answer that is not a 2xx most likely shows


@pytest.mark.parametrize(
    ("status", "method", "body", "fault"),
    [
        (301, "POST", b"", "post_redirected"),
        (308, "OPTIONS", b"", "post_redirected"),
        (302, "GET", b"", "redirect"),
        (403, "GET", b"Forbidden: wrong Host\n", "host_forwarded"),
        (403, "POST", b"<html>The request could not be satisfied</html>", "host_forwarded"),
        (
            403,
            "GET",
            b'{"success": false, "code": "write_key_not_allowed", "message": "not here"}',
            "key_refused",
        ),
        (404, "GET", b"Not Found", "not_found"),
        (502, "GET", b'{"success": false, "code": "cdn_unreachable", "message": "m"}', "refused"),
        (500, "POST", b"oops", "refused"),
    ],
)
def test_an_answer_that_is_not_a_success_names_its_likely_mistake(
    status: int, method: str, body: bytes, fault: str
) -> None:
    verdict = refusal("x", answer(status, body, method, location="https://a/v1/t"), HTTPS.base)
    assert verdict is not None
    assert (verdict.status, verdict.fault) == ("fail", fault)
    assert verdict.advice and "\n" not in verdict.advice


def test_a_redirect_names_where_it_goes() -> None:
    verdict = refusal("event", answer(301, method="POST", location="https://a.example/v1/t"), "b")
    assert verdict is not None
    assert "https://a.example/v1/t" in verdict.detail
    assert "never /v1/*" in verdict.advice


def test_a_success_is_no_refusal() -> None:
    assert refusal("x", answer(204), HTTPS.base) is None


# ---------------------------------------------------------------------------------------------
# The script and where its bundles come from


def test_segproxys_script_sets_the_cdn_from_its_own_url() -> None:
    base, why = judge.cdn_base(PRELUDE + standalone(), HTTP)
    assert base == "http://127.0.0.1:8080/seg"
    assert "own URL" in why


def test_analytics_js_own_use_of_cdn_deep_in_the_bundle_does_not_count() -> None:
    assert b"_cdn=" in standalone()  # analytics.js writes it itself, far from the start
    assert judge.cdn_base(standalone(), HTTP)[0] is None
    assert judge.cdn_base(standalone(), HTTPS)[0] == HTTPS.base  # from the https script tag


def test_a_prepended_literal_cdn_is_read() -> None:
    script = b'window.analytics._cdn = "https://cdn.example.net/seg";\n' + standalone()
    assert judge.cdn_base(script, HTTP)[0] == "https://cdn.example.net/seg"
    script = b'analytics._cdn="https://cdn.segment.com";\n' + standalone()
    assert judge.cdn_base(script, HTTPS)[0] is None


def test_a_plain_http_script_without_cdn_is_a_warning_naming_segments_cdn() -> None:
    verdict = judge.judge_script(answer(200, standalone()), HTTP)
    assert (verdict.status, verdict.fault) == ("warn", "bundles_from_segment")
    assert "https://cdn.segment.com" in verdict.detail
    assert "analytics._cdn = 'http://127.0.0.1:8080/seg'" in verdict.advice


def test_something_that_is_not_analytics_js_fails() -> None:
    verdict = judge.judge_script(answer(200, b"<html>welcome</html>"), HTTPS)
    assert verdict.fault == "not_analytics_js"


def test_a_bundle_name_is_read_from_the_scripts_chunk_map_and_exists() -> None:
    name = judge.bundle_name(standalone())
    assert name is not None
    assert re.fullmatch(r"[A-Za-z-]+\.bundle\.[0-9a-f]{20}\.js", name)
    assert (STANDALONE / name).is_file()
    assert judge.bundle_name(b"console.log('no chunks')") is None


# ---------------------------------------------------------------------------------------------
# Settings


def settings(api_host: str | None, protocol: str | None = None) -> bytes:
    sio: dict[str, str] = {"apiKey": "k"}
    if api_host is not None:
        sio["apiHost"] = api_host
    if protocol is not None:
        sio["protocol"] = protocol
    return json.dumps({"integrations": {"Segment.io": sio}}).encode()


def test_settings_that_name_the_proxy_pass() -> None:
    verdict = judge.judge_settings(
        answer(200, settings("127.0.0.1:8080/seg/v1", "http")), HTTP, HTTP
    )
    assert verdict.status == "pass"
    assert verdict.data["api_host"] == "127.0.0.1:8080/seg/v1"
    verdict = judge.judge_settings(answer(200, settings("analytics.example.com/v1")), HTTPS, HTTPS)
    assert verdict.status == "pass"  # no protocol: analytics.js uses https


@pytest.mark.parametrize("named", ["api.segment.io/v1", "events.eu1.segmentapis.com/v1", None])
def test_settings_that_name_segment_say_support_or_segproxy_is_the_fix(named: str | None) -> None:
    verdict = judge.judge_settings(answer(200, settings(named)), HTTPS, HTTPS)
    assert verdict.fault == "settings_name_segment"
    assert "Segment support" in verdict.advice
    assert "analytics.example.com/v1" in verdict.advice


def test_settings_naming_another_host_point_at_a_cache_keyed_without_host() -> None:
    verdict = judge.judge_settings(answer(200, settings("other.example.com/v1")), HTTPS, HTTPS)
    assert verdict.fault == "settings_other_host"
    assert "other.example.com/v1" in verdict.detail
    assert "cache" in verdict.advice


def test_settings_with_another_protocol_than_the_api_fail() -> None:
    verdict = judge.judge_settings(answer(200, settings("127.0.0.1:8080/seg/v1")), HTTP, HTTP)
    assert verdict.fault == "settings_protocol"  # analytics.js would use https


def test_settings_name_the_api_given_apart() -> None:
    api = parse_origin("https://api.example.com")
    verdict = judge.judge_settings(answer(200, settings("api.example.com/v1")), HTTPS, api)
    assert verdict.status == "pass"


def test_settings_that_are_not_json_fail() -> None:
    assert judge.judge_settings(answer(200, b"<html>"), HTTPS, HTTPS).fault == "settings_not_json"


# ---------------------------------------------------------------------------------------------
# A cache in front


@pytest.mark.parametrize(
    ("headers", "state"),
    [
        ({"x_cache_status": "HIT"}, "hit"),
        ({"x_cache_status": "MISS"}, "miss"),
        ({"x_cache_status": "BYPASS"}, "miss"),
        ({"x_cache": "Hit from cloudfront"}, "hit"),
        ({"x_cache": "Miss from cloudfront"}, "miss"),
        ({"cf_cache_status": "DYNAMIC"}, "miss"),
        ({"x_cache": "MISS, HIT"}, "hit"),
        ({"age": "12"}, "hit"),
        ({"age": "0"}, None),
        ({}, None),
    ],
)
def test_cache_state_is_read_from_what_caches_say(headers: dict[str, str], state: str) -> None:
    assert judge.cache_state(answer(200, b"x", **headers)) == state


def test_no_cache_saying_anything_passes() -> None:
    verdict = judge.judge_cache(answer(), answer(), answer())
    assert verdict.status == "pass"


def test_a_repeat_that_misses_means_the_cache_is_off() -> None:
    miss = answer(200, b"x", x_cache_status="MISS")
    assert judge.judge_cache(miss, miss, miss).fault == "cache_off"


def test_a_repeat_that_hits_but_another_visitor_misses_means_keyed_on_headers() -> None:
    verdict = judge.judge_cache(
        answer(x_cache_status="MISS"), answer(x_cache_status="HIT"), answer(x_cache_status="MISS")
    )
    assert verdict.fault == "cache_keyed_on_headers"


@pytest.mark.parametrize("vary", ["*", "User-Agent", "Accept-Encoding, Cookie"])
def test_a_vary_on_viewer_headers_is_keyed_on_headers(vary: str) -> None:
    hit = answer(200, b"x", vary=vary, x_cache_status="HIT")
    assert judge.judge_cache(hit, hit, hit).fault == "cache_keyed_on_headers"


def test_hits_for_every_visitor_pass() -> None:
    hit = answer(200, b"x", x_cache_status="HIT", vary="Accept-Encoding")
    assert judge.judge_cache(answer(x_cache_status="MISS"), hit, hit).status == "pass"


# ---------------------------------------------------------------------------------------------
# The Tracking API: preflight, Retry-After, the test event

PAGE = "https://www.example.com"
GOOD_PREFLIGHT = {
    "access_control_allow_origin": PAGE,
    "access_control_allow_methods": "POST, OPTIONS",
    "access_control_allow_headers": "authorization, content-type, x-retry-count",
}


def preflight(status: int = 204, **headers: str) -> Answer:
    return answer(status, b"", "OPTIONS", "/v1/t", **{**GOOD_PREFLIGHT, **headers})


def test_a_preflight_allowing_what_analytics_js_sends_passes() -> None:
    assert judge.judge_preflight(preflight(), PAGE, HTTPS).status == "pass"
    anyone = preflight(access_control_allow_origin="*")
    assert judge.judge_preflight(anyone, PAGE, HTTPS).status == "pass"


@pytest.mark.parametrize(
    ("status", "headers", "fault"),
    [
        (403, {}, "no_preflight"),
        (405, {}, "no_preflight"),
        (301, {"location": "https://a/v1/t"}, "post_redirected"),
        (204, {"access_control_allow_origin": "https://other.example"}, "preflight_origin"),
        (204, {"access_control_allow_origin": ""}, "preflight_origin"),
        (204, {"access_control_allow_methods": "GET"}, "preflight_methods"),
        (204, {"access_control_allow_headers": "content-type"}, "preflight_headers"),
        (204, {"access_control_allow_headers": "content-type, authorization"}, "preflight_headers"),
        (204, {"access_control_allow_headers": "*"}, "preflight_headers"),  # not Authorization
    ],
)
def test_a_preflight_that_stops_the_browser_names_why(
    status: int, headers: dict[str, str], fault: str
) -> None:
    verdict = judge.judge_preflight(preflight(status, **headers), PAGE, HTTPS)
    assert (verdict.status, verdict.fault) == ("fail", fault)


def test_a_wildcard_covers_x_retry_count_when_authorization_is_named() -> None:
    verdict = judge.judge_preflight(
        preflight(access_control_allow_headers="authorization, *"), PAGE, HTTPS
    )
    assert verdict.status == "pass"


def test_missing_headers_are_named_with_the_list_to_allow() -> None:
    verdict = judge.judge_preflight(
        preflight(access_control_allow_headers="content-type, authorization"), PAGE, HTTPS
    )
    assert "x-retry-count" in verdict.detail
    assert "authorization, content-type, x-retry-count" in verdict.advice


@pytest.mark.parametrize(
    ("expose", "status"),
    [("Retry-After, X-RateLimit-Reset", "pass"), ("*", "pass"), ("X-Other", "fail"), ("", "fail")],
)
def test_retry_after_must_be_exposed(expose: str, status: str) -> None:
    verdict = judge.judge_retry_after(
        answer(200, b"{}", "POST", "/v1/t", access_control_expose_headers=expose)
    )
    assert verdict.status == status
    if status == "fail":
        assert verdict.fault == "retry_after_hidden"


def test_the_test_event_is_a_track_an_operator_recognises() -> None:
    at = datetime(2026, 12, 7, 2, 3, 4, 567000, tzinfo=UTC)
    event = json.loads(event_body("wk_1", "segproxy-check-1", "https://a.example.com", at))
    assert event["type"] == "track"
    assert event["event"] == "segproxy check"
    assert event["messageId"] == "segproxy-check-1"
    assert event["writeKey"] == "wk_1"
    assert event["sentAt"] == event["timestamp"] == "2026-12-07T02:03:04.567Z"
    verdict = judge.judge_event(answer(200, b'{"success":true}', "POST", "/v1/t"), HTTPS, "m1")
    assert verdict.status == "pass" and "m1" in verdict.detail


# ---------------------------------------------------------------------------------------------
# TLS


def test_a_valid_certificate_shows_its_days_to_expiry() -> None:
    now = datetime(2026, 12, 7, tzinfo=UTC)
    cert = Certificate(now + timedelta(days=90, hours=5), subject="analytics.example.com")
    verdict = judge.judge_tls(cert, HTTPS, now)
    assert verdict.status == "pass"
    assert verdict.data["days_left"] == 90
    assert "(90 days)" in verdict.detail


def test_a_certificate_close_to_expiry_fails_with_renewal_advice() -> None:
    now = datetime(2026, 12, 7, tzinfo=UTC)
    verdict = judge.judge_tls(Certificate(now + timedelta(days=13)), HTTPS, now)
    assert (verdict.fault, verdict.data["days_left"]) == ("tls_expiring", 13)
    assert "renew" in verdict.advice


def test_an_invalid_certificate_says_why_and_mentions_cafile() -> None:
    verdict = judge.judge_tls(
        Certificate(None, "the certificate is not valid: x"), HTTPS, datetime.now(UTC)
    )
    assert verdict.fault == "tls_invalid"
    assert "--cafile" in verdict.advice


# ---------------------------------------------------------------------------------------------
# The report and its exit codes


def report(*verdicts: Verdict, reached: bool = True) -> Report:
    options = Options(HTTPS, HTTPS, "wk_secret_0123456789", PAGE)
    return Report(options, list(verdicts), reached)


def test_exit_codes_zero_only_when_nothing_failed() -> None:
    ok = Verdict("script", "pass", "fine")
    warn = Verdict("script", "warn", "hm", "bundles_from_segment", "do x")
    bad = Verdict("event", "fail", "no", "refused", "do y")
    assert report(ok, warn).exit_code == 0
    assert report(ok, bad).exit_code == 1
    assert report(bad, reached=False).exit_code == 2


def test_the_human_report_marks_each_check_and_gives_one_line_of_advice_per_fault() -> None:
    text = as_text(
        report(
            Verdict("script", "pass", "fine"),
            Verdict("event", "fail", "POST /v1/t answered 301", "post_redirected", "do y"),
            Verdict("retry_after", "skip", "not checked"),
        )
    )
    lines = text.splitlines()
    assert lines[1].startswith("✓ analytics.js loads: fine")
    assert lines[2].startswith("✗ test event accepted: POST /v1/t answered 301")
    assert lines[3] == "    fix: do y"
    assert lines[4].startswith("- Retry-After")
    assert lines[-1] == "1 check failed"
    assert "wk_secret_0123456789" not in text


def test_the_json_report_carries_the_same_verdicts_and_masks_the_key() -> None:
    data = as_json(
        report(
            Verdict("script", "pass", "fine", data={"cdn_base": "x"}),
            Verdict("event", "fail", "no", "post_redirected", "do y"),
        )
    )
    assert data["schema"] == 1 and data["ok"] is False and data["exit_code"] == 1
    assert [(c["id"], c["status"], c["fault"]) for c in data["checks"]] == [
        ("script", "pass", None),
        ("event", "fail", "post_redirected"),
    ]
    assert "wk_secret_0123456789" not in json.dumps(data)


def test_every_fault_and_json_field_is_documented() -> None:
    doc = (ROOT / "docs" / "check.md").read_text()
    for fault in FAULTS:
        assert f"`{fault}`" in doc, fault
    for name in ("schema", "url", "api", "write_key", "dry_run", "reached", "ok", "exit_code"):
        assert f"`{name}`" in doc, name


def test_a_url_is_read_as_an_origin_and_a_prefix() -> None:
    assert parse_origin("https://A.example.com/seg/") == Origin(
        "https", "a.example.com", 443, "/seg"
    )
    assert HTTP.authority == "127.0.0.1:8080"
    assert judge.expected_api_host(HTTP) == "127.0.0.1:8080/seg/v1"
    with pytest.raises(ValueError):
        parse_origin("ftp://x")
