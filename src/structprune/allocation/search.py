"""Temperature search for the softmax rules: a grid, then golden-section search in log T."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

SEARCH_MODES = ("grid", "auto")
_GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0  # 0.381966...: golden-section step fraction


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
