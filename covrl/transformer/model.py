"""A small decoder-only transformer policy in Flax (linen), with a key/value cache for sampling.

The policy maps a token sequence to next-token logits at every position,

  logits[b, t] = f(tokens[b, :t + 1])  (causal: position t sees positions <= t only).

It is a standard pre-LayerNorm decoder: token and learned position embeddings, `num_layers`
blocks of causal multi-head self-attention and a GELU MLP, a final LayerNorm and an untied output
head. The parameters are an ordinary pytree (`model.init(...)["params"]`), so optax, orbax and
`jax.tree` work on them directly.

Two ways to call it:
  * `model.apply({"params": p}, tokens)`: logits for a whole [B, L] sequence (training).
  * `model.apply({"params": p}, tokens, cache=cache, position=pos)`: continue a sequence from
    absolute position `pos`, reading and writing the key/value cache (sampling). Start from
    `init_cache(config, batch)`; a prompt is written in one call (prefill), then one token per
    call.

Computation runs in the dtype of the parameters (float32 by default; cast the parameters to
float64 to study small steps in double precision).

References:
  Vaswani et al., Attention Is All You Need, arXiv:1706.03762 (2017).
  Radford et al., Language Models are Unsupervised Multitask Learners (GPT-2, pre-LN), 2019.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from covrl import _checks


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of the transformer policy.

  Attributes:
    vocab_size: number of token ids V (>= 2).
    context_length: longest sequence the model reads (prompt + response), >= 2.
    num_layers: transformer blocks (>= 1).
    d_model: residual width, a multiple of `num_heads`.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width as a multiple of d_model.
    init_scale: standard deviation of the normal initialisation of every weight matrix.
    param_dtype: "float32" (default), "float64" or "bfloat16".
  """

  vocab_size: int
  context_length: int
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  mlp_ratio: int = 4
  init_scale: float = 0.02
  param_dtype: str = "float32"

  def __post_init__(self):
    _checks.check_int("vocab_size", self.vocab_size, 2)
    _checks.check_int("context_length", self.context_length, 2)
    _checks.check_int("num_layers", self.num_layers, 1)
    _checks.check_int("d_model", self.d_model, 1)
    _checks.check_int("num_heads", self.num_heads, 1)
    _checks.check_int("mlp_ratio", self.mlp_ratio, 1)
    if self.d_model % self.num_heads:
      raise ValueError(
          f"d_model={self.d_model} must be a multiple of num_heads={self.num_heads}."
      )
    if not (isinstance(self.init_scale, int | float) and 0 < self.init_scale < float("inf")):
      raise ValueError(f"init_scale must be finite and > 0, got {self.init_scale!r}.")
    if self.param_dtype not in ("float32", "float64", "bfloat16"):
      raise ValueError(
          f"param_dtype must be 'float32', 'float64' or 'bfloat16', got {self.param_dtype!r}."
      )

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


class LayerCache(NamedTuple):
  """Keys and values of one layer for every position: [B, context_length, heads, head_dim]."""

  key: jax.Array
  value: jax.Array


def init_cache(config: ModelConfig, batch: int, dtype: Any = None) -> tuple[LayerCache, ...]:
  """An empty key/value cache for `batch` sequences (zeros; positions are filled as written)."""
  dtype = jnp.dtype(config.param_dtype if dtype is None else dtype)
  shape = (batch, config.context_length, config.num_heads, config.head_dim)
  return tuple(
      LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)
  )


class _Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cache: LayerCache | None, position):
    cfg = self.config
    dense = lambda name, bias=True: nn.DenseGeneral(
        (cfg.num_heads, cfg.head_dim), name=name, param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.initializers.normal(cfg.init_scale), use_bias=bias,
    )
    # No key bias: it adds q . b to every score of a query, which the softmax ignores, so its
    # true gradient is 0 and Adam would turn the round-off in it into steps of size lr.
    q, k, v = dense("query")(x), dense("key", bias=False)(x), dense("value")(x)  # [B, L, H, Dh]
    length = x.shape[1]
    query_pos = position + jnp.arange(length)
    if cache is None:
      keys, values, key_pos = k, v, jnp.arange(length)
    else:
      start = (0, position, 0, 0)
      keys = jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), start)
      values = jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), start)
      cache = LayerCache(keys, values)
      key_pos = jnp.arange(keys.shape[1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / jnp.sqrt(cfg.head_dim).astype(q.dtype)
    # Causal mask by absolute position; unwritten cache slots lie in the future and are masked.
    allowed = key_pos[None, :] <= query_pos[:, None]
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, values)
    out = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), name="out", param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.initializers.normal(cfg.init_scale / (2 * cfg.num_layers) ** 0.5),
    )(out)
    return out, cache


