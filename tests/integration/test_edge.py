"""The HTTP/1.1 edge: framing, keep-alive, pipelining, limits, timeouts, graceful shutdown."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

from tests.integration.conftest import Client, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.proxy import RunningProxy
from tests.support.rawhttp import Conn, RawResponse, request_bytes

EVENT = json.dumps({"writeKey": "k", "type": "track", "event": "e", "messageId": "m"}).encode()


def post(proxy: RunningProxy, endpoint: str = "/v1/t", body: bytes = EVENT) -> bytes:
    return request_bytes("POST", endpoint, proxy.authority, {"Content-Type": "text/plain"}, body)


def test_health_and_readiness(client: Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status == 200
    assert ready.json() == {"status": "ready"}


def test_responses_carry_no_server_banner_and_nosniff(client: Client) -> None:
    resp = client.get("/healthz")
    assert resp.header("server") is None
    assert resp.header("x-content-type-options") == "nosniff"
    assert resp.header("date")


def test_keep_alive_serves_many_requests_on_one_connection(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    with Conn(proxy.host, proxy.port) as conn:
        for _ in range(5):
            conn.send(post(proxy))
            assert conn.read_response().status == 200
    assert len(fake.api_requests) == 5


def test_pipelined_requests_are_answered_in_order(proxy: RunningProxy, fake: FakeSegment) -> None:
    bodies = [
        json.dumps({"writeKey": "k", "event": f"e{i}", "messageId": f"m{i}"}).encode()
        for i in range(6)
    ]
    wire = b"".join(post(proxy, body=b) for b in bodies)
    wire += request_bytes("GET", "/nope", proxy.authority)
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire)
        statuses = [conn.read_response().status for _ in range(7)]
    assert statuses == [200] * 6 + [404]
    assert [r.json["event"] for r in fake.api_requests] == [f"e{i}" for i in range(6)]


def test_chunked_request_bodies_are_reassembled(proxy: RunningProxy, fake: FakeSegment) -> None:
    head = (
        f"POST /v1/t HTTP/1.1\r\nHost: {proxy.authority}\r\n"
        "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
    ).encode()
    chunks = b"".join(
        f"{len(EVENT[i : i + 7]):x}\r\n".encode() + EVENT[i : i + 7] + b"\r\n"
        for i in range(0, len(EVENT), 7)
    )
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(head + chunks + b"0\r\n\r\n")
        assert conn.read_response().status == 200
    assert fake.api_requests[0].json["event"] == "e"


def expect_continue_head(proxy: RunningProxy, path: str, content_length: str) -> bytes:
    """A POST's head that asks for 100 Continue before its body."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {proxy.authority}\r\nExpect: 100-continue\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    ).encode()


def test_expect_100_continue_gets_an_interim_response(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    head = expect_continue_head(proxy, "/v1/t", str(len(EVENT)))
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(head)
        assert conn.read_response().status == 100
        conn.send(EVENT)
        assert conn.read_response().status == 200
    assert len(fake.api_requests) == 1


def test_expect_100_continue_with_a_too_large_body_is_refused_before_it_is_sent(
    proxy: RunningProxy,
) -> None:
    head = expect_continue_head(proxy, "/v1/batch", "99999999")
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(head)
        resp = conn.read_response()
        assert resp.status == 413
        assert resp.json()["code"] == "body_too_large"
        assert conn.closed_by_peer()


@pytest.mark.parametrize(
    ("declared", "refused"),
    [
        (str(512 * 1024 + 1), True),  # as many digits as the limit, one byte over
        ("0" * 30 + str(512 * 1024 + 1), True),  # leading zeros do not hide it
        ("0" * 30 + "5", False),  # many digits, a small value
    ],
)
def test_a_declared_body_length_is_held_to_the_limit_by_value(
    proxy: RunningProxy, declared: str, refused: bool
) -> None:
    head = expect_continue_head(proxy, "/v1/batch", declared)
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(head)
        resp = conn.read_response()
        if refused:
            assert resp.status == 413
            assert resp.json()["code"] == "body_too_large"
        else:
            assert resp.status == 100  # go on: within the limit


def test_too_many_or_too_large_headers_get_431(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake, limits={"max_header_count": 20, "max_header_bytes": 2048}))
    many = {f"X-H{i}": "v" for i in range(30)}
    big = {"X-Big": "v" * 4096}
    for headers in (many, big):
        with Conn(proxy.host, proxy.port) as conn:
            conn.send(request_bytes("GET", "/healthz", proxy.authority, headers))
            resp = conn.read_response()
            assert resp.status == 431
            assert resp.json()["message"]


