"""Input validation shared by the public functions.

Two kinds of checks live here. Shape and dtype checks run at trace time, so a bad call fails
before anything is compiled. Value checks (a ratio outside [0, 1], a mask that is not 0/1, a NaN)
can only run on concrete values: they run when the value is a Python number or a concrete array
and are skipped for tracers, where the losses report the same conditions through their metrics.

Value checks on arrays reduce on the array's own device and bring back one scalar flag (a few
more scalars only when the check fails, for the message): an eager call on a [B, T, V] array on an
accelerator never copies the array to the host.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when `x` holds a value now (not a tracer inside jit, grad or vmap).

  A concrete array that a jitted function closes over is concrete: checks on it evaluate it
  with `jax.ensure_compile_time_eval()` (else jnp would stage their reductions into the trace).
  """
  return not isinstance(x, jax.core.Tracer)


def concrete_float(x: Any) -> float | None:
  """`x` as a Python float when it is a concrete scalar, else None (lenient: see `number`)."""
  if isinstance(x, numbers.Real):
    return float(x)
  if is_concrete(x) and hasattr(x, "shape") and np.ndim(x) == 0:
    try:
      return float(x)
    except TypeError:  # pragma: no cover - abstract values without a concrete buffer
      return None
  return None


def _real(name: str, value: Any) -> tuple[Any, Any]:
  """(shape, dtype) of a real number or array; TypeError naming `name` for anything else."""
  if isinstance(value, bool | np.bool_):
    raise TypeError(f"{name} must be a real number, got the bool {value!r}.")
  if isinstance(value, numbers.Real):
    return (), None
  shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"{name} must be a real number, got an array of dtype {dtype}.")
  return tuple(shape), dtype


def number(name: str, value: Any) -> float | None:
  """A scalar hyperparameter as a Python float when concrete, None when traced.

  The one type check of covrl's numeric hyperparameters. It accepts a Python int or float, a
  NumPy scalar, and a zero-dimensional NumPy or JAX array of an integer or floating dtype
  (concrete or traced). It raises TypeError naming `name` for anything else (a string such as
  "0.2", None, a bool, a complex number, an object) and ValueError for an array with a shape (a
  [T] value where a scalar belongs would broadcast silently); the shape is known under jit too,
  so that error is raised when tracing. NaN and inf pass here: the range checks refuse them.
  """
  shape, _ = _real(name, value)
  if shape:
    raise ValueError(f"{name} must be a scalar, got an array of shape {shape}.")
  if not is_concrete(value):
    return None
  with jax.ensure_compile_time_eval():  # a concrete array closed over by a jit
    return float(value)


def _values(name: str, value: Any) -> np.ndarray | None:
  """The concrete values of a real number or array (float64, flat), None when traced; the
  types `_real` refuses raise. Arrays are allowed here: some functions take one value per case
  (`covrl.tabular.theory`'s alpha); the control values' fields are scalars (`number`)."""
  _real(name, value)
  if not is_concrete(value):
    return None
  with jax.ensure_compile_time_eval():
    return np.asarray(value, np.float64).ravel()


def _check_range(name: str, value: Any, ok: Any, rule: str) -> None:
  v = _values(name, value)
  if v is None:
    return
  bad = ~ok(v)
  if bad.any():
    first = float(v[np.argmax(bad)])
    raise ValueError(f"{name} must be {rule}, got {first!r}.")


def check_fraction(name: str, value: Any, *, allow_zero: bool = True) -> None:
  """Raise unless `value` (a real number or array, `_real`) lies in [0, 1] (or (0, 1] without
  `allow_zero`) when concrete."""
  low = (lambda v: v >= 0.0) if allow_zero else (lambda v: v > 0.0)
  interval = "[0, 1]" if allow_zero else "(0, 1]"
  _check_range(name, value, lambda v: low(v) & (v <= 1.0), f"a fraction in {interval}")


def check_nonnegative(name: str, value: Any) -> None:
  """Raise unless `value` (a real number or array) is finite and >= 0 when concrete."""
  _check_range(name, value, lambda v: np.isfinite(v) & (v >= 0.0), "finite and >= 0")


def check_positive(name: str, value: Any) -> None:
  """Raise unless `value` (a real number or array) is finite and > 0 when concrete."""
  _check_range(name, value, lambda v: np.isfinite(v) & (v > 0.0), "finite and > 0")


