"""allocation="sensitivity": spread the budget by the MEASURED, re-fit-aware loss of each module.

For every prunable module m (one layer's attention or MLP) and a few removed fractions f, the
held-back calibration loss is measured with module m ALONE pruned to f and its consumer
re-fitted by least squares (every other layer dense). `allocation.sensitivity_split` then
chooses the fractions that minimise the summed increases under the budget (an additive model).
Unlike the softmax rules' proxy, which masks units without the re-fit, this sees how much of
each removal the re-fit gives back, layer by layer.

Streamed, O(one layer) device memory:
1. The dense model runs one layer at a time over the calibration windows
   (`planning.dense_consumer_stats`, with Gram matrices) and over the held-back windows.
2. At layer i, each candidate is the dense layer with the module's lowest-scoring units removed
   (Wanda-style scores on the dense stream, as `planning.keep_sets`) and its consumer re-fitted
   on the calibration Gram (`refit_consumer`, local target).
3. The held-back windows run through every candidate of layer i, then through the dense
   layers after it (each loaded once per i, all candidates' streams passing through it), and
   the final norm and head give each candidate's NLL.
Cost: len(fractions) x kinds x L(L+1)/2 held-back layer forwards plus one logits pass per candidate.
On SmolLM2-135M (FFN only, 8 held-back windows, 64 calibration windows) the whole prune takes 15-18x
one dense calibration forward, against 4-6x with the softmax rule.
config.sensitivity="linear" keeps the candidates and replaces step 3 by a second-order estimate from
one streamed backward pass, linear in depth (sensitivity_linear.py, docs/sensitivity.md).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocation as alloc
from .allocation.budget import Key, keep_sets, module_params, prunable_keys, prunable_sparsity
from .arch import Adapter
from .config import PruneConfig
from .planning import Allocation, DenseLayer, LayerScores, dense_consumer_stats, holdout_nll, layer_scores
from .reconstruct.lstsq import refit_consumer
from .stats import GramAccumulator
from .streaming import capture_layer_inputs, device_copy, run_layer, to_device
from .surgery import get_bias, get_weight, head_columns, set_weight

log = logging.getLogger(__name__)

STEPS = (0.5, 1.0, 1.5, 2.0)  # removed fractions measured per module, in multiples of the prunable sparsity


def fractions(sparsity: float, max_sparsity: float, steps: tuple[float, ...] = STEPS) -> list[float]:
    """The removed fractions a module is measured at: steps x sparsity, capped at max_sparsity."""
    return sorted({min(s * sparsity, max_sparsity) for s in steps if s * sparsity > 0})


def _candidate(adapter: Adapter, layer: nn.Module, kind: str, scores: LayerScores, removed: float,
               acc: GramAccumulator, damp: float, refit: bool) -> nn.Module:
    """A copy of the dense `layer` with `kind`'s lowest-scoring units masked out (consumer columns
    zeroed, which equals removing them) and, with `refit`, the consumer re-fitted on the kept columns."""
    q, _, n = keep_sets(adapter, scores, 1.0 - removed if kind == "attn" else 1.0,
                        1.0 - removed if kind == "mlp" else 1.0)
    cols = head_columns(q, adapter.head_dim) if kind == "attn" else n
    cand = copy.deepcopy(layer)
    module = adapter.o_proj(cand) if kind == "attn" else adapter.down_proj(cand)
    w, b = get_weight(module).detach(), get_bias(module)
    if refit:
        new_w, new_b, _ = refit_consumer(w, None if b is None else b.detach(), acc, cols.to(acc.gram.device), damp)
    else:
        new_w, new_b = w[:, cols.to(w.device)], None
    full = torch.zeros_like(w)
    full[:, cols.to(w.device)] = new_w
    set_weight(module, full, new_b)
    return cand


def measure(config: PruneConfig, adapter: Adapter, model: nn.Module, dense_layer: DenseLayer,
            hidden: list[torch.Tensor], calls: list[tuple], holdout: torch.Tensor, hold: list[torch.Tensor],
            keys: list[Key], removed: list[float], device: torch.device, dtype: torch.dtype,
            progress: bool = True) -> tuple[dict[Key, list[tuple[float, float]]], float]:
    """Loss-increase curves {module: [(removed fraction, held-back NLL increase)]} and the dense
    model's held-back NLL. `hold`: layer-0 inputs of the `holdout` windows (see module docstring)."""
    gen = torch.Generator().manual_seed(config.seed)
    n_layers = adapter.num_layers
    kinds_at = {i: [k for j, k in keys if j == i] for i in range(n_layers)}
    losses: dict[Key, list[float]] = {}
    bar = tqdm(total=sum(len(v) for v in kinds_at.values()) * len(removed), desc="sensitivity",
               disable=not progress, unit="module")
    for i, layer, acc_o, acc_d, _ in dense_consumer_stats(adapter, dense_layer, hidden, calls, device, dtype,
                                                          full=True, progress=False):
        call = to_device(calls[i], device, dtype)
        with torch.no_grad():
            streams = []
            if kinds_at[i]:
                scores = layer_scores(config, adapter, layer, acc_o, acc_d, gen)
                for kind in kinds_at[i]:
                    for r in removed:
                        cand = _candidate(adapter, layer, kind, scores, r, acc_o if kind == "attn" else acc_d,
                                          config.damp, refit=config.reconstruction != "none")
                        streams.append([run_layer(cand, x.to(device, dtype), call).float().cpu() for x in hold])
                        del cand
            acc_o.release()
            acc_d.release()
            hold = [run_layer(layer, x.to(device, dtype), call).float().cpu() for x in hold]
            for j in range(i + 1, n_layers) if streams else ():  # the dense rest, each loaded once per layer i
                nxt = device_copy(dense_layer(j), device, dtype)
                call_j = to_device(calls[j], device, dtype)
                streams = [[run_layer(nxt, x.to(device, dtype), call_j).float().cpu() for x in s] for s in streams]
                del nxt
            it = iter(streams)
            for kind in kinds_at[i]:
                losses[(i, kind)] = [holdout_nll(model, adapter, holdout, next(it), dtype, config.batch_size)
                                     for _ in removed]
                bar.update(len(removed))
    bar.close()
    base = holdout_nll(model, adapter, holdout, hold, dtype, config.batch_size)
    curves = {k: [(r, v - base) for r, v in zip(removed, vals)] for k, vals in losses.items()}
    return curves, base


