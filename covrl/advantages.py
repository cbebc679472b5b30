"""Group-normalised outcome advantages (GRPO), as verl computes them.

For a group of G responses to one prompt with scalar rewards r_1..r_G,

  A_i = (r_i - mean(r)) / (std(r) + eps),

with the unbiased (Bessel-corrected) standard deviation, as torch.std gives, and eps = 1e-6.
A group of one response gets A = r (verl sets its mean to 0 and std to 1). A group whose rewards
are all equal gets advantages exactly 0, whatever the dtype and eps (computed as written, the
float mean can be an ulp off the common value; divided by std + eps = eps that is no longer
small). The advantages of a group sum to zero, and they do not change when every reward is
scaled by c > 0 (up to eps): the entropy bonus's fixed point under these advantages is
therefore not softmax(r / alpha) (THEORY.md T2.7, proofs/T2_entropy_bonus_bias.md).

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
  # A group whose rewards are all equal has advantages exactly 0, in any dtype and for any eps:
  # its float mean can be an ulp off the common value (float32, G = 3: about a third of such
  # groups), which divided by std + eps = eps gave advantages of +-0.06 where the optimum's
  # fixed-point property (THEORY.md T3.3) needs 0, and with eps = 0 gave 0 / 0.
  equal = jnp.all(rewards == rewards[..., :1], axis=-1, keepdims=True)
  centred = jnp.where(equal, 0.0, rewards - jnp.mean(rewards, axis=-1, keepdims=True))
  if not normalize_std:
    return centred
  std = jnp.sqrt(jnp.sum(centred**2, axis=-1, keepdims=True) / (group - 1))
  return jnp.where(equal, 0.0, centred / jnp.where(equal, 1.0, std + eps))
