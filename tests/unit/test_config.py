"""Configuration: defaults, the TOML file, SEGPROXY_* overrides, and refusing every bad value."""

from __future__ import annotations

import ipaddress
import os
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.config import (
    KNOWN_KEYS,
    NOT_CONFIG,
    CacheConfig,
    Config,
    ConfigError,
    LimitsConfig,
    UpstreamConfig,
    build,
    closest_variable,
    env_name,
    env_warnings,
    load,
    parse_upstream,
    unknown_variables,
)
from segproxy.config.schema import LIST_KEYS, SECTIONS


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "segproxy.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(flat: dict[str, object]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(flat)
    return info.value


# ---------------------------------------------------------------------------------------------
# Defaults


def test_defaults_listen_on_loopback_port_8080() -> None:
    config = load(env={})
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    assert config.listen == "127.0.0.1:8080"


def test_defaults_forward_to_segments_us_cdn_and_api() -> None:
    config = load(env={})
    assert config.upstream.region == "us"
    assert config.upstream.cdn.origin == "https://cdn.segment.com"
    assert config.upstream.api.origin == "https://api.segment.io"
    assert config.upstream.api.port == 443


def test_defaults_mount_at_root_accept_every_write_key_and_queue_durably() -> None:
    config = load(env={})
    assert config.prefix == ""
    assert config.sources.write_keys == frozenset()
    assert config.public_hosts == frozenset()
    assert config.trusted_proxies == ()
    assert config.queue.backend == "sqlite"
    assert config.queue.path == "./segproxy-data/queue.db"
    assert config.queue.synchronous == "normal"


def test_default_limits_match_segments_own_limits() -> None:
    limits = load(env={}).limits
    assert limits.max_event_bytes == 32 * 1024
    assert limits.max_request_bytes == 500 * 1024
    assert limits.max_batch_events == 2500


def test_loading_nothing_equals_the_documented_defaults() -> None:
    assert load(env={}) == Config()


def test_region_eu_sends_events_to_segments_eu_endpoint() -> None:
    config = build({"upstream.region": "eu"})
    assert config.upstream.region == "eu"
    assert config.upstream.api.origin == "https://events.eu1.segmentapis.com"
    assert config.upstream.cdn.origin == "https://cdn.segment.com"


def test_explicit_api_upstream_wins_over_the_region_preset() -> None:
    config = build({"upstream.region": "eu", "upstream.api": "http://127.0.0.1:9001"})
    assert config.upstream.api.origin == "http://127.0.0.1:9001"
    assert config.upstream.region == "eu"


def test_explicit_cdn_upstream_is_used_as_given() -> None:
    config = build({"upstream.cdn": "http://127.0.0.1:9002/"})
    assert (config.upstream.cdn.scheme, config.upstream.cdn.host) == ("http", "127.0.0.1")
    assert config.upstream.cdn.port == 9002


def test_upstream_authority_omits_the_default_port_and_lowercases_the_host() -> None:
    up = parse_upstream("upstream.api", "HTTPS://API.Example.COM:443")
    assert up.authority == "api.example.com"
    assert up.origin == "https://api.example.com"
    assert parse_upstream("upstream.api", "https://api.example.com:8443").authority == (
        "api.example.com:8443"
    )


def test_ipv6_listen_address_is_shown_in_brackets() -> None:
    config = build({"listen": "[::]:9000"})
    assert (config.listen_host, config.listen_port) == ("::", 9000)
    assert config.listen == "[::]:9000"


# ---------------------------------------------------------------------------------------------
# The TOML file


