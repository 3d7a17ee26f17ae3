"""Allocation: how much of each prunable module (one layer's attention or MLP) to keep.

Pure functions: per-module parameter counts (and importances) in, kept fractions out.
A module is one (layer, kind) pair, kind in {"attn", "mlp"}. A kept fraction is the
fraction of that module's prunable linear weight parameters that survive. The budget is
met when sum(kept_m * params_m) == (1 - sparsity) * sum(params_m) over all modules.

Rules (derivations and the choices made where the paper is silent: docs/method.md):
    uniform           every module keeps 1 - sparsity
    softmax_energy    r_m = r L softmax(-I_m / T)          (STRUPRUNE Algorithm 1)
    softmax_modular   separate softmaxes for attention and MLP, ratio rho, depth decay gamma
                      (Algorithm 2)
    closed_form       retention = mean_j clip(s_j, 0, 1), s_j from the relaxed-mask
                      Lagrangian of the layer's reconstruction problem (Algorithm 4)
    sensitivity_split minimise the summed measured loss increases (one curve per module,
                      measured with the re-fit: sensitivity.py) under the budget
Every rule ends in `meet_budget`, which clips to [1 - max_sparsity, 1 - min_sparsity] and
redistributes the excess so the budget holds to float precision.
`search_temperature` picks T for the softmax rules from a proxy on calibration data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

from .linalg import damped_inverse, mask_dead

log = logging.getLogger(__name__)

KINDS = ("attn", "mlp")
BUDGET_METHODS = ("shift", "scale", "scale-kept")
SEARCH_MODES = ("grid", "auto")
_GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0  # 0.381966...: golden-section step fraction


def kind_split(params: Sequence[int], kinds: Sequence[str], sparsity: float, rho: float,
               max_sparsity: float = 0.9) -> list[float]:
    """Uniform within each kind, attention pruned at rho times the MLP's ratio (rho = 0: MLP
    only; rho = 1: plain uniform), meeting the budget exactly."""
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho={rho!r} is invalid: attention/MLP ratio must be >= 0")
    p_attn = sum(p for p, k in zip(params, kinds) if k == "attn")
    p_mlp = sum(p for p, k in zip(params, kinds) if k == "mlp")
    total = p_attn + p_mlp
    r_mlp = sparsity * total / (rho * p_attn + p_mlp) if (rho * p_attn + p_mlp) > 0 else 0.0
    if max(r_mlp, rho * r_mlp) > max_sparsity * (1 + 1e-12):  # rounding: a sparsity at the cap is reachable
        raise ValueError(f"rho={rho} needs module sparsity {max(r_mlp, rho * r_mlp):.3f} > max_sparsity="
                         f"{max_sparsity} to reach sparsity={sparsity}; raise rho or max_layer_sparsity")
    kept = [1.0 - (rho * r_mlp if k == "attn" else r_mlp) for k in kinds]
    return meet_budget(kept, params, sparsity, max_sparsity=max_sparsity, method="scale")


def uniform(params: Sequence[int], sparsity: float) -> list[float]:
    """Every module keeps the same fraction 1 - sparsity of its parameters."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} is invalid: must lie in [0, 1]")
    return [1.0 - sparsity for _ in params]


# --------------------------------------------------------------------------- budget


def _check_params(params: Sequence[int], n: int | None = None, what: str = "kept") -> list[float]:
    p = [float(x) for x in params]
    if not p:
        raise ValueError("params=[] is invalid: need at least one module")
    if n is not None and len(p) != n:
        raise ValueError(f"params has {len(p)} entries but {what} has {n}: one per module")
    bad = [x for x in p if not math.isfinite(x) or x < 0]
    if bad:
        raise ValueError(f"params={list(params)!r} is invalid: counts must be finite and >= 0 (got {bad[:3]})")
    if sum(p) <= 0:
        raise ValueError(f"params={list(params)!r} is invalid: the total parameter count must be positive")
    return p


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value!r} is invalid: must be a fraction in [0, 1]")


def _kept(base: list[float], slope: list[float], t: float, lo: float, hi: float) -> list[float]:
    return [min(hi, max(lo, b + t * s)) for b, s in zip(base, slope)]


