"""Budget and bound checks shared by the allocation tests (tests/test_allocation_*.py)."""

from __future__ import annotations

import math

from hypothesis import strategies as st


REL = 1e-9


def _budget_ok(kept, params, sparsity):
    got = math.fsum(k * p for k, p in zip(kept, params))
    want = (1 - sparsity) * math.fsum(params)
    return abs(got - want) <= REL * math.fsum(params)


def _bounds_ok(kept, max_sparsity, min_sparsity=0.0):
    return all(1 - max_sparsity - 1e-12 <= k <= 1 - min_sparsity + 1e-12 for k in kept)


sizes = st.integers(min_value=1, max_value=10_000_000)