def test_toml_file_sets_every_section(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        listen = "0.0.0.0:8443"
        prefix = "/seg/"
        public_hosts = ["Analytics.Example.com", "shop.example.com:8443"]
        trusted_proxies = ["10.0.0.0/8", "2001:db8::1"]
        log_level = "debug"

        [upstream]
        region = "eu"
        timeout = 2.5
        max_connections = 8

        [sources]
        write_keys = ["wk_live_1", "wk-live-2"]

        [queue]
        backend = "none"
        path = "/var/lib/segproxy/q.db"

        [limits]
        max_batch_events = 100

        [cache]
        script_ttl = 30
        """,
    )
    config = load(path, env={})
    assert config.listen == "0.0.0.0:8443"
    assert config.prefix == "/seg"
    assert config.public_hosts == {"analytics.example.com", "shop.example.com:8443"}
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::1/128"),
    )
    assert config.log_level == "debug"
    assert config.upstream.api.host == "events.eu1.segmentapis.com"
    assert config.upstream.timeout == 2.5
    assert config.upstream.max_connections == 8
    assert config.sources.write_keys == {"wk_live_1", "wk-live-2"}
    assert config.queue.backend == "none"
    assert config.queue.path == "/var/lib/segproxy/q.db"
    assert config.limits.max_batch_events == 100
    assert config.cache.script_ttl == 30.0


def test_missing_config_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(missing, env={})
    assert "--config" in str(info.value)
    assert str(missing) in str(info.value)
    assert "an existing TOML file" in str(info.value)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "listen = \n")
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert "valid TOML" in str(info.value)


def test_unknown_key_in_the_file_is_rejected(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[upstream]\napi_url = "https://api.segment.io"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert info.value.key == "upstream.api_url"
    assert "a known key" in str(info.value)


def test_unknown_table_in_the_file_is_rejected(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[server]\nlisten = "0.0.0.0:80"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert info.value.key == "server"


def test_a_section_name_given_a_scalar_is_rejected(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'upstream = "https://api.segment.io"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert info.value.key == "upstream"
    assert "[upstream] table" in str(info.value)


def test_misspelled_top_level_key_is_rejected() -> None:
    error = error_of({"listne": "127.0.0.1:1"})
    assert error.key == "listne"


# ---------------------------------------------------------------------------------------------
# SEGPROXY_* environment variables


def test_environment_overrides_the_file_and_keeps_the_files_other_keys(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        listen = "127.0.0.1:7000"
        [upstream]
        api = "http://127.0.0.1:9001"
        timeout = 3
        """,
    )
    env = {"SEGPROXY_UPSTREAM_API": "http://127.0.0.1:9999", "SEGPROXY_LISTEN": "127.0.0.1:7001"}
    config = load(path, env=env)
    assert config.upstream.api.port == 9999
    assert config.listen_port == 7001
    assert config.upstream.timeout == 3.0


def test_environment_lists_are_comma_separated_and_trimmed() -> None:
    env = {
        "SEGPROXY_SOURCES_WRITE_KEYS": " wk_a , wk_b,,",
        "SEGPROXY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7",
        "SEGPROXY_PUBLIC_HOSTS": "Shop.Example.com,cdn.example.com:8443",
    }
    config = load(env=env)
    assert config.sources.write_keys == {"wk_a", "wk_b"}
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
    )
    assert config.public_hosts == {"shop.example.com", "cdn.example.com:8443"}


def test_environment_numbers_are_parsed_to_the_keys_type() -> None:
    env = {"SEGPROXY_LIMITS_MAX_BODY_BYTES": "1024", "SEGPROXY_UPSTREAM_TIMEOUT": "2.5"}
    config = load(env=env)
    assert config.limits.max_body_bytes == 1024
    assert isinstance(config.limits.max_body_bytes, int)
    assert config.upstream.timeout == 2.5


def test_environment_region_switches_the_api_preset() -> None:
    config = load(env={"SEGPROXY_UPSTREAM_REGION": "eu"})
    assert config.upstream.api.host == "events.eu1.segmentapis.com"


def test_load_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SEGPROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SEGPROXY_PREFIX", "/from-env")
    assert load().prefix == "/from-env"


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


def test_kubernetes_service_link_variables_do_not_stop_start_up() -> None:
    assert load(env=KUBERNETES_SERVICE_LINKS) == Config()


def test_kubernetes_service_link_variables_are_named_in_one_warning() -> None:
    (warning,) = env_warnings(KUBERNETES_SERVICE_LINKS)
    for name in KUBERNETES_SERVICE_LINKS:
        assert name in warning
    assert "Kubernetes" in warning
    assert "enableServiceLinks: false" in warning


def test_kubernetes_variables_next_to_real_settings_keep_the_settings() -> None:
    env = {**KUBERNETES_SERVICE_LINKS, "SEGPROXY_LISTEN": "0.0.0.0:8080"}
    config = load(env=env)
    assert config.listen == "0.0.0.0:8080"
    assert not any("SEGPROXY_LISTEN," in w for w in env_warnings(env))


