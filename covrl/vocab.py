"""Log-probabilities and entropy from hidden states, without materialising [B, T, V] logits.

An LM's policy at a position is pi = softmax(z), z = (h W + b) / tau: h the final hidden state
[D], W the output projection [D, V], b an optional bias and tau the sampling temperature. The
losses need only per-token numbers from it,

  log pi(y) = z_y - logsumexp(z),   H = -sum_v pi_v log pi_v = logsumexp(z) - E_pi z,

and their gradients, dlog pi(y)/dz = e_y - pi and dH/dz = -pi (log pi + H) (THEORY.md T1), which
reach h and W through z. Here they are computed in chunks of `token_chunk` tokens by
`vocab_chunk` vocabulary entries: a streaming (online) log-sum-exp over the vocabulary chunks
keeps three numbers per token (running max m, sum_v e^{z_v - m}, sum_v e^{z_v - m} (z_v - m)),
and a custom VJP saves only logsumexp(z) and H per token and recomputes each chunk of logits in
the backward pass. Peak memory is then the inputs, their gradients and a few [token_chunk,
vocab_chunk] blocks, instead of several [B, T, V] arrays; the price is one more matmul (the
recomputation) in the backward pass: four matmuls of B T x D x V against the unfused three.

`token_entropy_and_change` streams the same way for what the entropy controllers read: the
entropy and the first-order change -Cov_pi(log pi, dz) under a tangent (dh, dW, db) of the
inputs, dz = (dh W + h dW + db) / tau, with the covariance merged chunk by chunk (Chan et al.),
never formed as a difference of large moments.

Conventions as in the rest of covrl: bfloat16 inputs, float32 accumulation (float64 stays
float64); a vocabulary entry with `vocab_mask` False (or bias -inf) has probability 0 and
contributes nothing to values or gradients; positions with `mask` False get 0 with zero
gradient, whatever their hidden state holds (NaN included). A token id outside [0, V) at a valid
position raises when the ids are concrete; under jit its log_prob is NaN (an id outside the
vocabulary has no probability), with zero gradient, so that the losses leave the token out and
count it in `nonfinite_tokens`, as they do any other undefined token. Every output is per
token, so the functions need no `axis_name`: call them on a shard inside `shard_map`, or under
`jax.jit` on a token axis sharded over a mesh (the token chunks are strided so that each chunk
takes the same share of every device's tokens). Feed the outputs to the losses as they are:
`covrl.policy_loss(control, old_log_prob, log_prob, advantages, mask, entropy=entropy)` for any
control (the entropy bonus differentiates through `entropy`; Clip-Cov, KL-Cov and the global
selection read `log_prob`), or the verl-named losses with the same keywords.

References::

  M. Milakov, N. Gimelshein, Online normalizer calculation for softmax, arXiv:1805.02867 (2018).
  T. F. Chan, G. H. Golub, R. J. LeVeque, Updating formulae and a pairwise algorithm for computing
    sample variances, Stanford CS report STAN-CS-79-773 (1979).
  P.-L. Hsu et al., Liger Kernel: Efficient Triton Kernels for LLM Training (fused linear cross
    entropy), arXiv:2410.10989 (2024).
  E. Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models, arXiv:2411.09009 (2024).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from covrl import _checks
from covrl import _chunks as ch

DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 8192


# ----------------------------------------------------------------------------------------------
# log pi(y) and H with a custom VJP


def _forward_chunk(plan, kernel, bias, vocab_mask, temperature, dtype, h, y):
  """Per-token (logsumexp, entropy, z_y) of one token chunk, streaming over the vocabulary."""

  def body(state, chunk: ch.VocabChunk):
    m, s0, s1, zy = state
    z = ch.logits(h, chunk, temperature, dtype)
    shift, alpha, delta = ch.rescale(m, z)
    support = z > -jnp.inf
    d = jnp.where(support, z - shift[:, None], 0.0)
    e = jnp.where(support, jnp.exp(d), 0.0)
    # s1 = sum_v e^{z_v - m} (z_v - m): every term <= 0, so it sums without cancellation.
    s1 = alpha * (s1 + delta * s0) + jnp.sum(e * d, axis=-1)
    s0 = alpha * s0 + jnp.sum(e, axis=-1)
    hit = (chunk.start + jnp.arange(z.shape[-1]))[None, :] == y[:, None]
    zy = zy + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
    return jnp.maximum(m, jnp.max(z, axis=-1)), s0, s1, zy

  zeros = ch.zeros(h.shape[:1], dtype, h, y, kernel, bias, vocab_mask, temperature)
  m, s0, s1, zy = ch.vocab_loop(plan, body, (zeros - jnp.inf, zeros, zeros, zeros), kernel, bias,
                              vocab_mask)
  # H = logsumexp(z) - E_pi z = log s0 - s1 / s0: two terms of one sign, again no cancellation.
  lse = jnp.where(m > -jnp.inf, m, 0.0) + jnp.log(s0)
  return lse, jnp.log(s0) - s1 / s0, zy


def _dtype(hidden, kernel, bias):
  arrays = (hidden, kernel) if bias is None else (hidden, kernel, bias)
  return _checks.result_dtype(*arrays)


def _fused_forward(plan, hidden, kernel, bias, tokens, mask, vocab_mask, temperature):
  dtype = _dtype(hidden, kernel, bias)
  x = ch.prepare(plan, hidden, tokens, mask)
  lead = hidden.shape[:-1]

  def token_step(_, chunk):
    h, y, valid = chunk
    lse, ent, zy = _forward_chunk(plan, kernel, bias, vocab_mask, temperature, dtype, h, y)
    return None, (jnp.where(valid, lse, 0.0), jnp.where(valid, ent, 0.0),
                  jnp.where(valid, zy - lse, 0.0))

  _, (lse, ent, logp) = lax.scan(token_step, None, x)
  return ch.from_chunks(plan, logp, lead), ch.from_chunks(plan, ent, lead), (lse, ent)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(plan, hidden, kernel, bias, tokens, mask, vocab_mask, temperature):
  logp, ent, _ = _fused_forward(plan, hidden, kernel, bias, tokens, mask, vocab_mask,
                                temperature)
  return logp, ent


def _fused_fwd(plan, hidden, kernel, bias, tokens, mask, vocab_mask, temperature):
  logp, ent, (lse, ent_chunks) = _fused_forward(plan, hidden, kernel, bias, tokens, mask,
                                                vocab_mask, temperature)
  # Per-token scalars only; the inputs are the caller's arrays (no copies are kept).
  residuals = (hidden, kernel, bias, tokens, mask, vocab_mask, temperature, lse, ent_chunks)
  return (logp, ent), residuals


def _fused_bwd(plan, residuals, cotangents):
  hidden, kernel, bias, tokens, mask, vocab_mask, temperature, lse, ent = residuals
  g_logp, g_ent = cotangents
  dtype = _dtype(hidden, kernel, bias)
  x = ch.prepare(plan, hidden, tokens, mask)
  # dL/dz is linear in the two per-token cotangents; 1/tau is the chain rule through z / tau.
  scale = lambda g: jnp.where(x.valid, ch.to_chunks(plan, g.reshape(plan.n)).astype(dtype), 0.0
                              ) / temperature
  g_logp, g_ent = scale(g_logp), scale(g_ent)

  def token_step(carry, chunk):
    h, y, lse_i, ent_i, gl, ge = chunk

    def body(state, c: ch.VocabChunk):
      dh, dw, db = state
      z = ch.logits(h, c, temperature, dtype)
      support = z > -jnp.inf
      logp = jnp.where(support, z - lse_i[:, None], 0.0)
      p = jnp.where(support, jnp.exp(logp), 0.0)
      hit = (c.start + jnp.arange(z.shape[-1]))[None, :] == y[:, None]
      # d log pi(y) / dz = e_y - pi and dH / dz = -pi (log pi + H) (softmax_entropy.py).
      g = gl[:, None] * (hit - p) - ge[:, None] * p * (logp + ent_i[:, None])
      g = jnp.where(support, g, 0.0)
      dh = dh + lax.dot_general(g, c.kernel, (((1,), (1,)), ((), ())),
                                preferred_element_type=dtype).astype(dtype)
      dw_c = lax.dot_general(h, g, (((0,), (0,)), ((), ())), preferred_element_type=dtype)
      dw = lax.dynamic_update_slice_in_dim(
          dw, lax.dynamic_slice_in_dim(dw, c.start, z.shape[-1], 1) + dw_c.astype(dtype),
          c.start, 1)
      if db is not None:
        db = lax.dynamic_update_slice_in_dim(
            db, lax.dynamic_slice_in_dim(db, c.start, z.shape[-1], 0) + jnp.sum(g, axis=0),
            c.start, 0)
      return dh, dw, db

    dw, db = carry
    dh0 = ch.zeros(h.shape, dtype, *refs, h, y, lse_i, ent_i, gl, ge)
    dh, dw, db = ch.vocab_loop(plan, body, (dh0, dw, db), kernel, bias, vocab_mask)
    return (dw, db), dh

  refs = (x.hidden, x.tokens, kernel, bias, vocab_mask, temperature, lse, ent, g_logp, g_ent)
  dw0 = ch.zeros(kernel.shape, dtype, *refs)
  db0 = None if bias is None else ch.zeros(bias.shape, dtype, *refs)
  (dw, db), dh = lax.scan(token_step, (dw0, db0),
                          (x.hidden, x.tokens, lse, ent, g_logp, g_ent))
  dh = ch.from_chunks(plan, dh, hidden.shape[:-1]).astype(hidden.dtype)
  return (dh, dw.astype(kernel.dtype), None if bias is None else db.astype(bias.dtype),
          None, None, None, jnp.zeros_like(temperature))


_fused.defvjp(_fused_fwd, _fused_bwd)


def token_log_probs_and_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    tokens: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    vocab_mask: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> tuple[jax.Array, jax.Array]:
  """log pi(y) of the sampled tokens and the full-vocabulary entropy, from hidden states.

  pi = softmax(z), z = (hidden @ kernel + bias) / temperature, without forming z for more than
  `token_chunk` x `vocab_chunk` entries at a time, forwards or backwards (a custom VJP that saves
  logsumexp(z) and H per token and recomputes the chunks). Values and gradients (with respect to
  hidden, kernel and bias) equal those of `jax.nn.log_softmax(z)` and `covrl.entropy(z)` up to
  float round-off. Costs one more B T x D x V matmul than the unfused backward pass; use it when
  the logits and their gradient do not fit in memory (the module docstring has the details).

  Args:
    hidden: [..., D] final hidden states (the input of the output projection), any float dtype;
      bfloat16 is multiplied with float32 accumulation.
    kernel: [D, V] output projection (a Flax `nn.Dense` kernel).
    tokens: [...] int sampled token ids, in [0, V) at valid positions. An id outside [0, V) at
      a valid position raises ValueError when tokens (and mask) are concrete; under jit it gets
      a NaN log_prob (see Returns).
    bias: optional [V] output bias.
    mask: optional [...] 0/1 or bool; False marks padding, which gets 0 and a zero gradient
      whatever hidden holds there. All valid when None.
    vocab_mask: optional [V] bool; False entries have probability 0 (logit -inf).
    temperature: tau > 0 (verl divides the logits by it).
    token_chunk, vocab_chunk: chunk sizes (static ints); peak memory grows with their product.

  Returns:
    (log_prob, entropy), each [...] in float32 (float64 for float64 inputs); 0 where mask is
    False. log_prob is -inf for a token whose vocabulary entry is masked, as in the unfused path,
    and NaN (with zero gradient) for an id outside [0, V) at a valid position under jit: the
    losses leave such a token out and count it in `nonfinite_tokens`. The entropy there is that
    of the position's distribution, which does not depend on the id, and stays as it is.

  Example:
    A Flax policy exposes the hidden states before its head, and the loss applies the head
    through this function:

    >>> import flax.linen as nn, jax, jax.numpy as jnp, covrl
    >>> class Policy(nn.Module):
    ...   vocab: int
    ...   def setup(self):
    ...     self.body, self.head = nn.Dense(16), nn.Dense(self.vocab)
    ...   def hidden(self, x):
    ...     return jnp.tanh(self.body(x))
    ...   def __call__(self, x):  # logits, for sampling
    ...     return self.head(self.hidden(x))
    >>> model = Policy(vocab=50)
    >>> x, tokens = jnp.ones((2, 3, 8)), jnp.array([[1, 2, 3], [4, 5, 6]])
    >>> mask, adv = jnp.array([[1, 1, 0], [1, 1, 1]]), jnp.ones((2, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> def loss(params, old_log_prob):
    ...   h = model.apply({"params": params}, x, method=Policy.hidden)
    ...   head = params["head"]
    ...   log_prob, entropy = covrl.token_log_probs_and_entropy(
    ...       h, head["kernel"], tokens, bias=head["bias"], mask=mask, vocab_chunk=16)
    ...   # entropy= in place of logits=: the bonus differentiates through it.
    ...   return covrl.policy_loss(covrl.EntropyBonus(0.01), old_log_prob, log_prob, adv,
    ...                            mask, entropy=entropy)
    >>> old = jnp.log(jnp.full((2, 3), 1 / 50))
    >>> grads, metrics = jax.grad(loss, has_aux=True)(params, old)
    >>> grads["head"]["kernel"].shape
    (16, 50)
    >>> bool(metrics["entropy"] > 3.5)  # near log 50 = 3.91 at initialisation
    True
  """
  hidden, kernel, tokens, bias, mask, vocab_mask = ch.check_inputs(
      hidden, kernel, tokens, bias, mask, vocab_mask, temperature)
  if tokens is None:
    raise TypeError("tokens must be an integer array, got None.")
  plan = ch.make_plan(hidden.shape[:-1], kernel.shape[1], token_chunk, vocab_chunk)
  dtype = _dtype(hidden, kernel, bias)
  if plan.n == 0:
    return jnp.zeros(hidden.shape[:-1], dtype), jnp.zeros(hidden.shape[:-1], dtype)
  temperature = jnp.asarray(temperature, dtype)
  union = ch.zeros((), dtype, hidden, kernel, bias, tokens, mask, vocab_mask, temperature)
  hidden, kernel, bias = (ch.vary_like(a, union) for a in (hidden, kernel, bias))
  logp, ent = _fused(plan, hidden, kernel, bias, tokens, mask, vocab_mask, temperature)
  return _checks.undefined_outside_vocab(logp, tokens, plan.vocab, mask), ent


# ----------------------------------------------------------------------------------------------
# Entropy and its first-order change under a tangent (controllers)


def token_entropy_and_change(
    hidden: jax.Array,
    kernel: jax.Array,
    d_hidden: jax.Array | None = None,
    d_kernel: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    d_bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    vocab_mask: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> tuple[jax.Array, jax.Array]:
  """Per-token entropy H and its first-order change -Cov_pi(log pi, dz), chunk by chunk.

  dz = (d_hidden @ kernel + hidden @ d_kernel + d_bias) / temperature is the logit change of the
  tangent (d_hidden, d_kernel, d_bias), so the change is the directional derivative of H along
  it (THEORY.md T1.2; Cui et al. 2025, Lemma 1): what `covrl.entropy_change_first_order(z, dz)`
  gives, with neither z nor dz formed for more than a chunk. Get d_hidden from a `jax.jvp` of
  the model's hidden-state function in the direction of a candidate parameter update, and
  d_kernel from the update itself; `covrl.masked_mean(change, mask)` is then
  `covrl.pooled_entropy_change` and `covrl.masked_mean(entropy, mask)` `covrl.pooled_entropy`.

  The covariance is accumulated chunk by chunk with Chan et al.'s pairwise merge of weighted
  means and co-moments, so it does not lose precision when dz has a large mean. This function is
  for prediction and logging; it has no custom VJP, so differentiating it keeps every chunk's
  logits for the backward pass.

  Args:
    hidden, kernel, bias, mask, vocab_mask, temperature, token_chunk, vocab_chunk: as in
      `token_log_probs_and_entropy`.
    d_hidden: optional [..., D] tangent of hidden (zero when None).
    d_kernel: optional [D, V] tangent of kernel (zero when None).
    d_bias: optional [V] tangent of bias (zero when None).

  Returns:
    (entropy, first_order_change), each [...]; 0 where mask is False.

  References:
    G. Cui et al., The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models, arXiv:2505.22617 (2025), Lemma 1.
  """
  hidden, kernel, _, bias, mask, vocab_mask = ch.check_inputs(
      hidden, kernel, None, bias, mask, vocab_mask, temperature)
  lead, vocab = hidden.shape[:-1], kernel.shape[1]
  if d_hidden is not None:
    d_hidden = _checks.check_float_array("d_hidden", d_hidden)
    if d_hidden.shape != hidden.shape:
      raise ValueError(f"d_hidden must have hidden's shape {hidden.shape}, got {d_hidden.shape}.")
  if d_kernel is not None:
    d_kernel = _checks.check_float_array("d_kernel", d_kernel)
    if d_kernel.shape != kernel.shape:
      raise ValueError(f"d_kernel must have kernel's shape {kernel.shape}, got {d_kernel.shape}.")
  if d_bias is not None:
    d_bias = _checks.check_float_array("d_bias", d_bias)
    if d_bias.shape != (vocab,):
      raise ValueError(f"d_bias must be [V] = ({vocab},), got shape {d_bias.shape}.")
  plan = ch.make_plan(lead, vocab, token_chunk, vocab_chunk)
  arrays = [a for a in (hidden, kernel, bias, d_hidden, d_kernel, d_bias) if a is not None]
  dtype = _checks.result_dtype(*arrays)
  if plan.n == 0:
    return jnp.zeros(lead, dtype), jnp.zeros(lead, dtype)
  temperature = jnp.asarray(temperature, dtype)
  x = ch.prepare(plan, hidden, None, mask)
  dx = None if d_hidden is None else ch.prepare(plan, d_hidden, None, mask).hidden
  extra = tuple(a for a in (d_kernel, d_bias) if a is not None)

  def token_step(_, chunk):
    h, valid, dh = chunk

    def body(state, c: ch.VocabChunk):
      m, w, mx, my, cxy = state
      z = ch.logits(h, c, temperature, dtype)
      rest = list(c.extra)
      dz = jnp.zeros_like(z)
      if dh is not None:
        dz = dz + jnp.dot(dh, c.kernel, preferred_element_type=dtype).astype(dtype)
      if d_kernel is not None:
        dz = dz + jnp.dot(h, rest.pop(0), preferred_element_type=dtype).astype(dtype)
      if d_bias is not None:
        dz = dz + rest.pop(0).astype(dtype)
      dz = dz / temperature
      shift, alpha, delta = ch.rescale(m, z)
      support = z > -jnp.inf
      xz = jnp.where(support, z - shift[:, None], 0.0)
      e = jnp.where(support, jnp.exp(xz), 0.0)
      dz = jnp.where(support, dz, 0.0)
      # This chunk's weight, weighted means and centred co-moment of (z - shift, dz), then
      # Chan et al.'s merge with the running ones (whose weights scale by alpha).
      wc = jnp.sum(e, axis=-1)
      inv_c = jnp.where(wc > 0, 1.0 / jnp.where(wc > 0, wc, 1.0), 0.0)
      mxc = jnp.sum(e * xz, axis=-1) * inv_c
      myc = jnp.sum(e * dz, axis=-1) * inv_c
      cc = jnp.sum(e * (xz - mxc[:, None]) * (dz - myc[:, None]), axis=-1)
      wa, mxa = alpha * w, mx + delta
      wn = wa + wc
      inv = jnp.where(wn > 0, 1.0 / jnp.where(wn > 0, wn, 1.0), 0.0)
      cxy = alpha * cxy + cc + (mxa - mxc) * (my - myc) * wa * wc * inv
      mx = (wa * mxa + wc * mxc) * inv
      my = (wa * my + wc * myc) * inv
      return jnp.maximum(m, jnp.max(z, axis=-1)), wn, mx, my, cxy

    zeros = ch.zeros(h.shape[:1], dtype, h, dh, kernel, bias, vocab_mask, temperature, *extra)
    init = (zeros - jnp.inf, zeros, zeros, zeros, zeros)
    _, w, mx, _, cxy = ch.vocab_loop(plan, body, init, kernel, bias, vocab_mask, extra)
    # H = log sum_v e^{z_v - m} - E_pi (z - m); Cov_pi(log pi, dz) = Cov_pi(z, dz).
    ent, change = jnp.log(w) - mx, -cxy / w
    return None, (jnp.where(valid, ent, 0.0), jnp.where(valid, change, 0.0))

  _, (ent, change) = lax.scan(token_step, None, (x.hidden, x.valid, dx))
  return ch.from_chunks(plan, ent, lead), ch.from_chunks(plan, change, lead)
