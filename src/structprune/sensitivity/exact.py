"""sensitivity="exact": each candidate's held-back NLL, measured by running the held-back windows
through the candidate, every dense layer after it, the final norm and the head (see the package
docstring for the cost)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter
from ..config import PruneConfig
from ..allocation.budget import Key
from ..planning import DenseLayer, holdout_nll
from ..runtime.stream import LayerStream
from .candidates import Removed, by_kind, layer_candidates, with_consumer


def measure(config: PruneConfig, adapter: Adapter, model: nn.Module, dense_layer: DenseLayer, calib: LayerStream,
            hold: LayerStream, holdout: torch.Tensor, keys: list[Key], removed: Removed,
            progress: bool = True) -> tuple[dict[Key, list[tuple[float, float]]], float]:
    """Loss-increase curves {module: [(removed fraction, held-back NLL increase)]} and the dense
    model's held-back NLL. calib: layer-0 inputs of the calibration windows (statistics);
    hold: layer-0 inputs of the `holdout` windows."""
    n_layers = adapter.num_layers
    losses: dict[Key, list[float]] = {}
    per_kind = by_kind(removed)
    bar = tqdm(total=sum(len(per_kind[k]) for _, k in keys), desc="sensitivity", disable=not progress, unit="module")
    for i, layer, cands in layer_candidates(config, adapter, dense_layer, calib, keys, removed):
        with torch.no_grad():
            streams, kinds = [], []
            for kind, _, w, b in cands:
                cand = with_consumer(adapter, layer, kind, w, b)
                streams.append(hold.run(cand, i))
                kinds.append(kind)
                del cand
            hold = hold.run(layer, i)
            for j in range(i + 1, n_layers) if streams else ():  # the dense rest, each loaded once per layer i
                nxt = hold.onload(dense_layer(j))
                streams = [s.run(nxt, j) for s in streams]
                del nxt
            for kind, s in zip(kinds, streams):
                losses.setdefault((i, kind), []).append(holdout_nll(model, adapter, holdout, s))
                bar.update(1)
    bar.close()
    base = holdout_nll(model, adapter, holdout, hold)
    curves = {k: [(r, v - base) for r, v in zip(per_kind[k[1]], vals)] for k, vals in losses.items()}
    return curves, base
