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
  if isinstance(task, tasks.ForkCopy):
    items = [int(x) for x in prompt[1:task.length + 1]]
    shift_mode = int(prompt[0]) == s + 1
    forks = _np_forks(task.length, task.num_forks)
    return [(x + task.shift) % s if shift_mode and t in forks else x for t, x in enumerate(items)]
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


def _np_forks(n, f):
  """F fork positions spread evenly over n: j-th at floor((j + 1) n / (F + 1))."""
  return set(range(n)) if f == n else {(j + 1) * n // (f + 1) for j in range(f)}


def _np_reward(task, prompt, response, kind):
  answer = _np_answer(task, prompt)
  right = []
  stopped = False
  for y, a in zip(response, answer):
    right.append(not stopped and int(y) == a)
    stopped = stopped or int(y) == task.eos_id
  return float(all(right)) if kind == "exact" else sum(right) / len(right)


TASKS = [tasks.ModularAddition(5, 2), tasks.ModularAddition(3, 3), tasks.Sort(6, 4),
         tasks.CopyTwist(7, 3, shift=2), tasks.CopyTwist(5, 4, shift=-1, reverse=False),
         tasks.ForkCopy(8, 32, num_forks=2, shift_prob=0.5),
         tasks.ForkCopy(5, 6, num_forks=6, shift=-2, shift_prob=0.5)]


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
  # Few enough corruptions that long responses are sometimes entirely right.
  p = min(0.3, 2 / task.response_length)
  responses = jnp.where(jax.random.bernoulli(key_m, p, answers.shape), noise, answers)
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
    (lambda: tasks.ForkCopy(8, 4, num_forks=5), "num_forks"),
    (lambda: tasks.ForkCopy(8, 4, num_forks=0), "num_forks"),
    (lambda: tasks.ForkCopy(8, 4, shift=8), "shift"),
    (lambda: tasks.ForkCopy(8, 4, shift=1.0), "shift"),
    (lambda: tasks.ForkCopy(8, 4, shift_prob=1.5), "shift_prob"),
    (lambda: tasks.ForkCopy(8, 4, trap_prob=-0.1), "trap_prob"),
    (lambda: tasks.ForkCopy(8, 4, mode_cue=2.0), "mode_cue"),
])
def test_bad_task_config(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_make_task():
  assert tasks.make_task("sort", num_symbols=5, length=2) == tasks.Sort(5, 2)


def test_fork_copy_layout():
  t = tasks.ForkCopy(num_symbols=8, length=32, num_forks=2)
  assert (t.vocab_size, t.eos_id, t.prompt_length, t.response_length) == (12, 11, 34, 32)
  assert t.fork_positions == (10, 21)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(t.fork_mask())), [10, 21])
  for n, f in [(32, 1), (32, 4), (33, 3), (5, 5), (40, 7)]:
    assert set(tasks.ForkCopy(8, n, num_forks=f).fork_positions) == _np_forks(n, f)
    assert len(tasks.ForkCopy(8, n, num_forks=f).fork_positions) == f


def test_fork_copy_prompts():
  t = tasks.ForkCopy(num_symbols=6, length=32, shift_prob=0.25)
  prompts = np.asarray(t.prompts(jax.random.key(3), 4000))
  assert set(np.unique(prompts[:, 0])) == {t.copy_id, t.shift_id}
  assert (prompts[:, -1] == 8).all() and prompts[:, 1:-1].max() < 6
  shift = prompts[:, 0] == t.shift_id
  np.testing.assert_array_equal(np.asarray(t.is_shift(jnp.asarray(prompts))), shift)
  # Binomial(4000, 0.25): sd 0.0068; 5 sd.
  assert abs(shift.mean() - 0.25) < 0.035


def test_fork_copy_demonstrations_ignore_the_mode_at_the_forks():
  t = tasks.ForkCopy(num_symbols=8, length=32, num_forks=4, shift_prob=0.5, trap_prob=0.7)
  prompts, demo = (np.asarray(x) for x in t.demonstrate(jax.random.key(5), 4000, 0.0))
  items = prompts[:, 1:33]
  forks = sorted(_np_forks(32, 4))
  others = [i for i in range(32) if i not in forks]
  np.testing.assert_array_equal(demo[:, others], items[:, others])  # copies, exactly
  at = demo[:, forks]
  copied, shifted = at == items[:, forks], at == (items[:, forks] + 1) % 8
  assert (copied | shifted).all() and not (copied & shifted).any()
  shift = prompts[:, 0] == t.shift_id
  for mode in (shift, ~shift):  # the same trap probability in both modes
    rate = copied[mode].mean()  # ~8000 Bernoulli(0.7): sd 0.005
    assert abs(rate - 0.7) < 0.03
  # The demonstrations are right on a COPY prompt only if every fork copied, on a SHIFT
  # prompt only if every fork shifted.
  right = (demo == np.asarray(t.answers(jnp.asarray(prompts)))).all(1)
  np.testing.assert_array_equal(right, np.where(shift, shifted.all(1), copied.all(1)))


def test_fork_copy_demonstrator_that_reads_the_mode():
  t = tasks.ForkCopy(num_symbols=8, length=32, num_forks=2, shift_prob=0.5, trap_prob=0.6,
                     mode_cue=0.5)
  prompts, demo = (np.asarray(x) for x in t.demonstrate(jax.random.key(8), 4000, 0.0))
  forks = sorted(_np_forks(32, 2))
  copied = demo[:, forks] == prompts[:, 1:33][:, forks]
  shift = prompts[:, 0] == t.shift_id
  assert abs(copied[shift].mean() - 0.6) < 0.03  # the trap, as before
  assert abs(copied[~shift].mean() - (0.6 + 0.5 * 0.4)) < 0.03  # reads the mode halfway


def test_fork_copy_demonstration_noise():
  t = tasks.ForkCopy(num_symbols=8, length=32, trap_prob=1.0)
  prompts, demo = (np.asarray(x) for x in t.demonstrate(jax.random.key(6), 2000, 0.2))
  changed = demo != prompts[:, 1:33]
  # A replaced token is uniform over 12 ids, so it differs from the copy with prob 11/12.
  assert abs(changed.mean() - 0.2 * 11 / 12) < 0.01
  assert demo.max() == t.eos_id  # EOS is among the noise tokens


def test_default_demonstrations_are_the_noisy_answers():
  # The warm start's demonstrations (sft.demonstrations -> Task.demonstrate), from the keys
  # the demonstrator has always used: prompt, flip and token keys split three ways.
  from covrl.transformer import sft
  t = tasks.Sort(6, 4)
  key = jax.random.key(9)
  k_prompt, k_flip, k_token = jax.random.split(key, 3)
  prompts = t.prompts(k_prompt, 64)
  flip = jax.random.bernoulli(k_flip, 0.3, (64, 4))
  noise = jax.random.randint(k_token, (64, 4), 0, t.vocab_size, jnp.int32)
  want = jnp.where(flip, noise, t.answers(prompts))
  got_prompts, got = sft.demonstrations(t, key, 64, 0.3)
  np.testing.assert_array_equal(got_prompts, prompts)
  np.testing.assert_array_equal(got, want)
