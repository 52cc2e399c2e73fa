"""The edge's framing core (``edge/framing.py``), fed bytes: no sockets, no event loop.

Each test feeds reads to one :class:`Framing` and looks at what it delivered, what it answered
and what it holds (the memory budget, the phase and its deadline).
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import orjson

from segproxy.config import LimitsConfig
from segproxy.edge.framing import SERVER_BUSY, Budget, Framing
from segproxy.edge.http import Request, Response


class Conn:
    """One connection's framing core and everything it told the connection."""

    def __init__(self, budget: int = 1_000_000, close_at: str = "", **limits: Any) -> None:
        self.close_at = close_at  # the target of a request whose answer closes the connection
        self.requests: list[Request] = []
        self.events: list[str] = []
        self.budget = Budget(budget)
        self.f = Framing(
            LimitsConfig(**limits),
            self.budget,
            self.deliver,
            lambda: self.events.append("continue"),
            lambda: self.events.append("stop reading"),
        )

    def deliver(self, req: Request) -> None:
        # As the connection does when an answer closes it (a server shutting down, say).
        self.requests.append(req)
        if req.target == self.close_at:
            self.f.stop()

    def feed(self, *reads: bytes) -> Response | None:
        """Feed each read; the error (if any) that ended the connection."""
        error = None
        for data in reads:
            got = self.f.feed(data)
            if got is not None:
                assert error is None, "one error per connection"
                error = got
        return error

    @property
    def only(self) -> Request:
        assert len(self.requests) == 1
        return self.requests[0]


def code(response: Response | None) -> tuple[int, str]:
    assert response is not None
    return response.status, orjson.loads(response.body)["code"]


def message(response: Response | None) -> str:
    assert response is not None
    text: str = orjson.loads(response.body)["message"]
    return text


def post(body: bytes, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"POST /v1/t HTTP/{version}", "Host: x", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(*headers: str, target: str = "/healthz", version: str = "1.1") -> bytes:
    return (
        "\r\n".join([f"GET {target} HTTP/{version}", "Host: x", *headers]) + "\r\n\r\n"
    ).encode()


def chunked_head(*headers: str, version: str = "1.1") -> bytes:
    lines = [f"POST /v1/t HTTP/{version}", "Host: x", "Transfer-Encoding: chunked", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), ext, data)


# -- complete requests -------------------------------------------------------------------------


def test_a_request_is_delivered_with_its_parts_and_the_connections_peer_and_scheme() -> None:
    c = Conn()
    c.f.peer, c.f.scheme = "192.0.2.7", "https"
    assert c.feed(post(b'{"a":1}', "X-Thing: Yes")) is None
    req = c.only
    assert (req.method, req.target, req.body) == ("POST", "/v1/t", b'{"a":1}')
    assert req.headers == {b"host": b"x", b"content-length": b"7", b"x-thing": b"Yes"}
    assert (req.peer, req.scheme, req.keep_alive) == ("192.0.2.7", "https", True)
    assert c.events == []
    assert not c.f.closing


def test_pipelined_requests_in_one_read_are_delivered_in_order() -> None:
    c = Conn()
    assert c.feed(post(b"one") + get(target="/two") + post(b"three")) is None
    assert [(r.target, r.body) for r in c.requests] == [
        ("/v1/t", b"one"),
        ("/two", b""),
        ("/v1/t", b"three"),
    ]


def test_a_request_split_over_many_reads_is_delivered_once_whole() -> None:
    c = Conn()
    wire = post(b"0123456789")
    assert c.feed(*(wire[i : i + 3] for i in range(0, len(wire), 3))) is None
    assert c.only.body == b"0123456789"
    assert c.only.headers[b"host"] == b"x"


def test_an_idle_connection_keeps_no_body() -> None:
    c = Conn()
    c.feed(post(b"abc"))
    assert c.f.body == []


def test_repeated_header_fields_are_joined_and_a_second_host_is_refused() -> None:
    c = Conn()
    c.feed(get("Accept: a", "accept: b", "X-One: 1"))
    assert c.only.headers[b"accept"] == b"a, b"
    assert c.only.headers[b"x-one"] == b"1"
    c = Conn()
    error = c.feed(get("Host: y") + get())
    assert code(error) == (400, "bad_host")
    assert c.requests == []


