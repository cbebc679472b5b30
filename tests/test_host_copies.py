"""Eager calls validate on the device: at most a few scalars come back to the host.

A conversion of a device array to host memory goes through the array's host value (float(),
bool(), .item(), .tolist(), and np.asarray where the buffer protocol does not apply) or through
np.asarray / np.array (which on CPU may read the buffer directly): the test records the size of
each one during eager calls of the public functions on a realistic [B, T, V] input, and fails
above a few scalars per call.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import covrl
from covrl import controllers

B, T, V = 8, 64, 2048  # 1M logits: a host copy of them would be ~2^20 elements
MAX_ELEMENTS_PER_CALL = 16

try:
  from jax._src.array import ArrayImpl
except ImportError:  # pragma: no cover - a JAX without this internal
  ArrayImpl = None


@contextlib.contextmanager
def recorded_host_copies():
  """Yield a list that receives the size of every device array read back to the host."""
  sizes: list[int] = []
  original = ArrayImpl._value
  converters = {name: getattr(np, name) for name in ("asarray", "array")}
  inside: list[bool] = []  # np.asarray of a jax.Array reads _value: count it once

  def value(self):
    if not inside:
      sizes.append(int(self.size))
    return original.fget(self)

  def converter(fn):
    def convert(x, *args, **kwargs):
      if isinstance(x, jax.Array) and not inside:
        sizes.append(int(x.size))
        inside.append(True)
        try:
          return fn(x, *args, **kwargs)
        finally:
          inside.pop()
      return fn(x, *args, **kwargs)
    return convert

  ArrayImpl._value = property(value)
  for name, fn in converters.items():
    setattr(np, name, converter(fn))
  try:
    yield sizes
  finally:
    ArrayImpl._value = original
    for name, fn in converters.items():
      setattr(np, name, fn)


def inputs():
  key = jax.random.key(0)
  k = jax.random.split(key, 6)
  old = -jax.random.exponential(k[0], (B, T))
  new = old + 0.1 * jax.random.normal(k[1], (B, T))
  adv = jax.random.normal(k[2], (B, T))
  mask = (jax.random.uniform(k[3], (B, T)) > 0.1).astype(jnp.float32)
  logits = jax.random.normal(k[4], (B, T, V))
  dz = 0.01 * jax.random.normal(k[5], (B, T, V))
  return jax.block_until_ready((old, new, adv, mask, logits, dz))


CALLS = {
    "policy_loss EntropyBonus": lambda o, n, a, m, z, d: covrl.policy_loss(
        covrl.EntropyBonus(0.01), o, n, a, m, logits=z, logit_update=d),
    "kl_cov_loss": lambda o, n, a, m, z, d: covrl.kl_cov_loss(o, n, a, m),
    "clip_cov_loss": lambda o, n, a, m, z, d: covrl.clip_cov_loss(o, n, a, m,
                                                                  key=jax.random.key(1)),
    "ppo_loss": lambda o, n, a, m, z, d: covrl.ppo_loss(o, n, a, m, logits=z),
    "entropy_bonus_loss": lambda o, n, a, m, z, d: covrl.entropy_bonus_loss(z, m, coef=0.1),
    "entropy": lambda o, n, a, m, z, d: covrl.entropy(z),
    "entropy_grad": lambda o, n, a, m, z, d: covrl.entropy_grad(z),
    "entropy_change": lambda o, n, a, m, z, d: covrl.entropy_change(z, d),
    "entropy_change_second_order": lambda o, n, a, m, z, d: covrl.entropy_change_second_order(
        z, d),
    "pooled_entropy": lambda o, n, a, m, z, d: covrl.pooled_entropy(z, m),
    "pooled_entropy_change": lambda o, n, a, m, z, d: covrl.pooled_entropy_change(z, d, m),
    "token_covariance": lambda o, n, a, m, z, d: covrl.token_covariance(n, a, m),
    "kl_cov_select": lambda o, n, a, m, z, d: covrl.kl_cov_select(n * a, m, ratio=0.01),
    "clip_cov_select": lambda o, n, a, m, z, d: covrl.clip_cov_select(
        n * a, m, key=jax.random.key(2), ratio=0.01, lb=0.0, ub=5.0),
    "aggregate": lambda o, n, a, m, z, d: covrl.aggregate(n, m, "seq-mean-token-mean"),
    "policy_tokens": lambda o, n, a, m, z, d: covrl.policy_tokens(o, n, a, m),
    "grpo_advantages": lambda o, n, a, m, z, d: covrl.grpo_advantages(a),
}


@pytest.mark.skipif(ArrayImpl is None, reason="this JAX has no jax._src.array.ArrayImpl")
@pytest.mark.parametrize("name", list(CALLS))
def test_eager_call_copies_at_most_a_few_scalars(name):
  args = inputs()
  jax.block_until_ready(CALLS[name](*args))  # warm up (compilation may convert constants)
  with recorded_host_copies() as sizes:
    out = CALLS[name](*args)
  jax.block_until_ready(out)
  assert sum(sizes) <= MAX_ELEMENTS_PER_CALL, (name, sizes)


@pytest.mark.skipif(ArrayImpl is None, reason="this JAX has no jax._src.array.ArrayImpl")
def test_transform_and_controller_updates_copy_at_most_a_few_scalars():
  z = jax.random.normal(jax.random.key(0), (64, V))
  g = jax.random.normal(jax.random.key(1), (64, V))
  tx = covrl.transform(covrl.EntropyBonus(0.1))
  ctl = controllers.predictive(1.0, vocab_size=V, coef_range=(0.0, 1.0))
  opt = controllers.controlled_entropy_bonus(ctl, optax.sgd(0.1))
  s1, s2 = tx.init(z), opt.init(z)
  jax.block_until_ready((tx.update(g, s1, z), opt.update(g, s2, z)))
  with recorded_host_copies() as sizes:
    jax.block_until_ready((tx.update(g, s1, z), opt.update(g, s2, z)))
  assert sum(sizes) <= 2 * MAX_ELEMENTS_PER_CALL, sizes


@pytest.mark.skipif(ArrayImpl is None, reason="this JAX has no jax._src.array.ArrayImpl")
def test_the_recorder_sees_a_full_copy():
  x = jnp.ones((B, T))
  with recorded_host_copies() as sizes:
    np.asarray(x + 1)
  assert sum(sizes) == B * T
