"""The allocation rules: kept fractions per module from parameter counts and importances.

Pure functions; every rule ends in `projection.meet_budget` (see the package docstring).
    uniform, kind_split   one fraction for all, or per kind with attention/MLP ratio rho
    softmax_energy        STRUPRUNE Algorithm 1
    softmax_modular       Algorithm 2 (per-kind softmaxes, ratio rho, depth decay gamma)
    sensitivity_split     minimise the summed measured loss increases under the budget
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .projection import check_fraction, check_params, meet_budget

KINDS = ("attn", "mlp")


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


def normalise_importance(unit_scores: Sequence[torch.Tensor], params: Sequence[int]) -> list[float]:
    """Module importance I_m comparable across module sizes and kinds, dimensionless.

    I_m = (sum of module m's unit scores) / params_m, the mean score per parameter, then
    divided by its mean over modules (so mean(I) == 1). Unit scores must be additive over
    parameters (e.g. Wanda: sum over the unit's weights of |W_ij| * ||x_j||) and cover the
    weights that `params` counts (or the same share of them for every kind).
    """
    p = check_params(params, len(unit_scores), "unit_scores")
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
    check_params(params, len(importance), "importance")
    check_fraction("sparsity", sparsity)
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
    p = check_params(params, len(curves), "curves")
    check_fraction("sparsity", sparsity)
    check_fraction("max_sparsity", max_sparsity)
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
    p = check_params(params, len(importance), "importance")
    n = len(p)
    if len(kinds) != n or len(layers) != n:
        raise ValueError(f"kinds ({len(kinds)}) and layers ({len(layers)}) need one entry per module ({n})")
    unknown = sorted({k for k in kinds if k not in KINDS})
    if unknown:
        raise ValueError(f"kinds contains {unknown}: choose from {KINDS}")
    check_fraction("sparsity", sparsity)
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