def allocate(config: PruneConfig, adapter: Adapter, model: nn.Module, layers: nn.ModuleList,
             dense_layer: DenseLayer, hidden: list[torch.Tensor], calls: list[tuple], holdout: torch.Tensor | None,
             device: torch.device, dtype: torch.dtype, progress: bool = True) -> Allocation:
    """Kept fraction per module by measured sensitivity (module docstring); same signature as
    `planning.allocate`."""
    if holdout is None:
        raise ValueError("allocation='sensitivity' measures losses on held-back calibration windows; pass some "
                         "(structprune.prune sets the last eighth of the calibration windows aside by itself)")
    params = module_params(adapter)
    keys = prunable_keys(config, adapter)
    sparsity = prunable_sparsity(config, adapter)
    removed = fractions(sparsity, config.max_layer_sparsity)
    hold = capture_layer_inputs(model, layers, holdout, config.batch_size)[0] if len(holdout) else []  # may be an empty shard
    extra: dict[str, Any] = {}
    if config.sensitivity == "linear":  # second-order estimate, L-linear cost (sensitivity_linear.py)
        from . import sensitivity_linear

        curves, base, extra = sensitivity_linear.measure(config, adapter, model, dense_layer, hidden, calls, holdout,
                                                         hold, keys, removed, device, dtype, progress)
    else:
        curves, base = measure(config, adapter, model, dense_layer, hidden, calls, holdout, hold, keys, removed,
                               device, dtype, progress)
    kept = alloc.sensitivity_split([curves[k] for k in keys], [params[k] for k in keys], sparsity,
                                   config.max_layer_sparsity)
    keep = {k: 1.0 for k in params}
    keep.update(zip(keys, kept))
    info: dict[str, Any] = {
        "rule": "sensitivity", "prunable_sparsity": sparsity, "holdout_nll_dense": base,
        "curves": {f"{i}.{k}": [[r, d] for r, d in c] for (i, k), c in curves.items()},
        "proxy": "held-back calibration NLL increase, one module pruned and re-fitted at a time"}
    if config.sensitivity == "linear":
        info.update(extra, sensitivity="linear", proxy="second-order estimate of that increase from the candidate's "
                    "output change and the dense held-back gradient (empirical Fisher, per token)")
    log.info("sensitivity allocation: dense held-back NLL %.4f; kept %s", base,
             {f"{i}.{k}": round(keep[(i, k)], 3) for i, k in keys})
    return Allocation(keep, info)
