"""Temperature sampling of fixed-length responses, and the log-probabilities training needs.

Sampling draws one token per step of a fixed-length `lax.scan`, y_t ~ softmax(z_t / tau), either
recomputing the causal forward pass over a fixed-size buffer at each step or, with `kv_cache=True`,
writing the prompt into the key/value cache in one pass (prefill) and feeding one token per step.
It returns each token's log-probability under that same tempered policy,
log softmax(z_t / tau)[y_t], and the response mask (valid up to and including the first EOS).
Everything is shape-static, so it compiles once and runs under jit, vmap and sharding. Step t
draws with `fold_in(key, t)`, so a key gives the same tokens however the batch is split over
devices (JAX's partitionable threefry).

`response_logits` recomputes the tempered logits of a whole (prompt, response) batch in one forward
pass: PPO's old log-probabilities and the losses use it, with the sampling temperature (verl divides
the logits by the rollout temperature in both places).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from covrl import _checks
from covrl.transformer import tasks as tasks_lib
from covrl.transformer.model import TransformerPolicy, init_cache


class Rollout(NamedTuple):
  """A batch of sampled responses.

  Attributes:
    prompts: [B, P] int prompt ids.
    responses: [B, R] int sampled ids.
    log_probs: [B, R] log-probability of each sampled token under the tempered policy.
    response_mask: [B, R] bool, valid through the first EOS.
  """

  prompts: jax.Array
  responses: jax.Array
  log_probs: jax.Array
  response_mask: jax.Array


def _check_temperature(temperature: Any) -> None:
  if not (isinstance(temperature, int | float) and 0 < temperature < float("inf")):
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")


def sample(
    model: TransformerPolicy,
    params: Any,
    prompts: jax.Array,
    key: jax.Array,
    *,
    response_length: int,
    temperature: float = 1.0,
    eos_id: int | None = None,
    kv_cache: bool = False,
) -> Rollout:
  """Sample `response_length` tokens after each prompt at temperature tau.

  Args:
    model: the policy module.
    params: its parameters.
    prompts: [B, P] int ids, P + response_length <= context_length.
    key: PRNG key.
    response_length: R, number of tokens drawn (a static int).
    temperature: tau > 0; logits are divided by it before the softmax.
    eos_id: end-of-sequence id for the mask (None: every position is valid).
    kv_cache: decode with the key/value cache (one token per step after a prefill) instead of
      recomputing the whole sequence at each step. Both draw the same tokens up to float
      round-off; the cache wins for long sequences, recomputing compiles faster and is as quick
      for the short sequences of the CPU-sized tasks.

  Returns:
    Rollout(prompts, responses, log_probs, response_mask).
  """
  _check_temperature(temperature)
  prompt_length = prompts.shape[1]
  if prompt_length < 1 or response_length < 1:
    raise ValueError(f"need a prompt and response_length >= 1, got {prompts.shape}, "
                     f"{response_length}.")
  if prompt_length + response_length > model.config.context_length:
    raise ValueError(
        f"prompt {prompt_length} + response {response_length} tokens exceed context_length="
        f"{model.config.context_length}."
    )

  def draw(last_logits, t):
    scaled = last_logits.astype(jnp.promote_types(last_logits.dtype, jnp.float32)) / temperature
    token = jax.random.categorical(jax.random.fold_in(key, t), scaled, axis=-1).astype(jnp.int32)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(scaled), token[:, None], axis=-1)[:, 0]
    return token, log_prob

  if kv_cache:
    tokens, log_probs = _sample_cached(model, params, prompts, response_length, draw)
  else:
    tokens, log_probs = _sample_recompute(model, params, prompts, response_length, draw)
  responses, log_probs = tokens.T, log_probs.T
  if eos_id is None:
    mask = jnp.ones(responses.shape, bool)
  else:
    mask = tasks_lib.response_mask(responses, eos_id)
  return Rollout(prompts, responses, log_probs, mask)


def _sample_recompute(model, params, prompts, response_length, draw):
  """Each step runs the causal model on the fixed-size [B, P + R] buffer (future slots unused)."""
  batch, prompt_length = prompts.shape
  buffer = jnp.concatenate(
      [prompts, jnp.zeros((batch, response_length), prompts.dtype)], axis=1)

  def step(buffer, t):
    logits = model.apply({"params": params}, buffer)
    token, log_prob = draw(
        jax.lax.dynamic_index_in_dim(logits, prompt_length + t - 1, axis=1, keepdims=False), t)
    buffer = jax.lax.dynamic_update_index_in_dim(
        buffer, token.astype(buffer.dtype), prompt_length + t, axis=1)
    return buffer, (token, log_prob)

  _, (tokens, log_probs) = jax.lax.scan(step, buffer, jnp.arange(response_length))
  return tokens, log_probs


def _sample_cached(model, params, prompts, response_length, draw):
  """Prefill the prompt into the cache, then one forward pass of one token per step."""
  batch, prompt_length = prompts.shape
  dtype = jax.tree.leaves(params)[0].dtype
  cache = init_cache(model.config, batch, dtype)
  logits, cache = model.apply({"params": params}, prompts, cache=cache, position=0)

  def step(carry, t):
    last_logits, cache = carry
    token, log_prob = draw(last_logits, t)
    next_logits, cache = model.apply(
        {"params": params}, token[:, None], cache=cache, position=prompt_length + t
    )
    return (next_logits[:, 0], cache), (token, log_prob)

  # R - 1 steps feed their token back; the last token is drawn without another forward pass.
  (last_logits, _), (tokens, log_probs) = jax.lax.scan(
      step, (logits[:, -1], cache), jnp.arange(response_length - 1)
  )
  last_token, last_log_prob = draw(last_logits, response_length - 1)
  tokens = jnp.concatenate([tokens, last_token[None]], axis=0)
  log_probs = jnp.concatenate([log_probs, last_log_prob[None]], axis=0)
  return tokens, log_probs


def complete(
    model: TransformerPolicy,
    params: Any,
    tokens: jax.Array,
    start: jax.Array,
    key: jax.Array,
    *,
    prompt_length: int,
    temperature: float = 1.0,
    first: int = 0,
) -> jax.Array:
  """Sample the response positions at and after `start`, keeping the tokens before it.

  Monte Carlo estimates of Q(s, a) continue a fixed context s = (prompt, y_<t, a) with the
  policy: pass that context in `tokens` and start = t + 1.

  Args:
    model, params: the policy.
    tokens: [B, P + R] ids: the prompt and the first start[b] response tokens (the rest is
      ignored).
    start: [B] int, the first response position to sample (0 .. R; R samples nothing).
    key: PRNG key.
    prompt_length: P (static).
    temperature: tau > 0.
    first: a static lower bound on `start`: positions before it are never sampled, so the
      scan starts there (a cheaper call when every row starts late).

  Returns:
    [B, R] response ids.
  """
  _check_temperature(temperature)
  response_length = tokens.shape[1] - prompt_length
  if response_length < 1:
    raise ValueError(f"tokens {tokens.shape} hold no response after {prompt_length} prompt ids.")

  def step(buffer, t):
    logits = model.apply({"params": params}, buffer)
    last = jax.lax.dynamic_index_in_dim(logits, prompt_length + t - 1, axis=1, keepdims=False)
    last = last.astype(jnp.promote_types(last.dtype, jnp.float32)) / temperature
    drawn = jax.random.categorical(jax.random.fold_in(key, t), last, axis=-1)
    keep = jax.lax.dynamic_index_in_dim(buffer, prompt_length + t, axis=1, keepdims=False)
    token = jnp.where(t >= start, drawn.astype(buffer.dtype), keep)
    return jax.lax.dynamic_update_index_in_dim(buffer, token, prompt_length + t, axis=1), None

  buffer, _ = jax.lax.scan(step, tokens, jnp.arange(first, response_length))
  return buffer[:, prompt_length:]


def response_logits(
    model: TransformerPolicy, params: Any, prompts: jax.Array, responses: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
  """Tempered logits z_t / tau that predicted each response token, from one forward pass.

  Args:
    model, params: the policy.
    prompts: [B, P] ids; responses: [B, R] ids.
    temperature: tau > 0.

  Returns:
    [B, R, V] logits divided by tau (at least float32).
  """
  _check_temperature(temperature)
  prompt_length, response_length = prompts.shape[1], responses.shape[1]
  tokens = jnp.concatenate([prompts, responses[:, :-1]], axis=1)
  logits = model.apply({"params": params}, tokens)[:, prompt_length - 1:]
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  assert logits.shape[1] == response_length
  return logits / temperature


def response_hidden(model: TransformerPolicy, params: Any, prompts: jax.Array,
                    responses: jax.Array) -> jax.Array:
  """Final hidden states [B, R, D] that predicted each response token (the input of the head).

  `response_logits` is the head applied to these, divided by the temperature.
  """
  prompt_length = prompts.shape[1]
  tokens = jnp.concatenate([prompts, responses[:, :-1]], axis=1)
  hidden = model.apply({"params": params}, tokens, hidden_only=True)[:, prompt_length - 1:]
  assert hidden.shape[1] == responses.shape[1]
  return hidden


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits)[token] for [B, R, V] logits and [B, R] tokens.

  An id outside [0, V) raises ValueError when `tokens` is concrete; under jit its log-prob is NaN
  (not the wrapped or clamped index a gather would read), which the losses leave out and count
  in `nonfinite_tokens`, as `covrl.token_log_probs_and_entropy` does.
  """
  if jnp.shape(tokens) != jnp.shape(logits)[:-1]:
    raise ValueError(f"tokens must be logits.shape[:-1] = {jnp.shape(logits)[:-1]}, got shape "
                     f"{jnp.shape(tokens)}.")
  vocab = logits.shape[-1]
  tokens = _checks.check_ids("tokens", tokens, vocab)
  inside = jnp.clip(tokens, 0, vocab - 1)
  log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), inside[..., None], axis=-1)[..., 0]
  return _checks.undefined_outside_vocab(log_prob, tokens, vocab)
