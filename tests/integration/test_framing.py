"""Request framing at the edge: smuggling attempts are refused, and the connection cap.

Every ambiguous or malformed framing gets 400 with a JSON body naming the problem, the
connection is closed (nothing after it on that connection can be trusted), and nothing of it
reaches the upstream.
"""

from __future__ import annotations

import json
import time

from tests.integration.conftest import WRITE_KEY, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.proxy import RunningProxy
from tests.support.rawhttp import Conn, RawResponse, request_bytes

EVENT = json.dumps({"writeKey": "k", "type": "track", "event": "e", "messageId": "m"}).encode()


def head(proxy: RunningProxy, *lines: str, target: str = "/v1/t", version: str = "1.1") -> bytes:
    """A POST head to the events API with exactly these extra header lines."""
    text = f"POST {target} HTTP/{version}\r\nHost: {proxy.authority}\r\n"
    return (text + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode("latin-1")


def chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def assert_refused(proxy: RunningProxy, fake: FakeSegment, wire: bytes) -> RawResponse:
    """Send ``wire``: expect a JSON 400, the connection closed, and nothing upstream."""
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire)
        resp = conn.read_response()
        assert resp.status == 400, resp.body
        problem = resp.json()
        assert problem["success"] is False
        assert problem["code"] in ("bad_request", "bad_framing")
        assert problem["message"]
        assert resp.header("connection") == "close"
        assert conn.closed_by_peer()
    assert fake.api_requests == []
    assert fake.cdn_requests == []
    return resp


# -- Content-Length and Transfer-Encoding together or repeated --------------------------------


def test_content_length_with_transfer_encoding_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, f"Content-Length: {len(EVENT)}", "Transfer-Encoding: chunked")
    assert_refused(proxy, fake, wire + chunked(EVENT))


def test_transfer_encoding_before_content_length_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "Transfer-Encoding: chunked", f"Content-Length: {len(EVENT)}")
    assert_refused(proxy, fake, wire + chunked(EVENT))


def test_duplicate_content_length_with_the_same_value_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    n = len(EVENT)
    assert_refused(proxy, fake, head(proxy, f"Content-Length: {n}", f"Content-Length: {n}") + EVENT)


def test_duplicate_content_length_with_different_values_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    n = len(EVENT)
    wire = head(proxy, f"Content-Length: {n}", f"Content-Length: {n + 5}") + EVENT + b"xxxxx"
    assert_refused(proxy, fake, wire)


def test_content_length_as_a_list_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    n = len(EVENT)
    assert_refused(proxy, fake, head(proxy, f"Content-Length: {n}, {n}") + EVENT)


# -- Transfer-Encoding other than a lone final chunked ----------------------------------------


def test_transfer_encoding_chunked_then_identity_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    assert_refused(
        proxy, fake, head(proxy, "Transfer-Encoding: chunked, identity") + chunked(EVENT)
    )


def test_transfer_encoding_gzip_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    assert_refused(proxy, fake, head(proxy, "Transfer-Encoding: gzip") + chunked(EVENT))


def test_transfer_encoding_xchunked_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    assert_refused(proxy, fake, head(proxy, "Transfer-Encoding: xchunked") + chunked(EVENT))


def test_transfer_encoding_gzip_then_chunked_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    resp = assert_refused(
        proxy, fake, head(proxy, "Transfer-Encoding: gzip, chunked") + chunked(EVENT)
    )
    assert resp.json()["code"] == "bad_framing"
    assert "Transfer-Encoding" in resp.json()["message"]


def test_transfer_encoding_split_over_two_headers_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "Transfer-Encoding: gzip", "Transfer-Encoding: chunked") + chunked(EVENT)
    assert_refused(proxy, fake, wire)


def test_transfer_encoding_on_http_1_0_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "Transfer-Encoding: chunked", version="1.0") + chunked(EVENT)
    assert assert_refused(proxy, fake, wire).json()["code"] == "bad_framing"


def test_chunked_transfer_encoding_in_any_case_is_still_accepted(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(head(proxy, "Transfer-Encoding: Chunked") + chunked(EVENT))
        assert conn.read_response().status == 200
    assert len(fake.api_requests) == 1


# -- line framing ------------------------------------------------------------------------------


def test_obsolete_line_folding_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "X-Folded: a", " b", f"Content-Length: {len(EVENT)}") + EVENT
    assert_refused(proxy, fake, wire)


def test_folded_transfer_encoding_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    assert_refused(proxy, fake, head(proxy, "Transfer-Encoding:", " chunked") + chunked(EVENT))


