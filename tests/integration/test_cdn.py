"""The CDN proxy: what the browser receives, what Segment's CDN sees, and the cache between."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable

import brotli
import pytest

from segproxy.cdn.rewrite import CDN_PRELUDE
from tests.integration.conftest import WRITE_KEY, Client, StartProxy, base_config
from tests.support.fakes import REPO_ROOT, FakeSegment, next_integration_bytes
from tests.support.proxy import RunningProxy
from tests.support.rawhttp import exchange

SCRIPT = f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js"
SETTINGS = f"/v1/projects/{WRITE_KEY}/settings"


def poll(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.02)


def test_script_is_the_cdn_script_with_the_cdn_prelude(client: Client, fake: FakeSegment) -> None:
    resp = client.get(SCRIPT)
    assert resp.status == 200
    assert "javascript" in (resp.header("content-type") or "")
    assert resp.body == CDN_PRELUDE + fake.expected_script()
    assert resp.header("access-control-allow-origin") == "*"
    assert resp.header("cache-control") == "public, max-age=60"


@pytest.mark.parametrize(
    ("accept", "encoding", "decode"),
    [
        ("gzip, deflate, br", "br", brotli.decompress),
        ("gzip", "gzip", gzip.decompress),
        ("br;q=0, gzip;q=0.5", "gzip", gzip.decompress),
        ("identity", None, lambda b: b),
    ],
)
def test_script_is_compressed_for_clients_that_accept_it(
    client: Client,
    fake: FakeSegment,
    accept: str,
    encoding: str | None,
    decode: Callable[[bytes], bytes],
) -> None:
    resp = client.get(SCRIPT, {"Accept-Encoding": accept})
    assert resp.header("content-encoding") == encoding
    assert resp.header("vary") == "Accept-Encoding"
    assert decode(resp.body) == CDN_PRELUDE + fake.expected_script()


def test_the_cdn_sees_its_own_host_and_no_visitor_cookies_or_hop_headers(
    client: Client, fake: FakeSegment
) -> None:
    client.get(
        SCRIPT,
        {
            "Cookie": "ajs_user_id=secret",
            "Authorization": "Bearer visitor",
            "Connection": "keep-alive, X-Private",
            "X-Private": "1",
            "Proxy-Authorization": "Basic eDp5",
            "Upgrade-Insecure-Requests": "1",
        },
        host_header="analytics.example.com",
    )
    (seen,) = fake.cdn_requests
    assert seen.headers.get("host") == fake.cdn_authority
    for name in ("cookie", "authorization", "x-private", "proxy-authorization"):
        assert seen.headers.get(name) is None, name


def test_settings_name_the_proxy_and_keep_unknown_keys(
    client: Client, fake: FakeSegment, proxy: RunningProxy
) -> None:
    resp = client.get(SETTINGS)
    assert resp.status == 200
    doc = resp.json()
    sio = doc["integrations"]["Segment.io"]
    assert sio["apiHost"] == f"{proxy.authority}/v1"
    assert sio["protocol"] == "http"
    assert doc["metrics"]["host"] == f"{proxy.authority}/v1"
    upstream = fake.settings[WRITE_KEY]
    assert doc["someFutureKey"] == upstream["someFutureKey"]
    assert sio["apiKey"] == upstream["integrations"]["Segment.io"]["apiKey"]
    assert int(resp.header("content-length") or -1) == len(resp.body)


def test_settings_use_forwarded_host_and_proto_from_a_trusted_proxy(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, trusted_proxies=["127.0.0.1/32"]))
    resp = Client(proxy).get(
        SETTINGS,
        {"X-Forwarded-Host": "analytics.example.com", "X-Forwarded-Proto": "https"},
    )
    sio = resp.json()["integrations"]["Segment.io"]
    assert sio["apiHost"] == "analytics.example.com/v1"
    assert sio["protocol"] == "https"


def test_settings_on_a_path_prefix_name_the_prefix(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake, prefix="/seg"))
    client = Client(proxy)
    resp = client.get("/seg" + SETTINGS, host_header="www.example.com")
    assert resp.json()["integrations"]["Segment.io"]["apiHost"] == "www.example.com/seg/v1"
    assert client.get(SETTINGS).status == 404
    assert client.post("/seg/v1/t", b'{"writeKey":"k","event":"e"}').status == 200


def test_eu_settings_are_rewritten_to_the_proxy_too(
    client: Client, fake: FakeSegment, proxy: RunningProxy
) -> None:
    fake.use_region("eu")
    sio = client.get(SETTINGS).json()["integrations"]["Segment.io"]
    assert sio["apiHost"] == f"{proxy.authority}/v1"


def test_cached_script_is_fetched_once_for_many_visitors(client: Client, fake: FakeSegment) -> None:
    statuses = [client.get(SCRIPT).header("x-segproxy-cache") for _ in range(5)]
    assert statuses == ["MISS", "HIT", "HIT", "HIT", "HIT"]
    assert len(fake.cdn_requests) == 1


def test_concurrent_misses_share_one_upstream_fetch(client: Client, fake: FakeSegment) -> None:
    fake.cdn_hang(times=1)  # the first fetch hangs until we release it
    results: list[int] = []

    def fetch() -> None:
        results.append(client.get(SCRIPT).status)

    threads = [threading.Thread(target=fetch) for _ in range(10)]
    for t in threads:
        t.start()
    poll(lambda: len(fake.cdn_requests) >= 1)
    fake.cdn_ok()
    for t in threads:
        t.join(timeout=20)
    assert results == [200] * 10
    assert len(fake.cdn_requests) == 1


def test_etag_revalidation_answers_304_for_every_encoding(client: Client) -> None:
    for accept in ("br", "gzip", "identity"):
        first = client.get(SCRIPT, {"Accept-Encoding": accept})
        etag = first.header("etag")
        assert etag
        again = client.get(SCRIPT, {"Accept-Encoding": accept, "If-None-Match": etag})
        assert again.status == 304
        assert again.body == b""
        assert again.header("etag") == etag


def test_gz_integration_files_pass_through_byte_exact(client: Client, fake: FakeSegment) -> None:
    path = "/next-integrations/integrations/vendor/1.2.3/vendor.dynamic.js.gz"
    resp = client.get(path, {"Accept-Encoding": "gzip, br"})
    assert resp.status == 200
    assert resp.header("content-encoding") == "gzip"
    assert resp.body == next_integration_bytes(path)


def test_bundles_pass_through_and_are_cached_long_and_immutable(client: Client) -> None:
    umd = REPO_ROOT / "node_modules/@segment/analytics-next/dist/umd"
    chunks = sorted(umd.glob("*.bundle.*.js"))
    assert chunks, "analytics-next is not installed (scripts/setup.sh installs it)"
    for chunk in chunks[:3]:
        resp = client.get(f"/analytics-next/bundles/{chunk.name}")
        assert resp.status == 200
        assert resp.body == chunk.read_bytes()
        assert resp.header("cache-control") == "public, max-age=31536000, immutable"


def test_cdn_down_serves_the_last_good_copy(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake, cache={"script_ttl": 0.05, "stale_while_revalidate": 0.001}))
    client = Client(proxy)
    good = client.get(SCRIPT)
    assert good.status == 200
    fake.cdn_fail(503)
    time.sleep(0.1)  # let the 50 ms TTL lapse: this is the condition under test, not a sync
    stale = client.get(SCRIPT)
    assert stale.status == 200
    assert stale.header("x-segproxy-cache") == "STALE"
    assert stale.body == good.body
    fake.cdn_down()
    assert client.get(SCRIPT).body == good.body


def test_cdn_down_without_a_copy_is_a_502_with_retry_after(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake))
    fake.cdn_down()
    resp = Client(proxy).get(SCRIPT)
    assert resp.status == 502
    assert resp.header("retry-after")
    assert resp.json()["code"] == "cdn_unavailable"


def test_stale_copy_is_served_at_once_and_refreshed_in_the_background(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, cache={"settings_ttl": 0.05}))
    client = Client(proxy)
    assert client.get(SETTINGS).header("x-segproxy-cache") == "MISS"
    fake.settings[WRITE_KEY]["plan"] = {"track": {"__default": {"enabled": False}}}
    time.sleep(0.1)  # let the 50 ms TTL lapse: this is the condition under test, not a sync
    stale = client.get(SETTINGS)
    assert stale.header("x-segproxy-cache") == "STALE"
    assert stale.json()["plan"] != fake.settings[WRITE_KEY]["plan"]
    poll(lambda: len(fake.cdn_requests) == 2)
    poll(lambda: client.get(SETTINGS).json()["plan"] == fake.settings[WRITE_KEY]["plan"])


def test_error_pages_are_never_cached_as_good_copies(client: Client, fake: FakeSegment) -> None:
    fake.cdn_fail(503, times=1)
    first = client.get(SCRIPT)
    assert first.status == 502
    second = client.get(SCRIPT)
    assert second.status == 200
    assert second.header("x-segproxy-cache") == "MISS"


def test_unknown_write_key_is_a_404_passed_on_and_not_cached(
    client: Client, fake: FakeSegment
) -> None:
    path = "/v1/projects/wk_unknown_9/settings"
    assert client.get(path).status == 404
    assert client.get(path).status == 404
    assert len(fake.cdn_requests) == 2


def test_head_has_headers_and_no_body(proxy: RunningProxy) -> None:
    resp = exchange(proxy.host, proxy.port, "HEAD", SCRIPT)
    assert resp.status == 200
    assert int(resp.header("content-length") or 0) > 1000
    assert resp.body == b""


def test_cdn_preflight_is_answered_locally(client: Client, fake: FakeSegment) -> None:
    resp = client.request("OPTIONS", SETTINGS, headers={"Origin": "https://www.example.com"})
    assert resp.status == 204
    assert resp.header("access-control-allow-origin") == "*"
    assert fake.cdn_requests == []


def test_cdn_failures_are_logged_without_the_write_key(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake))
    fake.cdn_down()
    client = Client(proxy)
    assert client.get(SCRIPT).status == 502
    assert client.get(SETTINGS).status == 502
    proxy.logged("CDN fetch")  # the failure is logged...
    assert WRITE_KEY not in proxy.logs()  # ...without the secret


def test_one_write_keys_settings_never_answer_for_another(
    client: Client, fake: FakeSegment
) -> None:
    other = "wk_other_2"
    first = client.get(SETTINGS).json()
    second = client.get(f"/v1/projects/{other}/settings").json()
    assert first["integrations"]["Segment.io"]["apiKey"] == WRITE_KEY
    assert second["integrations"]["Segment.io"]["apiKey"] == other
    again = client.get(SETTINGS).json()  # a cache hit still belongs to its own key
    assert again["integrations"]["Segment.io"]["apiKey"] == WRITE_KEY
    script = client.get(f"/analytics.js/v1/{other}/analytics.min.js")
    assert script.body.endswith(fake.expected_script(other))
