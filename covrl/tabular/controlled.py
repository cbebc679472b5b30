"""Closed-loop entropy control in the tabular lab: a controller sets the strength each step.

`make_controlled_train(config, controller, target)` runs the dynamics of a `covrl.tabular`
config (its public step, `covrl.tabular.dynamics.make_step`, so the same samples, losses and
updates), except that before every update the controller chooses the strength of the config's
control (`covrl.Control.strength`):

  EntropyBonus  the bonus coefficient alpha (dynamics "pg", "npg" or "sampled");
  KLCov         KL-Cov's beta (sampled);
  ClipCov       Clip-Cov's token ratio r (sampled; c_max is the static selection bound).

The configured coefficient (or ratio) is ignored: the controller's value replaces it. The
tracked entropy is the exact pooled entropy H_t = sum_s rho_s H(pi_s) of the policy before
update t, and the predictive controller's `predict(c)` is exact up to the predictor: it runs the
candidate update with strength c on the step's own samples (the same random bits) and returns
the pooled first- or second-order change sum_s rho_s dH_s(dz_s(c)) of its logit update. For one
SGD step with the bonus or KL-Cov's beta, dz(c) is affine in c, so the first-order prediction
is affine and the secant solver hits the predicted target exactly (tests/test_control.py).

With a fixed controller the run equals `covrl.tabular.make_train` of the same config with that
coefficient, draw for draw (the random bits are drawn per block of `record_every` steps, as
there).

Example:
  >>> import jax, covrl
  >>> from covrl import controllers, tabular
  >>> cfg = tabular.TabularConfig(tabular.Bandit((0.9, 0.5, 0.2, 0.1), noise="bernoulli"),
  ...                             dynamics="sampled", control=covrl.EntropyBonus(1.0),
  ...                             step_size=0.5, num_steps=50, advantage="grpo")
  >>> path = controllers.linear_target(1.3, 0.6, 50)
  >>> ctl = controllers.predictive(path, vocab_size=4, coef_range=(0.0, 2.0))
  >>> out = jax.jit(tabular.make_controlled_train(cfg, ctl, path))(jax.random.key(0))
  >>> out.entropy.shape, out.coef.shape
  ((51,), (50,))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import covrl
from covrl import controllers as ctl
from covrl.tabular import dynamics as dyn
from covrl.tabular import train as tr
from covrl.tabular.config import Hyperparams, TabularConfig


class ControlledResult(NamedTuple):
  """A controlled run, one record per update t = 0..T-1 (and the final state for [T + 1]).

  Attributes:
    logits: [S, K] final logits.
    entropy: [T + 1] pooled entropy H_t before update t, and after the last one.
    target: [T + 1] H*(t) of the measuring path.
    gap: [T + 1] optimality gap before update t, and after the last one.
    coef: [T] strength applied at update t.
    predicted: [T] the predictor's entropy change for the update actually applied at t (for
      every controller: the first- or second-order change of its logit update).
    touched_frac: [T] fraction of tokens the control acted on (bonus: 1 when alpha != 0).
    saturated: [T] bool, the controller clipped its strength (or had no authority).
    nonfinite: [T] bool, the prediction was not finite and the last strength was kept.
  """

  logits: jax.Array
  entropy: jax.Array
  target: jax.Array
  gap: jax.Array
  coef: jax.Array
  predicted: jax.Array
  touched_frac: jax.Array
  saturated: jax.Array
  nonfinite: jax.Array


def tracking_error(result: ControlledResult, *, skip: int = 1) -> jax.Array:
  """RMS of H_t - H*(t) over t = skip..T (the entropy after each update from the `skip`-th on).

  Works on a batch of results (leading axes are kept).
  """
  err = result.entropy[..., skip:] - result.target[..., skip:]
  return jnp.sqrt(jnp.mean(err**2, axis=-1))


def _check(config: TabularConfig, controller: ctl.Controller) -> None:
  if not isinstance(config, TabularConfig):
    raise TypeError(f"config must be a covrl.tabular.TabularConfig, got {type(config).__name__}.")
  if not isinstance(controller, ctl.Controller):
    raise TypeError(f"controller must be a covrl.controllers.Controller, got "
                    f"{type(controller).__name__}.")
  control = config.control
  if control.strength is None or control.strength not in (control.coefficient_field,
                                                          control.ratio_field):
    raise ValueError(f"control {control.name!r} has no strength (a coefficient or a token ratio) "
                     "to control; use one that has (covrl.EntropyBonus, covrl.KLCov, "
                     "covrl.ClipCov).")
  if config.dynamics not in ("pg", "npg", "sampled"):
    raise ValueError(f"dynamics {config.dynamics!r} is not supported; use 'pg', 'npg' or "
                     "'sampled'.")
  k = config.bandit.num_actions
  if controller.vocab_size is not None and controller.vocab_size != k:
    raise ValueError(f"the controller was built for vocab_size={controller.vocab_size}, but the "
                     f"bandit has K = {k} actions (the target check needs log K).")
  low, high = controller.coef_range
  if low < 0:
    raise ValueError(f"a {control.name} strength must be >= 0, but coef_range starts at {low}.")
  if control.strength == control.ratio_field and high > 1:
    raise ValueError(f"Clip-Cov's ratio is a fraction: coef_range must lie in [0, 1], got "
                     f"{controller.coef_range}.")


def make_controlled_train(
    config: TabularConfig,
    controller: ctl.Controller,
    target: Any,
    *,
    order: int = 1,
    affine: bool | None = None,
) -> Callable[..., ControlledResult]:
  """Build `train(key, hyper=None) -> ControlledResult`, pure, for jit and vmap.

  Args:
    config: a tabular config whose control has a coefficient or a token ratio as its strength
      (EntropyBonus, KLCov, ClipCov); its own value of the strength is ignored.
    controller: a `covrl.controllers` controller for K = config.bandit.num_actions.
    target: the path the run is measured against (a number or a callable of t = 0..num_steps,
      covrl.controllers.targets), normally the controller's own; it must lie in [0, log K].
    order: the predictor's order, 1 or 2.
    affine: use that the step's logit update is affine in the strength, dz(c) = dz(c_min) +
      (c - c_min) / (c_max - c_min) (dz(c_max) - dz(c_min)): the two candidate updates are
      computed once (one vmapped call, whose sampling is shared), and the prediction and the
      applied update are read off that line instead of rerunning the step. Exact when the
      step is one gradient step and the strength multiplies a loss term (the bonus alpha,
      KL-Cov's beta): the default (None) turns it on exactly then. Not allowed otherwise.

  Returns:
    train(key, hyper=None), as `covrl.tabular.make_train`.
  """
  _check(config, controller)
  control = config.control
  ratio_knob = control.strength == control.ratio_field
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order!r}.")
  sampled = config.dynamics == "sampled"
  one_update = not sampled or config.ppo_epochs * config.num_minibatches == 1
  if affine is None:
    affine = controller.needs_prediction and not ratio_knob and one_update
  elif affine and not (not ratio_knob and one_update):
    raise ValueError("affine=True needs a coefficient knob (entropy, kl_cov) and one gradient "
                     "step per update (ppo_epochs = num_minibatches = 1): otherwise the update "
                     "is not affine in the strength.")
  k = config.bandit.num_actions
  path = ctl.as_target(target)
  ctl.check_target(path, k, config.num_steps)
  tr.check_dtype(config)
  step = dyn.make_step(config)
  max_ratio = float(controller.coef_range[1]) if ratio_knob else None

  def apply(state: dyn.TrainState, bits, c):
    return step(state, bits, c, max_ratio)

  def controlled(carry, bits):
    state, cstate = carry
    z = state.logits
    rho = jnp.asarray(config.bandit.rho, z.dtype)
    h = covrl.pooled_entropy(z, rho)

    if affine:
      low, high = controller.coef_range
      ends, (sel, _) = jax.vmap(lambda c: apply(state, bits, c))(jnp.asarray([low, high],
                                                                             z.dtype))
      dz_low, dz_high = ends.logits[0] - z, ends.logits[1] - z
      logit_update = lambda c: dz_low + ((c - low) / (high - low)) * (dz_high - dz_low)
    else:
      logit_update = lambda c: apply(state, bits, jnp.asarray(c, z.dtype))[0].logits - z

    def predict(c):
      return covrl.pooled_entropy_change(z, logit_update(jnp.asarray(c, z.dtype)), rho,
                                         order=order)

    coef, cstate = controller.update(cstate, h, predict if controller.needs_prediction else None)
    if affine:
      new = jax.tree.map(lambda x: x[0], ends)._replace(
          logits=z + logit_update(coef.astype(z.dtype)))
      selected = sel[0]
    else:
      new, (selected, _) = apply(state, bits, coef.astype(z.dtype))
    gap, _, _ = dyn.records(config, z)
    # A selection method touches its selected tokens; a bonus every token while it is on.
    touched = selected if control.selects_tokens else (coef != 0).astype(z.dtype)
    # What the predictor says about the update actually applied (for every controller).
    predicted = covrl.pooled_entropy_change(z, new.logits - z, rho, order=order)
    return (new, cstate), (h, gap, coef, predicted, touched, cstate.saturated, cstate.nonfinite)

  def block(carry, _):
    state, cstate = carry
    key, bits = dyn.block_bits(config, state.key)
    if bits is not None:
      return lax.scan(controlled, (state._replace(key=key), cstate), bits)
    return lax.scan(controlled, (state, cstate), None, length=config.record_every)

  def train(key: jax.Array, hyper: Hyperparams | None = None) -> ControlledResult:
    state = tr.init_state(config, key, hyper)
    (state, _), out = lax.scan(block, (state, controller.init()), None,
                                    length=config.num_records)
    out = jax.tree.map(lambda x: x.reshape(config.num_steps, *x.shape[2:]), out)
    h, gap, coef, predicted, touched, saturated, nonfinite = out
    z = state.logits
    final_gap, _, _ = dyn.records(config, z)
    final_h = covrl.pooled_entropy(z, jnp.asarray(config.bandit.rho, z.dtype))
    goal = path(jnp.arange(config.num_steps + 1)).astype(z.dtype)
    return ControlledResult(
        z, jnp.concatenate([h, final_h[None]]), goal, jnp.concatenate([gap, final_gap[None]]),
        coef, predicted, touched, saturated, nonfinite)

  return train


def run_controlled(
    config: TabularConfig,
    controller: ctl.Controller,
    target: Any,
    keys: jax.Array,
    *,
    order: int = 1,
    affine: bool | None = None,
    hyper: Hyperparams | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> ControlledResult:
  """Run a batch of controlled trainings (one per key), vmapped, optionally sharded.

  Each run is independent (its controller sees its own run's entropy), so sharding the batch
  over a mesh's "data" axis gives the one-device result.

  Args:
    config, controller, target, order, affine: as in `make_controlled_train`.
    keys: [n] PRNG keys.
    hyper: optional Hyperparams with a leading axis of length n.
    mesh: optional mesh with a "data" axis whose size divides n.

  Returns:
    ControlledResult with a leading axis of length n.
  """
  n = keys.shape[0]
  if hyper is None:
    hyper = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), config.hyperparams())
  if mesh is not None:
    if n % mesh.shape["data"]:
      raise ValueError(f"the batch of {n} runs must divide evenly over {mesh.shape['data']} "
                       "devices.")
    keys, hyper = jax.device_put((keys, hyper), NamedSharding(mesh, P("data")))
  return compiled_controlled(config, controller, target, order, affine)(keys, hyper)


@functools.lru_cache(maxsize=64)
def compiled_controlled(config, controller, target, order=1, affine=None):
  """The jitted, vmapped run of a (config, controller, target, order, affine), built once per
  process (all hashable; the keys and hyperparameters that vary between calls are traced)."""
  return jax.jit(jax.vmap(make_controlled_train(config, controller, target, order=order,
                                                affine=affine)))


def summarize(errors: np.ndarray, *, confidence: float = 0.95, num_resamples: int = 2000,
              seed: int = 0) -> tuple[float, float, float]:
  """(mean, low, high): the mean over runs with a percentile-bootstrap interval."""
  x = np.asarray(errors, np.float64).reshape(-1)
  rng = np.random.default_rng(seed)
  boot = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(boot, [tail, 100 - tail])
  return float(x.mean()), float(low), float(high)

