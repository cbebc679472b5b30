"""One process of the two-process GRPO run of tests/test_transformer_multihost.py.

Usage: python _transformer_multihost_worker.py PORT PROCESS_ID OUT.npz
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from covrl.transformer import Trainer, init_params, lab  # noqa: E402

NUM_STEPS = 2


def main(port: str, process_id: str, out: str) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(process_id))
  assert jax.device_count() == 2 and jax.local_device_count() == 1
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  config = lab.lab_config("test")
  trainer = Trainer(config, mesh)
  # Fresh parameters (no warm start): what is tested is the distributed step.
  state = trainer.init(jax.random.key(0), init_params(config.model, jax.random.key(1)))
  responses, rewards = [], []
  for _ in range(NUM_STEPS):
    state, metrics, aux = trainer.step(state)
    responses.append(multihost_utils.process_allgather(aux.rollout.responses, tiled=True))
    rewards.append(float(metrics["reward"]))
  params = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
            jax.tree_util.tree_leaves_with_path(state.params)}
  np.savez(out, responses=np.stack(responses), rewards=np.asarray(rewards), **params)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
