"""Exact gradient accumulation for covrl's losses in tunix: one selection per optimizer step.

`install(learner)` wraps the actor trainer's `train` (see `covrl.integrations.tunix`): the k
micro-batches of an optimizer step are held back, the control's selection is made once over all
of them with the current parameters, and each micro-batch gets its rows and the mini-batch's
denominator / k, so that tunix's average of the k gradients is the gradient of one loss.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

import covrl
from covrl.integrations.tunix import losses as tl


def _cluster(learner):
  """The learner's cluster: `rl_cluster` in tunix 0.1.7, `rl_engine` on tunix's main branch."""
  engine = getattr(learner, "rl_engine", None)
  return engine if engine is not None else learner.rl_cluster


@functools.cache
def _with_covrl_field(base: type) -> type:
  """`base` (a tunix TrainExample class) with a `covrl: tl.StepInputs | None` field."""
  import flax

  @flax.struct.dataclass(frozen=True)
  class CovrlTrainExample(base):
    covrl: tl.StepInputs | None = None

  CovrlTrainExample.__name__ = CovrlTrainExample.__qualname__ = "Covrl" + base.__name__
  return CovrlTrainExample


def _attach(example, inputs: tl.StepInputs):
  cls = _with_covrl_field(type(example))
  values = {f.name: getattr(example, f.name) for f in dataclasses.fields(example)
            if f.name != "covrl"}
  return cls(**values, covrl=inputs)


def _select(control, key, step, old, new, adv, mask, entropy=None):
  """The control's selection over a whole batch and its covariance statistics."""
  tokens = covrl.policy_tokens(old, new, adv, mask)
  if control.needs_entropy:  # forking tokens rank by each token's entropy
    tokens = covrl.tokens.with_entropy(tokens, entropy=entropy)
  cov, chosen = covrl.select_tokens(control, tokens, control.surrogate(tokens), key=key,
                                    step=step)
  cov_max = jnp.max(jnp.where(tokens.valid, cov, -jnp.inf))
  return (chosen.mask, covrl.masked_mean(cov, tokens.valid),
          jnp.where(tokens.count > 0, cov_max, 0.0))


