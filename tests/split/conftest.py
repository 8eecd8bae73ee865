"""Hypothesis profiles of the property tests (``test_drawn_configs.py``), registered before pytest loads one.

``ci`` (the default): a few fixed examples per class, derandomized, so the suite's time
and result do not vary. ``long``: many random draws (``--hypothesis-profile=long
--timeout=0``: a class's 40 draws take longer than pytest-timeout's 600 s; see the README's
testing paragraph). Given on the command line, the profile must be registered before
pytest configures hypothesis: name this file's folder or a test in it.
"""

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
               print_blob=True)
settings.register_profile("ci", max_examples=2, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=40, **_COMMON)
settings.load_profile("ci")