def test_an_unknown_variable_is_a_warning_naming_the_closest_known_variable() -> None:
    env = {"SEGPROXY_UPSTREAM_APII": "https://x.example"}
    assert load(env=env) == Config()
    (warning,) = env_warnings(env)
    assert warning.startswith("ignoring SEGPROXY_UPSTREAM_APII: not a segproxy setting")
    assert "did you mean SEGPROXY_UPSTREAM_API?" in warning


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("SEGPROXY_LOGLEVEL", "SEGPROXY_LOG_LEVEL"),
        ("SEGPROXY_WRITE_KEYS", "SEGPROXY_SOURCES_WRITE_KEYS"),
        ("SEGPROXY_LISTEN_PORT", "SEGPROXY_LISTEN"),
        ("SEGPROXY_NATVE", "SEGPROXY_NATIVE"),
        ("SEGPROXY_ZZZ", None),
    ],
)
def test_the_closest_known_variable_ignores_the_common_prefix(
    name: str, closest: str | None
) -> None:
    assert closest_variable(name) == closest


def test_an_unknown_variables_value_is_never_shown() -> None:
    secret = "s3cr3t-token-value-0123456789"
    warnings = env_warnings({"SEGPROXY_ADMIN_TOKN": secret, "SEGPROXY_PORT": secret})
    assert len(warnings) == 2
    assert not any(secret in w for w in warnings)


def test_known_variables_give_no_warning() -> None:
    env = {env_name(k): "x" for k in KNOWN_KEYS} | {"SEGPROXY_NATIVE": "0", "PATH": "/bin"}
    assert env_warnings(env) == []


def test_every_segproxy_variable_segproxy_reads_is_known() -> None:
    # What the code and its scripts read (SEGPROXY_NATIVE ...) must never be warned about.
    # The config package itself is left out: it names the Kubernetes variables it warns about.
    root = Path(__file__).parents[2]
    files = [*(root / "src").rglob("*.py"), *(root / "scripts").iterdir()]
    files = [f for f in files if (root / "src" / "segproxy" / "config") not in f.parents]
    names = set()
    for file in files:
        if file.is_file():
            names |= set(re.findall(r"SEGPROXY_[A-Z0-9_]*[A-Z0-9]", file.read_text()))
    assert "SEGPROXY_NATIVE" in names
    assert unknown_variables(dict.fromkeys(names, "0")) == []


def test_a_known_variable_with_a_bad_value_stops_start_up_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={**KUBERNETES_SERVICE_LINKS, "SEGPROXY_LISTEN": "8080"})
    message = str(info.value)
    assert info.value.key == "listen"
    assert info.value.variable == "SEGPROXY_LISTEN"
    assert message.startswith("SEGPROXY_LISTEN='8080': expected HOST:PORT")
    assert "(config key 'listen')" in message


def test_a_bad_value_from_the_file_names_the_key_not_a_variable(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'listen = "8080"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={"SEGPROXY_PREFIX": "/seg"})
    assert info.value.variable is None
    assert str(info.value).startswith("config key 'listen': got '8080'")


@pytest.mark.parametrize("value", ["0", "1"])
def test_SEGPROXY_NATIVE_is_not_a_config_key(value: str) -> None:
    # it picks plain Python or the compiled build (segproxy/native.py), before any config
    assert load(env={"SEGPROXY_NATIVE": value}) == Config()


@pytest.mark.parametrize("value", ["", "false", "no", "00", "2"])
def test_SEGPROXY_NATIVE_takes_only_0_or_1(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"SEGPROXY_NATIVE": value})
    assert "SEGPROXY_NATIVE" in str(info.value)
    assert "0 (run as plain Python) or 1" in str(info.value)


def test_every_key_has_a_distinct_environment_name() -> None:
    names = [env_name(key) for key in KNOWN_KEYS]
    assert len(set(names)) == len(names)
    assert env_name("upstream.api") == "SEGPROXY_UPSTREAM_API"
    assert env_name("limits.max_event_bytes") == "SEGPROXY_LIMITS_MAX_EVENT_BYTES"


@settings(max_examples=100, deadline=None)
@given(name=st.from_regex(r"SEGPROXY_[A-Z0-9_]{1,30}", fullmatch=True))
def test_any_segproxy_variable_that_names_no_key_is_only_a_warning(name: str) -> None:
    if name in {env_name(k) for k in KNOWN_KEYS} or name in NOT_CONFIG:
        return
    assert load(env={name: "1"}) == Config()
    (warning,) = env_warnings({name: "1"})
    assert name in warning


