"""Whole tabular runs: `make_train(config) -> train(key)`, and `run` for batches over devices."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from covrl.progress import Progress
from covrl.tabular import dynamics as dyn
from covrl.tabular.config import Hyperparams, TabularConfig


class TrainResult(NamedTuple):
  """What a run returns; records are taken at steps 0, m, 2m, ..., T (m = record_every).

  Attributes:
    logits: [S, K] final logits.
    steps: [R + 1] recorded steps.
    gap: [R + 1] optimality gap E_s max_a r - E_s pi_s . r (mean rewards, exact).
    entropy: [R + 1] E_s H(pi_s).
    policy: [R + 1, S, K] policies.
    selected_frac: [R + 1] mean fraction of tokens Clip-Cov/KL-Cov selected over the block that
      ends at the record (0 at step 0 and for other controls).
    clip_frac: [R + 1] mean PPO clip fraction over the block (sampled dynamics).
  """

  logits: jax.Array
  steps: jax.Array
  gap: jax.Array
  entropy: jax.Array
  policy: jax.Array
  selected_frac: jax.Array
  clip_frac: jax.Array


def check_dtype(config: TabularConfig) -> None:
  """Raise unless the config's dtype is available (float64 needs 64-bit JAX)."""
  if config.dtype == "float64" and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
    raise ValueError("dtype='float64' needs 64-bit JAX: build and run inside "
                     "`with jax.enable_x64(True):` (`jax.experimental.enable_x64()` on JAX 0.7).")


def init_state(config: TabularConfig, key: jax.Array, hyper: Hyperparams | None = None
               ) -> dyn.TrainState:
  """The initial loop state: the hyperparameters' initial logits, step 0."""
  hyper = config.hyperparams() if hyper is None else hyper
  hyper = jax.tree.map(lambda x: jnp.asarray(x, config.jnp_dtype), hyper)
  return dyn.TrainState(hyper.init_logits, key, jnp.zeros((), jnp.int32), hyper)


def _record(config: TabularConfig, state: dyn.TrainState, selected, clipped):
  gap, ent, pi = dyn.records(config, state.logits)
  return state.step, gap, ent, pi, selected, clipped


def advance(config: TabularConfig, state: dyn.TrainState, num_records: int):
  """`num_records` blocks of `record_every` steps: (state, the records of each block)."""
  check_dtype(config)
  step = dyn.make_step(config)

  def block(state: dyn.TrainState, _):
    key, bits = dyn.block_bits(config, state.key)
    if bits is None:
      state, (selected, clipped) = lax.scan(lambda s, _: step(s, None), state, None,
                                            length=config.record_every)
    else:
      state, (selected, clipped) = lax.scan(step, state._replace(key=key), bits)
    return state, _record(config, state, jnp.mean(selected), jnp.mean(clipped))

  return lax.scan(block, state, None, length=num_records)


def _initial_record(config: TabularConfig, state: dyn.TrainState) -> tuple[jax.Array, ...]:
  zero = jnp.zeros((), state.logits.dtype)
  return _record(config, state, zero, zero)


