"""The transformer lab's claims, registered on import: the theory checks T1.7, T1.8.tf and
T3.6.tf in `transformer_theory`, Cui et al.'s findings T4.1-T4.3 in `transformer_t4`.
"""

# They register their claims when imported.
from covrl.experiments.claims import transformer_theory  # noqa: F401
from covrl.experiments.claims.transformer_t4 import claim_comparison, lab_comparison

__all__ = ["claim_comparison", "lab_comparison"]
