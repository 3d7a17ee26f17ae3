"""Least-squares re-fit against float64 references."""

from __future__ import annotations

import pytest
import torch

from structprune.linalg import damped_cholesky_solve
from structprune.reconstruct.lstsq import reconstruction_error, refit_consumer
from structprune.stats import GramAccumulator


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


def _plain_refit(w, b, g, count, keep, damp):
    """The general formula on the same sums G: W' (G_KK + lam I) = W G[:, K] + lam W_K, and
    errors (W G W^T - 2 W G[:, K] W'^T + W' G_KK W'^T) / count with the dense [n, n] product."""
    cols = torch.cat([keep, torch.tensor([w.shape[1]])]) if b is not None else keep
    w_aug = torch.cat([w, (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype))[:, None]], dim=1)
    rhs = w_aug @ g[:, cols]
    sol = damped_cholesky_solve(g[cols][:, cols], rhs, damp, prior=w_aug[:, cols])
    dense = (w_aug @ g * w_aug).sum()

    def err(wn):
        return float((dense - 2 * (rhs * wn).sum() + (wn @ g[cols][:, cols] * wn).sum()) / count)

    return sol, err(w_aug[:, cols]), err(sol)


def test_single_stream_refit_equals_the_general_formula():
    """The cheap single-stream path (W_K + Delta, errors without the dense [n, n] product) gives
    the same weights and errors as the general formula, dead column and heavy damping included."""
    _, x, w, b = _problem(5, n=16, out=6)
    x = x.clone()
    x[:, 3] = 0.0  # dead input, kept
    keep = torch.tensor([0, 2, 3, 5, 6, 9, 12, 15])
    for bias in (b, None):
        for damp in (1e-6, 0.01, 10.0):
            acc = GramAccumulator(16)
            acc.add_batch(x[:150])
            acc.add_batch(x[150:])
            new_w, new_b, errs = refit_consumer(w, bias, acc, keep, damp)
            ref, ref_none, ref_err = _plain_refit(w, bias, acc.gram, acc.count, keep, damp)
            got = new_w if bias is None else torch.cat([new_w, new_b[:, None]], dim=1)
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
            assert abs(errs["error_none"] - ref_none) <= 1e-6 * ref_none
            assert abs(errs["error"] - ref_err) <= 1e-6 * ref_none
            assert errs["error"] <= errs["error_none"]
            assert torch.all(new_w[:, 2] == 0)  # the dead column


def test_two_stream_refit_errors_equal_direct_errors():
    xd, xp, w, b = _problem(6)
    keep = torch.tensor([1, 2, 4, 7, 8, 10])
    acc = GramAccumulator(12)
    acc.add_batch(xp, xd)
    for damp in (1e-3, 1.0):
        new_w, new_b, errs = refit_consumer(w, b, acc, keep, damp)
        target = xd @ w.T + b
        direct = ((xp[:, keep] @ new_w.T + new_b - target) ** 2).sum(1).mean()
        assert abs(errs["error"] - float(direct)) < 1e-4 * float(direct)


