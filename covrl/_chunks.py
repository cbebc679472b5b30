"""Chunking for covrl.vocab: input checks, the token and vocabulary chunks, streaming helpers.

Private to covrl.vocab (whose docstring explains the computation). A call is planned once
(`make_plan`: n tokens in nt chunks of tc, V entries in chunks of vc); its token axis is
flattened, masked, padded and cut into strided chunks (`prepare`); `vocab_loop` runs a body over
slices of the output layer, and `logits` and `rescale` are the two steps every body shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from covrl import _checks


class Plan(NamedTuple):
  """Static chunking of a call: n tokens in nt chunks of tc, V entries in chunks of vc."""

  n: int
  tc: int
  nt: int
  vocab: int
  vc: int


class Inputs(NamedTuple):
  """The token axis flattened, masked, padded and cut into [nt, tc] chunks."""

  hidden: jax.Array  # [nt, tc, D], 0 at invalid positions
  tokens: jax.Array  # [nt, tc], 0 at invalid positions
  valid: jax.Array  # [nt, tc] bool


# ----------------------------------------------------------------------------------------------
# Checks


def positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


def check_inputs(hidden, kernel, tokens, bias, mask, vocab_mask, temperature):
  """Shape and dtype checks (trace time); returns the arrays as jax arrays, masks as bool."""
  hidden = _checks.check_float_array("hidden", hidden)
  kernel = _checks.check_float_array("kernel", kernel)
  if hidden.ndim < 1:
    raise ValueError(f"hidden must be [..., D], got shape {hidden.shape}.")
  if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
    raise ValueError(f"kernel must be [D, V] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                     f"got shape {kernel.shape}.")
  if kernel.shape[1] < 1:
    raise ValueError(f"kernel must have a vocabulary axis of size >= 1, got {kernel.shape}.")
  lead, vocab = hidden.shape[:-1], kernel.shape[1]
  if tokens is not None:
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
    if tokens.shape != lead:
      raise ValueError(f"tokens must have hidden's leading shape {lead}, got {tokens.shape}.")
  if bias is not None:
    bias = _checks.check_float_array("bias", bias)
    if bias.shape != (vocab,):
      raise ValueError(f"bias must be [V] = ({vocab},), got shape {bias.shape}.")
  if mask is not None:
    if jnp.shape(mask) != lead:
      raise ValueError(f"mask must have hidden's leading shape {lead}, got {jnp.shape(mask)}.")
    mask = as_mask("mask", mask)
  if vocab_mask is not None:
    if jnp.shape(vocab_mask) != (vocab,):
      raise ValueError(f"vocab_mask must be [V] = ({vocab},), got {jnp.shape(vocab_mask)}.")
    vocab_mask = as_mask("vocab_mask", vocab_mask)
  _checks.check_positive("temperature", temperature)
  if jnp.ndim(temperature) != 0:
    raise ValueError(f"temperature must be a scalar, got shape {jnp.shape(temperature)}.")
  check_values(tokens, mask, vocab_mask, vocab)
  return hidden, kernel, tokens, bias, mask, vocab_mask


def as_mask(name: str, mask) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.dtype == jnp.bool_:
    return mask
  if not (jnp.issubdtype(mask.dtype, jnp.integer) or jnp.issubdtype(mask.dtype, jnp.floating)):
    raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}.")
  if _checks.is_concrete(mask) and not on_device(lambda: jnp.all((mask == 0) | (mask == 1))):
    raise ValueError(f"{name} must contain only 0 and 1.")
  return mask != 0


def on_device(fn: Callable[[], jax.Array]) -> int:
  """A reduction of concrete arrays, evaluated now (also while tracing an outer jit) and read
  back as one Python int: value checks cost a scalar transfer, never a copy of the array."""
  with jax.ensure_compile_time_eval():
    return int(fn())


def check_values(tokens, mask, vocab_mask, vocab: int) -> None:
  """Value checks on concrete inputs (skipped for tracers)."""
  if vocab_mask is not None and _checks.is_concrete(vocab_mask) and not on_device(
      lambda: jnp.any(vocab_mask)):
    raise ValueError("vocab_mask is False everywhere: the policy is undefined.")
  if tokens is None or not _checks.is_concrete(tokens) or (
      mask is not None and not _checks.is_concrete(mask)):
    return

  count = on_device(lambda: jnp.sum(_checks.outside_vocab(tokens, vocab, mask)))
  if count:
    raise ValueError(f"tokens has {count} id(s) outside [0, {vocab}) at valid positions.")


def make_plan(lead: tuple[int, ...], vocab: int, token_chunk: int, vocab_chunk: int) -> Plan:
  n = math.prod(lead)
  tc = max(1, min(positive_int("token_chunk", token_chunk), n))
  vc = min(positive_int("vocab_chunk", vocab_chunk), vocab)
  return Plan(n=n, tc=tc, nt=-(-n // tc), vocab=vocab, vc=vc)


# ----------------------------------------------------------------------------------------------
# Chunking


def to_chunks(plan: Plan, x: jax.Array) -> jax.Array:
  """[n, ...] -> [nt, tc, ...], padded with zeros. Chunk j holds tokens j, j + nt, j + 2 nt...:
  a token axis sharded in contiguous blocks then puts the same share of each device's tokens in
  every chunk, so the loop over chunks runs on all devices at once."""
  pad = plan.nt * plan.tc - plan.n
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(plan.tc, plan.nt, *x.shape[1:]).swapaxes(0, 1)


def from_chunks(plan: Plan, x: jax.Array, lead: tuple[int, ...]) -> jax.Array:
  """Inverse of `to_chunks`: [nt, tc, ...] -> lead + [...]."""
  x = x.swapaxes(0, 1).reshape(plan.nt * plan.tc, *x.shape[2:])[: plan.n]
  return x.reshape(*lead, *x.shape[1:])


def prepare(plan: Plan, hidden, tokens, mask) -> Inputs:
  d = hidden.shape[-1]
  h = hidden.reshape(plan.n, d)
  valid = jnp.ones((plan.n,), bool) if mask is None else mask.reshape(plan.n)
  # Invalid positions may hold anything (NaN included): zeros keep it out of the matmuls, the
  # values and the gradients.
  h = jnp.where(valid[:, None], h, jnp.zeros((), h.dtype))
  y = jnp.zeros((plan.n,), jnp.int32) if tokens is None else jnp.where(
      valid, tokens.reshape(plan.n).astype(jnp.int32), 0)
  return Inputs(to_chunks(plan, h), to_chunks(plan, y), to_chunks(plan, valid))


class VocabChunk(NamedTuple):
  """A slice [start, start + size) of the output layer."""

  start: jax.Array | int
  kernel: jax.Array  # [D, size]
  bias: jax.Array | None  # [size]
  mask: jax.Array | None  # [size] bool
  extra: tuple  # slices of further [D, V] / [V] arrays (tangents), same window


def vocab_slices(plan: Plan, kernel, bias, vocab_mask, extra=()):
  """(slice function, number of full chunks, size of the remainder chunk)."""
  full, rem = divmod(plan.vocab, plan.vc)

  def take(start, size) -> VocabChunk:
    cut = lambda a, axis: None if a is None else lax.dynamic_slice_in_dim(a, start, size, axis)
    return VocabChunk(start, cut(kernel, 1), cut(bias, 0), cut(vocab_mask, 0),
                  tuple(cut(a, a.ndim - 1) for a in extra))

  return take, full, rem


def vocab_loop(plan: Plan, body: Callable, carry, kernel, bias, vocab_mask, extra=()):
  """carry = body(carry, chunk) over the vocabulary chunks: a scan over the full ones, then the
  remainder (static shapes throughout; the output layer is sliced, never padded or copied)."""
  take, full, rem = vocab_slices(plan, kernel, bias, vocab_mask, extra)
  if full == 1:
    carry = body(carry, take(0, plan.vc))
  elif full > 1:
    carry, _ = lax.scan(lambda c, j: (body(c, take(j * plan.vc, plan.vc)), None), carry,
                        jnp.arange(full))
  if rem:
    carry = body(carry, take(full * plan.vc, rem))
  return carry


def zeros(shape, dtype, *refs) -> jax.Array:
  """Zeros of `shape` that vary over the same `shard_map` axes as `refs` together.

  A loop's initial carry must have the type of what its body returns, and inside `shard_map`
  that type records the mesh axes a value varies over; zeros_like of each reference (a scalar,
  folded away by XLA) carries them over.
  """
  z = jnp.zeros(shape, dtype)
  for r in refs:
    if r is not None:
      z = z + jnp.zeros_like(r, dtype, shape=())
  return z


def vary_like(x: jax.Array | None, union: jax.Array) -> jax.Array | None:
  """x, made to vary over every `shard_map` axis that `union` (a scalar zero) varies over.

  Inside `shard_map` a replicated kernel meets sharded hidden states; the custom VJP's kernel
  cotangent then varies over the token axis, and JAX requires it to have the kernel's type.
  Adding the zero promotes the kernel first, and the transpose of that promotion sums the
  per-device cotangents (a psum), as autodiff does for any other op. Outside `shard_map`, or
  when x varies already, nothing is added.
  """
  if x is None:
    return None
  probe = jnp.zeros_like(x, shape=())
  if jax.typeof(probe + union.astype(x.dtype)) == jax.typeof(probe):
    return x
  return x + union.astype(x.dtype)


def logits(h: jax.Array, chunk: VocabChunk, temperature: jax.Array, dtype) -> jax.Array:
  """z = (h W + b) / tau on one chunk, accumulated in `dtype`; -inf at masked entries."""
  z = jnp.dot(h, chunk.kernel, preferred_element_type=dtype).astype(dtype)
  if chunk.bias is not None:
    z = z + chunk.bias.astype(dtype)
  z = z / temperature
  if chunk.mask is not None:
    z = jnp.where(chunk.mask, z, -jnp.inf)
  return z


def rescale(m_old: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """New running max over a chunk: (shift, exp(m_old - shift), m_old - shift), all finite.

  While every entry seen so far is -inf the shift is 0 and the old sums (all 0) get weight 0;
  this keeps -inf - (-inf) out of the arithmetic, in values and in gradients alike.
  """
  m_new = jnp.maximum(m_old, jnp.max(z, axis=-1))
  shift = jnp.where(m_new > -jnp.inf, m_new, 0.0)
  seen = m_old > -jnp.inf
  delta = jnp.where(seen, m_old - shift, 0.0)
  return shift, jnp.where(seen, jnp.exp(delta), 0.0), delta
