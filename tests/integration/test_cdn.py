"""The CDN proxy: what the browser receives, what Segment's CDN sees, and the cache between."""

from __future__ import annotations

import contextlib
import gzip
import socket
import struct
import threading
import time
from collections.abc import Callable

import brotli
import pytest

from segproxy.cdn.rewrite import CDN_PRELUDE
from segproxy.upstream import MAX_RESPONSE_BODY, MAX_RESPONSE_HEAD
from tests.integration.conftest import WRITE_KEY, Client, StartProxy, base_config
from tests.support.fakes import REPO_ROOT, FakeSegment, Mode, next_integration_bytes
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


# --------------------------------------------------------------------------------------------
# A broken answer from the CDN is never a good copy


def _broken_answers(script: bytes) -> dict[str, Mode]:
    """The CDN answering 200 with a body that is not the whole script, three ways."""
    whole = gzip.compress(script, mtime=0)
    bad_crc = bytearray(whole)
    bad_crc[-8] ^= 0xFF  # the CRC-32 in the gzip trailer no longer matches the data
    js = ("Content-Type", "application/javascript")
    gz = ("Content-Encoding", "gzip")
    return {
        # cut mid-stream, with a Content-Length that matches what was sent
        "truncated gzip": Mode(kind="status", body=whole[: len(whole) // 20], headers=(js, gz)),
        "bad crc": Mode(kind="status", body=bytes(bad_crc), headers=(js, gz)),
        # the connection closes after part of the declared length
        "shorter than content-length": Mode(
            kind="status",
            body=script[: len(script) // 2],
            headers=(js, ("Content-Length", str(len(script))), ("Connection", "close")),
        ),
        # more than any Segment file: the proxy stops reading rather than hold it all
        "body over 32 MiB": Mode(
            kind="status", body=script + b" " * MAX_RESPONSE_BODY, headers=(js,)
        ),
        "headers over 64 KiB": Mode(
            kind="status", body=script, headers=(js, ("X-Padding", "a" * MAX_RESPONSE_HEAD))
        ),
    }


BROKEN = (
    "truncated gzip",
    "bad crc",
    "shorter than content-length",
    "body over 32 MiB",
    "headers over 64 KiB",
)


@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_cdn_answer_is_not_cached_and_the_last_good_copy_is_served(
    fake: FakeSegment, start: StartProxy, broken: str
) -> None:
    proxy = start(base_config(fake, cache={"script_ttl": 0.05, "stale_while_revalidate": 0.001}))
    client = Client(proxy)
    good = client.get(SCRIPT)
    assert good.status == 200
    assert good.body == CDN_PRELUDE + fake.expected_script()
    fake.cdn_mode(_broken_answers(fake.expected_script())[broken])
    time.sleep(0.1)  # let the 50 ms TTL lapse: this is the condition under test, not a sync
    for attempt in (1, 2):  # each request tries the CDN again: nothing broken was stored
        stale = client.get(SCRIPT)
        assert stale.status == 200
        assert stale.header("x-segproxy-cache") == "STALE"
        assert stale.body == good.body
        assert len(fake.cdn_requests) == 1 + attempt
    fake.cdn_ok()
    fresh = client.get(SCRIPT)
    assert fresh.header("x-segproxy-cache") == "MISS"
    assert fresh.body == good.body


@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_cdn_answer_without_a_good_copy_is_a_clear_502(
    fake: FakeSegment, start: StartProxy, broken: str
) -> None:
    proxy = start(base_config(fake))
    fake.cdn_mode(_broken_answers(fake.expected_script())[broken])
    client = Client(proxy)
    for _ in range(2):  # and the second visitor does not get the broken body from the cache
        resp = client.get(SCRIPT)
        assert resp.status == 502
        assert resp.header("cache-control") == "no-store"
        assert resp.header("retry-after")
        assert resp.json() == {
            "success": False,
            "code": "cdn_invalid_answer",
            "message": "the Segment CDN sent an incomplete or invalid answer",
        }
    assert len(fake.cdn_requests) == 2
    proxy.logged("CDN fetch .* (gzip|closed|cut off)")  # the details are for the operator


def test_a_cdn_502_names_no_address_or_errno_and_the_log_does(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake))
    fake.cdn_down()
    resp = Client(proxy).get(SCRIPT)
    assert resp.status == 502
    assert resp.json() == {
        "success": False,
        "code": "cdn_unavailable",
        "message": "the Segment CDN could not be reached",
    }
    port = str(fake.cdn.port)
    for internal in (port, "127.0.0.1", "Errno", "errno", "refused"):
        assert internal not in resp.text(), internal
    logged = proxy.logged(r"CDN fetch .* failed: .*")
    assert fake.cdn_authority in logged.group(0)
    assert "Errno" in logged.group(0) or "refused" in logged.group(0)


# --------------------------------------------------------------------------------------------
# Settings name the visitor's host: no shared cache may hand them to another


def test_settings_are_private_and_vary_on_what_they_are_rendered_from(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, trusted_proxies=["127.0.0.1/32"]))
    client = Client(proxy)
    for accept in ("gzip, br", "identity"):
        resp = client.get(SETTINGS, {"Accept-Encoding": accept})
        assert resp.status == 200
        assert resp.header("cache-control") == "private, max-age=60"
        vary = {v.strip().lower() for v in (resp.header("vary") or "").split(",")}
        assert vary == {
            "host",
            "x-forwarded-host",
            "x-forwarded-proto",
            "forwarded",
            "accept-encoding",
        }
        again = client.get(SETTINGS, {"If-None-Match": resp.header("etag") or ""})
        assert again.status == 304
        assert again.header("cache-control") == "private, max-age=60"
    # the script is the same bytes for every host: it stays cacheable by anyone
    assert client.get(SCRIPT).header("cache-control") == "public, max-age=60"


def test_settings_without_trusted_proxies_vary_on_host_only(client: Client) -> None:
    resp = client.get(SETTINGS)
    assert resp.header("cache-control") == "private, max-age=60"
    vary = {v.strip().lower() for v in (resp.header("vary") or "").split(",")}
    assert vary == {"host", "accept-encoding"}


class _ResettingCdn:
    """A CDN that answers 200 with a body delimited by the connection's end (no length, not
    chunked), sends part of it, then resets the connection: an abnormal end, not the end of
    the body. The fake CDN always sends a Content-Length, so this one is a raw socket."""

    def __init__(self, partial: bytes) -> None:
        self.partial = partial
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            head = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.requests += 1
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/javascript\r\n\r\n"
                    + self.partial
                )
                # SO_LINGER 0: close() sends a reset instead of an orderly end
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()
        self.thread.join(timeout=5)


def test_a_body_cut_by_a_connection_reset_is_not_a_body(
    fake: FakeSegment, start: StartProxy
) -> None:
    cdn = _ResettingCdn(fake.expected_script()[:5000])
    try:
        config = base_config(fake)
        config["upstream"]["cdn"] = f"http://127.0.0.1:{cdn.port}"
        proxy = start(config)
        client = Client(proxy)
        for _ in range(2):  # not cached: the second visitor does not get the partial body
            resp = client.get(SCRIPT)
            assert resp.status == 502
            assert resp.json()["code"] == "cdn_invalid_answer"
        assert cdn.requests == 2
    finally:
        cdn.close()
