"""Enumerable response trees: a task whose every response can be listed, and a policy over it.

A `TreeTask` has P fixed prompts and responses of exactly T tokens over V ids, so each prompt has
V^T responses, listed in lexicographic order (`responses`), and a reward table R[p, y] drawn once
from a seed: partial credit for the positions that match a per-prompt target, plus noise,

  R[p, y] = match_weight * (matches of y with target_p) / T + (1 - match_weight) * U[p, y],

with U uniform on [0, 1) and every prompt's best response ahead of its second by at least
`min_margin` (redrawn otherwise), so the optimum is unique and the regularised optima are not
trivial (they differ between methods).

The policy's token distribution at a node s = (p, y_<d) of the tree is softmax of the network's
logits after the prompt and the prefix. One forward pass over the P V^(T-1) sequences "prompt +
every (T-1)-token prefix" (`prefix_sequences`) holds every node's logits: the sequence whose
prefix is y_<T-1 gives, at response depth d, the logits of the node y_<d, and in lexicographic
order the node with prefix index i at depth d is the sequence i V^(T-1-d). `token_logits` lays
them out per response and position, [P, V^T, T, V], so that a response's log-probability and its
tokens' entropies are plain sums over positions: the exact population of a sampled batch
(`covrl.policy_loss` with `weights=` the responses' probabilities).

Every quantity of the tree (a response's probability, the reach probability of a prefix, the
entropy of the response distribution, a KL divergence) is then a finite sum: no sampling.

References:
  THEORY.md, "T2/T3 in a network, exactly" (proofs/T2_entropy_bonus_bias.md#T2.tf).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from covrl import _checks
from covrl.transformer.model import ModelConfig, TransformerPolicy


@dataclasses.dataclass(frozen=True)
class TreeTask:
  """P prompts, responses of exactly T tokens over V ids, and a seeded reward table.

  Attributes:
    num_prompts: P >= 1 (at most V^prompt_length: the prompts are distinct).
    prompt_length: tokens per prompt, >= 1.
    response_length: T >= 1.
    num_tokens: V >= 2, the vocabulary of prompts and responses alike.
    match_weight: the share of the reward that counts target matches, in [0, 1].
    seed: the NumPy seed of the prompts, targets and noise.
    min_margin: least lead of every prompt's best response over its second, in [0, 0.1].
  """

  num_prompts: int = 8
  prompt_length: int = 2
  response_length: int = 2
  num_tokens: int = 8
  match_weight: float = 0.6
  seed: int = 0
  min_margin: float = 1e-3

  def __post_init__(self):
    _checks.check_int("num_prompts", self.num_prompts, 1)
    _checks.check_int("prompt_length", self.prompt_length, 1)
    _checks.check_int("response_length", self.response_length, 1)
    _checks.check_int("num_tokens", self.num_tokens, 2)
    _checks.check_int("seed", self.seed, 0)
    if self.num_prompts > self.num_tokens ** self.prompt_length:
      raise ValueError(f"{self.num_prompts} distinct prompts need num_tokens ** prompt_length >= "
                       f"{self.num_prompts}, got {self.num_tokens ** self.prompt_length}.")
    if not (isinstance(self.match_weight, int | float) and 0.0 <= self.match_weight <= 1.0):
      raise ValueError(f"match_weight must lie in [0, 1], got {self.match_weight!r}.")
    if not (isinstance(self.min_margin, int | float) and 0.0 <= self.min_margin <= 0.1):
      raise ValueError(f"min_margin must lie in [0, 0.1], got {self.min_margin!r}.")

  @property
  def vocab_size(self) -> int:
    return self.num_tokens

  @property
  def context_length(self) -> int:
    return self.prompt_length + self.response_length

  @property
  def num_responses(self) -> int:
    """V^T, the responses of one prompt."""
    return self.num_tokens ** self.response_length

  @property
  def responses(self) -> np.ndarray:
    """[V^T, T] every response, in lexicographic order (the first token most significant)."""
    return _responses(self.num_tokens, self.response_length)

  @property
  def prompts(self) -> np.ndarray:
    """[P, prompt_length] int32, distinct."""
    return _table(self)[0]

  @property
  def targets(self) -> np.ndarray:
    """[P, T] int32, the response each prompt's match credit counts against."""
    return _table(self)[1]

  @property
  def rewards(self) -> np.ndarray:
    """[P, V^T] float64, R[p, y] (see the module docstring)."""
    return _table(self)[2]

  @property
  def best(self) -> np.ndarray:
    """[P] the index of each prompt's (unique) best response."""
    return np.argmax(self.rewards, axis=1)

  @property
  def max_reward(self) -> np.ndarray:
    """[P] r* = max_y R[p, y]."""
    return np.max(self.rewards, axis=1)

  def model_config(self, **fields: Any) -> ModelConfig:
    """A `ModelConfig` for this task's vocabulary and context (other fields as given)."""
    return ModelConfig(vocab_size=self.num_tokens, context_length=self.context_length, **fields)


