"""Global-exact against local selection on 8 simulated CPU devices.

Run as a subprocess (`python -m benchmarks.sharded --sizes small,large --rounds N`) with
XLA_FLAGS=--xla_force_host_platform_device_count=8, so that the parent keeps one device. Prints
one JSON object on its last line.

The batch is split by rows over a "data" mesh axis and each loss runs in `jax.shard_map` with
axis_name="data", forward plus backward:
  global  selection="global": the batch means are psum'd, each device ranks its tokens, the
          per-device top-K lists (K values each) are all-gathered and the final top-K taken over
          them, which is exact;
  local   selection="local": verl's behaviour, every statistic and the top-K per device.
PPO (no selection) runs alongside as the floor. All 8 "devices" share this machine's cores, so
absolute times say little; the ratio global / local is the figure of interest.
"""

from __future__ import annotations

import argparse
import json

NUM_DEVICES = 8


def _measure(sizes: list[str], rounds: int, seed: int) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from benchmarks import common
  from benchmarks import contestants as C
  from benchmarks import inputs as I
  from benchmarks.losses import SIZES

  if jax.device_count() != NUM_DEVICES:
    raise RuntimeError(f"expected {NUM_DEVICES} devices, got {jax.device_count()}; set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={NUM_DEVICES}.")
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  s = C.Settings()
  out = {"devices": NUM_DEVICES, "rows": []}
  for size in sizes:
    batch, time = SIZES[size]
    arrays = [jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("data")))
              for a in C.policy_data(I.policy_inputs(batch, time, seed))]
    key = jax.random.key(seed)
    group = {}
    for name, selection in (("ppo", None), ("clip_cov", "global"), ("clip_cov", "local"),
                            ("kl_cov", "global"), ("kl_cov", "local")):
      kwargs = {} if selection is None else {"selection": selection}
      group[name if selection is None else f"{selection}/{name}"] = _sharded_call(
          name, s, kwargs, mesh, key, arrays)
    t = common.interleaved(group, rounds=rounds)
    for name in ("clip_cov", "kl_cov"):
      g, l = t[f"global/{name}"], t[f"local/{name}"]
      out["rows"].append({
          "size": size, "loss": name, "tokens": batch * time, "global": g.as_dict(),
          "local": l.as_dict(), "ppo": t["ppo"].as_dict(),
          "global_over_local": common.paired_ratio(g, l)["median"],
          "global_over_ppo": common.paired_ratio(g, t["ppo"])["median"],
      })
  return out


def _sharded_call(name, s, kwargs, mesh, key, arrays):
  import jax
  from jax.sharding import PartitionSpec as P

  from benchmarks import contestants as C

  loss_fn = C.covrl_policy_loss(name, s, axis_name="data", **kwargs)

  def per_device(key, old, lp, adv, mask):
    f = lambda lp: loss_fn(key, old, lp, adv, mask)
    (_, metrics), grad = jax.value_and_grad(f, has_aux=True)(lp)
    return metrics["loss"], grad, metrics

  fn = jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data"), P("data")),
      out_specs=(P(), P("data"), P())))
  return lambda: jax.block_until_ready(fn(key, *arrays))[:2]


def run(sizes=("small", "large"), rounds: int = 15, seed: int = 0, timeout_s: float = 900) -> dict:
  """Run `_measure` in a subprocess with 8 simulated devices and return its JSON."""
  from benchmarks import common

  args = ["--sizes", ",".join(sizes), "--rounds", str(rounds), "--seed", str(seed)]
  return common.run_module_with_devices("benchmarks.sharded", args, NUM_DEVICES,
                                        timeout_s=timeout_s)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="small,large")
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  print(json.dumps(_measure(a.sizes.split(","), a.rounds, a.seed)))


if __name__ == "__main__":
  main()
