"""The tabular theory lab's claims (THEORY.md T1-T3), registered on import.

T1 (entropy change is a covariance) in `tabular_t1`, T2 (the entropy bonus's biased fixed point)
in `tabular_t2`, T3 (covariance control: sparse, and unbiased when annealed) in `tabular_t3`.
"""

from covrl.claims import tabular_t1, tabular_t2, tabular_t3  # noqa: F401  (they register)