def check_float_array(name: str, x: Any) -> jax.Array:
  """Return `x` as a jax array, raising TypeError unless it has a floating dtype."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {x.dtype}.")
  return x


def check_same_shape(names: tuple[str, ...], arrays: tuple[Any, ...], rank: int | None = None):
  """Raise ValueError unless all arrays share one shape (and, optionally, a rank)."""
  shapes = [tuple(jnp.shape(a)) for a in arrays]
  if rank is not None:
    for n, s in zip(names, shapes):
      if len(s) != rank:
        raise ValueError(f"{n} must have rank {rank} ([batch, time]), got shape {s}.")
  if any(s != shapes[0] for s in shapes):
    listing = ", ".join(f"{n}{s}" for n, s in zip(names, shapes))
    raise ValueError(f"shape mismatch: {listing}; all must be equal.")


def as_mask(name: str, mask: Any) -> jax.Array:
  """Return the mask as bool, raising for a non-0/1 concrete mask or a complex dtype."""
  mask = jnp.asarray(mask)
  if mask.dtype == jnp.bool_:
    return mask
  if not (jnp.issubdtype(mask.dtype, jnp.integer) or jnp.issubdtype(mask.dtype, jnp.floating)):
    raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}.")
  if is_concrete(mask):
    with jax.ensure_compile_time_eval():  # also when a jit closes over the concrete mask
      bad = (mask != 0) & (mask != 1)
      if bool(jnp.any(bad)):  # one scalar to the host; a few more for the message
        examples = [mask.ravel()[int(i)].item() for i in jnp.flatnonzero(
            bad.ravel(), size=3, fill_value=-1) if i >= 0]
        raise ValueError(f"{name} must contain only 0 and 1, found values such as {examples}.")
  return mask != 0


def check_finite_where(name: str, x: jax.Array, mask: jax.Array) -> None:
  """Raise ValueError if a concrete `x` has a NaN or inf where `mask` is set."""
  if is_concrete(x) and is_concrete(mask):
    # Evaluated now even inside an outer jit that closes over x and mask (else jnp would stage
    # the reduction and int() would fail on a tracer).
    with jax.ensure_compile_time_eval():
      bad = jnp.asarray(mask, bool) & ~jnp.isfinite(x)
      count = int(jnp.sum(bad))  # one scalar to the host; the index only when it fails
      where = count and tuple(int(i) for i in jnp.unravel_index(jnp.argmax(bad.ravel()),
                                                                bad.shape))
    if count:
      raise ValueError(
          f"{name} has {count} non-finite value(s) at valid positions "
          f"(first at index {where}); mask them out or fix the input."
      )


def upcast(x: jax.Array) -> jax.Array:
  """Promote to at least float32 (bfloat16 and float16 in, float32 math)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def result_dtype(*arrays: jax.Array) -> jnp.dtype:
  """The float dtype math on these arrays runs in: their promotion, at least float32."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def check_weights(weights: Any, batch: int) -> jax.Array:
  """[B] population shares of the rows: a floating array of shape [batch], finite and >= 0.

  Raises TypeError for a non-float dtype, ValueError for another shape or, when concrete, for a
  negative or non-finite weight (under jit such rows are left out by the callers: they keep
  only rows whose weight is > 0, and a NaN compares False).
  """
  weights = upcast(check_float_array("weights", weights))
  if weights.shape != (batch,):
    raise ValueError(f"weights must be [B] = [{batch}] (one share per row), got shape "
                     f"{weights.shape}.")
  if is_concrete(weights):
    with jax.ensure_compile_time_eval():
      bad = int(jnp.sum(~(jnp.isfinite(weights) & (weights >= 0))))
    if bad:
      raise ValueError(f"weights must be finite and >= 0; {bad} are not.")
  return weights


def outside_vocab(ids: jax.Array, vocab: int, mask: jax.Array | None = None) -> jax.Array:
  """[...] bool: the (valid, where `mask` is given) positions whose id lies outside [0, vocab)."""
  outside = (ids < 0) | (ids >= vocab)
  return outside if mask is None else outside & mask


def undefined_outside_vocab(log_prob: jax.Array, ids: jax.Array, vocab: int,
                            mask: jax.Array | None = None) -> jax.Array:
  """`log_prob` with NaN at the (valid) positions whose id lies outside [0, vocab).

  An id outside the vocabulary has no probability: a gather or a one-hot match would report a
  plausible number (a wrapped index, -logsumexp), NaN marks it undefined, so that the losses
  leave the token out and count it in `nonfinite_tokens` like any other undefined token. Read
  the ids as given (before any int32 cast, so a wide id cannot wrap into range). jnp.where
  sends the cotangent of the unselected branch to zero: nothing non-finite reaches a gradient.
  """
  return jnp.where(outside_vocab(ids, vocab, mask), jnp.nan, log_prob)


def check_ids(name: str, ids: Any, vocab: int) -> jax.Array:
  """`ids` as an integer array; raises TypeError for another dtype and, when concrete,
  ValueError for an id outside [0, vocab) (one scalar to the host)."""
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}.")
  if is_concrete(ids):
    with jax.ensure_compile_time_eval():
      count = int(jnp.sum(outside_vocab(ids, vocab)))
    if count:
      raise ValueError(f"{name} has {count} id(s) outside [0, {vocab}).")
  return ids


def check_int(name: str, value: Any, minimum: int) -> None:
  """Raise ValueError unless `value` is an int (not a bool) >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
