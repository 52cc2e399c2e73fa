"""What the operator reads in the proxy's log while Segment fails: every failed delivery is a
WARNING (events are late), one line per write key and fault every 10 s, the next line saying
how many were held back; never one line per retried batch, never a whole write key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from segproxy.delivery import REPORT_EVERY
from segproxy.redact import mask
from tests.integration.conftest import WRITE_KEY, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.load import Client, track, wait_for
from tests.support.proxy import RunningProxy

OTHER_KEY = "wk_other_2"


@pytest.fixture
def failing(fake: FakeSegment, start: StartProxy, tmp_path: Path) -> RunningProxy:
    """A proxy on a durable queue that retries fast, and an API that answers 503 to all."""
    fake.api_status(503)
    return start(
        base_config(
            fake,
            queue={"backend": "sqlite", "path": str(tmp_path / "data" / "queue.db")},
            forward={"max_delay": 0.05, "backoff_base": 0.05, "backoff_cap": 0.2},
        )
    )


def failed_sends(fake: FakeSegment) -> int:
    return sum(1 for r in fake.api_requests if r.status == 503)


def warnings_for(proxy: RunningProxy, key: str) -> list[str]:
    pattern = rf"WARNING segproxy\.forward: delivery of \d+ events of key {re.escape(mask(key))} "
    return [line for line in proxy.logs().splitlines() if re.search(pattern, line)]


def test_failed_deliveries_are_warnings_one_line_per_key_and_fault_not_per_retry(
    fake: FakeSegment, failing: RunningProxy
) -> None:
    client = Client(failing.host, failing.port)
    for key in (WRITE_KEY, OTHER_KEY):
        assert client.post_json("/v1/t", track(f"late-{key}"), key).status == 200
    client.close()
    wait_for(lambda: failed_sends(fake) >= 12, timeout=30, what="a dozen failed sends")
    failing.logged(rf"delivery of 1 events of key {re.escape(mask(OTHER_KEY))} failed \(HTTP 503\)")
    for key in (WRITE_KEY, OTHER_KEY):
        lines = warnings_for(failing, key)
        assert lines, f"no WARNING for {mask(key)}"
        assert "failed (HTTP 503); retry" in lines[0]
        # Each key retried about half of the failed sends; a line per window, not per retry.
        assert len(lines) < failed_sends(fake) / 2
    logs = failing.logs()
    assert "INFO segproxy.forward: delivery of" not in logs
    assert WRITE_KEY not in logs and OTHER_KEY not in logs


def test_the_next_warning_about_the_same_fault_counts_the_lines_held_back(
    fake: FakeSegment, failing: RunningProxy
) -> None:
    client = Client(failing.host, failing.port)
    assert client.post_json("/v1/t", track("held-back"), WRITE_KEY).status == 200
    client.close()
    # The second window's line (REPORT_EVERY s after the first) says how many it stands for.
    line = failing.logged(
        rf"delivery of 1 events of key {re.escape(mask(WRITE_KEY))} failed \(HTTP 503\); "
        rf"retry \d+ in [0-9.]+ s \((\d+) more like it in the last {REPORT_EVERY:.0f} s\)",
        timeout=REPORT_EVERY * 4,
    )
    assert int(line.group(1)) >= 1
    assert len(warnings_for(failing, WRITE_KEY)) >= 2
