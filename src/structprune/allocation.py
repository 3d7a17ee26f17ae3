"""Allocation: how much of each prunable module (one layer's attention or MLP) to keep.

Pure functions: per-module parameter counts (and importances) in, kept fractions out.
A module is one (layer, kind) pair, kind in {"attn", "mlp"}. A kept fraction is the
fraction of that module's prunable linear weight parameters that survive. The budget is
met when sum(kept_m * params_m) == (1 - sparsity) * sum(params_m) over all modules.
"""

from __future__ import annotations

from collections.abc import Sequence


def uniform(params: Sequence[int], sparsity: float) -> list[float]:
    """Every module keeps the same fraction 1 - sparsity of its parameters."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} is invalid: must lie in [0, 1]")
    return [1.0 - sparsity for _ in params]
