"""Damped least-squares re-fit of a consumer projection on its kept input columns.

Pure maths: tensors in, tensors out, float64 solves whatever the model dtype. The Gram sums are
float64, or float32 when one (n+1)^2 matrix would exceed `stats.GramAccumulator.float64_max_bytes`
(OPT-1.3B's FFN and larger: each batch's products are float32 anyway, so a float32 running sum adds
about one rounding per batch; the kept block is solved in float64 either way).

Notation (one consumer projection, e.g. o_proj or down_proj, y = W x + b). Inputs are
augmented with a constant 1 so the bias is one more column: x~ = [x, 1], W~ = [W, b].
    x_p   input on the pruned stream, x_d the same token's input on the dense stream;
    G  = sum x~_p x~_p^T    Gram of pruned-stream inputs, [n+1, n+1]
    C  = sum x~_d x~_p^T    cross-Gram dense/pruned (equals G while the streams agree)
    D  = sum x~_d x~_d^T    Gram of dense-stream inputs (only for the error)
The target is the dense projection's output W~ x~_d. Keeping columns K (plus the bias
column when the module has a bias), the new weight is
    W~' = (W~ C[:, K] + lambda W~[:, K]) (G[K, K] + lambda I)^-1,  lambda = damp * mean(diag(G[K, K])),
i.e. ridge damping towards the sliced weights W~[:, K] (not towards zero): LLM activations
have a few huge-variance columns, so a damping scaled by the mean diagonal is large for the
others, and shrinking those weights to zero can make the re-fit worse than no re-fit.
Dead columns (zero diagonal) get a unit diagonal and a zero weight. The statistics come from
stats.GramAccumulator; the damped Cholesky solve is linalg.damped_solve.
"""

from __future__ import annotations

import logging

import torch

from ..linalg import damped_solve
from ..stats import GramAccumulator

log = logging.getLogger(__name__)


def _wg(w: torch.Tensor, g: torch.Tensor, step: int = 1024) -> torch.Tensor:
    """w @ g in float64 for w [out, m] float64 and g [m, k] of any float dtype, converting g
    `step` rows at a time (no float64 copy of a float32 g)."""
    if g.dtype == torch.float64:
        return w @ g
    out = torch.zeros(w.shape[0], g.shape[1], dtype=torch.float64, device=w.device)
    for i in range(0, g.shape[0], step):
        out += w[:, i:i + step] @ g[i:i + step].double()
    return out


def _columns(keep: torch.Tensor, n: int, has_bias: bool, device: torch.device) -> torch.Tensor:
    keep = keep.to(device=device, dtype=torch.long)
    if has_bias:
        keep = torch.cat([keep, torch.tensor([n], device=device)])
    return keep


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    w = weight.detach().to(device=device, dtype=torch.float64)
    b = (torch.zeros(w.shape[0], 1, dtype=torch.float64, device=device) if bias is None
         else bias.detach().to(device=device, dtype=torch.float64)[:, None])
    return torch.cat([w, b], dim=1)


def _block_rows(a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, step: int = 1024) -> torch.Tensor:
    """a[rows][:, cols] without the [len(rows), a.shape[1]] intermediate of chained indexing."""
    out = torch.empty(rows.numel(), cols.numel(), dtype=a.dtype, device=a.device)
    for i in range(0, rows.numel(), step):
        out[i:i + step] = a[rows[i:i + step]][:, cols]
    return out


