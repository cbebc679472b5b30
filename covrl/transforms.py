"""Entropy control as an optax gradient transformation, for policies whose parameters are logits.

In a tabular policy the parameters are the logits z (shape [K] for a bandit, [S, K] for S
states), so a control method is literally a change of the logit update dz. `transform(control)`
takes the gradient of the control's own surrogate over a batch of samples (`updates`) and adds
the change the control makes to it; it composes with any optax optimiser::

  opt = optax.chain(covrl.transform(covrl.EntropyBonus(0.01)), optax.sgd(0.1))
  opt = optax.chain(covrl.transform(covrl.KLCov(kl_cov_ratio=0.02, ppo_kl_coef=1.0)),
                    optax.sgd(0.1))

* a bonus adds -entropy_coeff * dH/dz at every state: dense and persistent;
* Clip-Cov and KL-Cov add the gradient of their token-loss change (`Control.loss_change`) on
  the samples they select, divided by the number of valid samples, as `covrl.policy_loss` does
  with token-mean aggregation: KL-Cov's penalty on the top-covariance samples, Clip-Cov's
  removal of the selected samples' terms; forking tokens likewise remove the terms of the
  samples below the entropy quantile;
* the reweighting controls (entropy advantage shaping, W-REINFORCE, STEER) add the gradient of
  their change on every sample the same way (a control that reads entropies gets the
  entropies of softmax(z / temperature) at the samples' states);
* NoControl and ClipHigher change nothing here: their whole effect is their surrogate.

Extra args of `update` (keyword-only): actions [N] (int), advantages [N], optional
response_mask [N], states [N] for [S, K] params, old_logits (params' shape; the behaviour
policy, on-policy when absent) and key (a PRNG key, for Clip-Cov's draw). Out-of-range actions
or states raise when concrete; under jit their samples are left out (never clamped or wrapped),
as NaN or inf advantages are. Scheduled strengths
are evaluated at the update count, which lives in the state. Under `optax.inject_hyperparams`,
build the value inside the factory: `inject_hyperparams(lambda entropy_coeff:
covrl.transform(covrl.EntropyBonus(entropy_coeff)))(entropy_coeff=0.1)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from covrl import _checks
from covrl import methods as mt
from covrl import softmax_entropy as ent
from covrl import tokens as tk
from covrl.losses import select_tokens


class ControlState(NamedTuple):
  """State of `transform`: the number of updates applied so far."""

  count: jax.Array


def _single_logits(params) -> jax.Array:
  leaves = jax.tree.leaves(params)
  if len(leaves) != 1 or leaves[0].ndim not in (1, 2):
    raise ValueError("a sample-based control needs params to be one logit array, [K] or [S, K].")
  return leaves[0]


def _sample_log_prob(logits, actions, states):
  logp = jax.nn.log_softmax(_checks.upcast(logits), axis=-1)
  if logits.ndim == 1:
    return logp[actions]
  if states is None:
    raise ValueError("params of shape [S, K] need the sampled `states` as an extra arg.")
  return logp[states, actions]


def _indices(name, idx, size):
  """(idx clipped into [0, size), in range): eager out-of-range indices raise; under jit the
  samples they index are left out (their mask entry is cleared), never clamped or wrapped."""
  idx = jnp.asarray(idx)
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise TypeError(f"{name} must be integers, got dtype {idx.dtype}.")
  ok = (idx >= 0) & (idx < size)
  if _checks.is_concrete(ok) and not bool(jnp.all(ok)):  # one scalar to the host
    first = int(idx.reshape(-1)[jnp.argmin(ok.reshape(-1))])
    raise ValueError(f"{name} must lie in [0, {size}), found {first}.")
  return jnp.clip(idx, 0, size - 1), ok


def _samples(actions, advantages, response_mask):
  """Samples as one [1, N] row of tokens: (advantages, mask, flatten)."""
  if actions is None or advantages is None:
    raise ValueError("this control acts on samples: pass actions= and advantages= to update().")
  actions = jnp.asarray(actions)
  advantages = _checks.check_float_array("advantages", advantages)
  if actions.shape != advantages.shape:
    raise ValueError(f"actions {actions.shape} and advantages {advantages.shape} must match.")
  if response_mask is None:
    response_mask = jnp.ones(actions.shape, bool)
  flatten = lambda x: jnp.reshape(x, (1, -1))
  mask = _checks.as_mask("response_mask", flatten(response_mask))
  return flatten(_checks.upcast(advantages)), mask, flatten


def _init(params) -> ControlState:
  del params
  return ControlState(jnp.zeros((), jnp.int32))


def transform(control: mt.Control, *, temperature: float = 1.0
              ) -> optax.GradientTransformationExtraArgs:
  """The control as an optax transform for logit parameters (see the module docstring).

  Args:
    control: a covrl control value.
    temperature: softmax temperature > 0 of the policy (the bonus's entropy is that of
      softmax(z / temperature)).

  Returns:
    An optax GradientTransformationExtraArgs; `update` needs `params` (the logits).

  Example:
    >>> import jax.numpy as jnp, optax, covrl
    >>> opt = optax.chain(covrl.transform(covrl.EntropyBonus(0.1)), optax.sgd(1.0))
    >>> z = jnp.array([2.0, 0.0, -1.0]); state = opt.init(z)
    >>> updates, state = opt.update(jnp.zeros(3), state, z)
    >>> bool(covrl.entropy(z + updates) > covrl.entropy(z))
    True
  """
  control = mt.check_control(control)
  _checks.check_positive("temperature", temperature)

  def update_fn(updates, state, params=None, *, actions=None, advantages=None, old_logits=None,
                response_mask=None, states=None, key=None, **extra):
    del extra
    if params is None:
      raise ValueError("covrl.transform needs params (the logits) in update().")
    count = state.count
    alpha = control.bonus_coefficient(count)
    if alpha is not None:
      _checks.check_nonnegative("entropy_coeff", alpha)

      def add_bonus(g, z):
        bonus = ent.entropy_grad(z / temperature) / temperature
        return (g - jnp.asarray(alpha) * bonus).astype(g.dtype)

      updates = jax.tree.map(add_bonus, updates, params)
    if control.selects_tokens or control.reweights_tokens:
      correction = _sample_correction(control, _single_logits(params), actions, advantages,
                                      old_logits, response_mask, states, key, count,
                                      temperature)
      updates = jax.tree.map(lambda g: (g + correction).astype(g.dtype), updates)
    return updates, ControlState(optax.safe_increment(count))

  return optax.GradientTransformationExtraArgs(_init, update_fn)


def _sample_logits(logits, actions, states):
  """[1, N, K] logits of each sample's state (for controls that read entropies)."""
  rows = jnp.broadcast_to(logits, (jnp.shape(actions)[0], logits.shape[-1])) \
      if logits.ndim == 1 else logits[states]
  return rows[None]


