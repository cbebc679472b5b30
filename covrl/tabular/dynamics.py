"""One outer step of each tabular dynamic, with the control's strength as an argument.

The policy of a (contextual) bandit is a [S, K] table of logits z, pi_s = softmax(z_s).
`make_step(config)` returns `step(state, bits, strength=None, max_ratio=None) -> (state,
(selected_frac, clip_frac))`:

  dynamics="pg"          exact softmax policy gradient on J(z) = sum_s rho_s pi_s . r_s, plus
                         alpha H(pi_s) with an entropy bonus: dz = eta grad J.
  dynamics="npg"         natural PG: dz_s = eta (r_s - alpha log pi_s - E_pi[...]); with the
                         bonus this is z <- (1 - eta alpha) z + eta r up to a shift per state.
  dynamics="grpo_exact"  the expected GRPO update: dz_s = eta rho_s pi_s * w_s(pi) (+ bonus), with
                         w(pi) the exact expected group-normalised advantage (covrl.tabular.theory).
  dynamics="sampled"     N samples per step (N / G states, G actions each), advantages from
                         `advantage`, then `ppo_epochs` x `num_minibatches` SGD steps on
                         `covrl.policy_loss` of the config's control, the samples laid out as
                         [n, 1] tokens (KL-Cov acts from the second update on).

`strength` (a traced scalar, for a controller) replaces the control's strength at this step:
the bonus's entropy_coeff, KL-Cov's ppo_kl_coef or Clip-Cov's clip_cov_ratio (then `max_ratio`,
a static bound, sizes the selection). Otherwise the control's own values are used: its
coefficient is `hyper.coef` times the shape of its schedule (so a grid of coefficients is one
program), its ratio a Python number (verl's exact count) or, scheduled, a traced value, and any
other scheduled strength (a callable of the step: clip-higher's clip_ratio_high, forking
tokens' top_entropy_quantile, ...) its value at step t.

Sampled steps read their randomness from one row of uint32 `bits` (`draw_layout`); exact steps
take `bits=None`. `block_bits` draws the rows of a block of steps at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import covrl
from covrl.tabular import theory
from covrl.tabular.config import TabularConfig

StepOut = tuple[Any, tuple[jax.Array, jax.Array]]


class TrainState(NamedTuple):
  """Loop state: logits, PRNG key, outer step and hyperparameters."""

  logits: jax.Array
  key: jax.Array
  step: jax.Array
  hyper: Any  # covrl.tabular.config.Hyperparams


def records(config: TabularConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(optimality gap, pooled entropy, policy) of `logits`, exact (rho-weighted over states)."""
  r = jnp.asarray(config.bandit.r, logits.dtype)
  rho = jnp.asarray(config.bandit.rho, logits.dtype)
  pi = jax.nn.softmax(logits, axis=-1)
  # sum_s rho_s sum_a pi_s(a) Delta_s(a): no cancellation when the gap is tiny.
  gap = rho @ jnp.sum(pi * (jnp.max(r, axis=-1, keepdims=True) - r), axis=-1)
  return gap, rho @ covrl.entropy(logits), pi


def control_at(config: TabularConfig, t: jax.Array, hyper, strength: Any = None,
               max_ratio: float | None = None) -> covrl.Control:
  """The config's control with its numbers at outer step t (see the module docstring)."""
  control, dtype = config.control, config.jnp_dtype
  fields: dict[str, Any] = {}
  if control.coefficient_field is not None:
    fields[control.coefficient_field] = hyper.coef * config.coef_schedule.factor(t, dtype)
  if control.ratio_field is not None:
    ratio = config.ratio_schedule
    if ratio.power > 0:  # annealed: traced, with its first value as the static bound
      fields[control.ratio_field] = ratio(t)
      fields["max_ratio"] = float(ratio.init_value)
    else:
      fields[control.ratio_field] = float(ratio.init_value)
  field = control.strength
  if field is not None and field not in (control.coefficient_field, control.ratio_field) and (
      callable(getattr(control, field))):
    # Another scheduled strength (clip-higher's upper clip, forking tokens' quantile, ...):
    # its value at step t.
    fields[field] = control.value_of(field, t)
  if strength is not None:
    fields[control.strength] = strength
    if control.strength == control.ratio_field:
      if max_ratio is None:
        raise ValueError("a traced token ratio needs max_ratio (a static bound).")
      fields["max_ratio"] = max_ratio
  return control.replace(**fields)


