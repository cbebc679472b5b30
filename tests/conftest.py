"""Global test configuration: 8 simulated CPU devices, set once, here; float64 only where asked.

Tests run as users do: JAX's default 32-bit mode. A test (or a module, through `pytestmark`) that
checks something in float64 (a finite difference, a closed form to 1e-12) says so with
`@pytest.mark.float64`; it then runs, set-up included, inside `enable_x64(True)`. Library code
never relies on either mode: it computes in the dtype it is given, and multi-device code runs on
however many devices exist.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from covrl._compat import enable_x64

# COVRL_TEST_X64=1 runs every test in float64 (the suite's mode before 32-bit became the default).
_ALL_X64 = os.environ.get("COVRL_TEST_X64") == "1"


def _in_mode(item):
  return enable_x64(_ALL_X64 or item.get_closest_marker("float64") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
  with _in_mode(item):
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
  with _in_mode(item):
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
  with _in_mode(item):
    yield
