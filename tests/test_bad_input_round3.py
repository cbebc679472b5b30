"""Bad input, round three (issue 21): hyperparameter types, scheduled fields at their step, one
exclusion rule for left-out tokens, token ids outside the vocabulary, the empty batch's metrics.

Every expectation is read off the manual's bad-input rules (docs/guides/bad_input.md) and the
docstrings: a clear error naming the argument when concrete; under jit the documented finite
result.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl

KEY = jax.random.key(0)
B, T, V = 3, 4, 5


def _defaults(cls):
  return {"entropy_coeff": 0.1} if cls is covrl.EntropyBonus else {}


def _numeric_fields(cls):
  """The fields a user sets to a number (default a number or None, or no default)."""
  return [f for f in dataclasses.fields(cls) if not isinstance(f.default, str)]


BAD_TYPES = {"string": "0.2", "bool": True, "vector": np.ones(3, np.float32),
             "complex": 1j, "object": object()}


@pytest.mark.parametrize("name", sorted(covrl.METHODS))
def test_numeric_fields_refuse_other_types_naming_the_field(name):
  cls = covrl.METHODS[name]
  failures = []
  for field in _numeric_fields(cls):
    for kind, bad in BAD_TYPES.items():
      try:
        cls(**{**_defaults(cls), field.name: bad})
      except (TypeError, ValueError) as err:
        if field.name not in str(err):
          failures.append(f"{field.name}={kind}: message does not name it: {err}")
      else:
        failures.append(f"{field.name}={kind}: accepted")
  assert not failures, failures


@pytest.mark.parametrize("name", sorted(covrl.METHODS))
def test_none_only_where_it_means_off(name):
  """None is accepted for a field whose default is None or that documents None as "off" (PPO's
  clip_ratio and clip_ratio_c); elsewhere it is a TypeError naming the field."""
  cls = covrl.METHODS[name]
  for field in _numeric_fields(cls):
    if field.default is None or field.name in ("clip_ratio", "clip_ratio_c"):
      continue
    with pytest.raises(TypeError, match=field.name):
      cls(**{**_defaults(cls), field.name: None})


def test_a_traced_vector_for_a_scalar_field_raises_when_tracing():
  def build(value):
    return covrl.policy_loss(covrl.KLCov(ppo_kl_coef=value), *_batch()[:4])[0]

  assert np.isfinite(jax.jit(build)(jnp.float32(0.5)))
  with pytest.raises(ValueError, match="ppo_kl_coef must be a scalar"):
    jax.jit(build)(jnp.ones(T, jnp.float32))


def _batch(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  old = -rng.exponential(1.0, (B, T)).astype(dtype)
  new = (old + 0.3 * rng.normal(size=(B, T))).astype(dtype)
  adv = rng.normal(size=(B, T)).astype(dtype)
  mask = np.ones((B, T), np.float32)
  logits = rng.normal(0.0, 2.0, (B, T, V)).astype(dtype)
  return old, new, adv, mask, logits


def _jump(before, after, at=3):
  """A schedule equal to `before` until step `at`, then `after` (any value, out of range too)."""
  return lambda step: jnp.where(jnp.asarray(step) < at, before, after).astype(jnp.float32)


# The ranges as the docstrings state them: (low, high, low end open).
NONNEGATIVE, FRACTION, FLOOR = (0.0, np.inf, False), (0.0, 1.0, False), (0.0, 1.0, True)
# (control class, field, an in-range value, an out-of-range value, the field's range).
SCHEDULED = [
    (covrl.EntropyBonus, "entropy_coeff", 0.05, -0.1, NONNEGATIVE),
    (covrl.EntropyBonus, "entropy_coeff", 0.05, float("nan"), NONNEGATIVE),
    (covrl.KLCov, "ppo_kl_coef", 1.0, float("inf"), NONNEGATIVE),
    (covrl.KLCov, "kl_cov_ratio", 0.2, 1.5, FRACTION),
    (covrl.ForkingTokens, "top_entropy_quantile", 0.5, 1.4, FRACTION),
    (covrl.ForkingTokens, "top_entropy_quantile", 0.5, -0.2, FRACTION),
    (covrl.EntropyAdvantage, "alpha", 0.4, -1.0, NONNEGATIVE),
    (covrl.WReinforce, "positive_advantage_weight", 0.1, -0.5, NONNEGATIVE),
    (covrl.STEER, "token_weight_min", 0.8, 0.0, FLOOR),
    (covrl.STEER, "token_weight_min", 0.8, 1.5, FLOOR),
]


def _scheduled(cls, field, schedule):
  extra = {"max_ratio": 1.0} if field.endswith("_ratio") and field != "clip_ratio" else {}
  return cls(**{**_defaults(cls), field: schedule, **extra})


def _clamped(value, rng):
  """The documented value under jit: clamped into the range; NaN or inf give its lower end."""
  low, high, low_open = rng
  if not np.isfinite(value):
    value = low
  low = float(jnp.finfo(jnp.float32).tiny) if low_open and low == 0 else low
  return float(np.float32(min(max(value, low), high)))


@pytest.mark.parametrize(("cls", "field", "good", "bad", "rng"), SCHEDULED,
                         ids=[f"{c.__name__}.{f}={b}" for c, f, _, b, _ in SCHEDULED])
def test_scheduled_field_is_checked_at_its_step(cls, field, good, bad, rng):
  old, new, adv, mask, logits = _batch()
  control = _scheduled(cls, field, _jump(good, bad))

  def loss(value_or_control, step):
    return covrl.policy_loss(value_or_control, old, new, adv, mask, logits=logits,
                             step=step)[0]

  assert np.isfinite(float(loss(control, 0)))  # in range before the jump
  with pytest.raises(ValueError, match=f"{field}'s schedule gave .* at step 5"):
    loss(control, 5)
  # Under jit: the documented result, the same loss as the clamped value set as a constant.
  got = jax.jit(lambda step: loss(control, step))(jnp.int32(5))
  constant = cls(**{**_defaults(cls), field: _clamped(bad, rng),
                    **({"max_ratio": 1.0} if field.endswith("_ratio") else {})})
  np.testing.assert_allclose(float(got), float(loss(constant, 5)), rtol=1e-6, atol=1e-7)
  grad = jax.jit(jax.grad(lambda lp, step: covrl.policy_loss(
      control, old, lp, adv, mask, logits=logits, step=step)[0]))(jnp.asarray(new), jnp.int32(5))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_a_schedule_must_give_a_scalar():
  old, new, adv, mask, logits = _batch()
  control = covrl.EntropyBonus(lambda step: jnp.full((T,), 0.1))
  for call in (lambda s: covrl.policy_loss(control, old, new, adv, mask, logits=logits, step=s),
               jax.jit(lambda s: covrl.policy_loss(control, old, new, adv, mask, logits=logits,
                                                   step=s))):
    with pytest.raises(ValueError, match="entropy_coeff's schedule must give a scalar"):
      call(1)


CONTROLS = {
    "none": covrl.NoControl(), "entropy": covrl.EntropyBonus(0.05),
    "adaptive": covrl.AdaptiveEntropyBonus(entropy_coeff=1e-3),
    "clip_higher": covrl.ClipHigher(),
    "clip_cov": covrl.ClipCov(clip_cov_ratio=0.3, clip_cov_lb=-1.0, clip_cov_ub=5.0),
    "kl_cov": covrl.KLCov(kl_cov_ratio=0.3, ppo_kl_coef=1.0),
    "forking": covrl.ForkingTokens(0.5), "entropy_advantage": covrl.EntropyAdvantage(),
    "w_reinforce": covrl.WReinforce(), "steer": covrl.STEER(),
}


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_a_left_out_token_is_out_of_every_term(name):
  """Under jit a NaN at a valid position (here one in each input) leaves that token out of every
  part of the loss, the bonus included, and counts it: the loss and its gradient equal those of
  the same batch with the tokens masked out."""
  old, new, adv, mask, logits = _batch(seed=1)
  arrays = {"old_log_prob": old.copy(), "log_prob": new.copy(), "advantages": adv.copy()}
  bad = {"log_prob": (1, 2), "old_log_prob": (0, 1), "advantages": (2, 3)}
  for where, index in bad.items():
    arrays[where][index] = np.nan
  control = CONTROLS[name]

  def value(lp, arrays, mask):
    return covrl.policy_loss(control, arrays["old_log_prob"], lp, arrays["advantages"], mask,
                             key=KEY, logits=logits)

  (loss, metrics), grad = jax.jit(jax.value_and_grad(value, has_aux=True))(
      arrays["log_prob"], arrays, mask)
  assert int(metrics["nonfinite_tokens"]) == len(bad)
  clean_mask = mask.copy()
  for index in bad.values():
    clean_mask[index] = 0
  clean = {k: np.where(clean_mask > 0, v, 0.0).astype(v.dtype) for k, v in arrays.items()}
  (want, _), want_grad = jax.value_and_grad(value, has_aux=True)(clean["log_prob"], clean,
                                                                  clean_mask)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", covrl.LOSS_AGG_MODES)
def test_an_empty_batch_reports_zero_but_its_configuration(mode):
  """The bad-input guide: loss 0 and every metric 0, except `entropy_coef` (the coefficient
  applied) and, in token-sum mode, `loss_denominator` (verl's 1, or the `denominator=` given)."""
  for shape, control, coef in (((0, T), covrl.EntropyBonus(0.25), 0.25),
                               ((B, 0), covrl.KLCov(), 0.0)):
    z = jnp.zeros(shape)
    logits = jnp.zeros((*shape, V))
    for denominator in (None, 7.0):
      loss, metrics = covrl.policy_loss(control, z, z, z, z, logits=logits, logit_update=logits,
                                        loss_agg_mode=mode, denominator=denominator)
      assert float(loss) == 0.0
      expected = dict.fromkeys(metrics, 0.0)
      expected["entropy_coef"] = coef
      if mode == "token-sum" or denominator is not None:
        expected["loss_denominator"] = 1.0 if denominator is None else denominator
      got = {k: float(v) for k, v in metrics.items()}
      assert got == pytest.approx(expected), (control.name, denominator)


def test_transformer_token_log_probs_outside_the_vocabulary():
  from covrl.transformer import token_log_probs

  logits = jax.random.normal(KEY, (2, 3, V))
  ids = jnp.array([[0, V - 1, -1], [V, 2, 1]])
  with pytest.raises(ValueError, match="tokens has 2 id"):
    token_log_probs(logits, ids)
  got = np.asarray(jax.jit(token_log_probs)(logits, ids))
  reference = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
  bad = (np.asarray(ids) < 0) | (np.asarray(ids) >= V)
  assert np.all(np.isnan(got[bad]))
  inside = np.clip(np.asarray(ids), 0, V - 1)
  want = np.take_along_axis(reference, inside[..., None], -1)[..., 0]
  np.testing.assert_allclose(got[~bad], want[~bad], rtol=1e-6)
  grad = jax.grad(lambda z: jnp.nansum(jax.jit(token_log_probs)(z, ids)))(logits)
  assert np.all(np.isfinite(np.asarray(grad)))
  with pytest.raises(TypeError, match="tokens must hold integer"):
    token_log_probs(logits, ids.astype(jnp.float32))
