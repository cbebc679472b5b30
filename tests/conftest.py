"""Global test configuration: 8 simulated CPU devices and 64-bit floats, set once, here.

Library code never relies on these flags: it computes in the dtype it is given (float32 by
default, float64 when a test asks for it), and multi-device code runs on however many devices
exist. Tests that need float32 pass float32 arrays explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_enable_x64", True)
