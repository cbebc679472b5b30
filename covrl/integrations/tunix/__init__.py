"""covrl's control values as tunix policy losses (google-tunix 0.1.7, Flax NNX).

tunix runs a policy loss from its registry (`tunix.rl.function_registry`), named by the learner's
config, inside its jitted train step as `loss_fn(model, train_example, algo_config=..., pad_id=...,
eos_id=...) -> (loss, aux)`; the loss runs the model, so the full-vocabulary logits are at hand.
`register(control)` makes any covrl control value (`covrl.KLCov()`, `covrl.EntropyBonus(1e-3)`,
`covrl.method(name, ...)`) such a loss: tunix's train example in, `covrl.policy_loss(control, ...)`
and its metrics out, logged by tunix::

    name = register(covrl.KLCov.paper_7b())
    learner = GRPOLearner(rl_cluster, GRPOConfig(policy_loss_fn=name, beta=0.0, ...), reward)
    install(learner)            # covrl's metrics logged; exact selection under accumulation
    learner.train(dataset)

What the loss sees. With `train_micro_batch_size` < `mini_batch_size` tunix accumulates the
gradients of k micro-batches (optax.MultiSteps averages them) and calls the loss once per
micro-batch: a registered loss alone selects Clip-Cov's and KL-Cov's tokens per micro-batch and
normalises by the micro-batch's own count (verl's behaviour, its issue 7829). `install(learner)`
makes the step exact: it holds back the k micro-batches of one optimizer step, selects once over
all of them with the current parameters (`covrl.select_tokens`; one forward pass per micro-batch,
without gradients), and gives each micro-batch its rows of the selection and the mini-batch's
denominator divided by k: the averaged gradient and the logged loss are those of one loss over
the mini-batch, and the logged token means (fractions, entropy, KL) and a selecting method's
cov_mean / cov_max are the mini-batch's. A control with `selection="local"` then selects per
group of its `micro_batch_size` rows (None: per tunix micro-batch) under the mini-batch's
denominator. `install(learner, selection="local")` keeps tunix's per-micro-batch losses (logged:
the micro-batches' means). Either way `install` passes the optimizer step (for scheduled
strengths) and keys a random selection by (seed, step, micro-batch): `step_key`.

Not supported yet: sequence packing (`max_seq_token_per_tpu`), the sampler importance weights
(`sampler_is`), PPO's `kl_coef` reference penalty, multi-host meshes (untested).
"""

from covrl.integrations.tunix.accumulation import install
from covrl.integrations.tunix.losses import (
    LOGGED,
    TUNIX_LOSS_AGG_MODES,
    RegisteredLoss,
    StepInputs,
    register,
    registered,
    step_key,
)

__all__ = [
    "LOGGED",
    "RegisteredLoss",
    "StepInputs",
    "TUNIX_LOSS_AGG_MODES",
    "install",
    "register",
    "registered",
    "step_key",
]