def _exact_step(config: TabularConfig) -> Callable[..., StepOut]:
  r, rho = config.bandit.r, config.bandit.rho
  dtype = config.jnp_dtype
  normalize = config.advantage == "grpo"

  def step(state: TrainState, bits: Any = None, strength: Any = None,
           max_ratio: float | None = None) -> StepOut:
    del bits, max_ratio
    z, t, hyper = state.logits, state.step, state.hyper
    rr, rh = jnp.asarray(r, z.dtype), jnp.asarray(rho, z.dtype)
    eta = hyper.step_size * config.step_schedule.factor(t, dtype)
    control = control_at(config, t, hyper, None if strength is None else
                         jnp.asarray(strength, z.dtype))
    alpha = control.bonus_coefficient()
    alpha = jnp.zeros((), z.dtype) if alpha is None else alpha
    if config.dynamics == "pg":
      dz = rh[:, None] * theory.pg_logit_gradient(z, rr, alpha)
    elif config.dynamics == "npg":
      soft = rr - alpha * jax.nn.log_softmax(z)
      dz = soft - jnp.sum(jax.nn.softmax(z) * soft, axis=-1, keepdims=True)
    else:
      pi = jax.nn.softmax(z)
      w = jax.vmap(lambda p, q: theory.grpo_expected_advantages(
          p, q, config.group_size, noise=config.bandit.noise, normalize_std=normalize))(pi, rr)
      dz = rh[:, None] * pi * w + jax.grad(lambda z: alpha * (rh @ covrl.entropy(z)))(z)
    new = state._replace(logits=z + eta * dz, step=t + 1)
    zero = jnp.zeros((), z.dtype)
    return new, (zero, zero)

  return step


