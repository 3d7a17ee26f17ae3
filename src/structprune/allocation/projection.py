"""Projection of proposed kept fractions onto the parameter budget (every rule ends here).

Pure functions. A module is one (layer, kind) pair; params_m its prunable linear weight
parameters, kept_m the fraction of them that survive. The budget holds when
sum(kept_m * params_m) == (1 - sparsity) * sum(params_m), to ~1e-15 relative.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

log = logging.getLogger(__name__)

BUDGET_METHODS = ("shift", "scale", "scale-kept")


def check_params(params: Sequence[int], n: int | None = None, what: str = "kept") -> list[float]:
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


def check_fraction(name: str, value: float) -> None:
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
    p = check_params(params, len(kept))
    k = [float(x) for x in kept]
    _check_budget_args(kept, k, sparsity, max_sparsity, min_sparsity, method)
    lo, hi = 1.0 - max_sparsity, 1.0 - min_sparsity
    target = (1.0 - sparsity) * math.fsum(p)
    target = min(max(target, lo * math.fsum(p)), hi * math.fsum(p))
    n = len(k)
    if target <= lo * math.fsum(p) or target >= hi * math.fsum(p):  # every module at one limit
        return [lo if target <= lo * math.fsum(p) else hi] * n
    if method != "shift":
        out, k = _scale(k, p, lo, hi, target, method)
        if out is not None:
            return out
    out = _solve_path(k, [-1.0] * n, p, lo, hi, target, -math.inf)
    if out is None:  # unreachable after the feasibility check, kept as a guard
        raise ValueError(f"sparsity={sparsity!r}: could not meet the budget for kept={k!r}, params={list(params)!r}")
    return out


def _check_budget_args(kept: Sequence[float], k: list[float], sparsity: float, max_sparsity: float,
                       min_sparsity: float, method: str) -> None:
    """ValueError naming the first invalid argument of meet_budget (k: kept as floats)."""
    if not all(math.isfinite(x) for x in k):
        raise ValueError(f"kept={list(kept)!r} is invalid: proposed kept fractions must be finite")
    for name, value in (("sparsity", sparsity), ("max_sparsity", max_sparsity), ("min_sparsity", min_sparsity)):
        check_fraction(name, value)
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


def _scale(k: list[float], p: list[float], lo: float, hi: float, target: float, method: str
           ) -> tuple[list[float] | None, list[float]]:
    """meet_budget's "scale" / "scale-kept" path: (the kept fractions, k) when one common factor
    reaches the target, else (None, the saturated end point from which a common shift goes on)."""
    n = len(k)
    if method == "scale":
        base, slope = [1.0] * n, [-max(0.0, 1.0 - x) for x in k]
    else:  # "scale-kept"
        base, slope = [0.0] * n, [max(0.0, x) for x in k]
    # Normalise the path speed (t is free) and drop negligible slopes, so that no
    # breakpoint (edge - base) / slope overflows.
    top = max(abs(x) for x in slope)
    slope = [x / top if abs(x) > 1e-12 * top else 0.0 for x in slope] if top > 0 else slope
    out = _solve_path(base, slope, p, lo, hi, target, 0.0)
    if out is not None:
        return out, k
    # The scaling saturated before reaching the budget: continue with a common shift
    # from the saturated end (a -> infinity), where its shape is as close as it gets.
    log.debug("budget: %s could not reach the target; continuing with a common shift", method)
    return None, [hi if s > 0.0 else lo if s < 0.0 else min(hi, max(lo, b)) for b, s in zip(base, slope)]
