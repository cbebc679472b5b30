"""covrl.vocab with token ids outside [0, V) at valid positions (issue 21, bad input).

The library's rule for bad values (covrl.tokens, covrl.losses docstrings): concrete inputs raise
a ValueError naming the argument; under jit the token is undefined, left out of the loss and
counted in metrics["nonfinite_tokens"]. `token_log_probs_and_entropy` documents NaN as the
log-probability of such an id under jit. The in-range values are checked against log_softmax of
logits materialised here, and the loss against the same call with the bad positions masked out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl

V = 7
D = 4
LEAD = (2, 5)
CHUNKS = dict(token_chunk=3, vocab_chunk=3)  # several token and vocabulary chunks


def inputs(seed=0):
  """float32 hidden [2, 5, D], kernel [D, V], in-range ids and an all-valid mask."""
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((*LEAD, D)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
  tokens = rng.integers(0, V, LEAD).astype(np.int32)
  return hidden, kernel, tokens


def with_bad_ids(tokens):
  """tokens with -1 and V at two valid positions, and the [B, T] bool marking them."""
  bad = np.zeros(LEAD, bool)
  bad[0, 1] = bad[1, 3] = True
  tokens = tokens.copy()
  tokens[0, 1], tokens[1, 3] = -1, V
  return jnp.asarray(tokens), jnp.asarray(bad)


def reference(hidden, kernel, tokens):
  """log pi(y) (in-range ids) and the entropy, from logits materialised in full."""
  logp = jax.nn.log_softmax(hidden @ kernel, axis=-1)
  safe = jnp.clip(tokens, 0, V - 1)
  lp = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return lp, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@pytest.mark.parametrize("bad_id", [-1, V])
def test_eager_out_of_range_id_raises_naming_tokens(bad_id):
  hidden, kernel, tokens = inputs()
  tokens[1, 2] = bad_id
  with pytest.raises(ValueError, match="tokens"):
    covrl.token_log_probs_and_entropy(hidden, kernel, jnp.asarray(tokens), **CHUNKS)


def test_jit_out_of_range_id_gives_nan_log_prob():
  hidden, kernel, tokens = inputs(1)
  tokens, bad = with_bad_ids(tokens)
  # A bad id at a masked position is padding: 0, as for any other padding.
  mask = jnp.ones(LEAD, bool).at[1, 4].set(False)
  tokens = tokens.at[1, 4].set(V + 3)
  fn = jax.jit(lambda h, w, y, m: covrl.token_log_probs_and_entropy(h, w, y, mask=m, **CHUNKS))
  log_prob, entropy = fn(hidden, kernel, tokens, mask)
  ref_lp, ref_ent = reference(hidden, kernel, tokens)

  assert bool(jnp.all(jnp.isnan(log_prob) == bad))
  good = mask & ~bad
  np.testing.assert_allclose(np.where(good, log_prob, 0.0), np.where(good, ref_lp, 0.0),
                             rtol=1e-5, atol=1e-5)
  # The entropy does not depend on the id: defined, and the reference's, at the bad positions.
  np.testing.assert_allclose(np.where(mask, entropy, 0.0), np.where(mask, ref_ent, 0.0),
                             rtol=1e-5, atol=1e-5)
  assert float(log_prob[1, 4]) == 0.0 and float(entropy[1, 4]) == 0.0


@pytest.mark.float64
def test_jit_wide_out_of_range_id_does_not_wrap_into_range():
  # An int64 id of 2**32 + 2 is outside the vocabulary even though its low 32 bits are 2.
  hidden, kernel, tokens = inputs(2)
  tokens = jnp.asarray(tokens, jnp.int64).at[0, 0].set(2**32 + 2)
  fn = jax.jit(lambda h, w, y: covrl.token_log_probs_and_entropy(h, w, y, **CHUNKS)[0])
  log_prob = fn(hidden, kernel, tokens)
  assert bool(jnp.isnan(log_prob[0, 0]))
  assert int(jnp.sum(jnp.isnan(log_prob))) == 1


@pytest.mark.parametrize("control", [covrl.NoControl(), covrl.KLCov.paper_7b(),
                                     covrl.EntropyBonus(0.05)],
                         ids=["no_control", "kl_cov", "entropy_bonus"])
def test_policy_loss_leaves_out_of_range_ids_out(control):
  hidden, kernel, tokens = inputs(3)
  tokens, bad = with_bad_ids(tokens)
  rng = np.random.default_rng(4)
  advantages = jnp.asarray(rng.standard_normal(LEAD), jnp.float32)
  old_log_prob = jnp.asarray(np.log(rng.uniform(0.05, 0.5, LEAD)), jnp.float32)

  @jax.jit
  def loss_and_grads(hidden, kernel, tokens, mask):
    def loss(hidden, kernel):
      log_prob, entropy = covrl.token_log_probs_and_entropy(hidden, kernel, tokens, mask=mask,
                                                            **CHUNKS)
      return covrl.policy_loss(control, old_log_prob, log_prob, advantages, mask,
                               entropy=entropy)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, kernel)

  full = jnp.ones(LEAD, bool)
  (value, metrics), grads = loss_and_grads(hidden, kernel, tokens, full)
  (ref_value, ref_metrics), ref_grads = loss_and_grads(hidden, kernel, tokens, ~bad)

  assert bool(jnp.isfinite(value))
  assert int(metrics["nonfinite_tokens"]) == int(jnp.sum(bad)) == 2
  assert int(ref_metrics["nonfinite_tokens"]) == 0
  np.testing.assert_allclose(value, ref_value, rtol=1e-6, atol=1e-7)
  for g, ref in zip(grads, ref_grads):
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)
