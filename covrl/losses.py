"""Token-level policy losses with verl's inputs and semantics.

Every policy loss takes verl's four [batch, time] arrays: `old_log_prob`, `log_prob`,
`advantages`, `response_mask`, and returns `(loss, metrics)`. The metrics are a dict of scalars
with the same keys for every policy loss (so training loops can switch methods freely):

  loss, loss_numerator, loss_denominator   the aggregate (see covrl.aggregation); under
                    shard_map the returned loss is the device's share and these are global
  approx_kl         mean over valid tokens of log pi_old - log pi (verl's ppo_kl)
  clip_frac         fraction of valid tokens the PPO clip is active on (pg_clipfrac)
  clip_frac_lower   fraction where the dual clip is active (pg_clipfrac_lower)
  cov_mean, cov_max mean and largest per-token covariance c_i over valid tokens
  selected_frac     fraction of valid tokens Clip-Cov or KL-Cov acted on (0 for the others)
  nonfinite_tokens  valid tokens left out because an input was NaN or inf
  entropy           mean token entropy, when `logits` are passed
  predicted_entropy_change  mean first-order change -Cov_pi(log pi, dz), when `logits` and the
                    logit update `logit_update` are passed (known for tabular policies)

Bad input: shapes, dtypes and hyperparameters are checked before tracing. A NaN or inf at a valid
position raises when the inputs are concrete; under jit such tokens are left out of the loss, the
statistics and the selection, and counted in `nonfinite_tokens`. An all-masked batch gives loss 0
and zero gradients.

References:
  Schulman et al., Proximal Policy Optimization Algorithms, arXiv:1707.06347 (2017).
  Ye et al., Mastering Complex Control in MOBA Games with Deep RL (dual clip), arXiv:1912.09729.
  Yu et al., DAPO (clip-higher: clip_ratio_high > clip_ratio_low), arXiv:2503.14476 (2025).
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs (Clip-Cov, KL-Cov), arXiv:2505.22617.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from covrl import _checks
from covrl import aggregation as agg
from covrl import selection as sel
from covrl import softmax_entropy as ent
from covrl.covariance import centred_product, finite_tokens, masked_mean

Metrics = dict[str, jax.Array]
Selection = Literal["global", "local"]
# verl clamps the log-ratio before exp for stability; covrl does so in every loss.
_LOG_RATIO_CLAMP = 20.0


class _Tokens(NamedTuple):
  old: jax.Array
  new: jax.Array
  adv: jax.Array
  valid: jax.Array
  nonfinite: jax.Array
  count: jax.Array  # valid tokens on this device, as a float scalar


def _tokens(old_log_prob, log_prob, advantages, response_mask) -> _Tokens:
  names = ("old_log_prob", "log_prob", "advantages")
  arrays = [_checks.check_float_array(n, x) for n, x in zip(names, (old_log_prob, log_prob,
                                                                     advantages))]
  _checks.check_same_shape((*names, "response_mask"), (*arrays, response_mask), rank=2)
  mask = _checks.as_mask("response_mask", response_mask)
  for n, x in zip(names, arrays):
    _checks.check_finite_where(n, x, mask)
  dtype = _checks.result_dtype(*arrays)
  arrays = [x.astype(dtype) for x in arrays]
  valid = finite_tokens(mask, *arrays)
  # Safe values at invalid positions keep NaN out of values and gradients alike.
  old, new, adv = (jnp.where(valid, x, 0.0) for x in arrays)
  return _Tokens(old, new, adv, valid, jnp.sum(mask & ~valid), jnp.sum(valid, dtype=dtype))


def _ratio(t: _Tokens) -> tuple[jax.Array, jax.Array]:
  log_ratio = jnp.clip(t.new - t.old, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  return log_ratio, jnp.exp(log_ratio)


def _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high) -> tuple[Any, Any]:
  low = clip_ratio if clip_ratio_low is None else clip_ratio_low
  high = clip_ratio if clip_ratio_high is None else clip_ratio_high
  _checks.check_fraction("clip_ratio_low", low)
  _checks.check_nonnegative("clip_ratio_high", high)
  return low, high


def _metrics(
    t: _Tokens,
    aggregate: agg.Aggregate,
    cov: jax.Array,
    axis_name,
    *,
    log_ratio: jax.Array,
    clipped: jax.Array | None = None,
    clipped_lower: jax.Array | None = None,
    num_selected: jax.Array | None = None,
    logits: jax.Array | None = None,
    logit_update: jax.Array | None = None,
) -> Metrics:
  cov, log_ratio = lax.stop_gradient(cov), lax.stop_gradient(log_ratio)
  dtype = cov.dtype
  # Every per-token quantity here is already 0 at invalid tokens (the inputs were zeroed there),
  # so plain sums suffice; one count serves every mean.
  zero = jnp.zeros((), dtype)
  sums = {
      "approx_kl": -jnp.sum(log_ratio),
      "clip_frac": zero if clipped is None else jnp.sum(clipped, dtype=dtype),
      "clip_frac_lower": zero if clipped_lower is None else jnp.sum(clipped_lower, dtype=dtype),
      "cov_mean": jnp.sum(cov),
      "selected_frac": zero if num_selected is None else num_selected.astype(dtype),
  }
  cov_max = jnp.max(jnp.where(t.valid, cov, -jnp.inf))
  nonfinite, count = t.nonfinite, t.count
  value, numerator = aggregate.value, aggregate.numerator
  if axis_name is not None:  # the returned loss is this device's share; metrics are global
    sums, count, nonfinite, value, numerator = lax.psum(
        (sums, count, nonfinite, value, numerator), axis_name)
    cov_max = lax.pmax(cov_max, axis_name)
  out = {k: v / jnp.maximum(count, 1.0) for k, v in sums.items()}
  out.update({
      "loss": value,
      "loss_numerator": numerator,
      "loss_denominator": aggregate.denominator,
      "cov_max": jnp.where(count > 0, cov_max, 0.0),
      "nonfinite_tokens": nonfinite,
  })
  out.update(_entropy_metrics(logits, logit_update, t.valid, axis_name))
  return jax.tree.map(lax.stop_gradient, out)


def _entropy_metrics(logits, logit_update, valid, axis_name) -> Metrics:
  if logits is None:
    if logit_update is not None:
      raise ValueError("logit_update needs logits too.")
    return {}
  logits = _checks.check_float_array("logits", logits)
  if logits.shape[:-1] != valid.shape:
    raise ValueError(f"logits must be [B, T, V] with [B, T] = {valid.shape}, got {logits.shape}.")
  logits = lax.stop_gradient(jnp.where(valid[..., None], logits, 0.0))
  out = {"entropy": masked_mean(ent.entropy(logits), valid, axis_name)}
  if logit_update is not None:
    if jnp.shape(logit_update) != logits.shape:
      raise ValueError(f"logit_update {jnp.shape(logit_update)} must match logits {logits.shape}.")
    predicted = ent.entropy_change_first_order(logits, lax.stop_gradient(logit_update))
    out["predicted_entropy_change"] = masked_mean(predicted, valid, axis_name)
  return out


def _aggregate(loss_mat, t, loss_agg_mode, denominator, horizon, axis_name) -> agg.Aggregate:
  if denominator is None and loss_agg_mode == "token-mean":  # reuse the count
    denominator = t.count if axis_name is None else lax.psum(t.count, axis_name)
  return agg.aggregate(
      loss_mat, t.valid, loss_agg_mode, denominator_override=denominator, horizon=horizon,
      axis_name=axis_name,
  )


def _clipped_surrogate(adv, ratio, low, high):
  """Per-token PPO loss max(-A r, -A clip(r, 1 - low, 1 + high)) and where the clip binds."""
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - low, 1.0 + high)
  return jnp.maximum(unclipped, clipped), clipped > unclipped


def policy_gradient_loss(
    old_log_prob: jax.Array,
    log_prob: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    loss_agg_mode: agg.LossAggMode = "token-mean",
    denominator: jax.Array | float | None = None,
    horizon: int | None = None,
    axis_name: str | None = None,
    logits: jax.Array | None = None,
    logit_update: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """Unclipped importance-weighted policy gradient, token loss -A * pi / pi_old.

  On-policy (old_log_prob = stop_gradient(log_prob)) its gradient is REINFORCE's,
  -A grad log pi.

  Args:
    old_log_prob, log_prob, advantages, response_mask: [B, T] (see the module docstring).
    loss_agg_mode: aggregation mode (covrl.aggregation).
    denominator: the whole batch's denominator, for exact gradient accumulation.
    horizon: divisor of seq-mean-token-sum-norm.
    axis_name: shard_map axis; statistics and the denominator become global.
    logits, logit_update: optional [B, T, V], for the entropy metrics.

  Returns:
    (loss, metrics).
  """
  t = _tokens(old_log_prob, log_prob, advantages, response_mask)
  log_ratio, ratio = _ratio(t)
  aggregate = _aggregate(-t.adv * ratio, t, loss_agg_mode, denominator, horizon, axis_name)
  cov = centred_product(t.new, t.adv, t.valid, axis_name=axis_name, count=t.count)
  return aggregate.value, _metrics(
      t, aggregate, cov, axis_name, log_ratio=log_ratio, logits=logits, logit_update=logit_update
  )


def ppo_loss(
    old_log_prob: jax.Array,
    log_prob: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float | None = 3.0,
    loss_agg_mode: agg.LossAggMode = "token-mean",
    denominator: jax.Array | float | None = None,
    horizon: int | None = None,
    axis_name: str | None = None,
    logits: jax.Array | None = None,
    logit_update: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """PPO clipped surrogate with clip-higher and dual clip (verl's "vanilla" policy loss).

  Per token, with r = pi / pi_old (log-ratio clamped to [-20, 20]):
    l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  for A < 0, l = min(l, -A c).

  Args:
    clip_ratio: eps for both sides unless overridden (verl's clip_ratio, 0.2).
    clip_ratio_low, clip_ratio_high: eps_low and eps_high; clip-higher (DAPO) sets
      eps_high > eps_low, for example 0.2 and 0.28.
    clip_ratio_c: dual-clip bound c > 1 (verl's default 3.0); None disables the dual clip.
    Others: as in `policy_gradient_loss`.

  Returns:
    (loss, metrics).
  """
  low, high = _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high)
  if clip_ratio_c is not None:
    c = _checks.concrete_float(clip_ratio_c)
    if c is not None and not c > 1.0:
      raise ValueError(f"clip_ratio_c must be > 1 for the dual clip, got {c!r}.")
  t = _tokens(old_log_prob, log_prob, advantages, response_mask)
  log_ratio, ratio = _ratio(t)
  loss_mat, clipped = _clipped_surrogate(t.adv, ratio, low, high)
  clipped_lower = None
  if clip_ratio_c is not None:
    dual = -t.adv * clip_ratio_c
    clipped_lower = (loss_mat > dual) & (t.adv < 0)
    loss_mat = jnp.where(t.adv < 0, jnp.minimum(loss_mat, dual), loss_mat)
  aggregate = _aggregate(loss_mat, t, loss_agg_mode, denominator, horizon, axis_name)
  cov = centred_product(t.new, t.adv, t.valid, axis_name=axis_name, count=t.count)
  return aggregate.value, _metrics(
      t, aggregate, cov, axis_name, log_ratio=log_ratio, clipped=clipped,
      clipped_lower=clipped_lower, logits=logits, logit_update=logit_update,
  )


def _grouped(fn: Callable, arrays: tuple[jax.Array, ...], micro_batch_size: int | None):
  """Apply fn(row_offset, *arrays) to consecutive row groups of micro_batch_size rows.

  fn returns (per-row arrays, per-group scalars): the first are joined back into [batch, ...],
  the second returned as [groups] arrays.
  """
  batch = arrays[0].shape[0]
  size = batch if micro_batch_size is None else micro_batch_size
  if size < 1 or batch % size:
    raise ValueError(f"micro_batch_size={size} must divide the batch of {batch} rows.")
  groups = batch // size
  split = [a.reshape(groups, size, *a.shape[1:]) for a in arrays]
  rows, per_group = jax.vmap(fn)(jnp.arange(groups) * size, *split)
  return jax.tree.map(lambda o: o.reshape(batch, *o.shape[2:]), rows), per_group


def _check_selection(selection: str, micro_batch_size) -> None:
  if selection not in ("global", "local"):
    raise ValueError(f"selection must be 'global' or 'local', got {selection!r}.")
  if micro_batch_size is not None and selection != "local":
    raise ValueError("micro_batch_size only applies to selection='local'.")


def clip_cov_loss(
    key: jax.Array | None,
    old_log_prob: jax.Array,
    log_prob: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_cov_ratio: float | jax.Array = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    min_count: int = 1,
    max_ratio: float | None = None,
    selection: Selection = "global",
    micro_batch_size: int | None = None,
    selected: jax.Array | None = None,
    loss_agg_mode: agg.LossAggMode = "token-mean",
    denominator: jax.Array | float | None = None,
    horizon: int | None = None,
    axis_name: str | None = None,
    logits: jax.Array | None = None,
    logit_update: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """Clip-Cov: PPO loss with a random few high-covariance tokens detached (zero loss and gradient).

  Tokens are candidates when valid, not already clipped by PPO, and clip_cov_lb < c_i <
  clip_cov_ub; max(floor(clip_cov_ratio * N_valid), min_count) of them are drawn uniformly and
  get zero loss. There is no dual clip (as in the reference). Defaults are verl's, which are also
  the paper's: ratio 2e-4, band (1, 5).

  Args:
    key: PRNG key for the random draw (None only when `selected` is given).
    clip_ratio, clip_ratio_low, clip_ratio_high: PPO clip range (as in `ppo_loss`).
    clip_cov_ratio: fraction of valid tokens to detach, in [0, 1]; may be a traced (annealed)
      value when `max_ratio` bounds it.
    clip_cov_lb, clip_cov_ub: the open covariance band, lb < ub.
    min_count: least number of tokens detached (verl: 1; 0 lets an annealed ratio reach 0).
    selection: "global" (exact over the whole batch, on any number of devices) or "local"
      (verl's: per group of `micro_batch_size` rows, per device under shard_map).
    selected: a precomputed [B, T] bool selection, for gradient accumulation: select once on the
      whole batch with `covrl.clip_cov_select`, then pass each micro-batch its rows.
    Others: as in `policy_gradient_loss`.

  Returns:
    (loss, metrics); metrics["selected_frac"] is the fraction detached.
  """
  _check_selection(selection, micro_batch_size)
  if key is None and selected is None:
    raise ValueError("clip_cov_loss needs a PRNG key for its random draw (or `selected`).")
  low, high = _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high)
  t = _tokens(old_log_prob, log_prob, advantages, response_mask)
  log_ratio, ratio = _ratio(t)
  loss_mat, clipped = _clipped_surrogate(t.adv, ratio, low, high)
  clipped = clipped & t.valid
  select = lambda k, off, c, v, e, ax: sel.clip_cov_select(
      k, c, v, ratio=clip_cov_ratio, lb=clip_cov_lb, ub=clip_cov_ub, eligible=e,
      min_count=min_count, max_ratio=max_ratio, axis_name=ax, row_offset=off, return_count=True,
  )
  cov, chosen, num_chosen = _covariance_and_selection(
      t, selected, selection, micro_batch_size, axis_name, key, select, eligible=~clipped
  )
  loss_mat = jnp.where(chosen, 0.0, loss_mat)
  aggregate = _aggregate(loss_mat, t, loss_agg_mode, denominator, horizon, axis_name)
  return aggregate.value, _metrics(
      t, aggregate, cov, axis_name, log_ratio=log_ratio, clipped=clipped,
      num_selected=num_chosen, logits=logits, logit_update=logit_update,
  )


def _covariance_and_selection(t, selected, selection, micro_batch_size, axis_name, key, select,
                              eligible):
  """c_i, the selected mask and the number selected here: global, per group of rows, or given."""
  if selection == "global" or selected is not None:
    cov = centred_product(t.new, t.adv, t.valid, axis_name=axis_name, count=t.count)
    if selected is not None:
      _checks.check_same_shape(("selected", "log_prob"), (selected, t.new))
      chosen = jnp.asarray(selected, bool) & t.valid
      return cov, chosen, jnp.sum(chosen, dtype=jnp.int32)
    return (cov, *select(key, 0, cov, t.valid, eligible, axis_name))

  # Local mode, as verl selects per micro-batch and per rank: statistics and counts per group of
  # rows of this device's shard; the loss is still aggregated over the whole batch.
  base = 0 if axis_name is None else lax.axis_index(axis_name) * t.new.shape[0]

  def group(offset, new, adv, valid, elig):
    c = centred_product(new, adv, valid)
    chosen, num = select(key, base + offset, c, valid, elig, None)
    return (c, chosen), num

  (cov, chosen), num = _grouped(group, (t.new, t.adv, t.valid, eligible), micro_batch_size)
  return cov, chosen, jnp.sum(num)


@jax.custom_jvp
def abs_zero_grad_at_zero(x: jax.Array) -> jax.Array:
  """|x| whose derivative at 0 is 0 (sign(x)), as PyTorch's autograd gives.

  jnp.abs has derivative 1 at 0 in JAX; KL-Cov's penalty beta |log pi - log pi_old| would then
  push on a purely on-policy step, where the reference does nothing (THEORY.md T3.3, T3.6).
  """
  return jnp.abs(x)


@abs_zero_grad_at_zero.defjvp
def _abs_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * dx


def kl_cov_loss(
    old_log_prob: jax.Array,
    log_prob: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    kl_cov_ratio: float | jax.Array = 2e-4,
    kl_coef: float | jax.Array = 0.1,
    min_count: int = 1,
    max_ratio: float | None = None,
    selection: Selection = "global",
    micro_batch_size: int | None = None,
    selected: jax.Array | None = None,
    loss_agg_mode: agg.LossAggMode = "token-mean",
    denominator: jax.Array | float | None = None,
    horizon: int | None = None,
    axis_name: str | None = None,
    logits: jax.Array | None = None,
    logit_update: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """KL-Cov: unclipped policy gradient plus a KL penalty on the top-covariance tokens.

  Per token, l = -A r, and for the max(floor(kl_cov_ratio * N_valid), min_count) valid tokens
  with the largest c_i, l += kl_coef * |log pi - log pi_old|. There is no ratio clipping. The
  derivative of |x| at 0 is taken as 0 (as in the PyTorch reference), so on a purely on-policy
  step (log pi = log pi_old) the penalty has no effect; it acts from the second PPO epoch or
  mini-batch on (THEORY.md T3.6).

  Defaults are verl's configuration (kl_cov_ratio 2e-4, ppo_kl_coef 0.1); the paper uses
  kl_cov_ratio 2e-3 (7B) or 2e-4 (32B) and coefficient 1.

  Args:
    kl_cov_ratio: fraction of valid tokens penalised, in [0, 1] (traced needs `max_ratio`).
    kl_coef: penalty coefficient beta >= 0; a traced value anneals it.
    min_count, max_ratio, selection, micro_batch_size, selected: as in `clip_cov_loss`.
    Others: as in `policy_gradient_loss`.

  Returns:
    (loss, metrics); metrics["selected_frac"] is the fraction penalised.
  """
  _check_selection(selection, micro_batch_size)
  _checks.check_nonnegative("kl_coef", kl_coef)
  t = _tokens(old_log_prob, log_prob, advantages, response_mask)
  log_ratio, ratio = _ratio(t)
  select = lambda _key, _offset, c, v, _elig, ax: sel.kl_cov_select(
      c, v, ratio=kl_cov_ratio, min_count=min_count, max_ratio=max_ratio, axis_name=ax,
      return_count=True,
  )
  cov, chosen, num_chosen = _covariance_and_selection(
      t, selected, selection, micro_batch_size, axis_name, None, select, eligible=t.valid
  )
  penalty = kl_coef * abs_zero_grad_at_zero(t.new - t.old)
  loss_mat = -t.adv * ratio + jnp.where(chosen, penalty, 0.0)
  aggregate = _aggregate(loss_mat, t, loss_agg_mode, denominator, horizon, axis_name)
  return aggregate.value, _metrics(
      t, aggregate, cov, axis_name, log_ratio=log_ratio, num_selected=num_chosen,
      logits=logits, logit_update=logit_update,
  )


Coefficient = float | jax.Array | Callable[[jax.Array], jax.Array]


def resolve_coefficient(name: str, coef: Coefficient, step: jax.Array | int | None) -> jax.Array:
  """A coefficient given as a number or as an optax-style schedule `step -> value`."""
  if callable(coef):
    if step is None:
      raise ValueError(f"{name} is a schedule: pass the optimisation step as `step=`.")
    coef = coef(step)
  _checks.check_nonnegative(name, coef)
  return jnp.asarray(coef)


def entropy_bonus_loss(
    logits: jax.Array,
    response_mask: jax.Array,
    *,
    coef: Coefficient,
    temperature: float = 1.0,
    step: jax.Array | int | None = None,
    loss_agg_mode: agg.LossAggMode = "token-mean",
    denominator: jax.Array | float | None = None,
    horizon: int | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, Metrics]:
  """Entropy bonus -coef * agg(H), H the full-vocabulary entropy of logits / temperature.

  Add it to a policy loss (verl: policy_loss -= entropy_coeff * entropy_loss). Its gradient
  touches every vocabulary entry at every valid position (a dense bias, THEORY.md T2).

  Args:
    logits: [B, T, V] logits of the current policy at the response positions.
    response_mask: [B, T].
    coef: coefficient >= 0, or a schedule `step -> coef` (then pass `step`).
    temperature: the sampling temperature, > 0 (verl divides logits by it).
    step: optimisation step, for a scheduled coefficient.
    Others: as in `policy_gradient_loss`.

  Returns:
    (loss, {"entropy": the aggregated entropy, "entropy_coef": coef, "nonfinite_tokens"}).
  """
  _checks.check_positive("temperature", temperature)
  logits = _checks.check_float_array("logits", logits)
  if logits.ndim != 3:
    raise ValueError(f"logits must be [batch, time, vocab], got shape {logits.shape}.")
  _checks.check_same_shape(("logits[..., 0]", "response_mask"), (logits[..., 0], response_mask))
  mask = _checks.as_mask("response_mask", response_mask)
  coef = resolve_coefficient("coef", coef, step)
  # Padding positions may hold anything (even all -inf rows): replace them before the entropy so
  # that they reach neither the value nor the gradient.
  logits = ent.check_logits(jnp.where(mask[..., None], logits, 0.0))
  token_entropy = ent.entropy_reverse_only(logits / temperature)
  valid = mask & jnp.isfinite(token_entropy)
  nonfinite = jnp.sum(mask & ~valid)
  if axis_name is not None:
    nonfinite = lax.psum(nonfinite, axis_name)
  h = agg.aggregate(
      jnp.where(valid, token_entropy, 0.0), valid, loss_agg_mode,
      denominator_override=denominator, horizon=horizon, axis_name=axis_name,
  )
  loss = -coef.astype(h.value.dtype) * h.value
  mean_entropy = h.value if axis_name is None else lax.psum(h.value, axis_name)
  metrics = {"entropy": mean_entropy, "entropy_coef": coef, "nonfinite_tokens": nonfinite}
  return loss, jax.tree.map(lax.stop_gradient, metrics)
