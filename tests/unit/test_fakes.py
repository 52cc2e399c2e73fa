"""The fake Segment upstreams behave like the real ones in the ways the proxy's tests rely on."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.fakes import (
    ANALYTICS_NEXT_UMD,
    EU_API_HOST,
    FakeSegment,
    Mode,
    Sink,
    next_integration_bytes,
)

KEY = "wk_unit"


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment([KEY]) as f:
        yield f


def conn_to(url: str, timeout: float = 5.0) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def get(
    url: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    c = conn_to(url)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def post(
    url: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    c = conn_to(url)
    try:
        c.request("POST", path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def test_script_has_the_write_key_and_keep_alive_works(fake: FakeSegment) -> None:
    c = conn_to(fake.cdn_url)
    try:
        for _ in range(2):
            c.request("GET", f"/analytics.js/v1/{KEY}/analytics.min.js")
            r = c.getresponse()
            body = r.read()
            assert r.status == 200
            assert r.getheader("content-type") == "application/javascript"
            assert f'window.analyticsWriteKey="{KEY}"'.encode() in body
            assert b"__WRITE_KEY__" not in body
            assert body == fake.expected_script(KEY)
    finally:
        c.close()
    reqs = fake.cdn_requests
    assert len(reqs) == 2
    assert reqs[0].connection_id == reqs[1].connection_id
    assert all(r.status == 200 for r in reqs)


def test_etag_revalidation_and_head(fake: FakeSegment) -> None:
    status, headers, _ = get(fake.cdn_url, f"/analytics.js/v1/{KEY}/analytics.min.js")
    assert status == 200
    status, _, body = get(
        fake.cdn_url,
        f"/analytics.js/v1/{KEY}/analytics.min.js",
        {"If-None-Match": headers["etag"]},
    )
    assert (status, body) == (304, b"")
    c = conn_to(fake.cdn_url)
    try:
        c.request("HEAD", f"/v1/projects/{KEY}/settings")
        r = c.getresponse()
        assert r.status == 200
        assert int(r.getheader("content-length") or 0) > 100
        assert r.read() == b""
    finally:
        c.close()


def test_settings_on_both_paths_and_helpers(fake: FakeSegment) -> None:
    for path in (f"/v1/projects/{KEY}/settings", f"/projects/{KEY}/settings"):
        status, headers, body = get(fake.cdn_url, path)
        assert status == 200
        assert headers["content-type"] == "application/json"
        settings = json.loads(body)
        seg = settings["integrations"]["Segment.io"]
        assert seg["apiKey"] == KEY
        assert seg["apiHost"] == "api.segment.io/v1"
        assert seg["unbundledIntegrations"] == []
        assert settings["metrics"]["host"] == "api.segment.io/v1"
        assert "someFutureKey" in settings
    fake.use_batching(KEY, size=10, timeout_ms=500)
    fake.use_region("eu", KEY)
    _, _, body = get(fake.cdn_url, f"/v1/projects/{KEY}/settings")
    seg = json.loads(body)["integrations"]["Segment.io"]
    assert seg["deliveryStrategy"] == {
        "strategy": "batching",
        "config": {"size": 10, "timeout": 500},
    }
    assert seg["apiHost"] == EU_API_HOST


def test_unknown_key_and_path_are_404(fake: FakeSegment) -> None:
    assert get(fake.cdn_url, "/v1/projects/nope/settings")[0] == 404
    assert get(fake.cdn_url, "/analytics.js/v1/nope/analytics.min.js")[0] == 404
    assert get(fake.cdn_url, "/analytics-next/bundles/../standalone.js")[0] == 404
    assert get(fake.cdn_url, "/analytics-next/bundles/standalone.js")[0] == 404
    assert get(fake.cdn_url, "/somewhere/else")[0] == 404
    assert post(fake.api_url, "/elsewhere", b"{}", {"Host": fake.api_authority})[0] == 404


def test_every_chunk_of_the_build_is_served(fake: FakeSegment) -> None:
    chunks = sorted(p for p in ANALYTICS_NEXT_UMD.glob("*.bundle.*.js"))
    assert chunks, "no analytics-next chunks found: run npm ci"
    for chunk in chunks:
        status, headers, body = get(fake.cdn_url, f"/analytics-next/bundles/{chunk.name}")
        assert status == 200, chunk.name
        assert headers["content-type"] == "application/javascript"
        assert "immutable" in headers["cache-control"]
        assert body == chunk.read_bytes()


def test_next_integrations_are_gzip_bytes(fake: FakeSegment) -> None:
    path = "/next-integrations/integrations/vendor/commons.59560acf1a8a1ba28e5c.js.gz"
    status, headers, body = get(fake.cdn_url, path)
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert body == next_integration_bytes(path)
    assert gzip.decompress(body).startswith(b"/* fake integration")


def test_wrong_host_is_403_on_both(fake: FakeSegment) -> None:
    status, _, _ = get(
        fake.cdn_url, f"/v1/projects/{KEY}/settings", {"Host": "visitor.example.com"}
    )
    assert status == 403
    status, _ = post(fake.api_url, "/v1/t", b"{}", {"Host": "visitor.example.com"})
    assert status == 403
    assert [r.status for r in fake.cdn_requests] == [403]
    assert fake.api_requests[0].headers["host"] == "visitor.example.com"
    assert fake.api_events(accepted_only=False) != []
    assert fake.api_events() == []


def test_api_records_and_flattens_events(fake: FakeSegment) -> None:
    batch = {
        "batch": [
            {"type": "track", "messageId": "m1", "event": "A"},
            {"type": "identify", "messageId": "m2", "userId": "u"},
        ],
        "sentAt": "2024-01-01T00:00:00Z",
    }
    status, body = post(
        fake.api_url,
        "/v1/batch",
        gzip.compress(json.dumps(batch).encode()),
        {
            "Content-Encoding": "gzip",
            "Authorization": basic(KEY),
            "content-type": "application/json",
        },
    )
    assert (status, json.loads(body)) == (200, {"success": True})
    single = {"type": "page", "messageId": "m3", "writeKey": "wk_body"}
    assert post(fake.api_url, "/v1/p", json.dumps(single).encode())[0] == 200
    metrics = {"series": [{"type": "Counter", "metric": "x", "value": 1, "tags": {}}]}
    assert post(fake.api_url, "/v1/m", json.dumps(metrics).encode())[0] == 200
    assert post(fake.api_url, "/v1/t", b"{not json")[0] == 400

    events = fake.wait_for_events(3, timeout=1)
    assert [(e.path, e.message_id, e.type) for e in events] == [
        ("/v1/batch", "m1", "track"),
        ("/v1/batch", "m2", "identify"),
        ("/v1/p", "m3", "page"),
    ]
    assert events[0].write_key == KEY
    assert events[2].write_key == "wk_body"
    first = fake.api_requests[0]
    assert first.headers["CONTENT-ENCODING"] == "gzip"
    assert first.headers.get("content-type") == "application/json"
    assert first.json == batch
    assert first.basic_auth_user == KEY
    assert len(fake.api_requests) == 4


def test_api_refuses_a_whole_batch_for_one_bad_or_oversize_event(fake: FakeSegment) -> None:
    good = {"type": "track", "messageId": "good", "event": "A"}
    bad = {"type": "track", "messageId": "bad", "event": "refuse me"}
    huge = {"type": "track", "messageId": "huge", "properties": {"x": "y" * 33_000}}
    fake.api_refuse(lambda e: e.get("event") == "refuse me", status=422)

    status, body = post(fake.api_url, "/v1/batch", json.dumps({"batch": [good, bad]}).encode())
    assert status == 422
    assert "bad" in json.loads(body)["message"]
    status, body = post(fake.api_url, "/v1/batch", json.dumps({"batch": [good, huge]}).encode())
    assert status == 400
    assert "huge" in json.loads(body)["message"]
    assert post(fake.api_url, "/v1/t", json.dumps(bad).encode())[0] == 422
    assert post(fake.api_url, "/v1/batch", json.dumps({"batch": [good]}).encode())[0] == 200

    fake.api_refuse(None)
    assert post(fake.api_url, "/v1/t", json.dumps(bad).encode())[0] == 200
    assert [e.message_id for e in fake.api_events()] == ["good", "bad"]


def test_chunked_request_body(fake: FakeSegment) -> None:
    payload = json.dumps({"type": "track", "messageId": "chunked"}).encode()
    with socket.create_connection(("127.0.0.1", fake.api.port), timeout=5) as s:
        half = len(payload) // 2
        parts = [payload[:half], payload[half:]]
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        s.sendall(
            b"POST /v1/t HTTP/1.1\r\nHost: "
            + fake.api_authority.encode()
            + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + chunked
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert [e.message_id for e in fake.wait_for_events(1, timeout=1)] == ["chunked"]


def test_status_mode_with_retry_after_and_times(fake: FakeSegment) -> None:
    fake.api_status(429, retry_after=3, times=1, headers={"X-RateLimit-Reset": "1700000000"})
    c = conn_to(fake.api_url)
    try:
        c.request("POST", "/v1/t", body=b'{"type":"track","messageId":"a"}')
        r = c.getresponse()
        r.read()
        assert (r.status, r.getheader("retry-after")) == (429, "3")
        assert r.getheader("x-ratelimit-reset") == "1700000000"
        c.request("POST", "/v1/t", body=b'{"type":"track","messageId":"a"}')
        r = c.getresponse()
        r.read()
        assert r.status == 200
    finally:
        c.close()
    assert [e.message_id for e in fake.api_events()] == ["a"]
    assert len(fake.api_events(accepted_only=False)) == 2
    fake.cdn_fail(503)
    assert get(fake.cdn_url, f"/v1/projects/{KEY}/settings")[0] == 503
    fake.cdn_ok()
    assert get(fake.cdn_url, f"/v1/projects/{KEY}/settings")[0] == 200


def test_close_mode_drops_the_connection(fake: FakeSegment) -> None:
    fake.api_close(times=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        post(fake.api_url, "/v1/t", b"{}")
    assert post(fake.api_url, "/v1/t", b"{}")[0] == 200
    assert [r.status for r in fake.api_requests] == [None, 200]


def test_hang_until_mode_changes(fake: FakeSegment) -> None:
    fake.api_hang()
    result: list[int] = []

    def send() -> None:
        result.append(post(fake.api_url, "/v1/t", b'{"messageId":"h"}')[0])

    t = threading.Thread(target=send)
    t.start()
    fake.wait_for_request("api", lambda r: r.path == "/v1/t", timeout=5)
    assert fake.api_requests[0].status is None
    assert result == []
    fake.api_ok()
    t.join(timeout=5)
    assert result == [200]


def test_hang_does_not_block_stop() -> None:
    fake = FakeSegment([KEY]).start()
    fake.api_hang()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            post(fake.api_url, "/v1/t", b"{}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    fake.wait_for_request("api", lambda r: True, timeout=5)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 5
    t.join(timeout=5)
    assert not t.is_alive()
    assert len(errors) == 1


def test_idle_keep_alive_connection_does_not_block_stop() -> None:
    fake = FakeSegment([KEY]).start()
    c = conn_to(fake.cdn_url)
    c.request("GET", f"/v1/projects/{KEY}/settings")
    c.getresponse().read()
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 5
    c.close()


def test_cdn_down_refuses_then_comes_back_on_the_same_port(fake: FakeSegment) -> None:
    url = fake.cdn_url
    fake.cdn_down()
    with pytest.raises(ConnectionRefusedError):
        get(url, f"/v1/projects/{KEY}/settings")
    fake.cdn_up()
    assert fake.cdn_url == url
    assert get(url, f"/v1/projects/{KEY}/settings")[0] == 200


def test_wait_for_events_fails_clearly(fake: FakeSegment) -> None:
    post(fake.api_url, "/v1/t", b'{"messageId":"only"}')
    with pytest.raises(AssertionError, match=r"(?s)expected at least 2 events.*got 1.*POST /v1/t"):
        fake.wait_for_events(2, timeout=0.2)


def test_reset(fake: FakeSegment) -> None:
    fake.api_status(500)
    post(fake.api_url, "/v1/t", b"{}")
    fake.reset()
    assert fake.api_requests == []
    assert post(fake.api_url, "/v1/t", b"{}")[0] == 200


def test_sink_records_connection_attempts() -> None:
    with Sink() as sink:
        assert sink.connections == []
        with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(10)  # EOF when the sink closes
        conns = sink.wait_for_connections(1, timeout=5)
        assert len(conns) == 1
        assert conns[0].first_bytes.startswith(b"GET / HTTP/1.1")


def test_hang_with_times_hangs_once_and_stays_hung_until_told(fake: FakeSegment) -> None:
    fake.api_hang(times=1)
    result: list[int] = []

    def send() -> None:
        result.append(post(fake.api_url, "/v1/t", b'{"messageId":"first"}')[0])

    t = threading.Thread(target=send)
    t.start()
    fake.wait_for_request("api", lambda r: r.json == {"messageId": "first"}, timeout=5)
    # the next request is answered normally; the hung one is still waiting
    assert post(fake.api_url, "/v1/t", b'{"messageId":"second"}')[0] == 200
    assert result == []
    fake.api_ok()
    t.join(timeout=5)
    assert result == [200]


def test_api_answers_cors_like_segment(fake: FakeSegment) -> None:
    c = conn_to(fake.api_url)
    try:
        c.request(
            "OPTIONS",
            "/v1/t",
            headers={
                "Origin": "http://site.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        r = c.getresponse()
        r.read()
        assert r.status == 204
        assert r.getheader("access-control-allow-origin") == "http://site.example"
        assert r.getheader("access-control-allow-headers") == "authorization,content-type"
    finally:
        c.close()


def _post_status(fake: FakeSegment, body: bytes) -> int | str:
    """The status the fake API answered a POST with, or "dropped"."""
    try:
        return post(fake.api_url, "/v1/batch", body)[0]
    except (http.client.RemoteDisconnected, ConnectionError):
        return "dropped"


def test_a_cycle_answers_each_step_for_its_count_then_normally(fake: FakeSegment) -> None:
    small = b'{"batch":[{"messageId":"s"}]}'
    large = json.dumps({"batch": [{"messageId": "l", "pad": "x" * 200}]}).encode()
    fake.api_cycle(
        [
            Mode(kind="status", code=301, headers=(("Location", "https://elsewhere/"),), times=2),
            Mode(kind="status", code=413, min_bytes=100, times=2),
            Mode(kind="close", times=1),
            Mode(times=1),  # an ok step counts its requests too
            Mode(kind="status", code=429, retry_after="1", times=1),
        ]
    )
    assert fake.api.step == 0
    c = conn_to(fake.api_url)
    try:
        c.request("POST", "/v1/batch", body=small)
        r = c.getresponse()
        r.read()
        assert (r.status, r.getheader("location")) == (301, "https://elsewhere/")
    finally:
        c.close()
    answers = [
        _post_status(fake, small),  # 301 again
        _post_status(fake, small),  # under min_bytes: answered normally
        _post_status(fake, large),  # 413
        _post_status(fake, small),  # dropped
        _post_status(fake, small),  # the ok step
        _post_status(fake, small),  # 429
        _post_status(fake, small),  # the cycle is over
    ]
    assert answers == [301, 200, 413, "dropped", 200, 429, 200]
    assert fake.api.step == 5
    assert [r.step for r in fake.api_requests] == [0, 0, 1, 1, 2, 3, 4, 5]
    assert [e.message_id for e in fake.api_events()] == ["s", "s", "s"]


def test_a_hang_with_hold_drops_the_connection_unanswered(fake: FakeSegment) -> None:
    fake.api_cycle([Mode(kind="hang", hold=0.2, times=1)])
    assert _post_status(fake, b'{"batch":[{"messageId":"held"}]}') == "dropped"
    assert _post_status(fake, b'{"batch":[{"messageId":"next"}]}') == 200
    held, after = fake.api_requests
    assert (held.status, held.answered_at, held.step) == (None, None, 0)
    assert after.status == 200
    assert after.answered_at is not None
    assert after.answered_at >= after.received_at
    assert [e.message_id for e in fake.api_events()] == ["next"]


def test_a_cycle_needs_a_count_for_every_step(fake: FakeSegment) -> None:
    with pytest.raises(ValueError, match="times"):
        fake.api_cycle([Mode(kind="status", code=500)])
    with pytest.raises(ValueError, match="times"):
        fake.api_cycle([])


def test_setting_a_mode_ends_a_cycle(fake: FakeSegment) -> None:
    fake.api_cycle([Mode(kind="status", code=500, times=5)])
    fake.api_ok()
    assert fake.api.step is None
    assert _post_status(fake, b"{}") == 200
