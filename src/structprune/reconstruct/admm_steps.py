"""The per-step updates of the structured ADMM loop (admm.py), one chunk of tokens at a time.

Pure maths, float64 in and out; notation in admm.py's docstring. Each update is the exact (or,
for a smooth activation's z, a descent) minimiser of the surrogate L in one block of variables.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import damped_cholesky_solve
from .activations import Activation, curvature, resolve_activation

_RIDGE_JITTER = 1e-12  # relative damping of the p-update system, which is already PD


def update_p(w2: Tensor, b2: Tensor | None, y: Tensor, target: Tensor, beta: float, gamma: float) -> Tensor:
    """Ridge update of the consumer input: p = (b W2^T W2 + g I)^-1 (b W2^T (y - b2) + g target).

    w2 [d_out, k], b2 [d_out] or None, y [n, d_out], target = act(z) * v [n, k]; returns [n, k].
    """
    k = w2.shape[1]
    eye = torch.eye(k, dtype=w2.dtype, device=w2.device)
    system = beta * (w2.T @ w2) + gamma * eye
    resid = y if b2 is None else y - b2
    rhs = beta * (resid @ w2) + gamma * target
    return damped_cholesky_solve(system, rhs, _RIDGE_JITTER)


def update_z_relu(p: Tensor, m: Tensor, alpha: float, gamma: float, v: Tensor | None = None) -> Tensor:
    """Exact elementwise minimiser of g (p - v relu(z))^2 + a (z - m)^2 (v = 1 when None).

    Two branches as in SparseLLM: z <= 0 gives min(m, 0); z >= 0 gives the clamped ridge
    solution (g v p + a m) / (g v^2 + a); the cheaper one wins. Shapes [n, k].
    """
    vv = torch.ones_like(p) if v is None else v
    z_neg = m.clamp_max(0.0)
    z_pos = ((gamma * vv * p + alpha * m) / (gamma * vv * vv + alpha)).clamp_min(0.0)
    f_neg = gamma * p * p + alpha * (z_neg - m) ** 2
    f_pos = gamma * (p - vv * z_pos) ** 2 + alpha * (z_pos - m) ** 2
    return torch.where(f_pos <= f_neg, z_pos, z_neg)


def update_z_smooth(
    p: Tensor,
    m: Tensor,
    z: Tensor,
    act: str,
    alpha: float,
    gamma: float,
    v: Tensor | None = None,
    steps: int = 4,
    halvings: int = 5,
) -> Tensor:
    """Proximal step g (p - v act(z))^2 + a (z - m)^2 for a smooth activation. [n, k].

    The 1-D problems are not convex (GELU and SiLU dip below zero), so two starts are
    refined and the cheaper end point kept per element: the current z and the exact ReLU
    solution (GELU and SiLU are close to ReLU away from 0). Each start takes Newton steps
    (Gauss-Newton, curvature 2 g v^2 act'(z)^2 + 2 a > 0, where the exact curvature is not
    safely positive) with elementwise step halving, moving an element only when its cost
    falls; the cost is therefore never above that at z.
    """
    name, fn, grad = resolve_activation(act)
    curv = curvature(name)
    vv = torch.ones_like(p) if v is None else v

    def cost(t: Tensor) -> Tensor:
        return gamma * (p - vv * fn(t)) ** 2 + alpha * (t - m) ** 2

    z_a, f_a = _newton(z, cost, fn, grad, curv, p, m, vv, alpha, gamma, steps, halvings)
    z_b, f_b = _newton(update_z_relu(p, m, alpha, gamma, v), cost, fn, grad, curv, p, m, vv, alpha, gamma,
                       steps, halvings)
    return torch.where(f_b < f_a, z_b, z_a)


def _newton(z: Tensor, cost: Activation, fn: Activation, grad: Activation, curv: Activation, p: Tensor,
            m: Tensor, vv: Tensor, alpha: float, gamma: float, steps: int, halvings: int) -> tuple[Tensor, Tensor]:
    z = z.clone()
    f_cur = cost(z)
    for _ in range(steps):
        d = grad(z) * vv
        r = p - vv * fn(z)
        g = -gamma * d * r + alpha * (z - m)
        h_gn = gamma * d * d + alpha
        h = h_gn - gamma * vv * curv(z) * r
        step = -g / torch.where(h > 0.1 * h_gn, h, h_gn)
        pending = torch.ones_like(z, dtype=torch.bool)
        t = 1.0
        for _ in range(halvings):
            cand = z + t * step
            f_new = cost(cand)
            better = pending & torch.isfinite(f_new) & (f_new < f_cur)
            z = torch.where(better, cand, z)
            f_cur = torch.where(better, f_new, f_cur)
            pending &= ~better
            if not pending.any():
                break
            t *= 0.5
    return z, f_cur


def update_up(p: Tensor, a: Tensor, u: Tensor, alpha: float, gamma: float) -> Tensor:
    """Exact elementwise minimiser v of g (p - a v)^2 + a_v (v - u)^2 with a = act(z). [n, k]."""
    return (gamma * a * p + alpha * u) / (gamma * a * a + alpha)


def solve_weights(gram: Tensor, cross: Tensor, w_prev: Tensor, damp: float) -> Tensor:
    """Proximal damped least squares: argmin_W tr(W G W^T) - 2 tr(W C^T) + lam |W - W_prev|^2.

    gram G [n, n] = sum x x^T, cross C [m, n] = sum t x^T for targets t, w_prev [m, n];
    lam = damp * mean(diag(G)). Solved as W_prev + damped_cholesky_solve(G, C - W_prev G).
    Dead inputs (zero diagonal) keep their previous weight.
    """
    return w_prev + damped_cholesky_solve(gram, cross - w_prev @ gram, damp)


def gradient_weights(gram: Tensor, cross: Tensor, w_prev: Tensor, damp: float, steps: int) -> Tensor:
    """The objective of `solve_weights` lowered by `steps` gradient steps of size 1/L from
    w_prev (L = largest eigenvalue of G + lam I), instead of the closed form."""
    lam = damp * torch.diagonal(gram).mean().clamp_min(1e-12)
    lip = torch.linalg.eigvalsh(gram).max().clamp_min(0) + lam
    w = w_prev
    for _ in range(steps):
        w = w - ((w @ gram - cross) + lam * (w - w_prev)) / lip
    return w


def quadratic_error(gram: Tensor, cross: Tensor, y_sq: float, w: Tensor, count: int) -> float:
    """mean_t |y_t - W h_t|^2 from sum h h^T (gram), sum y h^T (cross) and sum |y|^2."""
    err = y_sq - 2.0 * (w * cross).sum() + ((w @ gram) * w).sum()
    return float(err.clamp_min(0.0)) / max(count, 1)
