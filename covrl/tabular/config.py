"""What a tabular run trains, how, and for how long: `TabularConfig`, validated when built."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from covrl import _checks
from covrl import methods as mt
from covrl import schedules as sch
from covrl.tabular import bandits as bd

DYNAMICS: tuple[str, ...] = ("pg", "npg", "grpo_exact", "sampled")
ADVANTAGES: tuple[str, ...] = ("baseline", "reward", "grpo", "drgrpo")
EXACT_DYNAMICS: tuple[str, ...] = ("pg", "npg", "grpo_exact")
# The controls an exact (expected-gradient) dynamic can apply: those that act on the policy, not
# on a selection of sampled tokens or on PPO's clip.
EXACT_CONTROLS: tuple[type, ...] = (mt.NoControl, mt.EntropyBonus)


def _schedule(name: str, value: Any, *, positive: bool) -> sch.PowerDecay:
  """A number or PowerDecay as a PowerDecay, checked (positive: init > 0, else >= 0)."""
  if isinstance(value, bool) or not isinstance(value, float | int | sch.PowerDecay):
    raise TypeError(f"{name} must be a number or a covrl.schedules.PowerDecay, got {value!r}.")
  v = float(value.init_value if isinstance(value, sch.PowerDecay) else value)
  if not math.isfinite(v) or v < 0 or (positive and v == 0):
    raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {v!r}.")
  return value if isinstance(value, sch.PowerDecay) else sch.constant(v)


@dataclasses.dataclass(frozen=True)
class TabularConfig:
  """What to train, how, and for how long (validated on construction).

  Attributes:
    bandit: the problem.
    dynamics: "pg", "npg", "grpo_exact" or "sampled" (covrl.tabular.dynamics).
    control: the entropy-control method, a covrl control value (`covrl.NoControl()`, the
      default, `covrl.EntropyBonus(0.1)`, `covrl.KLCov(...)`, ...). Exact dynamics take
      NoControl and EntropyBonus only. Its coefficient (the bonus's entropy_coeff, KL-Cov's
      ppo_kl_coef) must be > 0, a number or a PowerDecay of the outer step; its ratio a
      fraction in (0, 1], a number or a PowerDecay. Its PPO fields configure the sampled
      dynamics' loss (clip_ratio=None: the unclipped policy gradient).
    num_steps: outer steps T (each one batch of samples for sampled dynamics).
    step_size: eta > 0, a number or a PowerDecay schedule of the step.
    num_samples: N samples per outer step.
    group_size: G samples per state (N / G states per step); GRPO groups.
    advantage: "baseline" (r - V_pi(s), exact), "reward" (r), "grpo" ((r - mean) / std per
      group) or "drgrpo" (r - mean per group).
    ppo_epochs: passes over each batch.
    num_minibatches: SGD steps per pass (each on N / num_minibatches samples).
    init_logits: [S, K] (or [K]) initial logits; zeros (uniform) when None.
    record_every: steps between recorded metrics; divides num_steps.
    dtype: "float32" or "float64" (the latter needs 64-bit JAX: `jax.enable_x64(True)`, or
      `jax.experimental.enable_x64()` on JAX 0.7).
    require_annealing: check (step_size, the control's coefficient, or Clip-Cov's ratio)
      against covrl.schedules.check_annealing.
  """

  bandit: bd.Bandit
  dynamics: Literal["pg", "npg", "grpo_exact", "sampled"] = "pg"
  control: mt.Control = dataclasses.field(default_factory=mt.NoControl)
  num_steps: int = 1000
  step_size: Any = 0.1
  num_samples: int = 64
  group_size: int = 8
  advantage: Literal["baseline", "reward", "grpo", "drgrpo"] = "baseline"
  ppo_epochs: int = 1
  num_minibatches: int = 1
  init_logits: Any = None
  record_every: int = 1
  dtype: Literal["float32", "float64"] = "float32"
  require_annealing: bool = False

  def __post_init__(self):
    if not isinstance(self.bandit, bd.Bandit):
      raise TypeError(f"bandit must be a covrl.tabular.bandits.Bandit, got "
                      f"{type(self.bandit).__name__}.")
    mt.check_control(self.control)
    for name, value, allowed in (("dynamics", self.dynamics, DYNAMICS),
                                 ("advantage", self.advantage, ADVANTAGES),
                                 ("dtype", self.dtype, ("float32", "float64"))):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
    for name in ("num_steps", "record_every", "num_samples", "group_size", "ppo_epochs",
                 "num_minibatches"):
      _checks.check_int(name, getattr(self, name), 1)
    if self.num_steps % self.record_every:
      raise ValueError(f"record_every={self.record_every} must divide num_steps="
                       f"{self.num_steps}.")
    _schedule("step_size", self.step_size, positive=True)
    self._check_control()
    if self.dynamics == "grpo_exact" and self.advantage not in ("grpo", "drgrpo"):
      raise ValueError("dynamics='grpo_exact' needs advantage 'grpo' or 'drgrpo'.")
    if self.dynamics == "grpo_exact" and self.bandit.noise == "gaussian":
      raise ValueError("dynamics='grpo_exact' enumerates group outcomes: it needs deterministic "
                       "or Bernoulli rewards.")
    self._check_sampling()
    shape = (self.bandit.num_states, self.bandit.num_actions)
    if self.init_logits is not None:
      z = np.asarray(self.init_logits, dtype=np.float64).reshape(-1)
      if z.size != shape[0] * shape[1] or not np.all(np.isfinite(z)):
        raise ValueError(f"init_logits must be {shape} finite values, got "
                         f"{np.shape(self.init_logits)}.")
      # Stored as a tuple: the config is hashable (compiled programs are cached per config).
      object.__setattr__(self, "init_logits", tuple(float(v) for v in z))
    if self.require_annealing:
      # Clip-Cov has no coefficient: the fraction it detaches is what must anneal.
      annealed = self.coef_schedule if self.coef_schedule is not None else self.ratio_schedule
      sch.check_annealing(self.step_size, annealed if annealed is not None else 0.0)

  def _check_control(self):
    c = self.control
    if self.dynamics in EXACT_DYNAMICS and not isinstance(c, EXACT_CONTROLS):
      raise ValueError(f"control {c.name!r} acts on sampled tokens: it needs "
                       "dynamics='sampled'.")
    if c.coefficient_field is not None:
      _schedule(c.coefficient_field, getattr(c, c.coefficient_field), positive=True)
    if c.ratio_field is not None:
      ratio = _schedule(c.ratio_field, getattr(c, c.ratio_field), positive=True)
      if ratio.init_value > 1:
        raise ValueError(f"{c.ratio_field} is a fraction in (0, 1], got {ratio.init_value!r}.")

  def _check_sampling(self):
    if self.dynamics == "grpo_exact" and self.group_size < 2:
      raise ValueError("group-normalised advantages need group_size >= 2.")
    if self.dynamics != "sampled":
      return
    if self.num_samples % self.group_size:
      raise ValueError(f"group_size={self.group_size} must divide num_samples="
                       f"{self.num_samples}.")
    if self.num_samples % self.num_minibatches:
      raise ValueError(f"num_minibatches={self.num_minibatches} must divide num_samples="
                       f"{self.num_samples}.")
    if self.advantage in ("grpo", "drgrpo") and self.group_size < 2:
      raise ValueError("group-normalised advantages need group_size >= 2.")

  @property
  def step_schedule(self) -> sch.PowerDecay:
    """The step size as a PowerDecay (a number is a constant)."""
    return _schedule("step_size", self.step_size, positive=True)

  @property
  def coef_schedule(self) -> sch.PowerDecay | None:
    """The control's coefficient as a PowerDecay (None when the control has none)."""
    field = self.control.coefficient_field
    return None if field is None else _schedule(field, getattr(self.control, field),
                                                positive=True)

  @property
  def ratio_schedule(self) -> sch.PowerDecay | None:
    """The control's token ratio as a PowerDecay (None when the control has none)."""
    field = self.control.ratio_field
    return None if field is None else _schedule(field, getattr(self.control, field),
                                                positive=True)

  @property
  def shape(self) -> tuple[int, int]:
    return (self.bandit.num_states, self.bandit.num_actions)

  @property
  def num_records(self) -> int:
    return self.num_steps // self.record_every

  @property
  def jnp_dtype(self):
    return jnp.float64 if self.dtype == "float64" else jnp.float32

  def hyperparams(self) -> Hyperparams:
    """This config's own hyperparameters as arrays (what `train(key)` uses by default)."""
    z = np.zeros(self.shape) if self.init_logits is None else \
        np.asarray(self.init_logits).reshape(self.shape)
    coef = self.coef_schedule
    return Hyperparams(
        jnp.asarray(self.step_schedule.init_value, self.jnp_dtype),
        jnp.asarray(0.0 if coef is None else coef.init_value, self.jnp_dtype),
        jnp.asarray(z, self.jnp_dtype),
    )


