"""Damped least-squares re-fit of a consumer projection on its kept input columns.

Pure maths: tensors in, tensors out, float64 statistics and solves whatever the model dtype.

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
Dead columns (zero diagonal) get a unit diagonal and a zero weight.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class GramAccumulator:
    """Running sums of x~_p x~_p^T, x~_d x~_p^T and x~_d x~_d^T, kept in float64.

    `add_batch(x_p, x_d)` takes [..., n] tensors (any float dtype, same token order);
    x_d defaults to x_p (a single stream). With full=False only the per-column sums and
    sums of squares of x_p are kept (enough for scores; no re-fit), at a fraction of the cost.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu", full: bool = True) -> None:
        self.n = n
        self.count = 0
        self.full = full
        self.col_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(n, dtype=torch.float64, device=device)
        m = n + 1
        shape = (m, m) if full else (0, 0)
        self.gram = torch.zeros(shape, dtype=torch.float64, device=device)
        self.cross = torch.zeros(shape, dtype=torch.float64, device=device)
        self.gram_d = torch.zeros(shape, dtype=torch.float64, device=device)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)

    def add_batch(self, x_p: torch.Tensor, x_d: torch.Tensor | None = None) -> None:
        """Products are formed in float32 per batch (BLAS speed) and summed in float64."""
        x = x_p.reshape(-1, self.n).to(self.col_sum.device, torch.float32)
        self.count += x.shape[0]
        self.col_sum += x.sum(0).double()
        self.sq_sum += (x * x).sum(0).double()
        if not self.full:
            return
        xp = self._augment(x)
        g = (xp.T @ xp).double()
        self.gram += g
        if x_d is None:
            self.gram_d += g
            self.cross += g
            return
        xd = self._augment(x_d.reshape(-1, self.n).to(self.col_sum.device, torch.float32))
        if xd.shape != xp.shape:
            raise ValueError(f"dense and pruned inputs differ in shape: {tuple(xd.shape)} vs {tuple(xp.shape)}")
        self.gram_d += (xd.T @ xd).double()
        self.cross += (xd.T @ xp).double()

    @property
    def input_norm(self) -> torch.Tensor:
        """Per-column L2 norm of the pruned-stream input over all tokens, [n] float32."""
        return self.sq_sum.clamp_min(0).sqrt().float()

    @property
    def input_mean(self) -> torch.Tensor:
        """Per-column mean of the pruned-stream input, [n] float64."""
        return self.col_sum / max(self.count, 1)

    @property
    def input_var(self) -> torch.Tensor:
        """Per-column variance of the pruned-stream input, [n] float64."""
        mean = self.input_mean
        return (self.sq_sum / max(self.count, 1) - mean * mean).clamp_min(0)


def damped_cholesky_solve(a: torch.Tensor, rhs: torch.Tensor, damp: float,
                          prior: torch.Tensor | None = None) -> torch.Tensor:
    """Solve X (A + lambda I) = RHS + lambda * PRIOR for X, with A symmetric PSD [n, n], RHS and
    PRIOR [m, n] (PRIOR defaults to 0: plain ridge). With a prior the damping pulls the solution
    towards it instead of towards zero, so heavy damping degrades gracefully to the prior.

    lambda = damp * mean(diag(A)); a failed factorisation grows the damping tenfold (at most
    four times) and logs it. Dead columns of A (zero diagonal) get zero weight. Float64.
    """
    a = a.to(torch.float64)
    rhs = rhs.to(torch.float64)
    prior = None if prior is None else prior.to(torch.float64)
    n = a.shape[0]
    dead = torch.diagonal(a) <= 0
    if dead.any():
        a = a.clone()
        a[dead, :] = 0
        a[:, dead] = 0
        a[dead, dead] = 1.0
        rhs = rhs.clone()
        rhs[:, dead] = 0
        if prior is not None:
            prior = prior.clone()
            prior[:, dead] = 0
    scale = torch.diagonal(a).mean().clamp_min(1e-12)
    lam = damp * scale
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    for attempt in range(5):
        chol, info = torch.linalg.cholesky_ex(a + lam * eye)
        if int(info) == 0:
            b = rhs if prior is None else rhs + lam * prior
            sol = torch.cholesky_solve(b.T, chol).T
            if torch.isfinite(sol).all():
                if attempt:
                    log.warning("least squares needed %dx the requested damping to factorise", 10**attempt)
                return sol
        lam = lam * 10
    raise FloatingPointError("least-squares solve failed even with 10^4 x damping: degenerate calibration data")


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


def refit_consumer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: GramAccumulator,
    keep: torch.Tensor,
    damp: float,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Least-squares re-fit of a consumer projection W [out, n] on the kept columns `keep`.

    Returns (W' [out, len(keep)], b' [out] or None, errors) with the weights in the dtype and
    device of `weight`; errors = {"error_none": error of the sliced weights, "error": error of
    the re-fit} (mean squared error per token, summed over outputs, exact from the statistics).
    A module without a bias gets none (no compensation is possible without changing the model).
    The damping pulls towards the sliced weights, so the re-fit's error never exceeds theirs.
    A non-finite solve falls back to the sliced weights and is logged. Runs on the statistics' device.
    """
    dev = stats.gram.device
    cols = _columns(keep, stats.n, bias is not None, dev)
    w_aug = _augmented(weight, bias, dev)
    sliced = w_aug[:, cols]
    g_kk = stats.gram[cols][:, cols]
    rhs = w_aug @ stats.cross[:, cols]  # W C[:, K]: also the cross term of both errors
    sol = damped_cholesky_solve(g_kk, rhs, damp, prior=sliced)
    if not torch.isfinite(sol).all():
        log.warning("least-squares re-fit produced non-finite values; keeping the sliced weights instead")
        sol = sliced
    dense = (w_aug @ stats.gram_d * w_aug).sum()
    count = max(stats.count, 1)

    def error(w_new: torch.Tensor) -> float:
        return float(((dense - 2 * (rhs * w_new).sum() + (w_new @ g_kk * w_new).sum()) / count).clamp_min(0))

    errors = {"error_none": error(sliced), "error": error(sol)}
    if bias is None:
        return sol.to(weight.device, weight.dtype), None, errors
    return (sol[:, :-1].to(weight.device, weight.dtype).contiguous(),
            sol[:, -1].to(bias.device, bias.dtype).contiguous(), errors)


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
    dev = stats.gram.device
    cols = _columns(keep, stats.n, new_bias is not None, dev)
    w = _augmented(weight, bias, dev)
    w_new = new_weight.detach().to(device=dev, dtype=torch.float64)
    if new_bias is not None:
        w_new = torch.cat([w_new, new_bias.detach().to(device=dev, dtype=torch.float64)[:, None]], dim=1)
    dense = (w @ stats.gram_d * w).sum()
    cross = (w @ stats.cross[:, cols] * w_new).sum()
    kept = (w_new @ stats.gram[cols][:, cols] * w_new).sum()
    err = (dense - 2 * cross + kept) / max(stats.count, 1)
    return float(err.clamp_min(0))
