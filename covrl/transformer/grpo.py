"""GRPO with PPO inner epochs for the transformer policy; every entropy control is a config switch.

One training step, all inside one compiled program:

  1. draw `prompts_per_step` prompts and sample `group_size` responses to each at temperature tau;
  2. score them (the task's verifiable reward) and form group-normalised advantages
     (covrl.grpo_advantages), the same for every token of a response;
  3. recompute the old log-probabilities log softmax(z / tau)[y] with the training forward pass;
  4. for `ppo_epochs` epochs, shuffle the responses into `num_minibatches` mini-batches and take
     one optimizer step on each, with the loss of the configured control method.

The control is a covrl control value (`covrl.NoControl`, `covrl.EntropyBonus`,
`covrl.ClipHigher`, `covrl.ClipCov`, `covrl.KLCov`; coefficients constant or annealed). It lives
in the loop state with its numbers traced (`loss.normalize_control`), so one compiled program
runs every control of a family (a class and its static options) without recompiling
(`Trainer.init(..., control=...)`), and can be vmapped over strengths or seeds.

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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import covrl
from covrl.transformer import sampling
from covrl.transformer.config import GRPOConfig, control_ratio
from covrl.transformer.loss import Batch, normalize_control, policy_loss
from covrl.transformer.model import TransformerPolicy, init_params
from covrl.transformer.sft import make_sft


class TrainState(NamedTuple):
  """Loop state. `key` is raw key data (uint32), so checkpoints hold plain arrays; `control`
  is the normalized control value (`loss.normalize_control`: float32 leaves)."""

  params: Any
  opt_state: Any
  control: covrl.Control
  key: jax.Array
  step: jax.Array


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


class Trainer:
  """The compiled pieces of a GRPO run, jitted: `init`, `step`, `run`, and the parts a loop
  composes: `rollout`, `batch`, `update` (with `minibatch_rows`, `shard`, `replicate`).

  `make_train` composes them; `covrl.transformer.run_training` calls `run` in chunks, for
  progress and checkpoints. Step t draws its randomness from fold_in(key, t), so a run gives the
  same result however it is cut into chunks. The control lives in the state with traced numbers,
  so one Trainer runs every control of its config's control family (the same class and static
  options, for example KL-Cov with any ratio up to `config.ratio_bound` and any constant or
  annealed coefficient) without recompiling; `check_control` says which.

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
    self.family = jax.tree.structure(normalize_control(config.control, config.ratio_bound))
    sft = config.sft
    self._sft = None if sft is None or sft.num_steps == 0 else make_sft(
        self.model, config.task, sft)
    self._init_jit = jax.jit(self._init)
    self.rollout = jax.jit(self._rollout)
    self.batch = jax.jit(self._batch)
    self.update = jax.jit(self._update)
    self.step = jax.jit(self._step)
    self.run = jax.jit(self._run, static_argnums=(1, 2))
    self.warm_start = jax.jit(self._warm_start)

  def in_family(self, control: covrl.Control) -> bool:
    """Whether `control` is of this Trainer's control family (its compiled program's)."""
    return jax.tree.structure(normalize_control(control, self.config.ratio_bound)) == self.family

  def check_control(self, control: covrl.Control) -> None:
    """Raise unless this Trainer's compiled program can run `control`."""
    if not isinstance(control, covrl.Control):
      raise TypeError(f"control must be a covrl control value (covrl.NoControl(), "
                      f"covrl.KLCov(), ...), got {type(control).__name__}.")
    ratio = control_ratio(control)
    if ratio is not None and ratio > self.config.ratio_bound:
      raise ValueError(
          f"control ratio {ratio} exceeds this run's token_ratio_bound "
          f"{self.config.ratio_bound}; build the GRPOConfig with token_ratio_bound >= {ratio}.")
    if not self.in_family(control):
      raise ValueError(
          f"this Trainer runs the control family of {self.config.control!r} (one compiled "
          f"program per control class and static options); {control!r} belongs to another. "
          "Use the Trainer of a config with this control: get_trainer(dataclasses.replace("
          "config, control=control)).")

  def init(self, key: jax.Array, params: Any = None, control: covrl.Control | None = None
           ) -> TrainState:
    """Initial state: `params` (or a fresh model plus the warm start) and `control`."""
    control = self.config.control if control is None else control
    self.check_control(control)
    control = normalize_control(control, self.config.ratio_bound)
    if self.mesh is not None:
      # Replicated global inputs: with several processes (jax.distributed), each one passes the
      # same host values and they become one array over the whole mesh.
      replicated = NamedSharding(self.mesh, P())
      key = jax.random.wrap_key_data(jax.device_put(jax.random.key_data(key), replicated))
      control = jax.device_put(control, replicated)
      if params is not None:
        params = jax.device_put(params, replicated)
    return self._init_jit(key, params, control)

  def shard(self, tree):
    """`tree` constrained to be split over the mesh's "data" axis (unchanged without a mesh)."""
    if self.mesh is None:
      return tree
    spec = NamedSharding(self.mesh, P("data"))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)

  def replicate(self, tree):
    """`tree` constrained to be replicated over the mesh (unchanged without a mesh)."""
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

  def _init(self, key: jax.Array, params: Any, control: covrl.Control) -> TrainState:
    if params is None:
      params = self._warm_start(key)
    params = self.replicate(params)
    rl_key = jax.random.split(key, 3)[2]
    return TrainState(params, self.optimizer.init(params), control,
                      jax.random.key_data(rl_key), jnp.zeros((), jnp.int32))

  def _rollout(self, params, key) -> tuple[sampling.Rollout, jax.Array]:
    """Sampled responses to `prompts_per_step` fresh prompts, `group_size` each, and rewards."""
    cfg, task = self.config, self.config.task
    k_prompt, k_sample = jax.random.split(key)
    prompts = jnp.repeat(task.prompts(k_prompt, cfg.prompts_per_step), cfg.group_size, axis=0)
    rollout = sampling.sample(
        self.model, params, self.shard(prompts), k_sample,
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
    batch = self.shard(Batch(
        rollout.prompts, rollout.responses, mask,
        sampling.token_log_probs(old_logits, rollout.responses),
        jnp.where(mask, adv[:, None], 0.0).astype(old_logits.dtype),
    ))
    return rollout, rewards, batch, old_logits

  def minibatch_rows(self, key: jax.Array, epoch: jax.Array | int) -> jax.Array:
    """[num_minibatches, minibatch_size] rows of each mini-batch of `epoch` of the update with
    key `key` (a fresh permutation of the batch per epoch)."""
    cfg = self.config
    rows = jax.random.permutation(jax.random.fold_in(key, epoch), cfg.batch_size)
    return rows.reshape(cfg.num_minibatches, -1)

  def _update(self, state: TrainState, batch: Batch, key: jax.Array,
              control: covrl.Control | None = None):
    """PPO epochs over shuffled mini-batches with `control` (default: the state's), at the
    state's step: (params, opt_state, metrics, selected), metrics [epochs, minibatches]."""
    cfg = self.config
    control = state.control if control is None else control

    def minibatch(carry, inputs):
      params, opt_state, k_epoch, e = carry
      index, rows = inputs
      mb = self.shard(jax.tree.map(lambda x: x[rows], batch))
      grad_fn = jax.value_and_grad(policy_loss, argnums=2, has_aux=True)
      on_policy = (index == 0) & (e == 0)
      (_, (metrics, selected)), grads = grad_fn(
          cfg, self.model, params, mb, jax.random.fold_in(k_epoch, index), control,
          state.step, on_policy)
      updates, opt_state = self.optimizer.update(grads, opt_state, params)
      metrics["grad_norm"] = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
      return (optax.apply_updates(params, updates), opt_state, k_epoch, e), (metrics, selected)

    def epoch(carry, e):
      params, opt_state = carry
      k_epoch = jax.random.fold_in(key, e)
      (params, opt_state, _, _), out = jax.lax.scan(
          minibatch, (params, opt_state, k_epoch, e),
          (jnp.arange(cfg.num_minibatches), self.minibatch_rows(key, e)))
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
    if cfg.diagnostics:
      metrics.update(self._diagnostics(state.params, batch, rewards, selected))
    new_state = TrainState(self.replicate(params), opt_state, state.control, state.key,
                           state.step + 1)
    return new_state, metrics, StepAux(rollout, rewards, selected)

  def _diagnostics(self, params, batch: Batch, rewards, selected) -> dict[str, jax.Array]:
    """The regime measurements of `GRPOConfig.diagnostics` on a step's batch."""
    cfg = self.config
    mask = batch.response_mask

    def objectives(p):
      logits = sampling.response_logits(self.model, p, batch.prompts, batch.responses,
                                        cfg.temperature)
      log_prob = sampling.token_log_probs(logits, batch.responses)
      ratio = jnp.exp(log_prob - jax.lax.stop_gradient(log_prob))  # on-policy: the PG
      pg = covrl.aggregate(-batch.advantages * ratio, mask, cfg.loss_agg_mode).value
      ent = covrl.aggregate(covrl.entropy(logits), mask, cfg.loss_agg_mode).value
      return pg, ent

    (pg, ent), pullback = jax.vjp(objectives, params)
    # Both gradients from one batched pullback (one backward program, not two).
    basis = jnp.eye(2, dtype=pg.dtype)
    (grads,) = jax.vmap(pullback)((basis[0], basis[1].astype(ent.dtype)))
    g_pg, g_h = jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads)
    cov = covrl.token_covariance(batch.old_log_probs, batch.advantages, mask)
    shares = covrl.diagnostics.covariance_concentration(cov, mask, (0.002, 0.02))
    correct = (rewards >= 1.0).reshape(cfg.prompts_per_step, cfg.group_size)
    return {
        "balance_coefficient": covrl.diagnostics.balance_coefficient(g_pg, g_h),
        "cov_share_top_0.2%": shares[0],
        "cov_share_top_2%": shares[1],
        "band_tokens": covrl.diagnostics.tokens_in_band(cov, mask, 1.0, 5.0).astype(jnp.float32),
        "selected_per_minibatch": jnp.mean(jnp.sum(selected, axis=(-2, -1)).astype(
            jnp.float32)),
        "pass_at_k": jnp.mean(covrl.diagnostics.pass_at_k(correct, cfg.group_size)),
    }

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
