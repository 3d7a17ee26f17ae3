"""allocation="sensitivity": spread the budget by the MEASURED, re-fit-aware loss of each module.

For every prunable module m (one layer's attention or MLP) and a few removed fractions f, the
held-back calibration loss is measured with module m ALONE pruned to f and its consumer
re-fitted by least squares (every other layer dense). `allocation.sensitivity_split` then
chooses the fractions that minimise the summed increases under the budget (an additive model).
Unlike the softmax rules' proxy, which masks units without the re-fit, this sees how much of
each removal the re-fit gives back, layer by layer.

Streamed, O(one layer) device memory:
1. The dense model runs one layer at a time over the first `candidates.TOKENS` tokens of the
   calibration windows (`planning.dense_consumer_stats`, with Gram matrices) and over the
   held-back windows.
2. At layer i, each candidate is the dense layer with the module's lowest-scoring units removed
   (Wanda-style scores on the dense stream, as `planning.keep_sets`) and its consumer re-fitted
   on the calibration Gram (`refit_consumer`, local target).
3. The held-back windows run through every candidate of layer i, then through the dense
   layers after it (each loaded once per i, all candidates' streams passing through it), and
   the final norm and head give each candidate's NLL.
Cost: len(fractions) x kinds x L(L+1)/2 held-back layer forwards plus one logits pass per candidate.
On SmolLM2-135M (FFN only, 8 held-back windows, 64 calibration windows) the whole prune takes 15-18x
one dense calibration forward, against 4-6x with the softmax rule.
config.allocation.sensitivity="linear" keeps the candidates and replaces step 3 by a second-order estimate from
one streamed backward pass, linear in depth (sensitivity/linear.py, docs/sensitivity.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .. import allocation as alloc
from ..arch import Adapter
from ..config import PruneConfig
from ..allocation.budget import module_params, module_reach, prunable_keys, prunable_sparsity
from ..planning import Allocation, DenseLayer, capture_holdout
from ..runtime.stream import LayerStream
from . import exact, linear
from . import candidates
from .candidates import fractions

log = logging.getLogger(__name__)


def allocate(config: PruneConfig, adapter: Adapter, model: nn.Module, dense_layer: DenseLayer, stream: LayerStream,
             holdout: torch.Tensor | None, progress: bool = True) -> Allocation:
    """Kept fraction per module by measured sensitivity (module docstring); same signature as
    `planning.allocate`."""
    if holdout is None:
        raise ValueError("allocation='sensitivity' measures losses on held-back calibration windows; pass some "
                         "(structprune.prune sets the last eighth of the calibration windows aside by itself)")
    params = module_params(adapter)
    keys = prunable_keys(config, adapter)
    sparsity = prunable_sparsity(config, adapter)
    removed = {kind: fractions(sparsity, min(config.max_layer_sparsity, reach), config.allocation.sensitivity_max_step)
                for kind, reach in module_reach(adapter).items()}
    if not any(removed.values()):  # nothing to remove (sparsity 0): every module whole, nothing measured
        return Allocation({k: 1.0 for k in params}, {"rule": "sensitivity", "prunable_sparsity": sparsity})
    hold = capture_holdout(model, stream, holdout)  # may be an empty shard
    calib = stream.prefix(candidates.TOKENS)  # the candidates are re-fitted on a fixed token budget
    extra: dict[str, Any] = {}
    if config.allocation.sensitivity == "linear":  # second-order estimate, L-linear cost (linear.py)
        curves, base, extra = linear.measure(config, adapter, model, dense_layer, calib, hold, holdout, keys,
                                             removed, progress)
    else:
        curves, base = exact.measure(config, adapter, model, dense_layer, calib, hold, holdout, keys, removed,
                                     progress)
    kept = alloc.sensitivity_split([curves[k] for k in keys], [params[k] for k in keys], sparsity,
                                   config.max_layer_sparsity)
    keep = {k: 1.0 for k in params}
    keep.update(zip(keys, kept))
    info: dict[str, Any] = {
        "rule": "sensitivity", "prunable_sparsity": sparsity, "holdout_nll_dense": base,
        "curves": {f"{i}.{k}": [[r, d] for r, d in c] for (i, k), c in curves.items()},
        "proxy": "held-back calibration NLL increase, one module pruned and re-fitted at a time"}
    if config.allocation.sensitivity == "linear":
        info.update(extra, sensitivity="linear", proxy="second-order estimate of that increase from the candidate's "
                    "output change and the dense held-back gradient (empirical Fisher, per token)")
    log.info("sensitivity allocation: dense held-back NLL %.4f; kept %s", base,
             {f"{i}.{k}": round(keep[(i, k)], 3) for i, k in keys})
    return Allocation(keep, info)
