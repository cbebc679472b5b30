"""The README's code runs as written (with a tiny model standing in for `policy_apply`)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_loss_example_trains_a_step():
  blocks = python_blocks()
  assert len(blocks) >= 2
  vocab, b, t, d = 7, 3, 5, 4

  def policy_apply(params, tokens):  # a stand-in model: embeddings then a projection
    return params["emb"][tokens] @ params["out"]

  namespace = {"policy_apply": policy_apply}
  exec(blocks[0], namespace)
  rng = np.random.default_rng(0)
  params = {"emb": jnp.asarray(rng.normal(size=(vocab, d)), jnp.float32),
            "out": jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)}
  responses = jnp.asarray(rng.integers(0, vocab, (b, t)))
  batch = {"tokens": responses, "responses": responses,
           "old_log_prob": jnp.asarray(-rng.exponential(size=(b, t)), jnp.float32),
           "advantages": jnp.asarray(rng.normal(size=(b, t)), jnp.float32),
           "response_mask": jnp.ones((b, t), bool)}
  opt_state = namespace["optimizer"].init(params)
  new, _, metrics = namespace["train_step"](params, opt_state, batch, jax.random.key(0), 0)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["selected_frac"]) > 0
  assert not np.array_equal(np.asarray(new["out"]), np.asarray(params["out"]))


def test_the_transform_example_builds():
  namespace = {}
  exec("import optax, covrl\n" + python_blocks()[1], namespace)
  z = jnp.array([1.0, 0.0, -1.0])
  opt = namespace["opt"]
  updates, _ = opt.update(jnp.zeros(3), opt.init(z), z)
  assert np.all(np.isfinite(np.asarray(updates)))


def test_the_vocabulary_scale_example_equals_the_logits_loss():
  """The fused loss (third block) on a small Flax policy equals the first block's loss, which
  materialises the logits, in value, metrics and gradient."""
  nn = pytest.importorskip("flax.linen")
  import covrl

  class Policy(nn.Module):
    vocab: int

    def setup(self):
      self.emb, self.head = nn.Embed(self.vocab, 8), nn.Dense(self.vocab)

    def hidden(self, tokens):
      return jnp.tanh(self.emb(tokens))

    def __call__(self, tokens):
      return self.head(self.hidden(tokens))

  vocab, b, t = 11, 3, 5
  model = Policy(vocab)
  control = covrl.EntropyBonus(0.05)
  plain = {"policy_apply": lambda p, tokens: model.apply({"params": p}, tokens)}
  exec(python_blocks()[0], plain)
  fused = {"model": model, "covrl": covrl}
  exec(python_blocks()[2], fused)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, vocab, (b, t)))
  params = model.init(jax.random.key(0), tokens)["params"]
  batch = {"tokens": tokens, "responses": tokens,
           "old_log_prob": jnp.asarray(-rng.exponential(size=(b, t)) - 1.0, jnp.float32),
           "advantages": jnp.asarray(rng.normal(size=(b, t)), jnp.float32),
           "response_mask": jnp.asarray(rng.random((b, t)) > 0.2)}
  plain["control"] = fused["control"] = control
  out = [jax.value_and_grad(ns["loss_fn"], has_aux=True)(params, batch, jax.random.key(1), 0)
         for ns in (plain, fused)]
  (loss_p, metrics_p), grads_p = out[0]
  (loss_f, metrics_f), grads_f = out[1]
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(loss_f, loss_p, atol=64 * eps)
  # loss_entropy_change needs the logits: the logits path only.
  assert sorted(metrics_f) == sorted(set(metrics_p) - {"loss_entropy_change"})
  for k in metrics_f:
    np.testing.assert_allclose(metrics_f[k], metrics_p[k], atol=64 * eps * max(
        1.0, abs(float(metrics_p[k]))), err_msg=k)
  for a, c in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_p)):
    np.testing.assert_allclose(a, c, atol=64 * eps * max(1e-3, float(jnp.max(jnp.abs(c)))))