def test_a_method_outside_the_usual_ones_is_delivered_by_name() -> None:
    c = Conn()
    c.feed(b"PROPFIND /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.only.method == "PROPFIND"


def test_usual_methods_keep_their_names() -> None:
    for method in ("GET", "POST", "OPTIONS", "HEAD", "PUT", "DELETE", "PATCH"):
        c = Conn()
        c.feed(f"{method} /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        assert c.only.method == method


# -- keep-alive ----------------------------------------------------------------------------------


def test_keep_alive_follows_the_version_and_the_connection_header() -> None:
    cases = [
        (get(), True),
        (get("Connection: close"), False),
        (get(version="1.0"), False),
        (get("Connection: keep-alive", version="1.0"), True),
        (get("Connection: keep-alive"), True),
    ]
    for wire, keep in cases:
        c = Conn()
        assert c.feed(wire) is None
        assert c.only.keep_alive is keep, wire


# -- errors end the connection ---------------------------------------------------------------


def test_a_malformed_request_is_a_400_and_nothing_more_is_read() -> None:
    c = Conn()
    error = c.feed(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n")
    assert code(error) == (400, "bad_request")
    assert message(error).startswith("malformed HTTP request")
    assert c.f.closing
    assert c.feed(get()) is None
    assert c.requests == []


def test_requests_before_an_error_in_the_same_read_are_delivered() -> None:
    c = Conn()
    error = c.feed(get() + b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    assert code(error) == (400, "bad_framing")
    assert len(c.requests) == 1


def test_a_stopped_connection_reads_nothing() -> None:
    c = Conn()
    c.f.stop()
    assert c.f.closing
    assert c.feed(get()) is None
    assert c.requests == []


def test_http_versions_other_than_1_0_and_1_1_are_refused() -> None:
    for version in ("2.0", "0.9"):
        c = Conn()
        error = c.feed(get(version=version))
        assert code(error) == (400, "bad_framing")
        assert "unsupported HTTP version" in message(error)
        assert c.requests == []


def test_a_request_target_over_8_kb_is_a_414_and_8_kb_is_served() -> None:
    c = Conn()
    assert c.feed(get("X: y", target="/" + "a" * 8191)) is None
    assert len(c.only.target) == 8192
    c = Conn()
    assert code(c.feed(get(target="/" + "a" * 8192))) == (414, "uri_too_long")
    c = Conn()
    target = ("/" + "a" * 8192).encode()
    assert code(c.feed(b"GET " + target[:5000], target[5000:])) == (414, "uri_too_long")


# -- header limits -----------------------------------------------------------------------------


def fields_of_size(n: int, size: int) -> list[str]:
    """``n`` header fields of ``size`` counted bytes each (name + value + 4)."""
    return [f"X-{i:03d}: " + "v" * (size - 9) for i in range(n)]


def test_header_bytes_are_counted_exactly_at_the_limit() -> None:
    # Host (1 + 4 + 4 = 9) and the fields: exactly the limit is served, one byte more is not.
    limit = 9 + 4 * 100
    c = Conn(max_header_bytes=limit)
    wire = get(*fields_of_size(4, 100))
    assert len(wire) > limit  # so the read itself is over the limit and the fields are counted
    assert c.feed(wire) is None
    assert len(c.only.headers) == 5
    c = Conn(max_header_bytes=limit - 1)
    error = c.feed(wire)
    assert code(error) == (431, "headers_too_large")
    assert str(limit - 1) in message(error)


def test_the_header_count_is_held_exactly() -> None:
    c = Conn(max_header_count=5)
    assert c.feed(get(*fields_of_size(4, 10))) is None  # Host and 4: five
    c = Conn(max_header_count=5)
    error = c.feed(get(*fields_of_size(5, 10)))
    assert code(error) == (431, "too_many_headers")
    assert "5" in message(error)


def test_headers_that_end_in_a_later_read_are_counted_whole() -> None:
    # Each read is under the byte limit, their fields together are over it.
    c = Conn(max_header_bytes=300)
    first = get(*fields_of_size(3, 50))[:-2]  # the blank line comes later
    second = ("\r\n".join(fields_of_size(3, 50)).replace("X-0", "Y-0") + "\r\n\r\n").encode()
    assert len(first) < 300 and len(second) < 300
    assert code(c.feed(first, second)) == (431, "headers_too_large")
    c = Conn(max_header_bytes=400)
    assert c.feed(first, second) is None
    assert len(c.only.headers) == 7


def test_headers_streamed_past_the_byte_limit_are_refused_before_they_end() -> None:
    c = Conn(max_header_bytes=1000)
    assert c.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ") is None
    assert c.f.timer_phase == "header"
    assert c.feed(b"a" * 600) is None
    assert c.f.head_fed == 600
    assert code(c.feed(b"a" * 600)) == (431, "headers_too_large")
    assert c.requests == []


def test_header_fields_complete_so_far_are_counted_after_each_read() -> None:
    c = Conn(max_header_count=3)
    # (a field is reported once the next one begins: D is, E is not yet)
    assert code(c.feed(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE")) == (
        431,
        "too_many_headers",
    )


def test_a_pipelined_request_counts_its_own_headers_in_a_later_read() -> None:
    c = Conn(max_header_bytes=200)
    head = get(*fields_of_size(1, 100))
    # The second request begins in the first read: the later read is all its head.
    assert c.feed(head + head[:30]) is None
    assert c.feed(head[30:]) is None
    assert len(c.requests) == 2
    c = Conn(max_header_bytes=200)
    assert c.feed(head + head[:30]) is None
    assert code(c.feed(b"X-More: " + b"m" * 250)) == (431, "headers_too_large")


# -- bodies and the memory budget ------------------------------------------------------------


def test_a_declared_length_is_reserved_at_the_end_of_the_headers_and_released_on_hand_over() -> (
    None
):
    c = Conn(budget=100)
    wire = post(b"x" * 40)
    assert c.feed(wire[:-40]) is None
    assert (c.budget.held, c.f.reserved) == (40, 40)
    assert c.feed(wire[-40:]) is None
    assert (c.budget.held, c.f.reserved) == (40, 40)  # still held until handed over
    c.f.release(40)
    assert (c.budget.held, c.f.reserved) == (0, 0)


def test_the_budget_is_shared_and_held_exactly_at_its_limit() -> None:
    budget = Budget(100)
    a, b = Conn(), Conn()
    for conn in (a, b):
        conn.budget = conn.f.budget = budget
    assert a.feed(post(b"x" * 60)[:-60]) is None
    assert b.feed(post(b"y" * 40)) is None  # 60 + 40: exactly the budget
    assert budget.held == 100
    b.f.release(40)
    c = Conn()
    c.budget = c.f.budget = budget
    error = c.feed(post(b"z" * 41))
    assert error is SERVER_BUSY
    assert code(error) == (503, "server_busy")
    assert budget.held == 60  # the refused body took nothing
    assert c.f.reserved == 0


def test_an_empty_body_reserves_nothing_and_waits_for_no_body() -> None:
    c = Conn(budget=0)
    assert c.feed(post(b"")) is None
    assert c.only.body == b""
    assert c.budget.held == 0


def test_a_declared_length_over_the_limit_is_a_413_before_the_body() -> None:
    c = Conn(max_body_bytes=10)
    assert c.feed(post(b"x" * 10)) is None
    c = Conn(max_body_bytes=10)
    error = c.feed(post(b"x" * 11)[:-11])
    assert code(error) == (413, "body_too_large")
    assert message(error) == "request body is over 10 bytes"
    assert c.budget.held == 0


def test_a_chunked_body_is_reassembled_and_counted_as_it_grows() -> None:
    c = Conn(budget=100)
    assert c.feed(chunked_head() + chunk(b"abc")) is None
    assert c.budget.held == 3
    assert c.feed(chunk(b"defgh")) is None
    assert (c.budget.held, c.f.reserved) == (8, 8)
    assert c.feed(b"0\r\n\r\n") is None
    assert c.only.body == b"abcdefgh"
    assert c.only.headers[b"transfer-encoding"] == b"chunked"
    assert not c.f.rare_path
    assert not c.f.in_chunked_body


def test_a_chunked_body_that_would_go_over_the_budget_is_a_503() -> None:
    c = Conn(budget=10)
    assert c.feed(chunked_head() + chunk(b"x" * 6)) is None
    assert c.feed(chunk(b"y" * 4)) is None
    assert c.f.feed(chunk(b"z")) is SERVER_BUSY
    assert c.budget.held == 10


def test_a_chunked_body_over_the_limit_is_a_413_as_it_arrives() -> None:
    c = Conn(max_body_bytes=10)
    assert c.feed(chunked_head() + chunk(b"x" * 10)) is None
    assert code(c.feed(chunk(b"y"))) == (413, "body_too_large")
    assert c.requests == []


def test_only_exactly_chunked_transfer_encoding_on_http_1_1_is_read() -> None:
    for te, ok in [
        ("chunked", True),
        ("Chunked", True),
        ("CHUNKED ", True),
        ("gzip, chunked", False),
    ]:
        c = Conn()
        wire = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: %s\r\n\r\n" % te.encode()
        error = c.feed(wire + chunk(b"ab") + b"0\r\n\r\n")
        if ok:
            assert error is None and c.only.body == b"ab", te
        else:
            assert code(error) == (400, "bad_framing"), te
            assert "unsupported Transfer-Encoding" in message(error)
    c = Conn()
    error = c.feed(chunked_head(version="1.0") + chunk(b"ab") + b"0\r\n\r\n")
    assert code(error) == (400, "bad_framing")
    assert "HTTP/1.0" in message(error)


def test_trailers_are_dropped_and_count_against_the_header_limits() -> None:
    c = Conn()
    assert c.feed(chunked_head() + chunk(b"ab") + b"0\r\nX-Trailer: t\r\n\r\n") is None
    assert b"x-trailer" not in c.only.headers
    c = Conn(max_header_count=4)  # Host, Transfer-Encoding and two trailers: four
    assert c.feed(chunked_head() + chunk(b"ab") + b"0\r\nA: 1\r\nB: 2\r\n\r\n") is None
    c = Conn(max_header_count=4)
    error = c.feed(chunked_head() + chunk(b"ab") + b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    assert code(error) == (431, "too_many_headers")
    c = Conn(max_header_count=4)
    assert c.feed(chunked_head() + chunk(b"ab")) is None
    error = c.feed(b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\nD")  # counted before the trailers end
    assert code(error) == (431, "too_many_headers")


def test_trailers_in_a_later_read_are_not_taken_for_chunk_padding() -> None:
    # Each under 1 KB (a field counts once reported, when the next one begins), together over.
    c = Conn()
    assert c.feed(chunked_head() + chunk(b"ab")) is None
    trailers = b"".join(b"X-%d: " % i + b"t" * 1000 + b"\r\n" for i in range(3))
    assert c.feed(b"0\r\n" + trailers + b"\r\n") is None
    assert c.only.body == b"ab"


def test_a_chunk_extension_over_1_kb_in_the_headers_read_is_refused() -> None:
    c = Conn()
    error = c.feed(chunked_head() + chunk(b"ab", b";e=" + b"x" * 1100) + b"0\r\n\r\n")
    assert code(error) == (400, "bad_framing")
    assert message(error) == "chunk extensions are over 1 KB"
    assert c.requests == []
    c = Conn()
    assert c.feed(chunked_head() + chunk(b"ab", b";e=" + b"x" * 900) + b"0\r\n\r\n") is None


def test_a_chunk_extension_over_1_kb_in_a_later_read_is_refused() -> None:
    c = Conn()
    assert c.feed(chunked_head()) is None
    error = c.feed(chunk(b"ab", b";e=" + b"x" * 1600) + b"0\r\n\r\n")
    assert code(error) == (400, "bad_framing")
    assert c.requests == []


def test_endless_chunk_extensions_are_cut_off_before_the_chunk_line_ends() -> None:
    c = Conn()
    assert c.feed(chunked_head()) is None
    assert c.feed(b"2;e=" + b"x" * 1000) is None
    assert code(c.feed(b"x" * 1600)) == (400, "bad_framing")


def test_chunk_extensions_that_end_a_message_are_held_too() -> None:
    c = Conn()
    assert c.feed(chunked_head() + chunk(b"ab")) is None
    # The last chunk line's extension, over the budget, within the last slice of the read
    error = c.feed(b"0;e=" + b"x" * 1400 + b"\r\n\r\n")
    assert code(error) == (400, "bad_framing")


def test_small_extensions_and_many_small_chunks_are_read() -> None:
    c = Conn()
    body = b"".join(chunk(b"a", b";k=v") for _ in range(400))  # 9 framing bytes each
    assert c.feed(chunked_head(), body, b"0\r\n\r\n") is None
    assert c.only.body == b"a" * 400


def test_large_chunks_in_later_reads_are_not_counted_as_extensions() -> None:
    c = Conn()
    assert c.feed(chunked_head(), chunk(b"d" * 5000), chunk(b"e" * 3000), b"0\r\n\r\n") is None
    assert c.only.body == b"d" * 5000 + b"e" * 3000


def test_a_request_after_a_chunked_one_is_read_on_the_fast_path_again() -> None:
    # The chunked message ends in the first slice of this read and the next request begins
    # in it: the rest of the read (181 bytes) is all head and counts whole, then the next.
    c = Conn(max_header_bytes=300)
    assert c.feed(chunked_head()) is None
    rest = b"GET /n HTTP/1.1\r\nX-Long: " + b"z" * 400
    assert c.feed(chunk(b"ab") + b"0\r\n\r\n" + rest) is None
    assert c.f.timer_phase == "header"
    assert c.f.head_fed == 181
    assert code(c.feed(b"z" * 150)) == (431, "headers_too_large")
    c = Conn()
    assert c.feed(chunked_head(), chunk(b"ab") + b"0\r\n\r\n" + get(target="/n")) is None
    assert [r.target for r in c.requests] == ["/v1/t", "/n"]
    assert not c.f.rare_path


# -- Expect: 100-continue, upgrades ------------------------------------------------------------


def test_expect_100_continue_is_told_only_for_a_request_with_a_body() -> None:
    cases = [
        (post(b"ab", "Expect: 100-continue")[:-2], ["continue"]),
        (post(b"ab", "Expect: 100-Continue")[:-2], ["continue"]),
        (post(b"", "Expect: 100-continue"), []),
        (post(b"ab", "Expect: something")[:-2], []),
        (chunked_head("Expect: 100-continue"), ["continue"]),
    ]
    for wire, events in cases:
        c = Conn()
        assert c.feed(wire) is None
        assert c.events == events, wire


def test_a_too_large_body_is_refused_before_100_continue() -> None:
    c = Conn(max_body_bytes=10)
    assert code(c.feed(post(b"x" * 11, "Expect: 100-continue")[:-11])) == (413, "body_too_large")
    assert c.events == []


def test_an_upgrade_is_delivered_once_without_keep_alive_and_nothing_after_it_is_read() -> None:
    c = Conn()
    wire = get("Upgrade: websocket", "Connection: upgrade", target="/chat")
    assert c.feed(wire + get(target="/after")) is None
    assert [(r.target, r.keep_alive) for r in c.requests] == [("/chat", False)]
    assert c.events == ["stop reading"]
    assert c.f.closing
    assert c.feed(get()) is None
    assert len(c.requests) == 1


def test_connect_is_delivered_once_without_keep_alive() -> None:
    c = Conn()
    assert c.feed(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n") is None
    assert [(r.method, r.keep_alive) for r in c.requests] == [("CONNECT", False)]
    assert c.events == ["stop reading"]


def test_an_upgrade_that_declares_a_body_is_refused() -> None:
    c = Conn()
    error = c.feed(post(b"hello", "Upgrade: websocket", "Connection: upgrade"))
    assert code(error) == (400, "bad_framing")
    assert "switch protocols" in message(error)
    assert c.requests == []


# -- phases and deadlines ----------------------------------------------------------------------


def test_each_phase_has_its_own_deadline_and_a_complete_request_has_none() -> None:
    c = Conn(header_timeout=100.0, body_timeout=1000.0)
    wire = post(b"abcd")
    c.feed(wire[:5])
    assert c.f.timer_phase == "header"
    assert 99 < c.f.deadline - monotonic() <= 100
    assert c.f.in_message
    c.feed(wire[5:-4])
    assert c.f.timer_phase == "body"
    assert 999 < c.f.deadline - monotonic() <= 1000
    c.feed(wire[-4:])
    assert (c.f.timer_phase, c.f.deadline) == ("", 0.0)
    assert not c.f.in_message


def test_a_request_without_a_body_has_no_deadline_once_its_headers_end() -> None:
    c = Conn()
    c.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (c.f.timer_phase, c.f.deadline) == ("", 0.0)


def test_arm_and_disarm() -> None:
    c = Conn()
    c.f.arm("idle", 50.0)
    assert c.f.timer_phase == "idle"
    assert 49 < c.f.deadline - monotonic() <= 50
    c.f.disarm()
    assert (c.f.timer_phase, c.f.deadline) == ("", 0.0)


# -- the chunk-extension budget counts from the first read after the headers' -----------------

LONG_EXTENSION = chunk(b"ab", b";e=" + b"x" * 1600)  # over 1 KB, by less than 1 KB


def test_the_extension_budget_does_not_grow_with_the_header_fields() -> None:
    c = Conn()
    assert c.feed(chunked_head("X-Pad: " + "p" * 3000)) is None
    assert code(c.feed(LONG_EXTENSION + b"0\r\n\r\n")) == (400, "bad_framing")


def test_the_extension_budget_does_not_grow_with_the_body_in_the_headers_read() -> None:
    c = Conn()
    assert c.feed(chunked_head() + chunk(b"d" * 3000)) is None
    assert code(c.feed(LONG_EXTENSION + b"0\r\n\r\n")) == (400, "bad_framing")


def test_the_extension_budget_does_not_grow_with_chunks_in_the_headers_read() -> None:
    c = Conn()
    assert c.feed(chunked_head() + chunk(b"a") * 200) is None
    assert code(c.feed(LONG_EXTENSION + b"0\r\n\r\n")) == (400, "bad_framing")


def test_each_chunked_request_counts_its_own_body() -> None:
    c = Conn()
    assert c.feed(chunked_head() + chunk(b"d" * 5000), b"0\r\n\r\n") is None
    assert c.feed(chunked_head(), chunk(b"e" * 5000), b"0\r\n\r\n") is None
    assert c.feed(chunked_head() + chunk(b"ab"), chunk(b"cd"), b"0\r\n\r\n") is None
    assert [r.body for r in c.requests] == [b"d" * 5000, b"e" * 5000, b"abcd"]


def test_each_request_counts_its_own_head_bytes() -> None:
    c = Conn(max_header_bytes=200)
    for target in ("/one", "/two"):
        assert c.feed(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-A: ".encode()) is None
        assert c.feed(b"a" * 150) is None
        assert c.feed(b"\r\n\r\n") is None
    assert [r.target for r in c.requests] == ["/one", "/two"]


# -- a connection that closes reads nothing more, wherever it was ------------------------------


def test_a_connection_closed_inside_a_chunked_body_reads_no_more_of_it() -> None:
    c = Conn()
    assert c.feed(chunked_head() + chunk(b"ab")) is None
    c.f.stop()  # a body timeout, say
    assert c.feed(chunk(b"cd") + b"0\r\n\r\n" + get()) is None
    assert c.requests == []


def test_a_chunked_request_closing_the_connection_ends_reading_within_its_read() -> None:
    c = Conn(close_at="/v1/t")
    assert c.feed(chunked_head()) is None
    # The message ends in the first slice; the request after it is in the rest of the read.
    assert c.feed(chunk(b"ab") + b"0\r\n\r\n" + get("X-Pad: " + "p" * 400)) is None
    assert [r.target for r in c.requests] == ["/v1/t"]


def test_a_chunked_request_after_one_that_closed_leaves_the_connection_closed() -> None:
    c = Conn(close_at="/healthz")
    wire = get() + chunked_head() + chunk(b"ab") + b"0\r\n\r\n"
    assert c.feed(wire) is None  # (both parsed in this read: the connection ignores the rest)
    assert c.f.closing and c.f.rare_path
    assert c.feed(get()) is None
    assert len(c.requests) == 2
