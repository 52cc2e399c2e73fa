"""The live dashboard's page and data endpoints, through the real proxy (docs/dashboard.md).

Where it is served (the operator listener; the public one only when asked, with a token), what
needs the token (every data endpoint, the live stream included; not the page, which holds no
data), what the live stream carries (events as they flow, with their delivery status), and
dead letters replayed from it. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from segproxy.redact import mask
from tests.integration.conftest import WRITE_KEY, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.load import Client as LoadClient
from tests.support.load import track, wait_for
from tests.support.proxy import RunningProxy
from tests.support.rawhttp import RawResponse, exchange

TOKEN = "dashboard-operator-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def admin_port(proxy: RunningProxy) -> int:
    return int(proxy.logged(r"segproxy admin listening on http://127\.0\.0\.1:(\d+)").group(1))


class Admin:
    """Requests to the operator listener."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.host = proxy.host
        self.port = admin_port(proxy)

    def get(self, path: str, headers: dict[str, str] | None = None) -> RawResponse:
        return exchange(self.host, self.port, "GET", path, headers)

    def post(self, path: str, headers: dict[str, str] | None = None) -> RawResponse:
        return exchange(self.host, self.port, "POST", path, headers)


def durable_config(fake: FakeSegment, tmp_path: Path, **admin: Any) -> dict[str, Any]:
    return base_config(
        fake,
        queue={"backend": "sqlite", "path": str(tmp_path / "data" / "queue.db")},
        forward={"max_delay": 0.05, "backoff_base": 0.05, "backoff_cap": 0.3},
        admin={"listen": "127.0.0.1:0", "token": TOKEN, **admin},
    )


