"""Logs for pipelines, from the real proxy: JSON lines on stderr and the optional access log."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path
from typing import Any

from tests.integration.conftest import StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.load import parse_iso, track, wait_for
from tests.support.proxy import RunningProxy, run_cli, to_toml
from tests.support.rawhttp import RawResponse, exchange

# A key the fake accepts, long enough that its mask can never hold it whole.
SECRET_KEY = "wk_secret_0123456789abcdef"
BODY_MARKER = "body-marker-7f3a9c"  # in an event's properties: must never reach a log


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line as a JSON object: a line that is not one fails the test."""
    out = []
    for line in text.splitlines():
        if line.strip():
            obj = json.loads(line)
            assert isinstance(obj, dict), line
            out.append(obj)
    return out


def access_lines(path: Path, count: int) -> list[dict[str, Any]]:
    wait_for(
        lambda: path.exists() and len(path.read_text().splitlines()) >= count,
        timeout=10,
        what=f"{count} access log lines",
    )
    return json_lines(path.read_text())


def get(proxy: RunningProxy, path: str, headers: dict[str, str] | None = None) -> RawResponse:
    return exchange(proxy.host, proxy.port, "GET", path, headers)


def post_event(proxy: RunningProxy, headers: dict[str, str], event: dict[str, Any]) -> RawResponse:
    body = json.dumps(event).encode()
    all_headers = {"Content-Type": "application/json", **headers}
    return exchange(proxy.host, proxy.port, "POST", "/v1/t", all_headers, body)


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def test_json_logs_are_one_object_per_line_with_time_level_logger_and_message(
    fake: FakeSegment, start: StartProxy
) -> None:
    started = time.time()
    proxy = start(base_config(fake, log_format="json"))
    proxy.logged("segproxy runs")
    lines = json_lines(proxy.logs())
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line)
        assert line["time"].endswith("Z")  # UTC
        assert started - 5 < parse_iso(line["time"]) < time.time() + 5
    listening = [line for line in lines if "segproxy listening on" in line["message"]]
    assert len(listening) == 1
    assert listening[0]["level"] == "INFO"
    assert listening[0]["logger"] == "segproxy"
    assert listening[0]["url"] == proxy.url  # a structured field the line carries
    assert listening[0]["queue"] == "none"
    warnings = [line for line in lines if line["level"] == "WARNING"]
    assert any("write_keys is empty" in w["message"] for w in warnings)


def test_the_access_log_has_one_json_line_per_request_with_route_status_time_and_client(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    fake.add_key(SECRET_KEY)
    log_file = tmp_path / "access.jsonl"
    proxy = start(base_config(fake, access_log=str(log_file), trusted_proxies=["127.0.0.1/32"]))
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    event = track("access-1")
    assert post_event(proxy, {**forwarded, "Authorization": basic(SECRET_KEY)}, event).status == 200
    assert get(proxy, "/healthz").status == 200
    assert get(proxy, "/no/such/route?q=1").status == 404
    script = f"/analytics.js/v1/{SECRET_KEY}/analytics.min.js"
    assert get(proxy, script).status == 200
    lines = access_lines(log_file, 4)
    assert len(lines) == 4
    track_line, health, missing, cdn = lines
    assert track_line["route"] == "track"
    assert track_line["method"] == "POST"
    assert track_line["status"] == 200
    assert track_line["client_ip"] == "203.0.113.9"  # from the trusted hop
    assert track_line["bytes_in"] == len(json.dumps(event).encode())
    assert track_line["bytes_out"] > 0
    assert track_line["duration_ms"] >= 0
    assert (health["route"], health["status"], health["client_ip"]) == ("health", 200, "127.0.0.1")
    assert (missing["route"], missing["status"]) == ("rejected", 404)
    assert missing["path"] == "/no/such/route"  # never the query
    assert (cdn["route"], cdn["status"]) == ("script", 200)
    assert SECRET_KEY not in cdn["path"]  # masked
    for line in lines:
        assert line["time"].endswith("Z")
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600  # it holds client addresses


def test_no_log_line_holds_a_whole_write_key_or_an_event_body(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    fake.add_key(SECRET_KEY)
    log_file = tmp_path / "access.jsonl"
    config = base_config(
        fake,
        log_format="json",
        log_level="debug",
        access_log=str(log_file),
        queue={"backend": "sqlite", "path": str(tmp_path / "data" / "queue.db")},
        forward={"max_delay": 0.05, "backoff_base": 0.05, "backoff_cap": 0.2},
    )
    proxy = start(config)
    # The forwarder's logs name the key too: one retry, then a dead letter.
    fake.api_status(503, times=1)
    fake.api_refuse(lambda event: event.get("messageId") == "secret-dead", 400)
    marked = track("secret-1", properties={"marker": BODY_MARKER})
    in_body = {**marked, "writeKey": SECRET_KEY}
    assert post_event(proxy, {}, in_body).status == 200
    dead = track("secret-dead", properties={"marker": BODY_MARKER})
    assert post_event(proxy, {"Authorization": basic(SECRET_KEY)}, dead).status == 200
    assert get(proxy, f"/v1/projects/{SECRET_KEY}/settings").status == 200
    assert get(proxy, f"/analytics.js/v1/{SECRET_KEY}/analytics.min.js").status == 200
    wait_for(
        lambda: (
            any(e.message_id == "secret-1" for e in fake.api_events())
            and any(r.status == 400 for r in fake.api_requests)
        ),
        timeout=15,
        what="a retried delivery and a dead letter",
    )
    lines = access_lines(log_file, 4)
    proxy.stop()
    everything = proxy.logs() + log_file.read_text()
    assert SECRET_KEY not in everything
    assert BODY_MARKER not in everything
    assert len(lines) == 4
    json_lines(proxy.logs())  # and every line of the proxy's own log is JSON


def test_a_bad_log_format_or_access_log_is_a_named_config_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(to_toml({"listen": "127.0.0.1:0", "log_format": "xml"}))
    out = run_cli("serve", "--config", str(config))
    assert out.returncode == 2
    assert "log_format" in out.stderr and "'text', 'json'" in out.stderr
    out = run_cli("check", "--config", str(config), env={"SEGPROXY_LOG_FORMAT": "logfmt"})
    assert out.returncode == 2
    assert "log_format" in out.stderr
    config.write_text(
        to_toml(
            {
                "listen": "127.0.0.1:0",
                "data_dir": str(tmp_path / "data"),
                "access_log": str(tmp_path / "no" / "such" / "dir" / "access.log"),
            }
        )
    )
    out = run_cli("serve", "--config", str(config))
    assert out.returncode == 2
    assert "access_log" in out.stderr