def _sample_correction(control, logits, actions, advantages, old_logits, response_mask, states,
                       key, count, temperature):
  """Gradient wrt the logits of the token mean of the control's loss change on the samples."""
  if control.needs_key and key is None:
    raise ValueError(f"{type(control).__name__} draws its samples at random: pass key= to "
                     "update().")
  adv, mask, flat = _samples(actions, advantages, response_mask)
  actions, in_range = _indices("actions", actions, logits.shape[-1])
  if logits.ndim == 2:
    if states is None:
      raise ValueError("params of shape [S, K] need the sampled `states` as an extra arg.")
    if jnp.shape(states) != actions.shape:
      raise ValueError(f"states {jnp.shape(states)} and actions {actions.shape} must match.")
    states, states_ok = _indices("states", states, logits.shape[0])
    in_range = in_range & states_ok
  mask = mask & flat(in_range)
  behaviour = logits if old_logits is None else jnp.asarray(old_logits)
  if behaviour.shape != logits.shape:
    raise ValueError(f"old_logits {behaviour.shape} must have the shape of params "
                     f"{logits.shape}.")
  old_lp = jax.lax.stop_gradient(flat(_sample_log_prob(behaviour, actions, states)))

  def tokens_at(z):
    tokens = tk.policy_tokens(old_lp, flat(_sample_log_prob(z, actions, states)), adv, mask)
    if control.needs_entropy:  # detached: the entropies of the current logits
      tokens = tk.with_entropy(tokens, logits=_sample_logits(z, actions, states),
                               temperature=temperature)
    return tokens

  # The selection is made under the current logits and held fixed (a stop-gradient choice).
  current = tokens_at(logits)
  _, selection = select_tokens(control, current, control.surrogate(current), key=key,
                               step=count)

  def change(z):
    tokens = tokens_at(z)
    delta = control.loss_change(tokens, control.surrogate(tokens), selection, step=count)
    # The used samples (valid, finite, in range), as the loss's token mean counts them.
    return jnp.sum(delta) / jnp.maximum(tokens.count, 1)

  return jax.grad(change)(logits)