class Stream:
    """``GET /dashboard/api/stream`` on a socket of its own: server-sent events, one a second."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        lines = ["GET /dashboard/api/stream HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        self.head = head.decode("latin-1")

    def _until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing ending with {marker!r} in {timeout}s")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the stream ended")
            self.buffer += chunk
        part, _, self.buffer = self.buffer.partition(marker)
        return part

    def next(self) -> dict[str, Any]:
        block = self._until(b"\n\n").decode()
        assert block.startswith("data: "), block
        update: dict[str, Any] = json.loads(block[len("data: ") :])
        return update

    def until(self, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            update = self.next()
            if predicate(update):
                return update
            if time.monotonic() > deadline:
                raise AssertionError(f"no update matching in {timeout}s; last: {update}")

    def close(self) -> None:
        self.sock.close()


def events_of(update: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["messageId"]: e for e in update["events"]}


# -- where it is served -------------------------------------------------------------------------


def test_the_dashboard_page_is_served_on_the_operator_listener_without_the_token_and_holds_no_data(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    proxy = start(durable_config(fake, tmp_path))
    admin = Admin(proxy)
    assert admin.get("/dashboard").status == 308  # to /dashboard/, for the page's relative links
    page = admin.get("/dashboard/")
    assert page.status == 200
    assert page.header("content-type") == "text/html; charset=utf-8"
    assert "default-src 'self'" in (page.header("content-security-policy") or "")
    assert '<script src="app.js"' in page.text()
    assert "<script>" not in page.text()  # nothing inline: the policy forbids it
    script = admin.get("/dashboard/app.js")
    assert script.status == 200
    assert script.header("content-type") == "text/javascript; charset=utf-8"
    assert admin.get("/dashboard/app.css").status == 200
    assert admin.get("/dashboard/nope").status == 404


def test_every_dashboard_data_endpoint_needs_the_operator_token(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    proxy = start(durable_config(fake, tmp_path))
    admin = Admin(proxy)
    for path in ("/dashboard/api/state", "/dashboard/api/stream", "/dashboard/api/dead"):
        refused = admin.get(path)
        assert refused.status == 401, path
        assert refused.json()["code"] == "unauthorized"
        assert admin.get(path, {"Authorization": "Bearer not-the-token-at-all"}).status == 401
    assert admin.post("/dashboard/api/dead/1/replay").status == 401
    state = admin.get("/dashboard/api/state", AUTH)
    assert state.status == 200
    assert state.json()["queue"]["rows"] == 0
    assert state.header("cache-control") == "no-store"


def test_the_dashboard_is_off_on_the_public_listener_unless_asked(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    public_only = start(base_config(fake, admin={"token": TOKEN}))
    assert exchange(public_only.host, public_only.port, "GET", "/dashboard/").status == 404
    assert (
        exchange(public_only.host, public_only.port, "GET", "/dashboard/api/state", AUTH).status
        == 404
    )
    with_admin = start(durable_config(fake, tmp_path))
    assert exchange(with_admin.host, with_admin.port, "GET", "/dashboard/").status == 404
    turned_off = start(durable_config(fake, tmp_path / "off", dashboard="off"))
    assert Admin(turned_off).get("/dashboard/").status == 404


def test_the_dashboard_on_the_public_listener_when_asked_needs_the_token(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, admin={"token": TOKEN, "dashboard": "on"}))
    assert exchange(proxy.host, proxy.port, "GET", "/dashboard/").status == 200
    assert exchange(proxy.host, proxy.port, "GET", "/dashboard/api/state").status == 401
    assert exchange(proxy.host, proxy.port, "GET", "/dashboard/api/state", AUTH).status == 200


# -- what it shows ------------------------------------------------------------------------------


def test_the_live_stream_shows_each_event_with_its_masked_key_and_its_delivery(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    proxy = start(durable_config(fake, tmp_path))
    admin = Admin(proxy)
    stream = Stream(admin.host, admin.port, AUTH)
    try:
        assert stream.head.startswith("HTTP/1.1 200")
        assert "text/event-stream" in stream.head
        first = stream.next()
        assert first["watching"] is True
        client = LoadClient(proxy.host, proxy.port)
        event = track("dash-1", event="Order Completed")
        assert client.post_json("/v1/t", event, WRITE_KEY).status == 200
        client.close()
        update = stream.until(lambda u: events_of(u).get("dash-1", {}).get("status") == "delivered")
        shown = events_of(update)["dash-1"]
        assert shown["type"] == "track"
        assert shown["name"] == "Order Completed"
        assert shown["key"] == mask(WRITE_KEY)
        assert WRITE_KEY not in json.dumps(update)  # never the whole key
        assert update["numbers"]["events"]["forwarded"] >= 1  # the counters /metrics shows
        detail = admin.get(f"/dashboard/api/events/{shown['seq']}", AUTH)
        assert detail.status == 200
        sent = detail.json()["event"]
        assert sent["messageId"] == "dash-1"
        assert sent["event"] == "Order Completed"
        assert "sentAt" in sent  # as it is sent: with its sentAt put back
    finally:
        stream.close()
    # Nobody watches: the recording stops and what it held is forgotten.
    wait_for(
        lambda: admin.get("/dashboard/api/state", AUTH).json()["watching"] is False,
        timeout=10,
        what="the last dashboard gone",
    )
    client = LoadClient(proxy.host, proxy.port)
    assert client.post_json("/v1/t", track("unwatched"), WRITE_KEY).status == 200
    client.close()
    state = admin.get("/dashboard/api/state", AUTH).json()
    assert state["events"] == []


def test_a_dead_letter_is_listed_and_replayed_from_the_dashboard(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    proxy = start(durable_config(fake, tmp_path))
    admin = Admin(proxy)
    fake.api_refuse(lambda e: e.get("messageId") == "doomed")
    client = LoadClient(proxy.host, proxy.port)
    assert client.post_json("/v1/t", track("doomed"), WRITE_KEY).status == 200
    client.close()

    def dead() -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = admin.get("/dashboard/api/dead", AUTH).json()["dead"]
        return listed

    wait_for(lambda: len(dead()) == 1, timeout=10, what="the dead letter")
    letter = dead()[0]
    assert letter["status"] == 400
    assert letter["key"] == mask(WRITE_KEY)
    assert letter["event"]["messageId"] == "doomed"
    assert admin.get(f"/dashboard/api/dead/{letter['id']}/replay", AUTH).status == 405
    refusals = len(fake.api_requests)

    fake.api_refuse(None)  # Segment accepts it now
    replayed = admin.post(f"/dashboard/api/dead/{letter['id']}/replay", AUTH)
    assert replayed.status == 200, replayed.body
    assert replayed.json() == {"success": True, "replayed": 1}
    wait_for(
        lambda: any(e.message_id == "doomed" for e in fake.api_events()),
        timeout=15,
        what="the replayed event upstream",
    )
    assert len(fake.api_requests) > refusals
    assert dead() == []
    again = admin.post(f"/dashboard/api/dead/{letter['id']}/replay", AUTH)
    assert again.status == 404
    assert again.json()["code"] == "no_such_dead_letter"


def test_an_open_dashboard_does_not_hold_up_the_proxys_shutdown(
    fake: FakeSegment, start: StartProxy
) -> None:
    # On the public listener, whose grace for answers in progress is long: a live stream has
    # no end of its own, so waiting for it would use all of it.
    proxy = start(
        base_config(fake, admin={"token": TOKEN, "dashboard": "on"}, limits={"shutdown_grace": 60})
    )
    stream = Stream(proxy.host, proxy.port, AUTH)
    try:
        stream.next()
        assert proxy.stop(timeout=20) == 0  # well within the grace: the stream ended at once
        with pytest.raises(AssertionError, match="the stream ended"):
            while True:  # what was sent before the end, then the end
                stream.next()
    finally:
        stream.close()


def test_in_passthrough_the_dashboard_says_there_is_no_queue_and_no_dead_letters(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, admin={"listen": "127.0.0.1:0", "token": TOKEN}))
    admin = Admin(proxy)
    client = LoadClient(proxy.host, proxy.port)
    assert client.post_json("/v1/t", track("relayed-1"), WRITE_KEY).status == 200
    client.close()
    state = admin.get("/dashboard/api/state", AUTH).json()
    assert state["queue"] is None
    assert state["numbers"]["queue"] is None
    assert state["numbers"]["events"]["accepted"] == 1  # relayed and accepted by Segment
    assert admin.get("/dashboard/api/dead", AUTH).json() == {"available": False, "dead": []}
    refused = admin.post("/dashboard/api/dead/1/replay", AUTH)
    assert refused.status == 409
    assert refused.json()["code"] == "no_dead_letters"


def test_on_the_memory_queue_the_dashboard_shows_its_depth_without_a_queue_file(
    fake: FakeSegment, start: StartProxy
) -> None:
    fake.api_down()  # nothing leaves: the events wait in the queue
    proxy = start(
        base_config(
            fake,
            queue={"backend": "memory"},
            admin={"listen": "127.0.0.1:0", "token": TOKEN},
        )
    )
    admin = Admin(proxy)
    client = LoadClient(proxy.host, proxy.port)
    assert client.post_json("/v1/t", track("waiting-1"), WRITE_KEY).status == 200
    client.close()
    state = admin.get("/dashboard/api/state", AUTH).json()
    assert state["numbers"]["queue"]["events"] == 1
    assert state["queue"]["rows"] == 1
    assert mask(WRITE_KEY) in state["queue"]["per_key"]
    assert admin.get("/dashboard/api/dead", AUTH).json()["available"] is False
