"""The damped Cholesky factorisation every solve and inverse of a Gram matrix goes through.

Pure maths: tensors in, tensors out, float64, on the device of the input. For a symmetric PSD
A [n, n] (a Gram matrix sum x x^T) the factorised matrix is
    A~ + lambda I,   lambda = damp * mean(diag(A~))   (the mean clamped at 1e-12),
A~ being A with its dead columns (zero diagonal: no calibration input ever reaches them)
replaced by a zero row and column and a unit diagonal, so they get zero weight. When Cholesky
fails (A not PSD in floating point) or the caller rejects the result (non-finite), lambda grows
tenfold, at most `MAX_RETRIES` times; a success after a retry is logged as a warning, and when
every try fails a FloatingPointError is raised: a result is never NaN silently.

Two factor layouts, both of A~ + lambda I, kept apart because LAPACK rounds them differently:
    lower  L with L L^T = A~ + lambda I, out of place (the inverses: OBS selection, closed form);
    upper  U with U^T U = A~ + lambda I, in the input's memory through its transposed view
           (column-major for a row-major symmetric matrix, so LAPACK needs no copy): the
           least-squares re-fit, where one [n, n] float64 factor is the memory peak.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MAX_RETRIES = 4  # tenfold damping increases after the first try: at most 10^4 x damp
R = TypeVar("R")
# accept(factor, lambda) -> the caller's result, or None to retry with ten times the damping
Accept = Callable[[Tensor, float], "R | None"]


def dead_columns(a: Tensor) -> Tensor:
    """Columns of a Gram matrix that no input reaches: diag(A) <= 0, bool [n]."""
    return torch.diagonal(a) <= 0


def mask_dead(a: Tensor, dead: Tensor) -> Tensor:
    """In place: zero the rows and columns of dead columns and put 1 on their diagonal; returns `a`."""
    a[dead, :] = 0
    a[:, dead] = 0
    a[dead, dead] = 1.0
    return a


def ridge(a: Tensor, damp: float) -> float:
    """lambda = damp * mean(diag(A)), the mean clamped at 1e-12 (a zero matrix still gets damped)."""
    return damp * float(torch.diagonal(a).mean().clamp_min(1e-12))


def damped_cholesky(a: Tensor | list[Tensor], damp: float, accept: Accept, *, what: str, upper: bool = False,
                    reload: Callable[[], Tensor] | None = None, dead: Tensor | None = None) -> tuple[R, float]:
    """(accept's result, lambda used) for the Cholesky factor of A + lambda I (module docstring).

    a: float64 [n, n], dead columns already masked (`mask_dead`); not modified. upper=False: the
    factor is L (lower); upper=True: U (upper, A + lambda I = U^T U), a transposed view of a
    float64 [n, n] buffer. With `reload` (upper only), a function that rebuilds A for a retry,
    `a` is a one-element list holding the caller's scratch copy of A: it is taken out of the list
    and becomes the first factor (so nothing else keeps a second [n, n] matrix alive), and each
    reloaded copy has the `dead` columns masked again. `what` names the solve in the warning and
    the error.
    """
    if reload is not None and not (upper and isinstance(a, list) and len(a) == 1):
        raise ValueError("reload needs upper=True and the scratch matrix in a one-element list")
    first = a[0] if isinstance(a, list) else a
    lam = ridge(first, damp)
    info = torch.empty((), dtype=torch.int32, device=first.device)
    del first
    for attempt in range(MAX_RETRIES + 1):
        if not upper:
            factor, info = torch.linalg.cholesky_ex(a + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
        else:
            if reload is None:
                buf = a.clone()
            elif attempt == 0:
                buf = a.pop()  # the caller's scratch copy becomes the factor
            else:
                buf = reload().to(torch.float64)
                if dead is not None and dead.any():
                    mask_dead(buf, dead)
            torch.diagonal(buf).add_(lam)
            factor = buf.mT  # column-major view of the symmetric matrix, factored in place
            torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            del buf
        if int(info) == 0:
            result = accept(factor, lam)
            if result is not None:
                if attempt:
                    log.warning("%s needed %dx the requested damping to factorise", what, 10**attempt)
                return result, lam
        del factor
        lam = lam * 10
    raise FloatingPointError(f"{what} failed even with 10^{MAX_RETRIES} x damping: degenerate calibration data")


def damped_inverse(a: Tensor, damp: float, *, what: str, require_finite: bool = True) -> tuple[Tensor, float]:
    """((A + lambda I)^-1, lambda) through the lower Cholesky factor, A float64 [n, n] with dead
    columns masked. require_finite: a non-finite inverse counts as a failed try (more damping)."""

    def accept(factor: Tensor, lam: float) -> Tensor | None:
        inv = torch.cholesky_inverse(factor)
        return inv if not require_finite or torch.isfinite(inv).all() else None

    return damped_cholesky(a, damp, accept, what=what)


def damped_cholesky_solve(a: Tensor, rhs: Tensor, damp: float, prior: Tensor | None = None) -> Tensor:
    """Solve X (A + lambda I) = RHS + lambda * PRIOR for X, with A symmetric PSD [n, n], RHS and
    PRIOR [m, n] (PRIOR defaults to 0: plain ridge). With a prior the damping pulls the solution
    towards it instead of towards zero, so heavy damping degrades gracefully to the prior.

    lambda = damp * mean(diag(A)); a failed factorisation grows the damping tenfold (at most
    four times) and logs it. Dead columns of A (zero diagonal) get zero weight. Float64.
    """
    return damped_solve(a, rhs, damp, prior)[0]


def damped_solve(a: Tensor, rhs: Tensor, damp: float, prior: Tensor | None = None,
                 reload: Callable[[], Tensor] | None = None, on_factored: Callable[[], None] | None = None,
                 rows: int = 512, out: Tensor | None = None, dots: list[float] | None = None) -> tuple[Tensor, float]:
    """damped_cholesky_solve, also returning the lambda finally used. Memory: A plus one [n, n]
    factor, or with `reload` (a function that rebuilds A for a retry) only the factor: A is then
    the caller's scratch copy and is overwritten. `on_factored` is called once the factorisation
    succeeded (the caller may then free what `reload` reads); a non-finite solution is then
    returned as it is (the caller falls back) instead of retried.

    The right-hand side is solved `rows` rows at a time in float64 (rows are independent), each
    block written to `out` (default: a new float64 tensor; may be `rhs` itself, any float dtype,
    when `on_factored` is given: nothing is retried once rows are overwritten). With `dots`, the
    float64 sums <RHS, X> and <X, X> are appended to it (taken before a block is overwritten)."""
    if out is rhs and on_factored is None:
        raise ValueError("solving in place (out=rhs) needs on_factored: a retry would read overwritten rows")
    a = a.to(torch.float64)
    prior = None if prior is None else prior.to(torch.float64)
    dead = dead_columns(a)
    if dead.any():
        a = mask_dead(a if reload else a.clone(), dead)
        if out is not rhs:
            rhs = rhs.clone()
        rhs[:, dead] = 0
        if prior is not None:
            prior = prior.clone()
            prior[:, dead] = 0

    def accept(upper: Tensor, lam: float) -> Tensor | None:
        if on_factored is not None:
            on_factored()
        sol, sums = _solve_rows(upper, rhs, lam, prior, rows, out, dots is not None)
        if torch.isfinite(sol).all() or on_factored is not None:
            if dots is not None:
                dots.extend(sums)
            return sol
        return None

    matrix = [a] if reload else a
    del a
    return damped_cholesky(matrix, damp, accept, what="least-squares solve", upper=True, reload=reload, dead=dead)


def _solve_rows(upper: Tensor, rhs: Tensor, lam: float, prior: Tensor | None, rows: int, out: Tensor | None,
                want_dots: bool) -> tuple[Tensor, list[float]]:
    """X U^T U = RHS + lam PRIOR, one block of `rows` rows at a time (two triangular solves in
    float64), written to `out` (or a new float64 tensor); with want_dots also <RHS, X>, <X, X>."""
    sol = out if out is not None else torch.empty(rhs.shape, dtype=torch.float64, device=rhs.device)
    rx = xx = 0.0
    for i in range(0, rhs.shape[0], rows):
        rb = rhs[i:i + rows].to(torch.float64)
        b = rb if prior is None else rb + lam * prior[i:i + rows]
        y = torch.linalg.solve_triangular(upper, b, upper=True, left=False)
        x = torch.linalg.solve_triangular(upper.mT, y, upper=False, left=False)
        if want_dots:
            rx += float((rb * x).sum())
            xx += float((x * x).sum())
        sol[i:i + rows] = x
        del rb, b, y, x
    return sol, [rx, xx]
