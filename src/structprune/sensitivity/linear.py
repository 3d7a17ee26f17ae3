"""sensitivity="linear": the re-fit-aware sensitivity allocation at a cost linear in depth.

The exact rule (exact.py) pushes every re-fitted candidate through every later dense layer and
the head: len(fractions) x kinds x L(L+1)/2 held-back layer forwards and one full-vocabulary
head pass per candidate. Here each candidate is still the module's consumer with its
lowest-scoring units removed and re-fitted on the calibration Gram (`candidates.consumer_refit`),
and it is still scored in units of held-back NLL, but its effect on the loss is estimated from
the change of the consumer's output instead of being propagated:

    delta_t = a_t (W' - W)^T + (b' - b)     (consumer output change, held-back token t, dense input a_t)
    g_t     = d(summed held-back NLL) / d(consumer output at token t)   (dense model)
    dL     ~= [ sum_t g_t . delta_t  +  1/2 sum_t (g_t . delta_t)^2 ] / N    (N predicted tokens)

the second-order Taylor expansion of the mean held-back NLL with the Hessian replaced by the
empirical Fisher taken token by token (`taylor_terms`; the Fisher of the summed loss is
sum_s grad(l_s) grad(l_s)^T, and grad(l_s) is approximated by g restricted to token s). The
consumer's output is where the candidate first differs from the dense layer, so everything
after it (the rest of the layer: for attention the MLP, for families that normalise a
module's output that norm; every later layer and the head) is in g.

The gradients g at every consumer output come from ONE streamed backward pass (`output_gradients`):
1. the held-back windows run through the dense model one layer at a time, every layer's input
   kept on the host (float32);
2. the final norm and head run once per window with autograd, giving the held-back NLL and
   its gradient at the last layer's output (the only time the head is touched);
3. from the last layer to the first, each layer is loaded again, recomputed with
   requires_grad on its input and the incoming gradient back-propagated (one layer on the
   device; no parameter gradients); the gradients at its measured branches' outputs are kept,
   the layer's input is freed once used.
Then the dense calibration pass with Gram matrices (`planning.dense_consumer_stats`, over the
first `candidates.TOKENS` calibration tokens) re-fits the candidates; at layer i the held-back
stream is advanced through the same dense layer, capturing the consumers' inputs a_t, and each
candidate costs one consumer-sized product on the held-back tokens (no layer copy, no layer run).

Cost in layer forwards over the held-back windows: L (dense) + L (recompute, with as many
backward passes) + L (dense, beside the calibration pass): linear in L; per candidate, one
[tokens, in] x [in, out] product. Head: one forward and backward per window, independent of
the number of candidates. Device: one decoder layer and its statistics. Host: the held-back
hidden states of every layer (float32, (L + 1) x windows x seqlen x hidden at the peak), then
the gradients at the pruned consumers' outputs (one or two per layer), each freed once used.
"""

from __future__ import annotations

import contextlib
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
from ..runtime.hooks import capture_output, run_layer
from ..surgery import get_bias, get_weight
from ..runtime.stream import LayerStream
from .candidates import Removed, by_kind, consumer, layer_candidates

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
                     holdout: torch.Tensor, kinds_at: dict[int, list[str]], progress: bool = True
                     ) -> tuple[list[dict[str, list[torch.Tensor]]], float, int]:
    """grads[i][kind]: gradient of the summed held-back NLL with respect to the output of decoder
    layer i's consumer of `kind` (o_proj for "attn", down_proj for "mlp"; the kinds of
    `kinds_at[i]`), one float32 host tensor per batch of `hold` (the layer-0 inputs of `holdout`);
    the dense summed NLL and the number of predicted tokens. The streamed backward pass of the
    module docstring (one layer on the device at a time)."""
    n_layers = adapter.num_layers
    xs: list[LayerStream | None] = [hold]
    for i in tqdm(range(n_layers), desc="held-back forward", disable=not progress, unit="layer"):
        layer = hold.onload(dense_layer(i))
        with torch.no_grad():
            xs.append(xs[i].run(layer, i))
        del layer
    g, nll, count = head_gradient(model, adapter, holdout, xs[n_layers])
    xs[n_layers] = None
    grads: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(n_layers)]
    for i in tqdm(range(n_layers - 1, -1, -1), desc="held-back backward", disable=not progress, unit="layer"):
        if not kinds_at.get(i) and i == 0:
            break
        g, grads[i] = _layer_backward(adapter, hold.onload(dense_layer(i)), xs[i], i, g, kinds_at.get(i, []),
                                      need_input=i > 0)
        xs[i] = None
    return grads, nll, count


def _branch(adapter: Adapter, layer: nn.Module, kind: str) -> nn.Module:
    """The module whose output the residual add takes: the consumer, or the norm after it."""
    norm = adapter.branch_norm(layer, kind)
    return consumer(adapter, layer, kind) if norm is None else norm


