"""Suite-wide settings, loaded before any test module is imported.

Hypothesis profiles: the property tests must not fail because the machine is busy. Hypothesis'
timing checks (a 200 ms ``deadline`` per example, and ``HealthCheck.too_slow`` when generating
inputs takes over a second) fail a test on a loaded 2-core CI runner or laptop although nothing
is wrong with the code (issue 11, item 12: ``test_batcher.py::
test_every_row_lands_in_exactly_one_valid_batch`` failed with "input generation is slow").

The ``ci`` profile turns those two off, and nothing else: the checks that are about the tests
themselves (``filter_too_much``, ``data_too_large`` ...) stay on. It is the profile everywhere
(CI sets ``CI=true``; developers' machines are loaded too), and it keeps Hypothesis' random
exploration (unlike Hypothesis' own built-in ``ci`` profile, which derandomizes); a failure
prints the blob that reproduces it. ``HYPOTHESIS_PROFILE=default`` brings Hypothesis' own
timing checks back, for a quiet machine.

It must be loaded here, before the test modules: a ``@settings(...)`` decorator takes the
values it does not set from the profile active when its module is imported.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    # Hypothesis' defaults, not whatever is active: with CI set, Hypothesis has already loaded
    # its own "ci" profile by now, and ours replaces it.
    parent=settings.get_profile("default"),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
