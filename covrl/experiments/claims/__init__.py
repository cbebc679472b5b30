"""Checks of the claims of THEORY.md: see `covrl.experiments.claims.registry`."""

from covrl.experiments.claims.registry import (
    CLAIM_MODULES,
    Claim,
    ClaimResult,
    Measurement,
    claims,
    get,
    register,
    run,
)

__all__ = [
    "CLAIM_MODULES",
    "Claim",
    "ClaimResult",
    "Measurement",
    "claims",
    "get",
    "register",
    "run",
]
