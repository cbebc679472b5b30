"""The transformer policy: shapes, causality, the key/value cache, bad configurations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covrl._compat import enable_x64
from covrl.transformer import ModelConfig, TransformerPolicy, init_params, num_params
from covrl.transformer.model import init_cache

CFG = ModelConfig(vocab_size=7, context_length=9, num_layers=2, d_model=16, num_heads=2)


@pytest.fixture(scope="module")
def model_and_params():
  model = TransformerPolicy(CFG)
  return model, init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def forward(model_and_params):
  model, params = model_and_params
  return jax.jit(lambda tokens: model.apply({"params": params}, tokens))


def test_shapes_and_dtypes(model_and_params, forward):
  model, params = model_and_params
  tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 7)
  logits = forward(tokens)
  assert logits.shape == (3, 9, 7)
  assert logits.dtype == jnp.float32
  assert jnp.all(jnp.isfinite(logits))
  assert model.apply({"params": params}, tokens[:, :4]).shape == (3, 4, 7)
  # Parameter count from the architecture, by hand: embeddings, 2 blocks, final norm, head.
  d, v, c, h = 16, 7, 9, 4 * 16
  block = (3 * d * d + 2 * d) + (d * d + d) + 2 * (2 * d) + (d * h + h) + (h * d + d)
  assert num_params(params) == v * d + c * d + 2 * block + 2 * d + (d * v + v)


def test_causal_future_tokens_do_not_change_past_logits(forward):
  tokens = jax.random.randint(jax.random.key(2), (4, 9), 0, 7)
  base = np.asarray(forward(tokens))
  for t in range(9):
    changed = tokens.at[:, t:].set((tokens[:, t:] + 3) % 7)
    out = np.asarray(forward(changed))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert not np.allclose(out[:, t], base[:, t])  # the changed position itself does move


def test_kv_cache_matches_full_forward(model_and_params, forward):
  model, params = model_and_params
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, 7)
  full = forward(tokens)
  apply = jax.jit(lambda x, cache, pos: model.apply({"params": params}, x, cache=cache,
                                                     position=pos))
  prefill, cache = apply(tokens[:, :5], init_cache(CFG, 2), 0)
  np.testing.assert_allclose(prefill, full[:, :5], rtol=1e-5, atol=1e-5)
  for t in range(5, 9):
    step, cache = apply(tokens[:, t:t + 1], cache, t)
    np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_float64_parameters_compute_in_float64(model_and_params):
  model, params = model_and_params
  with enable_x64(True):
    p64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    out = jax.jit(model.apply)({"params": p64}, jnp.zeros((1, 9), jnp.int32))
    assert out.dtype == jnp.float64


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=1, context_length=4), "vocab_size"),
    (dict(vocab_size=4, context_length=1), "context_length"),
    (dict(vocab_size=4, context_length=4, num_layers=0), "num_layers"),
    (dict(vocab_size=4, context_length=4, d_model=10, num_heads=4), "multiple of num_heads"),
    (dict(vocab_size=4, context_length=4, d_model=8.0), "d_model"),
    (dict(vocab_size=4, context_length=4, init_scale=0.0), "init_scale"),
    (dict(vocab_size=4, context_length=4, param_dtype="int8"), "param_dtype"),
    (dict(vocab_size=True, context_length=4), "vocab_size"),
])
def test_bad_model_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**kwargs)


def test_bad_tokens(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="exceed context_length"):
    model.apply({"params": params}, jnp.zeros((1, 10), jnp.int32))
  with pytest.raises(TypeError, match="integer"):
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    model.apply({"params": params}, jnp.zeros((4,), jnp.int32))