class Hyperparams(NamedTuple):
  """The traced hyperparameters of a run; give them a leading axis to sweep a grid.

  Attributes:
    step_size: [] initial step size (the schedule's shape stays the config's).
    coef: [] initial value of the control's coefficient (the bonus's entropy_coeff, KL-Cov's
      ppo_kl_coef; 0 and unused for controls without one).
    init_logits: [S, K] initial logits.
  """

  step_size: jax.Array
  coef: jax.Array
  init_logits: jax.Array


def hyperparams(config: TabularConfig, **grid: Any) -> Hyperparams:
  """Hyperparameters for a sweep, each override a sequence with one value per run.

  Every value is validated by building the config it stands for, so a bad value fails here,
  before compilation. Fields not given are broadcast from `config`.

  Args:
    config: the base configuration.
    **grid: step_size=[...], coef=[...], init_logits=[[S, K], ...]; all of one length n.

  Returns:
    Hyperparams with a leading axis of length n.
  """
  unknown = set(grid) - set(Hyperparams._fields)
  if unknown:
    raise ValueError(f"unknown hyperparameters {sorted(unknown)}; sweepable: "
                     f"{Hyperparams._fields}.")
  if "coef" in grid and config.control.coefficient_field is None:
    raise ValueError(f"control {config.control.name!r} has no coefficient to sweep.")
  lengths = {len(v) for v in grid.values()}
  if len(lengths) != 1:
    raise ValueError(f"every swept hyperparameter needs the same number of values, got "
                     f"{ {k: len(v) for k, v in grid.items()} }.")
  (n,) = lengths
  base = config.hyperparams()
  columns = {}
  for name in Hyperparams._fields:
    if name not in grid:
      columns[name] = jnp.broadcast_to(getattr(base, name), (n, *getattr(base, name).shape))
      continue
    values = list(grid[name])
    for v in values:
      try:
        dataclasses.replace(config, **_override(config, name, v))
      except ValueError as e:
        raise ValueError(f"{name}={v!r} in the sweep: {e}") from e
    columns[name] = jnp.asarray(np.asarray(values, np.float64), config.jnp_dtype)
    if name == "init_logits":
      columns[name] = columns[name].reshape(n, *config.shape)
  return Hyperparams(**columns)


def _override(config: TabularConfig, name: str, value: Any) -> dict[str, Any]:
  """The config fields that stand for hyperparameter `name` = `value` (to validate it)."""
  if name == "init_logits":
    return {"init_logits": np.asarray(value)}
  if name == "step_size":
    return {"step_size": dataclasses.replace(config.step_schedule, init_value=float(value))}
  field = config.control.coefficient_field
  coef = dataclasses.replace(config.coef_schedule, init_value=float(value))
  return {"control": dataclasses.replace(config.control, **{field: coef})}
