"""allocation/closed_form.py: the relaxed mask and the closed-form unit scores against brute force; the closed-form rule's budget."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from allocation_checks import _bounds_ok, _budget_ok, sizes

from structprune import allocation as A


def _golden_min(f, lo, hi, iters=200):
    a, b = lo, hi
    for _ in range(iters):
        c = b - (b - a) / 1.618033988749895
        d = a + (b - a) / 1.618033988749895
        if f(c) < f(d):
            b = d
        else:
            a = c
    return (a + b) / 2


def test_relaxed_mask_is_the_scalar_minimiser():
    g = torch.Generator().manual_seed(2)
    c, b, d, z = (torch.randn(50, generator=g, dtype=torch.float64) * s for s in (3, 3, 1, 1))
    s = A.relaxed_mask(c, b, d, z)
    for i in range(50):
        f = lambda m: float((c[i] * m - b[i]) ** 2 + (d[i] * m - z[i]) ** 2)
        grid = torch.linspace(-20, 20, 4001, dtype=torch.float64)
        m0 = float(grid[torch.tensor([f(float(m)) for m in grid]).argmin()])
        m = _golden_min(f, m0 - 0.02, m0 + 0.02)
        assert float(s[i]) == pytest.approx(m, rel=1e-6, abs=1e-7)
    assert float(A.relaxed_mask(0.0, 1.0, 0.0, 1.0)) == 0.0


def _stats(xp, xd):
    ones = torch.ones(xp.shape[0], 1, dtype=torch.float64)
    xpa, xda = torch.cat([xp, ones], 1), torch.cat([xd, ones], 1)
    return xpa.T @ xpa, xda.T @ xpa, xda.T @ xda


def _data(n_tok=400, n=12, out=5, seed=3, two_streams=False):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) + 2 * torch.eye(n, dtype=torch.float64)
    xd = torch.randn(n_tok, n, generator=g, dtype=torch.float64) @ mix + 0.5
    xp = xd + 0.3 * torch.randn(n_tok, n, generator=g, dtype=torch.float64) if two_streams else xd
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    return xp, xd, w


def _brute_force_scores(xp, xd, w, units, d, z, damp, has_bias):
    """Build R_j from the data with an explicit ridge refit, then minimise the scalar objective."""
    n_tok, n = xp.shape
    ones = torch.ones(n_tok, 1, dtype=torch.float64)
    xpa = torch.cat([xp, ones], 1)
    y = xd @ w.T  # dense target (a bias would be refitted exactly, see has_bias)
    free = list(range(n)) + ([n] if has_bias else [])
    g_ff = (xpa.T @ xpa)[free][:, free]
    lam = damp * float(torch.diagonal(g_ff).mean())
    out = []
    for j, cols in enumerate(units):
        others = [k for k in free if k not in cols.tolist()]
        xa = xpa[:, others]
        refit = torch.linalg.solve(xa.T @ xa + lam * torch.eye(len(others), dtype=torch.float64), xa.T @ y)
        r = y - xa @ refit
        u = xp[:, cols] @ w[:, cols].T
        c = math.sqrt(float((u * u).sum()) / n_tok)
        f = lambda m: float(((r - m * u) ** 2).sum()) / n_tok + (d * c) ** 2 * (m - z[j]) ** 2
        grid = torch.linspace(-3, 3, 601).tolist()
        m0 = min(grid, key=f)
        out.append(_golden_min(f, m0 - 0.01, m0 + 0.01))
    return torch.tensor(out, dtype=torch.float64)


HEADS = [torch.arange(0, 3), torch.arange(3, 6), torch.arange(6, 9), torch.arange(9, 12)]


MIXED = [torch.tensor([0, 5, 7]), torch.tensor([3]), torch.tensor([1, 2, 4, 6, 8, 9]), torch.tensor([11, 10])]


@pytest.mark.parametrize("two_streams", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("d", [0.0, 0.7])
@pytest.mark.parametrize("units", [HEADS, MIXED], ids=["heads", "mixed"])
def test_closed_form_scores_equal_brute_force(two_streams, has_bias, d, units):
    xp, xd, w = _data(two_streams=two_streams)
    z = torch.tensor([1.0, 0.5, 0.0, 0.9], dtype=torch.float64)
    gram, cross, gram_d = _stats(xp, xd)
    s = A.closed_form_unit_scores(w, gram, cross, gram_d, xp.shape[0], units, z=z, d=d, damp=0.05, has_bias=has_bias)
    want = _brute_force_scores(xp, xd, w, units, d, z, 0.05, has_bias)
    assert s.shape == (4,)
    assert torch.allclose(s, want, atol=1e-6), (s, want)


def test_closed_form_scores_single_stream_are_inverse_variance_inflation():
    xp, xd, w = _data(n_tok=2000)
    gram, cross, gram_d = _stats(xp, xd)
    units = [torch.tensor([j]) for j in range(12)]
    s = A.closed_form_unit_scores(w, gram, cross, gram_d, 2000, units, d=0.0, damp=1e-10, has_bias=False)
    g = gram[:12, :12]
    vif = torch.diagonal(g) * torch.diagonal(torch.linalg.inv(g))
    assert torch.allclose(s, 1 / vif, rtol=1e-6)
    assert ((s > 0) & (s < 1)).all()


def test_closed_form_scores_see_redundancy_and_dead_units():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 1e-3 * torch.randn(500, generator=g, dtype=torch.float64)  # a near copy
    x[:, 5] = 0.0  # a dead input
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    gram, cross, gram_d = _stats(x, x)
    units = [torch.tensor([j]) for j in range(6)]
    s = A.closed_form_unit_scores(w, gram, cross, gram_d, 500, units, d=0.0, damp=1e-8)
    assert s[0] < 0.01 and s[1] < 0.01  # either copy can take over the other's output
    assert (s[2:5] > 0.9).all()  # independent inputs cannot be compensated
    assert s[5] == 0.0  # contributes nothing: not needed
    # Dense start with the ADMM term: s = (b/c + d^2) / (1 + d^2).
    s1 = A.closed_form_unit_scores(w, gram, cross, gram_d, 500, units, d=1.0, damp=1e-8)
    assert torch.allclose(s1, (s + 1) / 2)


def test_closed_form_scores_bad_arguments():
    xp, xd, w = _data()
    gram, cross, gram_d = _stats(xp, xd)
    units = [torch.arange(0, 6), torch.arange(6, 12)]
    with pytest.raises(ValueError, match="unit_cols"):
        A.closed_form_unit_scores(w, gram, cross, gram_d, 400, [torch.tensor([12])])
    with pytest.raises(ValueError, match="gram"):
        A.closed_form_unit_scores(w, gram[:5, :5], cross, gram_d, 400, units)
    with pytest.raises(ValueError, match="z has shape"):
        A.closed_form_unit_scores(w, gram, cross, gram_d, 400, units, z=torch.ones(3))
    with pytest.raises(ValueError, match="count=0"):
        A.closed_form_unit_scores(w, gram, cross, gram_d, 0, units)


def test_closed_form_allocation():
    scores = [torch.tensor([0.9, 1.2, 0.8]), torch.tensor([0.2, 0.4]), torch.tensor([0.5, -0.1, 0.6, 0.6])]
    params = [300, 200, 400]
    retention = [0.9, 0.3, 0.425]  # means of the scores clipped to [0, 1]
    for method in A.BUDGET_METHODS:
        kept = A.closed_form(scores, params, 0.4, method=method)
        assert _budget_ok(kept, params, 0.4)
        assert kept[0] > kept[2] > kept[1]  # the order of the retention ratios survives
    kept = A.closed_form(scores, params, 0.4)  # "scale-kept": proportional to retention
    assert [k / r for k, r in zip(kept, retention)] == pytest.approx([kept[0] / retention[0]] * 3)
    with pytest.raises(ValueError, match=r"unit_scores\[1\]"):
        A.closed_form([torch.ones(2), torch.tensor([])], [1, 1], 0.3)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.floats(-1, 2), min_size=1, max_size=8), min_size=n, max_size=n),
    st.lists(sizes, min_size=n, max_size=n),
    st.floats(0.0, 0.9),
)))
def test_closed_form_budget_property(case):
    scores, params, sparsity = case
    kept = A.closed_form([torch.tensor(s) for s in scores], params, sparsity)
    assert _budget_ok(kept, params, sparsity)
    assert _bounds_ok(kept, 0.9)
