"""Least-squares re-fit against float64 references."""

from __future__ import annotations

import torch

from structprune.reconstruct.lstsq import GramAccumulator, damped_cholesky_solve, reconstruction_error, refit_consumer


def _problem(seed: int = 0, n: int = 12, out: int = 5, tokens: int = 400):
    g = torch.Generator().manual_seed(seed)
    xd = torch.randn(tokens, n, generator=g, dtype=torch.float64) + 0.5
    xp = xd + 0.1 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    return xd, xp, w, b


def test_refit_matches_lstsq_reference_with_bias():
    xd, xp, w, b = _problem()
    keep = torch.tensor([0, 2, 3, 7, 9, 11])
    acc = GramAccumulator(xd.shape[1])
    for chunk in range(4):
        sl = slice(chunk * 100, (chunk + 1) * 100)
        acc.add_batch(xp[sl], xd[sl])
    new_w, new_b, errs = refit_consumer(w, b, acc, keep, damp=1e-10)
    target = xd @ w.T + b
    design = torch.cat([xp[:, keep], torch.ones(len(xp), 1, dtype=torch.float64)], dim=1)
    ref = torch.linalg.lstsq(design, target).solution.T
    torch.testing.assert_close(new_w.double(), ref[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_b.double(), ref[:, -1], rtol=1e-4, atol=1e-4)
    # the error from statistics equals the direct error
    direct = ((design @ ref.T - target) ** 2).sum(1).mean()
    assert abs(reconstruction_error(w, b, acc, keep, new_w, new_b) - float(direct)) < 1e-3 * float(direct) + 1e-8
    assert abs(errs["error"] - float(direct)) < 1e-3 * float(direct) + 1e-8
    sliced_err = ((xp[:, keep] @ w[:, keep].T + b - target) ** 2).sum(1).mean()
    assert abs(errs["error_none"] - float(sliced_err)) < 1e-6 * float(sliced_err)


def test_refit_never_worse_than_slicing_and_keep_all_is_identity():
    xd, xp, w, _ = _problem(1)
    acc = GramAccumulator(xd.shape[1])
    acc.add_batch(xp, xd)
    keep = torch.arange(0, 12, 2)
    new_w, _, errs = refit_consumer(w, None, acc, keep, damp=1e-6)
    assert errs["error"] < errs["error_none"]
    assert reconstruction_error(w, None, acc, keep, new_w, None) < reconstruction_error(w, None, acc, keep,
                                                                                        w[:, keep], None)
    same = GramAccumulator(12)
    same.add_batch(xd)
    all_w, _, _ = refit_consumer(w, None, same, torch.arange(12), damp=1e-9)
    torch.testing.assert_close(all_w, w, rtol=1e-5, atol=1e-5)


def test_dead_and_constant_columns_stay_finite():
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 2] = 0.0  # dead input
    x[:, 4] = 3.0  # constant input, collinear with the bias column
    acc = GramAccumulator(6)
    acc.add_batch(x)
    w = torch.randn(3, 6, dtype=torch.float64)
    new_w, new_b, _ = refit_consumer(w, torch.zeros(3, dtype=torch.float64), acc, torch.tensor([1, 2, 4, 5]), 0.01)
    assert torch.isfinite(new_w).all() and torch.isfinite(new_b).all()
    assert torch.all(new_w[:, 1] == 0)  # the dead column gets zero weight


def test_damped_solve_recovers_from_indefinite_matrix():
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # indefinite
    sol = damped_cholesky_solve(a, torch.ones(1, 2, dtype=torch.float64), damp=0.01)
    assert torch.isfinite(sol).all()


def test_heavy_damping_never_worse_than_slicing():
    """A column with a huge variance makes the relative damping large for the others; the
    damping pulls towards the sliced weights, so the re-fit still never loses to them."""
    xd, xp, w, b = _problem(2)
    xp = xp.clone()
    xp[:, 0] *= 1e4
    acc = GramAccumulator(12)
    acc.add_batch(xp, xd)
    for damp in (1e-3, 1.0, 100.0):
        _, _, errs = refit_consumer(w, b, acc, torch.tensor([0, 1, 2, 5, 8]), damp)
        assert errs["error"] <= errs["error_none"] * (1 + 1e-9)
