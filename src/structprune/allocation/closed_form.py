"""Closed-form allocation (STRUPRUNE Algorithm 4): relaxed keep-masks s_j per unit from the
layer's reconstruction problem, module retention = mean_j clip(s_j, 0, 1), then the budget.

Pure maths, float64; the statistics G, C, D are those of stats.GramAccumulator (notation in
reconstruct/lstsq.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import damped_inverse, dead_columns, mask_dead
from .projection import check_params, meet_budget


def relaxed_mask(
    c: torch.Tensor | float, b: torch.Tensor | float, d: torch.Tensor | float, z: torch.Tensor | float
) -> torch.Tensor:
    """s = (c b + d z) / (c^2 + d^2), the minimiser over m of (c m - b)^2 + (d m - z)^2.

    Elementwise; where c = d = 0 the objective is flat and s = 0.
    """
    c, b, d, z = (torch.as_tensor(v, dtype=torch.float64) for v in (c, b, d, z))
    den = c * c + d * d
    num = c * b + d * z
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def unit_contributions(
    weight: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    count: int,
    unit_cols: Sequence[torch.Tensor],
    *,
    damp: float = 0.01,
    has_bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_j, b_j) per unit, float64 [n_units] each, in output units per token.

    Unit j's contribution on the pruned stream is u_j = W[:, J] x_p[J] (J = its columns).
    The residual target R_j = W x_d - (least-squares refit of W x_d from every other
    column, plus the constant column when the module has a bias) is what the output still
    needs once the others have compensated as well as they can. Then
        c_j^2   = sum_tokens ||u_j||^2 / count
        c_j b_j = sum_tokens <u_j, R_j> / count,
    the refit being ridge-damped like reconstruct/lstsq.py. On a single stream, c_j b_j is
    the structured OBS saliency (error added by dropping j after the refit) and c_j^2 the
    error added by dropping it without refit.
    All from G (gram), C (cross) with one damped inverse H = (G_FF + lambda I)^-1:
    G_AA^-1 G_AJ = -H_AJ H_JJ^-1, so R_j's inner products need C[:, F] H only.
    lambda = damp * mean(diag(G_FF)). Dead input columns (zero diagonal) contribute nothing.
    """
    g = gram.to(torch.float64)
    cr = cross.to(torch.float64)
    cols = _checked_units(weight, g, cr, count, damp, unit_cols)
    w = weight.detach().to(device=g.device, dtype=torch.float64)
    w_eff, h, f_idx = _free_inverse(w, g, has_bias, damp)
    # Target weights [W, 0]: the bias cancels in R_j when it can be refitted and is absent otherwise.
    w_aug = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=torch.float64, device=g.device)], dim=1)
    mh = w_aug @ (cr[:, f_idx] @ h)  # [out, |F|]: W~ C[:, F] H
    c2, cb = _unit_sums(cols, w_eff, g, h, mh)
    c2 = (c2 / count).clamp_min(0)
    cb = cb / count
    c = c2.sqrt()
    b = torch.where(c > 0, cb / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(c))
    return c, b


