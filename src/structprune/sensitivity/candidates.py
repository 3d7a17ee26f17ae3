"""The candidates both sensitivity rules measure: at each dense layer, the layer with one
module's lowest-scoring units removed and its consumer re-fitted, for each removed fraction."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from ..arch import Adapter
from ..config import PruneConfig
from ..allocation.budget import Key, keep_sets
from ..planning import DenseLayer, LayerScores, dense_consumer_stats, layer_scores
from ..reconstruct.lstsq import refit_consumer
from ..stats import GramAccumulator
from ..runtime.stream import LayerStream
from ..surgery import get_bias, get_weight, head_columns, set_weight

STEPS = (0.5, 1.0, 1.5, 2.0)  # removed fractions measured per module, in multiples of the prunable sparsity

Candidates = Iterator[tuple[str, float, nn.Module]]  # (module kind, removed fraction, candidate layer)


def fractions(sparsity: float, max_sparsity: float, steps: tuple[float, ...] = STEPS) -> list[float]:
    """The removed fractions a module is measured at: steps x sparsity, capped at max_sparsity."""
    return sorted({min(s * sparsity, max_sparsity) for s in steps if s * sparsity > 0})


def candidate(adapter: Adapter, layer: nn.Module, kind: str, scores: LayerScores, removed: float,
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


def layer_candidates(config: PruneConfig, adapter: Adapter, dense_layer: DenseLayer, calib: LayerStream,
                     keys: list[Key], removed: list[float]) -> Iterator[tuple[int, nn.Module, Candidates]]:
    """Walk the dense model over the calibration stream (`planning.dense_consumer_stats`, with
    Gram matrices) and yield, per layer, (index, dense layer on the device, its candidates for
    the modules of `keys` at each fraction of `removed`, made one at a time). Consume the
    candidates under no_grad and before the next layer: the statistics are freed after the last."""
    gen = torch.Generator().manual_seed(config.seed)
    kinds_at = {i: [k for j, k in keys if j == i] for i in range(adapter.num_layers)}
    for i, layer, acc_o, acc_d, _ in dense_consumer_stats(adapter, dense_layer, calib, full=True, progress=False):
        yield i, layer, _candidates(config, adapter, layer, kinds_at[i], removed, acc_o, acc_d, gen)


def _candidates(config: PruneConfig, adapter: Adapter, layer: nn.Module, kinds: list[str], removed: list[float],
                acc_o: GramAccumulator, acc_d: GramAccumulator, gen: torch.Generator) -> Candidates:
    if kinds:
        scores = layer_scores(config, adapter, layer, acc_o, acc_d, gen)
        for kind in kinds:
            for r in removed:
                yield kind, r, candidate(adapter, layer, kind, scores, r, acc_o if kind == "attn" else acc_d,
                                         config.refit.damp, refit=config.refit.method != "none")
    acc_o.release()
    acc_d.release()
