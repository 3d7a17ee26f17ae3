"""Named methods: presets of scorer, allocation and reconstruction over the shared pipeline."""

from __future__ import annotations

from typing import Any

from ..config import PruneConfig

METHODS: dict[str, dict[str, Any]] = {
    # STRUPRUNE: calibration-aware scores, allocation, least-squares (or ADMM) reconstruction.
    "structprune": {"scorer": "wanda"},
    # Baselines (uniform allocation, no reconstruction, FFN neurons only as in the published
    # Wanda-sp / random structured figures of PROTOCOL comparisons).
    "wanda-sp": {"scorer": "wanda", "allocation": "uniform", "reconstruction": "none", "rho": 0.0},
    "magnitude": {"scorer": "magnitude", "allocation": "uniform", "reconstruction": "none", "rho": 0.0},
    "random": {"scorer": "random", "allocation": "uniform", "reconstruction": "none", "rho": 0.0},
    # FLAP (An et al., AAAI 2024): fluctuation metric, global standardised ranking of heads and
    # neurons, bias compensation, no re-fit (flap.py).
    "flap": {"scorer": "flap", "allocation": "flap", "reconstruction": "none", "bias_compensation": True},
    # The O(N) reference: whole model on the device, global first-order Taylor ranking.
    "global": {"scope": "global", "reconstruction": "none"},
}


def method_config(name: str, **overrides: Any) -> PruneConfig:
    """The PruneConfig of a named method; `overrides` (not None) take precedence."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; choose one of {sorted(METHODS)}")
    fields = {**METHODS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return PruneConfig(**fields)
