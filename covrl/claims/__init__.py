"""Checks of the claims of THEORY.md: see `covrl.claims.registry`."""

from covrl.claims.registry import (
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
