"""The first stage of every policy loss: verl's four [batch, time] arrays, validated once.

`policy_tokens(old_log_prob, log_prob, advantages, response_mask)` checks shapes and dtypes
(before tracing), promotes to at least float32, and marks the tokens the loss may use: valid
(mask 1) and finite in all three inputs. Every array is 0 wherever a token is not used, so the
later stages need no masked copies and NaN or inf in padding reaches neither values nor
gradients. A NaN or inf at a valid position raises when the inputs are concrete; under jit such
tokens are left out and counted in `nonfinite`.

A weighted population (`weights=`: one share per row, for example every response of an
enumerated tree with its probability) makes every later sum a weighted one: `count` is then the
total weight of the used tokens, and rows of weight 0 are not used.

The later stages (covrl.methods: the surrogate, the selection, the token loss; covrl.aggregation;
covrl.losses for the metrics) take a `PolicyTokens` and never validate again.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from covrl import _checks
from covrl.covariance import centred_product, finite_tokens

# verl clamps the log-ratio before exp for stability; covrl does so in every loss.
LOG_RATIO_CLAMP = 20.0


class PolicyTokens(NamedTuple):
  """Validated policy-loss inputs (see the module docstring).

  Attributes:
    old_log_prob, log_prob, advantages: [B, T] in the computation dtype (at least float32),
      0 at tokens that are not used.
    valid: [B, T] bool, the tokens the loss uses.
    nonfinite: [] int, valid-mask tokens left out because an input was NaN or inf.
    count: [] number of used tokens (this device's, under shard_map), as a float; their total
      weight for a weighted population.
    entropy: [B, T] full-vocabulary entropy of each token's position, detached, 0 at unused
      tokens; None unless the control reads it (`with_entropy`).
    weight: [B] the population share of each row (None for a sampled batch, where every token
      counts once); `token_weight` gives the [B, T] weights, 0 at unused tokens.
  """

  old_log_prob: jax.Array
  log_prob: jax.Array
  advantages: jax.Array
  valid: jax.Array
  nonfinite: jax.Array
  count: jax.Array
  entropy: jax.Array | None = None
  weight: jax.Array | None = None


class Surrogate(NamedTuple):
  """A per-token policy loss before selection, and where PPO's clips bind.

  Attributes:
    loss: [B, T] token loss.
    clipped: [B, T] bool, PPO's clip is active (None for unclipped losses).
    clipped_lower: [B, T] bool, the dual clip is active (None without it).
  """

  loss: jax.Array
  clipped: jax.Array | None
  clipped_lower: jax.Array | None


def policy_tokens(old_log_prob: jax.Array, log_prob: jax.Array, advantages: jax.Array,
                  response_mask: jax.Array, *, weights: jax.Array | None = None
                  ) -> PolicyTokens:
  """Validate and clean verl's four [B, T] policy-loss inputs (see the module docstring).

  Args:
    old_log_prob: [B, T] log pi_old of the sampled tokens (behaviour policy).
    log_prob: [B, T] log pi of the sampled tokens under the current policy.
    advantages: [B, T] advantages.
    response_mask: [B, T] 0/1 or bool, 1 at valid response tokens.
    weights: optional [B] population shares of the rows, finite and >= 0 (a negative or
      non-finite one raises when concrete; under jit its row is left out, as are rows of
      weight 0).

  Returns:
    PolicyTokens.
  """
  names = ("old_log_prob", "log_prob", "advantages")
  arrays = [_checks.check_float_array(n, x) for n, x in zip(names, (old_log_prob, log_prob,
                                                                     advantages))]
  _checks.check_same_shape((*names, "response_mask"), (*arrays, response_mask), rank=2)
  mask = _checks.as_mask("response_mask", response_mask)
  for n, x in zip(names, arrays):
    _checks.check_finite_where(n, x, mask)
  dtype = _checks.result_dtype(*arrays)
  arrays = [x.astype(dtype) for x in arrays]
  finite = finite_tokens(mask, *arrays)
  nonfinite = jnp.sum(mask & ~finite)
  valid = finite
  if weights is not None:
    # Rows outside the population (weight 0, or not a valid weight under jit) are not used;
    # only the non-finite inputs count in `nonfinite`.
    weights = _checks.check_weights(weights, mask.shape[0]).astype(dtype)
    weights = jnp.where(weights > 0, weights, 0.0)
    valid = finite & (weights[:, None] > 0)
  # Safe values at invalid positions keep NaN out of values and gradients alike.
  old, new, adv = (jnp.where(valid, x, 0.0) for x in arrays)
  if weights is None:
    return PolicyTokens(old, new, adv, valid, nonfinite, jnp.sum(valid, dtype=dtype))
  return PolicyTokens(old, new, adv, valid, nonfinite,
                      jnp.sum(jnp.where(valid, weights[:, None], 0.0)), weight=weights)


def token_weight(tokens: PolicyTokens) -> jax.Array | None:
  """[B, T] the weight of each token (its row's share, 0 at unused tokens), or None for a
  sampled batch (every used token counts once)."""
  if tokens.weight is None:
    return None
  return jnp.where(tokens.valid, tokens.weight[:, None], 0.0)


def count_of(tokens: PolicyTokens, mask: jax.Array) -> jax.Array:
  """How many used tokens `mask` marks (their total weight for a weighted population, where
  `mask` may also hold shares in [0, 1] of each token, as a population's selection does)."""
  if tokens.weight is None:
    return jnp.sum(mask & tokens.valid, dtype=tokens.count.dtype)
  if jnp.issubdtype(mask.dtype, jnp.floating):
    return jnp.sum(token_weight(tokens) * mask)
  return jnp.sum(jnp.where(mask & tokens.valid, tokens.weight[:, None], 0.0))


def with_entropy(tokens: PolicyTokens, *, logits: jax.Array | None = None,
                 entropy: jax.Array | None = None, temperature: float = 1.0) -> PolicyTokens:
  """`tokens` with their per-position entropies (detached), for controls that read them.

  Args:
    tokens: validated tokens.
    logits: [B, T, V] logits (the entropy is that of logits / temperature), or
    entropy: [B, T] entropies computed elsewhere (`covrl.token_log_probs_and_entropy` at
      vocabulary scale, for example). Non-finite values at used tokens leave those tokens out.
    temperature: the sampling temperature (with `logits`).

  Returns:
    PolicyTokens with `entropy` set.
  """
  from covrl import softmax_entropy as ent  # math on logits sits above this stage

  if entropy is not None:
    h = _checks.upcast(_checks.check_float_array("entropy", entropy))
    _checks.check_same_shape(("entropy", "log_prob"), (h, tokens.log_prob))
  elif logits is not None:
    logits = _checks.check_float_array("logits", logits)
    if logits.shape[:-1] != tokens.valid.shape:
      raise ValueError(f"logits must be [B, T, V] with [B, T] = {tokens.valid.shape}, got "
                       f"{logits.shape}.")
    h = ent.entropy(jnp.where(tokens.valid[..., None], logits, 0.0) / temperature)
  else:
    raise ValueError("this control reads each token's entropy: pass logits=[B, T, V] or "
                     "entropy=[B, T].")
  h = jax.lax.stop_gradient(h.astype(tokens.log_prob.dtype))
  valid = tokens.valid & jnp.isfinite(h)
  drop = lambda x: jnp.where(valid, x, 0.0)
  kept = tokens._replace(valid=valid)
  return kept._replace(old_log_prob=drop(tokens.old_log_prob), log_prob=drop(tokens.log_prob),
                       advantages=drop(tokens.advantages),
                       nonfinite=tokens.nonfinite + jnp.sum(tokens.valid & ~valid),
                       count=count_of(kept, valid), entropy=drop(h))


@jax.custom_jvp
def clamp(x: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
  """`jnp.clip(x, low, high)` with `torch.clamp`'s derivative: 1 on the closed range [low, high].

  jnp.clip's derivative is 1/2 exactly at a bound, torch.clamp's 1, so a ratio exactly at
  1 - eps_low or 1 + eps_high (or a log-ratio exactly at +-20) would give 3/4 (or 1/2) of verl's
  gradient. Outside the range the derivative goes to the bound that binds, as for jnp.clip.
  """
  return jnp.clip(x, low, high)


@clamp.defjvp
def _clamp_jvp(primals, tangents):
  x, low, high = primals
  dx, dlow, dhigh = tangents
  inside = (x >= low) & (x <= high)
  return clamp(x, low, high), jnp.where(inside, dx, jnp.where(x < low, dlow, dhigh))


def _clamp(x: jax.Array, low, high) -> jax.Array:
  # Scalar bounds stay scalars (broadcast by jnp.where): a bound broadcast to x's shape would be
  # unsharded beside a sharded x, which a mesh with Explicit axes rejects in the JVP's where.
  low, high = (jnp.asarray(b, x.dtype) for b in (low, high))
  return clamp(x, low, high)


def log_ratio(tokens: PolicyTokens) -> jax.Array:
  """log pi - log pi_old, clamped to [-20, 20] (verl's clamp, with torch.clamp's derivative)."""
  return _clamp(tokens.log_prob - tokens.old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def ratio(tokens: PolicyTokens) -> jax.Array:
  """The importance ratio pi / pi_old of the clamped log-ratio."""
  return jnp.exp(log_ratio(tokens))


def clipped_surrogate(advantages: jax.Array, ratio_: jax.Array, low, high
                      ) -> tuple[jax.Array, jax.Array]:
  """PPO's token loss max(-A r, -A clip(r, 1 - low, 1 + high)) and where the clip binds.

  The clip has torch.clamp's derivative (`clamp`), so the gradient exactly at a bound is
  verl's; jnp.maximum splits a tie evenly, as torch.maximum does.
  """
  unclipped = -advantages * ratio_
  clipped = -advantages * _clamp(ratio_, 1.0 - low, 1.0 + high)
  return jnp.maximum(unclipped, clipped), clipped > unclipped


def covariance(tokens: PolicyTokens, axis_name: str | None = None) -> jax.Array:
  """[B, T] pooled c_i (Cui et al. Eq. 10) of the used tokens, means global with `axis_name`
  (weighted for a weighted population)."""
  return centred_product(tokens.log_prob, tokens.advantages, tokens.valid, axis_name=axis_name,
                         count=tokens.count, weight=token_weight(tokens))