@settings(max_examples=100, deadline=None)
@given(
    name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True).filter(
        lambda n: not n.startswith("SEGPROXY_")
    ),
    value=st.text(max_size=20),
)
def test_variables_outside_the_segproxy_namespace_are_ignored(name: str, value: str) -> None:
    assert load(env={name: value}) == Config()


_SECTION_DEFAULTS: dict[str, object] = {
    "upstream": UpstreamConfig(),
    "limits": LimitsConfig(),
    "cache": CacheConfig(),
}


def _default(key: str) -> object:
    section, name = key.split(".")
    return getattr(_SECTION_DEFAULTS[section], name)


_NUMERIC_KEYS = [k for k in KNOWN_KEYS if k.split(".")[0] in _SECTION_DEFAULTS]
_FLOAT_KEYS = [k for k in _NUMERIC_KEYS if type(_default(k)) is float]
# Limits checked against each other have their own tests (the two request sizes here; the
# body budget, at least one body, in test_memory_budget_config.py).
_INT_KEYS = [
    k
    for k in _NUMERIC_KEYS
    if type(_default(k)) is int
    and k
    not in (
        "limits.max_request_bytes",
        "limits.max_decompressed_bytes",
        "limits.max_buffered_bytes",
    )
]


def _value_of(config: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def test_numeric_key_tables_cover_the_timeouts_and_sizes() -> None:
    assert "upstream.timeout" in _FLOAT_KEYS
    assert "cache.settings_ttl" in _FLOAT_KEYS
    assert "limits.max_event_bytes" in _INT_KEYS
    assert "cache.max_bytes" in _INT_KEYS


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(_FLOAT_KEYS), value=st.floats(min_value=0.001, max_value=1e6))
def test_every_float_key_can_be_set_from_its_environment_variable(key: str, value: float) -> None:
    config = load(env={env_name(key): repr(value)})
    assert _value_of(config, key) == value


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(_INT_KEYS), value=st.integers(min_value=1, max_value=400 * 1024))
def test_every_integer_key_can_be_set_from_its_environment_variable(key: str, value: int) -> None:
    config = load(env={env_name(key): str(value)})
    assert _value_of(config, key) == value


# ---------------------------------------------------------------------------------------------
# Bad values: each stops start-up with the key, the value and what was expected.

BAD_VALUES: list[tuple[str, object, object, str]] = [
    # (key, value given, value named in the message, expectation named in the message)
    ("listen", "8080", "8080", "HOST:PORT"),
    ("listen", "127.0.0.1:70000", "127.0.0.1:70000", "HOST:PORT"),
    ("listen", "[::1:8080", "[::1:8080", "HOST:PORT"),
    ("listen", 8080, 8080, "HOST:PORT"),
    ("prefix", "seg", "seg", "a path like /seg"),
    ("prefix", "/se g", "/se g", "a path like /seg"),
    ("prefix", "/seg?x", "/seg?x", "a path like /seg"),
    ("prefix", 5, 5, "a string"),
    ("public_hosts", ["shop example.com"], "shop example.com", "host names"),
    ("public_hosts", ["https://shop.example.com"], "https://shop.example.com", "host names"),
    ("public_hosts", [1], [1], "a list of strings"),
    ("public_hosts", ["a@b.example"], "a@b.example", "host names"),
    ("trusted_proxies", ["10.0.0.0/33"], "10.0.0.0/33", "IP addresses or CIDR networks"),
    ("trusted_proxies", ["lb.internal"], "lb.internal", "IP addresses or CIDR networks"),
    ("data_dir", 3, 3, "a string"),
    ("log_level", "verbose", "verbose", "one of 'debug', 'info', 'warning', 'error'"),
    ("upstream.region", "asia", "asia", "one of 'us', 'eu'"),
    ("upstream.api", "api.segment.io", "api.segment.io", "an http(s) URL"),
    ("upstream.api", "ftp://api.segment.io", "ftp://api.segment.io", "an http(s) URL"),
    ("upstream.api", "https://api.segment.io/v1", "https://api.segment.io/v1", "no path"),
    ("upstream.api", "https://api.segment.io?x=1", "https://api.segment.io?x=1", "no path"),
    ("upstream.api", "https://api.segment.io#f", "https://api.segment.io#f", "no path"),
    ("upstream.cdn", "https://u@cdn.example.com", "https://u@cdn.example.com", "an http(s) URL"),
    ("upstream.cdn", "https://cdn.example.com:99999", "https://cdn.example.com:99999", "URL"),
    ("upstream.cdn", "https://", "https://", "an http(s) URL"),
    ("upstream.cdn", 443, 443, "an http(s) URL"),
    ("upstream.timeout", "soon", "soon", "a number"),
    ("upstream.timeout", -1, -1, "a number >= 0"),
    ("upstream.timeout", True, True, "a number"),
    ("upstream.connect_timeout", [5], [5], "a number"),
    ("upstream.max_connections", 0, 0, "an integer >= 1"),
    ("upstream.max_connections", 2.5, 2.5, "an integer"),
    ("sources.write_keys", ["wk live"], "wk live", "write keys of letters, digits"),
    ("sources.write_keys", ["wk_ok", "wk/bad"], "wk/bad", "write keys of letters, digits"),
    ("sources.write_keys", ["wk", ""], "", "write keys of letters, digits"),
    ("queue.backend", "redis", "redis", "one of 'sqlite', 'none', 'memory'"),
    ("queue.path", ["q.db"], ["q.db"], "a string"),
    ("limits.max_body_bytes", 0, 0, "an integer >= 1"),
    ("limits.max_event_bytes", "32k", "32k", "an integer"),
    ("limits.max_batch_events", 10.0, 10.0, "an integer"),
    ("limits.header_timeout", 0, 0, "a number >= 0.001"),
    ("cache.script_ttl", -5, -5, "a number >= 0.001"),
    ("cache.max_bytes", "lots", "lots", "an integer"),
    ("limits.max_request_bytes", 4 * 1024 * 1024, 4 * 1024 * 1024, "at most limits.max_decomp"),
]