def test_bare_lf_line_endings_are_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = f"POST /v1/t HTTP/1.1\nHost: {proxy.authority}\nContent-Length: {len(EVENT)}\n\n"
    assert_refused(proxy, fake, wire.encode() + EVENT)


def test_a_bare_lf_after_one_header_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, f"X-A: b\nContent-Length: {len(EVENT)}") + EVENT
    assert_refused(proxy, fake, wire)


# -- chunk framing -------------------------------------------------------------------------------


def test_a_non_hex_chunk_size_is_refused_and_closed(proxy: RunningProxy, fake: FakeSegment) -> None:
    wire = head(proxy, "Transfer-Encoding: chunked") + b"zz\r\n" + EVENT + b"\r\n0\r\n\r\n"
    assert_refused(proxy, fake, wire)


def test_a_negative_chunk_size_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "Transfer-Encoding: chunked") + b"-1\r\n" + EVENT + b"\r\n0\r\n\r\n"
    assert_refused(proxy, fake, wire)


def test_an_overflowing_chunk_size_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    size = b"1" + b"0" * 16  # 2**64: one past what fits in 64 bits
    wire = head(proxy, "Transfer-Encoding: chunked") + size + b"\r\n" + EVENT + b"\r\n0\r\n\r\n"
    assert_refused(proxy, fake, wire)


def test_a_chunk_size_with_0x_prefix_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    size = f"0x{len(EVENT):x}".encode()
    wire = head(proxy, "Transfer-Encoding: chunked") + size + b"\r\n" + EVENT + b"\r\n0\r\n\r\n"
    assert_refused(proxy, fake, wire)


def test_a_chunk_extension_over_1_kb_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    chunk = f"{len(EVENT):x};ext=".encode() + b"x" * 2048 + b"\r\n" + EVENT + b"\r\n0\r\n\r\n"
    resp = assert_refused(proxy, fake, head(proxy, "Transfer-Encoding: chunked") + chunk)
    assert resp.json()["code"] == "bad_framing"
    assert "chunk extension" in resp.json()["message"]


def test_a_chunk_extension_over_1_kb_after_the_headers_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    # The head goes first (100-continue: its answer says the head was read), the chunk after.
    wire = head(proxy, "Transfer-Encoding: chunked", "Expect: 100-continue")
    chunk = f"{len(EVENT):x};ext=".encode() + b"x" * 2048 + b"\r\n" + EVENT + b"\r\n0\r\n\r\n"
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire)
        assert conn.read_response().status == 100
        conn.send(chunk)
        resp = conn.read_response()
        assert resp.status == 400
        assert resp.json()["code"] == "bad_framing"
        assert "chunk extension" in resp.json()["message"]
        assert conn.closed_by_peer()
    assert fake.api_requests == []


def test_endless_chunk_extensions_are_cut_off_before_the_chunk_ends(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "Transfer-Encoding: chunked", "Expect: 100-continue")
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire)
        assert conn.read_response().status == 100
        conn.send(b"5;a=" + b"x" * 4096)  # the chunk line never ends
        resp = conn.read_response()
        assert resp.status == 400
        assert resp.json()["code"] == "bad_framing"
        assert conn.closed_by_peer()
    assert fake.api_requests == []


def test_small_chunk_extensions_are_accepted(proxy: RunningProxy, fake: FakeSegment) -> None:
    wire = head(proxy, "Transfer-Encoding: chunked", "Expect: 100-continue")
    body = b"".join(
        f"{len(EVENT[i : i + 5]):x};n={i}".encode() + b"\r\n" + EVENT[i : i + 5] + b"\r\n"
        for i in range(0, len(EVENT), 5)
    )
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire)
        assert conn.read_response().status == 100
        conn.send(body + b"0;last\r\nX-Trailer: dropped\r\n\r\n")
        assert conn.read_response().status == 200
    assert fake.api_requests[0].json["event"] == "e"


# -- header values -----------------------------------------------------------------------------


def test_a_cr_inside_a_header_value_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "X-A: a\rContent-Length: 5", f"Content-Length: {len(EVENT)}") + EVENT
    assert_refused(proxy, fake, wire)


def test_an_lf_inside_a_header_value_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "X-A: a\nTransfer-Encoding: chunked", f"Content-Length: {len(EVENT)}")
    assert_refused(proxy, fake, wire + EVENT)


def test_a_nul_in_a_header_value_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "X-A: a\x00b", f"Content-Length: {len(EVENT)}") + EVENT
    assert_refused(proxy, fake, wire)


