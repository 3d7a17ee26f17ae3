"""The damped Cholesky: invariants of the one factorisation every Gram solve goes through."""

from __future__ import annotations

import logging

import pytest
import torch

from structprune.linalg import (
    damped_cholesky,
    damped_cholesky_solve,
    damped_inverse,
    damped_solve,
    dead_columns,
    mask_dead,
    ridge,
)


def _gram(seed: int, n: int = 8, tokens: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return x.T @ x


def test_well_conditioned_solve_equals_a_direct_solve():
    a = _gram(0)
    rhs = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prior = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = ridge(a, 0.01)
    assert lam == pytest.approx(0.01 * float(torch.diagonal(a).mean()))
    damped = a + lam * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(damped_cholesky_solve(a, rhs, 0.01), rhs @ torch.linalg.inv(damped))
    torch.testing.assert_close(damped_cholesky_solve(a, rhs, 0.01, prior=prior),
                               (rhs + lam * prior) @ torch.linalg.inv(damped))
    torch.testing.assert_close(damped_cholesky_solve(a, rhs, 1e-12), torch.linalg.solve(a, rhs.T).T)
    inv, lam2 = damped_inverse(a, 0.01, what="test")
    assert lam2 == lam
    torch.testing.assert_close(inv, torch.linalg.inv(damped))


def test_lower_and_upper_factors_factor_the_same_damped_matrix():
    a = _gram(3)
    lam = ridge(a, 0.05)
    damped = a + lam * torch.eye(8, dtype=torch.float64)
    low, _ = damped_cholesky(a, 0.05, lambda f, _: f.clone(), what="test")
    up, _ = damped_cholesky(a, 0.05, lambda f, _: f.clone(), what="test", upper=True)
    torch.testing.assert_close(low @ low.T, damped)
    torch.testing.assert_close(up.T @ up, damped)
    torch.testing.assert_close(a, _gram(3), rtol=0, atol=0)  # the input is not modified


def test_a_dead_column_gets_zero_weight():
    a = _gram(4)
    a[2, :] = 0
    a[:, 2] = 0
    assert dead_columns(a).tolist() == [i == 2 for i in range(8)]
    rhs = torch.ones(2, 8, dtype=torch.float64)
    sol = damped_cholesky_solve(a, rhs, 0.01, prior=torch.ones(2, 8, dtype=torch.float64))
    assert torch.isfinite(sol).all() and torch.all(sol[:, 2] == 0)
    masked = mask_dead(a.clone(), dead_columns(a))
    assert masked[2, 2] == 1 and masked[2].abs().sum() == 1 and masked[:, 2].abs().sum() == 1


@pytest.mark.parametrize("kind", ["zero", "rank_one", "indefinite"])
def test_never_nan_on_a_singular_gram(kind, caplog):
    n = 6
    v = torch.arange(1.0, n + 1, dtype=torch.float64)
    a = {"zero": torch.zeros(n, n, dtype=torch.float64), "rank_one": torch.outer(v, v),
         "indefinite": torch.outer(v, v) - 3 * torch.eye(n, dtype=torch.float64)}[kind]
    rhs = torch.ones(2, n, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="structprune.linalg"):
        sol, lam = damped_solve(a, rhs, 0.01)
        inv, _ = damped_inverse(mask_dead(a.clone(), dead_columns(a)), 0.01, what="test")
    assert torch.isfinite(sol).all() and torch.isfinite(inv).all() and lam > 0
    if kind == "indefinite":  # the first tries fail: the damping grew, and it was logged
        assert lam > ridge(a, 0.01) and "needed" in caplog.text


def test_a_matrix_that_never_factorises_raises_instead_of_returning_nan():
    a = torch.full((4, 4), float("nan"), dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="10\\^4"):
        damped_cholesky_solve(a, torch.ones(1, 4, dtype=torch.float64), 0.01)
    with pytest.raises(FloatingPointError, match="test"):
        damped_inverse(a, 0.01, what="test")


def test_rejected_results_retry_with_tenfold_damping():
    a = _gram(5)
    seen = []

    def accept(factor, lam):
        seen.append(lam)
        return "ok" if len(seen) == 3 else None

    result, lam = damped_cholesky(a, 0.01, accept, what="test")
    assert result == "ok" and lam == seen[-1]
    assert seen[1] == seen[0] * 10 and seen[2] == seen[1] * 10


def test_damped_solve_recovers_from_indefinite_matrix():
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # indefinite
    sol = damped_cholesky_solve(a, torch.ones(1, 2, dtype=torch.float64), damp=0.01)
    assert torch.isfinite(sol).all()


def test_solve_with_reload_matches_plain_solve_after_retries():
    a = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # indefinite, dead
    rhs = torch.ones(2, 3, dtype=torch.float64)
    plain, lam = damped_solve(a, rhs, 0.01)
    scratch, lam2 = damped_solve(a.clone(), rhs, 0.01, reload=a.clone)
    torch.testing.assert_close(scratch, plain)
    assert lam == lam2 and lam > 0.01
    assert torch.all(plain[:, 2] == 0)


def test_retry_source_is_dropped_once_factored():
    """The retry source (the kept block) serves the retries and is let go after the factorisation."""
    a = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # indefinite, dead
    rhs = torch.ones(2, 3, dtype=torch.float64)
    plain, lam = damped_solve(a, rhs, 0.01)
    held = [a.float()]
    got, lam2 = damped_solve(held[0].double(), rhs, 0.01, reload=lambda: held[0].double(), on_factored=held.clear)
    torch.testing.assert_close(got, plain)
    assert lam2 == lam and held == []
