"""Allocation rules: budgets, limits, the closed form against brute force, temperature search."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structprune import allocation as A

REL = 1e-9


def _budget_ok(kept, params, sparsity):
    got = math.fsum(k * p for k, p in zip(kept, params))
    want = (1 - sparsity) * math.fsum(params)
    return abs(got - want) <= REL * math.fsum(params)


def _bounds_ok(kept, max_sparsity, min_sparsity=0.0):
    return all(1 - max_sparsity - 1e-12 <= k <= 1 - min_sparsity + 1e-12 for k in kept)


modules = st.integers(min_value=1, max_value=40)
sizes = st.integers(min_value=1, max_value=10_000_000)


@st.composite
def budget_case(draw):
    n = draw(modules)
    params = draw(st.lists(sizes, min_size=n, max_size=n))
    kept = draw(st.lists(st.floats(-0.5, 1.5), min_size=n, max_size=n))
    max_s = draw(st.floats(0.05, 1.0))
    min_s = draw(st.floats(0.0, max_s))
    sparsity = draw(st.floats(min_s, max_s))
    return kept, params, sparsity, max_s, min_s


# --------------------------------------------------------------------------- budget


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


def test_uniform_unchanged():
    assert A.uniform([1, 2, 3], 0.25) == [0.75, 0.75, 0.75]
    with pytest.raises(ValueError, match="sparsity=-0.1"):
        A.uniform([1], -0.1)


# --------------------------------------------------------------------------- softmax rules


@st.composite
def softmax_case(draw):
    n = draw(st.integers(1, 40))
    params = draw(st.lists(sizes, min_size=n, max_size=n))
    importance = draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n))
    max_s = draw(st.floats(0.1, 1.0))
    sparsity = draw(st.floats(0.0, max_s))
    temperature = draw(st.floats(1e-3, 1e3))
    kinds = draw(st.lists(st.sampled_from(A.KINDS), min_size=n, max_size=n))
    layers = [i // 2 for i in range(n)]
    return importance, params, sparsity, temperature, max_s, kinds, layers


@settings(max_examples=200, deadline=None)
@given(softmax_case())
def test_softmax_energy_budget_property(case):
    importance, params, sparsity, t, max_s, _, _ = case
    out = A.softmax_energy(importance, params, sparsity, t, max_s)
    assert _budget_ok(out, params, sparsity)
    assert _bounds_ok(out, max_s)


@settings(max_examples=200, deadline=None)
@given(softmax_case(), st.floats(0.1, 10.0), st.floats(-3.0, 3.0))
def test_softmax_modular_budget_property(case, rho, gamma):
    importance, params, sparsity, t, max_s, kinds, layers = case
    out = A.softmax_modular(importance, params, kinds, layers, sparsity, t, rho, gamma, max_s)
    assert _budget_ok(out, params, sparsity)
    assert _bounds_ok(out, max_s)


def _modules(n_layers=6):
    g = torch.Generator().manual_seed(0)
    importance = (1 + 0.3 * torch.randn(2 * n_layers, generator=g)).tolist()
    params = [4 * 576 * 576 if i % 2 == 0 else 3 * 576 * 1536 for i in range(2 * n_layers)]
    kinds = ["attn" if i % 2 == 0 else "mlp" for i in range(2 * n_layers)]
    layers = [i // 2 for i in range(2 * n_layers)]
    return importance, params, kinds, layers


@pytest.mark.parametrize("t", [math.inf, 1e12])
def test_infinite_temperature_is_uniform(t):
    importance, params, kinds, layers = _modules()
    want = A.uniform(params, 0.3)
    assert A.softmax_energy(importance, params, 0.3, t) == pytest.approx(want, abs=1e-9)
    assert A.softmax_modular(importance, params, kinds, layers, 0.3, t) == pytest.approx(want, abs=1e-9)


def test_zero_importance_is_pruned_most():
    importance, params, kinds, layers = _modules()
    importance[5] = 0.0
    scale = A.score_scale(importance)
    for t in (0.1 * scale, scale, 10 * scale):
        kept = A.softmax_energy(importance, params, 0.3, t)
        assert kept[5] == min(kept) < max(kept)  # ties only where clipped at max_sparsity
        kept = A.softmax_modular(importance, params, kinds, layers, 0.3, t)
        assert kept[5] == min(k for k, kind in zip(kept, kinds) if kind == "mlp")
    # Less important modules never keep more (order is preserved by the rule).
    kept = A.softmax_energy(importance, params, 0.3, scale)
    order = sorted(range(len(kept)), key=importance.__getitem__)
    assert all(kept[a] <= kept[b] + 1e-12 for a, b in zip(order, order[1:]))


def test_cold_softmax_is_clipped_at_max_sparsity():
    importance, params, kinds, layers = _modules()
    for max_s in (0.5, 0.8):
        kept = A.softmax_energy(importance, params, 0.4, 1e-6, max_sparsity=max_s)
        assert _bounds_ok(kept, max_s)
        assert _budget_ok(kept, params, 0.4)
        assert min(kept) == pytest.approx(1 - max_s)
        kept = A.softmax_modular(importance, params, kinds, layers, 0.4, 1e-6, max_sparsity=max_s)
        assert _bounds_ok(kept, max_s) and _budget_ok(kept, params, 0.4)


def test_modular_rho_and_gamma():
    importance, params, kinds, layers = _modules()
    p_attn = sum(p for p, k in zip(params, kinds) if k == "attn")
    p_mlp = sum(p for p, k in zip(params, kinds) if k == "mlp")
    kept = A.softmax_modular(importance, params, kinds, layers, 0.3, math.inf, rho=2.0)
    r_attn = 1 - kept[0]
    r_mlp = 1 - kept[1]
    assert r_attn == pytest.approx(2 * r_mlp)
    assert r_attn * p_attn + r_mlp * p_mlp == pytest.approx(0.3 * (p_attn + p_mlp))
    kept = A.softmax_modular(importance, params, kinds, layers, 0.3, math.inf, gamma=1.0)
    mlp = [kept[i] for i, k in enumerate(kinds) if k == "mlp"]
    assert all(a > b for a, b in zip(mlp, mlp[1:]))  # deeper layers pruned more
    assert (1 - mlp[-1]) / (1 - mlp[0]) == pytest.approx(math.e)
    assert A.depth_factor([3], 2.0) == [1.0]


def test_softmax_bad_arguments():
    importance, params, kinds, layers = _modules()
    with pytest.raises(ValueError, match="temperature=0"):
        A.softmax_energy(importance, params, 0.3, 0)
    with pytest.raises(ValueError, match="rho=0"):
        A.softmax_modular(importance, params, kinds, layers, 0.3, 1.0, rho=0)
    with pytest.raises(ValueError, match="ffn"):
        A.softmax_modular(importance, params, ["ffn"] * len(params), layers, 0.3, 1.0)


def test_normalise_importance_and_scale():
    scores = [torch.full((4,), 2.0), torch.full((8,), 2.0), torch.full((4,), 6.0)]
    imp = A.normalise_importance(scores, [40, 80, 40])
    assert imp == pytest.approx([0.6, 0.6, 1.8])  # size-invariant, mean 1
    assert sum(imp) / 3 == pytest.approx(1.0)
    x = torch.randn(20001, generator=torch.Generator().manual_seed(1)).tolist()
    assert A.score_scale(x) == pytest.approx(1.0, rel=0.05)
    assert A.score_scale([1.0, 1.0, 1.0, 5.0]) > 0  # MAD 0 -> falls back to the std
    assert A.score_scale([2.0, 2.0]) == pytest.approx(2.0)
    assert A.score_scale([0.0]) == 1.0


# --------------------------------------------------------------------------- closed form


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


# --------------------------------------------------------------------------- temperature search


class Proxy:
    def __init__(self, t_star, noise_free=True):
        self.t_star = t_star
        self.calls = []

    def __call__(self, t):
        self.calls.append(t)
        return (math.log10(t) - math.log10(self.t_star)) ** 2 + 1.0


def test_search_grid_evaluates_the_scaled_factors():
    proxy = Proxy(3.0)
    best, hist = A.search_temperature(proxy, 2.0, "grid", factors=(0.1, 1.0, 10.0))
    assert [t for t, _ in hist] == pytest.approx([0.2, 2.0, 20.0])
    assert best == pytest.approx(2.0)
    assert len(proxy.calls) == 3


@pytest.mark.parametrize("t_star", [0.037, 0.5, 3.3, 42.0, 0.002, 5000.0])
def test_search_auto_finds_the_minimum_and_beats_the_grid(t_star):
    scale = 1.0
    proxy = Proxy(t_star)
    best, hist = A.search_temperature(proxy, scale, "auto", max_evals=12)
    assert len(proxy.calls) == len(set(proxy.calls)) == len(hist) <= 12  # cached, within budget
    grid_best = min(v for t, v in hist if any(math.isclose(t, f * scale) for f in (0.01, 0.1, 1, 10, 100)))
    assert proxy(best) <= grid_best
    inside = 0.01 * scale <= t_star <= 100 * scale
    if inside:
        assert abs(math.log10(best) - math.log10(t_star)) < 0.1
    else:  # beyond the grid: the search ends at the nearest edge
        edge = 0.01 * scale if t_star < 0.01 * scale else 100 * scale
        assert best == pytest.approx(edge)


def test_search_auto_noisy_and_nonfinite():
    calls = []

    def proxy(t):
        calls.append(t)
        if t < 0.05:
            return float("nan")
        return abs(math.log(t / 2.0)) + 0.01 * math.sin(40 * math.log(t))

    best, hist = A.search_temperature(proxy, 1.0, "auto", max_evals=9)
    assert len(calls) <= 9
    assert best == min(hist, key=lambda tv: tv[1])[0]
    assert all(math.isinf(v) for t, v in hist if t < 0.05)
    with pytest.raises(ValueError, match="no finite value"):
        A.search_temperature(lambda t: float("inf"), 1.0, "auto")


def test_search_bad_arguments():
    with pytest.raises(ValueError, match="mode='fast'"):
        A.search_temperature(lambda t: t, 1.0, "fast")
    with pytest.raises(ValueError, match="scale=0"):
        A.search_temperature(lambda t: t, 0.0)
    with pytest.raises(ValueError, match="max_evals=3"):
        A.search_temperature(lambda t: t, 1.0, "auto", max_evals=3)


def test_kind_split_meets_budget_and_rho_zero_keeps_attention():
    from structprune.allocation import kind_split

    params = [100, 300, 100, 300]
    kinds = ["attn", "mlp", "attn", "mlp"]
    for rho in (0.0, 0.5, 1.0, 2.0):
        kept = kind_split(params, kinds, 0.3, rho, max_sparsity=0.9)
        assert abs(sum(k * p for k, p in zip(kept, params)) - 0.7 * sum(params)) < 1e-9
    kept = kind_split(params, kinds, 0.3, 0.0)
    assert kept[0] == kept[2] == 1.0
    with pytest.raises(ValueError, match="rho"):
        kind_split(params, kinds, 0.8, 0.0, max_sparsity=0.9)


# --------------------------------------------------------------------------- sensitivity


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1000), st.floats(0.0, 5.0), st.floats(0.0, 5.0), st.floats(-0.5, 5.0)),
                min_size=1, max_size=12),
       st.floats(0.0, 0.85))
def test_sensitivity_split_meets_the_budget(mods, sparsity):
    params = [m[0] for m in mods]
    curves = [[(0.2, m[3]), (0.4, m[1]), (0.8, m[1] + m[2])] for m in mods]
    kept = A.sensitivity_split(curves, params, sparsity, max_sparsity=0.9)
    assert _budget_ok(kept, params, sparsity)
    assert all(0.1 - 1e-12 <= k <= 1.0 + 1e-12 for k in kept)


def test_sensitivity_split_prunes_the_insensitive_module_first():
    """Two equal modules: the one whose loss rises ten times slower takes the whole budget while
    its curve reaches; equal curves split evenly."""
    flat = [(0.25, 0.01), (0.5, 0.02), (1.0 * 0.8, 0.04)]
    steep = [(0.25, 0.1), (0.5, 0.2), (0.8, 0.4)]
    assert A.sensitivity_split([flat, steep], [100, 100], 0.25) == pytest.approx([0.5, 1.0])
    assert A.sensitivity_split([steep, steep], [100, 100], 0.25) == pytest.approx([0.75, 0.75])


def test_sensitivity_split_uses_the_convex_hull():
    """A curve with a costly middle point: the hull skips it, so the module goes straight from
    0 to its cheap far point (a point above the chord is never chosen as a stopping place)."""
    bumpy = [(0.2, 0.5), (0.4, 0.2)]  # removing 40% costs less than 20% (measurement noise)
    linear = [(0.2, 0.2), (0.4, 0.4)]
    kept = A.sensitivity_split([bumpy, linear], [10, 10], 0.2)
    assert kept == pytest.approx([0.6, 1.0])
    # a curve that is cheaper to prune further than the others absorbs the budget up to its last point
    kept = A.sensitivity_split([[(0.4, -0.1)], linear], [10, 10], 0.3)
    assert kept == pytest.approx([0.6, 0.8])


def test_sensitivity_split_bad_arguments():
    with pytest.raises(ValueError, match="curves\\[0\\]"):
        A.sensitivity_split([[(0.95, 0.1)]], [10], 0.2, max_sparsity=0.9)
    with pytest.raises(ValueError, match="curves\\[0\\]"):
        A.sensitivity_split([[(0.2, math.nan)]], [10], 0.2)
    with pytest.raises(ValueError, match="params has 1 entries"):
        A.sensitivity_split([[(0.2, 0.1)], [(0.2, 0.1)]], [10], 0.2)
