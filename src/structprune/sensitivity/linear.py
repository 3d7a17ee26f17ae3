"""sensitivity="linear": the re-fit-aware sensitivity allocation at a cost linear in depth.

The exact rule (sensitivity.py) pushes every re-fitted candidate through every later dense
layer and the head: len(fractions) x kinds x L(L+1)/2 held-back layer forwards and one
full-vocabulary head pass per candidate. Here each candidate is still the dense layer with the
module's lowest-scoring units removed and its consumer re-fitted on the calibration Gram (the
same `candidates.candidate`), and it is still scored in units of held-back NLL, but its effect
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

from .. import distributed
from ..arch import Adapter
from ..config import PruneConfig
from ..allocation.budget import Key
from ..planning import DenseLayer
from ..runtime.hooks import run_layer
from ..runtime.stream import LayerStream
from .candidates import layer_candidates

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
def head_gradient(model: nn.Module, adapter: Adapter, holdout: torch.Tensor, last: LayerStream
                  ) -> tuple[list[torch.Tensor], float, int]:
    """Gradient of the summed next-token NLL of `holdout` [windows, seqlen] with respect to the
    last decoder layer's outputs `last` (batches of `last.batch` windows); returns (gradients, one
    float32 host tensor per batch, summed NLL, predicted tokens; the two sums over every rank when
    the held-back windows are sharded). The head runs on the host like
    `planning.holdout_nll`, one window's full-vocabulary logits at a time; no parameter gradient."""
    grads, nll, count = [], 0.0, 0
    for b, x in enumerate(last):
        ids = holdout[b * last.batch:(b + 1) * last.batch]
        g = torch.zeros_like(x, dtype=torch.float32)
        for j in range(x.shape[0]):
            with torch.enable_grad():
                h = x[j:j + 1].to(last.dtype).detach().requires_grad_(True)
                logits = adapter.logits(model, h).float()[0, :-1]
                loss = nn.functional.cross_entropy(logits, ids[j, 1:], reduction="sum")
                (gh,) = torch.autograd.grad(loss, h)
            g[j:j + 1] = gh.float()
            nll += float(loss.detach())
            count += ids[j, 1:].numel()
        grads.append(g)
    nll, count = distributed.reduce_sums(nll, count)  # sharded held-back windows: sums over every rank
    return grads, nll, int(count)


def output_gradients(adapter: Adapter, model: nn.Module, dense_layer: DenseLayer, hold: LayerStream,
                     holdout: torch.Tensor, progress: bool = True) -> tuple[list[list[torch.Tensor]], float, int]:
    """grads[i]: gradient of the summed held-back NLL with respect to decoder layer i's output
    (one float32 host tensor per batch of `hold`, the layer-0 inputs of `holdout`), the dense
    summed NLL and the number of predicted tokens; the streamed backward pass of the module
    docstring (one layer on the device at a time)."""
    n_layers = adapter.num_layers
    xs: list[LayerStream | None] = [hold]
    for i in tqdm(range(n_layers), desc="held-back forward", disable=not progress, unit="layer"):
        layer = hold.onload(dense_layer(i))
        with torch.no_grad():
            xs.append(xs[i].run(layer, i))
        del layer
    g, nll, count = head_gradient(model, adapter, holdout, xs[n_layers])
    xs[n_layers] = None
    grads: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    for i in tqdm(range(n_layers - 1, -1, -1), desc="held-back backward", disable=not progress, unit="layer"):
        grads[i] = g
        if i == 0:
            break
        g = _layer_backward(hold.onload(dense_layer(i)), xs[i], i, g)
        xs[i] = None
    return grads, nll, count


def _layer_backward(layer: nn.Module, inputs: LayerStream, index: int, grad_out: list[torch.Tensor]
                    ) -> list[torch.Tensor]:
    """The gradient at the input of `layer` (on the device; decoder layer `index`) from the gradient at
    its output, batch by batch, recomputing the forward; no parameter gradient. Host float32."""
    for p in layer.parameters():
        p.requires_grad_(False)
    call = inputs.call(index)
    out = []
    for x, gb in zip(inputs, grad_out):
        with torch.enable_grad():
            xin = x.to(inputs.device, inputs.dtype).requires_grad_(True)
            y = run_layer(layer, xin, call)
            (gx,) = torch.autograd.grad(y, xin, grad_outputs=gb.to(inputs.device, y.dtype))
        out.append(gx.float().cpu())
    return out


def measure(config: PruneConfig, adapter: Adapter, model: nn.Module, dense_layer: DenseLayer, calib: LayerStream,
            hold: LayerStream, holdout: torch.Tensor, keys: list[Key], removed: list[float],
            progress: bool = True) -> tuple[dict[Key, list[tuple[float, float]]], float, dict[str, Any]]:
    """Estimated loss-increase curves {module: [(removed fraction, held-back NLL increase)]}, the
    dense model's held-back NLL and the terms behind them ({"i.kind": [[fraction, first-order
    term, second-order term]]}, per predicted token); arguments as `exact.measure`."""
    grads, nll, tokens = output_gradients(adapter, model, dense_layer, hold, holdout, progress)
    terms: dict[Key, list[tuple[float, float, float]]] = {}
    xh = hold
    bar = tqdm(total=len(keys) * len(removed), desc="sensitivity (linear)", disable=not progress, unit="module")
    for i, layer, cands in layer_candidates(config, adapter, dense_layer, calib, keys, removed):
        with torch.no_grad():
            out = xh.run(layer, i)
            for kind, r, cand in cands:
                first, second = _candidate_terms(cand, xh, out, grads[i], i)
                terms.setdefault((i, kind), []).append((r, first / tokens, second / tokens))
                del cand
                bar.update(1)
        grads[i] = []
        xh = out
    bar.close()
    curves = {k: [(r, taylor_increase(a, b, 1)) for r, a, b in row] for k, row in terms.items()}
    info = {"terms": {f"{i}.{k}": [list(t) for t in row] for (i, k), row in terms.items()},
            "holdout_tokens": tokens}
    return curves, nll / tokens, info


def _candidate_terms(cand: nn.Module, inputs: LayerStream, dense_out: LayerStream, grads: list[torch.Tensor],
                     index: int) -> tuple[float, float]:
    """`taylor_terms` summed over the held-back batches (and every rank's shard) for one candidate
    layer (on the device; decoder layer `index`) against the dense layer's outputs."""
    call = inputs.call(index)
    first = second = 0.0
    for x, y, g in zip(inputs, dense_out, grads):
        delta = run_layer(cand, x.to(inputs.device, inputs.dtype), call).float() - y.to(inputs.device)
        a, b = taylor_terms(g.to(inputs.device), delta)
        first, second = first + a, second + b
    return distributed.reduce_sums(first, second)  # over every rank's shard
