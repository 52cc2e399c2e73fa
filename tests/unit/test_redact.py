"""Write keys never appear whole in logs or operator output."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from segproxy.redact import mask, redact_path

KEYS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
    min_size=9,
    max_size=64,
)


@settings(max_examples=200, deadline=None)
@given(KEYS)
def test_a_masked_key_never_contains_the_key(key: str) -> None:
    assert key not in mask(key)


def test_keys_sharing_a_prefix_stay_apart() -> None:
    assert mask("wk_shop_eu_1") != mask("wk_shop_us_2")
    assert mask("wk_shop_eu_1").startswith("wk_sho…")


@settings(max_examples=200, deadline=None)
@given(KEYS)
def test_cdn_paths_are_redacted(key: str) -> None:
    for path in (
        f"/analytics.js/v1/{key}/analytics.min.js",
        f"/v1/projects/{key}/settings",
        f"/projects/{key}/settings",
    ):
        redacted = redact_path(path)
        assert key not in redacted
        assert mask(key) in redacted


def test_paths_without_keys_are_unchanged() -> None:
    path = "/analytics-next/bundles/ajs-destination.bundle.40628baed746e9904edc.js"
    assert redact_path(path) == path