def test_a_nul_in_a_header_name_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "X-\x00A: b", f"Content-Length: {len(EVENT)}") + EVENT
    assert_refused(proxy, fake, wire)


def test_a_space_before_the_colon_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "Transfer-Encoding : chunked", f"Content-Length: {len(EVENT)}")
    assert_refused(proxy, fake, wire + EVENT)


# -- request line --------------------------------------------------------------------------------


def test_a_space_in_the_request_target_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, f"Content-Length: {len(EVENT)}", target="/v1/t x") + EVENT
    assert_refused(proxy, fake, wire)


def test_an_http_0_9_request_line_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    assert_refused(proxy, fake, b"GET /healthz\r\n\r\n")


def test_http_0_9_as_a_version_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, f"Content-Length: {len(EVENT)}", version="0.9") + EVENT
    assert "version" in assert_refused(proxy, fake, wire).json()["message"]


def test_http_2_0_as_a_version_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, f"Content-Length: {len(EVENT)}", version="2.0") + EVENT
    assert "version" in assert_refused(proxy, fake, wire).json()["message"]


def test_http_2_0_asking_for_keep_alive_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, "Connection: keep-alive", f"Content-Length: {len(EVENT)}", version="2.0")
    assert "version" in assert_refused(proxy, fake, wire + EVENT).json()["message"]


def test_an_unknown_http_version_is_refused_and_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    wire = head(proxy, f"Content-Length: {len(EVENT)}", version="1.2") + EVENT
    assert_refused(proxy, fake, wire)


def test_http_1_0_requests_are_still_served(proxy: RunningProxy, fake: FakeSegment) -> None:
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(head(proxy, f"Content-Length: {len(EVENT)}", version="1.0") + EVENT)
        assert conn.read_response().status == 200
        assert conn.closed_by_peer()
    with Conn(proxy.host, proxy.port) as conn:
        keep = head(proxy, "Connection: keep-alive", f"Content-Length: {len(EVENT)}", version="1.0")
        conn.send(keep + EVENT)
        assert conn.read_response().status == 200
        conn.send(keep + EVENT)
        assert conn.read_response().status == 200
    assert len(fake.api_requests) == 3


# -- pipelining after a refusal --------------------------------------------------------------


def _sentinel(proxy: RunningProxy, fake: FakeSegment) -> None:
    """One accepted request on a fresh connection, so the upstream has seen what it will."""
    body = json.dumps({"writeKey": "k", "event": "sentinel", "messageId": "s"}).encode()
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(head(proxy, f"Content-Length: {len(body)}") + body)
        assert conn.read_response().status == 200


def test_a_request_pipelined_after_a_smuggling_attempt_is_not_processed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    smuggled = json.dumps({"writeKey": "k", "event": "smuggled", "messageId": "x"}).encode()
    inner = head(proxy, f"Content-Length: {len(smuggled)}") + smuggled
    # A front end honouring Content-Length sees one request; one honouring chunked sees two.
    attempt = head(proxy, f"Content-Length: {len(inner) + 5}", "Transfer-Encoding: chunked")
    wire = attempt + b"0\r\n\r\n" + inner
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire)
        assert conn.read_response().status == 400
        assert conn.closed_by_peer()
        assert conn.buf == b""  # one answer only: the pipelined request got none
    _sentinel(proxy, fake)
    assert [r.json["event"] for r in fake.api_requests] == ["sentinel"]


def test_a_valid_request_pipelined_after_a_bad_chunk_is_not_processed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    valid = head(proxy, f"Content-Length: {len(EVENT)}") + EVENT
    bad = head(proxy, "Transfer-Encoding: gzip, chunked") + chunked(EVENT)
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(bad + valid)
        assert conn.read_response().status == 400
        assert conn.closed_by_peer()
        assert conn.buf == b""
    _sentinel(proxy, fake)
    assert [r.json["event"] for r in fake.api_requests] == ["sentinel"]


