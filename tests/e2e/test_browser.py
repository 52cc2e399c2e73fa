"""A real browser (Debian chromium) runs Segment's real analytics.js through the proxy.

The page lives on its own origin and embeds the official snippet (npm ``@segment/snippet``)
whose script URL names the proxy. The page does not set ``analytics._cdn``: over plain http the
bundle cannot find its CDN from the script tag, so the only way the settings and chunks can come
through the proxy is the ``_cdn`` line the proxy prepends to the script it serves. Nothing else
is helped along: whatever the browser does next (settings, lazily loaded chunks, CORS
preflights, events) is Segment's own code talking to the proxy.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import WRITE_KEY, BrowserRun, PageServer, render_snippet
from tests.support.fakes import ApiEvent, FakeSegment
from tests.support.proxy import RunningProxy

pytestmark = pytest.mark.e2e

ANON_ID = "anon-from-query-3f9e"

TRACK_PROPERTIES: dict[str, Any] = {
    "order_id": "o-1001",
    "revenue": 42.5,
    "currency": "EUR",
    "products": [{"sku": "sku-1", "quantity": 2}, {"sku": "sku-2", "quantity": 1}],
    "note": 'ünïcødé ✓ "quoted" </script>',
}
IDENTIFY_TRAITS: dict[str, Any] = {"email": "ada@example.com", "plan": "pro", "logins": 3}
GROUP_TRAITS: dict[str, Any] = {"name": "Example Org", "employees": 12}

# The page: the snippet (which queues page()), then the calls a site makes. A source middleware
# (queued like every call before the bundle loads) records each event's messageId as the
# browser created it, so the test can match what arrived upstream one to one.
PAGE_SCRIPT = """
window.__segproxyTest = {sent: [], done: false, errors: []};
analytics.addSourceMiddleware(function (mw) {
  var e = mw.payload.obj;
  window.__segproxyTest.sent.push({type: e.type, messageId: e.messageId});
  mw.next(mw.payload);
});
analytics.ready(async function () {
  var a = window.analytics;
  try {
    await a.track("Order Completed", TRACK_PROPERTIES);
    await a.identify("user-42", IDENTIFY_TRAITS);
    await a.group("org-7", GROUP_TRAITS);
    await a.alias("user-42-new", "user-42");
  } catch (e) {
    window.__segproxyTest.errors.push(String(e && e.stack || e));
  }
  window.__segproxyTest.done = true;
});
"""


def script_json(value: Any) -> str:
    """JSON safe to embed in an inline <script> (no `</script>` can end it early)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")


def page_html(write_key: str, proxy_authority: str) -> str:
    snippet = render_snippet(write_key, proxy_authority, scheme="http")
    calls = (
        PAGE_SCRIPT.replace("TRACK_PROPERTIES", script_json(TRACK_PROPERTIES))
        .replace("IDENTIFY_TRAITS", script_json(IDENTIFY_TRAITS))
        .replace("GROUP_TRAITS", script_json(GROUP_TRAITS))
    )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        "<title>segproxy e2e</title>\n"
        f"<script>{snippet}</script>\n<script>{calls}</script>\n"
        "</head><body><h1>segproxy e2e</h1></body></html>\n"
    )


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def summarize(result: dict[str, Any]) -> str:
    """The browser's view, short enough for an assertion message."""
    lines = [f"  fatal: {result['fatal']}"] if "fatal" in result else []
    status = {(r["method"], r["url"]): r["status"] for r in result.get("responses", [])}
    lines += [
        f"  {r['method']} {r['url']} -> {status.get((r['method'], r['url']), '?')}"
        for r in result.get("requests", [])
    ]
    lines += [f"  FAILED {r['method']} {r['url']}: {r['error']}" for r in result.get("failed", [])]
    lines += [f"  console.{m['type']}: {m['text']}" for m in result.get("console", [])]
    lines += [f"  page error: {e}" for e in result.get("pageErrors", [])]
    return "\n".join(lines)


