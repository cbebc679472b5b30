"""A closed-loop entropy bonus as one optax gradient transformation, for logit parameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from covrl import _checks
from covrl import entropy_prediction as ep
from covrl import softmax_entropy as ent
from covrl.controllers.base import Controller


class ControlledBonusState(NamedTuple):
  """State of `controlled_entropy_bonus`.

  Attributes:
    controller: the controller's state (its `coef` is the strength applied last).
    inner: the wrapped optimiser's state.
    predicted: [] the predicted pooled entropy change of the update applied last.
  """

  controller: Any
  inner: Any
  predicted: jax.Array


def controlled_entropy_bonus(
    controller: Controller,
    optimizer: optax.GradientTransformation,
    *,
    order: int = 1,
    temperature: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """A closed-loop entropy bonus for a logit-parameterised policy, wrapping an optax optimiser.

  `params` are the logits z ([K], or [S, K] for S states) and `updates` the gradient g of the
  policy loss. With H_w(z) = sum_s w_s H(softmax(z_s / temperature)) / sum_s w_s, the bonus
  loss -c H_w has gradient -c grad H_w, so the candidate logit update is

    dz(c) = optimizer.update(g - c grad H_w(z), inner_state, z),

  and the controller picks c from the measured H_w(z) and predict(c) = the pooled change of
  dz(c) (first or second order). The transform returns dz(c_t); `state.controller.coef` holds
  c_t and `state.predicted` its predicted change. With `optax.sgd`, dz(c) is affine in c and
  the default secant solver hits the predicted target exactly; with an adaptive optimiser
  (Adam) use `solver="bisection"`. Adam's very first
  step is -lr sign(g - c grad H) (its moments are that one gradient), piecewise constant in c,
  so only the jumps between sign patterns can be chosen there; later steps are smooth in c.

  Args:
    controller: a controller from this module (vocab_size = K).
    optimizer: the optax optimiser that turns gradients into logit updates.
    order: the predictor's order, 1 or 2.
    temperature: softmax temperature > 0 of the entropy.

  Returns:
    An optax GradientTransformationExtraArgs; `update(updates, state, params, *, weights=None,
    **extra)`, `weights` [S] >= 0 (uniform when None), other extra args go to `optimizer`.

  Example:
    >>> import jax.numpy as jnp, optax, covrl
    >>> from covrl import controllers
    >>> ctl = controllers.predictive(0.5, vocab_size=4, coef_range=(0.0, 5.0))
    >>> opt = controllers.controlled_entropy_bonus(ctl, optax.sgd(1.0))
    >>> z = jnp.array([3.0, 0.0, -1.0, -2.0]); state = opt.init(z)  # H(z) = 0.31
    >>> dz, state = opt.update(jnp.array([-0.2, 0.1, 0.05, 0.05]), state, z)
    >>> round(float(covrl.entropy(z) + state.predicted), 4)  # predicted: on target
    0.5
    >>> round(float(covrl.entropy(z + dz)), 2)  # actual: + the O(dz^2) remainder of a big step
    0.54
  """
  if not isinstance(controller, Controller):
    raise TypeError(f"controller must be a covrl.controllers.Controller, got "
                    f"{type(controller).__name__}.")
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order!r}.")
  _checks.check_positive("temperature", temperature)
  inner_opt = optax.with_extra_args_support(optimizer)

  def init_fn(params) -> ControlledBonusState:
    return ControlledBonusState(controller.init(), inner_opt.init(params),
                                jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, *, weights=None, **extra):
    if params is None:
      raise ValueError("controlled_entropy_bonus needs params (the logits) in update().")
    z = ent.check_logits(params)
    if z.ndim not in (1, 2):
      raise ValueError(f"params must be logits [K] or [S, K], got shape {z.shape}.")
    if controller.vocab_size is not None and controller.vocab_size != z.shape[-1]:
      raise ValueError(f"the controller was built for vocab_size={controller.vocab_size}, the "
                       f"logits have {z.shape[-1]} entries.")
    g = jnp.asarray(updates)
    tempered = lambda x: x / temperature
    h = ep.pooled_entropy(tempered(z), weights)
    grad_h = jax.grad(lambda x: ep.pooled_entropy(tempered(x), weights))(z)

    def candidate(c):
      step, inner = inner_opt.update((g - c * grad_h).astype(g.dtype), state.inner, params,
                                     **extra)
      return step, inner

    def predict(c):
      dz = candidate(jnp.asarray(c, z.dtype))[0]
      return ep.pooled_entropy_change(tempered(z), tempered(jnp.asarray(dz, z.dtype)), weights,
                                      order=order)

    coef, cstate = controller.update(state.controller, h,
                                     predict if controller.needs_prediction else None)
    step, inner = candidate(coef.astype(z.dtype))
    if controller.needs_prediction:
      predicted = cstate.predicted
    else:  # what the predictor says about the update applied (for every controller)
      predicted = ep.pooled_entropy_change(tempered(z), tempered(jnp.asarray(step, z.dtype)),
                                           weights, order=order)
    return step, ControlledBonusState(cstate, inner, jnp.asarray(predicted, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