def _total(kept: list[float], p: list[float]) -> float:
    return math.fsum(k * w for k, w in zip(kept, p))


def _solve_path(
    base: list[float], slope: list[float], p: list[float], lo: float, hi: float, target: float, t_min: float
) -> list[float] | None:
    """Find t >= t_min with sum_m p_m clip(base_m + t slope_m, lo, hi) == target.

    The sum is monotone and piecewise linear in t (all slopes share one sign), so it is
    solved exactly on the segment between two breakpoints. None when the target lies
    outside the range the path reaches.
    """
    pts = {t_min}
    for b, s in zip(base, slope):
        if s != 0.0:
            for edge in (lo, hi):
                t = (edge - b) / s
                if t > t_min:
                    pts.add(t)
    ts = sorted(pts)
    gs = [_total(_kept(base, slope, t, lo, hi), p) for t in ts]
    tol = 1e-15 * math.fsum(p)  # rounding of the sums themselves
    for i, g in enumerate(gs):
        if abs(g - target) <= tol:
            return _kept(base, slope, ts[i], lo, hi)
    for i in range(len(ts) - 1):
        g0, g1 = gs[i], gs[i + 1]
        if min(g0, g1) - tol <= target <= max(g0, g1) + tol and g0 != g1:
            t = ts[i] + (target - g0) * (ts[i + 1] - ts[i]) / (g1 - g0)
            kept = _kept(base, slope, t, lo, hi)
            # One Newton step on t removes the rounding left by the interpolation.
            free = math.fsum(w * s for k, w, s in zip(kept, p, slope) if lo < k < hi)
            if free != 0.0:
                kept = _kept(base, slope, t + (target - _total(kept, p)) / free, lo, hi)
            return kept
    return None


def meet_budget(
    kept: Sequence[float],
    params: Sequence[int],
    sparsity: float,
    max_sparsity: float = 0.9,
    min_sparsity: float = 0.0,
    *,
    method: str = "shift",
) -> list[float]:
    """Project proposed kept fractions onto the parameter budget.

    Each kept_m ends in [1 - max_sparsity, 1 - min_sparsity] and
    sum(kept_m * params_m) == (1 - sparsity) * sum(params_m) to ~1e-15 relative.
    How the excess is redistributed (`method`):
        "shift"       kept_m - t for one common offset t (keeps differences of kept);
        "scale"       1 - a (1 - kept_m): pruned fractions scaled by one factor a >= 0
                      (keeps their ratios: the softmax rules' "redistribute the excess");
        "scale-kept"  a * kept_m: retention ratios scaled by one factor a >= 0.
    A scaling that cannot reach the budget (e.g. every proposed pruned fraction but one is
    zero and that one saturates at max_sparsity) continues with "shift" from its end point.
    Proposed values outside [0, 1] are allowed; they are clipped on the way.
    Raises ValueError when the budget is infeasible (sparsity outside [min, max]).
    """
    p = _check_params(params, len(kept))
    k = [float(x) for x in kept]
    if not all(math.isfinite(x) for x in k):
        raise ValueError(f"kept={list(kept)!r} is invalid: proposed kept fractions must be finite")
    for name, value in (("sparsity", sparsity), ("max_sparsity", max_sparsity), ("min_sparsity", min_sparsity)):
        _check_fraction(name, value)
    if min_sparsity > max_sparsity:
        raise ValueError(f"min_sparsity={min_sparsity!r} exceeds max_sparsity={max_sparsity!r}")
    eps = 1e-12
    if not min_sparsity - eps <= sparsity <= max_sparsity + eps:
        raise ValueError(
            f"sparsity={sparsity!r} is infeasible: every module prunes between min_sparsity={min_sparsity!r} "
            f"and max_sparsity={max_sparsity!r}, so the overall sparsity must lie in that range"
        )
    if method not in BUDGET_METHODS:
        raise ValueError(f"method={method!r} is invalid: choose one of {BUDGET_METHODS}")
    lo, hi = 1.0 - max_sparsity, 1.0 - min_sparsity
    target = (1.0 - sparsity) * math.fsum(p)
    target = min(max(target, lo * math.fsum(p)), hi * math.fsum(p))
    n = len(k)
    if target <= lo * math.fsum(p) or target >= hi * math.fsum(p):  # every module at one limit
        return [lo if target <= lo * math.fsum(p) else hi] * n

    if method == "scale":
        base, slope = [1.0] * n, [-max(0.0, 1.0 - x) for x in k]
    elif method == "scale-kept":
        base, slope = [0.0] * n, [max(0.0, x) for x in k]
    if method != "shift":
        # Normalise the path speed (t is free) and drop negligible slopes, so that no
        # breakpoint (edge - base) / slope overflows.
        top = max(abs(x) for x in slope)
        slope = [x / top if abs(x) > 1e-12 * top else 0.0 for x in slope] if top > 0 else slope
        out = _solve_path(base, slope, p, lo, hi, target, 0.0)
        if out is not None:
            return out
        # The scaling saturated before reaching the budget: continue with a common shift
        # from the saturated end (a -> infinity), where its shape is as close as it gets.
        k = [hi if s > 0.0 else lo if s < 0.0 else min(hi, max(lo, b)) for b, s in zip(base, slope)]
        log.debug("budget: %s could not reach the target; continuing with a common shift", method)
    out = _solve_path(k, [-1.0] * n, p, lo, hi, target, -math.inf)
    if out is None:  # unreachable after the feasibility check, kept as a guard
        raise ValueError(f"sparsity={sparsity!r}: could not meet the budget for kept={k!r}, params={list(params)!r}")
    return out


