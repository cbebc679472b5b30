"""XLA's buffer plan of the vocabulary-scale benchmark's two covrl programs, without running them.

  python -m benchmarks.vocab_plan      # D = 1024, float32, the four sizes of benchmarks/vocab.py

For each size it compiles the forward + backward of the fused path
(covrl.token_log_probs_and_entropy at its default chunks) and of the unfused one (logits, then
log_softmax + covrl.entropy_bonus_loss), exactly as benchmarks/vocab.py calls them, from abstract
inputs, and prints the compiler's memory analysis: arguments + outputs + temporaries, the bytes
the program needs at its peak whatever the machine's allocator adds. It needs no memory for the
arrays, so it covers the sizes the unfused path cannot run at here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import covrl
from benchmarks.vocab import ENTROPY_COEF, SIZES, D

GIB = 1024.0 ** 3


def plan(n: int, v: int, d: int = D) -> dict[str, float]:
  mask = jnp.ones((1, n), bool)

  def fused(h, w, y, a):
    lp, ent = covrl.token_log_probs_and_entropy(h, w, y)
    return jnp.sum(a * lp) + ENTROPY_COEF * jnp.sum(ent)

  def unfused(h, w, y, a):
    z = jnp.dot(h, w, preferred_element_type=jnp.float32)[None]
    lp = jnp.take_along_axis(jax.nn.log_softmax(z), y[None, :, None], axis=-1)[0, :, 0]
    bonus, _ = covrl.entropy_bonus_loss(z, mask, coef=ENTROPY_COEF, loss_agg_mode="token-sum")
    return jnp.sum(a * lp) - bonus

  s = jax.ShapeDtypeStruct
  args = (s((n, d), jnp.float32), s((d, v), jnp.float32), s((n,), jnp.int32),
          s((n,), jnp.float32))
  out = {}
  for name, f in (("fused", fused), ("unfused", unfused)):
    m = jax.jit(jax.grad(f, (0, 1))).lower(*args).compile().memory_analysis()
    out[name] = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / GIB
    out[name + "_temp"] = m.temp_size_in_bytes / GIB
  return out


def main() -> None:
  print("| B x T x V | fused (GiB) | of which temporaries | unfused (GiB) | of which temporaries "
        "| fused / unfused |")
  print("|---|---|---|---|---|---|")
  for n, v in SIZES:
    p = plan(n, v)
    print(f"| {n}x{v // 1024}k | {p['fused']:.2f} | {p['fused_temp']:.2f} | {p['unfused']:.2f} "
          f"| {p['unfused_temp']:.2f} | {p['fused'] / p['unfused']:.3f} |", flush=True)


if __name__ == "__main__":
  main()