def test_requests_before_a_smuggling_attempt_are_answered_first(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    valid = head(proxy, f"Content-Length: {len(EVENT)}") + EVENT
    bad = head(proxy, "Content-Length: 1", "Content-Length: 2") + b"ab"
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(valid + bad + valid)
        assert conn.read_response().status == 200
        assert conn.read_response().status == 400
        assert conn.closed_by_peer()
    assert len(fake.api_requests) == 1


# -- the connection cap ------------------------------------------------------------------------


def _healthz(conn: Conn, proxy: RunningProxy) -> int:
    conn.send(request_bytes("GET", "/healthz", proxy.authority))
    return conn.read_response().status


def test_connections_over_max_connections_are_refused_and_existing_ones_keep_working(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, limits={"max_connections": 5}))
    conns = [Conn(proxy.host, proxy.port) for _ in range(5)]
    try:
        for conn in conns:
            assert _healthz(conn, proxy) == 200  # answered: the proxy holds it open
        with Conn(proxy.host, proxy.port) as extra:
            resp = extra.read_response()  # answered without being asked
            assert resp.status == 503
            assert resp.json()["code"] == "too_many_connections"
            assert resp.header("retry-after")
            assert resp.header("connection") == "close"
            assert extra.closed_by_peer()
        for conn in conns:
            assert _healthz(conn, proxy) == 200
        conns.pop().close()
        # The proxy sees the close a moment later: a new connection works once it has.
        deadline = time.monotonic() + 10
        status = 0
        while status != 200 and time.monotonic() < deadline:
            with Conn(proxy.host, proxy.port) as conn:
                try:
                    status = _healthz(conn, proxy)
                except (ConnectionError, OSError):
                    status = 0
                if status == 200:
                    assert _healthz(conn, proxy) == 200  # and it stays open
        assert status == 200
    finally:
        for conn in conns:
            conn.close()
    assert fake.api_requests == []


# -- protocol upgrades: answered once, as plain HTTP, then closed ------------------------------


def everything_sent(conn: Conn) -> list[RawResponse]:
    """Every response the proxy sends on ``conn`` until it closes it (fails if it never does)."""
    responses = []
    while True:
        try:
            responses.append(conn.read_response(timeout=10))
        except ConnectionError:
            assert conn.buf == b"", f"bytes after the last response: {conn.buf!r}"
            return responses


def test_a_request_asking_for_an_upgrade_is_answered_exactly_once_then_closed(
    proxy: RunningProxy,
) -> None:
    wire = (
        f"GET /healthz HTTP/1.1\r\nHost: {proxy.authority}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire + b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")  # a WebSocket frame
        responses = everything_sent(conn)
    assert [r.status for r in responses] == [200]
    assert responses[0].header("connection") == "close"


def test_an_upgrade_answered_later_is_answered_exactly_once_then_closed(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    # Settings on a cache miss wait for the CDN: the answer is not written while reading.
    wire = (
        f"GET /v1/projects/{WRITE_KEY}/settings HTTP/1.1\r\nHost: {proxy.authority}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    ).encode()
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire + b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")
        responses = everything_sent(conn)
    assert [r.status for r in responses] == [200]
    assert responses[0].json()["integrations"]["Segment.io"]["apiKey"] == WRITE_KEY
    assert responses[0].header("connection") == "close"
    assert len(fake.cdn_requests) == 1


def test_an_upgrade_with_a_body_is_refused_once_and_never_forwarded(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    # llhttp hands over such a request without its body (the bytes after the head belong to
    # the other protocol): answering it would act on a request that is not what was sent.
    wire = head(
        proxy,
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        f"Content-Length: {len(EVENT)}",
    )
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire + EVENT + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        responses = everything_sent(conn)
    assert [r.status for r in responses] == [400]
    assert responses[0].json()["code"] == "bad_framing"
    assert fake.api_requests == []


def test_connect_is_answered_exactly_once_then_closed(proxy: RunningProxy) -> None:
    wire = f"CONNECT {proxy.authority} HTTP/1.1\r\nHost: {proxy.authority}\r\n\r\n".encode()
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(wire + b"\x16\x03\x01\x00\x05hello")  # what a tunnel would carry
        responses = everything_sent(conn)
    assert [r.status for r in responses] == [405]
    assert responses[0].json()["success"] is False


def test_requests_pipelined_ahead_of_an_upgrade_are_answered_first(
    proxy: RunningProxy, fake: FakeSegment
) -> None:
    upgrade = (
        f"GET /healthz HTTP/1.1\r\nHost: {proxy.authority}\r\nConnection: upgrade\r\n"
        "Upgrade: websocket\r\n\r\n"
    ).encode()
    ahead = head(proxy, f"Content-Length: {len(EVENT)}") + EVENT
    with Conn(proxy.host, proxy.port) as conn:
        conn.send(ahead + upgrade + request_bytes("GET", "/healthz", proxy.authority))
        responses = everything_sent(conn)
    assert [r.status for r in responses] == [200, 200]
    assert len(fake.api_requests) == 1
