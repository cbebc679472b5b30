"""Sequence tasks with verifiable rewards, generated on the fly from a PRNG key.

A task draws prompts, knows the correct answer to each prompt (computed from the prompt, so the
reward is verifiable) and scores a sampled response:

  exact match     r = 1 if every response token equals the answer, else 0
  partial credit  r = fraction of answer positions the response gets right

Every task has a vocabulary of `num_symbols` content symbols (ids 0 .. S-1) followed by its own
separator tokens and an end-of-sequence token `eos_id` (the last id). Responses have a fixed
length `response_length`; a response that emits EOS stops there: the EOS position is its last
valid token (`response_mask`) and every answer position from there on counts as wrong.

Tasks:
  * ModularAddition: "a + b =" with a, b written in base S with `num_digits` digits (most
    significant first); the answer is (a + b) mod S^num_digits, same format. Carries make it
    the hardest of the three.
  * Sort: `length` symbols and a separator; the answer is the symbols in ascending order.
  * CopyTwist: `length` symbols and a separator; the answer is the prompt reversed with every
    symbol shifted by `shift` (mod S).

References:
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs, arXiv:2505.22617 (2025) (verifiable
  math rewards, the setting these tasks shrink to a laptop).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

RewardKind = Literal["exact", "partial"]


def _int_at_least(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


def _check_reward(reward: str) -> None:
  if reward not in ("exact", "partial"):
    raise ValueError(f"reward must be 'exact' or 'partial', got {reward!r}.")


def response_mask(responses: jax.Array, eos_id: int) -> jax.Array:
  """Valid response positions: up to and including the first EOS (all, when there is none).

  Args:
    responses: [B, R] int token ids.
    eos_id: the end-of-sequence id.

  Returns:
    [B, R] bool mask.
  """
  is_eos = responses == eos_id
  eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS tokens strictly before t
  return eos_before == 0


class Task:
  """Common interface of the tasks (frozen dataclasses below)."""

  num_symbols: int
  reward: RewardKind

  # Subclasses define these.
  @property
  def prompt_length(self) -> int:  # pragma: no cover - abstract
    raise NotImplementedError

  @property
  def response_length(self) -> int:  # pragma: no cover - abstract
    raise NotImplementedError

  @property
  def num_special(self) -> int:  # separators + EOS
    raise NotImplementedError  # pragma: no cover

  def prompts(self, key: jax.Array, n: int) -> jax.Array:  # pragma: no cover - abstract
    raise NotImplementedError

  def answers(self, prompts: jax.Array) -> jax.Array:  # pragma: no cover - abstract
    raise NotImplementedError

  @property
  def vocab_size(self) -> int:
    return self.num_symbols + self.num_special

  @property
  def eos_id(self) -> int:
    return self.vocab_size - 1

  @property
  def context_length(self) -> int:
    return self.prompt_length + self.response_length

  def correct(self, prompts: jax.Array, responses: jax.Array) -> jax.Array:
    """[B, R] bool: the response token equals the answer and no EOS came before or at it."""
    mask = response_mask(responses, self.eos_id)
    return (responses == self.answers(prompts)) & mask

  def score(self, prompts: jax.Array, responses: jax.Array) -> jax.Array:
    """[B] reward of each response under this task's reward kind ("exact" or "partial")."""
    right = self.correct(prompts, responses)
    if self.reward == "exact":
      return jnp.all(right, axis=-1).astype(jnp.float32)
    return jnp.mean(right.astype(jnp.float32), axis=-1)

  def _check(self) -> None:
    _int_at_least("num_symbols", self.num_symbols, 2)
    _check_reward(self.reward)


