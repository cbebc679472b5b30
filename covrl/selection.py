"""Which tokens Clip-Cov and KL-Cov act on: fixed shapes, masks, no host round trips.

Both methods touch a data-dependent number of tokens, count = max(floor(ratio * N_valid),
min_count). Under jit that number is traced, so the selection is a static bound K (the count for a
batch with every token valid) plus a mask: `lax.top_k` returns K candidates and those of rank below
the count are kept. `floor` follows Python's float semantics exactly (as in verl's
`int(ratio * n)`), through a small table of the thresholds at which the count steps up.

* KL-Cov keeps the `count` tokens with the largest c_i among valid tokens. Ties go to the lower
  flat index in the global [batch, time] array (row-major), on any number of devices.
* Clip-Cov keeps `count` tokens drawn uniformly without replacement from its candidates
  (valid, eligible, lb < c_i < ub with strict inequalities). The draw gives every token a uniform
  priority hashed from (key, global row, column) and keeps the top `count` candidates, so a key
  gives the same tokens whether the batch sits on one device or many.

Global mode (the default): selection over the whole batch. Pass the whole [B, T] array under jit
(sharded or not), or, inside `shard_map`, the local shard with `axis_name`: each device ranks its
own tokens, the per-device top-K lists are gathered (K values each, not the batch), and the final
top-K is taken over them, which is exact because the global top-K is contained in the union of the
local ones.

A weighted population (`weights`: one share per row, for example every response of an enumerated
tree with its probability) is the limit of a sampled batch in which row b occurs in proportion to
its weight, and each method selects what it would select there, as a share of each token's
weight: KL-Cov the top `ratio` of the total weight by c_i (tokens above the cut fully, the token
at the cut in part, ties to the lower flat index as in a batch); Clip-Cov its expected draw, the
share min(1, ratio W / W_band) of every candidate (the expectation over the key, which is not
used). The count of such a batch, floor(ratio N), is ratio N in the limit: `min_count` does not
apply. The mask is then a float array of shares in [0, 1] and the count a total weight; apply a
selection with `on_selected`, which treats both kinds alike.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from covrl import _checks, _compat
from covrl.covariance import finite_tokens, masked_sum

# Above this many thresholds the exact table is replaced by float32 arithmetic.
_MAX_TABLE = 1 << 20


class Selection(NamedTuple):
  """Tokens a method acts on.

  Attributes:
    mask: [B, T] bool, the selected tokens; for a weighted population, float shares in [0, 1]
      of each token's weight (see the module docstring).
    count: [] int32, how many are selected in this array (this device's shard under shard_map),
      read off the top-K list rather than summed over the mask; for a weighted population, the
      selected weight (a float).
  """

  mask: jax.Array
  count: jax.Array


def empty_selection(shape: tuple[int, ...]) -> Selection:
  """No token selected."""
  return Selection(jnp.zeros(shape, bool), jnp.zeros((), jnp.int32))


def on_selected(selection: Selection, x: jax.Array) -> jax.Array:
  """[B, T] x where a token is selected and 0 elsewhere; for a weighted population's shares,
  x times each token's selected share (the expected value over its copies)."""
  if selection.mask.dtype == jnp.bool_:
    return jnp.where(selection.mask, x, 0.0)
  return selection.mask.astype(x.dtype) * x


def _population(weights: Any, valid: jax.Array, axis_name) -> jax.Array:
  """[B, T] token weights of a weighted population (0 where not valid or not a valid weight)."""
  if axis_name is not None:
    raise ValueError("a weighted population's selection runs on the whole batch under jit, not "
                     "per device in shard_map (axis_name).")
  weights = _checks.check_weights(weights, valid.shape[0])
  return jnp.where(valid & (weights[:, None] > 0), weights[:, None], 0.0)


def _keep_top_weighted(scores: jax.Array, weight: jax.Array, mass: jax.Array) -> Selection:
  """Shares of the highest-scoring tokens holding `mass` of the total weight, in score order
  (ties: lower flat index), the token at the cut in part; tokens of weight 0 get none."""
  shape = scores.shape
  flat, w = scores.reshape(-1), weight.reshape(-1)
  if flat.size == 0:
    return Selection(jnp.zeros(shape, w.dtype), jnp.zeros((), w.dtype))
  order = jnp.argsort(-flat, stable=True)  # descending; equal scores keep index order
  ws = w[order]
  before = jnp.cumsum(ws) - ws
  share = jnp.where(ws > 0, jnp.clip((mass - before) / jnp.where(ws > 0, ws, 1.0), 0.0, 1.0),
                    0.0)
  shares = jnp.zeros_like(w).at[order].set(share).reshape(shape)
  return Selection(shares, jnp.sum(shares * weight))


@functools.lru_cache(maxsize=256)
def _count_table(ratio: float, capacity: int, min_count: int) -> tuple[int, np.ndarray]:
  """Static bound K and thresholds: count(n) = min_count + #{j : n >= thresholds[j]}."""
  k_max = min(max(int(ratio * capacity), min_count), capacity)
  ks = np.arange(min_count + 1, k_max + 1, dtype=np.int64)
  if ratio <= 0 or ks.size == 0:
    return k_max, np.zeros((0,), np.int32)
  # Smallest n with floor(ratio * n) >= k in float64 (what Python's int(ratio * n) gives);
  # start from the real-number answer and correct the rounding either way.
  n = np.ceil(ks / ratio).astype(np.int64)
  for _ in range(4):
    too_big = np.floor(ratio * (n - 1)) >= ks
    too_small = np.floor(ratio * n) < ks
    if not (too_big.any() or too_small.any()):
      break
    n = n - too_big + too_small
  return k_max, n.astype(np.int32)


def static_bound(ratio: float, capacity: int, min_count: int = 1) -> int:
  """The most tokens a selection with this ratio can keep from `capacity` positions."""
  return min(max(int(ratio * capacity), min_count), capacity)


def selection_count(
    ratio: float | jax.Array,
    num_valid: jax.Array,
    *,
    capacity: int,
    min_count: int = 1,
    max_ratio: float | None = None,
) -> tuple[jax.Array, int]:
  """How many tokens to select: max(floor(ratio * num_valid), min_count), and its static bound.

  Args:
    ratio: fraction in [0, 1]; a Python float gives the exact count, a traced value (an annealed
      ratio) is rounded in float32 and needs `max_ratio`.
    num_valid: traced count of valid tokens.
    capacity: static number of positions (B * T over the whole batch).
    min_count: the floor; verl uses 1, 0 lets an annealed ratio switch the method off.
    max_ratio: static upper bound on a traced ratio.

  Returns:
    (count, K): count as an int32 scalar, K as a Python int with count <= K.
  """
  if isinstance(min_count, bool) or not isinstance(min_count, int | np.integer) or min_count < 0:
    raise ValueError(f"min_count must be an int >= 0, got {min_count!r}.")
  min_count = int(min_count)
  if _checks.concrete_float(ratio) is not None:
    ratio = _checks.concrete_float(ratio)
    _checks.check_fraction("ratio", ratio)
    k_max, table = _count_table(float(ratio), capacity, min_count)
    if table.size <= _MAX_TABLE:
      extra = jnp.searchsorted(jnp.asarray(table), num_valid, side="right")
      count = min_count + extra.astype(jnp.int32)
    else:
      count = jnp.floor(float(ratio) * num_valid.astype(jnp.float32)).astype(jnp.int32)
  else:
    if max_ratio is None:
      raise ValueError("a traced (scheduled) ratio needs a static max_ratio for the shape bound.")
    _checks.check_fraction("max_ratio", max_ratio)
    _checks.check_fraction("ratio", ratio)
    k_max = static_bound(max_ratio, capacity, min_count)
    count = jnp.floor(jnp.asarray(ratio, jnp.float32) * num_valid.astype(jnp.float32))
    count = count.astype(jnp.int32)
  count = jnp.clip(jnp.maximum(count, min_count), 0, k_max)
  return count, k_max


def _group_size(size: int, k: int) -> int:
  """Group size g (a power of two) for `top_k`'s two-level search, or 1 for a plain top_k."""
  if k < 1 or size < 64 * k:
    return 1
  g = 2 ** round(math.log2(math.sqrt(size / k)))  # balances G = size / g against k * g
  return g if g >= 8 else 1


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact `lax.top_k` of a 1-D array (same values, same indices, ties to the lower index).

  For k much smaller than the size it searches in two levels: split x into groups of g, take the
  k groups with the largest maxima (ties: lower group), and the top k of their k * g elements.
  Every top-k element lies in one of those groups: if its group were not among them, the maxima
  of the k chosen groups would be k elements ranking above it (larger, or equal with a lower
  index). On CPU this costs one pass over x plus two small top_k's instead of a top_k over all
  of x (about 1 ms at 524k tokens, several times PPO's own loss).
  """
  size = x.shape[0]
  g = _group_size(size, k)
  if g == 1:
    return lax.top_k(x, k)
  groups = -(-size // g)
  padded = jnp.pad(x, (0, groups * g - size), constant_values=-jnp.inf).reshape(groups, g)
  _, chosen = lax.top_k(jnp.max(padded, axis=1), k)
  chosen = jnp.sort(chosen)  # flat-index order, so top_k's lower-position ties stay lower-index
  values, pos = lax.top_k(padded[chosen].reshape(-1), k)
  index = (chosen[:, None] * g + jnp.arange(g)).reshape(-1)[pos]
  return values, index


def _keep_top(
    scores: jax.Array, candidates: jax.Array, count: jax.Array, k_max: int, axis_name
) -> Selection:
  """The `count` highest-scoring candidates (ties: lower global flat index).

  Returns the boolean mask and the number of its True entries (on this device, under
  shard_map), read off the top-K list: a count without another pass over the batch.
  """
  shape = scores.shape
  flat = _compat.unsharded(jnp.where(candidates, scores, -jnp.inf).reshape(-1))
  size = flat.size
  if k_max == 0 or size == 0:
    return empty_selection(shape)
  values, index = top_k(flat, min(k_max, size))
  if axis_name is not None:
    offset = lax.axis_index(axis_name) * size
    all_values = lax.all_gather(values, axis_name).reshape(-1)
    all_index = lax.all_gather(index + offset, axis_name).reshape(-1)
    # Ties: the gathered list is device-major and each device's list is index-ordered on ties,
    # so lax.top_k's lower-position rule is again the lower global index.
    values, pos = lax.top_k(all_values, min(k_max, all_values.size))
    index = all_index[pos] - offset
  keep = (jnp.arange(values.shape[0]) < count) & (values > -jnp.inf)
  keep = keep & (index >= 0) & (index < size)
  target = jnp.where(keep, index, size)
  mask = jnp.zeros((size,), bool).at[target].set(True, mode="drop").reshape(shape)
  return Selection(mask, jnp.sum(keep, dtype=jnp.int32))


def _capacity(shape: tuple[int, ...], axis_name) -> int:
  size = int(np.prod(shape))
  return size if axis_name is None else size * lax.axis_size(axis_name)


def kl_cov_select(
    cov: jax.Array,
    response_mask: jax.Array,
    *,
    ratio: float | jax.Array,
    min_count: int = 1,
    max_ratio: float | None = None,
    axis_name: str | None = None,
    weights: jax.Array | None = None,
) -> Selection:
  """KL-Cov's tokens: the top max(floor(ratio * N_valid), min_count) valid tokens by c_i.

  Batch-wide: pass the whole [B, T] array (or the local shard with `axis_name` in shard_map).

  Args:
    cov: [B, T] per-token covariance (`covrl.token_covariance`).
    response_mask: [B, T] 0/1 or bool.
    ratio: fraction of valid tokens, in [0, 1] (verl's kl_cov_ratio; 2e-4 by default there).
    min_count: lower bound on the count (verl: 1).
    max_ratio: static bound, needed only when `ratio` is traced.
    axis_name: shard_map axis the batch is split over, for exact global selection.
    weights: optional [B] population shares of the rows: the top `ratio` of the total weight is
      selected, as shares (see the module docstring); not with `axis_name`.

  Returns:
    Selection(mask, count): the [B, T] bool mask of selected tokens and their number in this
    array (this device's shard under shard_map), read off the top-K list instead of summing the
    mask (a pass over the batch that costs as much as a quarter of a PPO loss on CPU).
    Non-finite c_i are never selected. With `weights`: float shares and the selected weight.
  """
  _checks.check_same_shape(("cov", "response_mask"), (cov, response_mask), rank=2)
  mask = _checks.as_mask("response_mask", response_mask)
  cov = lax.stop_gradient(_checks.upcast(_checks.check_float_array("cov", cov)))
  valid = finite_tokens(mask, cov)
  if weights is not None:
    _checks.check_fraction("ratio", ratio)
    weight = _population(weights, valid, axis_name).astype(cov.dtype)
    scores = jnp.where(weight > 0, cov, -jnp.inf)
    return _keep_top_weighted(scores, weight, jnp.asarray(ratio, cov.dtype) * jnp.sum(weight))
  num_valid = masked_sum(jnp.ones((), jnp.int32), valid, axis_name)
  count, k_max = selection_count(
      ratio, num_valid, capacity=_capacity(cov.shape, axis_name), min_count=min_count,
      max_ratio=max_ratio,
  )
  return _keep_top(cov, valid, count, k_max, axis_name)


def _mix32(x: jax.Array) -> jax.Array:
  """A bijection of uint32 with full avalanche (the "lowbias32" integer hash finalizer)."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def check_key(key: Any) -> jax.Array:
  """Return the raw uint32 words of one PRNG key; TypeError / ValueError for anything else.

  Accepts a typed key (`jax.random.key`, shape ()) or a raw one (`jax.random.PRNGKey`, one
  uint32 vector). An int, a string, None or a batch of keys (`jax.random.split`'s output) is
  rejected: a batch would silently seed the draw from all of its keys at once.
  """
  if not isinstance(key, jax.Array | np.ndarray):
    raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed)), got "
                    f"{type(key).__name__}.")
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.ndim != 0:
      raise ValueError(f"key must be one PRNG key, got a batch of keys of shape {key.shape}.")
    key = jax.random.key_data(key)
  elif key.dtype == jnp.uint32 and key.ndim > 1:
    raise ValueError(f"key must be one PRNG key, got a batch of raw keys of shape {key.shape}.")
  elif key.dtype != jnp.uint32 or key.ndim != 1:
    raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed)), got an array of dtype "
                    f"{key.dtype} and shape {key.shape}.")
  return key.reshape(-1)


