"""No request can make the proxy contact anything but its two configured upstreams.

Each test aims a crafted request at a local Sink (a listener that records every connection)
and checks three things: the client got a clear 4xx (or a correct answer from the real
upstream), the sink saw no connection, and the fakes saw only what the route allows.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import WRITE_KEY, Client, StartProxy, base_config
from tests.support.fakes import FakeSegment, Sink
from tests.support.proxy import RunningProxy
from tests.support.rawhttp import Conn, exchange, request_bytes


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


def raw(proxy: RunningProxy, data: bytes) -> tuple[int, bytes]:
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(data)
        resp = conn.read_response()
        return resp.status, resp.body


def assert_untouched(sink: Sink, fake: FakeSegment) -> None:
    assert sink.connections == [], "the proxy connected to a host it was not configured for"
    assert fake.cdn_requests == [] and fake.api_requests == []


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_absolute_form_request_line_is_refused_and_nothing_is_contacted(
    proxy: RunningProxy, sink: Sink, fake: FakeSegment, method: str
) -> None:
    target = f"{sink.url}/v1/projects/{WRITE_KEY}/settings"
    status, body = raw(proxy, request_bytes(method, target, sink.authority, body=b"{}"))
    assert status == 400
    assert b"origin-form" in body
    assert_untouched(sink, fake)


def test_connect_is_refused_with_405(proxy: RunningProxy, sink: Sink, fake: FakeSegment) -> None:
    data = f"CONNECT {sink.authority} HTTP/1.1\r\nHost: {sink.authority}\r\n\r\n".encode()
    status, body = raw(proxy, data)
    assert status == 405
    assert b"CONNECT" in body
    assert_untouched(sink, fake)


@pytest.mark.parametrize(
    "target",
    [
        "/analytics-next/bundles/../../../etc/passwd",
        "/analytics-next/bundles/..%2f..%2fetc%2fpasswd",
        "/analytics-next/bundles/%2e%2e/%2e%2e/etc/passwd.js",
        "/next-integrations/../v1/projects/x/settings",
        "/next-integrations/a/./b.js",
        "/analytics.js/v1/key/..\\..\\analytics.min.js",
        "/next-integrations//127.0.0.1/x.js",
        "/v1/projects/%77k/settings",
    ],
)
def test_traversal_and_encoded_paths_get_400_without_an_upstream_request(
    proxy: RunningProxy, sink: Sink, fake: FakeSegment, target: str
) -> None:
    status, body = raw(proxy, request_bytes("GET", target, proxy.authority))
    assert status == 400, body
    assert b'"message"' in body
    assert_untouched(sink, fake)


@pytest.mark.parametrize(
    "target", ["/", "/etc/passwd", "/v2/track", "/v1/unknown", "/analytics.js/v1/k/other.js"]
)
def test_unknown_paths_are_a_json_404(client: Client, fake: FakeSegment, target: str) -> None:
    resp = client.get(target)
    assert resp.status == 404
    assert resp.json()["code"] == "not_found"
    assert fake.cdn_requests == [] and fake.api_requests == []


def test_foreign_host_header_never_picks_the_upstream(
    client: Client, sink: Sink, fake: FakeSegment
) -> None:
    # The fake CDN answers 403 unless Host is its own: a 200 proves the upstream's Host was sent.
    resp = client.get(f"/v1/projects/{WRITE_KEY}/settings", host_header=sink.authority)
    assert resp.status == 200
    assert sink.connections == []
    (seen,) = fake.cdn_requests
    assert seen.headers.get("host") == fake.cdn_authority


def test_untrusted_forwarded_host_is_ignored_for_upstream_and_settings(
    client: Client, sink: Sink, fake: FakeSegment
) -> None:
    resp = client.get(
        f"/v1/projects/{WRITE_KEY}/settings",
        {"X-Forwarded-Host": sink.authority, "X-Forwarded-Proto": "https"},
        host_header="site.example",
    )
    assert resp.status == 200
    sio = resp.json()["integrations"]["Segment.io"]
    assert sio["apiHost"] == "site.example/v1"
    assert sio["protocol"] == "http"
    assert sink.connections == []


def test_a_foreign_host_does_not_leak_into_other_visitors_settings(
    client: Client, fake: FakeSegment
) -> None:
    path = f"/v1/projects/{WRITE_KEY}/settings"
    evil = client.get(path, host_header="evil.example")
    good = client.get(path, host_header="analytics.example.com")
    assert evil.json()["integrations"]["Segment.io"]["apiHost"] == "evil.example/v1"
    good_sio = good.json()["integrations"]["Segment.io"]
    assert good_sio["apiHost"] == "analytics.example.com/v1"
    assert good.json()["metrics"]["host"] == "analytics.example.com/v1"
    assert good.header("etag") != evil.header("etag")
    assert len(fake.cdn_requests) == 1  # one upstream fetch, rendered per host


def test_public_hosts_allow_list_answers_other_hosts_with_421(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, public_hosts=["analytics.example.com"]))
    client = Client(proxy)
    bad = client.get(f"/v1/projects/{WRITE_KEY}/settings", host_header="evil.example")
    assert bad.status == 421
    assert "public_hosts" in bad.json()["message"]
    ok = client.get(f"/v1/projects/{WRITE_KEY}/settings", host_header="analytics.example.com")
    assert ok.status == 200
    post = client.post("/v1/t", b'{"writeKey":"k"}', host_header="evil.example")
    assert post.status == 421
    assert len(fake.cdn_requests) == 1
    assert fake.api_requests == []


@pytest.mark.parametrize("host", ["bad host", "a@b.example", "x.example/evil", ""])
def test_malformed_host_cannot_be_written_into_settings(client: Client, host: str) -> None:
    resp = client.get(f"/v1/projects/{WRITE_KEY}/settings", host_header=host)
    assert resp.status == 400
    assert resp.json()["code"] in ("bad_host", "bad_request")


def test_write_key_allow_list_also_guards_the_cdn(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake, sources={"write_keys": [WRITE_KEY]}))
    resp = exchange(proxy.host, proxy.port, "GET", "/analytics.js/v1/wk_other_2/analytics.min.js")
    assert resp.status == 403
    assert resp.json()["code"] == "write_key_not_allowed"
    assert fake.cdn_requests == []
