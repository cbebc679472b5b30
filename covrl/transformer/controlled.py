"""Closed-loop entropy control in the GRPO loop: a controller sets the bonus coefficient each step.

`ControlledTrainer(config, controller)` runs the GRPO step of `covrl.transformer.grpo` (the same
rollout, advantages, PPO epochs and mini-batches, losses and optimiser) with the entropy bonus as
the control, except that before each step's update the controller chooses its coefficient c_t:

  1. the rollout batch and its tempered logits z / tau, whose pooled entropy H_t (mean over the
     valid tokens, global over devices) is what the controller tracks;
  2. for the predictive controller, gradients at the rollout parameters on the rows of the step's
     first mini-batch (the rows its first update uses; `prediction_rows="batch"` for all rows),
     from one forward pass (`jax.jacrev`): the on-policy policy loss g_pg (at ratio 1 the PPO
     surrogate's gradient is the policy gradient's), the pooled entropy g_H, and the bonus per
     unit coefficient g_b (= -g_H with token-mean aggregation, which saves a backward pass);
  3. the candidate update dtheta(c): the wrapped optimiser (clip + Adam, from the current
     optimiser state) applied once per inner update (ppo_epochs * num_minibatches times) to the
     gradient g_pg + c g_b;
  4. the predicted change f(c) = <g_H, dtheta(c)>. This *is* the pooled first-order predictor of
     THEORY.md T1 with the linearised logit change: for every context s,
     -Cov_{pi_s}(log pi_s, J_s dtheta) = grad_z H_s . J_s dtheta, and summed with the pooling
     weights this is grad_theta H . dtheta. Each evaluation is element-wise optimiser arithmetic
     and one dot product; Adam makes f non-affine in c, so use the "grid" (or "bisection")
     solver; "newton" differentiates through Adam's sqrt(v), infinite where v = 0 (parameters
     that never had a gradient), so its prediction comes out non-finite and is not used;
  5. the update with c_t, and the step's metrics, plus the controller's.

What the prediction leaves out (so the tracking error is larger than in the tabular lab): the
curvature of the logits in theta (T1.7), the second-order term, the later mini-batches' own
gradients (the simulation repeats the first one's), Adam's first step (a sign step, piecewise
constant in c), and the sampling noise between the batch the prediction is made on and the next
step's batch, on which H_{t+1} is measured.

With a mesh, the batch is sharded over its "data" axis as in `grpo.Trainer`; the pooled entropy
and the gradients are global (XLA reduces them), so the controller sees the statistics of the
whole batch on any number of devices.

Example:
  >>> import jax
  >>> from covrl import controllers
  >>> from covrl.transformer import GRPOConfig, controlled, tasks
  >>> config = GRPOConfig(tasks.Sort(6, 3), num_steps=3, sft=None)
  >>> ctl = controllers.predictive(1.0, vocab_size=config.model.vocab_size,
  ...                              coef_range=(0.0, 0.05), solver="grid")
  >>> state, metrics = controlled.make_controlled_train(config, ctl)(jax.random.key(0))
  >>> metrics["control_coef"].shape
  (3,)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import covrl
from covrl import controllers as ctl
from covrl import entropy_prediction as ep
from covrl import schedules
from covrl.transformer import grpo, sampling
from covrl.transformer.config import GRPOConfig
from covrl.transformer.loss import Batch


class ControlledState(NamedTuple):
  """Loop state: the GRPO state, the controller's, and the gains of a controller family.

  Attributes:
    train: the GRPO loop state.
    controller: the controller's state.
    lane: [lane_size] traced gains a controller family is built from ([0] otherwise).
  """

  train: grpo.TrainState
  controller: ctl.ControllerState
  lane: jax.Array


class _Info(NamedTuple):
  needs_prediction: bool
  vocab_size: int | None
  coef_range: tuple[float, float]


def _probe(family, lane_size: int) -> _Info:
  """The static attributes of a family's controllers, read off one built on an abstract lane."""
  found = []

  def build(lane):
    c = family(lane)
    if not isinstance(c, ctl.Controller):
      raise TypeError(f"a controller family must return Controllers, got {type(c).__name__}.")
    found.append(_Info(c.needs_prediction, c.vocab_size, c.coef_range))
    return jnp.zeros(())

  jax.eval_shape(build, jax.ShapeDtypeStruct((lane_size,), jnp.float32))
  return found[0]