def test_headers_streamed_past_the_byte_limit_get_431_before_they_end(
    fake: FakeSegment, start: StartProxy
) -> None:
    # One endless header value: refused once a later read takes it over the limit, without
    # waiting for a line end that never comes (llhttp alone would buffer it all). A megabyte
    # cannot arrive in one read, so some read after the first always sees it over.
    proxy = start(base_config(fake, limits={"max_header_bytes": 2048}))
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(f"GET /healthz HTTP/1.1\r\nHost: {proxy.authority}\r\nX-Big: ".encode())
        with contextlib.suppress(OSError):  # the proxy may answer and close mid-send
            conn.send(b"v" * (1 << 20))
        resp = conn.read_response()
        assert resp.status == 431
        assert resp.json()["code"] == "headers_too_large"
        assert conn.closed_by_peer()


def test_headers_of_a_pipelined_request_count_against_the_limits_too(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, limits={"max_header_count": 20, "max_header_bytes": 2048}))
    ok = request_bytes("GET", "/healthz", proxy.authority)
    many = request_bytes("GET", "/healthz", proxy.authority, {f"X-H{i}": "v" for i in range(30)})
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(ok + many)  # one read holding both requests
        assert conn.read_response().status == 200
        resp = conn.read_response()
        assert resp.status == 431
        assert resp.json()["code"] == "too_many_headers"


def test_chunked_trailers_count_against_the_header_limits(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, limits={"max_header_count": 20, "max_header_bytes": 2048}))
    head = (
        f"POST /v1/t HTTP/1.1\r\nHost: {proxy.authority}\r\nContent-Type: text/plain\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = f"{len(EVENT):x}\r\n".encode() + EVENT + b"\r\n"
    trailers = b"".join(f"X-T{i}: {'v' * 100}\r\n".encode() for i in range(30))
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(head + chunk + b"0\r\n" + trailers + b"\r\n")
        resp = conn.read_response()
        assert resp.status == 431
        assert conn.closed_by_peer()
    assert fake.api_requests == []


def test_slow_headers_are_cut_off_with_408(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake, limits={"header_timeout": 0.5}))
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        resp = conn.read_response(timeout=10)  # a 408 (not our deadline) proves the timer
        assert resp.status == 408
        assert conn.closed_by_peer()


def test_slow_bodies_are_cut_off_with_408(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake, limits={"body_timeout": 0.5}))
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(post(proxy)[:-5])  # five bytes of the body never arrive
        resp = conn.read_response(timeout=10)
        assert resp.status == 408
        assert "body" in resp.json()["message"]
    assert fake.api_requests == []


def test_idle_connections_are_closed(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake, limits={"idle_timeout": 0.5}))
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(request_bytes("GET", "/healthz", proxy.authority))
        assert conn.read_response().status == 200
        assert conn.closed_by_peer(timeout=10)


def test_malformed_requests_get_400_and_the_connection_is_closed(proxy: RunningProxy) -> None:
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(b"GARBAGE\x00\x01 / HTTP/1.1\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 400
        assert resp.json()["code"] == "bad_request"
        assert conn.closed_by_peer()


def test_duplicate_host_headers_are_refused(proxy: RunningProxy) -> None:
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n")
        assert conn.read_response().status == 400


def test_sigterm_finishes_in_flight_requests_then_exits(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake))
    fake.api_hang()
    result: list[RawResponse] = []

    def in_flight() -> None:
        with Conn(proxy.host, proxy.port) as conn:
            conn.send(post(proxy))
            result.append(conn.read_response(timeout=20))

    worker = threading.Thread(target=in_flight)
    worker.start()
    deadline = time.monotonic() + 10
    while not fake.api_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.api_requests, "the request never reached the upstream"
    proxy.proc.send_signal(15)
    # New connections are refused once it stops listening.
    deadline = time.monotonic() + 10
    refused = False
    while time.monotonic() < deadline and not refused:
        try:
            socket.create_connection((proxy.host, proxy.port), timeout=1).close()
            time.sleep(0.02)
        except OSError:
            refused = True
    assert refused
    fake.api_ok()  # the upstream answers; the in-flight request must still get its answer
    worker.join(timeout=20)
    assert [r.status for r in result] == [200]
    assert proxy.proc.wait(timeout=15) == 0