def _layer_backward(adapter: Adapter, layer: nn.Module, inputs: LayerStream, index: int,
                    grad_out: list[torch.Tensor], kinds: list[str], need_input: bool
                    ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """From the gradient at the output of `layer` (on the device; decoder layer `index`), batch by
    batch and recomputing the forward: the gradient at its input (when `need_input`) and at the
    outputs of its consumers of `kinds`. No parameter gradient. Host float32."""
    for p in layer.parameters():
        p.requires_grad_(False)
    call = inputs.call(index)
    out: list[torch.Tensor] = []
    at: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    for x, gb in zip(inputs, grad_out):
        sinks: list[list[torch.Tensor]] = [[] for _ in kinds]
        with torch.enable_grad(), contextlib.ExitStack() as hooks:
            for kind, sink in zip(kinds, sinks):
                hooks.enter_context(capture_output(_branch(adapter, layer, kind), sink, stop=False))
            xin = x.to(inputs.device, inputs.dtype).requires_grad_(True)
            y = run_layer(layer, xin, call)
            wrt = ([xin] if need_input else []) + [s[0] for s in sinks]
            got = torch.autograd.grad(y, wrt, grad_outputs=gb.to(inputs.device, y.dtype))
        if need_input:
            out.append(got[0].float().cpu())
        for kind, gk in zip(kinds, got[1:] if need_input else got):
            at[kind].append(gk.float().cpu())
    return out, at


def measure(config: PruneConfig, adapter: Adapter, model: nn.Module, dense_layer: DenseLayer, calib: LayerStream,
            hold: LayerStream, holdout: torch.Tensor, keys: list[Key], removed: Removed,
            progress: bool = True) -> tuple[dict[Key, list[tuple[float, float]]], float, dict[str, Any]]:
    """Estimated loss-increase curves {module: [(removed fraction, held-back NLL increase)]}, the
    dense model's held-back NLL and the terms behind them ({"i.kind": [[fraction, first-order
    term, second-order term]]}, per predicted token); arguments as `exact.measure`."""
    kinds_at: dict[int, list[str]] = {}
    for i, kind in keys:
        kinds_at.setdefault(i, []).append(kind)
    grads, nll, tokens = output_gradients(adapter, model, dense_layer, hold, holdout, kinds_at, progress)
    terms: dict[Key, list[tuple[float, float, float]]] = {}
    xh = hold
    per_kind = by_kind(removed)
    bar = tqdm(total=sum(len(per_kind[k]) for _, k in keys), desc="sensitivity (linear)", disable=not progress, unit="module")
    for i, layer, cands in layer_candidates(config, adapter, dense_layer, calib, keys, removed):
        kinds = kinds_at.get(i, [])
        consumers = [consumer(adapter, layer, k) for k in kinds]
        inputs: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}

        def keep(_b: int, _x: torch.Tensor, seen: list[list[torch.Tensor]]) -> None:
            for k, s in zip(kinds, seen):
                inputs[k].append(s[0])

        with torch.no_grad():
            out = xh.run(layer, i, capture=consumers, visit=keep)
            for kind, r, w, b in cands:
                first, second = _candidate_terms(consumer(adapter, layer, kind), adapter.branch_norm(layer, kind),
                                                 w, b, inputs[kind], grads[i][kind])
                terms.setdefault((i, kind), []).append((r, first / tokens, second / tokens))
                bar.update(1)
        grads[i] = {}
        xh = out
    bar.close()
    curves = {k: [(r, taylor_increase(a, b, 1)) for r, a, b in row] for k, row in terms.items()}
    info = {"terms": {f"{i}.{k}": [list(t) for t in row] for (i, k), row in terms.items()},
            "holdout_tokens": tokens}
    return curves, nll / tokens, info


def _candidate_terms(dense: nn.Module, norm: nn.Module | None, weight: torch.Tensor, bias: torch.Tensor | None,
                     inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[float, float]:
    """`taylor_terms` summed over the held-back batches (and every rank's shard) for one candidate
    consumer (`weight`, `bias`) against the `dense` consumer, from its held-back inputs (on the
    device) and the gradients where the branch joins the residual stream (host): at the consumer's
    output, or with a `norm` after it, at the norm's output (the change then goes through it)."""
    w0, b0 = get_weight(dense).detach(), get_bias(dense)
    b0 = None if b0 is None else b0.detach()
    first = second = 0.0
    for a, g in zip(inputs, grads):
        if norm is None:  # the change is linear in the weights: one product
            delta = a @ (weight - w0).to(a.dtype).T
            if bias is not None or b0 is not None:
                delta = delta + ((0 if bias is None else bias) - (0 if b0 is None else b0))
        else:
            delta = norm(nn.functional.linear(a, weight.to(a.dtype), bias)) - norm(nn.functional.linear(a, w0, b0))
        x, y = taylor_terms(g.to(delta.device), delta.float())
        first, second = first + x, second + y
    return distributed.reduce_sums(first, second)  # over every rank's shard