@pytest.mark.parametrize(
    ("key", "value", "shown", "expected"),
    BAD_VALUES,
    ids=[f"{k}={v!r}" for k, v, _, _ in BAD_VALUES],
)
def test_bad_value_is_refused_with_key_value_and_expectation(
    key: str, value: object, shown: object, expected: str
) -> None:
    error = error_of({key: value})
    message = str(error)
    assert error.key == key
    assert repr(key) in message
    assert repr(shown) in message
    assert expected in message


def test_bad_value_in_the_file_names_the_dotted_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[queue]\nbackend = "kafka"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert "'queue.backend'" in str(info.value)
    assert "'kafka'" in str(info.value)


def test_bad_value_in_the_environment_is_refused_even_if_the_file_is_fine(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[upstream]\nregion = "eu"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={"SEGPROXY_UPSTREAM_REGION": "EU"})
    assert info.value.key == "upstream.region"


def test_limits_consistency_is_checked_after_both_limits_are_read() -> None:
    config = build({"limits.max_request_bytes": 4096, "limits.max_decompressed_bytes": 4096})
    assert config.limits == LimitsConfig(max_request_bytes=4096, max_decompressed_bytes=4096)


@pytest.mark.parametrize("key", ["upstream.timeout", "cache.script_ttl"])
def test_nan_is_not_accepted_as_a_timeout_or_ttl(key: str) -> None:
    with pytest.raises(ConfigError):
        load(env={env_name(key): "nan"})


def test_fractional_integer_from_the_environment_says_an_integer_is_expected() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"SEGPROXY_LIMITS_MAX_BODY_BYTES": "1.5"})
    assert "an integer" in str(info.value)


def test_upstream_port_zero_is_rejected_not_replaced_by_the_default_port() -> None:
    with pytest.raises(ConfigError):
        parse_upstream("upstream.api", "http://127.0.0.1:0")


