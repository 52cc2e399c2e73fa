"""`segproxy check URL` end to end: the command as an operator runs it, against segproxy itself
(a real proxy subprocess before the fake Segment) and against real nginx configurations that
reproduce each classic mistake of a hand-made Segment proxy."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from tests.integration.conftest import WRITE_KEY, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.nginx import RunningNginx, free_port, start_nginx
from tests.support.proxy import run_cli
from tests.support.rawhttp import exchange


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("check", *args)


def check_json(*args: str) -> tuple[int, dict[str, Any]]:
    out = check(*args, "--json")
    data: dict[str, Any] = json.loads(out.stdout)
    assert data["exit_code"] == out.returncode
    return out.returncode, data


def by_id(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in data["checks"]}


def line_of(stdout: str, title: str) -> str:
    return next(line for line in stdout.splitlines() if f" {title}: " in line)


# ---------------------------------------------------------------------------------------------
# segproxy itself


def test_a_healthy_segproxy_passes_every_check_and_the_test_event_arrives(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake))
    out = check(proxy.url, "--write-key", WRITE_KEY)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    checks = lines[1:-1]
    assert len(checks) == 7  # script, settings, bundle, cache, preflight, event, retry_after
    assert all(line.startswith("✓ ") for line in checks), out.stdout
    assert f"bundles load from {proxy.url}" in line_of(out.stdout, "analytics.js loads")
    assert WRITE_KEY not in out.stdout
    [event] = fake.wait_for_events(1)
    assert event.type == "track"
    assert event.data["event"] == "segproxy check"
    assert event.message_id is not None
    assert event.message_id in out.stdout
    assert event.write_key == WRITE_KEY


def test_a_segproxy_under_a_path_prefix_passes_with_the_prefix_in_every_address(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, prefix="/seg"))
    code, data = check_json(f"{proxy.url}/seg/", "--write-key", WRITE_KEY)
    assert code == 0, data
    checks = by_id(data)
    assert data["url"] == f"{proxy.url}/seg"
    assert checks["script"]["data"]["cdn_base"] == f"{proxy.url}/seg"
    assert checks["settings"]["data"]["api_host"] == f"{proxy.authority}/seg/v1"
    [event] = fake.wait_for_events(1)
    assert event.message_id == checks["event"]["data"]["message_id"]


def test_dry_run_sends_no_event(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake))
    code, data = check_json(proxy.url, "--write-key", WRITE_KEY, "--dry-run")
    assert code == 0, data
    checks = by_id(data)
    assert checks["event"]["status"] == "skip"
    assert checks["retry_after"]["status"] == "pass"  # read from the preflight's answer
    assert data["dry_run"] is True
    assert fake.api_requests == []  # the preflight is answered by segproxy itself


def test_json_carries_the_same_verdicts_as_the_human_report(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake, sources={"write_keys": [WRITE_KEY]}))
    human = check(proxy.url, "--write-key", "wk_other_2", "--dry-run")
    code, data = check_json(proxy.url, "--write-key", "wk_other_2", "--dry-run")
    assert code == human.returncode == 1
    marks = {"pass": "✓", "fail": "✗", "warn": "!", "skip": "-"}
    for c in data["checks"]:
        line = line_of(human.stdout, c["title"])
        assert line.startswith(marks[c["status"]] + " "), (line, c)
        assert c["detail"] in line
    # segproxy serves only its own keys: the script and the settings say so, with the fix
    script = by_id(data)["script"]
    assert script["fault"] == "key_refused"
    assert "write_keys" in script["advice"]
    assert f"fix: {script['advice']}" in human.stdout
    assert "wk_other_2" not in human.stdout + json.dumps(data)  # masked in every path shown


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_tls_shows_the_days_to_expiry_of_the_certificate(
    ca: trustme.CA, fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(cert_file), append=i > 0)
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = start(base_config(fake, tls={"cert": str(cert_file), "key": str(key_file)}))
    assert proxy.url.startswith("https://")

    code, data = check_json(proxy.url, "--write-key", WRITE_KEY, "--cafile", str(ca_file))
    assert code == 0, data
    tls = by_id(data)["tls"]
    not_after = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).not_valid_after_utc
    assert tls["data"]["not_after"] == not_after.isoformat()
    assert tls["data"]["days_left"] == (not_after - datetime.now(UTC)).days
    assert f"({tls['data']['days_left']} days)" in tls["detail"]
    assert by_id(data)["settings"]["data"]["api_host"] == f"{proxy.authority}/v1"

    # Without the private CA the certificate is not trusted: nothing else is checked.
    code, data = check_json(proxy.url, "--write-key", WRITE_KEY)
    assert code == 1
    assert by_id(data)["tls"]["fault"] == "tls_invalid"
    assert {c["status"] for c in data["checks"][1:]} == {"skip"}
    assert fake.wait_for_events(1)  # only the first run sent its event


def test_nothing_listening_is_exit_code_2() -> None:
    out = check(f"http://127.0.0.1:{free_port()}", "--write-key", WRITE_KEY)
    assert out.returncode == 2
    assert "connection refused" in out.stdout
    assert "not reachable" in out.stdout


def test_an_api_that_does_not_answer_fails_its_checks_but_the_cdn_is_still_checked(
    fake: FakeSegment, start: StartProxy
) -> None:
    proxy = start(base_config(fake))
    nowhere = f"http://127.0.0.1:{free_port()}"
    code, data = check_json(proxy.url, "--write-key", WRITE_KEY, "--api", nowhere)
    assert code == 1
    checks = by_id(data)
    assert checks["script"]["status"] == checks["bundle"]["status"] == "pass"
    assert checks["preflight"]["fault"] == checks["event"]["fault"] == "unreachable"
    assert nowhere in checks["event"]["advice"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["http://127.0.0.1:9"], "--write-key is required"),
        (["ftp://x", "--write-key", "k"], "not an http(s) URL"),
        (["http://127.0.0.1:9", "--write-key", "k/../x"], "--write-key"),
        (["http://127.0.0.1:9", "--write-key", "k", "--config", "c.toml"], "not both"),
        (["--write-key", "k"], "need a URL"),
    ],
)
def test_usage_errors_are_exit_code_2(args: list[str], message: str) -> None:
    out = check(*args)
    assert out.returncode == 2
    assert message in out.stderr


# ---------------------------------------------------------------------------------------------
# nginx configurations, right and wrong

CACHE_ZONE = "proxy_cache_path {prefix}/cache keys_zone=seg:1m;"
SAYS_CACHE = "add_header X-Cache-Status $upstream_cache_status always;"


def nginx_http(
    fake: FakeSegment,
    *,
    cdn: str = "",
    api: str = "",
    api_location: str | None = None,
    expose: bool = True,
) -> str:
    """A proxy for Segment written by hand: the CDN's paths to Segment's CDN (the fake), /v1/* to
    its API. ``cdn`` and ``api`` are directives added to those locations."""
    exposed = 'add_header Access-Control-Expose-Headers "Retry-After" always;' if expose else ""
    api_block = api_location or f"proxy_pass {fake.api_url}; {exposed} {api}"
    return f"""
    {CACHE_ZONE}
    server {{
        listen 127.0.0.1:{{port}};
        location /analytics.js/ {{ proxy_pass {fake.cdn_url}; {cdn} }}
        location /analytics-next/ {{ proxy_pass {fake.cdn_url}; {cdn} }}
        location /v1/projects/ {{ proxy_pass {fake.cdn_url}; {cdn} }}
        location /v1/ {{ {api_block} }}
    }}
"""


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[Any]:
    started: list[RunningNginx] = []

    def _start(http: str) -> RunningNginx:
        server = start_nginx(tmp_path / f"nginx{len(started)}", http)
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


def api_host_is(fake: FakeSegment, authority: str) -> None:
    """What Segment support does for a custom proxy: the source's settings name it."""
    fake.segment_io()["apiHost"] = f"{authority}/v1"
    fake.segment_io()["protocol"] = "http"


def test_a_right_nginx_proxy_passes_with_a_warning_about_bundles_over_http(
    fake: FakeSegment, nginx_in_front: Any
) -> None:
    cached = f"proxy_cache seg; {SAYS_CACHE}"
    server = nginx_in_front(nginx_http(fake, cdn=cached))
    api_host_is(fake, server.authority)
    out = check(server.url, "--write-key", WRITE_KEY)
    assert out.returncode == 0, out.stdout
    assert line_of(out.stdout, "analytics.js loads").startswith("! ")
    assert "https://cdn.segment.com" in out.stdout
    assert line_of(out.stdout, "caching in front of the proxy").startswith("✓ ")
    assert "all checks passed (1 warning)" in out.stdout
    assert [e.data["event"] for e in fake.wait_for_events(1)] == ["segproxy check"]


@pytest.mark.parametrize(
    ("mistake", "nginx_args", "check_id", "fault", "fix"),
    [
        (
            "the visitor's Host forwarded upstream",
            {"cdn": "proxy_set_header Host $host;", "api": "proxy_set_header Host $host;"},
            "script",
            "host_forwarded",
            "proxy_set_header Host $host",
        ),
        (
            "a cache keyed on the visitor's headers",
            {
                "cdn": "proxy_cache seg; "
                'proxy_cache_key "$request_uri$http_user_agent$http_accept_language'
                '$http_cookie"; ' + SAYS_CACHE
            },
            "cache",
            "cache_keyed_on_headers",
            "key the cache on the path only",
        ),
        (
            "a cache that never stores",
            {"cdn": f"proxy_cache seg; proxy_no_cache 1; proxy_cache_bypass 1; {SAYS_CACHE}"},
            "cache",
            "cache_off",
            "by path",
        ),
        (
            "every request redirected to https, POSTs too",
            {"api_location": "return 301 https://$host$request_uri;"},
            "event",
            "post_redirected",
            "never /v1/*",
        ),
        (
            "a method filter that refuses the preflight",
            {"api": "limit_except GET POST { deny all; }"},
            "preflight",
            "no_preflight",
            "answer OPTIONS",
        ),
        (
            "a CORS recipe from before analytics.js sent Authorization and X-Retry-Count",
            {
                "api": "if ($request_method = OPTIONS) { "
                "add_header Access-Control-Allow-Origin $http_origin; "
                'add_header Access-Control-Allow-Methods "POST, OPTIONS"; '
                'add_header Access-Control-Allow-Headers "content-type"; return 204; }'
            },
            "preflight",
            "preflight_headers",
            "authorization, content-type, x-retry-count",
        ),
        (
            "Retry-After not exposed",
            {"expose": False},
            "retry_after",
            "retry_after_hidden",
            "Access-Control-Expose-Headers: Retry-After",
        ),
    ],
)
def test_each_broken_nginx_configuration_is_named_with_its_fix(
    fake: FakeSegment,
    nginx_in_front: Any,
    mistake: str,
    nginx_args: dict[str, Any],
    check_id: str,
    fault: str,
    fix: str,
) -> None:
    server = nginx_in_front(nginx_http(fake, **nginx_args))
    api_host_is(fake, server.authority)
    human = check(server.url, "--write-key", WRITE_KEY)
    code, data = check_json(server.url, "--write-key", WRITE_KEY)
    assert human.returncode == code == 1, (mistake, human.stdout)
    verdict = by_id(data)[check_id]
    assert (verdict["status"], verdict["fault"]) == ("fail", fault), (mistake, verdict)
    assert fix in verdict["advice"]
    line = line_of(human.stdout, verdict["title"])
    assert line.startswith("✗ ")
    after = human.stdout.splitlines()[human.stdout.splitlines().index(line) + 1]
    assert after == f"    fix: {verdict['advice']}"
    if fault == "post_redirected":  # a redirect's headers say nothing about the API's
        assert by_id(data)["retry_after"]["status"] == "skip"


def test_settings_that_name_segment_say_support_or_segproxy_is_the_fix(
    fake: FakeSegment, nginx_in_front: Any
) -> None:
    server = nginx_in_front(nginx_http(fake))  # the fake's settings name api.segment.io/v1
    code, data = check_json(server.url, "--write-key", WRITE_KEY, "--dry-run")
    assert code == 1
    settings = by_id(data)["settings"]
    assert settings["fault"] == "settings_name_segment"
    assert "api.segment.io/v1" in settings["detail"]
    assert f"to {server.authority}/v1" in settings["advice"]
    assert "Segment support" in settings["advice"]


def test_settings_cached_for_another_host_are_recognised(
    fake: FakeSegment, start: StartProxy, nginx_in_front: Any
) -> None:
    proxy = start(base_config(fake))
    # An nginx cache in front of segproxy that ignores its Cache-Control: private and Vary,
    # and keys on the path only: the first visitor's host is every visitor's.
    to_segproxy = f"proxy_pass {proxy.url}; proxy_set_header Host $http_host;"
    server = nginx_in_front(f"""
    {CACHE_ZONE}
    server {{
        listen 127.0.0.1:{{port}};
        location / {{ {to_segproxy} }}
        location /v1/projects/ {{
            {to_segproxy}
            proxy_cache seg; proxy_cache_key $request_uri; proxy_cache_valid 200 10m;
            proxy_ignore_headers Cache-Control Expires Vary Set-Cookie;
        }}
    }}
""")
    primed = exchange(
        "127.0.0.1",
        server.port,
        "GET",
        f"/v1/projects/{WRITE_KEY}/settings",
        host_header="www.other.example",
    )
    assert primed.status == 200
    code, data = check_json(server.url, "--write-key", WRITE_KEY, "--dry-run")
    assert code == 1
    settings = by_id(data)["settings"]
    assert settings["fault"] == "settings_other_host"
    assert settings["data"]["api_host"] == "www.other.example/v1"
    assert "cache" in settings["advice"]
    assert by_id(data)["script"]["status"] == "pass"  # segproxy's script, through nginx


def test_the_api_on_another_host_is_checked_there(
    fake: FakeSegment, start: StartProxy, nginx_in_front: Any
) -> None:
    proxy = start(base_config(fake))
    cdn_only = f"""
    server {{
        listen 127.0.0.1:{{port}};
        location / {{ proxy_pass {fake.cdn_url}; }}
    }}
"""
    server = nginx_in_front(cdn_only)
    api_host_is(fake, proxy.authority)
    code, data = check_json(server.url, "--write-key", WRITE_KEY, "--api", proxy.url)
    assert code == 0, data
    assert data["api"] == proxy.url
    assert by_id(data)["event"]["status"] == "pass"
    [event] = fake.wait_for_events(1)
    assert event.message_id == by_id(data)["event"]["data"]["message_id"]
