"""GRPO with PPO inner epochs for the transformer policy; every entropy control is a config switch.

One training step, all inside one compiled program:

  1. draw `prompts_per_step` prompts and sample `group_size` responses to each at temperature tau;
  2. score them (the task's verifiable reward) and form group-normalised advantages
     (covrl.grpo_advantages), the same for every token of a response;
  3. recompute the old log-probabilities log softmax(z / tau)[y] with the training forward pass;
  4. for `ppo_epochs` epochs, shuffle the responses into `num_minibatches` mini-batches and take
     one optimizer step on each, with the loss of the configured control method.

Control methods (covrl.transformer.control): none, entropy bonus (constant or annealed),
clip-higher, Clip-Cov, KL-Cov (constant or annealed). The step reads the method as arrays in the
loop state, so one compiled program runs them all (`Trainer.init(..., control=...)`).

Selection (Clip-Cov, KL-Cov) is exact over each whole mini-batch, whatever the number of devices:
with a mesh, the batch is sharded over its "data" axis and covrl's global selection runs on the
global arrays. Entropy is the full-vocabulary entropy of the tempered logits z / tau everywhere.

References:
  Shao et al., DeepSeekMath (GRPO), arXiv:2402.03300 (2024).
  Schulman et al., Proximal Policy Optimization Algorithms, arXiv:1707.06347 (2017).
  Yu et al., DAPO, arXiv:2503.14476 (2025).
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs, arXiv:2505.22617 (2025).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import covrl
from covrl import losses as _losses
from covrl.transformer import sampling
from covrl.transformer.control import Control, ControlArrays, check_number, no_control
from covrl.transformer.model import ModelConfig, TransformerPolicy, init_params
from covrl.transformer.sft import SFTConfig, make_sft
from covrl.transformer.tasks import Task


def _count(name: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """A GRPO run.

  Attributes:
    task: the task (covrl.transformer.tasks).
    model: the policy's shape; None gives the default ModelConfig sized to the task.
    control: the entropy-control method (covrl.transformer.control).
    num_steps: GRPO steps (rollout + update).
    prompts_per_step: prompts per step; the batch has prompts_per_step * group_size responses.
    group_size: responses per prompt G (>= 2 for group-normalised advantages).
    temperature: sampling temperature tau; old log-probs, losses and entropies use z / tau too.
    ppo_epochs: passes over each batch.
    num_minibatches: optimizer steps per epoch (must divide the batch).
    learning_rate: Adam step size.
    max_grad_norm: global-norm gradient clip (None: off).
    loss_agg_mode: covrl aggregation mode (verl's names).
    normalize_std: divide advantages by the group std (GRPO) or not (Dr. GRPO).
    dual_clip: dual-clip bound c > 1 of the PPO-clipped methods (verl: 3.0; None: off).
    token_ratio_bound: static upper bound on the token ratio of Clip-Cov / KL-Cov this run's
      compiled program can take (sizes the selection buffer); None: the control's own ratio.
    kv_cache: sample with the key/value cache instead of recomputing (see sampling.sample).
    sft: the supervised warm start (None: start from the random initialisation).
  """

  task: Task
  model: ModelConfig | None = None
  control: Control = dataclasses.field(default_factory=no_control)
  num_steps: int = 100
  prompts_per_step: int = 16
  group_size: int = 8
  temperature: float = 1.0
  ppo_epochs: int = 1
  num_minibatches: int = 2
  learning_rate: float = 1e-3
  max_grad_norm: float | None = 1.0
  loss_agg_mode: str = "token-mean"
  normalize_std: bool = True
  dual_clip: float | None = 3.0
  token_ratio_bound: float | None = None
  kv_cache: bool = False
  sft: SFTConfig | None = dataclasses.field(default_factory=SFTConfig)

  def __post_init__(self):
    if not isinstance(self.task, Task):
      raise TypeError(f"task must be a covrl.transformer task, got {type(self.task).__name__}.")
    if self.model is None:
      object.__setattr__(self, "model", ModelConfig(
          vocab_size=self.task.vocab_size, context_length=self.task.context_length))
    if not isinstance(self.model, ModelConfig):
      raise TypeError(f"model must be a ModelConfig, got {type(self.model).__name__}.")
    if self.model.vocab_size < self.task.vocab_size:
      raise ValueError(f"model vocab_size={self.model.vocab_size} is smaller than the task's "
                       f"vocabulary ({self.task.vocab_size}).")
    if self.model.context_length < self.task.context_length:
      raise ValueError(f"model context_length={self.model.context_length} is shorter than the "
                       f"task's prompt + response ({self.task.context_length}).")
    if not isinstance(self.control, Control):
      raise TypeError(f"control must be a Control, got {type(self.control).__name__}.")
    _count("num_steps", self.num_steps, 0)
    _count("prompts_per_step", self.prompts_per_step)
    _count("group_size", self.group_size, 2)
    check_number("temperature", self.temperature, strict=True)
    _count("ppo_epochs", self.ppo_epochs)
    _count("num_minibatches", self.num_minibatches)
    if self.batch_size % self.num_minibatches:
      raise ValueError(f"num_minibatches={self.num_minibatches} must divide the batch of "
                       f"{self.batch_size} responses.")
    check_number("learning_rate", self.learning_rate, strict=True)
    if self.max_grad_norm is not None:
      check_number("max_grad_norm", self.max_grad_norm, strict=True)
    if self.loss_agg_mode not in covrl.LOSS_AGG_MODES:
      raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; choose one of "
                       f"{covrl.LOSS_AGG_MODES}.")
    if self.dual_clip is not None:
      check_number("dual_clip", self.dual_clip, low=1.0, strict=True)
    if self.token_ratio_bound is not None:
      check_number("token_ratio_bound", self.token_ratio_bound)
      if self.token_ratio_bound > 1:
        raise ValueError(f"token_ratio_bound must be <= 1, got {self.token_ratio_bound!r}.")
      if self.control.ratio > self.token_ratio_bound:
        raise ValueError(f"control ratio {self.control.ratio} exceeds token_ratio_bound="
                         f"{self.token_ratio_bound}.")
    if self.sft is not None and not isinstance(self.sft, SFTConfig):
      raise TypeError(f"sft must be an SFTConfig or None, got {type(self.sft).__name__}.")

  @property
  def batch_size(self) -> int:
    return self.prompts_per_step * self.group_size

  @property
  def minibatch_size(self) -> int:
    return self.batch_size // self.num_minibatches

  @property
  def ratio_bound(self) -> float:
    return self.control.ratio if self.token_ratio_bound is None else self.token_ratio_bound


class TrainState(NamedTuple):
  """Loop state. `key` is raw key data (uint32), so checkpoints hold plain arrays."""

  params: Any
  opt_state: Any
  control: ControlArrays
  key: jax.Array
  step: jax.Array


class Batch(NamedTuple):
  """What the update needs from a rollout: one row per response, one column per token."""

  prompts: jax.Array
  responses: jax.Array
  response_mask: jax.Array
  old_log_probs: jax.Array
  advantages: jax.Array


class StepAux(NamedTuple):
  """Per-step arrays for inspection and tests."""

  rollout: sampling.Rollout
  rewards: jax.Array
  selected: jax.Array  # [ppo_epochs, num_minibatches, minibatch_size, R] tokens acted on


def make_optimizer(config: GRPOConfig) -> optax.GradientTransformation:
  """Adam, after a global-norm clip when `max_grad_norm` is set."""
  adam = optax.adam(config.learning_rate)
  if config.max_grad_norm is None:
    return adam
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)


def policy_loss(config: GRPOConfig, model: TransformerPolicy, params, batch: Batch,
                key: jax.Array, control: ControlArrays, step: jax.Array,
                on_policy: jax.Array | bool = False):
  """The loss of one mini-batch under the control method in `control`, and its metrics.

  The method is a traced index: `lax.switch` runs only the branch it names (under vmap over
  methods, all branches run and are selected).

  `on_policy` marks an update whose parameters are still the rollout's (the first mini-batch of
  the first epoch). Its old log-probabilities are then the current ones, exactly: a recomputed
  log pi_old differs from log pi by float round-off, and KL-Cov's |log pi - log pi_old| has
  gradient sign(x) * grad log pi, full-size for any x != 0, so round-off would switch the
  penalty on with a random sign where the theory has it inert (THEORY.md T3.6). The metric
  "max_abs_log_ratio" still measures against the recomputed values (the round-off itself).

  Returns:
    (loss, (metrics, selected)): selected is the [rows, R] mask of tokens Clip-Cov or KL-Cov
    acted on (all False for the other methods).
  """
  tau, bound = config.temperature, config.ratio_bound
  raw = sampling.response_logits(model, params, batch.prompts, batch.responses, 1.0)
  logits = raw / tau
  log_prob = sampling.token_log_probs(logits, batch.responses)
  mask, adv = batch.response_mask, batch.advantages
  old = jnp.where(on_policy, jax.lax.stop_gradient(log_prob), batch.old_log_probs)
  args = (old, log_prob, adv, mask)
  common = dict(loss_agg_mode=config.loss_agg_mode, logits=logits)
  clip = dict(clip_ratio_low=control.clip_ratio_low, clip_ratio_high=control.clip_ratio_high)
  coef = control.coef_at(step)
  no_selection = jnp.zeros(log_prob.shape, bool)

  def ppo():
    loss, metrics = covrl.ppo_loss(*args, clip_ratio_c=config.dual_clip, **clip, **common)
    return loss, metrics, no_selection

  def clip_cov():
    # Select here rather than inside clip_cov_loss, to return the mask; the loss then uses it.
    # As in the reference, tokens the PPO clip already clips are not candidates.
    cov = covrl.token_covariance(log_prob, adv, mask)
    _, ratio = _losses._ratio(_losses._tokens(*args))
    _, clipped = _losses._clipped_surrogate(adv, ratio, control.clip_ratio_low,
                                            control.clip_ratio_high)
    selected = covrl.clip_cov_select(
        key, cov, mask, ratio=control.ratio, lb=control.clip_cov_lb, ub=control.clip_cov_ub,
        eligible=~clipped, max_ratio=bound,
    )
    loss, metrics = covrl.clip_cov_loss(None, *args, selected=selected, **clip, **common)
    return loss, metrics, selected

  def kl_cov():
    cov = covrl.token_covariance(log_prob, adv, mask)
    selected = covrl.kl_cov_select(cov, mask, ratio=control.ratio, max_ratio=bound)
    loss, metrics = covrl.kl_cov_loss(*args, kl_coef=coef, selected=selected, **common)
    return loss, metrics, selected

  branch = jnp.asarray([0, 0, 0, 1, 2], jnp.int32)[control.method]
  loss, metrics, selected = jax.lax.switch(branch, [ppo, clip_cov, kl_cov])
  bonus_coef = jnp.where(control.is_method("entropy"), coef, 0.0)
  bonus, _ = covrl.entropy_bonus_loss(raw, mask, coef=bonus_coef, temperature=tau,
                                      loss_agg_mode=config.loss_agg_mode)
  uses_coef = control.is_method("entropy") | control.is_method("kl_cov")
  metrics["control_coef"] = jnp.where(uses_coef, coef, 0.0)
  metrics["touched_frac"] = _touched_fraction(control, log_prob, old, batch, selected)
  log_ratio = jax.lax.stop_gradient(log_prob - batch.old_log_probs)
  metrics["max_abs_log_ratio"] = jnp.max(jnp.where(mask, jnp.abs(log_ratio), 0.0))
  return loss + bonus, (metrics, selected)


def _touched_fraction(control: ControlArrays, log_prob, old, batch: Batch, selected
                      ) -> jax.Array:
  """Fraction of valid tokens whose loss the control changes (the bonus: all of them)."""
  mask = batch.response_mask
  # Tokens the raised upper clip lets through: A > 0 and 1 + low < ratio <= 1 + high.
  ratio = jnp.exp(jax.lax.stop_gradient(log_prob - old))
  opened = (batch.advantages > 0) & (ratio > 1 + control.clip_ratio_low) & (
      ratio <= 1 + control.clip_ratio_high)
  flag = jnp.select(
      [control.is_method("entropy"), control.is_method("clip_higher"),
       control.is_method("clip_cov") | control.is_method("kl_cov")],
      [mask, opened, selected], jnp.zeros_like(mask))
  return covrl.masked_mean(flag.astype(jnp.float32), mask)


class Trainer:
  """The compiled pieces of a GRPO run: `init`, `step`, `run` (and `rollout`, `batch`), jitted.

  `make_train` composes them; `covrl.transformer.run_training` calls `run` in chunks, for
  progress and checkpoints. Step t draws its randomness from fold_in(key, t), so a run gives the
  same result however it is cut into chunks. The control method lives in the state, so one
  Trainer runs any method whose token ratio fits `config.ratio_bound`, without recompiling.

  Args:
    config: the run.
    mesh: optional `jax.sharding.Mesh` with a "data" axis: rollouts and mini-batches are sharded
      over it (data parallel), parameters replicated. Results equal the one-device run up to
      float round-off; token selection is exact over the global mini-batch.
  """

  def __init__(self, config: GRPOConfig, mesh: jax.sharding.Mesh | None = None):
    if not isinstance(config, GRPOConfig):
      raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}.")
    if mesh is not None:
      if "data" not in mesh.axis_names:
        raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}.")
      devices = mesh.shape["data"]
      if config.minibatch_size % devices:
        raise ValueError(f"the mini-batch of {config.minibatch_size} responses does not split "
                         f"evenly over {devices} devices.")
    self.config, self.mesh = config, mesh
    self.model = TransformerPolicy(config.model)
    self.optimizer = make_optimizer(config)
    sft = config.sft
    self._sft = None if sft is None or sft.num_steps == 0 else make_sft(
        self.model, config.task, sft)
    self._init_jit = jax.jit(self._init)
    self.rollout = jax.jit(self._rollout)
    self.batch = jax.jit(self._batch)
    self.step = jax.jit(self._step)
    self.run = jax.jit(self._run, static_argnums=(1, 2))
    self.warm_start = jax.jit(self._warm_start)

  def check_control(self, control: Control) -> None:
    """Raise unless this Trainer's compiled program can run `control`."""
    if not isinstance(control, Control):
      raise TypeError(f"control must be a Control, got {type(control).__name__}.")
    if control.ratio > self.config.ratio_bound:
      raise ValueError(
          f"control ratio {control.ratio} exceeds this run's token_ratio_bound "
          f"{self.config.ratio_bound}; build the GRPOConfig with token_ratio_bound >= "
          f"{control.ratio}.")

  def init(self, key: jax.Array, params: Any = None, control: Control | None = None
           ) -> TrainState:
    """Initial state: `params` (or a fresh model plus the warm start) and `control`."""
    control = self.config.control if control is None else control
    self.check_control(control)
    arrays = control.arrays()
    if self.mesh is not None:
      # Replicated global inputs: with several processes (jax.distributed), each one passes the
      # same host values and they become one array over the whole mesh.
      replicated = NamedSharding(self.mesh, P())
      key = jax.random.wrap_key_data(jax.device_put(jax.random.key_data(key), replicated))
      arrays = jax.device_put(arrays, replicated)
      if params is not None:
        params = jax.device_put(params, replicated)
    return self._init_jit(key, params, arrays)

  def _shard(self, tree):
    if self.mesh is None:
      return tree
    spec = NamedSharding(self.mesh, P("data"))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)

  def _replicate(self, tree):
    if self.mesh is None:
      return tree
    spec = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)

  def _warm_start(self, key: jax.Array) -> Any:
    """Initial parameters followed by the supervised warm start (what `init` starts from)."""
    k_model, k_sft, _ = jax.random.split(key, 3)
    params = init_params(self.config.model, k_model)
    if self._sft is not None:
      params, _ = self._sft(params, k_sft)
    return params

  def _init(self, key: jax.Array, params: Any, control: ControlArrays) -> TrainState:
    if params is None:
      params = self._warm_start(key)
    params = self._replicate(params)
    rl_key = jax.random.split(key, 3)[2]
    return TrainState(params, self.optimizer.init(params), control,
                      jax.random.key_data(rl_key), jnp.zeros((), jnp.int32))

  def _rollout(self, params, key) -> tuple[sampling.Rollout, jax.Array]:
    cfg, task = self.config, self.config.task
    k_prompt, k_sample = jax.random.split(key)
    prompts = jnp.repeat(task.prompts(k_prompt, cfg.prompts_per_step), cfg.group_size, axis=0)
    rollout = sampling.sample(
        self.model, params, self._shard(prompts), k_sample,
        response_length=task.response_length, temperature=cfg.temperature, eos_id=task.eos_id,
        kv_cache=cfg.kv_cache,
    )
    return rollout, task.score(rollout.prompts, rollout.responses)

  def _batch(self, params, key) -> tuple[sampling.Rollout, jax.Array, Batch, jax.Array]:
    """Rollout, rewards, the update's batch and the old tempered logits."""
    cfg = self.config
    rollout, rewards = self._rollout(params, key)
    adv = covrl.grpo_advantages(rewards.reshape(cfg.prompts_per_step, cfg.group_size),
                                normalize_std=cfg.normalize_std).reshape(-1)
    mask = rollout.response_mask
    # Old log-probs recomputed with the training forward pass, at the sampling temperature.
    old_logits = sampling.response_logits(self.model, params, rollout.prompts,
                                          rollout.responses, cfg.temperature)
    batch = self._shard(Batch(
        rollout.prompts, rollout.responses, mask,
        sampling.token_log_probs(old_logits, rollout.responses),
        jnp.where(mask, adv[:, None], 0.0).astype(old_logits.dtype),
    ))
    return rollout, rewards, batch, old_logits

  def _update(self, state: TrainState, batch: Batch, key: jax.Array):
    """PPO epochs over shuffled mini-batches: (params, opt_state, metrics, selected)."""
    cfg = self.config

    def minibatch(carry, inputs):
      params, opt_state, k_epoch, e = carry
      index, rows = inputs
      mb = self._shard(jax.tree.map(lambda x: x[rows], batch))
      grad_fn = jax.value_and_grad(policy_loss, argnums=2, has_aux=True)
      on_policy = (index == 0) & (e == 0)
      (_, (metrics, selected)), grads = grad_fn(
          cfg, self.model, params, mb, jax.random.fold_in(k_epoch, index), state.control,
          state.step, on_policy)
      updates, opt_state = self.optimizer.update(grads, opt_state, params)
      metrics["grad_norm"] = optax.global_norm(grads)
      return (optax.apply_updates(params, updates), opt_state, k_epoch, e), (metrics, selected)

    def epoch(carry, e):
      params, opt_state = carry
      k_epoch = jax.random.fold_in(key, e)
      rows = jax.random.permutation(k_epoch, cfg.batch_size).reshape(cfg.num_minibatches, -1)
      (params, opt_state, _, _), out = jax.lax.scan(
          minibatch, (params, opt_state, k_epoch, e), (jnp.arange(cfg.num_minibatches), rows))
      return (params, opt_state), out

    (params, opt_state), (metrics, selected) = jax.lax.scan(
        epoch, (state.params, state.opt_state), jnp.arange(cfg.ppo_epochs))
    return params, opt_state, metrics, selected

  def _step(self, state: TrainState) -> tuple[TrainState, dict[str, jax.Array], StepAux]:
    cfg = self.config
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    k_rollout, k_update = jax.random.split(key)
    rollout, rewards, batch, old_logits = self._batch(state.params, k_rollout)
    params, opt_state, metrics, selected = self._update(state, batch, k_update)
    first = jax.tree.map(lambda m: m[0, 0], metrics)
    metrics = jax.tree.map(lambda m: jnp.mean(m.astype(old_logits.dtype)), metrics)
    # The first update runs exactly on-policy; this is how far the recomputed old log-probs
    # were from that by round-off alone (see policy_loss).
    metrics["old_log_prob_roundoff"] = first["max_abs_log_ratio"]
    metrics["first_update_selected_frac"] = first["selected_frac"]
    # The whole step's entropy change on the rollout's contexts and its first-order prediction
    # -Cov(log pi, dz), dz the actual change of the tempered logits (THEORY.md T1.7).
    mask = rollout.response_mask
    new_logits = sampling.response_logits(self.model, params, rollout.prompts, rollout.responses,
                                          cfg.temperature)
    old_entropy = covrl.entropy(old_logits)
    metrics.update(
        reward=jnp.mean(rewards),
        reward_std=jnp.std(rewards),
        entropy=covrl.masked_mean(old_entropy, mask),
        response_length=jnp.mean(jnp.sum(mask, axis=1).astype(old_logits.dtype)),
        entropy_change=covrl.masked_mean(covrl.entropy(new_logits) - old_entropy, mask),
        entropy_change_predicted=covrl.masked_mean(
            covrl.entropy_change_first_order(old_logits, new_logits - old_logits), mask),
    )
    new_state = TrainState(self._replicate(params), opt_state, state.control, state.key,
                           state.step + 1)
    return new_state, metrics, StepAux(rollout, rewards, selected)

  def _run(self, state: TrainState, num_steps: int, with_aux: bool = False):
    def body(state, _):
      state, metrics, aux = self._step(state)
      return state, (metrics, aux) if with_aux else metrics

    return jax.lax.scan(body, state, None, length=num_steps)


