"""The metrics of a policy loss (`covrl.policy_loss` returns them; see covrl.losses for each
key): the common ones from the loss's stages (`loss_metrics`), the entropy metrics of the logits,
and each method's own first-order entropy effect (`loss_entropy_change`).

Every mean is over the used tokens (weighted for a weighted population) and global over
`axis_name` under shard_map; every metric is detached.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from covrl import _checks
from covrl import aggregation as agg
from covrl import schedules as sch
from covrl import selection as sel
from covrl import softmax_entropy as ent
from covrl import tokens as tk
from covrl.covariance import masked_mean

Metrics = dict[str, jax.Array]


def loss_metrics(
    tokens: tk.PolicyTokens,
    aggregate: agg.Aggregate,
    cov: jax.Array,
    surrogate: tk.Surrogate,
    selection: sel.Selection,
    touched: jax.Array,
    *,
    axis_name: str | None = None,
    ppo_kl: jax.Array | None = None,
) -> Metrics:
  """The common metrics of a policy loss (see the module docstring), global over `axis_name`.

  `ppo_kl`: the [B, T] terms of verl's ppo_kl (`Control.ppo_kl_terms`); approx_kl's when None.
  """
  cov = lax.stop_gradient(cov)
  log_ratio = lax.stop_gradient(tk.log_ratio(tokens))
  dtype = cov.dtype
  # Per-token quantities are already 0 at unused tokens: plain sums (weighted ones for a
  # population), one count for every mean.
  zero = jnp.zeros((), dtype)
  weight = tk.token_weight(tokens)
  total = jnp.sum if weight is None else (lambda x: jnp.sum(weight * x))
  count_of = lambda m: zero if m is None else tk.count_of(tokens, m)
  sums = {
      "approx_kl": -total(log_ratio),
      "ppo_kl": -total(log_ratio) if ppo_kl is None else total(
          jnp.where(tokens.valid, lax.stop_gradient(ppo_kl), 0.0)),
      "clip_frac": count_of(None if surrogate.clipped is None else surrogate.clipped),
      "clip_frac_lower": count_of(surrogate.clipped_lower),
      "cov_mean": total(cov),
      "selected_frac": selection.count.astype(dtype),
      "touched_frac": count_of(touched),
  }
  cov_max = jnp.max(jnp.where(tokens.valid, cov, -jnp.inf), initial=-jnp.inf)  # B or T = 0
  nonfinite, count = tokens.nonfinite, tokens.count
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
  return jax.tree.map(lax.stop_gradient, out)


def entropy_metrics(logits, temperature, logit_update, valid, axis_name, weight):
  """The entropy metrics of [B, T, V] logits at the `valid` tokens (and the predicted change of
  `logit_update`), with the score terms, the tokens they are defined at and the undefined count:
  (metrics, terms, defined, undefined)."""
  logits = _checks.check_float_array("logits", logits)
  if logits.shape[:-1] != valid.shape:
    raise ValueError(f"logits must be [B, T, V] with [B, T] = {valid.shape}, got {logits.shape}.")
  logits = lax.stop_gradient(jnp.where(valid[..., None], logits, 0.0))
  if temperature != 1.0:
    logits = logits / temperature
  terms = ent.score_terms(logits)  # the entropy and, from the same pass, the score terms
  # Under jit, NaN / +inf / all -inf logits give entropy NaN: left out, counted in nonfinite.
  defined = valid & jnp.isfinite(terms.entropy)
  out = {"entropy": masked_mean(terms.entropy, defined, axis_name, weight)}
  if logit_update is not None:
    if jnp.shape(logit_update) != logits.shape:
      raise ValueError(f"logit_update {jnp.shape(logit_update)} must match logits {logits.shape}.")
    update = lax.stop_gradient(jnp.where(valid[..., None], logit_update, 0.0))
    predicted = ent.entropy_change_first_order(logits, update)
    defined = defined & jnp.isfinite(predicted)
    out["predicted_entropy_change"] = masked_mean(predicted, defined, axis_name, weight)
  undefined = jnp.sum(valid & ~defined, dtype=jnp.int32)
  undefined = undefined if axis_name is None else lax.psum(undefined, axis_name)
  return out, terms, defined, undefined


def loss_entropy_change(control, tokens, selection, terms, coef, step, defined,
                        axis_name) -> jax.Array:
  """Mean first-order entropy change of each position's unit logit step down its token loss."""
  tokens = jax.tree.map(lax.stop_gradient, tokens)

  def total(log_prob):  # the token losses' sum: its gradient is each token's own slope
    moved = tokens._replace(log_prob=log_prob)
    return jnp.sum(control.token_loss(moved, control.surrogate(moved), selection, step=step,
                                      axis_name=axis_name))

  slope = jax.grad(total)(tokens.log_prob)
  bonus = 0.0 if coef is None else lax.stop_gradient(jnp.asarray(sch.value_at(coef, step)))
  change = jnp.where(defined, ent.score_step_entropy_change(terms, tokens.log_prob, slope, bonus),
                     0.0)
  return lax.stop_gradient(masked_mean(change, defined, axis_name, tk.token_weight(tokens)))
