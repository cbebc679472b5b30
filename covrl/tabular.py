"""Training dynamics of tabular softmax policies on bandits: `make_train(config) -> train(key)`.

The policy of a (contextual) bandit is a [S, K] table of logits z, pi_s = softmax(z_s). Every
dynamic is one pure step function scanned with `lax.scan`; a `TabularConfig` (a frozen,
validated dataclass) chooses it:

  dynamics="pg"          exact softmax policy gradient on J(z) = sum_s rho_s pi_s . r_s, plus
                         alpha H(pi_s) with the entropy control: dz = eta grad J.
  dynamics="npg"         natural PG: dz_s = eta (r_s - alpha log pi_s - E_pi[...]); with the
                         bonus this is z <- (1 - eta alpha) z + eta r up to a shift per state.
  dynamics="grpo_exact"  the expected GRPO update: dz_s = eta rho_s pi_s * w_s(pi) (+ bonus), with
                         w(pi) the exact expected group-normalised advantage (`covrl.theory`).
  dynamics="sampled"     N samples per step (N / G states, G actions each), advantages from
                         `advantage`, then `ppo_epochs` x `num_minibatches` SGD steps on covrl's
                         token losses, the samples laid out as [n, 1] tokens:
                           control "none"         ppo_loss (or policy_gradient_loss, clip off)
                           control "clip_higher"  ppo_loss with clip_ratio_high > clip_ratio
                           control "entropy"      the above + entropy_bonus_loss
                           control "clip_cov"     clip_cov_loss
                           control "kl_cov"       kl_cov_loss (it acts from the 2nd update on)

The step size, the coefficient (alpha for the bonus, beta for KL-Cov) and the covariance ratio
are numbers or `covrl.schedules.PowerDecay` schedules of the outer step t. The step size and the
coefficient's initial value, and the initial logits, form `Hyperparams`, which `train` takes as
arrays: vmap it over seeds and hyperparameter grids, and `run` shards such a batch over devices.

Example:
  >>> import jax
  >>> from covrl import bandits, tabular
  >>> cfg = tabular.TabularConfig(bandits.Bandit((1.0, 0.5, 0.0)), control="entropy", coef=0.5,
  ...                             step_size=1.0, num_steps=2000, record_every=500)
  >>> result = jax.jit(tabular.make_train(cfg))(jax.random.key(0))
  >>> result.gap.shape
  (5,)

References:
  J. Mei et al., On the Global Convergence Rates of Softmax Policy Gradient Methods, ICML 2020.
  Cui et al., The Entropy Mechanism of RL for Reasoning Language Models, arXiv:2505.22617 (2025).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from covrl import bandits as bd
from covrl import losses, theory
from covrl import schedules as sch
from covrl.advantages import grpo_advantages
from covrl.progress import Progress
from covrl.softmax_entropy import entropy

DYNAMICS: tuple[str, ...] = ("pg", "npg", "grpo_exact", "sampled")
CONTROLS: tuple[str, ...] = ("none", "entropy", "clip_cov", "kl_cov", "clip_higher")
ADVANTAGES: tuple[str, ...] = ("baseline", "reward", "grpo", "drgrpo")
_EXACT = ("pg", "npg", "grpo_exact")
Number = float | int


def _schedule(name: str, value: Any, *, positive: bool) -> sch.PowerDecay:
  """A number or PowerDecay as a PowerDecay, checked (positive: init > 0, else >= 0)."""
  if isinstance(value, bool) or not isinstance(value, Number | sch.PowerDecay):
    raise TypeError(f"{name} must be a number or a covrl.schedules.PowerDecay, got {value!r}.")
  s = value if isinstance(value, sch.PowerDecay) else None
  v = s.init_value if s is not None else float(value)
  if not math.isfinite(v) or v < 0 or (positive and v == 0):
    raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {v!r}.")
  return s if s is not None else sch.constant(v)


@dataclasses.dataclass(frozen=True)
class TabularConfig:
  """What to train, how, and for how long (validated on construction).

  Attributes:
    bandit: the problem.
    dynamics: "pg", "npg", "grpo_exact" or "sampled" (module docstring).
    control: "none", "entropy", "clip_cov", "kl_cov" or "clip_higher"; the last three need
      sampled dynamics.
    num_steps: outer steps T (each one batch of samples for sampled dynamics).
    step_size: eta > 0, a number or a PowerDecay schedule of the step.
    coef: the control's coefficient: alpha for "entropy", beta for "kl_cov" (> 0 for those);
      a number or a PowerDecay (annealed).
    ratio: Clip-Cov / KL-Cov fraction of tokens, in (0, 1]; a number or a PowerDecay.
    min_count: least number of tokens Clip-Cov / KL-Cov select (verl: 1).
    clip_cov_bounds: Clip-Cov's open band (lb, ub).
    clip_ratio: PPO's eps (eps_low); None uses the unclipped policy-gradient loss.
    clip_ratio_high: PPO's eps_high (clip-higher), >= clip_ratio; None means eps_high = eps.
    dual_clip: PPO's dual-clip constant c > 1, or None.
    num_samples: N samples per outer step.
    group_size: G samples per state (N / G states per step); GRPO groups.
    advantage: "baseline" (r - V_pi(s), exact), "reward" (r), "grpo" ((r - mean) / std per
      group) or "drgrpo" (r - mean per group).
    ppo_epochs: passes over each batch.
    num_minibatches: SGD steps per pass (each on N / num_minibatches samples).
    init_logits: [S, K] (or [K]) initial logits; zeros (uniform) when None.
    record_every: steps between recorded metrics; divides num_steps.
    dtype: "float32" or "float64" (the latter needs `with jax.enable_x64(True):`).
    require_annealing: check (step_size, coef) against covrl.schedules.check_annealing.
  """

  bandit: bd.Bandit
  dynamics: Literal["pg", "npg", "grpo_exact", "sampled"] = "pg"
  control: Literal["none", "entropy", "clip_cov", "kl_cov", "clip_higher"] = "none"
  num_steps: int = 1000
  step_size: Any = 0.1
  coef: Any = 0.0
  ratio: Any = 2e-3
  min_count: int = 1
  clip_cov_bounds: tuple[float, float] = (1.0, 5.0)
  clip_ratio: float | None = 0.2
  clip_ratio_high: float | None = None
  dual_clip: float | None = 3.0
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
      raise TypeError(f"bandit must be a covrl.bandits.Bandit, got "
                      f"{type(self.bandit).__name__}.")
    for name, value, allowed in (("dynamics", self.dynamics, DYNAMICS),
                                 ("control", self.control, CONTROLS),
                                 ("advantage", self.advantage, ADVANTAGES),
                                 ("dtype", self.dtype, ("float32", "float64"))):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
    for name in ("num_steps", "record_every", "num_samples", "group_size", "ppo_epochs",
                 "num_minibatches"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if self.num_steps % self.record_every:
      raise ValueError(f"record_every={self.record_every} must divide num_steps="
                       f"{self.num_steps}.")
    object.__setattr__(self, "step_size", _schedule("step_size", self.step_size, positive=True))
    needs_coef = self.control in ("entropy", "kl_cov")
    object.__setattr__(self, "coef", _schedule("coef", self.coef, positive=needs_coef))
    ratio = _schedule("ratio", self.ratio, positive=True)
    if ratio.init_value > 1:
      raise ValueError(f"ratio is a fraction in (0, 1], got {ratio.init_value!r}.")
    object.__setattr__(self, "ratio", ratio)
    if self.dynamics in _EXACT and self.control not in ("none", "entropy"):
      raise ValueError(f"control {self.control!r} acts on sampled tokens: it needs "
                       "dynamics='sampled'.")
    if self.dynamics == "grpo_exact" and self.advantage not in ("grpo", "drgrpo"):
      raise ValueError("dynamics='grpo_exact' needs advantage 'grpo' or 'drgrpo'.")
    if self.dynamics == "grpo_exact" and self.bandit.noise == "gaussian":
      raise ValueError("dynamics='grpo_exact' enumerates group outcomes: it needs deterministic "
                       "or Bernoulli rewards.")
    self._check_sampling()
    self._check_clipping()
    if not isinstance(self.min_count, int) or self.min_count < 0:
      raise ValueError(f"min_count must be an int >= 0, got {self.min_count!r}.")
    lb, ub = self.clip_cov_bounds
    if not lb < ub:
      raise ValueError(f"clip_cov_bounds need lb < ub, got {self.clip_cov_bounds!r}.")
    shape = (self.bandit.num_states, self.bandit.num_actions)
    if self.init_logits is not None:
      z = np.asarray(self.init_logits, dtype=np.float64).reshape(-1)
      if z.size != shape[0] * shape[1] or not np.all(np.isfinite(z)):
        raise ValueError(f"init_logits must be {shape} finite values, got "
                         f"{np.shape(self.init_logits)}.")
      object.__setattr__(self, "init_logits", tuple(float(v) for v in z))
    if self.require_annealing:
      # Clip-Cov has no coefficient: the fraction it detaches is what must anneal.
      sch.check_annealing(self.step_size, self.ratio if self.control == "clip_cov" else self.coef)

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

  def _check_clipping(self):
    for name in ("clip_ratio", "clip_ratio_high"):
      v = getattr(self, name)
      if v is not None and not (math.isfinite(v) and 0 < v):
        raise ValueError(f"{name} must be > 0 (or None), got {v!r}.")
    if self.clip_ratio is not None and self.clip_ratio >= 1:
      raise ValueError(f"clip_ratio must be < 1, got {self.clip_ratio!r}.")
    if self.dual_clip is not None and not self.dual_clip > 1:
      raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip!r}.")
    if self.control in ("clip_cov", "clip_higher") and self.clip_ratio is None:
      raise ValueError(f"control {self.control!r} needs a PPO clip_ratio.")
    if self.clip_ratio_high is not None:
      if self.clip_ratio is None:
        raise ValueError("clip_ratio_high needs clip_ratio.")
      if self.clip_ratio_high < self.clip_ratio:
        raise ValueError("clip_ratio_high must be >= clip_ratio.")
    if self.control == "clip_higher" and not (
        self.clip_ratio_high is not None and self.clip_ratio_high > self.clip_ratio):
      raise ValueError("control 'clip_higher' needs clip_ratio_high > clip_ratio.")

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
    return Hyperparams(
        jnp.asarray(self.step_size.init_value, self.jnp_dtype),
        jnp.asarray(self.coef.init_value, self.jnp_dtype),
        jnp.asarray(z, self.jnp_dtype),
    )


class Hyperparams(NamedTuple):
  """The traced hyperparameters of a run; give them a leading axis to sweep a grid.

  Attributes:
    step_size: [] initial step size (the schedule's shape stays the config's).
    coef: [] initial coefficient.
    init_logits: [S, K] initial logits.
  """

  step_size: jax.Array
  coef: jax.Array
  init_logits: jax.Array


class TrainState(NamedTuple):
  """Loop state: logits, PRNG key, outer step and hyperparameters."""

  logits: jax.Array
  key: jax.Array
  step: jax.Array
  hyper: Hyperparams


class TrainResult(NamedTuple):
  """What a run returns; records are taken at steps 0, m, 2m, ..., T (m = record_every).

  Attributes:
    logits: [S, K] final logits.
    steps: [R + 1] recorded steps.
    gap: [R + 1] optimality gap E_s max_a r - E_s pi_s . r (mean rewards, exact).
    entropy: [R + 1] E_s H(pi_s).
    policy: [R + 1, S, K] policies.
    selected_frac: [R + 1] mean fraction of tokens Clip-Cov/KL-Cov selected over the block that
      ends at the record (0 at step 0 and for other controls).
    clip_frac: [R + 1] mean PPO clip fraction over the block (sampled dynamics).
  """

  logits: jax.Array
  steps: jax.Array
  gap: jax.Array
  entropy: jax.Array
  policy: jax.Array
  selected_frac: jax.Array
  clip_frac: jax.Array


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
      if name == "init_logits":
        dataclasses.replace(config, init_logits=np.asarray(v))
      else:
        old = getattr(config, name)
        try:
          dataclasses.replace(config, **{name: dataclasses.replace(old, init_value=float(v))})
        except ValueError as e:
          raise ValueError(f"{name}={v!r} in the sweep: {e}") from e
    columns[name] = jnp.asarray(np.asarray(values, np.float64), config.jnp_dtype)
    if name == "init_logits":
      columns[name] = columns[name].reshape(n, *config.shape)
  return Hyperparams(**columns)


def _shape_fn(s: sch.PowerDecay, dtype) -> Callable[[jax.Array], jax.Array]:
  """t -> (1 + t / offset)^(-power): the schedule divided by its initial value."""
  return lambda t: (1.0 + jnp.asarray(t, dtype) / s.offset) ** (-s.power)


def _records(config: TabularConfig, logits: jax.Array) -> tuple[jax.Array, ...]:
  r = jnp.asarray(config.bandit.r, logits.dtype)
  rho = jnp.asarray(config.bandit.rho, logits.dtype)
  pi = jax.nn.softmax(logits, axis=-1)
  # sum_s rho_s sum_a pi_s(a) Delta_s(a): no cancellation when the gap is tiny.
  gap = rho @ jnp.sum(pi * (jnp.max(r, axis=-1, keepdims=True) - r), axis=-1)
  return gap, rho @ entropy(logits), pi


class _Parts(NamedTuple):
  init: Callable[[jax.Array, Hyperparams | None], TrainState]
  advance: Callable[[TrainState, int], tuple[TrainState, tuple[jax.Array, ...]]]


def _exact_step(config: TabularConfig) -> Callable:
  r = config.bandit.r
  rho = config.bandit.rho
  eta_shape = _shape_fn(config.step_size, config.jnp_dtype)
  coef_shape = _shape_fn(config.coef, config.jnp_dtype)
  bonus = config.control == "entropy"
  normalize = config.advantage == "grpo"

  def step(state: TrainState, coef: jax.Array | None = None
           ) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
    """One update; `coef` overrides the configured (scheduled) bonus coefficient."""
    z, t, hyper = state.logits, state.step, state.hyper
    rr, rh = jnp.asarray(r, z.dtype), jnp.asarray(rho, z.dtype)
    eta = hyper.step_size * eta_shape(t)
    alpha = hyper.coef * coef_shape(t) if bonus else jnp.zeros((), z.dtype)
    if coef is not None and bonus:
      alpha = jnp.asarray(coef, z.dtype)
    if config.dynamics == "pg":
      dz = rh[:, None] * theory.pg_logit_gradient(z, rr, alpha)
    elif config.dynamics == "npg":
      soft = rr - alpha * jax.nn.log_softmax(z)
      dz = soft - jnp.sum(jax.nn.softmax(z) * soft, axis=-1, keepdims=True)
    else:
      pi = jax.nn.softmax(z)
      w = jax.vmap(lambda p, q: theory.grpo_expected_advantages(
          p, q, config.group_size, noise=config.bandit.noise, normalize_std=normalize))(pi, rr)
      dz = rh[:, None] * pi * w + jax.grad(lambda z: alpha * (rh @ entropy(z)))(z)
    new = state._replace(logits=z + eta * dz, step=t + 1)
    zero = jnp.zeros((), z.dtype)
    return new, (zero, zero)

  return step


def _policy_loss(config: TabularConfig, key, old, new, adv, mask, ratio, beta, max_ratio=None):
  kw: dict[str, Any] = {}
  if not isinstance(ratio, float):  # an annealed ratio: a static bound for the selection shape
    kw["max_ratio"] = config.ratio.init_value if max_ratio is None else max_ratio
  if config.control == "kl_cov":
    return losses.kl_cov_loss(old, new, adv, mask, kl_cov_ratio=ratio, kl_coef=beta,
                              min_count=config.min_count, **kw)
  if config.control == "clip_cov":
    lb, ub = config.clip_cov_bounds
    return losses.clip_cov_loss(key, old, new, adv, mask, clip_ratio=config.clip_ratio,
                                clip_ratio_high=config.clip_ratio_high, clip_cov_ratio=ratio,
                                clip_cov_lb=lb, clip_cov_ub=ub, min_count=config.min_count, **kw)
  if config.clip_ratio is None:
    return losses.policy_gradient_loss(old, new, adv, mask)
  return losses.ppo_loss(old, new, adv, mask, clip_ratio=config.clip_ratio,
                         clip_ratio_high=config.clip_ratio_high, clip_ratio_c=config.dual_clip)


def _advantages(config: TabularConfig, rewards, states, logits) -> jax.Array:
  groups = (config.num_samples // config.group_size, config.group_size)
  if config.advantage == "reward":
    return rewards
  if config.advantage == "baseline":
    r = jnp.asarray(config.bandit.r, logits.dtype)
    value = jnp.sum(jax.nn.softmax(logits) * r, axis=-1)
    return rewards - value[states]
  normalize = config.advantage == "grpo"
  return grpo_advantages(rewards.reshape(groups), normalize_std=normalize).reshape(-1)


class _Draws(NamedTuple):
  """Where each random number of one sampled step sits in its row of uniform bits."""

  num_bits: int
  states: slice
  actions: slice
  rewards: slice
  order: slice
  key: slice


def _draw_layout(config: TabularConfig) -> _Draws:
  n, g = config.num_samples, config.group_size
  shuffled = config.ppo_epochs * config.num_minibatches > 1
  sizes = [n // g, n, n, config.ppo_epochs * n if shuffled else 0, 2]
  ends = np.cumsum(sizes)
  starts = ends - np.asarray(sizes)
  return _Draws(int(ends[-1]), *(slice(int(a), int(b)) for a, b in zip(starts, ends)))


def _uniform(bits: jax.Array, dtype) -> jax.Array:
  """Uniforms strictly inside (0, 1) from uint32 bits (24 bits in float32, 32 in float64)."""
  if dtype == jnp.float64:
    return bits.astype(dtype) * 2.0**-32 + 2.0**-33
  return (bits >> 8).astype(dtype) * 2.0**-24 + 2.0**-25


def _inverse_cdf(u: jax.Array, probs: jax.Array) -> jax.Array:
  """Index k with cdf_{k-1} <= u < cdf_k of each row of probs (a categorical draw)."""
  cdf = jnp.cumsum(probs, axis=-1)[..., :-1]
  return jnp.sum(u[..., None] >= cdf, axis=-1).astype(jnp.int32)


def _sampled_step(config: TabularConfig) -> Callable:
  """One outer step of sampled dynamics, given one row of random bits (see `_draw_layout`).

  The random numbers of a whole block of steps are drawn at once, outside the step: a
  counter-based generator inlined once per block rather than several times per step keeps the
  compiled program small (compilation, not running, dominates these tiny problems).
  """
  dtype = config.jnp_dtype
  eta_shape = _shape_fn(config.step_size, dtype)
  coef_shape = _shape_fn(config.coef, dtype)
  scheduled_ratio = config.ratio.power > 0
  n, g = config.num_samples, config.group_size
  epochs, minibatches = config.ppo_epochs, config.num_minibatches
  size = n // minibatches
  layout = _draw_layout(config)
  bandit = config.bandit

  def sample(z, u, key_bits):
    states = _inverse_cdf(u[layout.states], jnp.asarray(bandit.rho, z.dtype))
    states = jnp.repeat(states, g)
    actions = _inverse_cdf(u[layout.actions], jax.nn.softmax(z[states]))
    means = jnp.asarray(bandit.r, z.dtype)[states, actions]
    v = u[layout.rewards]
    if bandit.noise == "bernoulli":
      rewards = (v < means).astype(z.dtype)
    elif bandit.noise == "gaussian":
      rewards = means + bandit.noise_scale * jax.scipy.special.ndtri(v)
    else:
      rewards = means
    return states, actions, rewards

  def step(state: TrainState, bits: jax.Array, coef: jax.Array | None = None,
           ratio: jax.Array | None = None, max_ratio: float | None = None
           ) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
    """One outer step. `coef` and `ratio` override the configured (scheduled) values, for a
    controller that sets them step by step; a traced `ratio` needs `max_ratio`, a static bound."""
    z, t, hyper = state.logits, state.step, state.hyper
    u = _uniform(bits, z.dtype)
    states, actions, rewards = sample(z, u, bits[layout.key])
    adv = lax.stop_gradient(_advantages(config, rewards, states, z))
    old_lp = jax.nn.log_softmax(z)[states, actions]
    eta = hyper.step_size * eta_shape(t)
    if coef is None:
      coef = hyper.coef * coef_shape(t)
    if ratio is None:
      ratio = config.ratio(t) if scheduled_ratio else float(config.ratio.init_value)
    mask = jnp.ones((size, 1), bool)
    # Clip-Cov's draw needs a key: a fresh one per step, built from two of the step's words.
    step_key = jax.random.wrap_key_data(bits[layout.key], impl="threefry2x32")

    def loss_fn(z, idx, key):
      s, a = states[idx], actions[idx]
      column = lambda x: x[:, None]
      new_lp = jax.nn.log_softmax(z)[s, a]
      loss, metrics = _policy_loss(config, key, column(old_lp[idx]), column(new_lp),
                                   column(adv[idx]), mask, ratio, coef, max_ratio)
      if config.control == "entropy":
        bonus, _ = losses.entropy_bonus_loss(z[s][:, None, :], mask, coef=coef)
        loss = loss + bonus
      return loss, (metrics["selected_frac"], metrics["clip_frac"])

    def update(z, inputs):
      idx, index = inputs
      key = jax.random.fold_in(step_key, index) if config.control == "clip_cov" else None
      grads, fracs = jax.grad(loss_fn, has_aux=True)(z, idx, key)
      return z - eta * grads, fracs

    if epochs * minibatches > 1:
      # A fresh random order of the batch for every epoch (argsort of uniforms), as PPO shuffles.
      order = jnp.argsort(u[layout.order].reshape(epochs, n), axis=-1)
    else:
      order = jnp.arange(n)[None]
    batches = order.reshape(epochs * minibatches, size)
    if epochs * minibatches == 1:
      # No loop for a single update: under vmap over the coefficient (a controller evaluating
      # candidate updates) a scan would batch its whole body through the carried logits; called
      # directly, only what depends on the coefficient is batched.
      z, fracs = update(z, (batches[0], jnp.zeros((), jnp.int32)))
      selected, clipped = (f[None] for f in fracs)
    else:
      z, (selected, clipped) = lax.scan(update, z, (batches, jnp.arange(epochs * minibatches)))
    new = TrainState(z, state.key, t + 1, hyper)
    return new, (jnp.mean(selected).astype(z.dtype), jnp.mean(clipped).astype(z.dtype))

  return step


def _check_dtype(config: TabularConfig) -> None:
  if config.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("dtype='float64' needs 64-bit JAX: build and run inside "
                     "`with jax.enable_x64(True):`.")


def _parts(config: TabularConfig) -> _Parts:
  _check_dtype(config)
  step = _sampled_step(config) if config.dynamics == "sampled" else _exact_step(config)
  every = config.record_every

  def init(key: jax.Array, hyper: Hyperparams | None = None) -> TrainState:
    hyper = config.hyperparams() if hyper is None else hyper
    hyper = jax.tree.map(lambda x: jnp.asarray(x, config.jnp_dtype), hyper)
    return TrainState(hyper.init_logits, key, jnp.zeros((), jnp.int32), hyper)

  def block(state: TrainState, _):
    if config.dynamics == "sampled":
      key, block_key = jax.random.split(state.key)
      bits = jax.random.bits(block_key, (every, _draw_layout(config).num_bits), jnp.uint32)
      state, (selected, clipped) = lax.scan(step, state._replace(key=key), bits)
    else:
      state, (selected, clipped) = lax.scan(lambda s, _: step(s), state, None, length=every)
    gap, ent, pi = _records(config, state.logits)
    return state, (state.step, gap, ent, pi, jnp.mean(selected), jnp.mean(clipped))

  def advance(state: TrainState, num_records: int):
    return lax.scan(block, state, None, length=num_records)

  return _Parts(init, advance)


def _initial_record(config: TabularConfig, state: TrainState) -> tuple[jax.Array, ...]:
  gap, ent, pi = _records(config, state.logits)
  zero = jnp.zeros((), state.logits.dtype)
  return state.step, gap, ent, pi, zero, zero


def make_train(config: TabularConfig) -> Callable[..., TrainResult]:
  """Build `train(key, hyper=None) -> TrainResult`, a pure function of its arguments.

  Args:
    config: the run's configuration (validated when it was built).

  Returns:
    train(key, hyper=None): `key` a PRNG key (unused by exact dynamics), `hyper` optional
    `Hyperparams` overriding the config's step size, coefficient and initial logits. Jit it,
    vmap it over keys and hyperparameters; `run` does both, sharded, with progress.
  """
  parts = _parts(config)

  def train(key: jax.Array, hyper: Hyperparams | None = None) -> TrainResult:
    state = parts.init(key, hyper)
    first = _initial_record(config, state)
    state, rest = parts.advance(state, config.num_records)
    return TrainResult(state.logits, *(
        jnp.concatenate([f[None], r], axis=0) for f, r in zip(first, rest)))

  return train


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis "data" over the first `num_devices` devices (all by default)."""
  devices = jax.devices()
  num = len(devices) if num_devices is None else num_devices
  if not 1 <= num <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num}.")
  return jax.make_mesh((num,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:num])