def browser_sent_events(result: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """Every event in the bodies the browser POSTed to /v1/*, by messageId, with its sentAt
    (the event's own, or for a batch the batch's)."""
    out: dict[str, tuple[dict[str, Any], str]] = {}
    for r in result["requests"]:
        if r["method"] != "POST" or not r.get("postData"):
            continue
        path = urlsplit(r["url"]).path
        if path == "/v1/m":
            continue
        body = json.loads(r["postData"])
        items = body["batch"] if path == "/v1/b" else [body]
        for item in items:
            out[item["messageId"]] = (item, item.get("sentAt") or body.get("sentAt", ""))
    return out


def upstream_sent_at(event: ApiEvent) -> str:
    own = event.data.get("sentAt")
    outer = event.request.json.get("sentAt") if isinstance(event.request.json, dict) else None
    return str(own or outer or "")


def run_page(
    fake: FakeSegment, proxy: RunningProxy, page_server: PageServer
) -> tuple[dict[str, Any], list[ApiEvent], dict[str, Any]]:
    """Load the page, wait for every event the page created to arrive upstream, then report."""
    html = page_html(WRITE_KEY, proxy.authority)
    assert "_cdn" not in html, "the page must leave finding the CDN to the proxy"
    page_server.pages["/"] = html
    url = f"{page_server.origin}/?ajs_aid={ANON_ID}"
    assert origin(url) != proxy.url, "the page must be cross-origin to the proxy"
    with BrowserRun(url, timeout=20) as browser:
        ready = browser.ready(timeout=40)
        if not ready["ok"]:
            result = browser.finish()
            raise AssertionError(
                f"the page never finished: {ready}\nbrowser saw:\n{summarize(result)}\n"
                f"fake CDN saw: {[(r.method, r.target, r.status) for r in fake.cdn_requests]}\n"
                f"fake API saw: {[(r.method, r.target, r.status) for r in fake.api_requests]}"
            )
        sent = ready["page"]["sent"]
        assert [s["type"] for s in sent] == ["page", "track", "identify", "group", "alias"], sent
        try:
            events = fake.wait_for_events(len(sent), timeout=20)
        except AssertionError as exc:
            result = browser.finish()
            raise AssertionError(f"{exc}\nbrowser saw:\n{summarize(result)}") from None
        result = browser.finish()
    return ready, events, result


def check_delivery(
    delivery: str,
    fake: FakeSegment,
    proxy: RunningProxy,
    page_server: PageServer,
    queue_backend: str,
) -> None:
    ready, events, result = run_page(fake, proxy, page_server)
    assert "fatal" not in result, result["fatal"]
    assert result["settled"]["ok"], f"browser network never settled: {result['settled']}"

    # 1. Nothing in the console, no page errors, no failed request (CORS failures show up here).
    noisy = [m for m in result["console"] if m["type"] in ("error", "warning")]
    assert noisy == [], f"console errors/warnings: {json.dumps(noisy, indent=1)}"
    assert result["pageErrors"] == []
    assert result["failed"] == [], f"failed requests: {result['failed']}"
    assert ready["page"]["errors"] == []
    bad = [r for r in result["responses"] if r["status"] >= 400]
    assert bad == [], f"error responses: {bad}"

    # 2. The browser talked to the page's origin and the proxy, and to nothing else.
    origins = {origin(r["url"]) for r in result["requests"]}
    assert origins <= {page_server.origin, proxy.url}, origins
    urls = [r["url"] for r in result["requests"]]
    script_url = f"{proxy.url}/analytics.js/v1/{WRITE_KEY}/analytics.min.js"
    assert script_url in urls
    assert any(u.startswith(f"{proxy.url}/v1/projects/{WRITE_KEY}/settings") for u in urls), urls
    bundle_prefix = f"{proxy.url}/analytics-next/bundles/queryString.bundle."
    assert any(u.startswith(bundle_prefix) for u in urls), urls

    # 3. ... and the proxy fetched them from the (fake) CDN with the CDN's own Host.
    cdn = fake.cdn_requests
    cdn_paths = [r.path for r in cdn]
    assert f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js" in cdn_paths
    assert f"/v1/projects/{WRITE_KEY}/settings" in cdn_paths
    assert any(p.startswith("/analytics-next/bundles/queryString.bundle.") for p in cdn_paths)
    assert all(r.headers.get("host") == fake.cdn_authority for r in cdn), [
        (r.path, r.headers.get("host")) for r in cdn
    ]
    assert all(r.status in (200, 304) for r in cdn), [(r.path, r.status) for r in cdn]

    # 4. The browser's analytics sees the proxy as its CDN and its API; unknown keys survived.
    state = ready["analytics"]
    assert state["initialized"] is True
    assert state["anonymousId"] == ANON_ID
    assert state["cdnURL"] == proxy.url
    settings = state["cdnSettings"]
    seg = settings["integrations"]["Segment.io"]
    assert seg["apiHost"] == f"{proxy.authority}/v1"
    assert seg["protocol"] == "http"
    assert seg["apiKey"] == WRITE_KEY
    assert settings["metrics"]["host"] == f"{proxy.authority}/v1"
    assert settings["someFutureKey"] == fake.settings[WRITE_KEY]["someFutureKey"]
    if delivery == "batching":
        assert seg["deliveryStrategy"]["strategy"] == "batching"

    # 5. The events went to the proxy (short paths for standard, /v1/b for batching) ...
    posts = [r for r in result["requests"] if r["method"] == "POST"]
    assert posts, f"the browser sent no events; it saw:\n{summarize(result)}"
    assert all(origin(r["url"]) == proxy.url for r in posts), posts
    if delivery == "batching":
        assert {urlsplit(r["url"]).path for r in posts} == {"/v1/b"}, posts
    else:
        assert sorted(urlsplit(r["url"]).path for r in posts) == sorted(
            ["/v1/p", "/v1/t", "/v1/i", "/v1/g", "/v1/a"]
        ), posts

    # 6. ... and every one reached the API exactly once, intact, with the visitor's address.
    sent_ids = [s["messageId"] for s in ready["page"]["sent"]]
    got = Counter(e.message_id for e in events)
    assert got == Counter(sent_ids), f"sent {sent_ids}, upstream got {dict(got)}"
    api = fake.api_requests
    assert all(r.headers.get("host") == fake.api_authority for r in api)
    assert not [r for r in api if r.method == "OPTIONS"], "preflights must be answered locally"
    # Exactly what the browser sent, plus context.ip. sentAt may be set per event or per batch
    # and may only move forward (by the time the proxy held the event; docs/configuration.md).
    sent_bodies = browser_sent_events(result)
    assert set(sent_bodies) == set(sent_ids)
    for e in events:
        assert e.message_id is not None
        sent_event, sent_at = sent_bodies[e.message_id]
        assert sent_at, "the browser always sends sentAt"
        assert upstream_sent_at(e) >= sent_at, (upstream_sent_at(e), sent_at)
        expected = json.loads(json.dumps(sent_event))
        expected["context"]["ip"] = "127.0.0.1"
        expected.pop("sentAt", None)
        got_event = dict(e.data)
        got_event.pop("sentAt", None)
        assert got_event == expected
    by_type = {e.type: e for e in events}
    for e in events:
        assert e.write_key == WRITE_KEY
        assert e.data["anonymousId"] == ANON_ID
        assert e.data["context"]["ip"] == "127.0.0.1", e.data["context"]
        assert e.data["context"]["library"]["name"] == "analytics.js"
        assert e.data["context"]["page"]["url"].startswith(page_server.origin)
        if queue_backend == "none" and delivery != "batching":
            assert e.path == "/v1/" + e.data["type"][0]  # forwarded as it came
        elif queue_backend == "none":
            assert e.path == "/v1/b"
        else:
            assert e.path == "/v1/batch"  # queued, then sent in batches
    assert by_type["track"].data["event"] == "Order Completed"
    assert by_type["track"].data["properties"] == TRACK_PROPERTIES
    assert by_type["identify"].data["userId"] == "user-42"
    assert by_type["identify"].data["traits"] == IDENTIFY_TRAITS
    assert by_type["group"].data["groupId"] == "org-7"
    assert by_type["group"].data["traits"] == GROUP_TRAITS
    assert by_type["alias"].data["previousId"] == "user-42"
    assert by_type["page"].data["properties"]["url"].startswith(page_server.origin)


# standard: one request per event; batching: settings ask for /v1/b batches; eu: an EU
# workspace, whose settings name events.eu1.segmentapis.com (the proxy must still win).
@pytest.fixture(params=["standard", "batching", "eu"])
def delivery(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    return param


@pytest.fixture
def fake(delivery: str) -> Iterator[FakeSegment]:
    """The fake upstreams, set up before the proxy starts (it may fetch settings early)."""
    with FakeSegment([WRITE_KEY]) as f:
        if delivery == "batching":
            f.use_batching(WRITE_KEY, size=10, timeout_ms=500)
        if delivery == "eu":
            f.use_region("eu", WRITE_KEY)
        yield f


def test_browser_through_proxy(
    delivery: str,
    fake: FakeSegment,
    proxy: RunningProxy,
    page_server: PageServer,
    queue_backend: str,
) -> None:
    check_delivery(delivery, fake, proxy, page_server, queue_backend)
