"""Exact expected updates of a transformer policy on an enumerable response tree.

A sampled GRPO step estimates an expectation over responses; on a `tree.TreeTask` that
expectation is a finite sum, so each step here takes it exactly. Step t::

  1. the population of the policy pi_t = pi_theta_t: every response y of every prompt p, a row
     of T tokens with weight pi_t(y | p) / P (the share of a sampled batch it would fill), its
     old log-probabilities, and its advantage from the return
        G(p, y) = R(p, y) - alpha_ret * log pi_t(y | p)
     (`return_entropy` alpha_ret, the entropy in the return of soft RL; 0 by default), centred
     on its mean under pi_t per prompt (Dr. GRPO's advantage with infinitely many samples;
     `normalize_std` also divides by the standard deviation, GRPO's);
  2. `ppo_epochs` optimizer steps on `covrl.policy_loss(control, ..., weights=...)` of that
     population: the expected loss of a sampled batch, with every method's selection taken as a
     sampled batch's would be in the limit (`covrl.selection`), the first step exactly
     on-policy (old log-probabilities equal to the current ones, as the sampled lab's first
     update) and the later ones off-policy, where PPO's clip and KL-Cov's penalty act.

The two forms of an entropy bonus differ in what is differentiated. With `return_entropy`
alpha (form a) the objective is E_pi[R] + alpha H(pi(. | p)), the entropy of the whole response
distribution (by the chain rule, the sum over positions of each node's entropy weighted by its
reach probability, the reach differentiated); its stationary point is softmax(R(p, .) / alpha).
`covrl.EntropyBonus(alpha)` (form b, what verl runs) adds alpha times the nodes' entropies with
the reach weights of the rollout held fixed; its stationary points solve pi_s =
softmax(Q^pi(s, .) / alpha), with the unregularised Q^pi (proofs/T2_entropy_bonus_bias.md#T2.tf).

`make_train(config)` returns `train(params, control=None, return_entropy=None, references=None)`,
one jitted `lax.scan` over steps whose control value and return coefficient are traced: vmap it
over strengths to run a grid in one program. Its metrics are exact over the tree (float32):
expected reward and optimality gap, the entropy of the response distribution, the KL divergence
KL(ref || pi) to reference policies, and the loss's own metrics. `response_log_probs` evaluates
parameters in float64 for the checks.

References:
  J. Mei et al., On the Global Convergence Rates of Softmax Policy Gradient Methods, ICML 2020.
  T. Haarnoja et al., Reinforcement Learning with Deep Energy-Based Policies, ICML 2017 (soft RL).
  Z. Liu et al., Understanding R1-Zero-Like Training (Dr. GRPO), arXiv:2503.20783 (2025).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import covrl
from covrl import schedules
from covrl._compat import enable_x64
from covrl.transformer import sampling, tree
from covrl.transformer.model import ModelConfig, TransformerPolicy, init_params


@dataclasses.dataclass(frozen=True)
class ExactConfig:
  """A run of exact expected updates.

  Attributes:
    task: the enumerable tree.
    model: the policy's shape (None: `task.model_config()`, the lab's default width 64, two
      layers); its vocab_size must be the tree's num_tokens.
    control: the covrl control value of the loss (its strengths may be schedules of the step),
      or a tuple of them: one compiled program for every method of the tuple, `train`'s
      `method` picking one (a `lax.switch`; vmap over it to run several side by side).
    return_entropy: alpha_ret >= 0 of the entropy in the return (form a), a number or a
      schedule of the step.
    num_steps: exact rollouts (steps), >= 0.
    ppo_epochs: optimizer steps per rollout, >= 1 (the first on-policy).
    learning_rate: Adam's peak step size, > 0.
    warmup: steps of a linear warm-up of the step size from 0, >= 0 (Adam's first steps move
      every parameter by about the step size whatever its gradient, which would throw a
      converged network off when a run continues from it).
    cosine: decay the step size to 0 over the run (cosine) after the warm-up; off, it is
      constant.
    normalize_std: divide the advantages by the return's standard deviation under the policy
      (GRPO's normalisation in the limit of many samples); off, they are only centred.
    loss_agg_mode: the loss's aggregation (every response has T tokens, so the modes differ
      only by constant factors).
  """

  task: tree.TreeTask = dataclasses.field(default_factory=tree.TreeTask)
  model: ModelConfig | None = None
  control: covrl.Control = dataclasses.field(default_factory=covrl.NoControl)
  return_entropy: Any = 0.0
  num_steps: int = 1000
  ppo_epochs: int = 1
  learning_rate: float = 2e-3
  warmup: int = 0
  cosine: bool = True
  normalize_std: bool = False
  loss_agg_mode: str = "token-mean"

  def __post_init__(self):
    if not isinstance(self.task, tree.TreeTask):
      raise TypeError(f"task must be a tree.TreeTask, got {type(self.task).__name__}.")
    if self.model is None:
      object.__setattr__(self, "model", self.task.model_config())
    if not isinstance(self.model, ModelConfig):
      raise TypeError(f"model must be a ModelConfig, got {type(self.model).__name__}.")
    tree.check_model(self.task, self.model)
    for value in self.control if isinstance(self.control, tuple) else (self.control,):
      covrl.methods.check_control(value)
    if not callable(self.return_entropy):
      covrl._checks.check_nonnegative("return_entropy", self.return_entropy)
    for name, minimum in (("num_steps", 0), ("ppo_epochs", 1), ("warmup", 0)):
      covrl._checks.check_int(name, getattr(self, name), minimum)
    covrl._checks.check_positive("learning_rate", self.learning_rate)
    if self.loss_agg_mode not in covrl.LOSS_AGG_MODES:
      raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; choose one of "
                       f"{covrl.LOSS_AGG_MODES}.")


def lr_schedule(config: ExactConfig, peak: Any = None) -> optax.Schedule:
  """The step size per optimizer update: warm-up, then cosine decay to 0 (or constant), from the
  peak `peak` (default: the config's learning_rate; may be traced)."""
  updates = max(config.num_steps * config.ppo_epochs, 1)
  warmup = min(config.warmup * config.ppo_epochs, updates)
  peak = config.learning_rate if peak is None else peak
  rest = optax.cosine_decay_schedule(peak, max(updates - warmup, 1)) if config.cosine else (
      optax.constant_schedule(peak))
  if warmup == 0:
    return rest
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), rest], [warmup])


