"""Alternating re-fit of a pruned attention block: value projection and output projection.

After heads are removed, the output projection alone is re-fitted by least squares (lstsq.py);
the kept heads still carry exactly their dense values. Here the two sides alternate, as the
MLP's ADMM loop does for producers and consumer:
    v-step  a few full-batch Adam steps on the value projection (GPT-2: the fused q/k/v
            projection) minimising the block error with the output projection fixed; the
            softmax mixes tokens per head, so the value side has no small closed form;
    o-step  the damped least-squares solve of the output projection on the new head outputs,
            W_o~ = argmin |Y - W_o~ x~|^2 + lambda |W_o~ - W_o~_prev|^2 (a proximal step).
Block error E = mean over tokens of |Y - attn(x)|^2 (summed over outputs; the units of the
least-squares errors), Y the dense attention output on the same (pruned-stream) inputs.
Iterate 0 is the one-shot least-squares result; an iteration that raises E is rejected (the
last good weights come back, the step size halves) and counted, so the result is never worse
than the one-shot re-fit. Non-finite losses or solves are rejected the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..linalg import damped_cholesky_solve

log = logging.getLogger(__name__)

# forward(batch index) -> (o_proj input [T, n], o_proj output [T, d]) through the pruned block
BlockForward = Callable[[int], tuple[Tensor, Tensor]]


@dataclass
class AttentionFit:
    """History of the alternating loop: E per iteration (index 0: one-shot), best index, rejections."""

    history: list[float] = field(default_factory=list)
    best_iter: int = 0
    rejected: int = 0


def _error(forward: BlockForward, targets: Sequence[Tensor], count: int) -> float:
    total = 0.0
    with torch.no_grad():
        for b, y in enumerate(targets):
            out = forward(b)[1]
            total += float(((out.float() - y.to(out.device, torch.float32)) ** 2).sum())
    return total / count


def _solve_output(forward: BlockForward, targets: Sequence[Tensor], o_proj: nn.Module, damp: float,
                  weight: Callable[[nn.Module], Tensor], bias: Callable[[nn.Module], Tensor | None]
                  ) -> tuple[Tensor, Tensor | None]:
    """The o-step: damped least squares of the output projection towards its current weights."""
    w = weight(o_proj).detach().double()
    b = bias(o_proj)
    n = w.shape[1] + (b is not None)
    gram = torch.zeros(n, n, dtype=torch.float64, device=w.device)
    cross = torch.zeros(w.shape[0], n, dtype=torch.float64, device=w.device)
    with torch.no_grad():
        for i, y in enumerate(targets):
            x = forward(i)[0].reshape(-1, w.shape[1]).double()
            if b is not None:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
            gram += x.T @ x
            cross += y.reshape(-1, w.shape[0]).to(x.device, torch.float64).T @ x
    prior = w if b is None else torch.cat([w, b.detach().double()[:, None]], dim=1)
    sol = damped_cholesky_solve(gram, cross, damp, prior=prior)
    return (sol, None) if b is None else (sol[:, :-1], sol[:, -1])


def alternate_attention(forward: BlockForward, targets: Sequence[Tensor], count: int, o_proj: nn.Module,
                        value_params: Sequence[nn.Parameter], iters: int, steps: int, damp: float,
                        weight: Callable[[nn.Module], Tensor], bias: Callable[[nn.Module], Tensor | None],
                        set_output: Callable[[nn.Module, Tensor, Tensor | None], None],
                        lr: float = 1e-2) -> AttentionFit:
    """Run the loop in place on the pruned block's modules; returns its history.

    forward: the pruned block on calibration batch b (gradients flow to `value_params`);
    targets: Y per batch; count: tokens in all batches; lr: Adam step relative to each value
    parameter's RMS. weight / bias / set_output read and write the output projection."""
    fit = AttentionFit(history=[_error(forward, targets, count)])
    best_e = fit.history[0]
    snapshot = [p.detach().clone() for p in value_params]
    o_best = (weight(o_proj).detach().clone(), None if bias(o_proj) is None else bias(o_proj).detach().clone())
    step = lr
    for it in range(1, iters + 1):
        groups = [{"params": [p], "lr": step * float(p.detach().float().pow(2).mean().sqrt().clamp_min(1e-8))}
                  for p in value_params]
        opt = torch.optim.Adam(groups)
        for p in value_params:
            p.requires_grad_(True)
        finite = True
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                for b, y in enumerate(targets):
                    out = forward(b)[1]
                    loss = ((out.float() - y.to(out.device, torch.float32)) ** 2).sum() / count
                    loss.backward()
                grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in value_params)
                if not torch.isfinite(loss) or not grads_ok:
                    finite = False
                    break
                opt.step()
        for p in value_params:
            p.requires_grad_(False)
            p.grad = None
        e = float("inf")
        if finite:
            w_o, b_o = _solve_output(forward, targets, o_proj, damp, weight, bias)
            if torch.isfinite(w_o).all() and (b_o is None or torch.isfinite(b_o).all()):
                set_output(o_proj, w_o.to(weight(o_proj).dtype), None if b_o is None else b_o.to(w_o.device))
                e = _error(forward, targets, count)
        fit.history.append(e)
        if e <= best_e:
            best_e, fit.best_iter = e, it
            snapshot = [p.detach().clone() for p in value_params]
            o_best = (weight(o_proj).detach().clone(), None if bias(o_proj) is None else bias(o_proj).detach().clone())
        else:  # reject: back to the last good weights with a smaller step
            fit.rejected += 1
            with torch.no_grad():
                for p, s in zip(value_params, snapshot):
                    p.copy_(s)
            set_output(o_proj, *o_best)
            step /= 2
    return fit
