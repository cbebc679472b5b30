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
  * ForkCopy: a mode token, `length` symbols and a separator; the answer copies the symbols,
    except at `num_forks` fixed fork positions, where it shifts them by `shift` on the prompts
    in "shift" mode. Long responses whose tokens are almost all fixed by the prompt, and a few
    forking tokens that decide the reward (the regime of Cui et al.'s covariance mechanism).

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


def uniform_noise(k_flip: jax.Array, k_token: jax.Array, tokens: jax.Array, noise: float,
                  vocab_size: int) -> jax.Array:
  """Replace each token, independently with probability `noise`, by one uniform over the vocab."""
  flip = jax.random.bernoulli(k_flip, noise, tokens.shape)
  random_tokens = jax.random.randint(k_token, tokens.shape, 0, vocab_size, jnp.int32)
  return jnp.where(flip, random_tokens, tokens)


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

  def demonstrate(self, key: jax.Array, n: int, noise: float) -> tuple[jax.Array, jax.Array]:
    """n prompts with imperfect demonstrated answers (what the supervised warm start fits).

    The default demonstrator gives the correct answer with each token independently replaced,
    with probability `noise`, by a token uniform over the whole vocabulary (EOS included).

    Returns:
      (prompts [n, P], responses [n, R]).
    """
    k_prompt, k_flip, k_token = jax.random.split(key, 3)
    prompts = self.prompts(k_prompt, n)
    return prompts, uniform_noise(k_flip, k_token, self.answers(prompts), noise, self.vocab_size)

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


def _check_probability(name: str, value: Any) -> None:
  if isinstance(value, bool) or not (isinstance(value, int | float) and 0 <= value <= 1):
    raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ForkCopy(Task):
  """Copy `length` symbols; at a few fork positions, shift them when the prompt's mode says so.

  Prompt: a mode token (COPY or SHIFT), the symbols x_1 .. x_n, a separator. Answer: y_t = x_t
  at every position, except at the fork positions (`fork_positions`, evenly spaced), where on a
  SHIFT prompt y_t = x_t + shift (mod S). A prompt is SHIFT with probability `shift_prob`.

  Almost every answer token is fixed by the prompt (a copy); the forks decide the reward. The
  demonstrations of the warm start (`demonstrate`) come from a demonstrator that ignores the mode
  at the forks: it copies there with probability `trap_prob` and shifts otherwise, on every
  prompt, before the usual uniform noise. A policy fitted to them copies at a fork with
  probability about trap_prob whatever the mode: greedy decoding is right on COPY prompts and
  takes the trap (the copy) on SHIFT prompts, where sampling still finds the shift. Learning to
  read the mode needs the SHIFT prompts' rare successes, while the COPY prompts' updates sharpen
  the copy at every fork; a policy whose entropy collapses first stays on the trap there, and its
  reward and pass@k stop at about 1 - shift_prob (the regime of Cui et al.'s entropy collapse).

  Attributes:
    num_symbols: alphabet size S (content ids 0 .. S-1).
    length: symbols n to copy, the response length.
    num_forks: fork positions F, 1 <= F <= n.
    shift: added (mod S) at the forks of SHIFT prompts; must not be 0 mod S.
    shift_prob: probability that a prompt is in SHIFT mode.
    trap_prob: probability that the demonstrator copies at a fork (its trap on SHIFT prompts).
    mode_cue: how far the demonstrator reads the mode, in [0, 1]: on COPY prompts it copies at
      a fork with probability trap_prob + mode_cue (1 - trap_prob). 0 (default): it ignores the
      mode, and the warm start must learn to read it from RL alone; 1: it is right on every COPY
      prompt, and only the SHIFT prompts' own successes teach the shift.
    reward: "exact" or "partial".
  """

  num_symbols: int = 8
  length: int = 32
  num_forks: int = 1
  shift: int = 1
  shift_prob: float = 0.25
  trap_prob: float = 0.7
  mode_cue: float = 0.0
  reward: RewardKind = "exact"

  def __post_init__(self):
    self._check()
    _int_at_least("length", self.length, 1)
    _int_at_least("num_forks", self.num_forks, 1)
    if self.num_forks > self.length:
      raise ValueError(f"num_forks={self.num_forks} exceeds length={self.length}.")
    if isinstance(self.shift, bool) or not isinstance(self.shift, int) or (
        self.shift % self.num_symbols == 0):
      raise ValueError(f"shift must be an int that is not 0 mod num_symbols, got {self.shift!r}.")
    _check_probability("shift_prob", self.shift_prob)
    _check_probability("trap_prob", self.trap_prob)
    _check_probability("mode_cue", self.mode_cue)

  @property
  def copy_id(self) -> int:
    return self.num_symbols

  @property
  def shift_id(self) -> int:
    return self.num_symbols + 1

  @property
  def num_special(self) -> int:
    return 4  # COPY, SHIFT, separator, EOS

  @property
  def prompt_length(self) -> int:
    return self.length + 2

  @property
  def response_length(self) -> int:
    return self.length

  @property
  def fork_positions(self) -> tuple[int, ...]:
    """Response positions of the forks: F evenly spaced positions (0-based)."""
    n, f = self.length, self.num_forks
    return tuple((j + 1) * n // (f + 1) for j in range(f)) if f < n else tuple(range(n))

  def fork_mask(self) -> jax.Array:
    """[R] bool, True at the fork positions."""
    return jnp.zeros((self.length,), bool).at[jnp.asarray(self.fork_positions)].set(True)

  def is_shift(self, prompts: jax.Array) -> jax.Array:
    """[B] bool: the prompt is in SHIFT mode."""
    return prompts[:, 0] == self.shift_id

  def prompts(self, key: jax.Array, n: int) -> jax.Array:
    k_mode, k_items = jax.random.split(key)
    shift = jax.random.bernoulli(k_mode, self.shift_prob, (n, 1))
    mode = jnp.where(shift, self.shift_id, self.copy_id).astype(jnp.int32)
    items = jax.random.randint(k_items, (n, self.length), 0, self.num_symbols, jnp.int32)
    sep = jnp.full((n, 1), self.num_symbols + 2, jnp.int32)
    return jnp.concatenate([mode, items, sep], axis=1)

  def _items(self, prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
    items = prompts[:, 1:self.length + 1]
    return items, (items + self.shift) % self.num_symbols

  def answers(self, prompts: jax.Array) -> jax.Array:
    items, shifted = self._items(prompts)
    at_fork = self.fork_mask()[None, :] & self.is_shift(prompts)[:, None]
    return jnp.where(at_fork, shifted, items)

  def demonstrate(self, key: jax.Array, n: int, noise: float) -> tuple[jax.Array, jax.Array]:
    """Demonstrations that ignore the mode at the forks (copy with probability trap_prob).

    Returns:
      (prompts [n, P], responses [n, R]): the copy, with each fork shifted with probability
      1 - trap_prob on every prompt, then each token replaced with probability `noise` by a
      token uniform over the vocabulary.
    """
    k_prompt, k_fork, k_flip, k_token = jax.random.split(key, 4)
    prompts = self.prompts(k_prompt, n)
    items, shifted = self._items(prompts)
    # On COPY prompts a demonstrator that reads the mode (mode_cue > 0) copies more often.
    p_copy = jnp.where(self.is_shift(prompts), self.trap_prob,
                       self.trap_prob + self.mode_cue * (1.0 - self.trap_prob))
    copy = jax.random.uniform(k_fork, items.shape) < p_copy[:, None]
    demo = jnp.where(self.fork_mask()[None, :] & ~copy, shifted, items)
    return prompts, uniform_noise(k_flip, k_token, demo, noise, self.vocab_size)


TASKS: dict[str, type] = {
    "modular_addition": ModularAddition,
    "sort": Sort,
    "copy_twist": CopyTwist,
    "fork_copy": ForkCopy,
}


def make_task(name: str, **kwargs) -> Task:
  """A task by name ("modular_addition", "sort", "copy_twist", "fork_copy"), fields as keywords."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}.")
  return TASKS[name](**kwargs)