def row_priorities(key: jax.Array, shape: tuple[int, int], row_offset) -> jax.Array:
  """Uniform [0, 1) priorities for rows row_offset .. row_offset + B - 1 of the global batch.

  Priority (r, t) is a hash of (key, global row r, column t): the key's words and the row are
  mixed into a row seed s_r, and the priority is mix(s_r + t * phi) >> 8 scaled to [0, 1) (24
  random bits, one more than `jax.random.uniform` gives in float32), with `mix` a bijective
  32-bit integer hash and phi the odd golden-ratio constant, so the columns of a row get distinct
  priorities. A counter-based hash, like JAX's threefry, so the same key gives the same
  priorities on any number of devices; at about five integer operations per token it costs a
  small fraction of a threefry draw, which matters for Clip-Cov's cost relative to PPO.
  """
  seed = np.uint32(0x9E3779B9)
  words = check_key(key)
  for i in range(words.shape[0]):
    seed = _mix32(seed ^ words[i])
  rows = (jnp.asarray(row_offset) + jnp.arange(shape[0])).astype(jnp.uint32)
  row_seed = _mix32(seed ^ _mix32(rows + np.uint32(0x632BE5AB)))
  cols = jnp.arange(shape[1], dtype=jnp.uint32) * np.uint32(0x9E3779B9)
  bits = _mix32(row_seed[:, None] + cols[None, :])
  return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def clip_cov_select(
    cov: jax.Array,
    response_mask: jax.Array,
    *,
    key: jax.Array | None,
    ratio: float | jax.Array,
    lb: float,
    ub: float,
    eligible: jax.Array | None = None,
    min_count: int = 1,
    max_ratio: float | None = None,
    axis_name: str | None = None,
    row_offset: int | jax.Array = 0,
    weights: jax.Array | None = None,
) -> Selection:
  """Clip-Cov's tokens: max(floor(ratio * N_valid), min_count) drawn at random from the band.

  Candidates are valid, eligible tokens with lb < c_i < ub (strict). N_valid counts all valid
  tokens, as in verl. The draw is uniform without replacement; when there are fewer candidates
  than the count, all candidates are selected.

  Args:
    cov: [B, T] per-token covariance.
    response_mask: [B, T] 0/1 or bool.
    key: PRNG key for the draw (None with `weights`).
    ratio: fraction in [0, 1] (verl's clip_cov_ratio, 2e-4 by default).
    lb, ub: the open band (verl: 1.0 and 5.0); lb < ub.
    eligible: optional [B, T] bool; verl excludes tokens the PPO clip already clipped.
    min_count, max_ratio, axis_name: as in `kl_cov_select`.
    row_offset: index of this array's first row in the global batch (for micro-batches).
    weights: optional [B] population shares of the rows: every candidate gets the expected
      share min(1, ratio W / W_band) of the draw (see the module docstring); `key` may then be
      None (a key given is checked, not used); not with `axis_name`.

  Returns:
    Selection(mask, count), as `kl_cov_select`.
  """
  _checks.check_same_shape(("cov", "response_mask"), (cov, response_mask), rank=2)
  if weights is None or key is not None:
    check_key(key)  # before any work: a bad key is a TypeError naming the argument
  lbv, ubv = _checks.concrete_float(lb), _checks.concrete_float(ub)
  if lbv is not None and ubv is not None and not lbv < ubv:
    raise ValueError(f"Clip-Cov needs lb < ub, got lb={lbv!r}, ub={ubv!r}.")
  mask = _checks.as_mask("response_mask", response_mask)
  cov = lax.stop_gradient(_checks.upcast(_checks.check_float_array("cov", cov)))
  valid = finite_tokens(mask, cov)
  candidates = valid & (cov > lb) & (cov < ub)
  if eligible is not None:
    candidates = candidates & jnp.asarray(eligible, bool)
  if weights is not None:
    _checks.check_fraction("ratio", ratio)
    weight = _population(weights, valid, axis_name).astype(cov.dtype)
    band = jnp.sum(jnp.where(candidates, weight, 0.0))
    mass = jnp.asarray(ratio, cov.dtype) * jnp.sum(weight)
    share = jnp.minimum(1.0, mass / jnp.where(band > 0, band, 1.0))
    shares = jnp.where(candidates & (weight > 0), share, 0.0)
    return Selection(shares, jnp.sum(shares * weight))
  num_valid = masked_sum(jnp.ones((), jnp.int32), valid, axis_name)
  count, k_max = selection_count(
      ratio, num_valid, capacity=_capacity(cov.shape, axis_name), min_count=min_count,
      max_ratio=max_ratio,
  )
  if axis_name is not None:
    row_offset = row_offset + lax.axis_index(axis_name) * cov.shape[0]
  priorities = row_priorities(key, cov.shape, row_offset)
  return _keep_top(priorities, candidates, count, k_max, axis_name)