# --------------------------------------------------------------------------- importance


def normalise_importance(unit_scores: Sequence[torch.Tensor], params: Sequence[int]) -> list[float]:
    """Module importance I_m comparable across module sizes and kinds, dimensionless.

    I_m = (sum of module m's unit scores) / params_m, the mean score per parameter, then
    divided by its mean over modules (so mean(I) == 1). Unit scores must be additive over
    parameters (e.g. Wanda: sum over the unit's weights of |W_ij| * ||x_j||) and cover the
    weights that `params` counts (or the same share of them for every kind).
    """
    p = _check_params(params, len(unit_scores), "unit_scores")
    if any(w <= 0 for w in p):
        raise ValueError(f"params={list(params)!r} is invalid: every module needs a positive count")
    dens = []
    for m, (s, w) in enumerate(zip(unit_scores, p)):
        total = float(torch.as_tensor(s, dtype=torch.float64).sum())
        if not math.isfinite(total):
            raise ValueError(f"unit_scores[{m}] is invalid: scores must be finite (sum={total!r})")
        dens.append(total / w)
    mean = math.fsum(dens) / len(dens)
    if mean == 0.0:
        return [0.0 for _ in dens]
    return [x / abs(mean) for x in dens]


def score_scale(importance: Sequence[float]) -> float:
    """Spread of module importances, the unit in which temperatures are chosen.

    1.4826 * median absolute deviation (equals the standard deviation for normal scores,
    unmoved by one outlying layer); falls back to the standard deviation, then max |I|,
    then 1.0 when the importances are (nearly) all equal.
    """
    x = torch.as_tensor([float(v) for v in importance], dtype=torch.float64)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise ValueError(f"importance={list(importance)!r} is invalid: need finite values")
    mad = 1.4826 * float((x - x.median()).abs().median())
    for candidate in (mad, float(x.std(unbiased=False)), float(x.abs().max())):
        if candidate > 1e-12:
            return candidate
    return 1.0


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and not math.isnan(temperature)):
        raise ValueError(f"temperature={temperature!r} is invalid: must be a positive number (inf allowed)")


def _softmax_neg(importance: Sequence[float], temperature: float) -> list[float]:
    """softmax(-I / T), stable; T = inf gives the uniform distribution."""
    x = [float(v) for v in importance]
    if not all(math.isfinite(v) for v in x):
        raise ValueError(f"importance={list(importance)!r} is invalid: need finite values")
    if math.isinf(temperature):
        return [1.0 / len(x)] * len(x)
    low = min(x)
    e = [math.exp(-(v - low) / temperature) for v in x]
    total = math.fsum(e)
    return [v / total for v in e]


