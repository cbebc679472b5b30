"""Aggregation modes: additivity over micro-batches and the empty batch."""

import jax.numpy as jnp
import numpy as np
import pytest

import covrl


@pytest.mark.float64
@pytest.mark.parametrize("mode", covrl.LOSS_AGG_MODES)
def test_micro_batch_numerators_add_up_to_the_whole_batch(mode):
  rng = np.random.default_rng(0)
  loss = rng.normal(size=(9, 7))
  mask = (rng.random((9, 7)) > 0.3).astype(np.float64)
  mask[4] = 0
  whole = covrl.aggregate(loss, mask, mode)
  den = covrl.denominator(mask, mode)
  parts = [covrl.aggregate(loss[r], mask[r], mode, denominator_override=den)
           for r in (slice(0, 3), slice(3, 4), slice(4, 9))]
  np.testing.assert_allclose(sum(p.value for p in parts), whole.value, rtol=1e-12)
  np.testing.assert_allclose(sum(p.numerator for p in parts), whole.numerator, rtol=1e-12)
  np.testing.assert_allclose(whole.denominator, den)


def test_denominators_count_tokens_and_nonempty_sequences():
  mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
  assert float(covrl.denominator(mask, "token-mean")) == 3
  assert float(covrl.denominator(mask, "seq-mean-token-mean")) == 2
  assert float(covrl.denominator(mask, "token-sum")) == 1


@pytest.mark.parametrize("mode", covrl.LOSS_AGG_MODES)
def test_empty_batch_is_zero(mode):
  agg = covrl.aggregate(jnp.full((2, 3), jnp.nan), jnp.zeros((2, 3)), mode)
  assert float(agg.value) == 0.0
