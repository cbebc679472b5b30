"""Numerical references shared by the tests."""

import numpy as np


def central_difference(f, x, h=1e-6):
  """The gradient of a scalar NumPy function f at x by central differences, entry by entry."""
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (f(x + e) - f(x - e)) / (2 * h)
  return g