def softmax_energy(
    importance: Sequence[float],
    params: Sequence[int],
    sparsity: float,
    temperature: float,
    max_sparsity: float = 0.9,
) -> list[float]:
    """STRUPRUNE Algorithm 1: pruning ratio r_m = r L softmax(-I_m / T) over all L modules.

    `importance` as from `normalise_importance`; T in the same units (choose it as a
    multiple of `score_scale(importance)`); T = inf gives uniform. Less important modules
    are pruned more. The ratios are then scaled by one common factor (with clipping to
    max_sparsity, the excess going to the others in proportion) to meet the budget exactly.
    Returns kept fractions.
    """
    _check_params(params, len(importance), "importance")
    _check_fraction("sparsity", sparsity)
    _check_temperature(temperature)
    w = _softmax_neg(importance, temperature)
    n = len(w)
    kept = [1.0 - sparsity * n * x for x in w]
    return meet_budget(kept, params, sparsity, max_sparsity, method="scale")


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of (x, y) points sorted by x (Andrew's monotone chain, lower half)."""
    hull: list[tuple[float, float]] = []
    for x, y in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) <= 0:  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append((x, y))
    return hull


def sensitivity_split(
    curves: Sequence[Sequence[tuple[float, float]]],
    params: Sequence[int],
    sparsity: float,
    max_sparsity: float = 0.9,
) -> list[float]:
    """Kept fractions that minimise the summed measured loss increase under the budget.

    curves[m]: (removed fraction f, loss increase when module m ALONE is pruned to f) points,
    f in (0, max_sparsity]; (0, 0) is added. Each curve is replaced by its lower convex hull
    over removed parameters (f * params_m), and hull segments are taken in increasing order of
    loss per removed parameter over all modules until the budget is spent (the exact minimiser
    of the additive, piecewise-linear model; segments of equal slope share the last part of the
    budget in proportion to their lengths, so equal curves give equal fractions). A budget
    beyond every curve's last point is spread by `meet_budget` (common shift).
    """
    p = _check_params(params, len(curves), "curves")
    _check_fraction("sparsity", sparsity)
    _check_fraction("max_sparsity", max_sparsity)
    segments = []  # (loss per removed parameter, module, removed params from, to)
    for m, curve in enumerate(curves):
        pts = {0.0: 0.0}
        for f, d in curve:
            if not (math.isfinite(f) and math.isfinite(d) and 0.0 < f <= max_sparsity + 1e-12):
                raise ValueError(f"curves[{m}] has the point ({f!r}, {d!r}): need a finite loss at a removed "
                                 f"fraction in (0, max_sparsity={max_sparsity}]")
            pts[float(f)] = float(d)
        hull = _lower_hull(sorted((f * p[m], d) for f, d in pts.items()))
        for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
            segments.append(((y1 - y0) / (x1 - x0), m, x0, x1))
    removed = [0.0] * len(p)
    left = sparsity * math.fsum(p)
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    start = 0
    while start < len(segments) and left > 0.0:  # groups of equal slope share what is left in proportion
        slope = segments[start][0]
        end = start
        while end < len(segments) and segments[end][0] - slope <= 1e-9 * max(abs(slope), 1e-300):
            end += 1
        group = segments[start:end]
        length = math.fsum(x1 - x0 for _, _, x0, x1 in group)
        share = min(1.0, left / length)
        for _, m, x0, x1 in group:
            removed[m] = x0 + share * (x1 - x0)
        left -= share * length
        start = end
    kept = [1.0 - r / w if w > 0 else 1.0 for r, w in zip(removed, p)]
    return meet_budget(kept, params, sparsity, max_sparsity, method="shift")


def depth_factor(layers: Sequence[int], gamma: float) -> list[float]:
    """exp(gamma * (u_l - 1/2)) with u_l = (l - l_min) / (l_max - l_min) in [0, 1].

    gamma > 0 prunes deeper layers more, gamma < 0 shallower ones; the deepest layer's
    ratio is exp(gamma) times the shallowest one's. One layer only: all factors 1.
    """
    if not math.isfinite(gamma):
        raise ValueError(f"gamma={gamma!r} is invalid: must be finite")
    lmin, lmax = min(layers), max(layers)
    span = lmax - lmin
    return [math.exp(gamma * (((l - lmin) / span if span else 0.5) - 0.5)) for l in layers]


