"""Forking tokens against TRL's own masking function, on the same inputs.

TRL 1.16's `GRPOTrainer.get_high_entropy_mask(entropies, mask, threshold)` (GRPOConfig's
top_entropy_quantile = rho gives threshold = 1 - rho) is called with a one-process accelerator,
so its gather over processes is the identity: it is then the mask of one batch, which covrl's
global selection must reproduce bit for bit (`covrl.high_entropy_select`, and the kept set of
`covrl.ForkingTokens` inside `covrl.policy_loss`); TRL called per micro-batch (gradient
accumulation) must equal covrl's local mode with that micro_batch_size. Inputs: float32
entropies (TRL casts to float32), random, with exact ties and one-ulp near-ties, padding and
empty rows. Needs the benchmark extras (torch, trl): `bash benchmarks/install.sh .venv`;
skipped when they are not importable.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl

try:
  import torch
  from accelerate import Accelerator
  from trl.trainer.grpo_trainer import GRPOTrainer
  _WHY = ""
except Exception as e:  # ImportError, or a broken dependency chain inside trl
  _WHY = f"{type(e).__name__}: {e}"

pytestmark = pytest.mark.skipif(
    bool(_WHY), reason=f"torch/trl not importable ({_WHY}); install: bash benchmarks/install.sh")


@pytest.fixture(scope="module")
def trainer():
  """What get_high_entropy_mask reads of its trainer: a one-process accelerator."""
  return types.SimpleNamespace(accelerator=Accelerator(cpu=True))


def trl_mask(trainer, h, mask, rho):
  out = GRPOTrainer.get_high_entropy_mask(trainer, torch.tensor(h), torch.tensor(mask),
                                          1 - rho)
  return out.numpy()


B, T = 8, 40  # one shape (one compilation); the mask sets each case's size


def entropies(seed):
  """[B, T] float32 entropies and a 0/1 mask: random, rounded (ties), one-ulp near-ties, with
  a random number of valid rows and columns."""
  rng = np.random.default_rng(seed)
  b, t = int(rng.integers(1, B + 1)), int(rng.integers(1, T + 1))
  h = (rng.random((B, T)) * 3).astype(np.float32)
  kind = seed % 3
  if kind == 1:
    h = (np.round(h * 4) / 4).astype(np.float32)  # many exact ties
  elif kind == 2:
    h = (h + rng.integers(0, 2, h.shape) * np.spacing(h)).astype(np.float32)  # near-ties
    h.flat[rng.integers(0, h.size)] = h.flat[0]
  mask = (rng.random((B, T)) > 0.3).astype(np.float32)
  mask[b:], mask[:, t:] = 0.0, 0.0
  if b > 1:
    mask[b - 1] = 0.0  # an empty row
  return h, mask


@functools.lru_cache
def covrl_select(rho):
  return jax.jit(lambda h, m: covrl.high_entropy_select(h, m, top_entropy_quantile=rho))


threshold = jax.jit(covrl.methods.entropy_threshold)


RHOS = (0.2, 0.5, 0.05, 0.95, 0.0, 1.0)


@pytest.mark.parametrize("rho", RHOS)
def test_global_selection_equals_trls_mask(trainer, rho):
  cases = 0
  for seed in range(150):
    h, mask = entropies(seed)
    want = trl_mask(trainer, h, mask, rho)
    got = covrl_select(rho)(h, mask)
    np.testing.assert_array_equal(np.asarray(got.mask), want, err_msg=f"seed {seed}")
    assert int(got.count) == int(want.sum())
    cases += int(want.any())
  assert cases > 100  # most cases keep something: the comparison is informative


def test_threshold_is_torch_quantile_to_the_last_bit_or_one_ulp():
  """The threshold itself: torch.quantile's value (its CPU kernel fuses the interpolation's
  multiply-add, so the last bit may differ); the kept sets are compared above."""
  exact = 0
  for seed in range(300):
    h, mask = entropies(seed)
    valid = mask > 0
    if not valid.any():
      continue
    for rho in RHOS:
      want = torch.quantile(torch.tensor(h[valid]), 1 - rho).item()
      got = float(threshold(jnp.asarray(h), jnp.asarray(valid), np.float32(1 - rho)))
      assert abs(got - want) <= np.spacing(np.float32(want)), (seed, rho, got, want)
      exact += got == want
  assert exact > 0


def test_forking_tokens_loss_keeps_exactly_trls_tokens(trainer):
  """Inside policy_loss: the kept tokens are TRL's (selected_frac), and the loss is PPO's on
  them over all valid tokens (TRL multiplies the token loss by the mask)."""
  rng = np.random.default_rng(0)
  h, mask = entropies(4)
  old = (-rng.exponential(size=h.shape)).astype(np.float32)
  new = (old + 0.1 * rng.normal(size=h.shape)).astype(np.float32)
  adv = rng.normal(size=h.shape).astype(np.float32)
  keep = trl_mask(trainer, h, mask, 0.2)
  loss, m = covrl.policy_loss(covrl.ForkingTokens(0.2), old, new, adv, mask, entropy=h)
  np.testing.assert_allclose(m["selected_frac"] * mask.sum(), keep.sum())
  ppo, _ = covrl.ppo_loss(old * keep, new * keep, adv * keep, mask)  # zero loss off the mask
  np.testing.assert_allclose(loss, ppo, rtol=1e-6)


@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
def test_per_micro_batch_masks_equal_covrls_local_mode(trainer, micro_batch_size):
  rng = np.random.default_rng(micro_batch_size)
  b, t = 8, 24
  h = (rng.random((b, t)) * 3).astype(np.float32)
  mask = (rng.random((b, t)) > 0.25).astype(np.float32)
  want = np.concatenate([trl_mask(trainer, h[i:i + micro_batch_size],
                                  mask[i:i + micro_batch_size], 0.2)
                         for i in range(0, b, micro_batch_size)])
  control = covrl.ForkingTokens(0.2, selection="local", micro_batch_size=micro_batch_size)
  tokens = covrl.policy_tokens(h * 0, h * 0, h * 0 + 1, mask)._replace(entropy=jnp.asarray(h))
  _, got = covrl.select_tokens(control, tokens, control.surrogate(tokens))
  np.testing.assert_array_equal(np.asarray(got.mask), want)