def make_train(config: TabularConfig) -> Callable[..., TrainResult]:
  """Build `train(key, hyper=None) -> TrainResult`, a pure function of its arguments.

  Args:
    config: the run's configuration (validated when it was built).

  Returns:
    train(key, hyper=None): `key` a PRNG key (unused by exact dynamics), `hyper` optional
    `Hyperparams` overriding the config's step size, coefficient and initial logits. Jit it,
    vmap it over keys and hyperparameters; `run` does both, sharded, with progress.
  """
  check_dtype(config)

  def train(key: jax.Array, hyper: Hyperparams | None = None) -> TrainResult:
    state = init_state(config, key, hyper)
    first = _initial_record(config, state)
    state, rest = advance(config, state, config.num_records)
    return TrainResult(state.logits, *(
        jnp.concatenate([f[None], r], axis=0) for f, r in zip(first, rest)))

  return train


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis "data" over the first `num_devices` devices (all by default)."""
  devices = jax.devices()
  num = len(devices) if num_devices is None else num_devices
  if not 1 <= num <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num}.")
  return jax.make_mesh((num,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:num])


def _chunk_records(num_records: int, target: int) -> int:
  """The largest divisor of num_records that is at most target (so every chunk compiles once)."""
  best = 1
  for d in range(1, min(num_records, max(target, 1)) + 1):
    if num_records % d == 0:
      best = d
  return best


@functools.lru_cache(maxsize=64)
def compiled_runs(config: TabularConfig, per_chunk: int):
  """Jitted, vmapped (start, advance-one-chunk) of a config, cached: a config compiles once per
  process however many times it is run (configs are frozen and hashable; the initial logits, step
  size and coefficient that vary between runs are traced Hyperparams).

  `start(keys, hyper) -> (state, first record)`, `advance(state) -> (state, records)` of
  `per_chunk` records; what `run` calls (and a timing harness may call directly)."""

  def start(key, hyper):
    state = init_state(config, key, hyper)
    return state, _initial_record(config, state)

  return (jax.jit(jax.vmap(start)),
          jax.jit(jax.vmap(lambda state: advance(config, state, per_chunk))))


def run(
    config: TabularConfig,
    keys: jax.Array,
    hyper: Hyperparams | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool | str = False,
    num_chunks: int = 10,
) -> TrainResult:
  """Run a batch of trainings (one per key), sharded over a "data" mesh, chunk by chunk.

  The batch is vmapped; with `mesh`, its leading axis is sharded over the mesh's "data" axis and
  XLA runs each device's share (the runs are independent, so the results equal a one-device
  run's). The scan is cut into about `num_chunks` compiled chunks, and progress is reported
  between them (never from inside the compiled code).

  Args:
    config: the configuration.
    keys: [n] PRNG keys, one per run.
    hyper: optional Hyperparams with a leading axis of length n (see `hyperparams`).
    mesh: optional mesh with a "data" axis whose size divides n.
    progress: False, True, or a label for a progress line on stderr.
    num_chunks: about how many compiled chunks to run (each reports progress). The compiled
      functions are cached per (config, chunk length): running a config again, with other keys,
      initial logits, step sizes or coefficients, does not recompile.

  Returns:
    TrainResult with a leading axis of length n.
  """
  check_dtype(config)
  n = keys.shape[0]
  if hyper is None:
    hyper = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), config.hyperparams())
  for name, value in zip(Hyperparams._fields, hyper):
    if jnp.shape(value)[:1] != (n,):
      raise ValueError(f"hyper.{name} needs a leading axis of length {n}, got "
                       f"{jnp.shape(value)}.")
  if mesh is not None:
    size = mesh.shape["data"]
    if n % size:
      raise ValueError(f"the batch of {n} runs must divide evenly over {size} devices.")
    shard = NamedSharding(mesh, P("data"))
    keys, hyper = jax.device_put((keys, hyper), shard)
  per_chunk = _chunk_records(config.num_records, -(-config.num_records // max(num_chunks, 1)))
  start, advance_chunk = compiled_runs(config, per_chunk)
  state, first = start(keys, hyper)
  label = progress if isinstance(progress, str) else f"{config.dynamics}/{config.control.label}"
  bar = Progress(config.num_steps, label) if progress else None
  chunks = []
  for _ in range(config.num_records // per_chunk):
    state, rec = advance_chunk(state)
    chunks.append(rec)
    if bar is not None:
      jax.block_until_ready(rec)
      bar.update(per_chunk * config.record_every)
  rest = [jnp.concatenate([c[i] for c in chunks], axis=1) for i in range(len(first))]
  return TrainResult(state.logits, *(
      jnp.concatenate([f[:, None], r], axis=1) for f, r in zip(first, rest)))