def advantages(rewards: jax.Array, probs: jax.Array, normalize_std: bool = False) -> jax.Array:
  """[P, N] population advantages: the return centred on its mean under `probs` per prompt.

  Args:
    rewards: [P, N] the return of every response.
    probs: [P, N] each prompt's response distribution (rows sum to 1).
    normalize_std: also divide by the return's standard deviation under `probs` (0 where that
      is 0). A prompt whose responses all return the same gets advantages exactly 0 either way.
  """
  # As covrl.grpo_advantages: a prompt whose returns are all equal gets exactly 0 (its float mean
  # can be an ulp off the common value).
  equal = jnp.all(rewards == rewards[:, :1], axis=1, keepdims=True)
  centred = jnp.where(equal, 0.0, rewards - jnp.sum(probs * rewards, axis=1, keepdims=True))
  if not normalize_std:
    return centred
  std = jnp.sqrt(jnp.sum(probs * centred**2, axis=1, keepdims=True))
  return jnp.where(std > 0, centred / jnp.where(std > 0, std, 1.0), 0.0)


def _kl(ref: jax.Array, log_p: jax.Array) -> jax.Array:
  """Mean over prompts of KL(ref || p) for [..., P, N] response log-probabilities."""
  return jnp.mean(jnp.sum(jnp.exp(ref) * (ref - log_p), axis=-1), axis=-1)


