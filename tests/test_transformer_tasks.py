"""Verifiable-reward tasks: answers and rewards against independent NumPy references."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covrl.transformer import tasks


def _np_answer(task, prompt):
  """The correct response, written from the task's definition without covrl."""
  s = task.num_symbols
  if isinstance(task, tasks.ModularAddition):
    d = task.num_digits
    a = sum(int(x) * s ** (d - 1 - i) for i, x in enumerate(prompt[:d]))
    b = sum(int(x) * s ** (d - 1 - i) for i, x in enumerate(prompt[d + 1:2 * d + 1]))
    total = (a + b) % s**d
    return [(total // s ** (d - 1 - i)) % s for i in range(d)]
  items = [int(x) for x in prompt[:task.length]]
  if isinstance(task, tasks.Sort):
    return sorted(items)
  if task.reverse:
    items = items[::-1]
  return [(x + task.shift) % s for x in items]


def _np_reward(task, prompt, response, kind):
  answer = _np_answer(task, prompt)
  right = []
  stopped = False
  for y, a in zip(response, answer):
    right.append(not stopped and int(y) == a)
    stopped = stopped or int(y) == task.eos_id
  return float(all(right)) if kind == "exact" else sum(right) / len(right)


TASKS = [tasks.ModularAddition(5, 2), tasks.ModularAddition(3, 3), tasks.Sort(6, 4),
         tasks.CopyTwist(7, 3, shift=2), tasks.CopyTwist(5, 4, shift=-1, reverse=False)]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: repr(t))
def test_prompts_layout_and_answers(task):
  prompts = np.asarray(task.prompts(jax.random.key(0), 64))
  assert prompts.shape == (64, task.prompt_length)
  assert prompts.min() >= 0 and prompts.max() < task.eos_id  # EOS never appears in prompts
  answers = np.asarray(task.answers(jnp.asarray(prompts)))
  assert answers.shape == (64, task.response_length)
  for p, a in zip(prompts, answers):
    assert list(a) == _np_answer(task, p)
  if isinstance(task, tasks.ModularAddition):
    assert (prompts[:, task.num_digits] == task.num_symbols).all()  # "+"
    assert (prompts[:, -1] == task.num_symbols + 1).all()  # "="


@pytest.mark.parametrize("task", TASKS, ids=lambda t: repr(t))
@pytest.mark.parametrize("kind", ["exact", "partial"])
def test_rewards_match_reference(task, kind):
  task = dataclasses.replace(task, reward=kind)
  key_p, key_r, key_m = jax.random.split(jax.random.key(1), 3)
  prompts = task.prompts(key_p, 128)
  answers = task.answers(prompts)
  # Responses: the answer, with random corruptions (EOS included) at random positions.
  noise = jax.random.randint(key_r, answers.shape, 0, task.vocab_size)
  responses = jnp.where(jax.random.bernoulli(key_m, 0.3, answers.shape), noise, answers)
  got = np.asarray(jax.jit(task.score)(prompts, responses))
  want = [_np_reward(task, p, r, kind) for p, r in zip(np.asarray(prompts),
                                                         np.asarray(responses))]
  np.testing.assert_allclose(got, want)
  assert got.max() == 1.0 and got.min() < 1.0  # both outcomes occur


def test_modular_addition_exhaustive():
  task = tasks.ModularAddition(3, 2)
  prompts = jnp.asarray([[a1, a2, 3, b1, b2, 4] for a1, a2, b1, b2 in
                         itertools.product(range(3), repeat=4)])
  got = np.asarray(task.answers(prompts))
  for (a1, a2, _, b1, b2, _), g in zip(np.asarray(prompts), got):
    total = (3 * a1 + a2 + 3 * b1 + b2) % 9
    assert list(g) == [total // 3, total % 3]


def test_response_mask_stops_after_first_eos():
  r = jnp.asarray([[1, 2, 9, 3], [9, 9, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(tasks.response_mask(r, 9),
                                [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])


def test_vocabulary_layout():
  t = tasks.Sort(6, 3)
  assert (t.vocab_size, t.eos_id, t.prompt_length, t.response_length) == (8, 7, 4, 3)
  t = tasks.ModularAddition(4, 3)
  assert (t.vocab_size, t.eos_id, t.prompt_length, t.response_length) == (7, 6, 8, 3)


@pytest.mark.parametrize("make, match", [
    (lambda: tasks.Sort(1, 3), "num_symbols"),
    (lambda: tasks.Sort(4, 0), "length"),
    (lambda: tasks.Sort(4, 3, reward="sparse"), "reward"),
    (lambda: tasks.ModularAddition(5, 0), "num_digits"),
    (lambda: tasks.CopyTwist(5, 3, shift=0.5), "shift"),
    (lambda: tasks.CopyTwist(5, 3, reverse=1), "reverse"),
    (lambda: tasks.make_task("parity"), "unknown task"),
])
def test_bad_task_config(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_make_task():
  assert tasks.make_task("sort", num_symbols=5, length=2) == tasks.Sort(5, 2)
