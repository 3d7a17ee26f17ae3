"""sensitivity="linear": the re-fit-aware sensitivity allocation at a cost linear in depth.

The exact rule (sensitivity.py) pushes every re-fitted candidate through every later dense
layer and the head: len(fractions) x kinds x L(L+1)/2 held-back layer forwards and one
full-vocabulary head pass per candidate. Here each candidate is still the dense layer with the
module's lowest-scoring units removed and its consumer re-fitted on the calibration Gram (the
same `sensitivity._candidate`), and it is still scored in units of held-back NLL, but its effect
on the loss is estimated from its own output change instead of being propagated:

    delta_t = candidate(x_t) - dense(x_t)        (layer output, held-back token t, dense input x)
    g_t     = d(summed held-back NLL) / d(output of that layer at token t)   (dense model)
    dL     ~= [ sum_t g_t . delta_t  +  1/2 sum_t (g_t . delta_t)^2 ] / N    (N predicted tokens)

the second-order Taylor expansion of the mean held-back NLL with the Hessian replaced by the
empirical Fisher taken token by token (`taylor_terms`; the Fisher of the summed loss is
sum_s grad(l_s) grad(l_s)^T, and grad(l_s) is approximated by g restricted to token s).

The gradients g at every layer output come from ONE streamed backward pass (`output_gradients`):
1. the held-back windows run through the dense model one layer at a time, every layer's input
   kept on the host (float32);
2. the final norm and head run once per window with autograd, giving the held-back NLL and
   its gradient at the last layer's output (the only time the head is touched);
3. from the last layer to the second, each layer is loaded again, recomputed with
   requires_grad on its input and the incoming gradient back-propagated (one layer on the
   device; no parameter gradients); each layer's input is freed once used.
Then the usual dense calibration pass (`planning.dense_consumer_stats`, with Gram matrices)
runs; at layer i the held-back stream is advanced through the same dense layer and every
candidate is run on the held-back dense inputs of that layer only.

Cost in layer forwards over the held-back windows: L (dense) + (L - 1) (recompute, with as
many backward passes) + L (dense, beside the calibration pass) + len(fractions) x kinds x L
(candidates): linear in L. Head: one forward and backward per window, independent of the
number of candidates. Device: one decoder layer (plus one candidate copy) and its statistics.
Host: the held-back hidden states of every layer (float32, (L + 1) x windows x seqlen x hidden
at the peak), then their gradients, each freed once used.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .allocation.budget import Key
from .arch import Adapter
from .config import PruneConfig
from .planning import DenseLayer, dense_consumer_stats, layer_scores
from .sensitivity import _candidate
from .streaming import device_copy, run_layer, to_device

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- maths (pure)
def taylor_terms(grad: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
    """First- and second-order terms of a summed loss's change under an output change.

    grad, delta: [..., tokens, hidden], the gradient of the SUMMED loss with respect to a layer
    output and the change of that output (same shape). Returns (sum_t g_t . delta_t,
    1/2 sum_t (g_t . delta_t)^2) in the loss's units (nats), accumulated in float64."""
    if grad.shape != delta.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and delta {tuple(delta.shape)} must have the same shape")
    dots = (grad.double() * delta.double()).sum(-1)
    return float(dots.sum()), 0.5 * float(dots.pow(2).sum())


def taylor_increase(first: float, second: float, tokens: int) -> float:
    """The estimated increase of the MEAN loss over `tokens` tokens from `taylor_terms` sums."""
    if tokens < 1:
        raise ValueError(f"tokens={tokens!r} is invalid: need at least one predicted token")
    return (first + second) / tokens


# --------------------------------------------------------------------------- plumbing
def head_gradient(model: nn.Module, adapter: Adapter, holdout: torch.Tensor, xs: list[torch.Tensor],
                  dtype: torch.dtype, batch_size: int) -> tuple[list[torch.Tensor], float, int]:
    """Gradient of the summed next-token NLL of `holdout` [windows, seqlen] with respect to the
    last decoder layer's outputs `xs` (batches of `batch_size` windows); returns (gradients, one
    float32 host tensor per batch, summed NLL, predicted tokens; the two sums over every rank when
    the held-back windows are sharded). The head runs on the host like
    `planning.holdout_nll`, one window's full-vocabulary logits at a time; no parameter gradient."""
    grads, nll, count = [], 0.0, 0
    for b, x in enumerate(xs):
        ids = holdout[b * batch_size:(b + 1) * batch_size]
        g = torch.zeros_like(x, dtype=torch.float32)
        for j in range(x.shape[0]):
            with torch.enable_grad():
                h = x[j:j + 1].to(dtype).detach().requires_grad_(True)
                logits = adapter.logits(model, h).float()[0, :-1]
                loss = nn.functional.cross_entropy(logits, ids[j, 1:], reduction="sum")
                (gh,) = torch.autograd.grad(loss, h)
            g[j:j + 1] = gh.float()
            nll += float(loss.detach())
            count += ids[j, 1:].numel()
        grads.append(g)
    nll, count = distributed.reduce_sums(nll, count)  # sharded held-back windows: sums over every rank
    return grads, nll, int(count)