def _tree_dot(a, b) -> jax.Array:
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class ControlledTrainer:
  """A GRPO Trainer whose entropy-bonus coefficient a controller sets before every update.

  Args:
    config: the GRPO run; its control must be `covrl.NoControl` or `covrl.EntropyBonus` (the
      bonus, whose coefficient the controller sets; NoControl's PPO settings are kept).
    controller: a `covrl.controllers` controller with vocab_size = config.model.vocab_size, or
      a controller family: a function lane -> Controller of a [lane_size] array of gains (for
      example `controllers.switch` over several controllers with traced gains), so that one
      compiled program runs a whole grid; `init(..., lane=)` picks the member.
    mesh: optional mesh with a "data" axis (as `grpo.Trainer`); the entropy and the gradients
      are then global (the batch is sharded, the statistics reduced by XLA).
    prediction_rows: "minibatch" (default) predicts from the rows of the step's first
      mini-batch, the ones its first update uses (cost: one forward and three backward passes
      over a mini-batch); "batch" from the whole rollout batch (the same over the whole batch).
    lane_size: the length of a family's lane (required with a family).
    predicts: for a family whose members are not all predictive, a function lane -> bool
      (traced) saying whether the member uses predictions; the prediction's gradients are then
      computed under `lax.cond`, only for members that use them (so a fixed member of the same
      program costs what a fixed coefficient costs).
  """

  def __init__(self, config: GRPOConfig, controller: Any,
               mesh: jax.sharding.Mesh | None = None, *, prediction_rows: str = "minibatch",
               lane_size: int | None = None, predicts: Any = None):
    if isinstance(controller, ctl.Controller):
      info = _Info(controller.needs_prediction, controller.vocab_size, controller.coef_range)
      self._build, self.lane_size = (lambda lane: controller), 0
    elif callable(controller):
      if isinstance(lane_size, bool) or not isinstance(lane_size, int) or lane_size < 1:
        raise ValueError(f"a controller family needs lane_size, an int >= 1, got "
                         f"{lane_size!r}.")
      info = _probe(controller, lane_size)
      self._build, self.lane_size = controller, lane_size
    else:
      raise TypeError(f"controller must be a covrl.controllers.Controller or a function "
                      f"lane -> Controller, got {type(controller).__name__}.")
    control = config.control
    if not isinstance(control, covrl.NoControl | covrl.EntropyBonus):
      raise ValueError(f"the controlled GRPO loop sets the entropy-bonus coefficient: the "
                       f"config's control must be covrl.NoControl or covrl.EntropyBonus "
                       f"('none' or 'entropy'), got {type(control).__name__} "
                       f"({control.name!r}).")
    if isinstance(control, covrl.NoControl):
      config = dataclasses.replace(config, control=covrl.EntropyBonus(
          0.0, clip_ratio=control.clip_ratio, clip_ratio_low=control.clip_ratio_low,
          clip_ratio_high=control.clip_ratio_high, clip_ratio_c=control.clip_ratio_c))
    if info.vocab_size is not None and info.vocab_size != config.model.vocab_size:
      raise ValueError(f"the controller was built for vocab_size={info.vocab_size}; the "
                       f"model's vocabulary has {config.model.vocab_size} entries.")
    if info.coef_range[0] < 0:
      raise ValueError("the bonus coefficient must be >= 0: coef_range starts below 0.")
    if prediction_rows not in ("minibatch", "batch"):
      raise ValueError(f"prediction_rows must be 'minibatch' or 'batch', got "
                       f"{prediction_rows!r}.")
    if predicts is not None and not (self.lane_size and callable(predicts)):
      raise ValueError("predicts (lane -> bool) applies to a controller family only.")
    self.config, self.info, self.prediction_rows = config, info, prediction_rows
    self.predicts = predicts
    self.trainer = grpo.get_trainer(config, mesh)
    self._init_controller = jax.jit(lambda lane: self._build(lane).init())
    self.step = jax.jit(self._step)
    self.run = jax.jit(self._run, static_argnums=(1,))

  def init(self, key: jax.Array, params: Any = None, lane: Any = None) -> ControlledState:
    """Initial state: `params` (or the warm start of `key`), and the family member `lane`."""
    if self.lane_size:
      if lane is None:
        raise ValueError("a controller family needs `lane` (its gains) in init().")
      lane = jnp.asarray(lane, jnp.float32)
      if lane.shape != (self.lane_size,):
        raise ValueError(f"lane must have shape ({self.lane_size},), got {lane.shape}.")
    else:
      lane = jnp.zeros((0,), jnp.float32)
    control = self.config.control.with_strength(float(self.info.coef_range[0]))
    # Built under jit: a family's gains are traced, so its other members' checks do not apply.
    return ControlledState(self.trainer.init(key, params, control=control),
                           self._init_controller(lane), lane)

  def _prediction(self, state: grpo.TrainState, batch: Batch):
    """(g_pg, g_b, g_H) at the rollout parameters: three gradients from one forward pass.

    On-policy (ratio 1) the PPO surrogate's gradient is the policy gradient's, so g_pg is the
    gradient of covrl.policy_gradient_loss; the bonus per unit coefficient is
    covrl.entropy_bonus_loss(coef=1) in the run's aggregation mode.
    """
    cfg, model = self.config, self.trainer.model
    mask, adv = batch.response_mask, batch.advantages

    # With token-mean aggregation the bonus per unit coefficient is minus the pooled entropy
    # (same tokens, same mean), so its gradient is -g_H and one backward pass is saved.
    token_mean = cfg.loss_agg_mode == "token-mean"

    def pieces(params):
      raw = sampling.response_logits(model, params, batch.prompts, batch.responses, 1.0)
      logits = raw / cfg.temperature
      lp = sampling.token_log_probs(logits, batch.responses)
      pg, _ = covrl.policy_gradient_loss(jax.lax.stop_gradient(lp), lp, adv, mask,
                                         loss_agg_mode=cfg.loss_agg_mode)
      out = [pg, ep.pooled_entropy(logits, mask)]
      if not token_mean:
        bonus, _ = covrl.entropy_bonus_loss(raw, mask, coef=1.0, temperature=cfg.temperature,
                                            loss_agg_mode=cfg.loss_agg_mode)
        out.append(bonus)
      return jnp.stack(out)

    jac = jax.jacrev(pieces)(state.params)
    g_pg, g_h = (jax.tree.map(lambda x, i=i: x[i], jac) for i in range(2))
    g_b = jax.tree.map(jnp.negative, g_h) if token_mean else jax.tree.map(lambda x: x[2], jac)
    return g_pg, g_b, g_h

  def _candidate(self, state: grpo.TrainState, g_pg, g_b, c):
    """dtheta(c): the optimiser applied once per inner update to the whole-batch gradient."""
    cfg, opt = self.config, self.trainer.optimizer
    grad = jax.tree.map(lambda a, b: a + c.astype(a.dtype) * b, g_pg, g_b)

    def inner(carry, _):
      params, opt_state = carry
      updates, opt_state = opt.update(grad, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(inner, (state.params, state.opt_state), None,
                                  length=cfg.ppo_epochs * cfg.num_minibatches)
    return jax.tree.map(jnp.subtract, params, state.params)

  def _step(self, cs: ControlledState):
    cfg, trainer = self.config, self.trainer
    state = cs.train
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    k_rollout, k_update = jax.random.split(key)
    rollout, rewards, batch, old_logits = trainer.batch(state.params, k_rollout)
    mask = rollout.response_mask
    h = ep.pooled_entropy(old_logits, mask)
    controller = self._build(cs.lane)
    if self.info.needs_prediction:
      if self.prediction_rows == "minibatch":
        # The rows of the first update's mini-batch.
        rows = trainer.minibatch_rows(k_update, 0)[0]
        mb = trainer.shard(jax.tree.map(lambda x: x[rows], batch))
      else:
        mb = batch
      if self.predicts is None:
        g_pg, g_b, g_h = self._prediction(state, mb)
      else:
        zeros = lambda: tuple(jax.tree.map(jnp.zeros_like, state.params) for _ in range(3))
        g_pg, g_b, g_h = jax.lax.cond(jnp.asarray(self.predicts(cs.lane)),
                                      lambda: self._prediction(state, mb), zeros)
      predict = lambda c: _tree_dot(g_h, self._candidate(state, g_pg, g_b, jnp.asarray(c)))
    else:
      predict = None
    coef, cstate = controller.update(cs.controller, h, predict)
    # c_t as a constant schedule (power 0) of the state's form: the same compiled update.
    sched = state.control.entropy_coeff
    control = state.control.with_strength(schedules.PowerDecay(
        coef.astype(sched.init_value.dtype), jnp.zeros_like(sched.power), sched.offset))
    params, opt_state, metrics, _ = trainer.update(state, batch, k_update, control)
    metrics = jax.tree.map(lambda m: jnp.mean(m.astype(old_logits.dtype)), metrics)
    new_logits = sampling.response_logits(trainer.model, params, rollout.prompts,
                                          rollout.responses, cfg.temperature)
    old_entropy = covrl.entropy(old_logits)
    metrics.update(
        reward=jnp.mean(rewards),
        entropy=h,
        entropy_target=cstate.target,
        entropy_change=covrl.masked_mean(covrl.entropy(new_logits) - old_entropy, mask),
        entropy_change_first_order=covrl.masked_mean(
            covrl.entropy_change_first_order(old_logits, new_logits - old_logits), mask),
        entropy_change_predicted=cstate.predicted,
        control_coef=coef.astype(old_logits.dtype),
        controller_saturated=cstate.saturated.astype(old_logits.dtype),
        controller_nonfinite=cstate.nonfinite.astype(old_logits.dtype),
    )
    train = grpo.TrainState(trainer.replicate(params), opt_state, control, state.key,
                            state.step + 1)
    return ControlledState(train, cstate, cs.lane), metrics

  def _run(self, cs: ControlledState, num_steps: int):
    return jax.lax.scan(lambda s, _: self._step(s), cs, None, length=num_steps)


@functools.lru_cache(maxsize=16)
def get_controlled_trainer(config: GRPOConfig, controller: Any,
                           mesh: jax.sharding.Mesh | None = None,
                           prediction_rows: str = "minibatch", lane_size: int | None = None,
                           predicts: Any = None) -> ControlledTrainer:
  """The ControlledTrainer of its arguments (all hashable), built once per process."""
  return ControlledTrainer(config, controller, mesh, prediction_rows=prediction_rows,
                           lane_size=lane_size, predicts=predicts)


def make_controlled_train(config: GRPOConfig, controller: ctl.Controller,
                          mesh: jax.sharding.Mesh | None = None):
  """`train(key, params=None) -> (ControlledState, metrics)`: a whole controlled GRPO run.

  Metrics are [num_steps] arrays: the GRPO step's (reward, clip_frac, touched_frac, approx_kl,
  ...), and entropy (H_t, before the update), entropy_target (H*(t)), control_coef (c_t),
  entropy_change (on the step's contexts, exact) and entropy_change_first_order (from the actual
  logit change), entropy_change_predicted (the controller's prediction for c_t; 0 for
  controllers that do not predict), controller_saturated and controller_nonfinite.
  """
  trainer = get_controlled_trainer(config, controller, mesh)

  def train(key: jax.Array, params: Any = None):
    return trainer.run(trainer.init(key, params), config.num_steps)

  return train
