"""Tabular sweep: exact softmax policy gradient with an entropy bonus, covrl against NumPy.

I independent K-armed bandits (rewards r ~ U(0, 1) per instance and arm), logits z from 0, and
the exact gradient step on J(z) + alpha H(pi), pi = softmax(z):

  z <- z + eta [pi * (r - <pi, r>) - alpha pi * (log pi + H(pi))].

covrl: the gradient of -<pi, r> by jax.grad, the bonus by `covrl.entropy_bonus(alpha)` chained
with `optax.sgd(eta)`, the steps in a `lax.scan`, the instances by `vmap`, all in one jit.
NumPy: the same update written out, vectorised over instances, with preallocated buffers and
in-place operations (what a careful NumPy user writes), one Python iteration per step.

Both run in float32 from the same rewards; their final policies are compared before timing.

TODO(lead): switch the covrl side to `covrl.tabular.make_train` (dynamics="pg",
control="entropy") once covrl/tabular.py is on main; it is not on main at the time of writing.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

SIZES = {"small": (16, 10, 1_000), "large": (1024, 100, 10_000)}
QUICK_LARGE = (1024, 100, 1_000)
ETA, ALPHA = 0.5, 0.05


def rewards(instances: int, arms: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).random((instances, arms), dtype=np.float32)


def covrl_sweep(steps: int, eta: float = ETA, alpha: float = ALPHA):
  """Jitted r [I, K] -> final logits [I, K]: the scan of exact PG steps, vmapped over I."""
  import jax
  import jax.numpy as jnp
  import optax

  import covrl

  opt = optax.chain(covrl.entropy_bonus(alpha), optax.sgd(eta))

  def train(r):
    z0 = jnp.zeros_like(r)

    def step(carry, _):
      z, state = carry
      g = jax.grad(lambda z: -jnp.dot(jax.nn.softmax(z), r))(z)
      updates, state = opt.update(g, state, z)
      return (optax.apply_updates(z, updates), state), None

    (z, _), _ = jax.lax.scan(step, (z0, opt.init(z0)), length=steps)
    return z

  return jax.jit(jax.vmap(train))


def numpy_sweep(r: np.ndarray, steps: int, eta: float = ETA, alpha: float = ALPHA) -> np.ndarray:
  """The same update in vectorised NumPy (float32, in place); returns the final logits."""
  dt = r.dtype
  eta, alpha = dt.type(eta), dt.type(alpha)
  z = np.zeros_like(r)
  shifted, p, logp, g = (np.empty_like(r) for _ in range(4))
  col = np.empty((r.shape[0], 1), dt)
  ent, pr = np.empty_like(col), np.empty_like(col)
  for _ in range(steps):
    np.max(z, axis=1, keepdims=True, out=col)
    np.subtract(z, col, out=shifted)
    np.exp(shifted, out=p)
    np.sum(p, axis=1, keepdims=True, out=col)
    np.divide(p, col, out=p)
    np.log(col, out=col)
    np.subtract(shifted, col, out=logp)               # log pi
    np.multiply(p, logp, out=g)
    np.sum(g, axis=1, keepdims=True, out=ent)
    np.negative(ent, out=ent)                         # H
    np.multiply(p, r, out=g)
    np.sum(g, axis=1, keepdims=True, out=pr)          # <pi, r>
    np.add(logp, ent, out=logp)
    np.multiply(logp, alpha, out=logp)                # alpha (log pi + H)
    np.subtract(r, pr, out=g)
    np.subtract(g, logp, out=g)
    np.multiply(g, p, out=g)                          # pi (r - <pi,r>) - alpha pi (log pi + H)
    g *= eta
    z += g
  return z


def _softmax(z: np.ndarray) -> np.ndarray:
  e = np.exp(z - z.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def run(sizes: dict[str, tuple[int, int, int]], *, repeats: int = 3, seed: int = 0,
        log=print) -> dict[str, Any]:
  """Parity check then timing of both sides at each size (interleaved repeats)."""
  import jax

  from benchmarks import common

  rows = []
  for name, (instances, arms, steps) in sizes.items():
    r = rewards(instances, arms, seed)
    fn = covrl_sweep(steps)
    rj = jax.device_put(r)
    start = time.perf_counter()
    z_covrl = np.asarray(fn(rj))
    compile_s = time.perf_counter() - start
    z_numpy = numpy_sweep(r, steps)
    gap = float(np.abs(_softmax(z_covrl) - _softmax(z_numpy)).max())
    if not gap < 1e-4:
      raise AssertionError(f"tabular sweep {name}: covrl and NumPy policies differ by {gap:.2e}.")
    log(f"  sweep {name} {instances}x{arms}x{steps}: {repeats} interleaved repeats")
    t = common.interleaved(
        {"covrl": lambda fn=fn, rj=rj: fn(rj).block_until_ready(),
         "numpy": lambda r=r, steps=steps: numpy_sweep(r, steps)},
        rounds=repeats, target_s=0.0, warmup=0)
    work = instances * steps
    rows.append({
        "size": name, "instances": instances, "arms": arms, "steps": steps,
        "covrl": t["covrl"].as_dict(), "numpy": t["numpy"].as_dict(),
        "covrl_first_call_s": compile_s,
        "speedup_vs_numpy": common.paired_ratio(t["numpy"], t["covrl"])["median"],
        "covrl_instance_steps_per_s": work / t["covrl"].median,
        "numpy_instance_steps_per_s": work / t["numpy"].median,
        "max_policy_difference": gap,
    })
  return {"rows": rows, "eta": ETA, "alpha": ALPHA}
