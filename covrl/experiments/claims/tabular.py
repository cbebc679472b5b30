"""The tabular theory lab's claims (THEORY.md T1-T3), registered on import.

T1 (entropy change is a covariance) in `tabular_t1` and `tabular_t1_cases`, T2 (the entropy
bonus's biased fixed point) in `tabular_t2` and `tabular_t2_rates`, T3 (covariance control:
sparse, and unbiased when annealed) in `tabular_t3` and `tabular_t3_annealing`.
"""

# They register their claims when imported.
from covrl.experiments.claims import (  # noqa: F401
    tabular_t1,
    tabular_t1_cases,
    tabular_t2,
    tabular_t2_rates,
    tabular_t3,
    tabular_t3_annealing,
)
