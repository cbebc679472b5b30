"""Token-level policy losses with verl's inputs and semantics, for any control value.

`policy_loss(control, old_log_prob, log_prob, advantages, response_mask, ...)` composes the
public stages: `covrl.policy_tokens` (validate once), the control's `surrogate`, `select_tokens`
(global, verl-local or precomputed), the control's `token_loss`, `covrl.aggregate`, the entropy
bonus when the control has one (`entropy_bonus_loss`) and `loss_metrics`. It returns
`(loss, metrics)`; the metrics are a dict of scalars with the same keys for every method (so
training loops can switch methods freely)::

  loss, loss_numerator, loss_denominator   the policy aggregate (covrl.aggregation); under
                    shard_map the returned loss is the device's share and these are global
  approx_kl         mean over valid tokens of log pi_old - log pi (log-ratio clamped to +-20): the
                    k1 estimate of KL(pi_old || pi), the same for every method
  ppo_kl            verl's `actor/ppo_kl` for this loss (`Control.ppo_kl_terms`): approx_kl for
                    the PPO family, its unclamped form for Clip-Cov, mean |log pi - log pi_old|
                    for KL-Cov
  clip_frac         fraction of valid tokens the PPO clip is active on (verl's pg_clipfrac)
  clip_frac_lower   fraction where the dual clip is active (pg_clipfrac_lower)
  cov_mean, cov_max mean and largest per-token covariance c_i over valid tokens
  selected_frac     fraction of valid tokens the method's selection acted on
  touched_frac      fraction of valid tokens whose loss the method changes (the bonus: all)
  nonfinite_tokens  valid tokens with a NaN or inf input, left out of what reads it (the
                    log-probabilities and advantages: every term; the logits: the entropy)
  entropy           mean token entropy, when `logits` (or per-token `entropy`) are passed
  entropy_coef      the bonus coefficient applied (0 without a bonus), likewise
  predicted_entropy_change  mean first-order change -Cov_pi(log pi, dz), when `logits` and the
                    logit update `logit_update` are passed (known for tabular policies)
  loss_entropy_change  the method's own first-order entropy effect (with `logits`): the mean of
                    -Cov_pi(log pi, dz_t) for the unit step dz_t = -d l_t / dz_t down each token
                    loss, bonus included (`covrl.score_step_entropy_change`; 2-3 more V-sums)

The verl-named functions `policy_gradient_loss`, `ppo_loss`, `clip_cov_loss` and `kl_cov_loss`
are thin wrappers with verl's keywords; `entropy_bonus_loss` is the bonus stage itself.

A weighted population (`weights=`, one share per row: every response of an enumerated tree with
its probability, say) gives the expected loss over that population: the limit of a sampled batch
in which each row occurs in proportion to its weight. Means, counts, aggregation and metrics are
weighted, and the selections are those of such a batch (`covrl.selection`: KL-Cov's top share
of the weight, Clip-Cov's expected draw, forking tokens' population quantile; no `min_count`).

Bad input: shapes, dtypes and hyperparameters are checked before tracing. A NaN or inf at a valid
position raises when the inputs are concrete; under jit such tokens are left out of the loss, the
statistics and the selection, and counted in `nonfinite_tokens`. An all-masked batch gives loss 0
and zero gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from covrl import _checks
from covrl import aggregation as agg
from covrl import methods as mt
from covrl import metrics as mx
from covrl import schedules as sch
from covrl import selection as sel
from covrl import softmax_entropy as ent
from covrl import tokens as tk
from covrl.covariance import centred_product, masked_mean
from covrl.metrics import Metrics


def select_tokens(control: mt.Control, tokens: tk.PolicyTokens, surrogate: tk.Surrogate, *,
                  key: jax.Array | None = None, step: Any = None, axis_name: str | None = None,
                  selected: jax.Array | None = None) -> tuple[jax.Array, sel.Selection]:
  """(c_i, selection): the pooled covariance and the tokens the control acts on.

  Global scope (the default) ranks the whole batch (global over devices with `axis_name`);
  verl's local scope (`selection="local"` on the control) computes c_i and the selection per
  group of `micro_batch_size` rows of this device's shard; `selected` is a precomputed [B, T]
  mask (gradient accumulation: select once on the whole batch, pass each micro-batch its rows);
  for a weighted population it may hold float shares.
  """
  if selected is not None:
    _checks.check_same_shape(("selected", "log_prob"), (selected, tokens.log_prob))
    selected = jnp.asarray(selected)
    if tokens.weight is not None and jnp.issubdtype(selected.dtype, jnp.floating):
      shares = jnp.where(tokens.valid, selected.astype(tokens.log_prob.dtype), 0.0)
      return tk.covariance(tokens, axis_name), sel.Selection(
          shares, jnp.sum(shares * tk.token_weight(tokens)))
    chosen = selected.astype(bool) & tokens.valid
    count = (jnp.sum(chosen, dtype=jnp.int32) if tokens.weight is None
             else tk.count_of(tokens, chosen))
    return tk.covariance(tokens, axis_name), sel.Selection(chosen, count)
  if getattr(control, "selection", "global") == "global":
    cov = tk.covariance(tokens, axis_name)
    return cov, control.select(tokens, cov, surrogate, key=key, step=step, axis_name=axis_name)
  if tokens.weight is not None:
    raise ValueError("a weighted population is selected over the whole batch: use "
                     "selection='global' with weights=.")

  # Local scope, as verl selects per micro-batch and per rank: statistics and counts per group
  # of rows of this device's shard; the loss is still aggregated over the whole batch.
  batch = tokens.valid.shape[0]
  if batch == 0:  # an empty batch: nothing to select, as in global scope
    return tk.covariance(tokens, axis_name), sel.empty_selection(tokens.valid.shape)
  size = batch if control.micro_batch_size is None else control.micro_batch_size
  if batch % size:
    raise ValueError(f"micro_batch_size={size} must divide the batch of {batch} rows.")
  groups = batch // size
  base = 0 if axis_name is None else lax.axis_index(axis_name) * batch

  def split(x):
    return None if x is None else x.reshape(groups, size, *x.shape[1:])

  def group(offset, old, new, adv, valid, loss, clipped, entropy):
    part = tk.PolicyTokens(old, new, adv, valid, jnp.zeros((), jnp.int32),
                           jnp.sum(valid, dtype=new.dtype), entropy)
    c = centred_product(new, adv, valid)
    chosen = control.select(part, c, tk.Surrogate(loss, clipped, None), key=key, step=step,
                            row_offset=base + offset)
    return c, chosen

  cov, chosen = jax.vmap(group)(
      jnp.arange(groups) * size, *(split(x) for x in (tokens.old_log_prob, tokens.log_prob,
                                                     tokens.advantages, tokens.valid,
                                                     surrogate.loss, surrogate.clipped,
                                                     tokens.entropy)))
  join = lambda x: x.reshape(batch, *x.shape[2:])
  return join(cov), sel.Selection(join(chosen.mask), jnp.sum(chosen.count))


def _policy_aggregate(loss_mat, tokens, loss_agg_mode, denominator, horizon, axis_name):
  if denominator is None and loss_agg_mode == "token-mean":  # reuse the count
    denominator = tokens.count if axis_name is None else lax.psum(tokens.count, axis_name)
  return agg.aggregate(loss_mat, tokens.valid, loss_agg_mode, denominator_override=denominator,
                       horizon=horizon, axis_name=axis_name, weights=tokens.weight)


def policy_loss(
    control: mt.Control,
    old_log_prob: jax.Array,
    log_prob: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    key: jax.Array | None = None,
    step: jax.Array | int | None = None,
    logits: jax.Array | None = None,
    entropy: jax.Array | None = None,
    temperature: float = 1.0,
    logit_update: jax.Array | None = None,
    selected: jax.Array | None = None,
    loss_agg_mode: agg.LossAggMode = "token-mean",
    denominator: jax.Array | float | None = None,
    horizon: int | None = None,
    axis_name: str | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """The token loss of `control` on verl's four [B, T] arrays, and its metrics.

  Args:
    control: the method, a covrl control value (`covrl.KLCov()`, `covrl.EntropyBonus(1e-3)`...).
    old_log_prob, log_prob, advantages, response_mask: [B, T] (`covrl.policy_tokens`).
    key: PRNG key, for a method that selects at random (Clip-Cov).
    step: the optimisation step, for scheduled strengths.
    logits: [B, T, V] logits of the current policy at the response positions: needed by the
      entropy bonus, and they add the entropy metrics.
    entropy: [B, T] per-token entropies of logits / temperature instead of `logits`, for
      vocabulary scale (`covrl.token_log_probs_and_entropy`): controls that read them
      (`Control.needs_entropy`) get them detached, the entropy bonus differentiates through
      them, and they give the entropy metrics. Ignored when `logits` are given.
    temperature: the sampling temperature > 0; entropies are those of logits / temperature
      (verl divides the logits by it; pass log-probabilities of the tempered logits too).
    logit_update: [B, T, V] update dz of logits / temperature, for the predicted change.
    selected: a precomputed [B, T] selection (see `select_tokens`).
    loss_agg_mode: aggregation mode (covrl.aggregation, verl's names).
    denominator: the whole batch's denominator, for exact gradient accumulation.
    horizon: divisor of seq-mean-token-sum-norm.
    axis_name: shard_map axis; statistics, selection and the denominator become global.
    weights: optional [B] population shares of the rows (finite, >= 0): the expected loss over a
      weighted population (see the module docstring); Clip-Cov then needs no `key`. Not with
      verl's local selection, nor with `axis_name` for the selecting methods.

  Returns:
    (loss, metrics); with a bonus the loss is the policy aggregate minus the coefficient times
    the aggregated entropy.

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> lp = jnp.log(jnp.array([[0.5, 0.25, 0.5]]))
    >>> loss, m = covrl.policy_loss(covrl.KLCov.paper_7b(), lp - 0.1, lp,
    ...                             jnp.array([[1.0, -1.0, 0.5]]), jnp.ones((1, 3)))
    >>> round(float(m["selected_frac"]), 4)  # max(int(2e-3 * 3), 1) = 1 of 3 tokens
    0.3333
  """
  control = mt.check_control(control)
  _checks.check_positive("temperature", temperature)
  control.check_call(key=key, step=step, has_logits=logits is not None or entropy is not None,
                     has_selected=selected is not None, has_weights=weights is not None)
  if control.needs_entropy and logits is None and entropy is None:
    raise ValueError(f"{type(control).__name__} reads each token's entropy: pass "
                     "logits=[B, T, V] or entropy=[B, T].")
  if logit_update is not None and logits is None:
    raise ValueError("logit_update needs logits too.")
  tokens = tk.policy_tokens(old_log_prob, log_prob, advantages, response_mask, weights=weights)
  if control.needs_entropy:
    tokens = tk.with_entropy(tokens, logits=logits, entropy=entropy, temperature=temperature)
  surrogate = control.surrogate(tokens)
  cov, selection = select_tokens(control, tokens, surrogate, key=key, step=step,
                                 axis_name=axis_name, selected=selected)
  loss_mat = control.token_loss(tokens, surrogate, selection, step=step,
                                axis_name=axis_name)
  aggregate = _policy_aggregate(loss_mat, tokens, loss_agg_mode, denominator, horizon,
                                axis_name)
  metrics = mx.loss_metrics(tokens, aggregate, cov, surrogate, selection,
                         control.touched(tokens, surrogate, selection), axis_name=axis_name,
                         ppo_kl=control.ppo_kl_terms(tokens))
  loss = aggregate.value
  if logits is not None or entropy is not None:
    given = None
    if logits is None:
      given = _checks.check_float_array("entropy", entropy)
      _checks.check_same_shape(("entropy", "response_mask"), (given, response_mask))
    coef = control.bonus_coefficient(step)
    if coef is not None:
      # The bonus reads the validated tokens, as every other term does: a token left out of
      # the policy loss (a NaN or inf input, a row outside the population) is left out of it.
      bonus, bonus_metrics = entropy_bonus_loss(
          logits, tokens.valid, coef=coef, temperature=temperature, entropy=given,
          loss_agg_mode=loss_agg_mode, denominator=denominator, horizon=horizon,
          axis_name=axis_name, weights=weights)
      loss = loss + bonus
    if logits is not None:
      entropy_metrics, terms, defined, undefined = mx.entropy_metrics(
          logits, temperature, logit_update, tokens.valid, axis_name, tk.token_weight(tokens))
      metrics.update(entropy_metrics)
      metrics["nonfinite_tokens"] += undefined
      metrics["loss_entropy_change"] = mx.loss_entropy_change(
          control, tokens, selection, terms, coef, step, defined, axis_name)
    else:
      h = lax.stop_gradient(jnp.where(tokens.valid, _checks.upcast(given), 0.0))
      defined = tokens.valid & jnp.isfinite(h)
      metrics["entropy"] = masked_mean(h, defined, axis_name, tk.token_weight(tokens))
      undefined = jnp.sum(tokens.valid & ~defined, dtype=jnp.int32)
      metrics["nonfinite_tokens"] += undefined if axis_name is None else lax.psum(undefined,
                                                                                axis_name)
    metrics["entropy_coef"] = lax.stop_gradient(
        jnp.zeros((), aggregate.value.dtype) if coef is None else bonus_metrics["entropy_coef"])
  return loss, metrics


def entropy_bonus_loss(
    logits: jax.Array | None,
    response_mask: jax.Array,
    *,
    coef: sch.Coefficient,
    temperature: float = 1.0,
    entropy: jax.Array | None = None,
    step: jax.Array | int | None = None,
    loss_agg_mode: agg.LossAggMode = "token-mean",
    denominator: jax.Array | float | None = None,
    horizon: int | None = None,
    axis_name: str | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """The entropy bonus -coef * agg(H), H the full-vocabulary entropy of logits / temperature.

  Add it to a policy loss (verl: policy_loss -= entropy_coeff * entropy_loss); `policy_loss`
  adds it for `covrl.EntropyBonus`. Its gradient touches every vocabulary entry at every valid
  position (a dense bias, THEORY.md T2).

  Args:
    logits: [B, T, V] logits of the current policy at the response positions, or None with
      `entropy`.
    response_mask: [B, T].
    coef: coefficient >= 0, or a schedule `step -> coef` (then pass `step`).
    temperature: the sampling temperature, > 0 (verl divides logits by it).
    entropy: [B, T] per-token entropies in place of `logits` (for example from
      `covrl.token_log_probs_and_entropy`); the bonus's gradient flows through them.
    step: optimisation step, for a scheduled coefficient.
    loss_agg_mode, denominator, horizon, axis_name, weights: as in `policy_loss`.

  Returns:
    (loss, {"entropy": the aggregated entropy, "entropy_coef": coef, "nonfinite_tokens"}).
  """
  _checks.check_positive("temperature", temperature)
  if (logits is None) == (entropy is None):
    raise ValueError("pass exactly one of logits=[B, T, V] and entropy=[B, T].")
  if logits is not None:
    logits = _checks.check_float_array("logits", logits)
    if logits.ndim != 3:
      raise ValueError(f"logits must be [batch, time, vocab], got shape {logits.shape}.")
    _checks.check_same_shape(("logits[..., 0]", "response_mask"),
                             (logits[..., 0], response_mask))
  else:
    entropy = _checks.check_float_array("entropy", entropy)
    _checks.check_same_shape(("entropy", "response_mask"), (entropy, response_mask), rank=2)
  mask = _checks.as_mask("response_mask", response_mask)
  coef = sch.value_at(coef, step, "coef")
  _checks.check_nonnegative("coef", coef)
  coef = jnp.asarray(coef)
  if logits is not None:
    # Padding positions may hold anything (even all -inf rows): replace them before the
    # entropy so that they reach neither the value nor the gradient.
    logits = ent.check_logits(jnp.where(mask[..., None], logits, 0.0))
    token_entropy = ent.entropy_reverse_only(logits / temperature)
  else:  # padding may hold anything (the where's gradient there is 0)
    token_entropy = _checks.upcast(jnp.where(mask, entropy, 0.0))
  valid = mask & jnp.isfinite(token_entropy)
  nonfinite = jnp.sum(mask & ~valid)
  if axis_name is not None:
    nonfinite = lax.psum(nonfinite, axis_name)
  h = agg.aggregate(
      jnp.where(valid, token_entropy, 0.0), valid, loss_agg_mode,
      denominator_override=denominator, horizon=horizon, axis_name=axis_name, weights=weights,
  )
  loss = -coef.astype(h.value.dtype) * h.value
  mean_entropy = h.value if axis_name is None else lax.psum(h.value, axis_name)
  metrics = {"entropy": mean_entropy, "entropy_coef": coef, "nonfinite_tokens": nonfinite}
  return loss, jax.tree.map(lax.stop_gradient, metrics)


# ----------------------------------------------------------------- verl-named thin wrappers
_COMMON = ("loss_agg_mode", "denominator", "horizon", "axis_name", "logits", "temperature",
           "logit_update")


def policy_gradient_loss(old_log_prob, log_prob, advantages, response_mask, **kwargs):
  """Unclipped importance-weighted policy gradient, token loss -A * pi / pi_old.

  `policy_loss(covrl.NoControl(clip_ratio=None), ...)`. On-policy (old_log_prob =
  stop_gradient(log_prob)) its gradient is REINFORCE's, -A grad log pi. Keywords: those of
  `policy_loss` (loss_agg_mode, denominator, horizon, axis_name, logits, logit_update).
  """
  return policy_loss(mt.NoControl(clip_ratio=None), old_log_prob, log_prob, advantages,
                     response_mask, **_only(kwargs, _COMMON, "policy_gradient_loss"))


def ppo_loss(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio=0.2,
             clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0, **kwargs):
  """PPO clipped surrogate with clip-higher and dual clip (verl's "vanilla" policy loss).

  `policy_loss(covrl.NoControl(clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c),
  ...)`; see `covrl.NoControl` for the formula. Other keywords: those of `policy_loss`.
  """
  control = mt.NoControl(clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
                         clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c)
  return policy_loss(control, old_log_prob, log_prob, advantages, response_mask,
                     **_only(kwargs, _COMMON, "ppo_loss"))


def clip_cov_loss(old_log_prob, log_prob, advantages, response_mask, *, key=None,
                  selected=None, **kwargs):
  """Clip-Cov with verl's keywords: `policy_loss(covrl.ClipCov(**fields), ..., key=key)`.

  Keywords: `covrl.ClipCov`'s fields (clip_cov_ratio, clip_cov_lb, clip_cov_ub, clip_ratio,
  clip_ratio_low, clip_ratio_high, min_count, max_ratio, selection, micro_batch_size), the PRNG
  `key` of the draw (or `selected`), and those of `policy_loss`.
  """
  fields, rest = _split(kwargs, mt.ClipCov, "clip_cov_loss")
  return policy_loss(mt.ClipCov(**fields), old_log_prob, log_prob, advantages, response_mask,
                     key=key, selected=selected, **rest)


def kl_cov_loss(old_log_prob, log_prob, advantages, response_mask, *, selected=None, **kwargs):
  """KL-Cov with verl's keywords: `policy_loss(covrl.KLCov(**fields), ...)`.

  Keywords: `covrl.KLCov`'s fields (kl_cov_ratio, ppo_kl_coef, min_count, max_ratio, selection,
  micro_batch_size), `selected`, and those of `policy_loss`.
  """
  fields, rest = _split(kwargs, mt.KLCov, "kl_cov_loss")
  return policy_loss(mt.KLCov(**fields), old_log_prob, log_prob, advantages, response_mask,
                     selected=selected, **rest)


def _only(kwargs: dict, allowed: tuple[str, ...], name: str) -> dict:
  unknown = set(kwargs) - set(allowed)
  if unknown:
    raise TypeError(f"{name}() got unexpected keyword arguments {sorted(unknown)}.")
  return kwargs


def _split(kwargs: dict, cls: type, name: str) -> tuple[dict, dict]:
  fields = {f.name for f in dataclasses.fields(cls)}
  rest = {k: v for k, v in kwargs.items() if k not in fields}
  _only(rest, (*_COMMON, "step"), name)
  return {k: v for k, v in kwargs.items() if k in fields}, rest