def output_gradients(adapter: Adapter, model: nn.Module, dense_layer: DenseLayer, hold: list[torch.Tensor],
                     calls: list[tuple], holdout: torch.Tensor, device: torch.device, dtype: torch.dtype,
                     batch_size: int, progress: bool = True) -> tuple[list[list[torch.Tensor]], float, int]:
    """grads[i]: gradient of the summed held-back NLL with respect to decoder layer i's output
    (one float32 host tensor per batch of `hold`, the layer-0 inputs of `holdout`), the dense
    summed NLL and the number of predicted tokens; the streamed backward pass of the module
    docstring (one layer on the device at a time)."""
    n_layers = adapter.num_layers
    xs: list[list[torch.Tensor] | None] = [hold]
    for i in tqdm(range(n_layers), desc="held-back forward", disable=not progress, unit="layer"):
        layer = device_copy(dense_layer(i), device, dtype)
        call = to_device(calls[i], device, dtype)
        with torch.no_grad():
            xs.append([run_layer(layer, x.to(device, dtype), call).float().cpu() for x in xs[i]])
        del layer
    g, nll, count = head_gradient(model, adapter, holdout, xs[n_layers], dtype, batch_size)
    xs[n_layers] = None
    grads: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    for i in tqdm(range(n_layers - 1, -1, -1), desc="held-back backward", disable=not progress, unit="layer"):
        grads[i] = g
        if i == 0:
            break
        layer = device_copy(dense_layer(i), device, dtype)
        for p in layer.parameters():
            p.requires_grad_(False)
        call = to_device(calls[i], device, dtype)
        nxt = []
        for x, gb in zip(xs[i], g):
            with torch.enable_grad():
                xin = x.to(device, dtype).requires_grad_(True)
                y = run_layer(layer, xin, call)
                (gx,) = torch.autograd.grad(y, xin, grad_outputs=gb.to(device, y.dtype))
            nxt.append(gx.float().cpu())
        g = nxt
        xs[i] = None
        del layer
    return grads, nll, count


def measure(config: PruneConfig, adapter: Adapter, model: nn.Module, dense_layer: DenseLayer,
            hidden: list[torch.Tensor], calls: list[tuple], holdout: torch.Tensor, hold: list[torch.Tensor],
            keys: list[Key], removed: list[float], device: torch.device, dtype: torch.dtype,
            progress: bool = True) -> tuple[dict[Key, list[tuple[float, float]]], float, dict[str, Any]]:
    """Estimated loss-increase curves {module: [(removed fraction, held-back NLL increase)]}, the
    dense model's held-back NLL and the terms behind them ({"i.kind": [[fraction, first-order
    term, second-order term]]}, per predicted token); arguments as `sensitivity.measure`."""
    gen = torch.Generator().manual_seed(config.seed)
    n_layers = adapter.num_layers
    kinds_at = {i: [k for j, k in keys if j == i] for i in range(n_layers)}
    grads, nll, tokens = output_gradients(adapter, model, dense_layer, hold, calls, holdout, device, dtype,
                                          config.batch_size, progress)
    terms: dict[Key, list[tuple[float, float, float]]] = {}
    xh = hold
    bar = tqdm(total=sum(len(v) for v in kinds_at.values()) * len(removed), desc="sensitivity (linear)",
               disable=not progress, unit="module")
    for i, layer, acc_o, acc_d, _ in dense_consumer_stats(adapter, dense_layer, hidden, calls, device, dtype,
                                                          full=True, progress=False):
        call = to_device(calls[i], device, dtype)
        with torch.no_grad():
            out = [run_layer(layer, x.to(device, dtype), call).float().cpu() for x in xh]
            if kinds_at[i]:
                scores = layer_scores(config, adapter, layer, acc_o, acc_d, gen)
                for kind in kinds_at[i]:
                    row = []
                    for r in removed:
                        cand = _candidate(adapter, layer, kind, scores, r, acc_o if kind == "attn" else acc_d,
                                          config.damp, refit=config.reconstruction != "none")
                        first = second = 0.0
                        for x, y, g in zip(xh, out, grads[i]):
                            delta = run_layer(cand, x.to(device, dtype), call).float() - y.to(device)
                            a, b = taylor_terms(g.to(device), delta)
                            first, second = first + a, second + b
                        first, second = distributed.reduce_sums(first, second)  # over every rank's shard
                        row.append((r, first / tokens, second / tokens))
                        del cand
                        bar.update(1)
                    terms[(i, kind)] = row
        acc_o.release()
        acc_d.release()
        grads[i] = []
        xh = out
    bar.close()
    curves = {k: [(r, taylor_increase(a, b, 1)) for r, a, b in row] for k, row in terms.items()}
    info = {"terms": {f"{i}.{k}": [list(t) for t in row] for (i, k), row in terms.items()},
            "holdout_tokens": tokens}
    return curves, nll / tokens, info