def _checked_units(weight: torch.Tensor, g: torch.Tensor, cr: torch.Tensor, count: int, damp: float,
                   unit_cols: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """unit_contributions' arguments checked (ValueError naming the bad one); each unit's columns
    as a flat long tensor on the host."""
    n = weight.shape[1]
    m = n + 1
    if g.shape != (m, m) or cr.shape != (m, m):
        raise ValueError(
            f"gram {tuple(g.shape)} and cross {tuple(cr.shape)} must be [n+1, n+1] = [{m}, {m}] for weight "
            f"{tuple(weight.shape)}"
        )
    if count < 1:
        raise ValueError(f"count={count!r} is invalid: need at least one calibration token")
    if not damp > 0:
        raise ValueError(f"damp={damp!r} is invalid: damping must be positive")
    cols = [torch.as_tensor(c, dtype=torch.long).reshape(-1).cpu() for c in unit_cols]
    for j, c in enumerate(cols):
        if c.numel() == 0 or int(c.min()) < 0 or int(c.max()) >= n:
            raise ValueError(f"unit_cols[{j}]={c.tolist()!r} is invalid: need column indices in [0, {n})")
    return cols


def _free_inverse(w: torch.Tensor, g: torch.Tensor, has_bias: bool, damp: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W with dead columns zeroed, H = (G_FF + lambda I)^-1, the free columns F) for W [out, n]
    float64 and the augmented Gram g; F = every input column, plus the constant one with a bias."""
    n = w.shape[1]
    free = list(range(n)) + ([n] if has_bias else [])
    f_idx = torch.tensor(free, dtype=torch.long, device=g.device)
    g_ff = g[f_idx][:, f_idx].clone()
    dead = dead_columns(g_ff)
    dead[n:] = False  # the constant column is never dead once count >= 1
    w_eff = w.clone()
    if dead.any():
        w_eff[:, dead[:n]] = 0
        mask_dead(g_ff, dead)
    h = damped_inverse(g_ff, damp, what="closed form", require_finite=False)[0]
    return w_eff, h, f_idx


def _unit_sums(cols: list[torch.Tensor], w_eff: torch.Tensor, g: torch.Tensor, h: torch.Tensor, mh: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_tokens ||u_j||^2, sum_tokens <u_j, R_j>) per unit, batched over units of one size."""
    c2 = torch.empty(len(cols), dtype=torch.float64, device=g.device)
    cb = torch.empty(len(cols), dtype=torch.float64, device=g.device)
    for size in sorted({len(c) for c in cols}):
        which = [j for j, c in enumerate(cols) if len(c) == size]
        idx = torch.stack([cols[j] for j in which]).to(g.device)  # [U, k]
        wj = w_eff[:, idx].permute(1, 2, 0)  # [U, k, out]
        g_jj = g[idx[:, :, None], idx[:, None, :]]  # [U, k, k]
        h_jj = h[idx[:, :, None], idx[:, None, :]]
        mh_j = mh[:, idx].permute(1, 2, 0)  # [U, k, out]: W~ C[:, F] H[F, J]
        sel = torch.tensor(which, dtype=torch.long, device=g.device)
        c2[sel] = torch.einsum("uko,ukl,ulo->u", wj, g_jj, wj)
        cb[sel] = (torch.linalg.solve(h_jj, mh_j) * wj).sum(dim=(1, 2))  # H_JJ^-1 (...)
    return c2, cb


def closed_form_unit_scores(
    weight: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    gram_d: torch.Tensor,
    count: int,
    unit_cols: Sequence[torch.Tensor],
    z: torch.Tensor | None = None,
    d: float | torch.Tensor = 1.0,
    *,
    damp: float = 0.01,
    has_bias: bool = False,
) -> torch.Tensor:
    """Relaxed keep-mask s_j per unit of a consumer projection (Algorithm 4), float64 [n_units].

    weight: W [out, n] of the consumer (o_proj / down_proj); gram, cross, gram_d: the
    float64 statistics of reconstruct/lstsq.py ([n+1, n+1], inputs augmented with a 1);
    count: calibration tokens; unit_cols: each unit's input columns of W.
    z: ADMM consensus mask per unit (None: dense start, all ones); d: penalty weight
    relative to the unit's contribution (the paper's d_j is d * c_j), scalar or [n_units].
    s_j = (c_j b_j + (d c_j)(d c_j z_j)) / (c_j^2 + (d c_j)^2) = (b_j / c_j + d^2 z_j) / (1 + d^2),
    with c_j, b_j from `unit_contributions`: b_j / c_j is the share of unit j's output that
    the other units cannot take over. gram_d is not needed by the rule (it only enters the
    absolute error, which cancels) and is checked for shape only.
    """
    m = weight.shape[1] + 1
    if gram_d.shape != (m, m):
        raise ValueError(f"gram_d {tuple(gram_d.shape)} must be [n+1, n+1] = [{m}, {m}]")
    c, b = unit_contributions(weight, gram, cross, count, unit_cols, damp=damp, has_bias=has_bias)
    k = len(c)
    dev = c.device
    zt = torch.ones(k, dtype=torch.float64, device=dev) if z is None else torch.as_tensor(z).to(dev, torch.float64)
    dt = torch.as_tensor(d).to(dev, torch.float64)
    if zt.shape != (k,):
        raise ValueError(f"z has shape {tuple(zt.shape)}; need one consensus value per unit ({k})")
    if dt.numel() not in (1, k) or not torch.isfinite(dt).all() or (dt < 0).any():
        raise ValueError(f"d={d!r} is invalid: need a non-negative scalar or one value per unit ({k})")
    dc = dt.reshape(-1) * c
    s = relaxed_mask(c, b, dc, dc * zt)
    # A unit that contributes nothing (c_j = 0) needs no output share: s_j = d^2 z_j / (1 + d^2).
    dd = (dt.reshape(-1) ** 2).expand(k)
    return torch.where(c > 0, s, dd * zt / (1 + dd))


def closed_form(
    unit_scores: Sequence[torch.Tensor],
    params: Sequence[int],
    sparsity: float,
    max_sparsity: float = 0.9,
    *,
    method: str = "scale-kept",
) -> list[float]:
    """Algorithm 4 allocation: module retention = mean_j clip(s_j, 0, 1), then the budget.

    unit_scores[m]: s_j of module m's units from `closed_form_unit_scores`. The retention
    ratios are rescaled by one common factor to meet the budget (`method`, see
    `meet_budget`; "scale-kept" is the paper's "ratios are rescaled"). Returns kept fractions.
    """
    check_params(params, len(unit_scores), "unit_scores")
    retention = []
    for i, s in enumerate(unit_scores):
        s = torch.as_tensor(s, dtype=torch.float64)
        if s.numel() == 0 or not torch.isfinite(s).all():
            raise ValueError(f"unit_scores[{i}] is invalid: need at least one finite score")
        retention.append(float(s.clamp(0.0, 1.0).mean()))
    return meet_budget(retention, params, sparsity, max_sparsity, method=method)