def refit_consumer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: GramAccumulator,
    keep: torch.Tensor,
    damp: float,
    release: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Least-squares re-fit of a consumer projection W [out, n] on the kept columns `keep`.

    Returns (W' [out, len(keep)], b' [out] or None, errors) with the weights in the dtype and
    device of `weight`; errors = {"error_none": error of the sliced weights, "error": error of
    the re-fit} (mean squared error per token, summed over outputs, exact from the statistics).
    A module without a bias gets none (no compensation is possible without changing the model).
    The damping pulls towards the sliced weights, so the re-fit's error never exceeds theirs.
    A non-finite solve falls back to the sliced weights and is logged. Runs on the statistics' device.

    release: free the statistics' Gram sums as soon as the kept block is taken out (`stats` can
    then give scores but no second re-fit). With it the peak is max(G + G_KK, G_KK + factor)
    instead of G + factor: the kept block G_KK stays in the Gram's dtype (float32 for large n)
    only as the source for a retry with more damping, and is freed once the float64 factor exists.

    Single stream (C = D = G; R = the removed columns): with M = W_R G[R, K] the system
    W' (G_KK + lam I) = W G[:, K] + lam W_K becomes W' = W_K + Delta, Delta (G_KK + lam I) = M, and
    error_none = tr(W_R G_RR W_R^T), error = error_none - <M, Delta> - lam <Delta, Delta> (per token).
    Cost O(out n |R| + |K|^3 + out |K|^2) instead of O(out n^2); memory G plus one [|K|, |K|] factor.
    """
    stats.check_live()
    dev = stats.gram.device
    cols = _columns(keep, stats.n, bias is not None, dev)
    count = max(stats.count, 1)
    refit = _refit_single if stats.single_stream else _refit_two_streams
    sol, errors = refit(weight, bias, stats, cols, damp, release)
    return _result(sol, errors, count, weight, bias)


def _result(sol: torch.Tensor, errors: dict[str, float], count: int, weight: torch.Tensor, bias: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """A re-fit's returns: [W', b'] split back into weight and bias in their own dtype and device,
    and the summed errors per token (never negative)."""
    errors = {k: float(max(v / count, 0.0)) for k, v in errors.items()}
    if bias is None:
        return sol.to(weight.device, weight.dtype), None, errors
    return (sol[:, :-1].to(weight.device, weight.dtype).contiguous(),
            sol[:, -1].to(bias.device, bias.dtype).contiguous(), errors)


def _refit_single(weight: torch.Tensor, bias: torch.Tensor | None, stats: GramAccumulator, cols: torch.Tensor,
                  damp: float, release: bool, step: int = 1024) -> tuple[torch.Tensor, dict[str, float]]:
    """(W', summed errors) when both streams are the pruned one: see refit_consumer.

    Memory at the 6.7B FFN shape (n = 16,384, |K| = 11,571, float32 G): G (1.07 GB) with the kept
    block G_KK (0.54 GB) and M (0.19 GB), then G_KK with its float64 factor (1.07 GB) and M, then
    the factor and M, which the solve overwrites with Delta and then W' (no further [out, |K|] copy).
    M and W' are in the statistics' dtype; sums, factor and solve are float64."""
    g = stats.gram
    dev = g.device
    removed = torch.ones(stats.n, dtype=torch.bool, device=dev)
    kept = cols[cols < stats.n]
    removed[kept] = False
    rem = removed.nonzero().flatten()
    w_r = weight.detach().to(dev)[:, rem].double()
    m = torch.zeros(w_r.shape[0], cols.numel(), dtype=torch.float64, device=dev)  # W_R G[R, K]
    error_none = 0.0  # tr(W_R G_RR W_R^T)
    for i in range(0, rem.numel(), step):  # blocks of removed rows of G: no [|R|, n] copy
        rows = g[rem[i:i + step]]
        w_i = w_r[:, i:i + step]
        m.addmm_(w_i, rows[:, cols].double())  # in place: no [out, |K|] temporary
        error_none += float(((rows[:, rem].double() @ w_r.T) * w_i.T).sum())  # [step, out] per block
        del rows, w_i
    del w_r
    m = m.to(g.dtype)
    dead = torch.diagonal(g)[cols] <= 0
    # the kept block in the Gram's dtype is the source for a retry with more damping; the Gram goes
    # now (release), the source once the float64 factor exists
    held = [_block_rows(g, cols, cols)]
    del g
    if release:
        stats.release()
    dots: list[float] = []
    delta, lam = damped_solve(held[0].to(torch.float64, copy=True), m, damp,
                               reload=lambda: held[0].to(torch.float64, copy=True), on_factored=held.clear,
                               out=m, dots=dots)
    if not torch.isfinite(delta).all():
        log.warning("least-squares re-fit produced non-finite values; keeping the sliced weights instead")
        return _sliced(weight, bias, kept, dev), {"error_none": error_none, "error": error_none}
    error = error_none - dots[0] - lam * dots[1]
    sol = delta  # M's storage, now Delta: W' = W_K + Delta in place
    for i in range(0, sol.shape[0], step):
        sol[i:i + step, :kept.numel()] += weight.detach()[i:i + step].to(dev)[:, kept].to(sol.dtype)
    if bias is not None:  # the bias column is the last of `cols`
        sol[:, -1] += bias.detach().to(dev, sol.dtype)
    sol[:, dead] = 0  # no input ever reaches a dead column: zero weight, as the plain solve gives
    return sol, {"error_none": error_none, "error": error}


def _sliced(weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """[W_K, b] in float64 on `dev` (the bias column only when there is a bias)."""
    sliced = weight.detach().to(dev)[:, kept].double()
    if bias is not None:
        sliced = torch.cat([sliced, bias.detach().to(dev, torch.float64)[:, None]], dim=1)
    return sliced


def _refit_two_streams(weight: torch.Tensor, bias: torch.Tensor | None, stats: GramAccumulator,
                       cols: torch.Tensor, damp: float, release: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """(W', summed errors) for separate dense and pruned streams (the general formula)."""
    w_aug = _augmented(weight, bias, stats.gram.device)
    sliced = w_aug[:, cols]
    g_kk = _block_rows(stats.gram, cols, cols).double()
    rhs = _wg(w_aug, stats.cross[:, cols])  # W C[:, K]: also the cross term of both errors
    dense = float((_wg(w_aug, stats.gram_d) * w_aug).sum())
    if release:
        stats.release()
    error_none = dense - 2 * float((rhs * sliced).sum()) + float((sliced @ g_kk * sliced).sum())
    sol, lam = damped_solve(g_kk, rhs, damp, prior=sliced)
    del g_kk
    if not torch.isfinite(sol).all():
        log.warning("least-squares re-fit produced non-finite values; keeping the sliced weights instead")
        return sliced, {"error_none": error_none, "error": error_none}
    # sol G_KK = rhs + lam (sliced - sol) on live columns; dead columns are zero in sol
    quad = float(((rhs + lam * (sliced - sol)) * sol).sum())
    return sol, {"error_none": error_none, "error": dense - 2 * float((rhs * sol).sum()) + quad}


def refit_to_target(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: GramAccumulator,
    target_cross: torch.Tensor,
    target_sq: float,
    keep: torch.Tensor,
    damp: float,
    mix: float = 1.0,
    release: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Re-fit a consumer on its kept columns towards an arbitrary per-token target t (e.g. the
    dense model's residual stream minus the pruned one's, see pipeline), mixed with the local
    target: y* = (1 - mix) W~ x~_p + mix t.

    target_cross: T = sum t x~_p^T [out, n+1] (float64); target_sq: sum ||t||^2. The statistics
    must be single-stream (x_p only). Then W' (G_KK + lam I) = (1 - mix) W~ G[:, K] + mix T[:, K]
    + lam W~_K, damped towards the sliced weights as in refit_consumer; same returns and errors
    (measured against y*). A non-finite solve falls back to the sliced weights and is logged."""
    stats.check_live()
    if not stats.single_stream:
        raise ValueError("refit_to_target needs single-stream statistics (pruned inputs only)")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix={mix!r} is invalid: use a fraction in [0, 1]")
    dev = stats.gram.device
    cols = _columns(keep, stats.n, bias is not None, dev)
    w_aug = _augmented(weight, bias, dev)
    sliced = w_aug[:, cols]
    t = target_cross.to(dev, torch.float64)
    wg = _wg(w_aug, stats.gram)  # W~ G [out, n+1]
    local_sq = float((wg * w_aug).sum())
    rhs = (1 - mix) * wg[:, cols] + mix * t[:, cols]
    energy = (1 - mix) ** 2 * local_sq + 2 * mix * (1 - mix) * float((w_aug * t).sum()) + mix ** 2 * target_sq
    del wg
    g_kk = _block_rows(stats.gram, cols, cols).double()
    if release:
        stats.release()
    error_none = energy - 2 * float((rhs * sliced).sum()) + float((sliced @ g_kk * sliced).sum())
    sol, _ = damped_solve(g_kk, rhs, damp, prior=sliced)
    if not torch.isfinite(sol).all():
        log.warning("least-squares re-fit produced non-finite values; keeping the sliced weights instead")
        sol, error = sliced, error_none
    else:
        error = energy - 2 * float((rhs * sol).sum()) + float((sol @ g_kk * sol).sum())
    return _result(sol, {"error_none": error_none, "error": error}, max(stats.count, 1), weight, bias)


def reconstruction_error(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: GramAccumulator,
    keep: torch.Tensor,
    new_weight: torch.Tensor,
    new_bias: torch.Tensor | None,
) -> float:
    """Mean squared error per token, summed over outputs, between the dense target
    W x_d + b and the pruned projection W' x_p[K] + b', from the statistics alone."""
    stats.check_live()
    dev = stats.gram.device
    cols = _columns(keep, stats.n, new_bias is not None, dev)
    w = _augmented(weight, bias, dev)
    w_new = new_weight.detach().to(device=dev, dtype=torch.float64)
    if new_bias is not None:
        w_new = torch.cat([w_new, new_bias.detach().to(device=dev, dtype=torch.float64)[:, None]], dim=1)
    dense = (_wg(w, stats.gram_d) * w).sum()
    cross = (_wg(w, stats.cross[:, cols]) * w_new).sum()
    kept = (w_new @ _block_rows(stats.gram, cols, cols).double() * w_new).sum()
    err = (dense - 2 * cross + kept) / max(stats.count, 1)
    return float(err.clamp_min(0))
