"""The tunix policy loss of a covrl control value, and what `install` passes it per micro-batch.

`register(control)` puts `covrl.policy_loss(control, ...)` into tunix's policy-loss registry (see
`covrl.integrations.tunix`); `StepInputs` is the field `install` adds to each train example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import covrl

# tunix (and flax's NNX through it) is imported inside the functions that use it: `import covrl`
# and this module's import work without tunix installed.

#: tunix's aggregation names (tunix.rl.common.aggregate_loss) -> covrl's (verl's) of equal value.
TUNIX_LOSS_AGG_MODES: Mapping[str, str] = MappingProxyType({
    "token-mean": "token-mean",
    "sequence-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    # tunix divides the sum of all token losses by the number of non-empty rows.
    "sequence-mean-token-sum-norm": "seq-mean-token-sum",
    # tunix divides each row's sum by the completion length T, then averages the rows.
    "sequence-mean-token-scale": "seq-mean-token-sum-norm",
})

#: The aux entries `install` has the actor trainer log, and how tunix reduces a step's values.
LOGGED: Mapping[str, Callable[[Any], Any]] = MappingProxyType({
    **{f"covrl/{name}": np.mean for name in (
        "approx_kl", "clip_frac", "clip_frac_lower", "cov_mean", "selected_frac", "touched_frac",
        "entropy", "entropy_coef")},
    "covrl/cov_max": np.max, "covrl/nonfinite_tokens": np.sum,
    "kl": np.mean, "pg_clipfrac": np.mean,  # the names tunix's own GRPO loss logs
})
# Means over the valid tokens, reweighted under `install`'s global selection (see `_exact_means`).
_TOKEN_MEANS = ("covrl/approx_kl", "covrl/clip_frac", "covrl/clip_frac_lower", "covrl/cov_mean",
                "covrl/selected_frac", "covrl/touched_frac", "covrl/entropy", "kl", "pg_clipfrac")


@dataclasses.dataclass(frozen=True)
class RegisteredLoss:
  """A registered loss: the control value and the options that are tunix's, not the method's.

  Attributes:
    control: the covrl control value.
    loss_agg_mode: covrl's aggregation mode (None: the learner's, translated).
    seed: seeds a random selection (`step_key`).
  """

  control: covrl.Control
  loss_agg_mode: str | None
  seed: int


_REGISTRY: dict[str, RegisteredLoss] = {}


def registered(name: str) -> RegisteredLoss:
  """The loss `register` registered as `name`."""
  if name not in _REGISTRY:
    raise ValueError(f"the learner's policy_loss_fn {name!r} is not a loss registered by "
                     "covrl.integrations.tunix.register.")
  return _REGISTRY[name]


class StepInputs(NamedTuple):
  """What `install` adds to each micro-batch (tunix's train example gains a `covrl` field).

  Attributes:
    step: [] int32, the optimizer step (a scheduled strength's step; keys Clip-Cov's draw).
    micro_batch: [] int32, the micro-batch's index within its optimizer step.
    selected: [B, T] bool, the micro-batch's rows of the mini-batch's selection (None: the
      micro-batch selects on itself).
    denominator: [] the mini-batch's aggregation denominator divided by k (None: its own).
    tokens: [] the mini-batch's valid tokens divided by k (None: token means are its own).
    cov_mean, cov_max: [] the mini-batch's covariance statistics (None: the micro-batch's).
  """

  step: jax.Array
  micro_batch: jax.Array
  selected: jax.Array | None = None
  denominator: jax.Array | None = None
  tokens: jax.Array | None = None
  cov_mean: jax.Array | None = None
  cov_max: jax.Array | None = None


def step_key(seed: int, step, micro_batch=0) -> jax.Array:
  """The PRNG key of a random selection (Clip-Cov's draw) at an optimizer step and micro-batch.

  `install`'s global selection draws once per step with micro-batch 0; a micro-batch that
  selects on itself uses its own index.
  """
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro_batch)


# ------------------------------------------------------------------ the tunix policy loss
def loss_agg_mode(loss: RegisteredLoss, algo_config) -> str:
  """covrl's aggregation mode of `loss` in a learner with config `algo_config`."""
  if loss.loss_agg_mode is not None:
    return loss.loss_agg_mode
  name = getattr(algo_config, "loss_agg_mode", "token-mean")
  if name not in TUNIX_LOSS_AGG_MODES:
    raise ValueError(f"tunix's loss_agg_mode {name!r} has no covrl equivalent; pass "
                     "register(..., loss_agg_mode=...).")
  return TUNIX_LOSS_AGG_MODES[name]


def temperature(algo_config) -> float:
  """The temperature of the trainer's log-probs (tunix divides the logits by it)."""
  # tunix's learner copies the rollout temperature into its config; the trainer's log-probs are
  # those of the tempered logits, as in tunix's own GRPO loss.
  return getattr(algo_config, "temperature", 1.0)


def _check_supported(train_example, algo_config) -> None:
  if getattr(train_example, "segment_ids", None) is not None:
    raise NotImplementedError("covrl's tunix losses do not support sequence packing yet.")
  if getattr(train_example, "sampler_is_weights", None) is not None:
    raise NotImplementedError("covrl's tunix losses do not apply sampler_is weights yet.")
  if getattr(algo_config, "kl_coef", 0.0) and not hasattr(algo_config, "beta"):
    raise NotImplementedError("covrl's tunix losses add GRPO's beta KL term, not PPO's kl_coef.")


def policy_inputs(mask, advantages, old_log_prob, log_prob):
  """verl's four [B, T] arrays from a tunix train example's fields and the current log-probs."""
  adv = jnp.asarray(advantages)
  if adv.ndim == 1:  # GRPO: one advantage per sequence
    adv = jnp.broadcast_to(adv[:, None], mask.shape)
  # tunix computes no old log-probs when num_iterations == 1: the step is on-policy.
  old = lax.stop_gradient(log_prob) if old_log_prob is None else old_log_prob
  return old, log_prob, adv, mask


def _key(loss: RegisteredLoss, example, inputs: StepInputs | None) -> jax.Array:
  if inputs is not None:
    return step_key(loss.seed, inputs.step, inputs.micro_batch)
  # Without `install` (no step is known) the draw is keyed by the batch's token ids.
  ids = jnp.asarray(example.completion_ids).astype(jnp.uint32)
  weights = jnp.arange(1, ids.size + 1, dtype=jnp.uint32).reshape(ids.shape)
  return jax.random.fold_in(jax.random.key(loss.seed), jnp.sum(ids * weights))


def _check_call(control, key, step, selected) -> None:
  """The control's own check of what its loss needs, with the tunix way to give it."""
  try:
    control.check_call(key=key, step=step, has_logits=True, has_selected=selected is not None)
  except ValueError as err:
    if step is None:
      raise ValueError(f"{err} In tunix, covrl.integrations.tunix.install(learner) passes the "
                       "optimizer step.") from err
    raise


def _reference_kl(log_prob, example, algo_config, mask, mode, denominator):
  """GRPO's beta * KL(pi || pi_ref) term as tunix computes it, aggregated as the policy loss."""
  from tunix.rl import common

  ref = example.ref_per_token_logps
  if ref is None:
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  kl = common.compute_kl_divergence(
      log_prob, ref, getattr(algo_config, "kl_loss_mode", "kl"),
      clamp_value=getattr(algo_config, "kl_clamp_value", None))
  term = covrl.aggregate(kl, mask, mode, denominator_override=denominator).value
  beta = getattr(algo_config, "beta", None) or 0.0  # DAPO's beta=None: no KL term
  return beta * term, lax.stop_gradient(covrl.masked_mean(kl, mask))


def _exact_means(aux: dict, mask, inputs: StepInputs | None) -> dict:
  """Under the global selection, tunix's mean over a step's micro-batches of the reweighted means
  sum_i(n_i m_i) / N is the mini-batch's mean (n_i valid tokens of micro-batch i, N = sum n_i)."""
  if inputs is None or inputs.tokens is None:
    return aux
  valid = jnp.sum(mask, dtype=jnp.float32) - aux["covrl/nonfinite_tokens"]
  weight = valid / jnp.maximum(inputs.tokens, 1e-30)
  aux = {k: v * weight.astype(jnp.result_type(v)) if k in _TOKEN_MEANS else v
         for k, v in aux.items()}
  if inputs.cov_mean is not None:
    aux.update({"covrl/cov_mean": inputs.cov_mean, "covrl/cov_max": inputs.cov_max})
  return aux


def _tunix_loss(loss: RegisteredLoss, model, example, algo_config, pad_id, eos_id):
  from flax import nnx
  from tunix.rl import common

  _check_supported(example, algo_config)
  graphdef, state = nnx.split(model)
  # tunix divides the logits by the temperature itself: covrl's temperature is 1 on them.
  log_prob, logits = common.compute_per_token_logps(
      graphdef, state, prompt_tokens=example.prompt_ids,
      completion_tokens=example.completion_ids, pad_id=pad_id, eos_id=eos_id,
      stop_gradient=False, return_logits=True, temperature=temperature(algo_config))
  old, new, adv, mask = policy_inputs(example.completion_mask, example.advantages,
                                       example.old_per_token_logps, log_prob)
  inputs = getattr(example, "covrl", None)
  step = None if inputs is None else inputs.step
  selected = None if inputs is None else inputs.selected
  denominator = None if inputs is None else inputs.denominator
  key = _key(loss, example, inputs) if loss.control.needs_key and selected is None else None
  _check_call(loss.control, key, step, selected)
  mode = loss_agg_mode(loss, algo_config)
  value, metrics = covrl.policy_loss(
      loss.control, old, new, adv, mask, key=key, step=step, logits=logits, selected=selected,
      loss_agg_mode=mode, denominator=denominator)
  kl_term, kl_mean = _reference_kl(new, example, algo_config, mask, mode, denominator)
  aux = {f"covrl/{k}": v for k, v in metrics.items()}
  aux.update(kl=kl_mean, pg_clipfrac=metrics["clip_frac"])
  return value + kl_term, _exact_means(aux, mask, inputs)


def _spec(control, loss_agg_mode, seed) -> RegisteredLoss:
  control = covrl.methods.check_control(control)
  if loss_agg_mode is not None:
    covrl.aggregation.check_mode(loss_agg_mode)
  if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
  return RegisteredLoss(control, loss_agg_mode, int(seed))


def _loss_fn(loss: RegisteredLoss):
  def tunix_policy_loss(model, train_example, algo_config, pad_id, eos_id, **kwargs):
    del kwargs
    return _tunix_loss(loss, model, train_example, algo_config, pad_id, eos_id)

  return tunix_policy_loss


def register(control: covrl.Control, name: str | None = None, *,
             loss_agg_mode: str | None = None, seed: int = 0) -> str:
  """Register `control` as a tunix policy loss; returns its name (for `policy_loss_fn=`).

  The loss is covrl's plus GRPO's `beta` reference-KL term as tunix computes it (none for DAPO's
  beta=None); its aux holds covrl's metrics as "covrl/<name>" and tunix's "kl" and "pg_clipfrac".
  Register before building the learner (it looks the loss up when built); `install` finds the
  control by the learner's loss name.

  Args:
    control: a covrl control value, any registered method (`covrl.METHODS`).
    name: registry name; "covrl_<method>" by default (a second registration overwrites).
    loss_agg_mode: covrl's aggregation mode; None takes the learner's `loss_agg_mode`,
      translated from tunix's name (TUNIX_LOSS_AGG_MODES).
    seed: seeds a random selection (Clip-Cov's draw; see `step_key`).

  Returns:
    The name.
  """
  from tunix.rl import function_registry

  loss = _spec(control, loss_agg_mode, seed)
  name = f"covrl_{loss.control.name}" if name is None else name
  function_registry.register_policy_loss_fn(name)(_loss_fn(loss))
  _REGISTRY[name] = loss
  return name


