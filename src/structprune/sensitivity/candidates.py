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

STEP = 0.5  # removed fractions measured per module: multiples of STEP x the prunable sparsity

# (module kind, removed fraction, the candidate's consumer weight at full width and bias: `consumer_refit`)
Candidates = Iterator[tuple[str, float, torch.Tensor, torch.Tensor | None]]
TOKENS = 16 * 512  # calibration tokens the candidates are re-fitted on (a prefix of the stream; docs/validation.md)


def steps(max_step: float) -> list[float]:
    """STEP, 2 STEP, ... up to `max_step` (and `max_step` itself): multiples of the sparsity."""
    return sorted({STEP * k for k in range(1, int(max_step / STEP + 1e-9) + 1)} | {float(max_step)})


def fractions(sparsity: float, max_sparsity: float, max_step: float = 1.5) -> list[float]:
    """The removed fractions a module is measured at: `steps(max_step)` x sparsity, capped at max_sparsity."""
    return sorted({min(s * sparsity, max_sparsity) for s in steps(max_step) if s * sparsity > 0})


Removed = list[float] | dict[str, list[float]]  # removed fractions, the same for both kinds or per kind


def by_kind(removed: Removed) -> dict[str, list[float]]:
    """{"attn": fractions, "mlp": fractions} from either form of `Removed`."""
    return removed if isinstance(removed, dict) else {"attn": list(removed), "mlp": list(removed)}


def consumer(adapter: Adapter, layer: nn.Module, kind: str) -> nn.Module:
    """The consumer projection of `kind` in `layer`: o_proj for "attn", down_proj for "mlp"."""
    return adapter.o_proj(layer) if kind == "attn" else adapter.down_proj(layer)


def consumer_refit(adapter: Adapter, layer: nn.Module, kind: str, scores: LayerScores, removed: float,
                   acc: GramAccumulator, damp: float, refit: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The consumer of `kind` (o_proj or down_proj) of the dense `layer` with the module's
    lowest-scoring units removed: (weight at full width, removed columns zero, which equals
    removing them; bias), with `refit` re-fitted on the kept columns (local target, `acc`)."""
    q, _, n = keep_sets(adapter, scores, 1.0 - removed if kind == "attn" else 1.0,
                        1.0 - removed if kind == "mlp" else 1.0)
    cols = head_columns(q, adapter.head_dim) if kind == "attn" else n
    module = consumer(adapter, layer, kind)
    w, b = get_weight(module).detach(), get_bias(module)
    if refit:
        new_w, new_b, _ = refit_consumer(w, None if b is None else b.detach(), acc, cols.to(acc.gram.device), damp)
    else:
        new_w, new_b = w[:, cols.to(w.device)], None
    full = torch.zeros_like(w)
    full[:, cols.to(w.device)] = new_w
    return full, new_b


def with_consumer(adapter: Adapter, layer: nn.Module, kind: str, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> nn.Module:
    """A copy of `layer` whose consumer of `kind` has `weight` and `bias` (`consumer_refit`)."""
    cand = copy.deepcopy(layer)
    set_weight(consumer(adapter, cand, kind), weight, bias)
    return cand


def candidate(adapter: Adapter, layer: nn.Module, kind: str, scores: LayerScores, removed: float,
              acc: GramAccumulator, damp: float, refit: bool) -> nn.Module:
    """A copy of the dense `layer` with `kind`'s consumer as `consumer_refit` makes it."""
    return with_consumer(adapter, layer, kind, *consumer_refit(adapter, layer, kind, scores, removed, acc, damp, refit))


def layer_candidates(config: PruneConfig, adapter: Adapter, dense_layer: DenseLayer, calib: LayerStream,
                     keys: list[Key], removed: Removed) -> Iterator[tuple[int, nn.Module, Candidates]]:
    """Walk the dense model over the calibration stream `calib` (`planning.dense_consumer_stats`,
    with Gram matrices; the caller passes its first `TOKENS` tokens) and yield, per layer, (index, dense layer on the device, its candidates for
    the modules of `keys` at each fraction of `removed` (of its kind), made one at a time). Consume the
    candidates under no_grad and before the next layer: the statistics are freed after the last."""
    gen = torch.Generator().manual_seed(config.seed)
    kinds_at = {i: [k for j, k in keys if j == i] for i in range(adapter.num_layers)}
    for i, layer, acc_o, acc_d, _ in dense_consumer_stats(adapter, dense_layer, calib, full=True, progress=False):
        yield i, layer, _candidates(config, adapter, layer, kinds_at[i], by_kind(removed), acc_o, acc_d, gen)


def _candidates(config: PruneConfig, adapter: Adapter, layer: nn.Module, kinds: list[str],
                removed: dict[str, list[float]],
                acc_o: GramAccumulator, acc_d: GramAccumulator, gen: torch.Generator) -> Candidates:
    if kinds:
        scores = layer_scores(config, adapter, layer, acc_o, acc_d, gen)
        for kind in kinds:
            for r in removed[kind]:
                w, b = consumer_refit(adapter, layer, kind, scores, r, acc_o if kind == "attn" else acc_d,
                                      config.refit.damp, refit=config.refit.method != "none")
                yield kind, r, w, b
    acc_o.release()
    acc_d.release()
