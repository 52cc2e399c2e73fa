"""The suite itself: property tests do not fail because the machine running them is busy.

tests/conftest.py loads the "ci" Hypothesis profile for the whole suite (issue 11, item 12).
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit import test_batcher

pytestmark = pytest.mark.skipif(
    os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci",
    reason="HYPOTHESIS_PROFILE asks for another profile on purpose",
)


def test_property_tests_run_without_timing_checks() -> None:
    active = settings.default
    assert active is not None
    assert active.deadline is None
    assert HealthCheck.too_slow in active.suppress_health_check
    # The checks about the tests themselves stay on.
    assert HealthCheck.filter_too_much not in active.suppress_health_check


def test_a_property_tests_own_settings_keep_the_profiles_timing_choices() -> None:
    # It failed on a busy 2-core machine with "input generation is slow" (HealthCheck.too_slow).
    test = test_batcher.test_every_row_lands_in_exactly_one_valid_batch
    own: settings = test._hypothesis_internal_use_settings  # type: ignore[attr-defined]
    assert own.max_examples == 200  # what the test asks for itself
    assert own.deadline is None
    assert HealthCheck.too_slow in own.suppress_health_check


def _slow(value: int) -> int:
    # Generating each input takes 0.15 s, as it can on a loaded machine: the elapsed time is
    # the condition under test (10 inputs take over the 1 s that HealthCheck.too_slow allows).
    time.sleep(0.15)
    return value


def test_a_property_test_whose_inputs_are_slow_to_generate_still_runs() -> None:
    seen: list[int] = []

    @settings(max_examples=10, database=None)
    @given(st.integers(min_value=0, max_value=1000).map(_slow))
    def slow_property(n: int) -> None:
        seen.append(n)
        assert 0 <= n <= 1000

    slow_property()
    assert len(seen) >= 10