@functools.lru_cache(maxsize=32)
def _responses(num_tokens: int, length: int) -> np.ndarray:
  out = np.array(list(itertools.product(range(num_tokens), repeat=length)), np.int32)
  out.setflags(write=False)
  return out.reshape(num_tokens ** length, length)


@functools.lru_cache(maxsize=32)
def _table(task: TreeTask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(task.seed)
  v, lp, t = task.num_tokens, task.prompt_length, task.response_length
  codes = rng.choice(v ** lp, task.num_prompts, replace=False)
  prompts = np.stack([(codes // v ** (lp - 1 - i)) % v for i in range(lp)], axis=1)
  targets = rng.integers(0, v, (task.num_prompts, t))
  matches = (task.responses[None] == targets[:, None]).mean(axis=-1)
  rewards = np.empty((task.num_prompts, task.num_responses))
  for p in range(task.num_prompts):
    for _ in range(1000):
      row = task.match_weight * matches[p] + (1.0 - task.match_weight) * rng.uniform(
          size=task.num_responses)
      top = np.sort(row)[-2:]
      if top[1] - top[0] >= task.min_margin:
        break
    else:  # pragma: no cover - min_margin <= 0.1 is met within a few draws
      raise RuntimeError("no reward table with the margin asked for.")
    rewards[p] = row
  out = (prompts.astype(np.int32), targets.astype(np.int32), rewards)
  for a in out:
    a.setflags(write=False)
  return out


def prefix_sequences(task: TreeTask) -> np.ndarray:
  """[P V^(T-1), prompt_length + T - 1] int32: every prompt followed by every (T-1)-token prefix
  (prompt-major, prefixes in lexicographic order). Their logits hold every node of the tree."""
  prefixes = _responses(task.num_tokens, task.response_length - 1)
  count = prefixes.shape[0]
  return np.concatenate([np.repeat(task.prompts, count, axis=0),
                         np.tile(prefixes, (task.num_prompts, 1))], axis=1).astype(np.int32)


def node_logits(task: TreeTask, logits: jax.Array) -> tuple[jax.Array, ...]:
  """The logits of every node, per depth: d -> [P, V^d, V] (node i is the prefix of index i).

  Args:
    task: the tree.
    logits: [P V^(T-1), L, V] the network's logits on `prefix_sequences(task)`.
  """
  v, t, lp = task.num_tokens, task.response_length, task.prompt_length
  z = logits.reshape(task.num_prompts, v ** (t - 1), logits.shape[1], logits.shape[2])
  return tuple(z[:, :: v ** (t - 1 - d), lp - 1 + d] for d in range(t))


def token_logits(task: TreeTask, logits: jax.Array) -> jax.Array:
  """[P, V^T, T, V]: the logits at each position of each response (those of its prefix's node)."""
  v, t = task.num_tokens, task.response_length
  return jnp.stack([jnp.repeat(z, v ** (t - d), axis=1)
                    for d, z in enumerate(node_logits(task, logits))], axis=2)


def response_log_probs(task: TreeTask, nodes) -> np.ndarray:
  """[P, V^T] log pi(y | p) from the nodes' log-probabilities (`node_logits` through a log
  softmax: d -> [P, V^d, V]), in their dtype, on the host."""
  v, t = task.num_tokens, task.response_length
  out = 0.0
  for d, node in enumerate(nodes):
    flat = np.asarray(node).reshape(task.num_prompts, v ** (d + 1))  # prefixes of length d + 1
    out = out + np.repeat(flat, v ** (t - 1 - d), axis=1)
  return out


def tree_logits(model: TransformerPolicy, params: Any, task: TreeTask) -> jax.Array:
  """[P, V^T, T, V] the policy's logits at every position of every response (one forward)."""
  return token_logits(task, model.apply({"params": params}, jnp.asarray(prefix_sequences(task))))


def check_model(task: TreeTask, config: ModelConfig) -> None:
  """Raise unless a policy of `config` reads this task's tokens and contexts."""
  if config.vocab_size != task.num_tokens:
    raise ValueError(f"the model's vocab_size ({config.vocab_size}) must equal the tree's "
                     f"num_tokens ({task.num_tokens}): its softmax is the node's distribution.")
  if config.context_length < task.context_length - 1:
    raise ValueError(f"the model's context_length ({config.context_length}) is shorter than "
                     f"prompt + response - 1 ({task.context_length - 1}).")
