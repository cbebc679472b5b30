"""Sampling: log-probabilities equal a recompute, temperature, the KV cache, completions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covrl.transformer import ModelConfig, TransformerPolicy, init_params, sampling, tasks

TASK = tasks.Sort(5, 3)
CFG = ModelConfig(TASK.vocab_size, TASK.context_length, num_layers=1, d_model=16, num_heads=2,
                  init_scale=0.5)  # a large init scale gives a peaked, non-uniform policy


@pytest.fixture(scope="module")
def setup():
  model = TransformerPolicy(CFG)
  return model, init_params(CFG, jax.random.key(0))


N = 256  # one batch shape for every test, so each sampler compiles once


@functools.cache
def _sampler(model, kv_cache, temperature):
  return jax.jit(lambda p, prompts, key: sampling.sample(
      model, p, prompts, key, response_length=TASK.response_length, temperature=temperature,
      eos_id=TASK.eos_id, kv_cache=kv_cache))


@pytest.mark.parametrize("kv_cache", [False, True])
def test_log_probs_equal_recompute(setup, kv_cache):
  model, params = setup
  temperature = 0.7
  prompts = TASK.prompts(jax.random.key(1), N)
  out = _sampler(model, kv_cache, temperature)(params, prompts, jax.random.key(2))
  assert out.responses.shape == out.log_probs.shape == (N, TASK.response_length)
  # Independent recompute: one forward pass over prompt + response, log-softmax in NumPy.
  tokens = jnp.concatenate([prompts, out.responses], axis=1)
  logits = np.asarray(model.apply({"params": params}, tokens), np.float64)
  z = logits[:, TASK.prompt_length - 1:-1] / temperature
  logp = z - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True)) - z.max(
      -1, keepdims=True)
  want = np.take_along_axis(logp, np.asarray(out.responses)[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.log_probs, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.response_mask,
                                tasks.response_mask(out.responses, TASK.eos_id))


def test_cache_and_recompute_draw_the_same_tokens(setup):
  model, params = setup
  prompts = TASK.prompts(jax.random.key(3), N)
  a = _sampler(model, False, 0.7)(params, prompts, jax.random.key(4))
  b = _sampler(model, True, 0.7)(params, prompts, jax.random.key(4))
  np.testing.assert_array_equal(a.responses, b.responses)
  np.testing.assert_allclose(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-5)


def test_first_token_frequencies_follow_tempered_softmax(setup):
  model, params = setup
  temperature, calls = 0.7, 32
  n = calls * N
  prompts = jnp.broadcast_to(TASK.prompts(jax.random.key(5), 1), (N, TASK.prompt_length))
  first = [_sampler(model, False, temperature)(params, prompts, jax.random.key(6 + i))
           .responses[:, 0] for i in range(calls)]
  logits = np.asarray(model.apply({"params": params}, prompts[:1]), np.float64)[0, -1]
  p = np.exp(logits / temperature - np.max(logits / temperature))
  p /= p.sum()
  freq = np.bincount(np.concatenate(first), minlength=CFG.vocab_size) / n
  # Binomial standard error per entry; 5 sigma over 8 entries.
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-12)
  assert p.max() < 0.99  # the policy is not degenerate, so the check has teeth


def test_same_key_same_tokens_and_different_keys_differ(setup):
  model, params = setup
  prompts = TASK.prompts(jax.random.key(7), N)
  f = _sampler(model, False, 0.7)
  a, b = f(params, prompts, jax.random.key(8)), f(params, prompts, jax.random.key(8))
  np.testing.assert_array_equal(a.responses, b.responses)
  c = f(params, prompts, jax.random.key(9))
  assert not np.array_equal(a.responses, c.responses)


def test_complete_keeps_the_prefix_and_matches_sample(setup):
  model, params = setup
  prompts = TASK.prompts(jax.random.key(10), N)
  key = jax.random.key(11)
  ref = _sampler(model, False, 0.7)(params, prompts, key)
  tokens = jnp.concatenate([prompts, ref.responses], axis=1)
  complete = jax.jit(lambda t, s: sampling.complete(
      model, params, t, s, key, prompt_length=TASK.prompt_length, temperature=0.7))
  # Starting at position 0 with the same key draws what `sample` drew.
  np.testing.assert_array_equal(complete(tokens, jnp.zeros(N, jnp.int32)), ref.responses)
  # Starting at R keeps everything; starting at 2 keeps the first two tokens.
  r = TASK.response_length
  np.testing.assert_array_equal(complete(tokens, jnp.full(N, r, jnp.int32)), ref.responses)
  out = complete(tokens, jnp.full(N, 2, jnp.int32))
  np.testing.assert_array_equal(out[:, :2], ref.responses[:, :2])


def test_bad_sampling_arguments(setup):
  model, params = setup
  prompts = TASK.prompts(jax.random.key(0), 2)
  with pytest.raises(ValueError, match="temperature"):
    sampling.sample(model, params, prompts, jax.random.key(0), response_length=3,
                    temperature=0.0)
  with pytest.raises(ValueError, match="exceed context_length"):
    sampling.sample(model, params, prompts, jax.random.key(0), response_length=4)
