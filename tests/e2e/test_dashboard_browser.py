"""The live dashboard in a real headless Chromium, as an operator uses it.

The proxy runs with a durable queue and its operator listener behind a token; events flow
through it the whole time (tracks and pages, from a thread), and the fake API refuses one
event, which becomes a dead letter. In the browser (``js/dashboard.mjs``): the page loads with
the token in its URL fragment, the numbers move, the filters narrow the list, an event opens
as its JSON, and the replay button sends the dead letter again, which the fake API, told to
accept it now, receives. The screenshot is kept under ``$SEGPROXY_ARTIFACTS`` (default
``tests/artifacts/``, gitignored), and its path printed.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from segproxy.redact import mask
from tests.e2e.conftest import CHROMIUM, NodeScript, proxy_config
from tests.support.fakes import REPO_ROOT, FakeSegment
from tests.support.load import Client, iso_now, wait_for
from tests.support.proxy import RunningProxy, running_proxy

pytestmark = pytest.mark.e2e

WRITE_KEY = "wk_dash_e2e_7c1f3b9a2d4e"
OTHER_KEY = "wk_dash_e2e_nobody_0000"
TOKEN = "dashboard-browser-token-7f3a"
DOOMED = "doomed-dead-letter-1"


def artifacts_dir() -> Path:
    where = Path(os.environ.get("SEGPROXY_ARTIFACTS") or REPO_ROOT / "tests" / "artifacts")
    where.mkdir(parents=True, exist_ok=True)
    return where


def event(kind: str, message_id: str, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": kind,
        "messageId": message_id,
        "anonymousId": "anon-dashboard",
        "timestamp": iso_now(),
        "sentAt": iso_now(),
        "context": {"library": {"name": "analytics.js", "version": "next-1.84.3"}},
    }
    if kind == "track":
        doc["event"] = name
        doc["properties"] = {"plan": "pro"}
    else:
        doc["name"] = name
    return doc


class Traffic:
    """Events through the proxy every 50 ms until stopped: a track and a page in turn."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.proxy = proxy
        self.sent = 0
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client = Client(self.proxy.host, self.proxy.port)
        try:
            while not self.stopping.is_set():
                n = self.sent
                doc = (
                    event("track", f"flow-{n}", "Checkout Started")
                    if n % 2 == 0
                    else event("page", f"flow-{n}", "Pricing")
                )
                resp = client.post_json("/v1/t" if n % 2 == 0 else "/v1/p", doc, WRITE_KEY)
                if resp.status != 200:
                    self.errors.append(f"{resp.status} {resp.body!r}")
                self.sent += 1
                self.stopping.wait(0.05)  # a steady trickle, not a synchronisation
        finally:
            client.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


class DashboardRun(NodeScript):
    """``js/dashboard.mjs``: tagged steps; ``go_on()`` lets it press Replay."""

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__("dashboard.mjs", options)

    def go_on(self) -> None:
        self.send("go")


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment([WRITE_KEY]) as f:
        yield f


@pytest.fixture
def proxy(fake: FakeSegment, tmp_path: Path) -> Iterator[RunningProxy]:
    config = proxy_config(
        fake,
        "sqlite",
        forward={"max_delay": 0.05, "backoff_base": 0.05, "backoff_cap": 0.3},
        admin={"listen": "127.0.0.1:0", "token": TOKEN},
    )
    with running_proxy(config, tmp_path / "proxy") as p:
        try:
            yield p
        finally:
            print(f"--- segproxy log (pid {p.pid}) ---\n{p.logs()}")


def delivered(fake: FakeSegment) -> set[str]:
    return {e.message_id for e in fake.api_events() if e.message_id is not None}


def test_the_dashboard_shows_live_traffic_filters_events_and_replays_a_dead_letter(
    fake: FakeSegment, proxy: RunningProxy
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh")
    port = int(proxy.logged(r"segproxy admin listening on http://127\.0\.0\.1:(\d+)").group(1))
    fake.api_refuse(lambda e: e.get("messageId") == DOOMED)
    screenshot = artifacts_dir() / "dashboard.png"
    screenshot.unlink(missing_ok=True)
    run = DashboardRun(
        {
            "url": f"http://127.0.0.1:{port}/dashboard/#token={TOKEN}",
            "screenshot": str(screenshot),
            "executablePath": CHROMIUM,
            "writeKey": WRITE_KEY,
            "otherKey": OTHER_KEY,
            "filterName": "Checkout",
            "timeoutMs": 45000,
        }
    )
    traffic = Traffic(proxy)
    try:
        live = run.expect("LIVE")
        assert live["conn"] == "live"
        assert float(live["accepted"]) > 0  # events per second, from the counters
        assert float(live["delivered"]) > 0
        p50, p99 = (float(v) for v in live["latency"].split(" / "))  # ms, of the last second
        assert 0 < p50 <= p99
        assert TOKEN not in live["address"]  # the fragment is dropped from the address bar
        # A dead letter appears while the dashboard watches.
        client = Client(proxy.host, proxy.port)
        assert client.post_json("/v1/t", event("track", DOOMED, "Doomed"), WRITE_KEY).status == 200
        client.close()

        moved = run.expect("MOVED")
        assert moved["later"]["updated"] != moved["first"]["updated"]
        assert moved["later"]["count"] != moved["first"]["count"]

        filters = run.expect("FILTER")
        by_name = filters["name"]["rows"]
        assert by_name and all("Checkout" in r["name"] for r in by_name)
        by_type = filters["type"]["rows"]
        assert by_type and all(r["type"] == "page" for r in by_type)
        by_key = filters["key"]["rows"]
        assert by_key and all(r["key"] == mask(WRITE_KEY) for r in by_key)
        assert filters["otherKey"]["rows"] == []
        shown = json.dumps(filters)
        assert WRITE_KEY not in shown  # the list shows keys masked only

        opened = json.loads(run.expect("EVENT")["json"])
        assert opened["messageId"].startswith(("flow-", DOOMED))
        assert opened["type"] in ("track", "page")
        assert "sentAt" in opened

        dead = run.expect("DEAD")
        assert "Doomed" in dead["text"]
        assert mask(WRITE_KEY) in dead["text"]
        assert DOOMED not in delivered(fake)
        fake.api_refuse(None)  # Segment accepts it now
        run.go_on()
        run.expect("REPLAYED")
        wait_for(lambda: DOOMED in delivered(fake), timeout=15, what="the replayed dead letter")

        result = run.expect("RESULT")
        assert "fatal" not in result, result
        assert result["pageErrors"] == []
        assert result["consoleErrors"] == []
        assert result["failed"] == []
        assert screenshot.stat().st_size > 10_000
        print(f"dashboard screenshot: {screenshot}")
    finally:
        traffic.stop()
        run.close()
    assert traffic.errors == []
    assert traffic.sent > 0
