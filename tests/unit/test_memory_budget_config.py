"""``limits.max_buffered_bytes``: the memory budget for request bodies, as configured."""

from __future__ import annotations

import pytest

from segproxy.config import ConfigError, build, load


def test_the_budget_defaults_to_64_mib() -> None:
    assert load(env={}).limits.max_buffered_bytes == 64 * 1024 * 1024


def test_the_budget_is_read_from_the_environment() -> None:
    config = load(env={"SEGPROXY_LIMITS_MAX_BUFFERED_BYTES": "1048576"})
    assert config.limits.max_buffered_bytes == 1024 * 1024


def test_a_budget_smaller_than_one_body_is_refused_naming_both_limits() -> None:
    with pytest.raises(ConfigError) as info:
        build({"limits.max_buffered_bytes": 1000, "limits.max_body_bytes": 2000})
    assert "limits.max_buffered_bytes" in str(info.value)
    assert "limits.max_body_bytes" in str(info.value)


def test_a_budget_of_exactly_one_body_is_accepted() -> None:
    config = build({"limits.max_buffered_bytes": 2000, "limits.max_body_bytes": 2000})
    assert config.limits.max_buffered_bytes == 2000