def softmax_modular(
    importance: Sequence[float],
    params: Sequence[int],
    kinds: Sequence[str],
    layers: Sequence[int],
    sparsity: float,
    temperature: float,
    rho: float = 1.0,
    gamma: float = 0.0,
    max_sparsity: float = 0.9,
) -> list[float]:
    """STRUPRUNE Algorithm 2: attention and MLP modules get separate softmax allocations.

    Kind budgets: r_attn = rho * r_mlp, with rho r_mlp P_attn + r_mlp P_mlp = r P (P the
    parameter totals), so rho is attention's pruning ratio relative to MLP's. Within kind k,
    r_m proportional to softmax_k(-I_m / T) * depth_factor(layer_m, gamma), scaled so that
    kind k removes r_k P_k parameters. Then clipped and budget met as in `softmax_energy`
    (clipping may move budget between kinds). T = inf, rho = 1, gamma = 0 give uniform.
    Returns kept fractions.
    """
    p = _check_params(params, len(importance), "importance")
    n = len(p)
    if len(kinds) != n or len(layers) != n:
        raise ValueError(f"kinds ({len(kinds)}) and layers ({len(layers)}) need one entry per module ({n})")
    unknown = sorted({k for k in kinds if k not in KINDS})
    if unknown:
        raise ValueError(f"kinds contains {unknown}: choose from {KINDS}")
    _check_fraction("sparsity", sparsity)
    _check_temperature(temperature)
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho={rho!r} is invalid: attention/MLP ratio must be positive")
    depth = depth_factor(layers, gamma)
    total_p = math.fsum(p)
    p_kind = {k: math.fsum(w for w, kk in zip(p, kinds) if kk == k) for k in KINDS}
    rel = {"attn": rho, "mlp": 1.0}
    denom = math.fsum(rel[k] * p_kind[k] for k in KINDS)
    ratio = [0.0] * n
    for kind in KINDS:
        idx = [i for i in range(n) if kinds[i] == kind]
        if not idx or p_kind[kind] <= 0:
            continue
        r_kind = sparsity * total_p * rel[kind] / denom
        w = _softmax_neg([importance[i] for i in idx], temperature)
        shape = [wi * depth[i] for wi, i in zip(w, idx)]
        removed = math.fsum(s * p[i] for s, i in zip(shape, idx))
        scale = r_kind * p_kind[kind] / removed if removed > 0 else 0.0
        for s, i in zip(shape, idx):
            ratio[i] = s * scale
    return meet_budget([1.0 - r for r in ratio], params, sparsity, max_sparsity, method="scale")


# --------------------------------------------------------------------------- closed form


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
    n = weight.shape[1]
    m = n + 1
    g = gram.to(torch.float64)
    cr = cross.to(torch.float64)
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

    w = weight.detach().to(device=g.device, dtype=torch.float64)
    free = list(range(n)) + ([n] if has_bias else [])
    f_idx = torch.tensor(free, dtype=torch.long, device=g.device)
    g_ff = g[f_idx][:, f_idx].clone()
    dead = torch.diagonal(g_ff) <= 0
    dead[n:] = False  # the constant column is never dead once count >= 1
    w_eff = w.clone()
    if dead.any():
        w_eff[:, dead[:n]] = 0
        mask_dead(g_ff, dead)
    h = damped_inverse(g_ff, damp, what="closed form", require_finite=False)[0]
    # Target weights [W, 0]: the bias cancels in R_j when it can be refitted and is absent otherwise.
    w_aug = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=torch.float64, device=g.device)], dim=1)
    mh = w_aug @ (cr[:, f_idx] @ h)  # [out, |F|]: W~ C[:, F] H

    c2 = torch.empty(len(cols), dtype=torch.float64, device=g.device)
    cb = torch.empty(len(cols), dtype=torch.float64, device=g.device)
    for size in sorted({len(c) for c in cols}):  # batched over units of one size
        which = [j for j, c in enumerate(cols) if len(c) == size]
        idx = torch.stack([cols[j] for j in which]).to(g.device)  # [U, k]
        wj = w_eff[:, idx].permute(1, 2, 0)  # [U, k, out]
        g_jj = g[idx[:, :, None], idx[:, None, :]]  # [U, k, k]
        h_jj = h[idx[:, :, None], idx[:, None, :]]
        mh_j = mh[:, idx].permute(1, 2, 0)  # [U, k, out]: W~ C[:, F] H[F, J]
        sel = torch.tensor(which, dtype=torch.long, device=g.device)
        c2[sel] = torch.einsum("uko,ukl,ulo->u", wj, g_jj, wj)
        cb[sel] = (torch.linalg.solve(h_jj, mh_j) * wj).sum(dim=(1, 2))  # H_JJ^-1 (...)
    c2 = (c2 / count).clamp_min(0)
    cb = cb / count
    c = c2.sqrt()
    b = torch.where(c > 0, cb / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(c))
    return c, b


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
    _check_params(params, len(unit_scores), "unit_scores")
    retention = []
    for i, s in enumerate(unit_scores):
        s = torch.as_tensor(s, dtype=torch.float64)
        if s.numel() == 0 or not torch.isfinite(s).all():
            raise ValueError(f"unit_scores[{i}] is invalid: need at least one finite score")
        retention.append(float(s.clamp(0.0, 1.0).mean()))
    return meet_budget(retention, params, sparsity, max_sparsity, method=method)