@dataclasses.dataclass(frozen=True)
class ModularAddition(Task):
  """a + b mod S^d in base S, d digits each (prompt "a_1..a_d + b_1..b_d =").

  Attributes:
    num_symbols: the base S (digits are ids 0 .. S-1).
    num_digits: digits per number d.
    reward: "exact" or "partial".
  """

  num_symbols: int = 5
  num_digits: int = 2
  reward: RewardKind = "exact"

  def __post_init__(self):
    self._check()
    _int_at_least("num_digits", self.num_digits, 1)

  @property
  def num_special(self) -> int:
    return 3  # "+", "=", EOS

  @property
  def prompt_length(self) -> int:
    return 2 * self.num_digits + 2

  @property
  def response_length(self) -> int:
    return self.num_digits

  def prompts(self, key: jax.Array, n: int) -> jax.Array:
    s, d = self.num_symbols, self.num_digits
    digits = jax.random.randint(key, (n, 2, d), 0, s, jnp.int32)
    plus = jnp.full((n, 1), s, jnp.int32)
    equals = jnp.full((n, 1), s + 1, jnp.int32)
    return jnp.concatenate([digits[:, 0], plus, digits[:, 1], equals], axis=1)

  def answers(self, prompts: jax.Array) -> jax.Array:
    s, d = self.num_symbols, self.num_digits
    weights = s ** jnp.arange(d - 1, -1, -1, dtype=jnp.int32)
    a = jnp.sum(prompts[:, :d] * weights, axis=1)
    b = jnp.sum(prompts[:, d + 1:2 * d + 1] * weights, axis=1)
    total = (a + b) % (s**d)
    return (total[:, None] // weights[None]) % s


class _SymbolsTask(Task):
  """A prompt of `length` symbols then a separator; the answer is `length` symbols."""

  length: int

  @property
  def num_special(self) -> int:
    return 2  # separator, EOS

  @property
  def prompt_length(self) -> int:
    return self.length + 1

  @property
  def response_length(self) -> int:
    return self.length

  def prompts(self, key: jax.Array, n: int) -> jax.Array:
    items = jax.random.randint(key, (n, self.length), 0, self.num_symbols, jnp.int32)
    return jnp.concatenate([items, jnp.full((n, 1), self.num_symbols, jnp.int32)], axis=1)


@dataclasses.dataclass(frozen=True)
class Sort(_SymbolsTask):
  """Sort `length` symbols ascending (prompt "x_1..x_n |").

  Attributes:
    num_symbols: alphabet size S.
    length: number of symbols n.
    reward: "exact" or "partial".
  """

  num_symbols: int = 8
  length: int = 4
  reward: RewardKind = "exact"

  def __post_init__(self):
    self._check()
    _int_at_least("length", self.length, 1)

  def answers(self, prompts: jax.Array) -> jax.Array:
    return jnp.sort(prompts[:, :self.length], axis=1)


@dataclasses.dataclass(frozen=True)
class CopyTwist(_SymbolsTask):
  """Copy with a twist: the prompt reversed, each symbol shifted by `shift` mod S.

  Attributes:
    num_symbols: alphabet size S.
    length: number of symbols n.
    shift: added to every symbol, mod S.
    reverse: reverse the order (the twist that needs attention to far positions).
    reward: "exact" or "partial".
  """

  num_symbols: int = 8
  length: int = 4
  shift: int = 1
  reverse: bool = True
  reward: RewardKind = "exact"

  def __post_init__(self):
    self._check()
    _int_at_least("length", self.length, 1)
    if isinstance(self.shift, bool) or not isinstance(self.shift, int):
      raise ValueError(f"shift must be an int, got {self.shift!r}.")
    if not isinstance(self.reverse, bool):
      raise ValueError(f"reverse must be a bool, got {self.reverse!r}.")

  def answers(self, prompts: jax.Array) -> jax.Array:
    items = prompts[:, :self.length]
    if self.reverse:
      items = items[:, ::-1]
    return (items + self.shift) % self.num_symbols


TASKS: dict[str, type] = {
    "modular_addition": ModularAddition,
    "sort": Sort,
    "copy_twist": CopyTwist,
}


def make_task(name: str, **kwargs) -> Task:
  """A task by name ("modular_addition", "sort", "copy_twist") with its fields as keywords."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}.")
  return TASKS[name](**kwargs)