class _Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cache, position):
    cfg = self.config
    pdtype = jnp.dtype(cfg.param_dtype)
    h, cache = _Attention(cfg, name="attention")(
        nn.LayerNorm(name="ln_attention", param_dtype=pdtype)(x), cache, position
    )
    x = x + h
    h = nn.LayerNorm(name="ln_mlp", param_dtype=pdtype)(x)
    h = nn.Dense(cfg.mlp_ratio * cfg.d_model, name="mlp_in", param_dtype=pdtype,
                 kernel_init=nn.initializers.normal(cfg.init_scale))(h)
    h = nn.Dense(cfg.d_model, name="mlp_out", param_dtype=pdtype,
                 kernel_init=nn.initializers.normal(cfg.init_scale / (2 * cfg.num_layers) ** 0.5))(
                     nn.gelu(h))
    return x + h, cache


class TransformerPolicy(nn.Module):
  """Decoder-only transformer: [B, L] token ids -> [B, L, V] next-token logits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from covrl.transformer import ModelConfig, TransformerPolicy
    >>> model = TransformerPolicy(ModelConfig(vocab_size=8, context_length=6, d_model=16))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))["params"]
    >>> model.apply({"params": params}, jnp.zeros((2, 6), jnp.int32)).shape
    (2, 6, 8)
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, cache: tuple[LayerCache, ...] | None = None,
               position: int | jax.Array = 0, *, hidden_only: bool = False):
    """Logits for `tokens`, which start at absolute `position`.

    Args:
      tokens: [B, L] int token ids, L <= context_length - position.
      cache: None for a whole-sequence forward pass, or the per-layer key/value cache to read
        and update (then the new cache is returned as well).
      position: absolute position of tokens[:, 0] (a traced scalar is fine).
      hidden_only: return the final hidden states [B, L, D] (the output of ln_final) in place
        of the logits; the logits are then `hidden @ head.kernel + head.bias`
        (params["head"]), which `covrl.token_log_probs_and_entropy` applies in chunks.

    Returns:
      [B, L, V] logits (or [B, L, D] hidden states), or (that, new cache) when a cache is
      passed.
    """
    cfg = self.config
    pdtype = jnp.dtype(cfg.param_dtype)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
    if tokens.shape[1] > cfg.context_length:
      raise ValueError(
          f"{tokens.shape[1]} tokens exceed context_length={cfg.context_length}."
      )
    if cache is not None and len(cache) != cfg.num_layers:
      raise ValueError(f"cache has {len(cache)} layers, the model {cfg.num_layers}.")
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="token_embedding", param_dtype=pdtype,
                     embedding_init=nn.initializers.normal(cfg.init_scale))
    pos_embed = self.param("position_embedding", nn.initializers.normal(cfg.init_scale),
                           (cfg.context_length, cfg.d_model), pdtype)
    positions = position + jnp.arange(tokens.shape[1])
    x = embed(tokens) + jnp.take(pos_embed, positions, axis=0)[None]
    new_cache = []
    for i in range(cfg.num_layers):
      x, layer_cache = _Block(cfg, name=f"block_{i}")(
          x, None if cache is None else cache[i], position
      )
      new_cache.append(layer_cache)
    x = nn.LayerNorm(name="ln_final", param_dtype=pdtype)(x)
    if hidden_only:
      return x if cache is None else (x, tuple(new_cache))
    logits = nn.Dense(cfg.vocab_size, name="head", param_dtype=pdtype,
                      kernel_init=nn.initializers.normal(cfg.init_scale))(x)
    if cache is None:
      return logits
    return logits, tuple(new_cache)


def init_params(config: ModelConfig, key: jax.Array) -> Any:
  """Fresh parameters of `TransformerPolicy(config)`, a pytree of arrays."""
  tokens = jnp.zeros((1, config.context_length), jnp.int32)
  return jax.jit(TransformerPolicy(config).init)(key, tokens)["params"]


def num_params(params: Any) -> int:
  """Number of scalar parameters in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