def advantages(config: TabularConfig, rewards, states, logits) -> jax.Array:
  """The advantages of the config's `advantage` rule for sampled (state, reward) pairs."""
  groups = (config.num_samples // config.group_size, config.group_size)
  if config.advantage == "reward":
    return rewards
  if config.advantage == "baseline":
    r = jnp.asarray(config.bandit.r, logits.dtype)
    value = jnp.sum(jax.nn.softmax(logits) * r, axis=-1)
    return rewards - value[states]
  normalize = config.advantage == "grpo"
  return covrl.grpo_advantages(rewards.reshape(groups), normalize_std=normalize).reshape(-1)


class DrawLayout(NamedTuple):
  """Where each random number of one sampled step sits in its row of uniform bits."""

  num_bits: int
  states: slice
  actions: slice
  rewards: slice
  order: slice
  key: slice


def draw_layout(config: TabularConfig) -> DrawLayout:
  """The layout of one sampled step's row of random bits."""
  n, g = config.num_samples, config.group_size
  shuffled = config.ppo_epochs * config.num_minibatches > 1
  sizes = [n // g, n, n, config.ppo_epochs * n if shuffled else 0, 2]
  ends = np.cumsum(sizes)
  starts = ends - np.asarray(sizes)
  return DrawLayout(int(ends[-1]), *(slice(int(a), int(b)) for a, b in zip(starts, ends)))


def block_bits(config: TabularConfig, key: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """(next key, bits) for one block of `record_every` steps; bits is None for exact dynamics."""
  if config.dynamics != "sampled":
    return key, None
  key, block_key = jax.random.split(key)
  bits = jax.random.bits(block_key, (config.record_every, draw_layout(config).num_bits),
                         jnp.uint32)
  return key, bits


def uniform(bits: jax.Array, dtype) -> jax.Array:
  """Uniforms strictly inside (0, 1) from uint32 bits (24 bits in float32, 32 in float64)."""
  if dtype == jnp.float64:
    return bits.astype(dtype) * 2.0**-32 + 2.0**-33
  return (bits >> 8).astype(dtype) * 2.0**-24 + 2.0**-25


def shuffle_order(bits: jax.Array, dtype) -> jax.Array:
  """The stable argsort of `uniform(bits, dtype)` along the last axis: a random order, as PPO
  shuffles a batch.

  One sort of packed integer keys (the uniform's rank in its top bits, the index in the low
  bits) instead of a sort of floats carrying the indices: on CPU the latter's comparator made
  the sort most of a sampled step's time. The key orders exactly as the float does, ties (equal
  floats) by index, so the order is the same. In float32 the uniform keeps 24 bits and rounds
  (bits >> 8) * 2^-24 + 2^-25 to 24 significant bits: below 1/2 it is exact, above it an odd
  value ties upward with the next even one (round half to even), which the key repeats. In
  float64 the 32 bits are exact.
  """
  n = bits.shape[-1]
  index_bits = max(int(n - 1).bit_length(), 1)
  index = jnp.arange(n, dtype=jnp.uint32)
  if dtype == jnp.float64:
    value_bits, key = 32, bits
  else:
    v = bits >> 8
    value_bits, key = 25, v + ((v >> 23) & v & 1)
  if value_bits + index_bits <= 32:
    packed = (key << index_bits) | index
    mask = jnp.uint32((1 << index_bits) - 1)
  elif jax.dtypes.canonicalize_dtype(jnp.uint64) == jnp.uint64:
    packed = (key.astype(jnp.uint64) << index_bits) | index.astype(jnp.uint64)
    mask = jnp.uint64((1 << index_bits) - 1)
  else:  # too many rows to pack into 32 bits without 64-bit JAX
    return jnp.argsort(uniform(bits, dtype), axis=-1)
  return (jnp.sort(packed, axis=-1) & mask).astype(jnp.int32)


def inverse_cdf(u: jax.Array, probs: jax.Array) -> jax.Array:
  """Index k with cdf_{k-1} <= u < cdf_k of each row of probs (a categorical draw)."""
  cdf = jnp.cumsum(probs, axis=-1)[..., :-1]
  return jnp.sum(u[..., None] >= cdf, axis=-1).astype(jnp.int32)


def _sampled_step(config: TabularConfig) -> Callable[..., StepOut]:
  """One outer step of sampled dynamics, given one row of random bits (see `draw_layout`).

  The random numbers of a whole block of steps are drawn at once, outside the step: a
  counter-based generator inlined once per block rather than several times per step keeps the
  compiled program small (compilation, not running, dominates these tiny problems).
  """
  dtype = config.jnp_dtype
  n, g = config.num_samples, config.group_size
  epochs, minibatches = config.ppo_epochs, config.num_minibatches
  size = n // minibatches
  layout = draw_layout(config)
  bandit = config.bandit
  # The bonus needs the logits; controls that read entropies get them from the logits too.
  with_logits = config.control.needs_logits or config.control.needs_entropy

  def sample(z, u):
    states = inverse_cdf(u[layout.states], jnp.asarray(bandit.rho, z.dtype))
    states = jnp.repeat(states, g)
    actions = inverse_cdf(u[layout.actions], jax.nn.softmax(z[states]))
    means = jnp.asarray(bandit.r, z.dtype)[states, actions]
    v = u[layout.rewards]
    if bandit.noise == "bernoulli":
      rewards = (v < means).astype(z.dtype)
    elif bandit.noise == "gaussian":
      rewards = means + bandit.noise_scale * jax.scipy.special.ndtri(v)
    else:
      rewards = means
    return states, actions, rewards

  def step(state: TrainState, bits: jax.Array, strength: Any = None,
           max_ratio: float | None = None) -> StepOut:
    z, t, hyper = state.logits, state.step, state.hyper
    u = uniform(bits, z.dtype)
    states, actions, rewards = sample(z, u)
    adv = lax.stop_gradient(advantages(config, rewards, states, z))
    old_lp = jax.nn.log_softmax(z)[states, actions]
    eta = hyper.step_size * config.step_schedule.factor(t, dtype)
    control = control_at(config, t, hyper, strength, max_ratio)
    mask = jnp.ones((size, 1), bool)
    # Clip-Cov's draw needs a key: a fresh one per step, built from two of the step's words.
    step_key = jax.random.wrap_key_data(bits[layout.key], impl="threefry2x32")

    def loss_fn(z, idx, key):
      s, a = states[idx], actions[idx]
      column = lambda x: x[:, None]
      new_lp = jax.nn.log_softmax(z)[s, a]
      loss, metrics = covrl.policy_loss(
          control, column(old_lp[idx]), column(new_lp), column(adv[idx]), mask, key=key,
          logits=z[s][:, None, :] if with_logits else None)
      return loss, (metrics["selected_frac"], metrics["clip_frac"])

    def update(z, inputs):
      idx, index = inputs
      key = jax.random.fold_in(step_key, index) if control.needs_key else None
      grads, fracs = jax.grad(loss_fn, has_aux=True)(z, idx, key)
      return z - eta * grads, fracs

    if epochs * minibatches > 1:
      # A fresh random order of the batch for every epoch (argsort of uniforms), as PPO shuffles.
      order = shuffle_order(bits[layout.order].reshape(epochs, n), z.dtype)
    else:
      order = jnp.arange(n)[None]
    batches = order.reshape(epochs * minibatches, size)
    if epochs * minibatches == 1:
      # No loop for a single update: under vmap over the strength (a controller evaluating
      # candidate updates) a scan would batch its whole body through the carried logits; called
      # directly, only what depends on the strength is batched.
      z, fracs = update(z, (batches[0], jnp.zeros((), jnp.int32)))
      selected, clipped = (f[None] for f in fracs)
    else:
      z, (selected, clipped) = lax.scan(update, z, (batches, jnp.arange(epochs * minibatches)))
    new = TrainState(z, state.key, t + 1, hyper)
    return new, (jnp.mean(selected).astype(z.dtype), jnp.mean(clipped).astype(z.dtype))

  return step


def make_step(config: TabularConfig) -> Callable[..., StepOut]:
  """`step(state, bits, strength=None, max_ratio=None) -> (state, (selected, clip_frac))`."""
  return _sampled_step(config) if config.dynamics == "sampled" else _exact_step(config)
