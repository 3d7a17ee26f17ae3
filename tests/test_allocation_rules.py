"""allocation/rules.py: uniform, the softmax rules, the attention/MLP split and the sensitivity split."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from allocation_checks import _bounds_ok, _budget_ok, sizes

from structprune import allocation as A


def test_uniform_unchanged():
    assert A.uniform([1, 2, 3], 0.25) == [0.75, 0.75, 0.75]
    with pytest.raises(ValueError, match="sparsity=-0.1"):
        A.uniform([1], -0.1)


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
