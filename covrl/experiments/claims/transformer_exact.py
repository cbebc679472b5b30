"""THEORY.md "T2/T3 in a network, exactly": the stationary-point theorems in a transformer, checked
where their assumptions hold, registered on import.

A transformer policy on an enumerable response tree (`covrl.transformer.tree`), trained with exact
expected updates (`covrl.transformer.exact`): the policy class represents the stationary point
(every node's distribution is the network's softmax), training reaches it, and the evaluation is
exact, in float64, against references computed from the reward table alone. T2.tf in `exact_t2`;
T3.3.tf, T3.4.tf and T3.5.tf in `exact_t3`; their runs in `exact_runs`, the references in
`exact_references`.
"""

# They register their claims when imported.
from covrl.experiments.claims import exact_t2, exact_t3  # noqa: F401
