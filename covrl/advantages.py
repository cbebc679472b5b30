"""Group-normalised outcome advantages (GRPO), as verl computes them.

For a group of G responses to one prompt with scalar rewards r_1..r_G,

  A_i = (r_i - mean(r)) / (std(r) + eps),

with the unbiased (Bessel-corrected) standard deviation, as torch.std gives, and eps = 1e-6.
A group of one response gets A = r (verl sets its mean to 0 and std to 1). The advantages of a
group sum to zero, and they do not change when every reward is scaled by c > 0 (up to eps): the
entropy bonus's fixed point under these advantages is therefore not softmax(r / alpha)
(THEORY.md T2.7, proofs/T2_entropy_bonus_bias.md).

References:
  Shao et al., DeepSeekMath (GRPO), arXiv:2402.03300 (2024).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from covrl import _checks


def grpo_advantages(
    rewards: jax.Array, *, eps: float = 1e-6, normalize_std: bool = True
) -> jax.Array:
  """Group-normalised advantages of a [..., G] array of rewards (groups on the last axis).

  Args:
    rewards: [..., G] rewards, G responses per group.
    eps: added to the standard deviation (verl: 1e-6).
    normalize_std: divide by the std (GRPO); False gives r - mean (Dr. GRPO).

  Returns:
    [..., G] advantages, in float32 or wider.

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> [round(float(a), 4) for a in covrl.grpo_advantages(jnp.array([1., 0., 0., 1.]))]
    [0.866, -0.866, -0.866, 0.866]
  """
  rewards = _checks.upcast(_checks.check_float_array("rewards", rewards))
  _checks.check_nonnegative("eps", eps)
  if rewards.ndim < 1 or rewards.shape[-1] < 1:
    raise ValueError(f"rewards must be [..., G] with G >= 1, got shape {rewards.shape}.")
  group = rewards.shape[-1]
  if group == 1:
    return rewards
  centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
  if not normalize_std:
    return centred
  std = jnp.sqrt(jnp.sum(centred**2, axis=-1, keepdims=True) / (group - 1))
  return centred / (std + eps)
