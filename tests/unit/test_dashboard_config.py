"""``admin.dashboard``: where the live dashboard is served (docs/dashboard.md)."""

from __future__ import annotations

import pytest

from segproxy.config import ConfigError, build, load

TOKEN = "dashboard-config-token-0042"


@pytest.mark.parametrize(
    ("settings", "served", "public"),
    [
        ({}, False, False),  # auto, no operator listener: nowhere
        ({"admin.listen": "127.0.0.1:0"}, True, False),  # auto: on the operator listener
        ({"admin.dashboard": "on", "admin.token": TOKEN}, True, True),
        ({"admin.dashboard": "on", "admin.listen": "127.0.0.1:0"}, True, False),
        ({"admin.dashboard": "off", "admin.listen": "127.0.0.1:0"}, False, False),
    ],
)
def test_where_the_dashboard_is_served(
    settings: dict[str, object], served: bool, public: bool
) -> None:
    admin = build(settings).admin
    assert admin.dashboard_served is served
    assert admin.dashboard_public is public


def test_the_dashboard_setting_comes_from_its_environment_variable_too() -> None:
    config = load(env={"SEGPROXY_ADMIN_DASHBOARD": "off", "SEGPROXY_ADMIN_LISTEN": "127.0.0.1:0"})
    assert config.admin.dashboard == "off"
    with pytest.raises(ConfigError) as info:
        load(env={"SEGPROXY_ADMIN_DASHBOARD": "on"})  # public, and no token
    assert "SEGPROXY_ADMIN_DASHBOARD" in str(info.value) or "admin.dashboard" in str(info.value)
    assert "admin.token" in str(info.value)


def test_a_public_dashboard_without_a_token_is_refused_at_start_naming_both_keys() -> None:
    with pytest.raises(ConfigError) as info:
        build({"admin.dashboard": "on"})
    assert "admin.dashboard" in str(info.value)
    assert "admin.token" in str(info.value)
    assert build({"admin.dashboard": "on", "admin.token": TOKEN}).admin.dashboard_public
    with_listener = build({"admin.dashboard": "on", "admin.listen": "127.0.0.1:0"})
    assert not with_listener.admin.dashboard_public
    with pytest.raises(ConfigError, match=r"admin\.dashboard"):
        build({"admin.dashboard": "sometimes"})