class _MiniBatchTrain:
  """The actor trainer's `train`, held back until the micro-batches of one optimizer step are in.

  It wraps `actor_trainer.train` (not the cluster's `update_actor`), so the selection's forward
  pass runs where tunix trains: on the actor's mesh, with the model loaded.
  """

  def __init__(self, learner, loss: tl.RegisteredLoss, selection: str):
    self._learner = learner
    self._loss = loss
    cluster = _cluster(learner)
    self._rollout = cluster.rollout
    self._trainer = cluster.actor_trainer
    self._train = self._trainer.train
    self._k = int(self._trainer.config.get_with_default("gradient_accumulation_steps", 1))
    self._global = selection == "global" and self._k > 1
    self._pending: list[tuple[list, Any, bool]] = []
    self._selectors: dict[int, Callable[..., Any]] = {}
    self._forward = None

  def __call__(self, train_ds, eval_ds=None, skip_jit=False):
    if eval_ds is not None:  # the step, for a scheduled strength in tunix's eval loss
      eval_ds = [_attach(ex, self._inputs(self._trainer.train_steps, 0)) for ex in eval_ds]
    if not self._global:  # each micro-batch selects on itself
      start = self._trainer.iter_steps
      examples = [_attach(ex, self._inputs((start + j) // self._k, (start + j) % self._k))
                  for j, ex in enumerate(train_ds)]
      return self._train(examples, eval_ds, skip_jit)
    self._pending.append((list(train_ds), eval_ds, skip_jit))
    flat = [ex for ds, _, _ in self._pending for ex in ds]
    if len(flat) < self._k:
      return None
    if len(flat) % self._k:
      raise NotImplementedError(f"tunix's calls gave {len(flat)} micro-batches, not a multiple "
                                f"of gradient_accumulation_steps={self._k}.")
    pending, self._pending = self._pending, []
    step = self._trainer.train_steps
    attached = iter([ex for i in range(0, len(flat), self._k)
                     for ex in self._mini_batch(flat[i:i + self._k], step + i // self._k)])
    for ds, eval_i, skip_i in pending:
      self._train([next(attached) for _ in ds], eval_i, skip_i)
    return None

  @staticmethod
  def _inputs(step, micro_batch, **fields) -> tl.StepInputs:
    return tl.StepInputs(jnp.asarray(step, jnp.int32), jnp.asarray(micro_batch, jnp.int32),
                      **fields)

  def _mini_batch(self, examples: list, step: int) -> list:
    """The micro-batches with their rows of one selection and the mini-batch's denominator."""
    cat = lambda f: jnp.concatenate([jnp.asarray(getattr(ex, f)) for ex in examples])
    mask = cat("completion_mask")
    mode = tl.loss_agg_mode(self._loss, self._learner.algo_config)
    # optax.MultiSteps averages the k gradients: a k-th of the denominator makes their mean the
    # gradient of one loss over the mini-batch (and tunix's logged mean its value).
    shared = dict(denominator=covrl.denominator(mask, mode) / self._k,
                  tokens=jnp.sum(mask, dtype=jnp.float32) / self._k)
    selected = None
    if self._loss.control.selects_tokens:
      selected, shared["cov_mean"], shared["cov_max"] = self._selection(examples, step)
    out, offset = [], 0
    for j, ex in enumerate(examples):
      rows = ex.completion_mask.shape[0]
      part = None if selected is None else selected[offset:offset + rows]
      out.append(_attach(ex, self._inputs(step, j, selected=part, **shared)))
      offset += rows
    return out

  def _log_probs(self, examples: list) -> tuple[jax.Array, jax.Array | None]:
    """[B, T] log-probs of the mini-batch under the current parameters, one micro-batch at a
    time (the [B, T, V] logits of the whole mini-batch need not fit at once), and the tokens'
    entropies when the control reads them (else None)."""
    from flax import nnx
    from tunix.rl import common

    if self._forward is None:
      pad_id, eos_id = self._rollout.pad_id(), self._rollout.eos_id()
      temperature = tl.temperature(self._learner.algo_config)

      needs_entropy = self._loss.control.needs_entropy

      def forward(graphdef, state, prompt_ids, completion_ids):
        # tunix divides the logits by the temperature itself (as in the registered loss).
        log_prob, logits = common.compute_per_token_logps(
            graphdef, state, prompt_tokens=prompt_ids, completion_tokens=completion_ids,
            pad_id=pad_id, eos_id=eos_id, stop_gradient=True, temperature=temperature,
            return_logits=True)
        return log_prob, covrl.entropy(logits) if needs_entropy else None

      self._forward = jax.jit(forward, static_argnums=0)
    graphdef, state = nnx.split(self._trainer.model)
    parts = [self._forward(graphdef, state, ex.prompt_ids, ex.completion_ids)
             for ex in examples]
    entropy = None if parts[0][1] is None else jnp.concatenate([h for _, h in parts])
    return jnp.concatenate([lp for lp, _ in parts]), entropy

  def _selection(self, examples: list, step: int):
    """The control's selection over the mini-batch, with the current (not yet updated) params."""
    rows = examples[0].completion_mask.shape[0]
    if rows not in self._selectors:
      control = self._loss.control
      if getattr(control, "selection", "global") == "local" and control.micro_batch_size is None:
        control = control.replace(micro_batch_size=rows)  # local: per tunix micro-batch
      # Closed over, the control's Python numbers stay static (verl's exact counts).
      self._selectors[rows] = jax.jit(functools.partial(_select, control))
    cat = lambda f: jnp.concatenate([jnp.asarray(getattr(ex, f)) for ex in examples])
    old = None if examples[0].old_per_token_logps is None else cat("old_per_token_logps")
    log_prob, entropy = self._log_probs(examples)
    old, new, adv, mask = tl.policy_inputs(cat("completion_mask"), cat("advantages"), old,
                                           log_prob)
    return self._selectors[rows](tl.step_key(self._loss.seed, step),
                                 jnp.asarray(step, jnp.int32), old, new, adv, mask, entropy)


def install(learner, *, selection: Literal["global", "local"] = "global") -> None:
  """Log covrl's metrics in a tunix learner and make its selection exact under accumulation.

  Call it after building the learner, whose config names a loss from `register`.

  Args:
    learner: a tunix learner (GRPOLearner, DAPOLearner, DrGRPOLearner).
    selection: "global" computes the loss over each optimizer mini-batch (one selection and one
      denominator: covrl's semantics, exact under gradient accumulation); "local" lets every
      micro-batch select and normalise on itself (verl's).
  """
  if selection not in ("global", "local"):
    raise ValueError(f"selection must be 'global' or 'local', got {selection!r}.")
  name = learner.algo_config.policy_loss_fn
  loss = tl.registered(name)
  tl.loss_agg_mode(loss, learner.algo_config)  # an unmapped tunix mode fails here, not in jit
  cluster = _cluster(learner)
  training = getattr(cluster.cluster_config, "training_config", None)
  if getattr(training, "max_seq_token_per_tpu", None) is not None:
    raise NotImplementedError("covrl's tunix losses do not support sequence packing yet.")
  trainer = cluster.actor_trainer
  if isinstance(trainer.train, _MiniBatchTrain):
    raise ValueError("covrl is already installed in this learner.")
  trainer.with_rl_metrics_to_log(dict(tl.LOGGED))
  trainer.train = _MiniBatchTrain(learner, loss, selection)