class Population(NamedTuple):
  """The exact population of a policy's sampled batch (see the module docstring).

  Attributes:
    old_log_prob: [P, N, T] log pi(y_d | p, y_<d) of every response's tokens (detached).
    weights: [P, N] pi(y | p) / P, each response's share of a batch.
    advantages: [P, N] the return centred (and, with normalize_std, scaled) per prompt.
    response_log_prob: [P, N] log pi(y | p).
  """

  old_log_prob: jax.Array
  weights: jax.Array
  advantages: jax.Array
  response_log_prob: jax.Array


def _policy(config: ExactConfig, params: Any) -> tuple[jax.Array, jax.Array]:
  """([P, N, T, V] logits, [P, N, T] token log-probabilities) of every response."""
  logits = tree.tree_logits(TransformerPolicy(config.model), params, config.task)
  ids = jnp.broadcast_to(jnp.asarray(config.task.responses), logits.shape[:3])
  return logits, sampling.token_log_probs(logits, ids)


def _population(config: ExactConfig, log_prob: jax.Array, return_entropy: Any,
                step: jax.Array | int) -> Population:
  task = config.task
  log_prob = jax.lax.stop_gradient(log_prob)
  response = jnp.sum(log_prob, axis=-1)
  probs = jnp.exp(response)
  alpha = schedules.value_at(return_entropy, step, "return_entropy")
  rewards = jnp.asarray(task.rewards, log_prob.dtype)
  adv = advantages(rewards - alpha * response, probs, config.normalize_std)
  return Population(log_prob, probs / task.num_prompts, adv, response)


def population(config: ExactConfig, params: Any, return_entropy: Any = 0.0,
               step: jax.Array | int = 0) -> Population:
  """The population of the policy `params` at step `step` (return_entropy may be a schedule)."""
  return _population(config, _policy(config, params)[1], return_entropy, step)


def expected_loss(config: ExactConfig, params: Any, control: Any, batch: Population | None, *,
                  step: jax.Array | int = 0, method: jax.Array | int = 0,
                  return_entropy: Any = 0.0) -> tuple[jax.Array, tuple[dict, Population]]:
  """`covrl.policy_loss` of `control` over the population `batch`, at the policy `params`.

  Its gradient is the expected gradient of a sampled batch of the population's policy. With
  `batch` None the update is the first one, exactly on-policy: the population is that of
  `params` itself (its old log-probabilities the current ones exactly: a recomputed copy would
  differ by round-off, which KL-Cov's abs(x) turns into a push), built from the same forward pass
  with `return_entropy` at `step`. A tuple of controls is a `lax.switch` on `method`.

  Returns:
    (loss, (metrics, the population used)).
  """
  task = config.task
  rows, length = task.num_prompts * task.num_responses, task.response_length
  logits, log_prob = _policy(config, params)
  if batch is None:
    batch = _population(config, log_prob, return_entropy, step)
  # The entropies rather than the logits: the bonus differentiates through them and the methods
  # that read them get them detached, without the logits-only metric loss_entropy_change (a
  # gradient inside the gradient, which doubled the compile time).
  entropy = covrl.entropy(logits).reshape(rows, length)
  adv = jnp.broadcast_to(batch.advantages.reshape(rows, 1), (rows, length))
  mask = jnp.ones((rows, length), log_prob.dtype)
  old = batch.old_log_prob.reshape(rows, length)

  def of(value):
    loss, metrics = covrl.policy_loss(
        value, old, log_prob.reshape(rows, length), adv, mask,
        weights=batch.weights.reshape(rows), entropy=entropy, step=step,
        loss_agg_mode=config.loss_agg_mode)
    return loss, (metrics, batch)

  if isinstance(control, tuple):  # one program for several methods: the branch `method`
    return jax.lax.switch(method, [functools.partial(of, value) for value in control])
  return of(control)