def _heavy_tailed(seed: int, n: int, tokens: int) -> torch.Tensor:
    """Float32 inputs whose column scales span 2.5 decades plus one outlier column (as LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) * torch.logspace(-1, 1.5, n)
    x[:, 5] *= 30
    return x + 0.3


def test_float32_gram_refit_matches_float64():
    """Gram sums stored in float32 (what large statistics use) give the float64 re-fit's errors
    within 1e-4 relative and nearly the same weights."""
    n, out = 96, 16
    x = _heavy_tailed(7, n, 6000)
    g = torch.Generator().manual_seed(8)
    w, b = torch.randn(out, n, generator=g), torch.randn(out, generator=g)
    keep = torch.randperm(n, generator=g)[:60].sort().values
    got = {}
    for dtype in (torch.float64, torch.float32):
        acc = GramAccumulator(n, dtype=dtype)
        for chunk in x.split(750):
            acc.add_batch(chunk)
        assert acc.gram.dtype == dtype
        got[dtype] = refit_consumer(w, b, acc, keep, 0.01)
    (w64, b64, e64), (w32, b32, e32) = got[torch.float64], got[torch.float32]
    assert abs(e32["error"] - e64["error"]) <= 1e-4 * e64["error"]
    assert abs(e32["error_none"] - e64["error_none"]) <= 1e-5 * e64["error_none"]
    torch.testing.assert_close(w32, w64, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b32, b64, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("two_streams", [False, True])
def test_release_frees_the_gram_before_the_solve_and_changes_nothing(dtype, two_streams, monkeypatch):
    """refit_consumer(release=True) gives the same result, frees the Gram sums before the
    factorisation (peak: Gram + kept block, then kept block + factor, never Gram + factor), and
    leaves an accumulator that still scores but refuses a second re-fit or more batches."""
    from structprune.reconstruct import lstsq

    xd, xp, w, b = _problem(9, n=20, out=4)
    keep = torch.tensor([0, 3, 4, 8, 11, 15, 19])
    accs = []
    for _ in range(2):
        acc = GramAccumulator(20, dtype=dtype)
        acc.add_batch(xp, xd if two_streams else None)
        accs.append(acc)
    ref = refit_consumer(w, b, accs[0], keep, 0.01)
    seen = []
    solve = lstsq.damped_solve

    def spy(*args, **kwargs):
        seen.append(accs[1].gram.numel())
        return solve(*args, **kwargs)

    monkeypatch.setattr(lstsq, "damped_solve", spy)
    got = refit_consumer(w, b, accs[1], keep, 0.01, release=True)
    assert seen == [0] and accs[1].released
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
    assert got[2] == ref[2]
    torch.testing.assert_close(accs[1].input_norm, accs[0].input_norm)
    with pytest.raises(RuntimeError, match="released"):
        refit_consumer(w, b, accs[1], keep, 0.01)
    with pytest.raises(RuntimeError, match="released"):
        accs[1].add_batch(xp)


def test_refit_to_target_matches_lstsq_reference_and_mixes_with_the_local_target():
    from structprune.reconstruct.lstsq import refit_to_target

    _, xp, w, b = _problem(3)
    g = torch.Generator().manual_seed(4)
    t = xp @ torch.randn(12, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(400, 5, generator=g,
                                                                                       dtype=torch.float64)
    keep = torch.tensor([1, 2, 4, 5, 8, 10])
    design = torch.cat([xp[:, keep], torch.ones(len(xp), 1, dtype=torch.float64)], dim=1)
    x_aug = torch.cat([xp, torch.ones(len(xp), 1, dtype=torch.float64)], dim=1)
    for mix in (1.0, 0.5):
        acc = GramAccumulator(12)
        for chunk in range(4):
            acc.add_batch(xp[chunk * 100:(chunk + 1) * 100])
        target = (1 - mix) * (xp @ w.T + b) + mix * t
        new_w, new_b, errs = refit_to_target(w, b, acc, t.T @ x_aug, float((t * t).sum()), keep, 1e-10, mix)
        ref = torch.linalg.lstsq(design, target).solution.T
        torch.testing.assert_close(new_w, ref[:, :-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_b, ref[:, -1], rtol=1e-5, atol=1e-5)
        direct = float(((design @ ref.T - target) ** 2).sum(1).mean())
        assert abs(errs["error"] - direct) < 1e-6 * direct
        sliced = float(((xp[:, keep] @ w[:, keep].T + b - target) ** 2).sum(1).mean())
        assert abs(errs["error_none"] - sliced) < 1e-6 * sliced
    # mix 0 is the local re-fit exactly
    acc, ref_acc = GramAccumulator(12), GramAccumulator(12)
    acc.add_batch(xp)
    ref_acc.add_batch(xp)
    local_w, local_b, _ = refit_consumer(w, b, ref_acc, keep, 1e-3)
    mix0_w, mix0_b, _ = refit_to_target(w, b, acc, t.T @ x_aug, float((t * t).sum()), keep, 1e-3, 0.0)
    torch.testing.assert_close(mix0_w, local_w)
    torch.testing.assert_close(mix0_b, local_b)
    two = GramAccumulator(12)
    two.add_batch(xp, xp + 1)
    with pytest.raises(ValueError, match="single-stream"):
        refit_to_target(w, b, two, t.T @ x_aug, 1.0, keep, 1e-3)
