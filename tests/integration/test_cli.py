"""The command line: embedded defaults, TOML, environment overrides, and clear config errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import Client, StartProxy, base_config
from tests.support.fakes import FakeSegment
from tests.support.proxy import run_cli, to_toml


def segproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


def test_check_shows_the_embedded_defaults() -> None:
    out = segproxy("check")
    assert out.returncode == 0, out.stderr
    assert "listen 127.0.0.1:8080" in out.stdout
    assert "https://cdn.segment.com" in out.stdout
    assert "https://api.segment.io" in out.stdout


def test_region_eu_preset_and_environment_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml({"upstream": {"region": "eu"}}))
    out = segproxy("check", "--config", str(cfg))
    assert "https://events.eu1.segmentapis.com" in out.stdout
    out = segproxy(
        "check", "--config", str(cfg), env={"SEGPROXY_UPSTREAM_API": "http://127.0.0.1:9"}
    )
    assert "http://127.0.0.1:9" in out.stdout


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ('listen = "nowhere"', {}, ["'listen'", "'nowhere'", "HOST:PORT"]),
        ('[upstream]\napi = "ftp://x"', {}, ["'upstream.api'", "'ftp://x'", "http(s) URL"]),
        ('[upstream]\nregion = "mars"', {}, ["'upstream.region'", "'mars'", "'us', 'eu'"]),
        ('[queue]\nbackend = "kafka"', {}, ["'queue.backend'", "'kafka'", "one of"]),
        ("[limits]\nheader_timeout = -1", {}, ["'limits.header_timeout'", "-1", ">="]),
        ('[sources]\nwrite_keys = ["ok", "no spaces"]', {}, ["'sources.write_keys'", "no spaces"]),
        ("typo_key = 1", {}, ["'typo_key'", "known key"]),
        (
            "",
            {"SEGPROXY_LIMITS_IDLE_TIMEOUT": "soon"},
            ["'limits.idle_timeout'", "'soon'", "number"],
        ),
        ("", {"SEGPROXY_LISTEN": "nowhere"}, ["SEGPROXY_LISTEN='nowhere'", "HOST:PORT"]),
        ("", {"SEGPROXY_NATIVE": "yes"}, ["SEGPROXY_NATIVE='yes'", "0 (run as plain Python)"]),
        ("listen = [", {}, ["'--config'", "valid TOML"]),
    ],
)
def test_bad_config_stops_start_up_naming_key_value_and_expectation(
    tmp_path: Path, toml: str, env: dict[str, str], expected: list[str]
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    out = segproxy("serve", "--config", str(cfg), env=env)
    assert out.returncode == 2
    for fragment in expected:
        assert fragment in out.stderr, (fragment, out.stderr)
    assert "listening" not in out.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    out = segproxy("serve", "--config", str(tmp_path / "absent.toml"))
    assert out.returncode == 2
    assert "an existing TOML file" in out.stderr


def test_environment_overrides_the_file(fake: FakeSegment, start: StartProxy) -> None:
    config = base_config(fake)
    config["upstream"]["api"] = "http://127.0.0.1:9"  # nothing listens there
    proxy = start(config, env={"SEGPROXY_UPSTREAM_API": fake.api_url})
    resp = Client(proxy).post("/v1/t", b'{"writeKey":"k","event":"e"}')
    assert resp.status == 200
    assert len(fake.api_requests) == 1


# What Kubernetes defines in every pod of a namespace whose Service is named "segproxy".
KUBERNETES_SERVICE_LINKS = {
    "SEGPROXY_PORT": "tcp://10.0.0.1:8080",
    "SEGPROXY_SERVICE_HOST": "10.0.0.1",
    "SEGPROXY_SERVICE_PORT": "8080",
    "SEGPROXY_PORT_8080_TCP": "tcp://10.0.0.1:8080",
    "SEGPROXY_PORT_8080_TCP_ADDR": "10.0.0.1",
    "SEGPROXY_PORT_8080_TCP_PORT": "8080",
    "SEGPROXY_PORT_8080_TCP_PROTO": "tcp",
    "SEGPROXY_SERVICE_PORT_HTTP": "8080",
}


def test_serve_starts_in_a_kubernetes_pod_with_service_links_and_warns(
    fake: FakeSegment, start: StartProxy
) -> None:
    env = {**KUBERNETES_SERVICE_LINKS, "SEGPROXY_UPSTREAM_APII": "http://127.0.0.1:9"}
    proxy = start(base_config(fake), env=env)
    resp = Client(proxy).post("/v1/t", b'{"writeKey":"k","event":"e"}')
    assert resp.status == 200
    assert len(fake.api_requests) == 1
    line = proxy.logged(r"WARNING segproxy: ignoring SEGPROXY_PORT, [^\n]*").group(0)
    for name in KUBERNETES_SERVICE_LINKS:
        assert name in line
    proxy.logged(r"WARNING segproxy: ignoring SEGPROXY_UPSTREAM_APII: .*SEGPROXY_UPSTREAM_API\?")
    assert "tcp://10.0.0.1" not in proxy.logs()


def test_check_lists_unknown_variables_as_warnings_and_succeeds() -> None:
    out = segproxy("check", env={**KUBERNETES_SERVICE_LINKS, "SEGPROXY_LOGLEVEL": "debug"})
    assert out.returncode == 0, out.stderr
    assert "warning: ignoring SEGPROXY_PORT, " in out.stdout
    assert "did you mean SEGPROXY_LOG_LEVEL?" in out.stdout


def test_empty_write_key_list_is_logged_as_a_warning(fake: FakeSegment, start: StartProxy) -> None:
    proxy = start(base_config(fake))
    assert "write_keys is empty" in proxy.logs()


def test_every_config_key_is_documented_with_its_environment_name() -> None:
    from segproxy.config import KNOWN_KEYS

    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for key in KNOWN_KEYS:
        assert f"`{key}`" in doc, f"{key} is missing from docs/configuration.md"


def write_config(tmp_path: Path, config: dict[str, object]) -> str:
    path = tmp_path / "second.toml"
    path.write_text(to_toml({"listen": "127.0.0.1:0", **config}))
    return str(path)


def test_listen_address_in_use_is_one_clear_line(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    first = start(base_config(fake))
    config = base_config(fake, listen=f"127.0.0.1:{first.port}")
    out = segproxy("serve", "--config", write_config(tmp_path, config))
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_second_proxy_on_the_same_queue_file_refuses_to_start(
    fake: FakeSegment, start: StartProxy, tmp_path: Path
) -> None:
    queue = {"backend": "sqlite", "path": str(tmp_path / "shared.db")}
    first = start(base_config(fake, queue=queue))
    out = segproxy("serve", "--config", write_config(tmp_path, base_config(fake, queue=queue)))
    assert out.returncode == 1
    assert "another segproxy process is using the queue" in out.stderr
    assert "Traceback" not in out.stderr
    assert first.proc.poll() is None  # the first one is unharmed


def test_check_prints_the_whole_resolved_configuration_and_no_secret(tmp_path: Path) -> None:
    from segproxy.config import KNOWN_KEYS

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not read by check, only named\n")
    key.write_text("not read by check, only named\n")
    token = "s3cret-admin-token-0123456789"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        to_toml(
            {
                "listen": "0.0.0.0:8443",
                "prefix": "/seg",
                "public_hosts": ["analytics.example.com"],
                "trusted_proxies": ["10.0.0.0/8"],
                "data_dir": str(tmp_path / "data"),
                "upstream": {"region": "eu"},
                "sources": {"write_keys": ["wk_secret_key_0123456789"]},
                "queue": {"path": "q.db"},
                "admin": {"listen": "127.0.0.1:9090", "token": token},
                "tls": {"cert": str(cert), "key": str(key)},
                "limits": {"max_body_bytes": 100000},
                "rate_limit": {"per_ip": 50},
            }
        )
    )
    out = segproxy("check", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    resolved = out.stdout.split("resolved configuration:\n", 1)[1].splitlines()
    values = {}
    section = ""
    for line in resolved:
        name, _, value = line.strip().partition(" ")
        if name.startswith("["):
            section = name.strip("[]") + "."
            continue
        values[section + name] = value.strip()
    assert sorted(values) == sorted(KNOWN_KEYS)  # every key, none twice
    assert values["listen"] == "0.0.0.0:8443"
    assert values["prefix"] == "/seg"
    assert values["public_hosts"] == "[analytics.example.com]"
    assert values["trusted_proxies"] == "[10.0.0.0/8]"
    assert values["upstream.region"] == "eu"
    assert values["upstream.api"] == "https://events.eu1.segmentapis.com"
    assert values["queue.path"] == str(tmp_path / "data" / "q.db")  # where it will be opened
    assert values["tls.cert"] == str(cert)
    assert values["tls.key"] == str(key)
    assert values["admin.listen"] == "127.0.0.1:9090"
    assert values["admin.token"] == "(set)"
    assert values["limits.max_body_bytes"] == "100000"
    assert values["rate_limit.per_ip"] == "50"
    assert values["rate_limit.per_write_key"] == "0 (off)"
    assert token not in out.stdout
    assert "wk_secret_key_0123456789" not in out.stdout
    assert "wk_sec…" in values["sources.write_keys"]
    assert "not read by check" not in out.stdout