def get_trainer(config: GRPOConfig, mesh: jax.sharding.Mesh | None = None) -> Trainer:
  """The Trainer of `config` (and `mesh`), built once: equal configs share compiled programs."""
  return _cached_trainer(config, mesh)


@functools.lru_cache(maxsize=16)
def _cached_trainer(config: GRPOConfig, mesh: jax.sharding.Mesh | None) -> Trainer:
  return Trainer(config, mesh)


def make_train(config: GRPOConfig, mesh: jax.sharding.Mesh | None = None):
  """`train(key, params=None) -> (TrainState, metrics)`: a whole GRPO run.

  The loop over steps is one compiled `lax.scan` (`Trainer.run`); the initialisation (model and
  supervised warm start, skipped when `params` is given, for example one warm start shared by
  several methods) is compiled on its own. Metrics are a dict of [num_steps] arrays: reward,
  entropy, clip_frac, selected_frac, touched_frac, approx_kl, grad_norm, entropy_change,
  entropy_change_predicted, ...

  Example:
    >>> import jax
    >>> from covrl.transformer import GRPOConfig, make_train, tasks
    >>> train = make_train(GRPOConfig(tasks.Sort(6, 3), num_steps=2, sft=None))
    >>> state, metrics = train(jax.random.key(0))
    >>> metrics["reward"].shape
    (2,)
  """
  trainer = get_trainer(config, mesh)

  def train(key: jax.Array, params: Any = None):
    return trainer.run(trainer.init(key, params), config.num_steps)

  return train
