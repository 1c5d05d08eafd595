"""Shared pytest configuration: the hypothesis profiles.

`simtune` (the default, used by `make test`): few examples, derandomized so a run is repeatable,
each example under a deadline. `fuzz` (`make fuzz`, HYPOTHESIS_PROFILE=fuzz): many random
examples, for hunting. A test's own `@settings(max_examples=...)` overrides the profile's.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("simtune", max_examples=25, deadline=10_000, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=300, deadline=60_000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "simtune"))
