"""allocation/search.py: the temperature search (grid and golden-section)."""

from __future__ import annotations

import math

import pytest

from structprune import allocation as A


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
