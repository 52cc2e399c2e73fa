"""The memory budget for request bodies (``limits.max_buffered_bytes``), through the real proxy.

The budget here holds exactly two bodies of ``SIZE`` bytes. A body is "held" once the proxy has
answered its ``Expect: 100-continue`` (it reserves the declared length before that answer), so
the tests know without sleeping what the proxy counts. After every way a held body can end
(closed, reset, timed out, delivered, a chunked body dropped), two bodies fit again: the budget
came back to exactly zero, since any byte left over would refuse the second.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Callable

import pytest

from tests.integration.conftest import StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.proxy import RunningProxy
from tests.support.rawhttp import Conn, RawResponse, request_bytes

SIZE = 300_000  # two of these are the budget; over limits.max_body_bytes' 512 KB in all
BODY_TIMEOUT = 5.0


def batch_of(size: int) -> bytes:
    """A valid /v1/batch body of exactly ``size`` bytes (events well under 32 KB each)."""

    def body(pads: list[int]) -> bytes:
        events = [
            {"type": "track", "event": "e", "messageId": f"m{i}", "properties": {"p": "x" * n}}
            for i, n in enumerate(pads)
        ]
        return json.dumps({"writeKey": "k", "batch": events}).encode()

    count = size // 20_000 + 1
    room = size - len(body([0] * count))
    pads = [room // count] * count
    pads[-1] += room % count
    out = body(pads)
    assert len(out) == size
    return out


def held_head(proxy: RunningProxy, size: int, extra: str = "") -> bytes:
    return (
        f"POST /v1/batch HTTP/1.1\r\nHost: {proxy.authority}\r\nContent-Type: application/json\r\n"
        f"Expect: 100-continue\r\nContent-Length: {size}\r\n{extra}\r\n"
    ).encode()


def hold(proxy: RunningProxy, size: int = SIZE) -> tuple[Conn, RawResponse]:
    """A connection whose body of ``size`` the proxy was asked to receive, and its answer:
    ``100`` (held: reserved) or the refusal."""
    conn = Conn(proxy.host, proxy.port)
    conn.send(held_head(proxy, size))
    return conn, conn.read_response()


def fill(proxy: RunningProxy) -> list[Conn]:
    """Two held bodies: the whole budget. Polled for, since the proxy releases what a closed
    connection held once it has seen the close."""
    deadline = time.monotonic() + 20
    while True:
        held = [hold(proxy) for _ in range(2)]
        if all(resp.status == 100 for _, resp in held):
            return [conn for conn, _ in held]
        for conn, _ in held:
            conn.close()
        assert time.monotonic() < deadline, "the budget never came back: bytes leaked"
        time.sleep(0.05)


def assert_over_budget(proxy: RunningProxy) -> None:
    conn, resp = hold(proxy, 1)  # even one byte more
    with conn:
        assert resp.status == 503
        assert resp.json() == {
            "success": False,
            "code": "server_busy",
            "message": resp.json()["message"],
        }
        assert "request bodies" in resp.json()["message"]
        assert resp.header("retry-after") == "1"
        assert resp.header("connection") == "close"
        assert conn.closed_by_peer()


def closed_mid_body(conn: Conn, proxy: RunningProxy) -> None:
    conn.send(b"x" * 1000)
    conn.close()


def reset(conn: Conn, proxy: RunningProxy) -> None:
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def timed_out(conn: Conn, proxy: RunningProxy) -> None:
    with conn:
        assert conn.read_response(timeout=BODY_TIMEOUT * 4).status == 408


def delivered(conn: Conn, proxy: RunningProxy) -> None:
    with conn:
        conn.send(batch_of(SIZE))
        resp = conn.read_response(timeout=30)
        assert resp.status == 200, resp.body


@pytest.fixture
def budgeted(fake: FakeSegment, start: StartProxy) -> RunningProxy:
    limits = {"max_buffered_bytes": 2 * SIZE, "body_timeout": BODY_TIMEOUT}
    return start(base_config(fake, limits=limits))


@pytest.mark.parametrize(
    "end", [closed_mid_body, reset, timed_out, delivered], ids=lambda f: f.__name__
)
def test_bodies_over_the_budget_get_503_and_every_way_a_body_ends_gives_its_bytes_back(
    budgeted: RunningProxy, end: Callable[[Conn, RunningProxy], None]
) -> None:
    for _ in range(2):  # twice: the first round's bytes all came back
        held = fill(budgeted)
        assert_over_budget(budgeted)
        for conn in held:
            end(conn, budgeted)
    for conn in fill(budgeted):
        conn.close()


def test_a_chunked_body_counts_as_it_grows_and_is_refused_once_it_would_go_over(
    budgeted: RunningProxy, fake: FakeSegment
) -> None:
    held, resp = hold(budgeted)  # half the budget
    assert resp.status == 100
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: {budgeted.authority}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    grown = b"".join(f"{10_000:x}\r\n".encode() + b"x" * 10_000 + b"\r\n" for _ in range(40))
    with Conn(budgeted.host, budgeted.port) as chunked:
        with contextlib.suppress(OSError):  # the proxy may answer and close mid-send
            chunked.send(head + grown)  # 400 KB: more than the half left
        refused = chunked.read_response()
        assert refused.status == 503
        assert refused.json()["code"] == "server_busy"
        assert chunked.closed_by_peer()
    held.close()
    for conn in fill(budgeted):  # what the chunked body held came back too
        conn.close()
    assert fake.api_requests == []


def test_many_slow_bodies_cannot_take_more_than_the_budget_and_a_normal_request_then_succeeds(
    budgeted: RunningProxy, fake: FakeSegment
) -> None:
    small = SIZE // 10
    conns: list[Conn] = []
    statuses: list[int] = []
    try:
        for _ in range(30):
            conn, resp = hold(budgeted, small)
            conns.append(conn)
            statuses.append(resp.status)
        assert statuses.count(100) == 20  # exactly what fits
        assert set(statuses) == {100, 503}
    finally:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
    for conn in fill(budgeted):
        conn.close()
    event = json.dumps({"writeKey": "k", "type": "track", "event": "e"}).encode()
    with Conn(budgeted.host, budgeted.port) as conn:
        conn.send(request_bytes("POST", "/v1/t", budgeted.authority, {}, event))
        assert conn.read_response().status == 200
    assert len(fake.api_requests) == 1