def _chunk_records(num_records: int, target: int) -> int:
  """The largest divisor of num_records that is at most target (so every chunk compiles once)."""
  best = 1
  for d in range(1, min(num_records, max(target, 1)) + 1):
    if num_records % d == 0:
      best = d
  return best


@functools.lru_cache(maxsize=64)
def _batched(config: TabularConfig, per_chunk: int):
  """Jitted, vmapped (start, advance-one-chunk) of a config, cached: a config compiles once per
  process however many times it is run (configs are frozen and hashable; the initial logits, step
  size and coefficient that vary between runs are traced Hyperparams)."""
  parts = _parts(config)

  def start(key, hyper):
    state = parts.init(key, hyper)
    return state, _initial_record(config, state)

  return (jax.jit(jax.vmap(start)),
          jax.jit(jax.vmap(lambda state: parts.advance(state, per_chunk))))


def run(
    config: TabularConfig,
    keys: jax.Array,
    hyper: Hyperparams | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool | str = False,
    num_chunks: int = 10,
) -> TrainResult:
  """Run a batch of trainings (one per key), sharded over a "data" mesh, chunk by chunk.

  The batch is vmapped; with `mesh`, its leading axis is sharded over the mesh's "data" axis and
  XLA runs each device's share (the runs are independent, so the results equal a one-device
  run's). The scan is cut into about `num_chunks` compiled chunks, and progress is reported
  between them (never from inside the compiled code).

  Args:
    config: the configuration.
    keys: [n] PRNG keys, one per run.
    hyper: optional Hyperparams with a leading axis of length n (see `hyperparams`).
    mesh: optional mesh with a "data" axis whose size divides n.
    progress: False, True, or a label for a progress line on stderr.
    num_chunks: about how many compiled chunks to run (each reports progress). The compiled
      functions are cached per (config, chunk length): running a config again, with other keys,
      initial logits, step sizes or coefficients, does not recompile.

  Returns:
    TrainResult with a leading axis of length n.
  """
  _check_dtype(config)
  n = keys.shape[0]
  if hyper is None:
    hyper = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), config.hyperparams())
  for name, value in zip(Hyperparams._fields, hyper):
    if jnp.shape(value)[:1] != (n,):
      raise ValueError(f"hyper.{name} needs a leading axis of length {n}, got "
                       f"{jnp.shape(value)}.")
  if mesh is not None:
    size = mesh.shape["data"]
    if n % size:
      raise ValueError(f"the batch of {n} runs must divide evenly over {size} devices.")
    shard = NamedSharding(mesh, P("data"))
    keys, hyper = jax.device_put((keys, hyper), shard)
  per_chunk = _chunk_records(config.num_records, -(-config.num_records // max(num_chunks, 1)))
  start, advance = _batched(config, per_chunk)
  state, first = start(keys, hyper)
  label = progress if isinstance(progress, str) else f"{config.dynamics}/{config.control}"
  bar = Progress(config.num_steps, label) if progress else None
  chunks = []
  for _ in range(config.num_records // per_chunk):
    state, rec = advance(state)
    chunks.append(rec)
    if bar is not None:
      jax.block_until_ready(rec)
      bar.update(per_chunk * config.record_every)
  rest = [jnp.concatenate([c[i] for c in chunks], axis=1) for i in range(len(first))]
  return TrainResult(state.logits, *(
      jnp.concatenate([f[:, None], r], axis=1) for f, r in zip(first, rest)))
