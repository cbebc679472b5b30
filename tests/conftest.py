"""Global test configuration: 8 simulated CPU devices, set once, here; float64 only where asked.

Tests run as users do: JAX's default 32-bit mode. A test (or a module, through `pytestmark`) that
checks something in float64 (a finite difference, a closed form to 1e-12) says so with
`@pytest.mark.float64`; it then runs, set-up included, inside `enable_x64(True)`. Library code
never relies on either mode: it computes in the dtype it is given, and multi-device code runs on
however many devices exist.
"""

import os

# 8 simulated devices. (Turning LLVM's costlier passes off saved about 10% of the suite's time,
# but on JAX 0.12 it changed float32 round-off between sharded and one-device programs beyond
# test_meshes' tolerance, so the tests compile as users do.)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Each pytest-xdist worker on a core of its own (before JAX starts its CPU client): the tests'
# programs are small, XLA's intra-op threads do not speed them up, and two workers whose threads
# share both cores slow each other down.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
  _cores = sorted(os.sched_getaffinity(0))
  if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) <= len(_cores):
    os.sched_setaffinity(0, {_cores[int(_WORKER[2:]) % len(_cores)]})

import pytest  # noqa: E402 (after the environment above)

from covrl._compat import enable_x64  # noqa: E402

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
