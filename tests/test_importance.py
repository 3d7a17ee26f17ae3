"""importance.py: each scorer's defining formula on a tiny weight/statistics pair, the registry,
and the per-unit sums."""

from __future__ import annotations

import pytest
import torch

from structprune import importance
from structprune.importance import available_scorers, column_scores, register_scorer, unit_scores
from structprune.stats import GramAccumulator


def _pair(seed: int = 0, n: int = 6, out: int = 4, tokens: int = 50) -> tuple[torch.Tensor, torch.Tensor, GramAccumulator]:
    """(weight [out, n], inputs [tokens, n] float64, their statistics); column c of the inputs is
    scaled by c + 1 so the columns differ in size."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    x = (torch.randn(tokens, n, generator=g, dtype=torch.float64) + 0.3) * torch.arange(1, n + 1, dtype=torch.float64)
    acc = GramAccumulator(n, full=False)
    acc.add_batch(x)
    return w, x, acc


def test_wanda_is_column_weight_norm_times_input_norm():
    w, x, acc = _pair()
    want = w.double().norm(dim=0) * x.norm(dim=0)
    got = column_scores("wanda", w, acc, torch.Generator())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_magnitude_is_column_weight_norm_and_ignores_the_inputs():
    w, _, acc = _pair()
    torch.testing.assert_close(column_scores("magnitude", w, acc, torch.Generator()), w.norm(dim=0))
    _, _, other = _pair(seed=5)
    assert torch.equal(column_scores("magnitude", w, other, torch.Generator()), column_scores("magnitude", w, acc, torch.Generator()))


def test_flap_is_input_variance_times_squared_column_weight_norm():
    w, x, acc = _pair()
    want = x.var(dim=0, unbiased=False) * w.double().norm(dim=0) ** 2
    got = column_scores("flap", w, acc, torch.Generator())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_random_follows_the_seeded_generator():
    w, _, acc = _pair()
    a = column_scores("random", w, acc, torch.Generator().manual_seed(3))
    b = column_scores("random", w, acc, torch.Generator().manual_seed(3))
    c = column_scores("random", w, acc, torch.Generator().manual_seed(4))
    assert a.shape == (w.shape[1],) and torch.equal(a, b) and not torch.equal(a, c)


def test_non_finite_scores_become_zero():
    w, _, acc = _pair()
    w[:, 2] = float("inf")
    got = column_scores("magnitude", w, acc, torch.Generator())
    assert got[2] == 0 and torch.isfinite(got).all()


def test_unknown_scorer_lists_the_known_ones():
    w, _, acc = _pair()
    with pytest.raises(ValueError, match=r"scorer='bogus'.*\['flap', 'magnitude', 'random', 'wanda'"):
        column_scores("bogus", w, acc, torch.Generator())


def test_a_registered_scorer_is_listed_and_used(monkeypatch):
    monkeypatch.setattr(importance, "_SCORERS", dict(importance._SCORERS))  # leave the registry as it was

    @register_scorer("ones")
    def ones(weight, stats, gen):
        return torch.ones(weight.shape[1])

    w, _, acc = _pair()
    assert "ones" in available_scorers()
    assert torch.equal(column_scores("ones", w, acc, torch.Generator()), torch.ones(w.shape[1]))


def test_unit_scores_sum_consecutive_columns():
    cols = torch.arange(12, dtype=torch.float32)
    assert unit_scores(cols, 3).tolist() == [3.0, 12.0, 21.0, 30.0]
    assert torch.equal(unit_scores(cols, 1), cols)
