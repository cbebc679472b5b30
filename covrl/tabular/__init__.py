"""The tabular lab: softmax policies over bandits, where every quantity has a closed form.

A `TabularConfig` picks the problem (`bandits`), the dynamics (exact PG, natural PG, expected
GRPO, or sampled PG with PPO epochs and mini-batches on covrl's token losses) and the control (a
covrl control value); `make_train(config)` returns a pure `train(key)` scanned with `lax.scan`,
to jit, vmap over seeds and hyperparameter grids (`hyperparams`), and shard over devices (`run`).
`make_controlled_train` puts a `covrl.controllers` controller in the loop; `theory` holds the
closed forms the claims compare with.

Example:
  >>> import jax, covrl
  >>> from covrl import tabular
  >>> cfg = tabular.TabularConfig(tabular.Bandit((1.0, 0.5, 0.0)), dynamics="pg",
  ...                             control=covrl.EntropyBonus(0.5), step_size=1.0,
  ...                             num_steps=2000, record_every=500)
  >>> result = jax.jit(tabular.make_train(cfg))(jax.random.key(0))
  >>> result.gap.shape
  (5,)

References:
  J. Mei et al., On the Global Convergence Rates of Softmax Policy Gradient Methods, ICML 2020.
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs, arXiv:2505.22617 (2025).
"""

from covrl.tabular import bandits, dynamics, theory
from covrl.tabular.bandits import Bandit
from covrl.tabular.config import Hyperparams, TabularConfig, hyperparams
from covrl.tabular.controlled import (
    ControlledResult,
    compiled_controlled,
    make_controlled_train,
    run_controlled,
    summarize,
    tracking_error,
)
from covrl.tabular.dynamics import TrainState
from covrl.tabular.train import TrainResult, compiled_runs, data_mesh, init_state, make_train, run

__all__ = [
    "Bandit",
    "ControlledResult",
    "Hyperparams",
    "TabularConfig",
    "TrainResult",
    "TrainState",
    "bandits",
    "compiled_controlled",
    "compiled_runs",
    "data_mesh",
    "dynamics",
    "hyperparams",
    "init_state",
    "make_controlled_train",
    "make_train",
    "run",
    "run_controlled",
    "summarize",
    "theory",
    "tracking_error",
]
