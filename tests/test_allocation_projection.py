"""allocation/projection.py: `meet_budget` puts any proposal on the budget within the limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from allocation_checks import _bounds_ok, _budget_ok, sizes

from structprune import allocation as A


modules = st.integers(min_value=1, max_value=40)


@st.composite
def budget_case(draw):
    n = draw(modules)
    params = draw(st.lists(sizes, min_size=n, max_size=n))
    kept = draw(st.lists(st.floats(-0.5, 1.5), min_size=n, max_size=n))
    max_s = draw(st.floats(0.05, 1.0))
    min_s = draw(st.floats(0.0, max_s))
    sparsity = draw(st.floats(min_s, max_s))
    return kept, params, sparsity, max_s, min_s


@settings(max_examples=300, deadline=None)
@given(budget_case(), st.sampled_from(A.BUDGET_METHODS))
def test_meet_budget_exact_and_within_limits(case, method):
    kept, params, sparsity, max_s, min_s = case
    out = A.meet_budget(kept, params, sparsity, max_s, min_s, method=method)
    assert len(out) == len(params)
    assert _budget_ok(out, params, sparsity)
    assert _bounds_ok(out, max_s, min_s)


@pytest.mark.parametrize("method", A.BUDGET_METHODS)
def test_meet_budget_keeps_a_feasible_proposal(method):
    params = [10, 20, 30]
    kept = [0.5, 0.8, 0.7]
    sparsity = 1 - (5 + 16 + 21) / 60
    out = A.meet_budget(kept, params, sparsity, method=method)
    assert out == pytest.approx(kept, abs=1e-12)


def test_meet_budget_shapes():
    params = [100, 100, 100]
    shift = A.meet_budget([0.9, 0.8, 0.7], params, 0.3, method="shift")
    assert shift == pytest.approx([0.8, 0.7, 0.6])
    scale = A.meet_budget([0.9, 0.8, 0.7], params, 0.4, method="scale")  # pruned 0.1:0.2:0.3 -> doubled
    assert scale == pytest.approx([0.8, 0.6, 0.4])
    kept = A.meet_budget([0.9, 0.6, 0.3], params, 0.4, method="scale-kept")
    assert kept == pytest.approx([0.9, 0.6, 0.3])
    kept = A.meet_budget([0.9, 0.6, 0.3], params, 0.7, method="scale-kept")
    assert kept == pytest.approx([0.45, 0.3, 0.15])


def test_meet_budget_scale_falls_back_to_shift_when_saturated():
    # Only one module proposes any pruning; it saturates at max_sparsity, the rest must follow.
    out = A.meet_budget([0.0, 1.0, 1.0], [1, 1, 1], 0.5, max_sparsity=0.9, method="scale")
    assert out[0] == pytest.approx(0.1)
    assert _budget_ok(out, [1, 1, 1], 0.5)
    assert out[1] == pytest.approx(out[2])


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(sparsity=0.95, max_sparsity=0.9), "sparsity=0.95"),
        (dict(sparsity=0.1, max_sparsity=0.9, min_sparsity=0.2), "sparsity=0.1"),
        (dict(sparsity=1.5), "sparsity=1.5"),
        (dict(sparsity=0.3, max_sparsity=0.2, min_sparsity=0.5), "min_sparsity=0.5"),
    ],
)
def test_meet_budget_infeasible_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        A.meet_budget([0.5, 0.5], [1, 1], **kwargs)


def test_meet_budget_bad_inputs():
    with pytest.raises(ValueError, match="params"):
        A.meet_budget([0.5], [1, 2], 0.3)
    with pytest.raises(ValueError, match="params"):
        A.meet_budget([0.5, 0.5], [0, 0], 0.3)
    with pytest.raises(ValueError, match="kept"):
        A.meet_budget([float("nan")], [1], 0.3)
    with pytest.raises(ValueError, match="method='bogus'"):
        A.meet_budget([0.5], [1], 0.3, method="bogus")
