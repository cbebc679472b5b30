"""The lab's fork sizes: the covariance-mechanism regime's shape, and an end-to-end run."""

import jax
import numpy as np
import pytest

import covrl
from covrl import diagnostics
from covrl.transformer import get_trainer, lab, make_train, tasks


@pytest.mark.parametrize("size", ["fork-test", "fork-fast", "fork-full", "fork-gpu"])
def test_fork_sizes_have_long_responses_and_large_minibatches(size):
  config = lab.lab_config(size)
  task = config.task
  assert isinstance(task, tasks.ForkCopy)
  assert task.response_length >= 32
  # Most positions are copies: the forks are a small share of the response.
  assert task.num_forks / task.response_length <= 1 / 16
  tokens = config.minibatch_size * task.response_length  # every response is full length
  if size != "fork-test":
    assert tokens >= 2048
    # Cui et al.'s KL-Cov fraction selects several tokens per mini-batch, not the floor of one.
    assert int(2e-3 * tokens) >= 4
  assert config.num_minibatches >= 2  # KL-Cov acts from the second mini-batch on (T3.6)
  assert lab.lab_num_seeds(size) >= 2


@pytest.mark.slow
def test_fork_test_size_runs_and_its_batches_are_measurable():
  config = lab.lab_config("fork-test")
  state, metrics = make_train(config)(jax.random.key(0))
  assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())
  # The diagnostics run on the run's own rollout batch.
  trainer = get_trainer(config)
  _, rewards, batch, _ = trainer.batch(state.params, jax.random.key(2))
  cov = covrl.token_covariance(batch.old_log_probs, batch.advantages, batch.response_mask)
  shares = np.asarray(diagnostics.covariance_concentration(cov, batch.response_mask))
  assert shares.shape == (2,) and (0 <= shares).all() and (shares <= 1).all()
  assert shares[0] <= shares[1]
  correct = np.asarray(rewards).reshape(config.prompts_per_step, config.group_size) >= 1
  p = np.asarray(diagnostics.pass_at_k(correct, config.group_size))
  np.testing.assert_array_equal(p, correct.any(1).astype(np.float32))