def make_train(config: ExactConfig):
  """`train(params, control=None, return_entropy=None, references=None, method=0,
  learning_rate=None)`, returning `(params, metrics)`: `num_steps` exact rollouts of
  `ppo_epochs` Adam steps each (`learning_rate`, which may be traced, overrides the config's
  peak step size).

  `control` and `return_entropy` default to the config's; pass values of the same structure
  (traced numbers, schedules) to reuse the compiled program, or vmap `train` over them. With a
  tuple of controls (`ExactConfig.control`), `method` (an int, traced) picks the one this run
  trains with. `references`, an optional [M, P, N] array of reference response
  log-probabilities, adds the metric "kl_to_reference" ([M] per step: KL(ref_m || pi), mean over
  prompts). Metrics are [num_steps] arrays (the policy at the start of each step) of: reward,
  gap, response_entropy (of the response distribution, mean over prompts), the loss and its
  metrics (of the first, on-policy, update); `final` holds reward, gap, response_entropy (and
  KL) of the returned parameters.
  """
  cfg = config
  rewards = jnp.asarray(cfg.task.rewards, jnp.float32)
  r_star = jnp.max(rewards, axis=1)

  def train(params, control=None, return_entropy=None, references=None, method=0,
            learning_rate=None):
    control = cfg.control if control is None else control
    return_entropy = cfg.return_entropy if return_entropy is None else return_entropy
    optimizer = optax.adam(lr_schedule(cfg, learning_rate))

    def grad(params, batch, t):
      loss = lambda p: expected_loss(cfg, p, control, batch, step=t, method=method,
                                     return_entropy=return_entropy)
      return jax.grad(loss, has_aux=True)(params)

    def observe(response, out):
      probs = jnp.exp(response)
      expected = jnp.sum(probs * rewards, axis=1)
      out.update(reward=jnp.mean(expected), gap=jnp.mean(r_star - expected),
                 response_entropy=-jnp.mean(jnp.sum(probs * response, axis=1)))
      if references is not None:
        out["kl_to_reference"] = _kl(references, response[None])
      return out

    def step(carry, t):
      params, opt_state = carry
      grads, (metrics, batch) = grad(params, None, t)  # the rollout's own forward pass
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)

      def epoch(carry, _):
        params, opt_state = carry
        grads, _ = grad(params, batch, t)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

      if cfg.ppo_epochs > 1:
        (params, opt_state), _ = jax.lax.scan(epoch, (params, opt_state), None,
                                              length=cfg.ppo_epochs - 1)
      return (params, opt_state), observe(batch.response_log_prob, dict(metrics))

    (params, _), metrics = jax.lax.scan(step, (params, optimizer.init(params)),
                                        jnp.arange(cfg.num_steps))
    metrics["final"] = observe(population(cfg, params).response_log_prob, {})
    return params, metrics

  return jax.jit(train)


def init(config: ExactConfig, key: jax.Array) -> Any:
  """Fresh parameters of the config's policy."""
  return init_params(config.model, key)


def node_log_probs(config: ExactConfig, params: Any) -> tuple[np.ndarray, ...]:
  """log pi(. | node) of every node, per depth d: [P, V^d, V] float64, computed on the host with
  the parameters cast to float64 (the exact evaluation the checks compare with references)."""
  with enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
    params64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), params)
    return tuple(np.asarray(z, np.float64) for z in _nodes64(config.task, config.model)(params64))


@functools.lru_cache(maxsize=16)
def _nodes64(task: tree.TreeTask, model: ModelConfig):
  sequences = tree.prefix_sequences(task)

  @jax.jit
  def nodes(params):
    logits = TransformerPolicy(model).apply({"params": params}, jnp.asarray(sequences))
    return tuple(jax.nn.log_softmax(z, axis=-1) for z in tree.node_logits(task, logits))

  return nodes


def response_log_probs(config: ExactConfig, params: Any) -> np.ndarray:
  """[P, N] log pi(y | p) of every response in float64 (`node_log_probs` summed along it)."""
  return tree.response_log_probs(config.task, node_log_probs(config, params))
