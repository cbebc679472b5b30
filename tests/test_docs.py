"""The manual (docs/): every public name is in the API reference, the guides' code runs as
written, and their install lines work. The Sphinx build (CI's main leg) checks the first again and
executes the getting-started notebook."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _docs import ROOT, code_blocks, commands, install_problems

DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))
# A block that is a sketch inside someone else's script says so on its first line.
SKETCH = "# A sketch"


def _coverage():
  spec = importlib.util.spec_from_file_location("api_coverage", DOCS / "_ext" / "api_coverage.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_public_name_is_in_the_api_reference():
  assert _coverage().undocumented() == []


def test_the_coverage_check_finds_a_missing_name(tmp_path):
  coverage = _coverage()
  text = (DOCS / "api" / "index.rst").read_text()
  assert "\n   policy_loss\n" in text
  (tmp_path / "index.rst").write_text(text.replace("\n   policy_loss\n", "\n"))
  assert coverage.undocumented(tmp_path) == ["policy_loss"]
  assert "covrl.tokens.clamp" in coverage.documented()  # qualified by the current module


def runnable_blocks():
  return [pytest.param(block, id=f"{path.stem}-{i}") for path in GUIDES
          for i, block in enumerate(code_blocks(path.read_text(), "python"))
          if not block.startswith(SKETCH)]


@pytest.mark.parametrize("block", runnable_blocks())
def test_the_guides_python_blocks_run(block):
  exec(block, {})


def test_the_guides_install_lines_work():
  lines = [line for path in GUIDES for line in commands(path.read_text())]
  assert any("pip install" in line for line in lines)
  assert install_problems(lines) == []


def test_the_vocabulary_example_equals_the_logits_loss():
  """The fused loss of the vocabulary guide, on a small Flax policy, equals the README's first
  block's loss, which materialises the logits, in value, metrics and gradient."""
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
  exec(code_blocks((ROOT / "README.md").read_text(), "python")[0], plain)
  fused = {"model": model, "covrl": covrl}
  (block,) = code_blocks((DOCS / "guides" / "vocabulary.md").read_text(), "python")
  exec(block, fused)
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


def test_every_guide_is_in_the_manual():
  index = (DOCS / "index.rst").read_text()
  for path in GUIDES:
    assert f"guides/{path.stem}\n" in index, path.name


def test_the_getting_started_notebook_is_stored_without_outputs():
  """It is executed when the manual is built; stored outputs would go stale."""
  nb = json.loads((DOCS / "getting_started.ipynb").read_text())
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert not cell["outputs"] and cell["execution_count"] is None
