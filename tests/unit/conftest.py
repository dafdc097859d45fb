"""Hypothesis settings for the property-based tests (tests/unit/test_fuzz_*.py).

The default profile, "ci", is deterministic (derandomize: the same examples on every run, no
example database) and bounded, so the suite's runtime and outcome do not vary between runs.
Explore further on demand with another profile, e.g.:

    HYPOTHESIS_PROFILE=explore python -m pytest --timeout=0 tests/unit -k fuzz
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis keeps caches (even without an example database) in ./.hypothesis: not in the tree.
set_hypothesis_home_dir(
    os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY") or os.path.join(tempfile.gettempdir(), "amqproxy-hypothesis")
)

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=60,
    deadline=None,  # a shared 2-core machine: time per example is not a property
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "explore",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