# --------------------------------------------------------------------------- temperature


def search_temperature(
    proxy: Callable[[float], float],
    scale: float,
    mode: str = "grid",
    factors: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    max_evals: int = 12,
) -> tuple[float, list[tuple[float, float]]]:
    """Choose T minimising `proxy(T)` (lower is better, e.g. held-back calibration loss).

    "grid": T = factor * scale for each factor. "auto": the same grid as a coarse bracket,
    then golden-section search in log T around the best grid point (between its
    neighbours) until max_evals proxy calls or a 1% bracket. Every T is evaluated once
    (cached). Returns (best T, [(T, proxy(T)) in evaluation order]); the best is the lowest
    value evaluated, so "auto" never does worse than the grid. Non-finite values count as
    +inf.
    """
    if mode not in SEARCH_MODES:
        raise ValueError(f"mode={mode!r} is invalid: choose one of {SEARCH_MODES}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} is invalid: must be a positive number")
    grid = sorted({float(f) * scale for f in factors})
    if not grid or any(not (math.isfinite(t) and t > 0) for t in grid):
        raise ValueError(f"factors={list(factors)!r} is invalid: need positive finite factors")
    if mode == "auto" and max_evals < len(grid):
        raise ValueError(f"max_evals={max_evals!r} is too small: the coarse grid alone needs {len(grid)} calls")

    cache: dict[float, float] = {}
    history: list[tuple[float, float]] = []

    def f(t: float) -> float:
        if t not in cache:
            v = float(proxy(t))
            if not math.isfinite(v):
                log.warning("temperature proxy at T=%.4g returned %r; treated as +inf", t, v)
                v = math.inf
            cache[t] = v
            history.append((t, v))
            log.info("temperature T=%.4g proxy=%.6g", t, v)
        return cache[t]

    values = [f(t) for t in grid]
    if mode == "auto" and len(grid) >= 2 and math.isfinite(min(values)):
        i = min(range(len(grid)), key=lambda k: values[k])
        a = math.log(grid[max(i - 1, 0)])
        b = math.log(grid[min(i + 1, len(grid) - 1)])
        x = math.log(grid[i])
        fx = values[i]
        while len(cache) < max_evals and b - a > 0.01:
            # Golden-section step into the larger side of the bracket (a, x, b).
            u = x + _GOLDEN * (b - x) if b - x >= x - a else x - _GOLDEN * (x - a)
            fu = f(math.exp(u))
            if fu < fx:
                a, b = (x, b) if u > x else (a, x)
                x, fx = u, fu
            else:
                a, b = (a, u) if u > x else (u, b)
    best = min(history, key=lambda tv: tv[1])
    if not math.isfinite(best[1]):
        raise ValueError("the temperature proxy returned no finite value at any T: cannot choose a temperature")
    return best[0], history