@pytest.mark.parametrize("url", ["https://api example.com", "https://:secret@api.example.com"])
def test_upstream_with_an_invalid_host_or_credentials_is_rejected(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_upstream("upstream.api", url)


def test_ipv6_upstream_keeps_brackets_in_its_authority_and_origin() -> None:
    up = parse_upstream("upstream.api", "http://[::1]:9000")
    assert up.authority == "[::1]:9000"
    assert up.origin == "http://[::1]:9000"


@pytest.mark.parametrize("prefix", ["/..", "/seg/.", "/./seg"])
def test_prefix_with_a_dot_segment_is_rejected(prefix: str) -> None:
    with pytest.raises(ConfigError):
        build({"prefix": prefix})


def test_of_several_bad_values_the_same_one_is_reported_first() -> None:
    # One bad value per section: build() reads the sections in a fixed order, so fixing the
    # reported value always reveals the next one in that order.
    flat: dict[str, object] = {
        "admin.token": "too-short",
        "cache.script_ttl": -1,
        "limits.max_body_bytes": 0,
        "rate_limit.per_ip": -1,
        "forward.concurrency": 0,
        "queue.backend": "redis",
        "sources.write_keys": ["a bad key"],
        "upstream.region": "asia",
        "log_level": "loud",
        "listen": "8080",
    }
    reported = []
    while flat:
        key = error_of(flat).key
        reported.append(key)
        del flat[key]
    assert reported == [
        "listen",
        "log_level",
        "upstream.region",
        "sources.write_keys",
        "queue.backend",
        "forward.concurrency",
        "rate_limit.per_ip",
        "limits.max_body_bytes",
        "cache.script_ttl",
        "admin.token",
    ]


@pytest.mark.parametrize(
    ("toml", "fix"),
    [
        ('trusted_proxies = "10.0.0.0/8"\n', 'trusted_proxies = ["10.0.0.0/8"]'),
        (
            'public_hosts = "a.example.com, b.example.com"\n',
            'public_hosts = ["a.example.com", "b.example.com"]',
        ),
        ('[sources]\nwrite_keys = "wk_a"\n', 'write_keys = ["wk_a"] in [sources]'),
        ('[rate_limit]\nexempt_ips = "10.1.2.3"\n', 'exempt_ips = ["10.1.2.3"] in [rate_limit]'),
    ],
)
def test_a_string_where_the_file_needs_a_list_is_an_error_that_shows_the_fix(
    tmp_path: Path, toml: str, fix: str
) -> None:
    # A one-item list is not guessed: the operator may have meant something else entirely.
    with pytest.raises(ConfigError) as info:
        load(write_toml(tmp_path, toml), env={})
    assert f"expected a list of strings: {fix}" in str(info.value)
    assert info.value.variable is None


def test_the_same_list_from_the_environment_is_comma_separated_text() -> None:
    config = load(env={"SEGPROXY_TRUSTED_PROXIES": "10.0.0.0/8"})
    assert config.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)


def test_the_list_keys_are_the_schemas_lists() -> None:
    defaults = {"": Config(), **{s: getattr(Config(), s) for s in SECTIONS}}
    lists = []
    for key in KNOWN_KEYS:
        section, _, name = key.rpartition(".")
        if name == "listen" and not section:
            continue  # listen is parsed into listen_host and listen_port
        if isinstance(getattr(defaults[section], name), tuple | frozenset):
            lists.append(key)
    assert sorted(lists) == sorted(LIST_KEYS)


def test_a_check_between_keys_names_the_variable_that_set_the_other_one(tmp_path: Path) -> None:
    # SEGPROXY_TLS_CERT alone: the error is about tls.key, which the operator never wrote.
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError) as info:
        load(env={"SEGPROXY_TLS_CERT": str(cert)})
    assert "both tls.cert and tls.key" in str(info.value)
    assert "(see SEGPROXY_TLS_CERT in the environment)" in str(info.value)


def test_a_size_check_names_the_variable_that_lowered_the_bound() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"SEGPROXY_LIMITS_MAX_DECOMPRESSED_BYTES": "1000"})
    message = str(info.value)
    assert "at most limits.max_decompressed_bytes (1000)" in message
    assert "SEGPROXY_LIMITS_MAX_DECOMPRESSED_BYTES in the environment" in message


@pytest.mark.parametrize("size", [1024**2 - 1, 1024**3 + 1, 0])
def test_a_journal_segment_size_out_of_its_bounds_is_refused_with_them(size: int) -> None:
    error = error_of({"queue.journal_segment_bytes": size})
    assert error.key == "queue.journal_segment_bytes"
    assert "from 1048576 to 1073741824" in str(error)


def test_the_journal_segment_size_bounds_are_accepted() -> None:
    for size in (1024**2, 8 * 1024**2, 1024**3):
        assert build({"queue.journal_segment_bytes": size}).queue.journal_segment_bytes == size
