"""Bandit problems for the tabular theory lab: K-armed and contextual, with reward noise.

A bandit here is a frozen description (a config), validated when it is built: the dynamics in
`covrl.tabular` compile against it. Mean rewards are a [S, K] table (S = 1 for a K-armed
bandit); a state s is drawn from `state_probs`, the policy picks an action a, and the reward is

  deterministic   r(s, a)                       (the mean itself)
  bernoulli       1 with probability r(s, a)     (means must lie in [0, 1])
  gaussian        r(s, a) + noise_scale * N(0, 1)

The theory of THEORY.md T2 is stated for the mean rewards; noise only enters sampled dynamics.

Hard cases from the literature:
  * `mei_bad_start()`: Mei et al. (2020), Section 3's example of a slow start for softmax
    policy gradient, r = (1, 0.9, 0.1) and pi_0 = (0.01, 0.05, 0.94).

References:
  J. Mei, C. Xiao, C. Szepesvari, D. Schuurmans, On the Global Convergence Rates of Softmax
  Policy Gradient Methods, ICML 2020, arXiv:2005.06392.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Noise = Literal["deterministic", "bernoulli", "gaussian"]
NOISES: tuple[str, ...] = ("deterministic", "bernoulli", "gaussian")


def _as_table(means) -> tuple[tuple[float, ...], ...]:
  table = np.asarray(means, dtype=np.float64)
  if table.ndim == 1:
    table = table[None, :]
  if table.ndim != 2:
    raise ValueError(f"means must be [K] or [S, K], got shape {table.shape}.")
  return tuple(tuple(float(v) for v in row) for row in table)


@dataclasses.dataclass(frozen=True)
class Bandit:
  """A (contextual) bandit: mean rewards, reward noise and a state distribution.

  Attributes:
    means: [K] or [S, K] mean rewards (stored as a [S, K] tuple table; S = 1 for K arms).
    noise: "deterministic", "bernoulli" or "gaussian".
    noise_scale: standard deviation of the Gaussian noise (> 0 for "gaussian").
    state_probs: [S] probabilities of the states (uniform when None); each > 0.

  Example:
    >>> from covrl.tabular import bandits
    >>> b = bandits.Bandit((1.0, 0.9, 0.1))
    >>> b.num_states, b.num_actions, b.optimal_value
    (1, 3, 1.0)
  """

  means: tuple[tuple[float, ...], ...]
  noise: Noise = "deterministic"
  noise_scale: float = 1.0
  state_probs: tuple[float, ...] | None = None

  def __post_init__(self):
    table = _as_table(self.means)
    object.__setattr__(self, "means", table)
    values = np.asarray(table)
    if values.shape[1] < 2:
      raise ValueError(f"a bandit needs K >= 2 actions, got K = {values.shape[1]}.")
    if not np.all(np.isfinite(values)):
      raise ValueError("mean rewards must be finite.")
    if self.noise not in NOISES:
      raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}.")
    if self.noise == "bernoulli" and not np.all((values >= 0) & (values <= 1)):
      raise ValueError("Bernoulli rewards need means in [0, 1].")
    if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
      raise ValueError(f"noise_scale must be finite and > 0, got {self.noise_scale!r}.")
    if self.state_probs is not None:
      probs = np.asarray(self.state_probs, dtype=np.float64)
      if probs.shape != (values.shape[0],):
        raise ValueError(f"state_probs must have shape ({values.shape[0]},), got {probs.shape}.")
      if not (np.all(np.isfinite(probs)) and np.all(probs > 0)
              and abs(probs.sum() - 1.0) < 1e-9):
        raise ValueError("state_probs must be positive and sum to 1.")
      object.__setattr__(self, "state_probs", tuple(float(p) for p in probs))

  @property
  def num_states(self) -> int:
    return len(self.means)

  @property
  def num_actions(self) -> int:
    return len(self.means[0])

  @property
  def contextual(self) -> bool:
    return self.num_states > 1

  @property
  def r(self) -> np.ndarray:
    """[S, K] mean rewards as a float64 NumPy array."""
    return np.asarray(self.means, dtype=np.float64)

  @property
  def rho(self) -> np.ndarray:
    """[S] state probabilities."""
    if self.state_probs is None:
      return np.full(self.num_states, 1.0 / self.num_states)
    return np.asarray(self.state_probs, dtype=np.float64)

  @property
  def optimal_value(self) -> float:
    """E_s max_a r(s, a), the value of an optimal policy."""
    return float(self.rho @ self.r.max(axis=1))


def sample_states(bandit: Bandit, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """States s ~ state_probs, int32 of `shape` (all 0 for a K-armed bandit)."""
  if not bandit.contextual:
    return jnp.zeros(shape, jnp.int32)
  logits = jnp.log(jnp.asarray(bandit.rho, jnp.float32))
  return jax.random.categorical(key, logits, shape=shape).astype(jnp.int32)


def sample_rewards(
    bandit: Bandit, key: jax.Array, states: jax.Array, actions: jax.Array, dtype=jnp.float32
) -> jax.Array:
  """Rewards of the (state, action) pairs, with the bandit's noise.

  Args:
    bandit: the problem.
    key: PRNG key (unused for deterministic rewards).
    states, actions: int arrays of one shape.
    dtype: floating dtype of the result.

  Returns:
    Rewards of the shape of `actions`.
  """
  means = jnp.asarray(bandit.r, dtype)[states, actions]
  if bandit.noise == "deterministic":
    return means
  if bandit.noise == "bernoulli":
    return jax.random.bernoulli(key, means).astype(dtype)
  return means + bandit.noise_scale * jax.random.normal(key, means.shape, dtype)


def random_bandit(
    seed: int,
    num_actions: int,
    num_states: int = 1,
    *,
    noise: Noise = "deterministic",
    noise_scale: float = 1.0,
) -> Bandit:
  """A random instance: means uniform on [0, 1], drawn with NumPy from `seed`.

  Instances are configs (they fix what gets compiled), so they are drawn on the host from an
  integer seed rather than from a JAX key.
  """
  if num_actions < 2:
    raise ValueError(f"a bandit needs K >= 2 actions, got {num_actions}.")
  if num_states < 1:
    raise ValueError(f"num_states must be >= 1, got {num_states}.")
  rng = np.random.default_rng(seed)
  means = rng.uniform(0.0, 1.0, size=(num_states, num_actions))
  return Bandit(_as_table(means), noise=noise, noise_scale=noise_scale)


def random_logits(seed: int, shape: Sequence[int], scale: float = 2.0) -> np.ndarray:
  """Random initial logits, Gaussian with standard deviation `scale` (host NumPy, float64)."""
  return np.random.default_rng(seed).normal(0.0, scale, size=tuple(shape))


def mei_bad_start() -> tuple[Bandit, np.ndarray]:
  """Mei et al. (2020)'s slow start: r = (1, 0.9, 0.1), pi_0 = (0.01, 0.05, 0.94).

  Returns:
    (bandit, initial logits [1, 3]) with softmax(initial logits) = pi_0.
  """
  return Bandit((1.0, 0.9, 0.1)), np.log(np.array([[0.01, 0.05, 0.94]]))
